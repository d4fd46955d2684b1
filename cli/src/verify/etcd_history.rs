//! What etcd applied, for the applied checker: every value each account key
//! took in its home group, from a watch that runs for the whole run. Read at
//! the end from revision 1 it would miss what a compaction fault removed;
//! watched from the start it keeps up, and a watch that breaks (a member
//! killed under it) resumes after the last revision it saw.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_local::LocalDeployment;
use tern_verify::applied::Applied;

use crate::CliError;

/// Where account data lives in a group: `/tern/a/ACCOUNT/d/KEY`.
const PREFIX: &str = "/tern/a/";

#[derive(Default)]
struct Seen {
    applied: Applied,
    /// (group, account) whose fence there is active now. Routers write an
    /// account's data only under an active fence; a migration's copy into
    /// a new home is written before that home's fence (`migrate.rs` writes
    /// it last), so its puts are not writes of their own and are skipped.
    active: std::collections::BTreeSet<(String, String)>,
    /// Newest revision seen per group.
    revision: BTreeMap<String, i64>,
    /// Why part of the history could not be read, if it could not.
    lost: Option<String>,
}

/// Watches of every region's group, from before the workload starts.
pub struct EtcdHistory {
    seen: Arc<Mutex<Seen>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl EtcdHistory {
    pub fn start(d: &LocalDeployment) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let tasks = d
            .regions
            .iter()
            .map(|r| tokio::spawn(watch(r.name.clone(), r.group.endpoints(), seen.clone())))
            .collect();
        Self { seen, tasks }
    }

    /// Waits until every group's watch has seen its newest account write,
    /// then returns what was applied.
    pub async fn finish(self, d: &LocalDeployment) -> Result<Applied, CliError> {
        for region in &d.regions {
            let mut c = d.group_client(&region.name).await;
            let newest = c
                .get(PREFIX, Some(etcd_client::GetOptions::new().with_prefix()))
                .await
                .map_err(|source| CliError::EtcdRequest {
                    what: format!("reading {PREFIX} in {}", region.name),
                    source,
                })?
                .kvs()
                .iter()
                .filter(|kv| data_key(&String::from_utf8_lossy(kv.key())).is_some())
                .map(|kv| kv.mod_revision())
                .max()
                .unwrap_or(0);
            let give_up = Instant::now() + Duration::from_secs(30);
            loop {
                let reached = {
                    let seen = lock(&self.seen);
                    if let Some(why) = &seen.lost {
                        return Err(CliError::Setup(format!("etcd's history is incomplete: {why}")));
                    }
                    seen.revision.get(&region.name).copied().unwrap_or(0) >= newest
                };
                if reached {
                    break;
                }
                if Instant::now() > give_up {
                    return Err(CliError::Setup(format!(
                        "the watch of {}'s group did not reach revision {newest} within 30 s",
                        region.name
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for t in &self.tasks {
            t.abort();
        }
        Ok(std::mem::take(&mut lock(&self.seen).applied))
    }
}

impl Drop for EtcdHistory {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn lock(seen: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|e| e.into_inner())
}

/// The account of an account's fence key.
fn fence_of(key: &str) -> Option<&str> {
    key.strip_prefix(PREFIX)?.strip_suffix("/fence")
}

/// `ACCOUNT/KEY` of an account data key.
fn data_key(key: &str) -> Option<String> {
    let rest = key.strip_prefix(PREFIX)?;
    let (account, rest) = rest.split_once('/')?;
    let user = rest.strip_prefix("d/")?;
    Some(format!("{account}/{user}"))
}

/// Watches `region`'s group until aborted, resuming after breaks.
async fn watch(region: String, endpoints: Vec<String>, seen: Arc<Mutex<Seen>>) {
    loop {
        let next = lock(&seen).revision.get(&region).copied().unwrap_or(0) + 1;
        if let Err(e) = watch_once(&region, &endpoints, next, &seen).await {
            tracing::debug!(%region, error = %e, "history watch broke; resuming");
        }
        if lock(&seen).lost.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn watch_once(
    region: &str,
    endpoints: &[String],
    from: i64,
    seen: &Mutex<Seen>,
) -> Result<(), etcd_client::Error> {
    let mut c = etcd_client::Client::connect(endpoints, None).await?;
    let mut stream = c
        .watch(
            PREFIX,
            Some(etcd_client::WatchOptions::new().with_prefix().with_start_revision(from)),
        )
        .await?;
    while let Some(resp) = stream.message().await? {
        let mut seen = lock(seen);
        if resp.compact_revision() > 0 {
            seen.lost = Some(format!(
                "{region}'s group was compacted at revision {} before the watch read revision {from}",
                resp.compact_revision()
            ));
            return Ok(());
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let revision = seen.revision.entry(region.to_string()).or_default();
            *revision = (*revision).max(kv.mod_revision());
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let put = event.event_type() == etcd_client::EventType::Put;
            if let Some(account) = fence_of(&key) {
                let at = (region.to_string(), account.to_string());
                if put && kv.value().ends_with(b":active") {
                    seen.active.insert(at);
                } else {
                    seen.active.remove(&at);
                }
                continue;
            }
            if put
                && let Some(key) = data_key(&key)
                && key
                    .split_once('/')
                    .is_some_and(|(account, _)| seen.active.contains(&(region.to_string(), account.to_string())))
            {
                seen.applied
                    .entry(key)
                    .or_default()
                    .push(String::from_utf8_lossy(kv.value()).into_owned());
            }
        }
    }
    Ok(())
}
