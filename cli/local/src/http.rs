//! Plain HTTP/1.1 on loopback, just enough to ask a local server whether it
//! is up and to read a metric: a health check while starting (blocking, so
//! starting a server needs no runtime) and /metrics of a running one.

use std::net::SocketAddr;
use std::time::Duration;

/// A blocking GET that returns whether the answer was 200.
pub fn get_ok(url: &str) -> bool {
    use std::io::{Read, Write};
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(mut stream) = std::net::TcpStream::connect(host) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 16];
    stream.read(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// GET over plain HTTP on loopback; the body when the answer is 200.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    match tern_common::ops::http_get(&addr.to_string(), path, Duration::from_secs(10)).await {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

/// The value of the first line of `addr`'s /metrics starting with `prefix`
/// (a metric name with its labels, as Prometheus prints them).
pub async fn metric(addr: SocketAddr, prefix: &str) -> Option<f64> {
    http_get(addr, "/metrics")
        .await?
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
