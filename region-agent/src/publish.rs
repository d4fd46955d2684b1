//! Publishing lag: Prometheus gauges, and this region's record in the
//! directory (read by routers to decide bounded-staleness reads, and by
//! `tern status`). The record is updated with compare-and-swap on its
//! version, so the router's endpoint and the failover fields written by
//! others are kept.
//!
//! Every directory write is guarded by the region's lease key
//! (`/tern/dir/leases/{region}`, a [`RegionLease`] on a directory lease this
//! agent keeps alive): the elected agent claims it before it publishes, and
//! each write compares the key's value with its claim. The election itself
//! lives in the region's own group, which a directory transaction cannot
//! compare; the lease key carries it over, so an agent that was paused or
//! cut off past its election cannot overwrite what its successor
//! published. A newer leader (a higher election revision) takes the key over
//! at once; an older one waits until the key is gone. A graceful stop leaves
//! the key to expire (or to the standby that takes over), so a rolling
//! restart of the agent never looks like a lost region.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use tern_common::{
    MirrorStatus, RegionHold, RegionLease, RegionName, RegionRecord, dir_hold_key, dir_lease_key, dir_region_key,
};

use crate::election::{self, AbortOnDrop, Leadership};
use crate::error::{AgentError, EtcdContext, Result};
use crate::metrics::Metrics;
use crate::state::Shared;

/// How often per TTL the region's directory lease is renewed (see
/// `election::keep_alive_every`): with the 3 s default TTL, every 500 ms.
const RENEWALS_PER_TTL: u64 = 6;

pub async fn run(
    directory: Client,
    shared: Arc<Shared>,
    leadership: Leadership,
    ttl: i64,
    interval: Duration,
    max_clock_offset: Duration,
) -> AgentError {
    let mut c = directory;
    let mut warned: BTreeSet<String> = BTreeSet::new();
    // The claim and the task keeping its directory lease alive.
    let mut held: Option<(Claim, AbortOnDrop<AgentError>)> = None;
    let mut waiting = false;
    // The first round goes at once: until it claims the key, the region's
    // routers refuse writes.
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            tokio::time::sleep(interval).await;
        }
        while shared.paused.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Gauges go on whether or not the directory can be reached.
        let mirrors = shared.mirror_statuses();
        export(&shared, &mirrors, &mut warned, max_clock_offset).await;
        if held.as_ref().is_some_and(|(_, keeper)| keeper.0.is_finished()) {
            tracing::warn!(region = %shared.region, "the region's directory lease lapsed; claiming it again");
            held = None;
            *shared.claim.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        if held.is_none() {
            match grant_and_claim(&mut c, &shared, &leadership, ttl).await {
                Ok(claim) => {
                    tracing::info!(region = %shared.region, lease = claim.lease, "holding the region's directory lease");
                    let keeper = tokio::spawn(election::keep_alive_every(
                        c.clone(),
                        claim.lease,
                        ttl,
                        RENEWALS_PER_TTL,
                        shared.clone(),
                    ));
                    *shared.claim.lock().unwrap_or_else(|e| e.into_inner()) = Some(claim.clone());
                    held = Some((claim, AbortOnDrop(keeper)));
                    waiting = false;
                }
                // A newer leadership holds the key: this agent is deposed
                // and its election ends it, or the region group was
                // recreated and the holder's lease expires. Either way,
                // wait.
                Err(e) => {
                    if !waiting {
                        tracing::warn!(error = %e, "cannot claim the region's directory lease yet; publishing waits");
                        waiting = true;
                    }
                    continue;
                }
            }
        }
        let Some((claim, _)) = &held else { continue };
        let members = shared.members.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let update = |record: &mut RegionRecord| {
            record.mirrors = mirrors.clone();
            record.members = members.clone();
        };
        match write_record(&mut c, &shared.region, claim, update).await {
            Ok(()) => {}
            Err(e @ AgentError::DirectoryLeaseLost { holder: Some(_), .. }) => {
                // Another agent took the key over: a newer leader.
                shared.metrics.refused_writes.inc();
                return e;
            }
            Err(e @ (AgentError::DirectoryLeaseLost { holder: None, .. } | AgentError::FailedOver { .. })) => {
                shared.metrics.refused_writes.inc();
                tracing::warn!(error = %e, "the region's directory lease expired; claiming it again");
                held = None;
                *shared.claim.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            Err(e) => tracing::warn!(error = %e, "cannot publish the region record"),
        }
    }
}

/// Grants a directory lease and claims the region's lease key with it; the
/// lease is revoked again when the claim was refused for sure.
async fn grant_and_claim(c: &mut Client, shared: &Shared, leadership: &Leadership, ttl: i64) -> Result<Claim> {
    let sent = tokio::time::Instant::now();
    let lease = c
        .lease_grant(ttl, None)
        .await
        .during(|| "granting the region's directory lease".into())?
        .id();
    let claimed = claim(c, &shared.region, &shared.identity, leadership.rev, lease).await;
    match &claimed {
        Ok(_) => shared.granted(lease, sent),
        // Refused: the key is bound to someone else's lease.
        Err(
            AgentError::DirectoryLeaseLost { .. }
            | AgentError::FailedOver { .. }
            | AgentError::Held { .. }
            | AgentError::Malformed { .. },
        ) => {
            let _ = c.lease_revoke(lease).await;
        }
        // Perhaps committed (an answer lost): the key may be bound to this
        // lease now, and revoking it would delete the key while the
        // region's routers may still write on the previous holder's
        // renewals; a successor could then fail the region over under
        // them. It expires on its own, a TTL after its grant, which is
        // after every renewal the routers' validity came from.
        Err(_) => {}
    }
    claimed
}

/// This agent's hold on the region's lease key in the directory.
#[derive(Clone, Debug)]
pub struct Claim {
    key: String,
    value: Vec<u8>,
    /// The directory lease the key is bound to.
    pub lease: i64,
    /// The election revision of the leadership holding it.
    pub leadership: i64,
}

impl Claim {
    /// The compare every directory write of this agent carries.
    pub fn guard(&self) -> Compare {
        Compare::value(self.key.clone(), CompareOp::Equal, self.value.clone())
    }
}

/// Claims `region`'s lease key for the agent `agent`, leader of the region
/// since election revision `leadership`, binding it to the directory lease
/// `lease`. The key is taken when it is absent, held by an older leadership
/// (a deposed agent), or by this very leadership (a lapsed lease renewed).
/// Fails with [`AgentError::DirectoryLeaseLost`] when a newer leadership
/// holds it.
pub async fn claim(c: &mut Client, region: &RegionName, agent: &str, leadership: i64, lease: i64) -> Result<Claim> {
    let key = dir_lease_key(region);
    let mine = RegionLease {
        agent: agent.to_string(),
        leadership,
        failed_over_to: None,
    };
    let value = mine.to_json().into_bytes();
    let put = TxnOp::put(key.clone(), value.clone(), Some(PutOptions::new().with_lease(lease)));
    let hold_key = dir_hold_key(region);
    loop {
        // A held region claims nothing, not even a lease it held before.
        let hold = c
            .get(hold_key.clone(), None)
            .await
            .during(|| format!("reading {hold_key}"))?;
        if let Some(kv) = hold.kvs().first() {
            let hold: RegionHold = serde_json::from_slice(kv.value()).map_err(|e| AgentError::Malformed {
                key: hold_key.clone(),
                detail: e.to_string(),
            })?;
            return Err(AgentError::Held {
                region: region.to_string(),
                by: hold.by,
                reason: hold.reason,
            });
        }
        let current = c.get(key.clone(), None).await.during(|| format!("reading {key}"))?;
        let guard = match current.kvs().first() {
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            Some(kv) => {
                let held: RegionLease = serde_json::from_slice(kv.value()).map_err(|e| AgentError::Malformed {
                    key: key.clone(),
                    detail: e.to_string(),
                })?;
                if let Some(successor) = held.failed_over_to {
                    return Err(AgentError::FailedOver {
                        region: region.to_string(),
                        successor,
                    });
                }
                if held.leadership > leadership || (held.leadership == leadership && held.agent != agent) {
                    return Err(AgentError::DirectoryLeaseLost {
                        region: region.to_string(),
                        holder: Some(held.agent),
                        leadership: held.leadership,
                    });
                }
                if held.leadership == leadership && kv.lease() == lease {
                    return Ok(Claim {
                        key,
                        value,
                        lease,
                        leadership,
                    });
                }
                Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision())
            }
        };
        // A hold put since it was read wins: the next round returns it.
        let unheld = Compare::create_revision(hold_key.clone(), CompareOp::Equal, 0);
        let txn = Txn::new().when([guard, unheld]).and_then([put.clone()]);
        if c.txn(txn).await.during(|| format!("claiming {key}"))?.succeeded() {
            return Ok(Claim {
                key,
                value,
                lease,
                leadership,
            });
        }
    }
}

/// Rewrites `region`'s record with `update`, compare-and-swap on its version
/// and guarded by `claim`. A refused guard is [`AgentError::DirectoryLeaseLost`]:
/// another agent speaks for the region now.
pub async fn write_record(
    c: &mut Client,
    region: &RegionName,
    claim: &Claim,
    update: impl Fn(&mut RegionRecord),
) -> Result<()> {
    let key = dir_region_key(region);
    for _ in 0..3 {
        let current = c.get(key.clone(), None).await.during(|| format!("reading {key}"))?;
        let (version, mut record) = match current.kvs().first() {
            Some(kv) => (
                kv.version(),
                serde_json::from_slice::<RegionRecord>(kv.value()).map_err(|e| AgentError::Malformed {
                    key: key.clone(),
                    detail: e.to_string(),
                })?,
            ),
            None => (0, RegionRecord::unwritten()),
        };
        update(&mut record);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, version), claim.guard()])
            .and_then([TxnOp::put(key.clone(), record.to_json(), None)])
            .or_else([TxnOp::get(claim.key.clone(), None)]);
        let resp = c.txn(txn).await.during(|| format!("writing {key}"))?;
        if resp.succeeded() {
            return Ok(());
        }
        let held = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| kv.value().to_vec())),
            _ => None,
        });
        if held != Some(Some(claim.value.clone())) {
            let holder = held
                .flatten()
                .and_then(|v| serde_json::from_slice::<RegionLease>(&v).ok());
            if let Some(successor) = holder.as_ref().and_then(|h| h.failed_over_to.clone()) {
                return Err(AgentError::FailedOver {
                    region: region.to_string(),
                    successor,
                });
            }
            return Err(AgentError::DirectoryLeaseLost {
                region: region.to_string(),
                holder: holder.as_ref().map(|h| h.agent.clone()),
                leadership: holder.map_or(0, |h| h.leadership),
            });
        }
        // Only the record's version moved (a router or the operator wrote
        // it): read it again.
    }
    Ok(())
}

/// Lag, skew and member gauges, and the clock-offset warning.
async fn export(
    shared: &Shared,
    mirrors: &BTreeMap<String, MirrorStatus>,
    warned: &mut BTreeSet<String>,
    max_clock_offset: Duration,
) {
    for (source, m) in mirrors {
        let labels = Metrics::source(source);
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        shared.metrics.lag_ms.get_or_create(&labels).set(clamp(m.lag_ms));
        shared
            .metrics
            .lag_error_ms
            .get_or_create(&labels)
            .set(clamp(m.lag_error_ms));
        shared.metrics.lag_revisions.get_or_create(&labels).set(m.lag_revisions);
        shared.metrics.skew_ms.get_or_create(&labels).set(m.skew_ms);
        // Off for sure: beyond the threshold even at the near end of
        // the error bound.
        let off = m.lag_error_ms != u64::MAX
            && m.skew_ms.unsigned_abs().saturating_sub(m.lag_error_ms) > max_clock_offset.as_millis() as u64;
        shared
            .metrics
            .clock_offset_warning
            .get_or_create(&labels)
            .set(i64::from(off));
        if off && warned.insert(source.clone()) {
            let note = format!(
                "region {}: the clock of {source}'s agent is off by {} ms (± {} ms), more than {} ms; lag stays corrected by it",
                shared.region,
                m.skew_ms,
                m.lag_error_ms,
                max_clock_offset.as_millis()
            );
            tracing::warn!(source = %source, skew_ms = m.skew_ms, error_ms = m.lag_error_ms, "{note}");
            if let Some(events) = &shared.events {
                events.warn("ClockOffset", note).await;
            }
        } else if !off {
            warned.remove(source);
        }
        shared
            .metrics
            .heartbeat_age_ms
            .get_or_create(&labels)
            .set(clamp(m.heartbeat_age_ms));
    }
}
