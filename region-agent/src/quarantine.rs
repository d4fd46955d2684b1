//! Nothing lost silently (DESIGN.md "Failover"): when a region that was
//! failed over comes back, its agent compares what its group committed
//! with what the successor's mirror had applied when it was promoted, and
//! writes every write that did not make it over into the directory's
//! quarantine area (`/tern/dir/quarantine/{region}/{epoch}/`), with an
//! event and a metric. `tern quarantine list|export` reads it. Nothing in
//! quarantine is ever applied by tern: whether to re-apply a write is a
//! decision about money, for a person.
//!
//! The successor's mirror stopped for good at its promotion, so its
//! applied record is exactly where the two histories part. Every event of
//! this group after it (from the group's own history, by a watch) is a
//! write the successor never had. If the history was compacted past that
//! point, each changed key's latest value is listed instead, and the
//! summary says the history was incomplete.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, WatchOptions};
use tern_common::etcd::Pages;
use tern_common::{
    AccountRecord, DIR_ACCOUNTS, MIRRORED_END, MIRRORED_START, QuarantineSummary, QuarantinedWrite, RegionName,
    RegionRecord, RegionState, RetiredHome, SourceRevision, dir_quarantine_summary, dir_quarantine_write,
    dir_region_key, dir_rejoin_key, heartbeat_key, mirror_applied_key, promotion_key,
};

use crate::error::{AgentError, EtcdContext, Result};
use crate::heartbeat::Heartbeat;
use crate::plan::Mark;
use crate::state::Shared;

/// How often the directory is looked at for a failover of this region.
const EVERY: Duration = Duration::from_secs(2);
/// Quarantined writes per directory transaction.
const PER_TXN: usize = 64;

/// Runs while this agent leads (aborted with the other loops); does its
/// work once per failover of this region. A second agent doing it too
/// writes the same records, and only one summary.
pub async fn run(
    directory: Client,
    group: Client,
    sources: BTreeMap<RegionName, Client>,
    shared: Arc<Shared>,
) -> AgentError {
    let mut d = directory;
    loop {
        if let Err(e) = round(&mut d, &group, &sources, &shared).await {
            tracing::warn!(error = %e, "cannot compare this region's writes with its successor's; retrying");
        }
        tokio::time::sleep(EVERY).await;
    }
}

async fn round(d: &mut Client, group: &Client, sources: &BTreeMap<RegionName, Client>, shared: &Shared) -> Result<()> {
    let region = &shared.region;
    let key = dir_region_key(region);
    let found = d.get(key.clone(), None).await.during(|| format!("reading {key}"))?;
    let Some(kv) = found.kvs().first() else { return Ok(()) };
    let record: RegionRecord = serde_json::from_slice(kv.value()).map_err(|e| AgentError::Malformed {
        key: key.clone(),
        detail: e.to_string(),
    })?;
    let (RegionState::Failed, Some(successor)) = (record.state, record.successor.clone()) else {
        return Ok(());
    };
    let epoch = record.region_epoch;
    let summary_key = dir_quarantine_summary(region, epoch);
    if d.get(summary_key.clone(), None)
        .await
        .during(|| format!("reading {summary_key}"))?
        .count()
        > 0
    {
        return retire(d, group, region, &successor, epoch).await;
    }
    let Some(successor_group) = sources.get(&successor) else {
        tracing::warn!(%successor, "this agent has no client of its successor's group: cannot quarantine");
        return Ok(());
    };
    // Only a promoted mirror has stopped: before that it could still apply.
    let mut s = successor_group.clone();
    let marker = promotion_key(region);
    let promoted = s
        .get(marker.clone(), None)
        .await
        .during(|| format!("reading {marker} at {successor}"))?;
    if promoted.kvs().first().map(|kv| kv.value().to_vec()) != Some(epoch.to_string().into_bytes()) {
        return Ok(());
    }
    let applied_key = mirror_applied_key(region);
    let applied = s
        .get(applied_key.clone(), None)
        .await
        .during(|| format!("reading {applied_key} at {successor}"))?;
    let mark = applied
        .kvs()
        .first()
        .and_then(|kv| Mark::parse(std::str::from_utf8(kv.value()).ok()?))
        .unwrap_or_else(|| Mark::whole(SourceRevision(0)));
    let (writes, compared_to, complete) = compare(group, region, &mark).await?;
    let accounts: BTreeSet<&str> = writes.iter().map(|w| w.account.as_str()).collect();
    let summary = QuarantineSummary {
        region: region.to_string(),
        successor: successor.to_string(),
        failover_epoch: epoch,
        applied: mark.to_string(),
        compared_to_revision: compared_to,
        writes: writes.len() as u64,
        accounts: accounts.len() as u64,
        complete_history: complete,
        written_unix_ms: tern_common::unix_ms(),
    };
    let records: Vec<(String, String)> = writes
        .iter()
        .enumerate()
        .map(|(i, w)| {
            (
                dir_quarantine_write(region, epoch, w.revision, i),
                serde_json::to_string(w).expect("records always serialise"),
            )
        })
        .collect();
    for chunk in records.chunks(PER_TXN) {
        let puts: Vec<TxnOp> = chunk
            .iter()
            .map(|(k, v)| TxnOp::put(k.clone(), v.clone(), None))
            .collect();
        d.txn(Txn::new().and_then(puts))
            .await
            .during(|| "writing quarantined writes".into())?;
    }
    // The summary last, once: while it is missing the quarantine is not
    // complete, and a second agent's attempt writes the same records.
    let done = d
        .txn(
            Txn::new()
                .when([Compare::version(summary_key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    summary_key.clone(),
                    serde_json::to_string(&summary).expect("records always serialise"),
                    None,
                )]),
        )
        .await
        .during(|| format!("writing {summary_key}"))?
        .succeeded();
    if !done {
        return Ok(());
    }
    shared.metrics.quarantined_writes.inc_by(writes.len() as u64);
    let retired = retire(d, group, region, &successor, epoch).await;
    let note = format!(
        "region {region} is back after failing over to {successor} (region epoch {epoch}): {} of its writes ({} accounts) never reached {successor} and are quarantined, not applied{}; `tern quarantine list {region}` shows them",
        writes.len(),
        accounts.len(),
        if complete {
            ""
        } else {
            " (its history was compacted: latest values per key only)"
        }
    );
    tracing::warn!(%region, %successor, epoch, writes = writes.len(), "{note}");
    if let Some(events) = &shared.events {
        events.warning("WritesQuarantined", "Failover", note).await;
    }
    retired
}

/// Once its quarantine is written: every account fence in this region's
/// home area that does not say `moved` yet is set to `E:moved:H`, H being
/// where the directory homes the account now (its successor when it does
/// not say), so that once the region serves again (`tern rejoin`) a router
/// with a stale placement is sent on instead of writing here. Then the
/// directory hears that the home area is retired (`RetiredHome`). Each
/// fence is compared on its revision as read; doing it twice changes
/// nothing.
async fn retire(d: &mut Client, group: &Client, region: &RegionName, successor: &RegionName, epoch: u64) -> Result<()> {
    let rejoin_key = dir_rejoin_key(region);
    let done = d
        .get(rejoin_key.clone(), None)
        .await
        .during(|| format!("reading {rejoin_key}"))?
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice::<RetiredHome>(kv.value()).ok())
        .is_some_and(|r| r.failover_epoch == epoch);
    if done {
        return Ok(());
    }
    let mut homes: BTreeMap<String, RegionName> = BTreeMap::new();
    let mut pages = Pages::prefix(DIR_ACCOUNTS, 5_000);
    while let Some(page) = pages.next(d).await.during(|| "listing the accounts' homes".into())? {
        for kv in page.kvs() {
            if let (Some(account), Ok(record)) = (
                tern_common::account_of_dir_key(kv.key()),
                serde_json::from_slice::<AccountRecord>(kv.value()),
            ) {
                homes.insert(account.to_string(), record.home);
            }
        }
    }
    let mut c = group.clone();
    let mut swaps: Vec<(Compare, TxnOp)> = Vec::new();
    let mut pages = Pages::prefix("/tern/a/", 5_000);
    while let Some(page) = pages
        .next(&mut c)
        .await
        .during(|| "listing this region's fences".into())?
    {
        for kv in page.kvs() {
            let Some(account) = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| k.strip_prefix("/tern/a/")?.strip_suffix("/fence"))
            else {
                continue;
            };
            let Ok(fence) = std::str::from_utf8(kv.value()) else {
                continue;
            };
            if fence.contains(":moved:") {
                continue;
            }
            let Some(fence_epoch) = fence.split(':').next() else {
                continue;
            };
            let home = homes.get(account).filter(|h| *h != region).unwrap_or(successor);
            swaps.push((
                Compare::mod_revision(kv.key(), CompareOp::Equal, kv.mod_revision()),
                TxnOp::put(kv.key(), format!("{fence_epoch}:moved:{home}"), None),
            ));
        }
    }
    let fences = swaps.len() as u64;
    for chunk in swaps.chunks(PER_TXN) {
        let (when, then): (Vec<Compare>, Vec<TxnOp>) = chunk.iter().cloned().unzip();
        // A fence that changed since it was read is looked at again in the
        // next round (the marker below is written only when all held).
        if !c
            .txn(Txn::new().when(when).and_then(then))
            .await
            .during(|| "retiring this region's fences".into())?
            .succeeded()
        {
            return Ok(());
        }
    }
    let retired = RetiredHome {
        failover_epoch: epoch,
        fences,
        written_unix_ms: tern_common::unix_ms(),
    };
    d.put(
        rejoin_key.clone(),
        serde_json::to_string(&retired).expect("records always serialise"),
        None,
    )
    .await
    .during(|| format!("writing {rejoin_key}"))?;
    tracing::info!(%region, %successor, epoch, fences, "home area retired: every fence here says where its account went; the region may rejoin once its accounts are re-homed");
    Ok(())
}

/// This group's writes after `mark`: from its history when it reaches back
/// that far (true), else each changed key's latest value (false). Also the
/// revision compared up to.
async fn compare(group: &Client, region: &RegionName, mark: &Mark) -> Result<(Vec<QuarantinedWrite>, i64, bool)> {
    let mut c = group.clone();
    let now = c
        .get(MIRRORED_START, Some(GetOptions::new().with_count_only()))
        .await
        .during(|| "reading the group's revision".into())?
        .header()
        .map_or(0, |h| h.revision());
    let start = mark.resume().0;
    if start > now {
        return Ok((Vec::new(), now, true));
    }
    match history(&mut c, region, mark, now).await {
        Ok(writes) => Ok((writes, now, true)),
        Err(AgentError::Compacted { .. }) => Ok((latest(&mut c, start).await?, now, false)),
        Err(e) => Err(e),
    }
}

/// Every write of the group's history in `(mark, now]`.
async fn history(c: &mut Client, region: &RegionName, mark: &Mark, now: i64) -> Result<Vec<QuarantinedWrite>> {
    let start = mark.resume().0;
    // The failed region's clock at its last heartbeat before the first
    // write, then at every heartbeat on the way.
    let hb_key = heartbeat_key(region);
    let mut heartbeat_ms = c
        .get(hb_key.clone(), Some(GetOptions::new().with_revision(start - 1)))
        .await
        .ok()
        .and_then(|r| {
            r.kvs()
                .first()
                .and_then(|kv| serde_json::from_slice::<Heartbeat>(kv.value()).ok())
        })
        .map(|h| h.wall_ms);
    let mut stream = c
        .watch(
            MIRRORED_START,
            Some(
                WatchOptions::new()
                    .with_range(MIRRORED_END)
                    .with_start_revision(start)
                    .with_progress_notify(),
            ),
        )
        .await
        .during(|| "watching the group's history".into())?;
    let mut writes = Vec::new();
    // Events of the mark's own revision that the mirror already applied.
    let mut skip = mark.events.unwrap_or(0);
    // Whether each account's fence here said `E:active` at each point:
    // only writes under an active fence were clients' (a cleanup deleting
    // a moved account's copy, or a move's copy landing, were not).
    let mut active: BTreeMap<String, bool> = BTreeMap::new();
    let mut reader = c.clone();
    loop {
        let resp = match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
            Ok(m) => m.during(|| "watching the group's history".into())?,
            Err(_) => {
                stream
                    .request_progress()
                    .await
                    .during(|| "watching the group's history".into())?;
                continue;
            }
        };
        let Some(resp) = resp else {
            return Err(AgentError::WatchEnded {
                source_region: region.to_string(),
                reason: "the history watch closed".into(),
            });
        };
        if resp.compact_revision() > 0 {
            return Err(AgentError::Compacted {
                source_region: region.to_string(),
                revision: resp.compact_revision(),
            });
        }
        let header = resp.header().map_or(0, |h| h.revision());
        if resp.created() {
            continue;
        }
        if resp.events().is_empty() {
            if header >= now {
                break;
            }
            continue;
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            if kv.mod_revision() > now {
                continue;
            }
            if mark.events.is_some() && kv.mod_revision() == mark.revision.0 && skip > 0 {
                skip -= 1;
                continue;
            }
            if kv.key() == hb_key.as_bytes() {
                heartbeat_ms = serde_json::from_slice::<Heartbeat>(kv.value()).ok().map(|h| h.wall_ms);
                continue;
            }
            let deleted = event.event_type() == EventType::Delete;
            if let Some(account) = std::str::from_utf8(kv.key())
                .ok()
                .and_then(|k| k.strip_prefix("/tern/a/")?.strip_suffix("/fence"))
            {
                active.insert(account.to_string(), !deleted && kv.value().ends_with(b":active"));
                continue;
            }
            if let Some(w) = write(kv.key(), kv.value(), deleted, kv.mod_revision(), heartbeat_ms) {
                let fenced_active = match active.get(&w.account) {
                    Some(a) => *a,
                    None => {
                        let a = fence_active_at(&mut reader, &w.account, start - 1).await;
                        active.insert(w.account.clone(), a);
                        a
                    }
                };
                if fenced_active {
                    writes.push(w);
                }
            }
        }
        if resp
            .events()
            .last()
            .and_then(|e| e.kv())
            .is_some_and(|kv| kv.mod_revision() >= now)
        {
            break;
        }
    }
    // Dropping the stream ends the watch.
    drop(stream);
    Ok(writes)
}

/// Whether `account`'s fence said `E:active` at `revision`; true when that
/// cannot be read (compacted): listing a write too many is better than
/// one too few.
async fn fence_active_at(c: &mut Client, account: &str, revision: i64) -> bool {
    let key = format!("/tern/a/{account}/fence");
    match c.get(key, Some(GetOptions::new().with_revision(revision.max(1)))).await {
        Ok(r) => r.kvs().first().is_some_and(|kv| kv.value().ends_with(b":active")),
        Err(_) => true,
    }
}

/// Each user key changed after `start - 1` with its latest value (deletes
/// cannot be seen this way).
async fn latest(c: &mut Client, start: i64) -> Result<Vec<QuarantinedWrite>> {
    let found = c
        .get(
            MIRRORED_START,
            Some(GetOptions::new().with_range(MIRRORED_END).with_min_mod_revision(start)),
        )
        .await
        .during(|| "reading keys changed since the mirror's mark".into())?;
    Ok(found
        .kvs()
        .iter()
        .filter_map(|kv| write(kv.key(), kv.value(), false, kv.mod_revision(), None))
        .collect())
}

/// A quarantined write, if `key` is a user key (`/tern/a/{account}/d/{key}`).
fn write(key: &[u8], value: &[u8], deleted: bool, revision: i64, after: Option<i64>) -> Option<QuarantinedWrite> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix("/tern/a/")?;
    let (account, user_key) = rest.split_once("/d/")?;
    let (value, value_hex) = if deleted {
        (None, None)
    } else {
        match std::str::from_utf8(value) {
            Ok(text) => (Some(text.to_string()), None),
            Err(_) => (None, Some(value.iter().map(|b| format!("{b:02x}")).collect())),
        }
    };
    Some(QuarantinedWrite {
        account: account.to_string(),
        key: user_key.to_string(),
        value,
        value_hex,
        deleted,
        revision,
        committed_after_ms: after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_user_keys_are_quarantined_and_binary_values_are_hex() {
        let w = write(b"/tern/a/acct-1/d/balance", b"10", false, 7, Some(5)).expect("a user key");
        assert_eq!(
            (w.account.as_str(), w.key.as_str(), w.value.as_deref()),
            ("acct-1", "balance", Some("10"))
        );
        assert!(write(b"/tern/a/acct-1/fence", b"1:active", false, 7, None).is_none());
        assert!(write(b"/tern/a/acct-1/idem/k", b"{}", false, 7, None).is_none());
        let bin = write(b"/tern/a/acct-1/d/b", &[0xff, 0x00], false, 8, None).expect("a user key");
        assert_eq!((bin.value, bin.value_hex.as_deref()), (None, Some("ff00")));
        let del = write(b"/tern/a/acct-1/d/b", b"", true, 9, None).expect("a delete");
        assert!(del.deleted && del.value.is_none());
    }
}
