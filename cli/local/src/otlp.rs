//! An in-process OTLP trace receiver: the real OTLP/gRPC protocol
//! (opentelemetry-proto's tonic server), keeping the spans it receives (the
//! newest `KEPT`) with their resource, so tests and `tern demo` can rebuild
//! traces.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

/// One received span, flattened.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    pub name: String,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    pub parent_span_id: Vec<u8>,
    pub start_ns: u64,
    pub end_ns: u64,
    /// `service.instance.id` of the resource that sent it.
    pub instance: String,
    /// The SPIFFE identities of the exporter's client certificate (a
    /// receiver started with TLS); empty otherwise.
    pub exporter_identities: Vec<String>,
    pub attributes: Vec<(String, String)>,
}

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn duration_ms(&self) -> f64 {
        (self.end_ns.saturating_sub(self.start_ns)) as f64 / 1e6
    }
}

/// Spans kept, newest last: a long `tern demo --keep` (agents trace every
/// heartbeat) must not grow without bound.
pub const KEPT: usize = 200_000;

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<std::collections::VecDeque<ReceivedSpan>>>,
    /// Passes every export on to another OTLP receiver (Jaeger), too.
    forward_to: Option<
        opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient<
            tonic::transport::Channel,
        >,
    >,
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let exporter_identities: Vec<String> = request
            .extensions()
            .get::<tern_common::tls::PeerInfo>()
            .map(|p| p.identities.to_vec())
            .unwrap_or_default();
        let request = request.into_inner();
        if let Some(client) = &self.forward_to {
            let mut client = client.clone();
            let copy = request.clone();
            tokio::spawn(async move {
                let _ = client.export(copy).await;
            });
        }
        let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        for rs in request.resource_spans {
            let instance = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.instance.id"))
                .map(|a| text(&a.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push_back(ReceivedSpan {
                        name: s.name,
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent_span_id: s.parent_span_id,
                        start_ns: s.start_time_unix_nano,
                        end_ns: s.end_time_unix_nano,
                        instance: instance.clone(),
                        exporter_identities: exporter_identities.clone(),
                        attributes: s.attributes.iter().map(|a| (a.key.clone(), text(&a.value))).collect(),
                    });
                }
            }
        }
        let excess = spans.len().saturating_sub(KEPT);
        spans.drain(..excess);
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// A running receiver.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    collector: Collector,
    stop: Option<oneshot::Sender<()>>,
    tls: bool,
}

impl OtlpReceiver {
    pub async fn start() -> std::io::Result<Self> {
        Self::start_forwarding(None).await
    }

    /// A receiver on `listener` (bound beforehand, so that its address can
    /// be handed out before its certificate exists) that speaks TLS with
    /// `tls`, requiring a client certificate when `tls` was loaded so: a
    /// collector as a deployment with TLS would run it.
    pub fn start_tls(listener: tokio::net::TcpListener, tls: tern_common::tls::Tls) -> std::io::Result<Self> {
        Self::serve(listener, Collector::default(), Some(tls))
    }

    /// A receiver that also passes every export on to `forward_to`
    /// (`http://host:port`, an OTLP/gRPC endpoint such as Jaeger's).
    pub async fn start_forwarding(forward_to: Option<&str>) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let forward_to = match forward_to {
            Some(url) => {
                let channel = tonic::transport::Endpoint::from_shared(url.to_string())
                    .map_err(|e| std::io::Error::other(e.to_string()))?
                    .connect_lazy();
                Some(
                    opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient::new(
                        channel,
                    ),
                )
            }
            None => None,
        };
        let collector = Collector {
            spans: Arc::default(),
            forward_to,
        };
        Self::serve(listener, collector, None)
    }

    /// Serves `collector` on `listener`, with TLS when `tls` is given.
    fn serve(
        listener: tokio::net::TcpListener,
        collector: Collector,
        tls: Option<tern_common::tls::Tls>,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let scheme_tls = tls.is_some();
        let (stop, stopped) = oneshot::channel::<()>();
        let service = TraceServiceServer::new(collector.clone());
        let incoming = tern_common::tls::incoming(listener, tls);
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self {
            addr,
            collector,
            stop: Some(stop),
            tls: scheme_tls,
        })
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.collector
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
