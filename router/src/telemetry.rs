//! OpenTelemetry traces of a router, exported over OTLP/gRPC when an endpoint
//! is configured; with none configured no span is even created.
//!
//! Each router has its own tracer provider whose resource names its region
//! and instance, rather than bridging the process-wide `tracing` subscriber:
//! tests and `tern demo` run several routers in one process, and each must
//! show up as its own service instance in a trace. W3C trace context travels
//! in gRPC metadata, so a forwarded call continues the caller's trace.

use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use tonic::metadata::MetadataMap;

use crate::error::{Result, RouterError};

/// A router's tracing: a tracer when exporting, nothing otherwise.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    tracer: Option<SdkTracer>,
}

impl Telemetry {
    /// No export and no cost.
    pub fn disabled() -> Self {
        Self {
            provider: None,
            tracer: None,
        }
    }

    /// Exports to `endpoint` (`http://host:4317`), sampling `ratio` of root
    /// traces; a call with a sampled parent is always sampled.
    pub fn otlp(endpoint: &str, region: &str, instance: &str, ratio: f64) -> Result<Self> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| RouterError::Internal(format!("OTLP exporter for {endpoint}: {e}")))?;
        // The batch processor on the tokio runtime: the tonic exporter needs it.
        // Export every second: a trace shows up while people still look at
        // the request that made it.
        let batch = opentelemetry_sdk::trace::BatchConfigBuilder::default()
            .with_scheduled_delay(Duration::from_secs(1))
            .build();
        let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .with_batch_config(batch)
        .build();
        let resource = Resource::builder()
            .with_service_name("tern-router")
            .with_attributes([
                KeyValue::new("service.instance.id", instance.to_string()),
                KeyValue::new("tern.region", region.to_string()),
                KeyValue::new("tern.component", "router"),
            ])
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("tern-router");
        Ok(Self {
            provider: Some(provider),
            tracer: Some(tracer),
        })
    }

    /// Starts a span as a child of `parent`; None when not exporting.
    pub fn span(
        &self,
        name: &'static str,
        kind: SpanKind,
        parent: &Context,
        attributes: Vec<KeyValue>,
    ) -> Option<Context> {
        let tracer = self.tracer.as_ref()?;
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(tracer, parent);
        Some(parent.with_span(span))
    }

    /// Flushes and stops the exporter, waiting at most 5 s. The SDK's flush
    /// blocks its thread until the export task (on this runtime) answers, so
    /// it runs on a blocking thread.
    pub async fn shutdown(&self) {
        if let Some(p) = self.provider.clone() {
            let flush = tokio::task::spawn_blocking(move || {
                let _ = p.force_flush();
                let _ = p.shutdown();
            });
            let _ = tokio::time::timeout(Duration::from_secs(5), flush).await;
        }
    }
}

impl Drop for Telemetry {
    /// The SDK shuts a provider down when its last handle drops, and that
    /// blocks until the export task on the tokio runtime answers: done on a
    /// tokio worker (a router task aborted), it can deadlock the runtime. The
    /// last handles are dropped on a thread of their own instead.
    fn drop(&mut self) {
        let (provider, tracer) = (self.provider.take(), self.tracer.take());
        if provider.is_some() || tracer.is_some() {
            let _ = std::thread::Builder::new().name("otel-shutdown".into()).spawn(move || {
                drop(tracer);
                drop(provider);
            });
        }
    }
}

/// The caller's trace context from gRPC metadata (empty when none).
pub fn extract(metadata: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// Writes `cx` as W3C trace context into gRPC metadata.
pub fn inject(cx: &Context, metadata: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(cx, &mut MetadataInjector(metadata));
}

struct MetadataExtractor<'a>(&'a MetadataMap);

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

struct MetadataInjector<'a>(&'a mut MetadataMap);

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
