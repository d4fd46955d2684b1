//! AccountMigration → the migration protocol. The operator does not move
//! anything itself: it writes the object's intent record into the
//! directory (`/tern/dir/migrations/{namespace}.{name}.{uid}`, create if
//! absent, so one object is carried out once however often it is
//! reconciled, and an object applied in one cluster of a multi-cluster
//! deployment is seen and carried out by that cluster's operator only),
//! the target region's agent carries it out (`region-agent/src/migrate.rs`),
//! and the operator copies the intent's progress into the object's status
//! until it is final. An object with `spec.recordsIntent` (made by
//! `audit.rs` for a move the agents decided) only reports that intent.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tern_common::{AccountId, MigrationId, MigrationPhase as Step, MigrationRecord, RegionName, dir_migration_key};
use tern_crds::{AccountMigration, AccountMigrationStatus, GeoCluster, MigrationPhase};

use crate::context::Context;
use crate::error::KubeContext;
use crate::status::{condition, set_condition};
use crate::{Error, Result};

/// How often a migration in flight is looked at again.
const POLL: Duration = Duration::from_millis(500);

/// The intent id of an object: its namespace, name and uid.
pub fn intent_id(m: &AccountMigration) -> Result<MigrationId> {
    let id = format!(
        "{}.{}.{}",
        m.namespace().unwrap_or_default(),
        m.name_any(),
        m.uid().unwrap_or_default()
    );
    MigrationId::new(id).map_err(|e| invalid(m, e.to_string()))
}

fn invalid(m: &AccountMigration, reason: String) -> Error {
    Error::InvalidSpec {
        kind: "AccountMigration",
        name: m.name_any(),
        reason,
    }
}

fn directory_error(what: String) -> impl FnOnce(etcd_client::Error) -> Error {
    move |e| Error::Directory {
        what,
        reason: e.to_string(),
    }
}

fn time(ms: Option<u64>) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::from_millisecond(ms? as i64)
        .ok()
        .map(Time)
}

/// The object's status as the intent says.
pub fn status_of(
    id: &MigrationId,
    r: &MigrationRecord,
    generation: Option<i64>,
    old: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> AccountMigrationStatus {
    let phase = match r.phase {
        Step::Requested => MigrationPhase::Pending,
        Step::Fencing => MigrationPhase::Fencing,
        Step::Switching => MigrationPhase::Switching,
        Step::Completed => MigrationPhase::Completed,
        Step::RollingBack => MigrationPhase::RollingBack,
        Step::RolledBack | Step::Refused => MigrationPhase::Failed,
    };
    let (state, reason) = match r.phase {
        Step::Completed => (Some(true), "Completed"),
        Step::RolledBack => (Some(false), "RolledBack"),
        Step::Refused => (Some(false), "Refused"),
        _ => (None, "InProgress"),
    };
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut succeeded = condition(
        "Succeeded",
        state.unwrap_or(false),
        reason,
        r.message.clone().unwrap_or_default(),
        generation,
        &now,
    );
    if state.is_none() {
        succeeded.status = "Unknown".into();
    }
    let mut conditions = old.to_vec();
    set_condition(&mut conditions, succeeded);
    AccountMigrationStatus {
        phase,
        conditions,
        migration_id: Some(id.to_string()),
        source_region: r.source.as_ref().map(ToString::to_string),
        source_epoch: r.source_epoch.map(|e| e.0 as i64),
        target_epoch: r.source_epoch.map(|e| e.0 as i64 + 1),
        fenced_revision: r.fenced_revision,
        started_at: time(r.started_ms.or(Some(r.requested_ms))),
        finished_at: time(r.finished_ms),
        unavailable_ms: r.unavailable_ms.map(|ms| ms as i64),
        message: r.message.clone(),
    }
}

/// The directory of the object's GeoCluster (or `--directory-endpoints`).
async fn directory(m: &AccountMigration, ctx: &Context) -> Result<Client> {
    if !ctx.directory_endpoints.is_empty() {
        // An explicit directory (tests, an operator outside the cluster)
        // is dialled as given, in plain text.
        return connect_directory(ctx, ctx.directory_endpoints.clone(), None).await;
    }
    {
        let namespace = m.namespace().unwrap_or_default();
        let gcs: Api<GeoCluster> = Api::namespaced(ctx.client.clone(), &namespace);
        let gc = gcs
            .get_opt(&m.spec.geo_cluster)
            .await
            .context(|| format!("reading GeoCluster {}", m.spec.geo_cluster))?
            .ok_or_else(|| {
                invalid(
                    m,
                    format!(
                        "GeoCluster {} does not exist in namespace {namespace}",
                        m.spec.geo_cluster
                    ),
                )
            })?;
        if !gc.spec.regions.iter().any(|r| r.name == m.spec.target_region) {
            return Err(invalid(
                m,
                format!(
                    "targetRegion {} is not a region of GeoCluster {}",
                    m.spec.target_region, m.spec.geo_cluster
                ),
            ));
        }
        let tls = geocluster_tls(ctx, &gc).await?;
        connect_directory(ctx, crate::build::geocluster::directory_client_urls(&gc), tls).await
    }
}

/// The operator's certificate for `gc`'s etcd groups, when it runs TLS.
async fn geocluster_tls(ctx: &Context, gc: &GeoCluster) -> Result<Option<tern_common::tls::Tls>> {
    match &gc.spec.tls {
        Some(t) => {
            let namespace = gc.namespace().unwrap_or_default();
            Ok(Some(
                crate::certs::client_tls(&ctx.client, &namespace, &t.operator_secret()).await?,
            ))
        }
        None => Ok(None),
    }
}

/// The directory of `gc` (or `--directory-endpoints`), connected once and
/// kept: what the audit trail and the region report read.
pub async fn geocluster_directory(ctx: &Context, gc: &GeoCluster) -> Result<Client> {
    if !ctx.directory_endpoints.is_empty() {
        return connect_directory(ctx, ctx.directory_endpoints.clone(), None).await;
    }
    let tls = geocluster_tls(ctx, gc).await?;
    connect_directory(ctx, crate::build::geocluster::directory_client_urls(gc), tls).await
}

/// Every GeoCluster the operator watches (`namespace` empty: all).
pub async fn list_geoclusters(client: &kube::Client, namespace: &str) -> Result<Vec<GeoCluster>> {
    let gcs: Api<GeoCluster> = if namespace.is_empty() {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), namespace)
    };
    Ok(gcs
        .list(&kube::api::ListParams::default())
        .await
        .context(|| "listing GeoClusters".into())?
        .items)
}

/// A directory client for `endpoints`, connected once and kept, per
/// certificate: a renewed one (another serial) makes a new client.
pub async fn connect_directory(
    ctx: &Context,
    endpoints: Vec<String>,
    tls: Option<tern_common::tls::Tls>,
) -> Result<Client> {
    let key = endpoints.join(",");
    let serial = tls.as_ref().map(|t| t.summary().serial);
    let mut clients = ctx.directories.lock().await;
    // A client made with a certificate since renewed is replaced.
    if let Some((made_with, c)) = clients.get(&key)
        && *made_with == serial
    {
        return Ok(c.clone());
    }
    let c = tern_common::etcd::connect_tls(&endpoints, tls.as_ref(), "directory", Duration::from_secs(10))
        .await
        .map_err(|e| Error::Directory {
            what: format!("connecting to {key}"),
            reason: e.to_string(),
        })?;
    clients.insert(key, (serial, c.clone()));
    Ok(c)
}

pub async fn reconcile(m: Arc<AccountMigration>, ctx: Arc<Context>) -> Result<Action> {
    let status = m.status.clone().unwrap_or_default();
    if matches!(status.phase, MigrationPhase::Completed | MigrationPhase::Failed) {
        return Ok(Action::await_change());
    }
    if let Some(recorded) = &m.spec.records_intent {
        let id = MigrationId::new(recorded.as_str()).map_err(|e| invalid(&m, e.to_string()))?;
        let dir = directory(&m, &ctx).await?;
        let resp = dir
            .clone()
            .get(dir_migration_key(&id), None)
            .await
            .map_err(directory_error(format!("reading migration {id}")))?;
        let Some(record) = resp
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<MigrationRecord>(kv.value()).ok())
        else {
            let gone = AccountMigrationStatus {
                phase: MigrationPhase::Failed,
                migration_id: Some(id.to_string()),
                message: Some(format!(
                    "the intent {id} is no longer in the directory (finished intents are trimmed)"
                )),
                ..status
            };
            let api: Api<AccountMigration> = Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
            api.patch_status(
                &m.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&serde_json::json!({ "status": gone })),
            )
            .await
            .context(|| format!("writing the status of AccountMigration {}", m.name_any()))?;
            return Ok(Action::await_change());
        };
        return report(&m, &ctx, &id, &record, &status).await;
    }
    let account = AccountId::new(&m.spec.account).map_err(|e| invalid(&m, e.to_string()))?;
    let target = RegionName::new(&m.spec.target_region).map_err(|e| invalid(&m, e.to_string()))?;
    let expected = m
        .spec
        .expected_source_region
        .as_deref()
        .map(RegionName::new)
        .transpose()
        .map_err(|e| invalid(&m, e.to_string()))?;
    let id = intent_id(&m)?;
    let dir = directory(&m, &ctx).await?;
    let key = dir_migration_key(&id);
    let now_ms = tern_common::unix_ms();
    let reason = m.spec.reason.clone().unwrap_or_else(|| "AccountMigration".into());
    let asked = MigrationRecord::requested(account, target, expected, reason, now_ms);
    let value = serde_json::to_string(&asked).map_err(|e| Error::Serialize(e.to_string()))?;
    // Create if absent, and read it back either way.
    let resp = dir
        .clone()
        .txn(
            Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), value, None)])
                .or_else([TxnOp::get(key.clone(), None)]),
        )
        .await
        .map_err(directory_error(format!("writing migration {id}")))?;
    let record = if resp.succeeded() {
        tracing::info!(migration = %id, account = %m.spec.account, to = %m.spec.target_region, "AccountMigration handed to the target region's agent");
        ctx.event(
            m.as_ref(),
            kube::runtime::events::EventType::Normal,
            "Requested",
            "Migrate",
            format!(
                "intent {id} written; {}'s agent carries the move out",
                m.spec.target_region
            ),
        )
        .await;
        asked
    } else {
        let found = match resp.op_responses().first() {
            Some(etcd_client::TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        };
        match found.and_then(|v| serde_json::from_slice::<MigrationRecord>(&v).ok()) {
            Some(r) => r,
            None => {
                return Err(Error::Directory {
                    what: format!("reading migration {id}"),
                    reason: "the intent record is malformed".into(),
                });
            }
        }
    };
    report(&m, &ctx, &id, &record, &status).await
}

/// Copies the intent's progress into the object's status (with an event
/// when it is final); looks again soon while it is not.
async fn report(
    m: &AccountMigration,
    ctx: &Context,
    id: &MigrationId,
    record: &MigrationRecord,
    status: &AccountMigrationStatus,
) -> Result<Action> {
    let new = status_of(id, record, m.meta().generation, &status.conditions);
    if new.phase != status.phase || new.message != status.message || status.migration_id.is_none() {
        let api: Api<AccountMigration> = Api::namespaced(ctx.client.clone(), &m.namespace().unwrap_or_default());
        let patch = serde_json::json!({ "status": new });
        api.patch_status(&m.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .context(|| format!("writing the status of AccountMigration {}", m.name_any()))?;
        if record.phase.is_final() {
            let (kind, why) = match record.phase {
                Step::Completed => (kube::runtime::events::EventType::Normal, "Completed"),
                Step::RolledBack => (kube::runtime::events::EventType::Warning, "RolledBack"),
                _ => (kube::runtime::events::EventType::Warning, "Refused"),
            };
            ctx.event(m, kind, why, "Migrate", record.message.clone().unwrap_or_default())
                .await;
        }
    }
    if record.phase.is_final() {
        Ok(Action::await_change())
    } else {
        Ok(Action::requeue(POLL))
    }
}

pub fn error_policy(m: Arc<AccountMigration>, error: &Error, ctx: Arc<Context>) -> Action {
    super::error_policy("accountmigration", m.as_ref(), error, &ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_common::Epoch;

    #[test]
    fn the_intent_s_progress_becomes_the_status() {
        let id = MigrationId::new("ns.m.uid").expect("id");
        let mut r = MigrationRecord::requested(
            AccountId::new("a").expect("a"),
            RegionName::new("eu-west").expect("r"),
            None,
            "t".into(),
            1_800_000_000_000,
        );
        let s = status_of(&id, &r, Some(1), &[]);
        assert_eq!(s.phase, MigrationPhase::Pending);
        assert_eq!(s.conditions[0].status, "Unknown");
        r.phase = Step::Completed;
        r.source = Some(RegionName::new("us-east").expect("r"));
        r.source_epoch = Some(Epoch(3));
        r.unavailable_ms = Some(94);
        r.finished_ms = Some(1_800_000_001_500);
        let s = status_of(&id, &r, Some(1), &s.conditions);
        assert_eq!(s.phase, MigrationPhase::Completed);
        assert_eq!(
            (s.source_epoch, s.target_epoch, s.unavailable_ms),
            (Some(3), Some(4), Some(94))
        );
        assert_eq!(s.conditions.len(), 1);
        assert_eq!(
            (s.conditions[0].status.as_str(), s.conditions[0].reason.as_str()),
            ("True", "Completed")
        );
        assert!(s.finished_at.is_some());
        r.phase = Step::Refused;
        let s = status_of(&id, &r, Some(1), &[]);
        assert_eq!(s.phase, MigrationPhase::Failed);
        assert_eq!(s.conditions[0].reason, "Refused");
    }
}
