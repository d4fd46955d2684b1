//! Moves during a run: accounts migrated from region to region while the
//! workload writes and the faults hold, so the checkers judge histories
//! that cross moves (a write that waits at a fence, a retry that crosses a
//! move, a move whose agent is killed or whose regions are cut apart).

use std::time::{Duration, Instant};

use etcd_client::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tern_common::{AccountId, MigrationId, MigrationPhase, RegionName};
use tern_local::migrations;

/// How long one move is followed before the next starts (it goes on in the
/// agent; the run's end waits for it again).
const FOLLOW: Duration = Duration::from_secs(15);

/// What the moves of a run did.
#[derive(Debug, Default)]
pub struct Moves {
    pub completed: usize,
    pub rolled_back: usize,
    pub refused: usize,
    /// Still going when the run ended (a source cut off, say).
    pub unfinished: usize,
    /// Fence to switch of each completed move, ms.
    pub unavailable_ms: Vec<u64>,
    /// `acct: from → to (outcome)`, for the report.
    pub described: Vec<String>,
}

/// Moves `count` accounts, one after another, spread over `until`, each to
/// a region drawn among the others (compare-and-swap on where the
/// directory says it is).
pub async fn run(
    directory: Client,
    accounts: Vec<String>,
    regions: Vec<String>,
    seed: u64,
    count: usize,
    until: Instant,
) -> Moves {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6d6f766573);
    let mut moves = Moves::default();
    let mut ids = Vec::new();
    for n in 0..count {
        let left = until.saturating_duration_since(Instant::now());
        tokio::time::sleep(left / (count - n + 1) as u32).await;
        if Instant::now() >= until {
            break;
        }
        let account = accounts[rng.random_range(0..accounts.len())].clone();
        let Some(home) = home_of(&directory, &account).await else {
            continue;
        };
        let others: Vec<&String> = regions.iter().filter(|r| **r != home).collect();
        let to = others[rng.random_range(0..others.len())].clone();
        let (Ok(a), Ok(t), Ok(h)) = (AccountId::new(&account), RegionName::new(&to), RegionName::new(&home)) else {
            continue;
        };
        let Ok(id) = MigrationId::new(format!("verify-{seed}-{n}")) else {
            continue;
        };
        if migrations::request(&directory, &id, &a, &t, Some(h), "tern verify")
            .await
            .is_err()
        {
            moves
                .described
                .push(format!("{account}: {home} → {to} (could not be asked for)"));
            continue;
        }
        ids.push((id.clone(), format!("{account}: {home} → {to}")));
        let _ = migrations::wait(
            &directory,
            &id,
            FOLLOW.min(until.saturating_duration_since(Instant::now())),
            |_| {},
        )
        .await;
    }
    // Every move gets its chance to finish once the faults have healed.
    for (id, what) in ids {
        let outcome = migrations::wait(&directory, &id, FOLLOW, |_| {}).await;
        let phase = match &outcome {
            Ok(r) => {
                match r.phase {
                    MigrationPhase::Completed => {
                        moves.completed += 1;
                        moves.unavailable_ms.extend(r.unavailable_ms);
                    }
                    MigrationPhase::RolledBack => moves.rolled_back += 1,
                    _ => moves.refused += 1,
                }
                format!("{:?}", r.phase)
            }
            Err(_) => {
                moves.unfinished += 1;
                "unfinished".into()
            }
        };
        moves.described.push(format!("{what} ({phase})"));
    }
    moves
}

/// Adds the moves the agents made by themselves (intents named `sun-…`
/// for follow the sun, `drain-…` for a drain, `rehome-…` for re-homing
/// after a failover), as they stand at the end of the run.
pub async fn count_automatic(directory: &Client, moves: &mut Moves) {
    let Ok(all) = migrations::list(directory).await else {
        moves
            .described
            .push("automatic moves: the directory could not be read".into());
        return;
    };
    let mut automatic = 0;
    for (id, r) in all {
        let Some(kind) = [
            (tern_common::AUTOMATIC_MIGRATION_PREFIX, "follow the sun"),
            (tern_common::DRAIN_MIGRATION_PREFIX, "drain"),
            (tern_common::REHOME_MIGRATION_PREFIX, "re-homing"),
        ]
        .iter()
        .find(|(prefix, _)| id.starts_with(prefix))
        .map(|(_, kind)| *kind) else {
            continue;
        };
        automatic += 1;
        match r.phase {
            MigrationPhase::Completed => {
                moves.completed += 1;
                moves.unavailable_ms.extend(r.unavailable_ms);
            }
            MigrationPhase::RolledBack => moves.rolled_back += 1,
            MigrationPhase::Refused => moves.refused += 1,
            _ => moves.unfinished += 1,
        }
        moves.described.push(format!(
            "{}: {} → {} ({kind}, {:?})",
            r.account,
            r.source.as_ref().map_or("?".into(), ToString::to_string),
            r.target,
            r.phase
        ));
    }
    if automatic == 0 {
        moves.described.push("no automatic moves".into());
    }
}

async fn home_of(directory: &Client, account: &str) -> Option<String> {
    let r = directory
        .clone()
        .get(format!("/tern/dir/accounts/{account}"), None)
        .await
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(r.kvs().first()?.value()).ok()?;
    Some(v["home"].as_str()?.to_string())
}
