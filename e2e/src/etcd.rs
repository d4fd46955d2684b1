//! etcd in the tests: a single-member etcd for a test API server, what a
//! group really applied (its watch history), and a recording client whose
//! history the checker judges.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use tern_verify::{Outcome, Record, Request};

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
    put_history_at(c, prefix)
        .await
        .into_iter()
        .map(|(key, value, _)| (key, value))
        .collect()
}

/// Every value each key under `prefix` took, in commit order, from the
/// group's own history: what the history checker judges against.
pub async fn applied(endpoints: &[String], prefix: &str) -> tern_verify::applied::Applied {
    let mut c = Client::connect(endpoints, None).await.expect("connect");
    let mut applied = tern_verify::applied::Applied::new();
    for (key, value) in put_history(&mut c, prefix).await {
        applied.entry(key).or_default().push(value);
    }
    applied
}

/// [`put_history`] with each put's revision: (key, value, revision).
pub async fn put_history_at(c: &mut etcd_client::Client, prefix: &str) -> Vec<(String, String, i64)> {
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
                    kv.mod_revision(),
                ));
            }
        }
    }
    history
}

/// A client that reads, writes and compare-and-sets `keys` of the group at
/// `endpoints` until `stop`, recording every operation for the history
/// checker. Values are unique (`c<client>-<n>`), so a value names its
/// write.
pub async fn register_client(
    id: u32,
    endpoints: Vec<String>,
    keys: &[&'static str],
    start: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Record> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5));
    let mut c = Client::connect(&endpoints, Some(options))
        .await
        .expect("client connects");
    let mut records = Vec::new();
    let mut last: BTreeMap<&str, Option<String>> = BTreeMap::new();
    let mut n = 0u32;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = keys[(n as usize * 7 + id as usize) % keys.len()];
        let value = format!("c{id}-{n}");
        let invoke_us = start.elapsed().as_micros() as u64;
        let (request, outcome) = match n % 5 {
            0 | 1 => {
                let r = c.put(key, value.clone(), None).await;
                (Request::Put { value: value.clone() }, write_outcome(r.map(|_| None)))
            }
            2 | 3 => {
                let r = c.get(key, None).await;
                let outcome = match r {
                    Ok(resp) => {
                        let read = resp
                            .kvs()
                            .first()
                            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
                        last.insert(key, read.clone());
                        Outcome::Ok {
                            value: read,
                            swapped: None,
                            staleness_ms: None,
                        }
                    }
                    Err(e) => Outcome::Failed { reason: e.to_string() },
                };
                (Request::Get, outcome)
            }
            _ => {
                let expect = last.get(key).cloned().flatten();
                let compare = match &expect {
                    Some(v) => Compare::value(key, CompareOp::Equal, v.as_str()),
                    None => Compare::version(key, CompareOp::Equal, 0),
                };
                let txn = Txn::new()
                    .when([compare])
                    .and_then([TxnOp::put(key, value.clone(), None)]);
                let r = c.txn(txn).await.map(|resp| Some(resp.succeeded()));
                (
                    Request::Cas {
                        expect,
                        new: Some(value.clone()),
                    },
                    write_outcome(r),
                )
            }
        };
        records.push(Record {
            client: id,
            key: key.to_string(),
            invoke_us,
            complete_us: start.elapsed().as_micros() as u64,
            request,
            outcome,
            idempotency_key: None,
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    records
}

/// A write that failed may still have been applied: its outcome is unknown.
fn write_outcome(r: Result<Option<bool>, etcd_client::Error>) -> Outcome {
    match r {
        Ok(swapped) => Outcome::Ok {
            value: None,
            swapped,
            staleness_ms: None,
        },
        Err(e) => Outcome::Indeterminate { reason: e.to_string() },
    }
}
