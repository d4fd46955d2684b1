//! Region state from the directory into the GeoCluster's status: per
//! region whether it serves its accounts (`Active`, `Draining`, `Failed`
//! with its successor and region epoch) and which agent holds its lease,
//! the `RegionsServing` condition, the `Failed` printer column, and an
//! event on every transition. Failover itself is the agents' and `tern
//! failover`'s (docs/failover.md); this module only reports it, with its
//! own field manager so the group reconciler's and the agents' fields stay
//! theirs.
//!
//! It also carries `spec.regions[].drain` into the directory (the region's
//! record `draining` or `active`, `tern_common::drain`): the region's agent
//! drains it from there, and its progress comes back into
//! `status.regions[].drain`.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::GetOptions;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tern_common::{DIR_LEASES, DIR_REGIONS, RegionLease, RegionRecord, RegionState};
use tern_crds::{DrainStatus, GeoCluster};

use crate::context::Context;
use crate::error::KubeContext;
use crate::{Error, Result};

/// The field manager of what this module writes.
pub const FIELD_MANAGER: &str = "tern-operator-regions";
/// The condition it owns.
pub const CONDITION: &str = "RegionsServing";
/// How often the directory is read.
const EVERY: Duration = Duration::from_secs(2);

/// Reports region state until the operator stops.
pub async fn run(client: kube::Client, namespace: String, ctx: Arc<Context>) {
    // A directory that cannot be reached (each connect may take 10 s) is
    // tried less and less often, up to once a minute.
    let mut pause = EVERY;
    loop {
        let ok = match round(&client, &namespace, &ctx).await {
            Ok(ok) => ok,
            Err(e) => {
                tracing::warn!(error = %e, "reporting region state failed; trying again");
                false
            }
        };
        pause = if ok {
            EVERY
        } else {
            (pause * 2).min(Duration::from_secs(60))
        };
        tokio::time::sleep(pause).await;
    }
}

/// Whether every GeoCluster's report went through.
async fn round(client: &kube::Client, namespace: &str, ctx: &Context) -> Result<bool> {
    let mut ok = true;
    for gc in super::migration::list_geoclusters(client, namespace).await? {
        // Only once the group reconciler has written the regions' entries:
        // a partial entry alone is refused by the schema.
        if gc.meta().deletion_timestamp.is_some() || gc.status.as_ref().is_none_or(|s| s.regions.is_empty()) {
            continue;
        }
        if let Err(e) = report(client, &gc, ctx).await {
            tracing::debug!(geocluster = %gc.name_any(), error = %e, "reporting region state failed");
            ok = false;
        }
    }
    Ok(ok)
}

/// One region as the directory says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Serving {
    pub name: String,
    pub state: &'static str,
    pub successor: Option<String>,
    pub region_epoch: Option<i64>,
    pub lease_holder: Option<String>,
    pub drain: Option<DrainStatus>,
}

/// What the directory says about each of `regions`.
pub fn serving(
    regions: &[String],
    records: &std::collections::BTreeMap<String, RegionRecord>,
    leases: &std::collections::BTreeMap<String, RegionLease>,
) -> Vec<Serving> {
    regions
        .iter()
        .map(|name| {
            let record = records.get(name);
            let state = match record.map(|r| r.state) {
                Some(RegionState::Failed) => "Failed",
                Some(RegionState::Draining) => "Draining",
                _ => "Active",
            };
            let failed = state == "Failed";
            Serving {
                name: name.clone(),
                state,
                successor: record
                    .filter(|_| failed)
                    .and_then(|r| r.successor.as_ref().map(|s| s.to_string())),
                region_epoch: record.filter(|_| failed).map(|r| r.region_epoch as i64),
                lease_holder: leases
                    .get(name)
                    .filter(|l| l.failed_over_to.is_none())
                    .map(|l| l.agent.clone()),
                drain: record
                    .filter(|r| r.state != RegionState::Active)
                    .and_then(|r| r.drain.as_ref())
                    .map(|d| DrainStatus {
                        homed: d.homed as i64,
                        moving: d.moving as i64,
                        moved: d.moved as i64,
                        blocked: d.blocked as i64,
                        message: d.message.clone(),
                    }),
            }
        })
        .collect()
}

/// The `RegionsServing` condition for `regions`.
pub fn condition(regions: &[Serving], old: Option<&Condition>, generation: Option<i64>, now: &Time) -> Condition {
    let failed: Vec<String> = regions
        .iter()
        .filter(|r| r.state == "Failed")
        .map(|r| {
            format!(
                "{} failed over to {} at region epoch {}",
                r.name,
                r.successor.as_deref().unwrap_or("?"),
                r.region_epoch.unwrap_or(0)
            )
        })
        .collect();
    let (status, reason, message) = if failed.is_empty() {
        (
            "True",
            "AllRegionsServing",
            "every region serves its own accounts".to_string(),
        )
    } else {
        (
            "False",
            "RegionFailedOver",
            format!("{}; `tern quarantine list` shows what was lost", failed.join("; ")),
        )
    };
    let last_transition_time = match old {
        Some(o) if o.status == status => o.last_transition_time.clone(),
        _ => now.clone(),
    };
    Condition {
        type_: CONDITION.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

async fn report(client: &kube::Client, gc: &GeoCluster, ctx: &Context) -> Result<()> {
    let dir = super::migration::geocluster_directory(ctx, gc).await?;
    let read = |prefix: &'static str| {
        let mut dir = dir.clone();
        async move {
            dir.get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(|e| Error::Directory {
                    what: format!("reading {prefix}"),
                    reason: e.to_string(),
                })
        }
    };
    let name_of = |key: &[u8], prefix: &str| tern_common::region_of_dir_key(key, prefix).map(|r| r.to_string());
    let mut records: std::collections::BTreeMap<String, RegionRecord> = read(DIR_REGIONS)
        .await?
        .kvs()
        .iter()
        .filter_map(|kv| {
            Some((
                name_of(kv.key(), DIR_REGIONS)?,
                serde_json::from_slice(kv.value()).ok()?,
            ))
        })
        .collect();
    let leases = read(DIR_LEASES)
        .await?
        .kvs()
        .iter()
        .filter_map(|kv| Some((name_of(kv.key(), DIR_LEASES)?, serde_json::from_slice(kv.value()).ok()?)))
        .collect();
    drain(&dir, gc, &ctx.managed, &mut records).await;
    let names: Vec<String> = gc.spec.regions.iter().map(|r| r.name.clone()).collect();
    let now = serving(&names, &records, &leases);
    let status = gc.status.clone().unwrap_or_default();
    let old_condition = status.conditions.iter().find(|c| c.type_ == CONDITION);
    let condition = condition(
        &now,
        old_condition,
        gc.metadata.generation,
        &Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let unchanged = old_condition == Some(&condition)
        && now.iter().all(|r| {
            status.regions.iter().any(|o| {
                o.name == r.name
                    && o.serving.as_deref() == Some(r.state)
                    && o.successor == r.successor
                    && o.region_epoch == r.region_epoch
                    && o.lease_holder == r.lease_holder
                    && o.drain == r.drain
            })
        });
    if unchanged {
        return Ok(());
    }
    let namespace = gc.namespace().unwrap_or_default();
    let api: Api<GeoCluster> = Api::namespaced(client.clone(), &namespace);
    let regions: Vec<serde_json::Value> = now
        .iter()
        .filter(|r| status.regions.iter().any(|o| o.name == r.name))
        .map(|r| {
            json!({
                "name": r.name,
                "serving": r.state,
                "successor": r.successor,
                "regionEpoch": r.region_epoch,
                "leaseHolder": r.lease_holder,
                "drain": r.drain,
            })
        })
        .collect();
    let patch = json!({
        "apiVersion": "tern.dev/v1alpha1",
        "kind": "GeoCluster",
        "status": {"conditions": [condition], "regions": regions},
    });
    api.patch_status(
        &gc.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .context(|| format!("writing region state of GeoCluster {namespace}/{}", gc.name_any()))?;
    for r in &now {
        let before = status
            .regions
            .iter()
            .find(|o| o.name == r.name)
            .and_then(|o| o.serving.clone());
        // The first report of an active region is no transition.
        if before.as_deref() == Some(r.state) || (before.is_none() && r.state == "Active") {
            continue;
        }
        let (type_, reason, note) = match r.state {
            "Failed" => (
                EventType::Warning,
                "RegionFailedOver",
                format!(
                    "region {} failed over to {} at region epoch {}: its accounts are served there; `tern quarantine list {}` shows what was lost",
                    r.name,
                    r.successor.as_deref().unwrap_or("?"),
                    r.region_epoch.unwrap_or(0),
                    r.name
                ),
            ),
            "Draining" => (
                EventType::Normal,
                "RegionDraining",
                format!("region {} is draining: its accounts move out", r.name),
            ),
            _ => (
                EventType::Normal,
                "RegionServing",
                format!("region {} serves its accounts", r.name),
            ),
        };
        ctx.event(gc, type_, reason, "Failover", note).await;
    }
    Ok(())
}

/// Sets each managed region's record `draining` or `active` as its
/// `spec.regions[].drain` says (a failed region is left alone: it rejoins
/// first), and notes the new state in `records`.
async fn drain(
    dir: &etcd_client::Client,
    gc: &GeoCluster,
    managed: &crate::regions::RegionFilter,
    records: &mut std::collections::BTreeMap<String, RegionRecord>,
) {
    // Each cluster of a multi-cluster deployment has its own copy of the
    // GeoCluster: only the operator that manages a region follows its
    // `drain` field, so that copies that differ do not flip it.
    for spec in gc.spec.regions.iter().filter(|r| managed.contains(&r.name)) {
        let Some(record) = records.get_mut(&spec.name) else {
            continue;
        };
        let wanted = match (record.state, spec.drain) {
            (RegionState::Active, true) => true,
            (RegionState::Draining, false) => false,
            _ => continue,
        };
        let Ok(region) = tern_common::RegionName::new(&spec.name) else {
            continue;
        };
        match tern_common::drain::set_draining(&mut dir.clone(), &region, wanted).await {
            Ok(changed) => {
                tracing::info!(geocluster = %gc.name_any(), region = %region, draining = wanted, "region drain state set from the spec");
                *record = changed.after;
            }
            Err(e) => {
                tracing::warn!(geocluster = %gc.name_any(), region = %region, error = %e, "setting the region's drain state failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tern_common::RegionName;

    #[test]
    fn a_failed_region_names_its_successor_and_turns_the_condition_false() {
        let mut failed = RegionRecord::unwritten();
        failed.state = RegionState::Failed;
        failed.successor = Some(RegionName::new("eu-west").expect("valid"));
        failed.region_epoch = 2;
        let records = BTreeMap::from([("us-east".to_string(), failed)]);
        let leases = BTreeMap::from([
            (
                "us-east".to_string(),
                RegionLease::failed_over(&RegionName::new("eu-west").expect("valid"), 2),
            ),
            (
                "eu-west".to_string(),
                RegionLease {
                    agent: "eu-west-agent-0".into(),
                    leadership: 7,
                    failed_over_to: None,
                },
            ),
        ]);
        let regions = serving(&["us-east".into(), "eu-west".into()], &records, &leases);
        assert_eq!(
            regions[0],
            Serving {
                name: "us-east".into(),
                state: "Failed",
                successor: Some("eu-west".into()),
                region_epoch: Some(2),
                lease_holder: None,
                drain: None,
            }
        );
        assert_eq!(regions[1].state, "Active");
        assert_eq!(regions[1].lease_holder.as_deref(), Some("eu-west-agent-0"));
        let t0 = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let c = condition(&regions, None, Some(1), &t0);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "RegionFailedOver"));
        assert!(
            c.message.contains("us-east failed over to eu-west at region epoch 2"),
            "{}",
            c.message
        );
        let later = Time(k8s_openapi::jiff::Timestamp::now());
        assert_eq!(condition(&regions, Some(&c), Some(1), &later).last_transition_time, t0);
    }
}
