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
    serve_with(addr, metrics, ready, Router::new(), shutdown).await
}

/// Like [`serve`], with the binary's own routes (`extra`) next to the ops
/// endpoints.
pub async fn serve_with(
    addr: SocketAddr,
    metrics: MetricsFn,
    ready: ReadyFn,
    extra: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Endpoints { metrics, ready })
        .merge(extra);
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

/// The body of a `Transfer-Encoding: chunked` answer: each chunk is its size
/// in hex, CRLF, the bytes, CRLF; a size of 0 ends it. What cannot be parsed
/// ends it too (the caller sees a short body, not garbage).
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size_field = String::from_utf8_lossy(&raw[..line_end]);
        // A size may carry extensions after ';'.
        let size = size_field.split(';').next().unwrap_or_default().trim();
        let Ok(size) = usize::from_str_radix(size, 16) else {
            break;
        };
        let start = line_end + 2;
        if size == 0 || raw.len() < start + size {
            break;
        }
        out.extend_from_slice(&raw[start..start + size]);
        raw = raw.get(start + size + 2..).unwrap_or_default();
    }
    out
}

/// A plain HTTP/1.1 GET of `path` from `host:port`, within `timeout`: the
/// status code and the body. Enough for tern's components to ask each other
/// short questions (a router asking its agent about the region's lease)
/// without an HTTP client library; the servers are tern's own (axum),
/// and Jaeger's query API, which answers in chunks.
pub async fn http_get(host: &str, path: &str, timeout: std::time::Duration) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(host)
            .await
            .map_err(|e| format!("cannot connect to {host}: {e}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("cannot send to {host}: {e}"))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| format!("cannot read the answer of {host}: {e}"))?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| format!("{host} answered without HTTP headers"))?;
        let head = String::from_utf8_lossy(&response[..split]);
        let body = &response[split + 4..];
        let code = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("{host} answered without a status code"))?;
        // Go's servers (Jaeger's query API) send a large answer in chunks.
        let chunked = head
            .lines()
            .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
        let body = if chunked { dechunk(body) } else { body.to_vec() };
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("{host} did not answer {path} within {timeout:?}"))?
}

#[cfg(test)]
mod tests {
    use super::dechunk;

    #[test]
    fn chunked_bodies_are_joined() {
        let raw = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        assert_eq!(dechunk(raw), b"hello, world");
    }

    #[test]
    fn a_truncated_or_garbled_chunk_ends_the_body() {
        assert_eq!(dechunk(b"5\r\nhel"), b"");
        assert_eq!(dechunk(b"3\r\nabc\r\nzz\r\nxyz\r\n"), b"abc");
    }
}
