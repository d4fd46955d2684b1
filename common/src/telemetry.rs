//! OpenTelemetry traces of a tern component (router, agent, operator),
//! exported over OTLP/gRPC when an endpoint is configured; with none
//! configured no span is even created, so tracing costs one branch.
//!
//! Each component instance owns its tracer provider, whose resource names its
//! component, region and instance, rather than bridging the process-wide
//! `tracing` subscriber: tests and `tern demo` run several routers and agents
//! in one process, and each must show up as its own service instance in a
//! trace. The router carries W3C trace context across its gRPC hops itself
//! (`tern_router::telemetry`).
//!
//! Built without the `otlp` feature there is no exporter at all: that build
//! is what `tern bench` compares a router with no endpoint against.

use opentelemetry::trace::{SpanKind, Status, TraceContextExt};
use opentelemetry::{Context, KeyValue};

/// The trace flags every tern binary takes.
#[derive(clap::Args, Clone, Debug, Default, PartialEq)]
pub struct TraceArgs {
    /// OTLP/gRPC endpoint for traces, e.g. http://127.0.0.1:4317. Unset: no
    /// traces are exported and no spans are created. https:// exports over
    /// mutual TLS with the component's own certificate (--tls-dir): the
    /// collector's certificate must chain to that CA and name the URL's host.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_parser = parse_endpoint)]
    pub otlp_endpoint: Option<String>,

    /// Fraction of root traces sampled (0 to 1); a span whose parent was
    /// sampled is always sampled.
    #[arg(long, env = "TERN_TRACE_SAMPLING_RATIO", default_value_t = 1.0, value_parser = parse_ratio)]
    pub trace_sampling_ratio: f64,
}

fn parse_endpoint(s: &str) -> Result<String, String> {
    // The same rule as the GeoCluster schema's spec.telemetry.otlpEndpoint.
    if crate::limits::is_otlp_endpoint(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "`{s}` is not an http:// or https:// URL of an OTLP/gRPC receiver"
        ))
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{s}` is not a number between 0 and 1")),
    }
}

/// Who exports: the resource attributes of every span.
#[derive(Clone, Debug)]
pub struct Identity<'a> {
    /// `router`, `agent` or `operator`; the service is `tern-<component>`.
    pub component: &'static str,
    /// The region served, when the component serves one.
    pub region: Option<&'a str>,
    /// `service.instance.id`: tells two routers of one region apart.
    pub instance: &'a str,
}

/// A component's tracing: an exporter when one is configured, nothing
/// otherwise.
pub struct Telemetry {
    exporter: Option<exporter::Exporter>,
}

impl Telemetry {
    /// No export and no cost.
    pub fn disabled() -> Self {
        Self { exporter: None }
    }

    /// From the flags: exporting when an endpoint is set, over `tls` (the
    /// component's own certificate and CA) when it is https://. Must be
    /// called on a tokio runtime (the exporter's batch task runs there).
    pub fn from_args(
        args: &TraceArgs,
        who: Identity<'_>,
        tls: Option<&crate::tls::Tls>,
    ) -> Result<Self, crate::CommonError> {
        match &args.otlp_endpoint {
            Some(endpoint) => Self::otlp(endpoint, who, args.trace_sampling_ratio, tls),
            None => Ok(Self::disabled()),
        }
    }

    /// Exports to `endpoint` (`http://host:4317`, or `https://` over `tls`),
    /// sampling `ratio` of root traces; a span with a sampled parent is
    /// always sampled. An https:// endpoint without `tls` is refused: spans
    /// name accounts and regions, and they would otherwise go in plain text
    /// or not at all.
    pub fn otlp(
        endpoint: &str,
        who: Identity<'_>,
        ratio: f64,
        tls: Option<&crate::tls::Tls>,
    ) -> Result<Self, crate::CommonError> {
        let tls = match (endpoint.starts_with("https://"), tls) {
            (true, None) => {
                return Err(crate::CommonError::TraceExport {
                    endpoint: endpoint.to_string(),
                    source: format!(
                        "an https:// endpoint needs {}'s TLS certificate (--tls-dir), which it presents to the collector and whose CA checks the collector's; give --tls-dir, or use http://",
                        who.component
                    )
                    .into(),
                });
            }
            (true, Some(tls)) => Some(tls),
            // http://: plain, as asked, even where the component has TLS.
            (false, _) => None,
        };
        Ok(Self {
            exporter: Some(exporter::Exporter::new(endpoint, who, ratio, tls)?),
        })
    }

    /// Whether spans are being made at all.
    pub fn enabled(&self) -> bool {
        self.exporter.is_some()
    }

    /// Starts a span as a child of `parent`; None when not exporting.
    /// `attributes` is only called when a span is made, so a component with
    /// no endpoint pays nothing for formatting them.
    pub fn span(
        &self,
        name: &'static str,
        kind: SpanKind,
        parent: &Context,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Context> {
        Some(self.exporter.as_ref()?.span(name, kind, parent, attributes()))
    }

    /// A root span (a loop's unit of work: one heartbeat, one mirrored
    /// revision, one reconcile); None when not exporting.
    pub fn root(&self, name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) -> Option<Context> {
        self.span(name, SpanKind::Internal, &Context::new(), attributes)
    }

    /// Flushes and stops the exporter, waiting at most 5 s.
    pub async fn shutdown(&self) {
        if let Some(e) = &self.exporter {
            e.shutdown().await;
        }
    }
}

/// Ends the span in `cx` (if any) with `attributes` and, on failure, an error
/// status carrying the message.
pub fn finish<E: std::fmt::Display>(cx: Option<Context>, attributes: Vec<KeyValue>, result: Result<(), E>) {
    let Some(cx) = cx else { return };
    let span = cx.span();
    for a in attributes {
        span.set_attribute(a);
    }
    if let Err(e) = result {
        span.set_status(Status::error(e.to_string()));
    }
    span.end();
}

#[cfg(feature = "otlp")]
mod exporter {
    use std::time::Duration;

    use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer, TracerProvider as _};
    use opentelemetry::{Context, KeyValue};
    use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

    use super::Identity;

    /// How long one export may take, the channel's too (as
    /// opentelemetry-otlp asks of a channel given to it).
    const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

    pub struct Exporter {
        provider: Option<SdkTracerProvider>,
        tracer: Option<SdkTracer>,
    }

    impl Exporter {
        pub fn new(
            endpoint: &str,
            who: Identity<'_>,
            ratio: f64,
            tls: Option<&crate::tls::Tls>,
        ) -> Result<Self, crate::CommonError> {
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(EXPORT_TIMEOUT);
            if let Some(tls) = tls {
                // tern's own TLS connector: the certificate presented is
                // the one on disk at each connection, so a rotated one is
                // used without a restart, as on every other link.
                builder = builder.with_channel(tls.channel_to_collector(endpoint, EXPORT_TIMEOUT)?);
            }
            let exporter = builder.build().map_err(|e| crate::CommonError::TraceExport {
                endpoint: endpoint.to_string(),
                source: Box::new(e),
            })?;
            // The batch processor on the tokio runtime: the tonic exporter
            // needs it. Export every second: a trace shows up while people
            // still look at the request that made it.
            let batch = opentelemetry_sdk::trace::BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_secs(1))
                .build();
            let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                exporter,
                opentelemetry_sdk::runtime::Tokio,
            )
            .with_batch_config(batch)
            .build();
            let service = format!("tern-{}", who.component);
            let mut attributes = vec![
                KeyValue::new("service.instance.id", who.instance.to_string()),
                KeyValue::new("tern.component", who.component),
            ];
            if let Some(region) = who.region {
                attributes.push(KeyValue::new("tern.region", region.to_string()));
            }
            let resource = Resource::builder()
                .with_service_name(service.clone())
                .with_attributes(attributes)
                .build();
            let provider = SdkTracerProvider::builder()
                .with_span_processor(processor)
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))))
                .with_resource(resource)
                .build();
            let tracer = provider.tracer(service);
            Ok(Self {
                provider: Some(provider),
                tracer: Some(tracer),
            })
        }

        pub fn span(&self, name: &'static str, kind: SpanKind, parent: &Context, attributes: Vec<KeyValue>) -> Context {
            let Some(tracer) = self.tracer.as_ref() else {
                return parent.clone();
            };
            let span = tracer
                .span_builder(name)
                .with_kind(kind)
                .with_attributes(attributes)
                .start_with_context(tracer, parent);
            parent.with_span(span)
        }

        /// The SDK's flush blocks its thread until the export task (on this
        /// runtime) answers, so it runs on a blocking thread.
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

    impl Drop for Exporter {
        /// The SDK shuts a provider down when its last handle drops, and that
        /// blocks until the export task on the tokio runtime answers: done on
        /// a tokio worker (a task aborted), it can deadlock the runtime. The
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
}

/// A build without the `otlp` feature: no exporter can exist, and asking for
/// one is refused at start-up.
#[cfg(not(feature = "otlp"))]
mod exporter {
    use opentelemetry::trace::SpanKind;
    use opentelemetry::{Context, KeyValue};

    use super::Identity;

    pub enum Exporter {}

    impl Exporter {
        pub fn new(
            endpoint: &str,
            _who: Identity<'_>,
            _ratio: f64,
            _tls: Option<&crate::tls::Tls>,
        ) -> Result<Self, crate::CommonError> {
            Err(crate::CommonError::TraceExport {
                endpoint: endpoint.to_string(),
                source: "this binary was built without trace export (the `otlp` feature); unset --otlp-endpoint".into(),
            })
        }

        pub fn span(&self, _: &'static str, _: SpanKind, _: &Context, _: Vec<KeyValue>) -> Context {
            match *self {}
        }

        pub async fn shutdown(&self) {
            match *self {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Flags {
        #[command(flatten)]
        trace: TraceArgs,
    }

    #[test]
    fn bad_trace_flags_name_the_flag_and_rule() {
        let e = Flags::try_parse_from(["x", "--trace-sampling-ratio=1.5"])
            .expect_err("ratio above 1")
            .to_string();
        assert!(
            e.contains("--trace-sampling-ratio") && e.contains("between 0 and 1"),
            "{e}"
        );
        let e = Flags::try_parse_from(["x", "--otlp-endpoint=collector:4317"])
            .expect_err("no scheme")
            .to_string();
        assert!(e.contains("--otlp-endpoint") && e.contains("http://"), "{e}");
        let ok = Flags::try_parse_from(["x", "--otlp-endpoint=http://c:4317", "--trace-sampling-ratio=0.25"])
            .expect("valid");
        assert_eq!(ok.trace.trace_sampling_ratio, 0.25);
    }

    #[tokio::test]
    async fn an_https_endpoint_without_tls_is_refused_naming_the_flag() {
        let who = Identity {
            component: "router",
            region: Some("us-east"),
            instance: "r1",
        };
        let e = match Telemetry::otlp("https://collector:4317", who, 1.0, None) {
            Ok(_) => panic!("an https:// endpoint without a certificate must be refused"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("https://collector:4317") && e.contains("--tls-dir"), "{e}");
    }

    #[test]
    fn disabled_makes_no_spans() {
        let t = Telemetry::disabled();
        assert!(!t.enabled());
        let mut called = false;
        assert!(
            t.root("x", || {
                called = true;
                vec![]
            })
            .is_none()
        );
        assert!(!called, "attributes are not built when not exporting");
    }
}
