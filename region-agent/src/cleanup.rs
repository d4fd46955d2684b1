//! Cleaning up after accounts that moved away: once a move out of this
//! region has completed (its intent in the directory says so) and
//! `--moved-cleanup-delay` has passed, the account's data and idempotency
//! records here are deleted, a few accounts per round. The fence stays
//! (`E:moved:T`), so a router with a stale placement is still told where
//! the account went. Each delete is one transaction that compares the fence
//! with the `moved` value the move left: a move back into this region
//! replaces or deletes the fence first, and then nothing is deleted.
//!
//! The same rounds repair stray fences. A target agent that lost its
//! leadership while fencing this region (its fence write is not guarded:
//! it crosses groups) can set `E:fenced` after its successor rolled the
//! same move back, leaving the account fenced here with the directory
//! naming this region active at E and no move to finish it: no write could
//! ever commit. For a move out of this region rolled back within the last
//! hour, if the fence reads `E:fenced`, no intent for the account is open,
//! and the directory says `{here, E, active}`, the fence goes back to
//! `E:active` in one transaction compared on the fence's revision as read
//! (so a move that fences it meanwhile wins).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp};
use tern_common::{
    AccountRecord, AccountState, DIR_MIGRATIONS, Fence, MigrationPhase, MigrationRecord, data_prefix, dir_account_key,
    fence_key, idempotency_prefix,
};

use crate::election::Leadership;
use crate::error::{AgentError, EtcdContext, Result};
use crate::state::Shared;

/// How often the intents are looked at: a read of the whole migrations
/// prefix from the global directory, so not every second.
const ROUND: Duration = Duration::from_secs(5);
/// Accounts cleaned up per round at most (20 a second): the deletes are
/// spread out.
const PER_ROUND: usize = 100;
/// How long after a rollback its source's fence is still checked for a
/// stray fence.
const STRAY_WINDOW_MS: u64 = 3_600_000;

pub async fn run(
    directory: Client,
    local: Client,
    leadership: Leadership,
    shared: Arc<Shared>,
    delay: Duration,
) -> AgentError {
    // Intents already cleaned up (or found clean) by this leadership.
    let mut done: BTreeSet<String> = BTreeSet::new();
    loop {
        tokio::time::sleep(ROUND).await;
        match round(&directory, &local, &leadership, &shared, delay, &mut done).await {
            Err(e @ AgentError::NotLeader(_)) => return e,
            Err(e) => tracing::warn!(error = %e, "cleaning up moved accounts failed; trying again"),
            Ok(()) => {}
        }
    }
}

async fn round(
    directory: &Client,
    local: &Client,
    leadership: &Leadership,
    shared: &Shared,
    delay: Duration,
    done: &mut BTreeSet<String>,
) -> Result<()> {
    let now = tern_common::unix_ms();
    let resp = directory
        .clone()
        .get(DIR_MIGRATIONS, Some(GetOptions::new().with_prefix()))
        .await
        .during(|| "reading migration intents".into())?;
    let intents: Vec<(String, MigrationRecord)> = resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let m = serde_json::from_slice::<MigrationRecord>(kv.value()).ok()?;
            Some((String::from_utf8_lossy(kv.key()).into_owned(), m))
        })
        .collect();
    let open: BTreeSet<String> = intents
        .iter()
        .filter(|(_, m)| !m.phase.is_final())
        .map(|(_, m)| m.account.to_string())
        .collect();
    for (_, m) in &intents {
        if m.phase == MigrationPhase::RolledBack
            && m.source.as_ref() == Some(&shared.region)
            && m.finished_ms.is_some_and(|f| f + STRAY_WINDOW_MS > now)
            && !open.contains(m.account.as_str())
            && let Some(epoch) = m.source_epoch
        {
            repair_stray_fence(directory, local, leadership, shared, m, epoch).await?;
        }
    }
    let mut cleaned = 0;
    for kv in resp.kvs() {
        let id = String::from_utf8_lossy(kv.key()).into_owned();
        if done.contains(&id) {
            continue;
        }
        let Ok(m) = serde_json::from_slice::<MigrationRecord>(kv.value()) else {
            continue;
        };
        let (Some(source), Some(epoch)) = (&m.source, m.source_epoch) else {
            continue;
        };
        if m.phase != MigrationPhase::Completed || *source != shared.region {
            continue;
        }
        if m.finished_ms.unwrap_or(0) + delay.as_millis() as u64 > now {
            continue;
        }
        if cleaned >= PER_ROUND {
            break;
        }
        let moved = Fence::moved(epoch, m.target.clone()).to_string();
        let fence = fence_key(&m.account);
        let account = m.account.to_string();
        let resp = local
            .clone()
            .txn(
                Txn::new()
                    .when([leadership.guard(), Compare::value(fence, CompareOp::Equal, moved)])
                    .and_then([
                        TxnOp::delete(data_prefix(&m.account), Some(DeleteOptions::new().with_prefix())),
                        TxnOp::delete(idempotency_prefix(&m.account), Some(DeleteOptions::new().with_prefix())),
                    ]),
            )
            .await
            .during(|| format!("cleaning up {account}, moved to {}", m.target))?;
        if resp.succeeded() {
            tracing::info!(account = %account, to = %m.target, "cleaned up an account that moved away");
            cleaned += 1;
        }
        // Not moved any more (back here, or the fence is gone): nothing to do.
        done.insert(id);
    }
    Ok(())
}

/// Unfences the rolled-back move `m`'s account here if a stray fence holds
/// it (see the module's comment).
async fn repair_stray_fence(
    directory: &Client,
    local: &Client,
    leadership: &Leadership,
    shared: &Shared,
    m: &MigrationRecord,
    epoch: tern_common::Epoch,
) -> Result<()> {
    let account = &m.account;
    let fence = fence_key(account);
    let found = local
        .clone()
        .get(fence.clone(), None)
        .await
        .during(|| format!("reading {account}'s fence"))?;
    let Some(kv) = found.kvs().first() else {
        return Ok(());
    };
    if kv.value() != Fence::fenced(epoch).to_string().as_bytes() {
        return Ok(());
    }
    let revision = kv.mod_revision();
    let placement = directory
        .clone()
        .get(dir_account_key(account), None)
        .await
        .during(|| format!("reading the placement of {account}"))?;
    let Some(p) = placement
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice::<AccountRecord>(kv.value()).ok())
    else {
        return Ok(());
    };
    if p.home != shared.region || p.epoch != epoch || p.state != AccountState::Active {
        return Ok(());
    }
    let resp = local
        .clone()
        .txn(
            Txn::new()
                .when([
                    leadership.guard(),
                    Compare::mod_revision(fence.clone(), CompareOp::Equal, revision),
                ])
                .and_then([TxnOp::put(fence, Fence::active(epoch).to_string(), None)]),
        )
        .await
        .during(|| format!("unfencing {account}"))?;
    if resp.succeeded() {
        tracing::warn!(
            account = %account, epoch = epoch.0, rolled_back_to = %m.target,
            "repaired a stray fence: the account was fenced here after its move was rolled back"
        );
        if let Some(events) = &shared.events {
            let note = format!(
                "{account} was fenced at epoch {} after its move to {} was rolled back; unfenced",
                epoch.0, m.target
            );
            events.warning("StrayFenceRepaired", "Repair", note).await;
        }
    }
    Ok(())
}
