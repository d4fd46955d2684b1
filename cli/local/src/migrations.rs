//! Asking for a move and following it: the intent record in the directory
//! (`/tern/dir/migrations/{id}`, DESIGN.md "Migration protocol"), which the
//! target region's agent carries out. Used by `tern migrate` and the tests.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use tern_common::{AccountId, MigrationId, MigrationRecord, RegionName, dir_migration_key};

use crate::{LocalError, Result};

fn etcd(action: impl Into<String>, e: etcd_client::Error) -> LocalError {
    LocalError::Etcd {
        group: "directory".into(),
        action: action.into(),
        reason: e.to_string(),
    }
}

/// Creates the intent `id` (phase `requested`) unless it exists: asking
/// twice with one id moves the account once. Returns whether it was new.
pub async fn request(
    directory: &Client,
    id: &MigrationId,
    account: &AccountId,
    to: &RegionName,
    expect_from: Option<RegionName>,
    reason: &str,
) -> Result<bool> {
    let key = dir_migration_key(id);
    let record = MigrationRecord::requested(
        account.clone(),
        to.clone(),
        expect_from,
        reason.to_string(),
        tern_common::unix_ms(),
    );
    let value = serde_json::to_string(&record).map_err(|e| LocalError::Etcd {
        group: "directory".into(),
        action: "encoding a migration intent".into(),
        reason: e.to_string(),
    })?;
    let resp = directory
        .clone()
        .txn(
            Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, value, None)]),
        )
        .await
        .map_err(|e| etcd(format!("writing migration {id}"), e))?;
    Ok(resp.succeeded())
}

/// The intent `id` as it is now.
pub async fn read(directory: &Client, id: &MigrationId) -> Result<Option<MigrationRecord>> {
    let resp = directory
        .clone()
        .get(dir_migration_key(id), None)
        .await
        .map_err(|e| etcd(format!("reading migration {id}"), e))?;
    Ok(resp
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
}

/// Every intent in the directory, with its id (records that do not parse
/// are left out).
pub async fn list(directory: &Client) -> Result<Vec<(String, MigrationRecord)>> {
    let resp = directory
        .clone()
        .get(
            tern_common::DIR_MIGRATIONS,
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .map_err(|e| etcd("reading the migrations", e))?;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let id = tern_common::migration_of_dir_key(kv.key())?.to_string();
            Some((id, serde_json::from_slice(kv.value()).ok()?))
        })
        .collect())
}

/// Polls the intent until it is final (completed, rolled back, refused),
/// calling `on_change` at each new phase; an error past `limit`.
pub async fn wait(
    directory: &Client,
    id: &MigrationId,
    limit: Duration,
    mut on_change: impl FnMut(&MigrationRecord),
) -> Result<MigrationRecord> {
    let started = std::time::Instant::now();
    let mut last = None;
    loop {
        if let Some(r) = read(directory, id).await? {
            if last != Some(r.phase) {
                on_change(&r);
                last = Some(r.phase);
            }
            if r.phase.is_final() {
                return Ok(r);
            }
        }
        if started.elapsed() > limit {
            return Err(LocalError::Etcd {
                group: "directory".into(),
                action: format!("waiting for migration {id}"),
                reason: format!("not finished within {} s (phase {last:?})", limit.as_secs()),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
