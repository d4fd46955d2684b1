//! W3C trace context in gRPC metadata: extracted from every call, so a client's
//! `traceparent` is continued, and injected into every forwarded call, so a
//! proxied write is one trace across both regions. The export itself is
//! `tern_common::telemetry`, shared with the agent and the operator.

use opentelemetry::Context;
#[cfg(feature = "otlp")]
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
#[cfg(feature = "otlp")]
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::MetadataMap;

pub use tern_common::telemetry::Telemetry;

/// The caller's trace context from gRPC metadata (empty when none).
#[cfg(feature = "otlp")]
pub fn extract(metadata: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// Writes `cx` as W3C trace context into gRPC metadata.
#[cfg(feature = "otlp")]
pub fn inject(cx: &Context, metadata: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(cx, &mut MetadataInjector(metadata));
}

/// Built without trace export: no context travels.
#[cfg(not(feature = "otlp"))]
pub fn extract(_: &MetadataMap) -> Context {
    Context::new()
}

/// Built without trace export: no context travels.
#[cfg(not(feature = "otlp"))]
pub fn inject(_: &Context, _: &mut MetadataMap) {}

#[cfg(feature = "otlp")]
struct MetadataExtractor<'a>(&'a MetadataMap);

#[cfg(feature = "otlp")]
impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(feature = "otlp")]
struct MetadataInjector<'a>(&'a mut MetadataMap);

#[cfg(feature = "otlp")]
impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}
