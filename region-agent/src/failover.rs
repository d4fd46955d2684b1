//! Taking a lost region's accounts over (DESIGN.md "Failover").
//!
//! - **Promotion**, in every mode: when the directory says region S failed
//!   with this region as its successor, the agent writes the promotion
//!   marker `/tern/promoted/{S}` = F (the failover's region epoch) into its
//!   own group, guarded by its election. From then on the mirror of S stops
//!   for good (its writes compare the marker's absence) and this region's
//!   routers serve S's accounts from the mirror area, guarded by the marker.
//! - **Detection**, in Automatic mode: the first successor of S (in
//!   `--failover-order`) whose own lease is held watches S's lease key.
//!   Once the key has been gone for the margin, and the data that can be
//!   lost is within the budget, it makes the failover transaction
//!   (`tern_common::failover`), guarded by the key's absence and by its own
//!   claim.
//!
//! What can be lost is bounded from what this agent measured: its mirror of
//! S holds everything S acknowledged up to `now − lag`, and S's routers
//! stopped writing before the key expired minus the margin; the key was
//! gone by the time this agent first saw it gone. So at most
//! `lag + error − (now − first seen gone) − margin` of S's writes are
//! missing here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use tern_common::failover::{self, FailoverRefused};
use tern_common::{
    DIR_LEASES, DIR_REGIONS, RegionLease, RegionName, RegionRecord, RegionState, mirror_applied_key, promotion_key,
};
use tokio::time::Instant;

use crate::config::Config;
use crate::election::Leadership;
use crate::error::{AgentError, EtcdContext, Result};
use crate::state::Shared;

/// How often the directory is looked at.
const TICK: Duration = Duration::from_millis(200);

/// The failover policy, from the agent's flags (the GeoCluster's
/// `spec.failover`).
#[derive(Clone, Debug)]
pub struct Policy {
    pub automatic: bool,
    pub order: BTreeMap<RegionName, Vec<RegionName>>,
    pub max_data_loss_lag: Duration,
    pub margin: Duration,
}

impl From<&Config> for Policy {
    fn from(c: &Config) -> Self {
        Self {
            automatic: c.failover_mode == "automatic",
            order: c.failover_order.iter().cloned().collect(),
            max_data_loss_lag: c.max_data_loss_lag,
            margin: c.lease_margin,
        }
    }
}

/// The directory as this loop reads it each tick.
struct Seen {
    records: BTreeMap<RegionName, RegionRecord>,
    leases: BTreeMap<RegionName, RegionLease>,
}

/// Runs until leadership is lost.
pub async fn run(
    directory: Client,
    group: Client,
    leadership: Leadership,
    shared: Arc<Shared>,
    policy: Policy,
) -> AgentError {
    let mut d = directory;
    let mut gone_since: BTreeMap<RegionName, Instant> = BTreeMap::new();
    let mut refused: BTreeSet<RegionName> = BTreeSet::new();
    loop {
        tokio::time::sleep(TICK).await;
        if shared.paused.load(Ordering::Relaxed) {
            continue;
        }
        let seen = match read(&mut d).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the directory for failover");
                continue;
            }
        };
        for (region, record) in &seen.records {
            if record.state == RegionState::Failed && record.successor.as_ref() == Some(&shared.region) {
                match promote(&group, &leadership, &shared, region, record.region_epoch).await {
                    Ok(()) => {}
                    Err(e @ AgentError::NotLeader(_)) => return e,
                    Err(e) => tracing::warn!(failed = %region, error = %e, "cannot promote the mirror; retrying"),
                }
            } else if record.state != RegionState::Failed {
                match unpromote(&group, &leadership, &shared, region).await {
                    Ok(()) => {}
                    Err(e @ AgentError::NotLeader(_)) => return e,
                    Err(e) => {
                        tracing::warn!(region = %region, error = %e, "cannot end the promotion of the mirror; retrying")
                    }
                }
            }
        }
        if !policy.automatic {
            continue;
        }
        for (lost, order) in &policy.order {
            if *lost == shared.region || !order.contains(&shared.region) {
                continue;
            }
            let Some(record) = seen.records.get(lost) else { continue };
            if record.state != RegionState::Active || seen.leases.contains_key(lost) {
                gone_since.remove(lost);
                refused.remove(lost);
                continue;
            }
            // The first successor in the order that is alive acts; a
            // successor ahead of this one that holds its lease will.
            // A draining region is no successor (it takes no accounts in).
            let first = order.iter().find(|c| {
                seen.records.get(*c).is_some_and(|r| r.state == RegionState::Active)
                    && (**c == shared.region || seen.leases.get(*c).is_some_and(|l| l.failed_over_to.is_none()))
            });
            if first != Some(&shared.region) {
                continue;
            }
            let Some(claim) = shared.claim() else { continue };
            let now = Instant::now();
            let since = *gone_since.entry(lost.clone()).or_insert(now);
            let gone_for = now.saturating_duration_since(since);
            if gone_for < policy.margin {
                continue;
            }
            let loss = possible_loss(&shared, lost, gone_for, policy.margin);
            match loss {
                Some(loss) if loss <= policy.max_data_loss_lag => {}
                _ => {
                    if refused.insert(lost.clone()) {
                        let note = format!(
                            "region {lost} lost its lease {gone_for:?} ago; automatic failover to {} refused: up to {} of its writes may be missing here, over the budget of {:?}; `tern failover {lost} --force` takes it over anyway",
                            shared.region,
                            loss.map_or("an unmeasured amount".to_string(), |l| format!("{l:?}")),
                            policy.max_data_loss_lag
                        );
                        tracing::warn!(lost = %lost, "{note}");
                        if let Some(events) = &shared.events {
                            events.warning("FailoverRefused", "Failover", note).await;
                        }
                    }
                    continue;
                }
            }
            let view = match failover::view(&mut d, lost).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(lost = %lost, error = %e, "cannot read the lost region for failover");
                    continue;
                }
            };
            match failover::declare_failed(&mut d, lost, &shared.region, &view, Some(claim.guard())).await {
                Ok(done) => {
                    let note = format!(
                        "region {lost} failed over to {} (region epoch {}): its lease was gone for {gone_for:?}; up to {:?} of its writes may be missing here",
                        done.successor,
                        done.epoch,
                        loss.unwrap_or_default()
                    );
                    tracing::warn!(lost = %lost, epoch = done.epoch, "{note}");
                    shared.metrics.failovers.inc();
                    if let Some(events) = &shared.events {
                        events.warning("RegionFailedOver", "Failover", note).await;
                    }
                    gone_since.remove(lost);
                }
                // Someone else failed it over, or it came back: the next
                // tick reads what happened.
                Err(
                    e @ (FailoverRefused::AlreadyFailed { .. }
                    | FailoverRefused::StillLeased { .. }
                    | FailoverRefused::Raced { .. }),
                ) => {
                    tracing::info!(lost = %lost, reason = %e, "not failing over");
                }
                Err(e) => tracing::warn!(lost = %lost, error = %e, "failover failed; retrying"),
            }
        }
    }
}

/// At most how much of `lost`'s acknowledged writes this region's mirror
/// lacks (see the module's comment); None when the mirror never measured
/// its lag.
fn possible_loss(shared: &Shared, lost: &RegionName, gone_for: Duration, margin: Duration) -> Option<Duration> {
    let status = shared.mirror_statuses().remove(lost.as_str())?;
    if status.lag_ms == u64::MAX || status.lag_error_ms == u64::MAX {
        return None;
    }
    // A mirror still starting or resyncing is incomplete: it would not be
    // promoted, so failing over to it would only end the region's return.
    if matches!(
        status.state,
        tern_common::MirrorState::Starting | tern_common::MirrorState::Resyncing
    ) {
        return None;
    }
    let behind = Duration::from_millis(status.lag_ms + status.lag_error_ms);
    Some(behind.saturating_sub(gone_for + margin))
}

/// Writes the promotion marker of `failed` at region epoch `epoch`, unless
/// it is there.
async fn promote(
    group: &Client,
    leadership: &Leadership,
    shared: &Shared,
    failed: &RegionName,
    epoch: u64,
) -> Result<()> {
    let key = promotion_key(failed);
    let mut c = group.clone();
    let found = c.get(key.clone(), None).await.during(|| format!("reading {key}"))?;
    if !found.kvs().is_empty() {
        return Ok(());
    }
    // A mirror without its applied record is mid-resync: its area holds a
    // partial copy (an account's fence may be there without its
    // idempotency records). Serving that would apply keyed retries twice;
    // the accounts wait until an operator decides (the mirror cannot
    // finish without its source).
    let applied = mirror_applied_key(failed);
    let complete = !c
        .get(applied.clone(), None)
        .await
        .during(|| format!("reading {applied}"))?
        .kvs()
        .is_empty();
    if !complete {
        tracing::error!(failed = %failed, "the mirror of the failed region is incomplete (a resync was under way): not promoting it");
        return Ok(());
    }
    let txn = Txn::new()
        .when([
            leadership.guard(),
            Compare::version(key.clone(), CompareOp::Equal, 0),
            Compare::version(applied, CompareOp::Greater, 0),
        ])
        .and_then([TxnOp::put(key.clone(), epoch.to_string(), None)]);
    let resp = c.txn(txn).await.during(|| format!("writing {key}"))?;
    if !resp.succeeded() {
        let still = c
            .get(leadership.key.clone(), None)
            .await
            .ok()
            .and_then(|r| r.kvs().first().map(|kv| kv.create_revision() == leadership.rev))
            .unwrap_or(false);
        if !still {
            return Err(AgentError::NotLeader(format!("promoting the mirror of {failed}")));
        }
        return Ok(());
    }
    let note = format!(
        "region {} serves the accounts of failed region {failed} from its mirror (region epoch {epoch}); the mirror of {failed} stopped",
        shared.region
    );
    tracing::warn!(failed = %failed, epoch, "{note}");
    if let Some(events) = &shared.events {
        events.warning("MirrorPromoted", "Failover", note).await;
    }
    Ok(())
}

/// A region this one succeeded has rejoined (its record is no longer
/// failed): the promoted mirror area serves nothing any more (every
/// account was re-homed before the rejoin), so the marker goes, with the
/// applied record, and the mirror loop resynchronises the area from the
/// region's snapshot and follows it again.
async fn unpromote(group: &Client, leadership: &Leadership, shared: &Shared, region: &RegionName) -> Result<()> {
    let mut c = group.clone();
    let key = promotion_key(region);
    let found = c.get(key.clone(), None).await.during(|| format!("reading {key}"))?;
    let Some(kv) = found.kvs().first() else {
        return Ok(());
    };
    let txn = Txn::new()
        .when([
            leadership.guard(),
            Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
        ])
        .and_then([
            TxnOp::delete(key.clone(), None),
            TxnOp::delete(mirror_applied_key(region), None),
        ]);
    if !c.txn(txn).await.during(|| format!("deleting {key}"))?.succeeded() {
        return Ok(());
    }
    let note = format!(
        "region {region} rejoined: {} no longer serves its mirror area and mirrors {region} again from a snapshot",
        shared.region
    );
    tracing::info!(region = %region, "{note}");
    if let Some(events) = &shared.events {
        events.normal("MirrorUnpromoted", "Failover", note).await;
    }
    Ok(())
}

async fn read(d: &mut Client) -> Result<Seen> {
    let prefix = GetOptions::new().with_prefix();
    let regions = d
        .get(DIR_REGIONS, Some(prefix.clone()))
        .await
        .during(|| "reading region records".into())?;
    let leases = d
        .get(DIR_LEASES, Some(prefix))
        .await
        .during(|| "reading region leases".into())?;
    let name = tern_common::region_of_dir_key;
    let mut seen = Seen {
        records: BTreeMap::new(),
        leases: BTreeMap::new(),
    };
    for kv in regions.kvs() {
        if let (Some(r), Ok(record)) = (name(kv.key(), DIR_REGIONS), serde_json::from_slice(kv.value())) {
            seen.records.insert(r, record);
        }
    }
    for kv in leases.kvs() {
        if let (Some(r), Ok(lease)) = (name(kv.key(), DIR_LEASES), serde_json::from_slice(kv.value())) {
            seen.leases.insert(r, lease);
        }
    }
    Ok(seen)
}
