//! A single-member etcd for a test API server.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tern_local::process::ChildGuard;

use crate::{Result, assets};

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
        let health = format!("{client_url}/health");
        process.wait_until(Duration::from_secs(30), || tern_local::http::get_ok(&health))?;
        Ok(Self { client_url, process })
    }

    /// Kills the member.
    pub fn stop(&mut self) {
        self.process.kill();
    }
}
