//! A single-member etcd for a test API server.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::ChildGuard;
use crate::{HarnessError, Result, assets};

/// A running etcd member with one client URL.
pub struct EtcdServer {
    pub client_url: String,
    process: ChildGuard,
}

impl EtcdServer {
    /// Starts etcd with its data in `dir`, on ports from the OS, and waits
    /// until `/health` answers.
    pub fn start(dir: &Path, name: &str) -> Result<Self> {
        assets::retry_port_clash(|| Self::start_once(dir, name))
    }

    fn start_once(dir: &Path, name: &str) -> Result<Self> {
        let binary = assets::binary("etcd")?;
        let client_url = format!("http://127.0.0.1:{}", assets::free_port());
        let peer_url = format!("http://127.0.0.1:{}", assets::free_port());
        let data_dir = dir.join("etcd-data");
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--name={name}"))
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={name}={peer_url}"))
            // Tests only: durability of the API server's own store does not
            // matter, and fsync dominates on a shared CI disk.
            .arg("--unsafe-no-fsync")
            .arg("--log-level=warn");
        let mut process = ChildGuard::spawn(&format!("etcd {name}"), cmd, &dir.join("etcd.log"))?;
        wait_until(&mut process, &format!("etcd {name}"), Duration::from_secs(30), || {
            http_get_ok(&format!("{client_url}/health"))
        })?;
        Ok(Self { client_url, process })
    }

    /// Kills the member.
    pub fn stop(&mut self) {
        self.process.kill();
    }
}

/// Polls `ready` every 50 ms until it is true, the process dies, or `limit`
/// passes.
pub(crate) fn wait_until(
    process: &mut ChildGuard,
    what: &str,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        process.check_running()?;
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(HarnessError::NotReady {
                what: what.to_string(),
                secs: limit.as_secs(),
                log: process.log_tail(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A plain-HTTP GET on loopback that returns whether the answer was 200. The
/// harness keeps to std here so that it needs no runtime to start servers.
pub(crate) fn http_get_ok(url: &str) -> bool {
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
