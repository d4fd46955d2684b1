//! toxiproxy, driven over its HTTP API: the links between regions in tests
//! and the local demo run through it, so latency, cuts and resets can be
//! injected without netem.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::ChildGuard;
use crate::{LocalError, Result, assets};

/// A running toxiproxy server.
pub struct Toxiproxy {
    pub api: SocketAddr,
    process: ChildGuard,
}

/// Direction of a toxic: `Upstream` is client → server, `Downstream` the
/// answers.
#[derive(Clone, Copy, Debug)]
pub enum Stream {
    Upstream,
    Downstream,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Upstream => "upstream",
            Self::Downstream => "downstream",
        }
    }
}

impl Toxiproxy {
    /// Starts toxiproxy-server on a free loopback port and waits for its API.
    pub fn start(dir: &Path) -> Result<Self> {
        let binary = assets::binary("toxiproxy-server")?;
        let port = assets::free_port();
        let mut cmd = Command::new(binary);
        cmd.args(["-host", "127.0.0.1", "-port", &port.to_string()]);
        let mut process = ChildGuard::spawn("toxiproxy", cmd, &dir.join("toxiproxy.log"))?;
        let url = format!("http://127.0.0.1:{port}/version");
        process.wait_until(Duration::from_secs(20), || crate::http::get_ok(&url))?;
        Ok(Self {
            api: SocketAddr::from(([127, 0, 0, 1], port)),
            process,
        })
    }

    /// Creates proxy `name` to `upstream` on a free port; returns its address.
    pub async fn proxy(&self, name: &str, upstream: &str) -> Result<SocketAddr> {
        let body = json!({"name": name, "listen": "127.0.0.1:0", "upstream": upstream, "enabled": true});
        let answer = self.request("POST", "/proxies", Some(body)).await?;
        answer["listen"]
            .as_str()
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| LocalError::Toxiproxy {
                request: format!("POST /proxies {name}"),
                reason: format!("answered without a listen address: {answer}"),
            })
    }

    /// Adds `ms` of latency to one direction of `proxy`.
    pub async fn latency(&self, proxy: &str, stream: Stream, ms: u64) -> Result<()> {
        let body = json!({
            "name": format!("latency_{}", stream.as_str()),
            "type": "latency",
            "stream": stream.as_str(),
            "toxicity": 1.0,
            "attributes": {"latency": ms, "jitter": 0},
        });
        self.request("POST", &format!("/proxies/{proxy}/toxics"), Some(body))
            .await?;
        Ok(())
    }

    /// A round trip of `rtt_ms` through `proxy`: half each way.
    pub async fn round_trip(&self, proxy: &str, rtt_ms: u64) -> Result<()> {
        self.latency(proxy, Stream::Upstream, rtt_ms / 2).await?;
        self.latency(proxy, Stream::Downstream, rtt_ms - rtt_ms / 2).await
    }

    /// Cuts (`false`) or restores (`true`) the link: a disabled proxy closes
    /// its connections and refuses new ones.
    pub async fn set_enabled(&self, proxy: &str, enabled: bool) -> Result<()> {
        self.request("POST", &format!("/proxies/{proxy}"), Some(json!({"enabled": enabled})))
            .await?;
        Ok(())
    }

    /// Drops everything sent towards the server from now on, without closing
    /// the connection: requests vanish, as in a partition.
    pub async fn blackhole(&self, proxy: &str, stream: Stream) -> Result<()> {
        let body = json!({
            "name": format!("blackhole_{}", stream.as_str()),
            "type": "timeout",
            "stream": stream.as_str(),
            "toxicity": 1.0,
            "attributes": {"timeout": 0},
        });
        self.request("POST", &format!("/proxies/{proxy}/toxics"), Some(body))
            .await?;
        Ok(())
    }

    /// Adds toxic `name` of `kind` (toxiproxy's type: `reset_peer`,
    /// `limit_data`, ...) to one direction of `proxy`, applied to each
    /// connection with probability `toxicity`.
    pub async fn toxic(
        &self,
        proxy: &str,
        name: &str,
        kind: &str,
        stream: Stream,
        toxicity: f64,
        attributes: Value,
    ) -> Result<()> {
        let body = json!({
            "name": name,
            "type": kind,
            "stream": stream.as_str(),
            "toxicity": toxicity,
            "attributes": attributes,
        });
        self.request("POST", &format!("/proxies/{proxy}/toxics"), Some(body))
            .await?;
        Ok(())
    }

    /// Removes a toxic by name (`latency_upstream`, `blackhole_downstream`, ...).
    pub async fn remove_toxic(&self, proxy: &str, toxic: &str) -> Result<()> {
        self.request("DELETE", &format!("/proxies/{proxy}/toxics/{toxic}"), None)
            .await?;
        Ok(())
    }

    async fn request(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let err = |reason: String| LocalError::Toxiproxy {
            request: format!("{method} {path}"),
            reason,
        };
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut stream = tokio::net::TcpStream::connect(self.api)
            .await
            .map_err(|e| err(e.to_string()))?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.api,
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| err(e.to_string()))?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .map_err(|e| err(e.to_string()))?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| err("malformed answer".into()))?;
        let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        if !(200..300).contains(&status) {
            return Err(err(format!("HTTP {status}: {body}")));
        }
        Ok(serde_json::from_str(body).unwrap_or(Value::Null))
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.process.log_tail()
    }
}
