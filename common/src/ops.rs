//! The ops endpoints every tern binary serves on its HTTP port: `/metrics`
//! (Prometheus text), `/healthz` (the process serves) and `/readyz` (it can do
//! its job; the body says why not).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// Renders the metrics in Prometheus text format.
pub type MetricsFn = Arc<dyn Fn() -> String + Send + Sync>;
/// Ok when ready, else why not.
pub type ReadyFn = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
struct Endpoints {
    metrics: MetricsFn,
    ready: ReadyFn,
}

/// Binds `addr` and serves until `shutdown` completes. Returns the bound
/// address (useful with port 0) and the server task.
pub async fn serve(
    addr: SocketAddr,
    metrics: MetricsFn,
    ready: ReadyFn,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Endpoints { metrics, ready });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, "ops endpoint server failed");
        }
    });
    Ok((bound, task))
}

async fn render_metrics(State(e): State<Endpoints>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        (e.metrics)(),
    )
}

async fn readyz(State(e): State<Endpoints>) -> impl IntoResponse {
    match (e.ready)() {
        Ok(()) => (StatusCode::OK, "ok".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}
