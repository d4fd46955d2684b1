//! Cleaning up after accounts that moved away: once a move out of this
//! region has completed (its intent in the directory says so) and
//! `--moved-cleanup-delay` has passed, the account's data and idempotency
//! records here are deleted, a few accounts per round. The fence stays
//! (`E:moved:T`), so a router with a stale placement is still told where
//! the account went. Each delete is one transaction that compares the fence
//! with the `moved` value the move left: a move back into this region
//! replaces or deletes the fence first, and then nothing is deleted.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp};
use tern_common::{DIR_MIGRATIONS, Fence, MigrationPhase, MigrationRecord, data_prefix, fence_key, idempotency_prefix};

use crate::election::Leadership;
use crate::error::{AgentError, EtcdContext, Result};
use crate::state::Shared;

/// How often the intents are looked at: a read of the whole migrations
/// prefix from the global directory, so not every second.
const ROUND: Duration = Duration::from_secs(5);
/// Accounts cleaned up per round at most (20 a second): the deletes are
/// spread out.
const PER_ROUND: usize = 100;

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
