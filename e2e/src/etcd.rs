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

/// Every value ever put under `prefix`, as (key, value) in commit order,
/// read from etcd's own history with a watch from the first revision
/// (nothing is compacted in the tests that use it). Complete once the
/// watch has replayed up to the newest put under the prefix.
pub async fn put_history(c: &mut etcd_client::Client, prefix: &str) -> Vec<(String, String)> {
    let last = c
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .expect("range read")
        .kvs()
        .iter()
        .map(|kv| kv.mod_revision())
        .max()
        .unwrap_or(0);
    let mut stream = c
        .watch(
            prefix,
            Some(etcd_client::WatchOptions::new().with_prefix().with_start_revision(1)),
        )
        .await
        .expect("watch from the first revision");
    let mut history = Vec::new();
    let mut seen = 0;
    while seen < last {
        let Some(resp) = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("history arrives")
            .expect("watch")
        else {
            break;
        };
        for event in resp.events() {
            if let Some(kv) = event.kv() {
                seen = seen.max(kv.mod_revision());
            }
            if event.event_type() == etcd_client::EventType::Put
                && let Some(kv) = event.kv()
            {
                history.push((
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                ));
            }
        }
    }
    history
}
