//! What etcd applied, for the applied checker: every value each account key
//! took in its home group, from a watch that runs for the whole run. Read at
//! the end from revision 1 it would miss what a compaction fault removed;
//! watched from the start it keeps up, and a watch that breaks (a member
//! killed under it) resumes after the last revision it saw.
//!
//! After a failover the successor writes the failed region's accounts in
//! its mirror area of that region, once its promotion marker is there:
//! those writes count too (the mirror's own copies before it do not). And
//! it is where split brain would show: a failed region's group applying a
//! write to an account after its successor began applying them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_local::LocalDeployment;
use tern_verify::applied::Applied;

use crate::CliError;

/// Where account data lives in a group: `/tern/a/ACCOUNT/d/KEY`.
const PREFIX: &str = "/tern/a/";
/// Everything tern writes in a group: the watch's range.
const ALL: &str = "/tern/";
/// A mirror area: `/tern/r/SOURCE/tern/a/...`.
const MIRRORS: &str = "/tern/r/";
/// A promotion marker: `/tern/promoted/SOURCE`.
const PROMOTED: &str = "/tern/promoted/";

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
    /// (group, failed region) whose mirror area the group serves.
    promoted: std::collections::BTreeSet<(String, String)>,
    /// When this process last saw a write applied to an account in its own
    /// group's home area, by (group, account).
    last_home_write: BTreeMap<(String, String), Instant>,
    /// When it first saw a successor apply one in its promoted area, by
    /// (failed region, account): (when, successor).
    first_promoted_write: BTreeMap<(String, String), (Instant, String)>,
    /// Every write applied in a group's home area: (group, key, value,
    /// revision), for the quarantine's check against where the successor's
    /// mirror stopped.
    home_writes: Vec<(String, String, String, i64)>,
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
            .map(|r| {
                tokio::spawn(watch(
                    r.name.clone(),
                    r.group.endpoints(),
                    d.client_tls.clone(),
                    seen.clone(),
                ))
            })
            .collect();
        Self { seen, tasks }
    }

    /// Waits until every group's watch has seen its newest revision (the
    /// agents' heartbeats keep every group's history moving), then returns
    /// what was applied, and every write a failed region's group applied
    /// after its successor had begun applying that account's writes.
    pub async fn finish(self, d: &LocalDeployment) -> Result<Finished, CliError> {
        for region in &d.regions {
            let mut c = d.group_client(&region.name).await;
            let newest = c
                .get(
                    ALL,
                    Some(etcd_client::GetOptions::new().with_prefix().with_count_only()),
                )
                .await
                .map_err(|source| CliError::EtcdRequest {
                    what: format!("reading {ALL} in {}", region.name),
                    source,
                })?
                .header()
                .map_or(0, |h| h.revision());
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
        let mut seen = lock(&self.seen);
        let split_brain = split_brain(&seen.last_home_write, &seen.first_promoted_write);
        Ok(Finished {
            applied: std::mem::take(&mut seen.applied),
            split_brain,
            home_writes: std::mem::take(&mut seen.home_writes),
        })
    }
}

/// Accounts a failed region's group wrote after its successor began to:
/// `last_home` by (region, account), `first_promoted` by (failed region,
/// account) with the successor.
fn split_brain(
    last_home: &BTreeMap<(String, String), Instant>,
    first_promoted: &BTreeMap<(String, String), (Instant, String)>,
) -> Vec<String> {
    first_promoted
        .iter()
        .filter_map(|((failed, account), (first, successor))| {
            let last = last_home.get(&(failed.clone(), account.clone()))?;
            (last > first).then(|| {
                format!(
                    "{failed} applied a write to {account} {:?} after {successor} began serving it",
                    *last - *first
                )
            })
        })
        .collect()
}

/// What the watches saw.
pub struct Finished {
    pub applied: Applied,
    /// Writes a failed region applied to an account after its successor
    /// had begun to (two regions writing one account at once).
    pub split_brain: Vec<String>,
    /// Every write applied in a group's home area: (group, key, value,
    /// revision).
    pub home_writes: Vec<(String, String, String, i64)>,
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
async fn watch(region: String, endpoints: Vec<String>, tls: Option<tern_common::tls::Tls>, seen: Arc<Mutex<Seen>>) {
    loop {
        let next = lock(&seen).revision.get(&region).copied().unwrap_or(0) + 1;
        if let Err(e) = watch_once(&region, &endpoints, tls.as_ref(), next, &seen).await {
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
    tls: Option<&tern_common::tls::Tls>,
    from: i64,
    seen: &Mutex<Seen>,
) -> Result<(), etcd_client::Error> {
    let mut c = tern_common::etcd::client(endpoints, tls, None).await?;
    let mut stream = c
        .watch(
            ALL,
            Some(etcd_client::WatchOptions::new().with_prefix().with_start_revision(from)),
        )
        .await?;
    while let Some(resp) = stream.message().await? {
        let now = Instant::now();
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
            let full = String::from_utf8_lossy(kv.key()).into_owned();
            let put = event.event_type() == etcd_client::EventType::Put;
            if let Some(source) = full.strip_prefix(PROMOTED) {
                if put {
                    seen.promoted.insert((region.to_string(), source.to_string()));
                }
                continue;
            }
            // The area the key is in: this group's home area (`None`), or
            // its mirror of `source`, with the key as it is at home.
            let (area, key) = match full.strip_prefix(MIRRORS) {
                Some(rest) => match rest.split_once('/') {
                    Some((source, home)) => (Some(source.to_string()), format!("/{home}")),
                    None => continue,
                },
                None => (None, full),
            };
            let group = match &area {
                None => region.to_string(),
                Some(source) => format!("{region}/{source}"),
            };
            if let Some(account) = fence_of(&key) {
                let at = (group, account.to_string());
                if put && kv.value().ends_with(b":active") {
                    seen.active.insert(at);
                } else {
                    seen.active.remove(&at);
                }
                continue;
            }
            if !put {
                continue;
            }
            let Some(key) = data_key(&key) else { continue };
            let Some((account, _)) = key.split_once('/') else {
                continue;
            };
            let account = account.to_string();
            if !seen.active.contains(&(group, account.clone())) {
                continue;
            }
            match &area {
                None => {
                    seen.last_home_write.insert((region.to_string(), account), now);
                    let value = String::from_utf8_lossy(kv.value()).into_owned();
                    seen.home_writes
                        .push((region.to_string(), key.clone(), value, kv.mod_revision()));
                }
                // A mirror's own copies are not writes; a promoted area's are.
                Some(source) if seen.promoted.contains(&(region.to_string(), source.clone())) => {
                    seen.first_promoted_write
                        .entry((source.clone(), account))
                        .or_insert((now, region.to_string()));
                }
                Some(_) => continue,
            }
            seen.applied
                .entry(key)
                .or_default()
                .push(String::from_utf8_lossy(kv.value()).into_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_in_the_failed_region_after_the_successor_began_is_split_brain() {
        let t0 = Instant::now();
        let key = |a: &str| ("us-east".to_string(), a.to_string());
        let last_home = BTreeMap::from([(key("before"), t0), (key("after"), t0 + Duration::from_millis(300))]);
        let promoted = BTreeMap::from([
            (key("before"), (t0 + Duration::from_millis(100), "eu-west".to_string())),
            (key("after"), (t0 + Duration::from_millis(100), "eu-west".to_string())),
            (key("never-home"), (t0, "eu-west".to_string())),
        ]);
        let found = split_brain(&last_home, &promoted);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("after") && found[0].contains("200ms"), "{found:?}");
    }
}
