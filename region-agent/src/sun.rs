//! Follow the sun: the home agent moves an account to the region its writes
//! come from (DESIGN.md "Follow the sun"). The evidence is what the
//! region's routers count and publish into the group
//! (`/tern/stats/counts/`, `router/src/counts.rs`): every write to an
//! account homed here passes through one of them, with its origin region.
//!
//! An account moves to region X when, within the window, X sent at least
//! `threshold` writes, more than the home region and more than any other
//! region (so traffic split evenly moves nothing); X is among its allowed
//! regions; it is not pinned; it has not moved within the cooldown; and
//! fewer than the per-minute limit of moves have left this region. Every
//! decision about an account with a candidate is explained in a log line
//! (and a Kubernetes event with --geocluster), once per change of what it
//! says: "acct-42: 3 writes from eu-west in 24h, 0 from home us-east →
//! moving to eu-west" or "… skipped: cooldown until 14:02 UTC". A move is
//! an intent record for the target's agent (`migrate.rs`), like any other;
//! a dry run only reports.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use tern_common::{
    AccountId, AccountRecord, AccountState, COUNTS_PREFIX, DIR_MIGRATIONS, MigrationId, MigrationRecord, RegionName,
    WriteCountsRecord, dir_account_key, dir_migration_key,
};
use tokio::time::Instant;

use crate::election::Leadership;
use crate::error::{AgentError, EtcdContext, Result};
use crate::metrics::Metrics;
use crate::state::Shared;

/// The policy's settings (GeoCluster `spec.followTheSun`, as agent flags).
#[derive(Clone, Debug)]
pub struct Policy {
    pub enabled: bool,
    pub threshold: u64,
    pub window: Duration,
    pub cooldown: Duration,
    pub dry_run: bool,
    pub per_minute: u32,
    pub interval: Duration,
}

impl From<&crate::Config> for Policy {
    fn from(c: &crate::Config) -> Self {
        Self {
            enabled: c.follow_the_sun,
            threshold: c.follow_the_sun_threshold,
            window: c.follow_the_sun_window,
            cooldown: c.follow_the_sun_cooldown,
            dry_run: c.follow_the_sun_dry_run,
            per_minute: c.follow_the_sun_max_per_minute,
            interval: c.follow_the_sun_interval,
        }
    }
}

/// What the policy decided about one account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Move { to: RegionName, why: String },
    Skip { why: String },
}

/// Writes per origin region of every account, summed over the published
/// records, counting only buckets within `window` of `now_secs`.
pub fn sum(records: &[WriteCountsRecord], now_secs: u64, window: Duration) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut totals: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for r in records {
        let per = r.bucket_secs.max(1);
        let buckets = (window.as_secs() / per).max(1);
        let oldest = (now_secs / per).saturating_sub(buckets - 1);
        for (account, origins) in &r.accounts {
            for (origin, bs) in origins {
                let n: u64 = bs.iter().filter(|(b, _)| *b >= oldest).map(|(_, n)| n).sum();
                if n > 0 {
                    *totals
                        .entry(account.clone())
                        .or_default()
                        .entry(origin.clone())
                        .or_default() += n;
                }
            }
        }
    }
    totals
}

/// Account → id of every intent that is not final.
async fn open_moves(directory: &Client) -> Result<BTreeMap<String, String>> {
    let resp = directory
        .clone()
        .get(DIR_MIGRATIONS, Some(GetOptions::new().with_prefix()))
        .await
        .during(|| "reading the migration intents".into())?;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let r = serde_json::from_slice::<MigrationRecord>(kv.value()).ok()?;
            let id = tern_common::migration_of_dir_key(kv.key())?;
            (!r.phase.is_final()).then(|| (r.account.to_string(), id.to_string()))
        })
        .collect())
}

/// Whether a record holds nothing within the window any more.
fn expired(r: &WriteCountsRecord, now_secs: u64, window: Duration) -> bool {
    sum(std::slice::from_ref(r), now_secs, window).is_empty()
}

fn hh_mm(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    format!("{:02}:{:02} UTC", (secs % 86_400) / 3600, (secs % 3600) / 60)
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) && s >= 3600 {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) && s >= 60 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// The policy for one account homed in `home` with `counts` (origin →
/// writes in the window); None when no region is a candidate (nothing to
/// explain).
pub fn decide(
    account: &str,
    home: &RegionName,
    counts: &BTreeMap<String, u64>,
    placement: &AccountRecord,
    policy: &Policy,
    now_ms: u64,
) -> Option<Decision> {
    let at_home = counts.get(home.as_str()).copied().unwrap_or(0);
    let mut others: Vec<(&String, u64)> = counts
        .iter()
        .filter(|(r, _)| r.as_str() != home.as_str())
        .map(|(r, n)| (r, *n))
        .collect();
    others.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let (best, n) = others.first().copied()?;
    if n < policy.threshold {
        return None;
    }
    let window = human(policy.window);
    let evidence = format!("{account}: {n} writes from {best} in {window}, {at_home} from home {home}");
    let skip = |why: String| {
        Some(Decision::Skip {
            why: format!("{evidence} … skipped: {why}"),
        })
    };
    if n <= at_home {
        return skip(format!("{home} sends as many or more"));
    }
    if let Some((second, m)) = others.get(1)
        && *m == n
    {
        return skip(format!("{second} sends as many ({m})"));
    }
    let Ok(to) = RegionName::new(best.as_str()) else {
        return skip(format!("{best} is not a region name"));
    };
    if placement.pinned {
        return skip("pinned".into());
    }
    if !placement.allowed_regions.is_empty() && !placement.allowed_regions.contains(&to) {
        let allowed: Vec<String> = placement.allowed_regions.iter().map(ToString::to_string).collect();
        return skip(format!(
            "{to} is not among its allowed regions [{}]",
            allowed.join(", ")
        ));
    }
    if let AccountState::Migrating { target } = &placement.state {
        return skip(format!("already moving to {target}"));
    }
    if let Some(moved) = placement.moved_ms {
        let until = moved + policy.cooldown.as_millis() as u64;
        if now_ms < until {
            return skip(format!("cooldown until {}", hh_mm(until)));
        }
    }
    Some(Decision::Move {
        why: format!("{evidence} → moving to {to}"),
        to,
    })
}

/// Runs the policy every `policy.interval` until leadership ends.
pub async fn run(
    directory: Client,
    local: Client,
    leadership: Leadership,
    shared: Arc<Shared>,
    policy: Policy,
) -> AgentError {
    let mut last: BTreeMap<String, Decision> = BTreeMap::new();
    let mut started: VecDeque<Instant> = VecDeque::new();
    loop {
        tokio::time::sleep(policy.interval).await;
        if !policy.enabled {
            continue;
        }
        if let Err(e) = round(
            &directory,
            &local,
            &leadership,
            &shared,
            &policy,
            &mut last,
            &mut started,
        )
        .await
        {
            if matches!(e, AgentError::NotLeader(_)) {
                return e;
            }
            tracing::warn!(error = %e, "follow the sun: a round failed; trying again");
        }
    }
}

async fn round(
    directory: &Client,
    local: &Client,
    leadership: &Leadership,
    shared: &Shared,
    policy: &Policy,
    last: &mut BTreeMap<String, Decision>,
    started: &mut VecDeque<Instant>,
) -> Result<()> {
    let now = tern_common::unix_now();
    let (now_secs, now_ms) = (now.as_secs(), now.as_millis() as u64);
    let resp = local
        .clone()
        .get(COUNTS_PREFIX, Some(GetOptions::new().with_prefix()))
        .await
        .during(|| "reading the routers' write counts".into())?;
    let mut records = Vec::new();
    for kv in resp.kvs() {
        let Ok(r) = serde_json::from_slice::<WriteCountsRecord>(kv.value()) else {
            continue;
        };
        if expired(&r, now_secs, policy.window) {
            // A router that stopped publishing: its counts have aged out.
            let _ = local
                .clone()
                .txn(
                    Txn::new()
                        .when([leadership.guard()])
                        .and_then([TxnOp::delete(kv.key(), None)]),
                )
                .await;
            continue;
        }
        records.push(r);
    }
    let totals = sum(&records, now_secs, policy.window);
    let home = shared.region.clone();
    // Accounts with a move asked for and not finished (the placement says
    // `migrating` only once the target's agent starts it): read once a
    // round, when some account is a candidate.
    let mut asked: Option<BTreeMap<String, String>> = None;
    // Region records, read once a round when some account would move.
    let mut regions: Option<BTreeMap<RegionName, tern_common::RegionRecord>> = None;
    for (account, counts) in &totals {
        // Only accounts with a candidate need their placement.
        let candidate = counts
            .iter()
            .any(|(r, n)| r.as_str() != home.as_str() && *n >= policy.threshold);
        if !candidate {
            continue;
        }
        let Ok(id) = AccountId::new(account.as_str()) else {
            continue;
        };
        let key = dir_account_key(&id);
        let placement = directory
            .clone()
            .get(key.clone(), None)
            .await
            .during(|| format!("reading the placement of {account}"))?;
        let Some(placement) = placement
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<AccountRecord>(kv.value()).ok())
        else {
            continue;
        };
        if placement.home != home {
            // Moved away: the counts here are history.
            continue;
        }
        if asked.is_none() {
            asked = Some(open_moves(directory).await?);
        }
        if let Some(id) = asked.as_ref().and_then(|a| a.get(account.as_str())) {
            explain(
                shared,
                last,
                account,
                Decision::Skip {
                    why: format!("{account}: … skipped: a move is asked for already ({id})"),
                },
            )
            .await;
            continue;
        }
        let Some(decision) = decide(account, &home, counts, &placement, policy, now_ms) else {
            continue;
        };
        let decision = match decision {
            Decision::Move { to, why } => {
                if regions.is_none() {
                    regions = Some(crate::drain::regions(directory).await?);
                }
                let target_state = regions.as_ref().and_then(|r| r.get(&to)).map(|r| r.state);
                if target_state.is_some_and(|s| s != tern_common::RegionState::Active) {
                    let state = match target_state {
                        Some(tern_common::RegionState::Failed) => "failed over",
                        _ => "draining",
                    };
                    let evidence = why.split(" → ").next().unwrap_or(&why).to_string();
                    explain(
                        shared,
                        last,
                        account,
                        Decision::Skip {
                            why: format!("{evidence} … skipped: {to} is {state}"),
                        },
                    )
                    .await;
                    continue;
                }
                while started.front().is_some_and(|t| t.elapsed() > Duration::from_secs(60)) {
                    started.pop_front();
                }
                if started.len() >= policy.per_minute as usize {
                    Decision::Skip {
                        why: format!(
                            "{} … skipped: {} moves left {home} in the last minute (at most {})",
                            why.split(" → ").next().unwrap_or(&why),
                            started.len(),
                            policy.per_minute
                        ),
                    }
                } else if policy.dry_run {
                    explain(
                        shared,
                        last,
                        account,
                        Decision::Move {
                            to,
                            why: format!("{why} (dry run: not moved)"),
                        },
                    )
                    .await;
                    continue;
                } else {
                    let record =
                        MigrationRecord::requested(id.clone(), to.clone(), Some(home.clone()), why.clone(), now_ms);
                    let mid = match MigrationId::new(format!(
                        "{}{account}-{now_ms}",
                        tern_common::AUTOMATIC_MIGRATION_PREFIX
                    )) {
                        Ok(mid) => mid,
                        Err(e) => {
                            tracing::warn!(account = %account, error = %e, "no migration id for this account: not moved");
                            continue;
                        }
                    };
                    let mkey = dir_migration_key(&mid);
                    let value = serde_json::to_string(&record).map_err(|e| AgentError::Malformed {
                        key: mkey.clone(),
                        detail: e.to_string(),
                    })?;
                    let Some(claim) = shared.claim() else { continue };
                    let resp = directory
                        .clone()
                        .txn(
                            Txn::new()
                                .when([
                                    claim.guard(),
                                    Compare::create_revision(mkey.clone(), CompareOp::Equal, 0),
                                ])
                                .and_then([TxnOp::put(mkey, value, None)]),
                        )
                        .await
                        .during(|| format!("asking for the move of {account}"))?;
                    if !resp.succeeded() {
                        continue;
                    }
                    started.push_back(Instant::now());
                    Decision::Move { to, why }
                }
            }
            skip => skip,
        };
        explain(shared, last, account, decision).await;
    }
    Ok(())
}

/// Logs (and posts as an event) a decision unless it says what the last
/// one about the account said.
async fn explain(shared: &Shared, last: &mut BTreeMap<String, Decision>, account: &str, decision: Decision) {
    let (outcome, text) = match &decision {
        Decision::Move { why, .. } if why.ends_with("(dry run: not moved)") => ("would_move", why.clone()),
        Decision::Move { why, .. } => ("moved", why.clone()),
        Decision::Skip { why } => ("skipped", why.clone()),
    };
    if last.get(account) == Some(&decision) {
        return;
    }
    shared
        .metrics
        .sun_decisions
        .get_or_create(&Metrics::outcome(outcome))
        .inc();
    tracing::info!(account, decision = outcome, "{text}");
    if let Some(events) = &shared.events {
        events.normal("FollowTheSun", "Migrate", text).await;
    }
    last.insert(account.to_string(), decision);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_common::Epoch;

    fn policy() -> Policy {
        Policy {
            enabled: true,
            threshold: 3,
            window: Duration::from_secs(24 * 3600),
            cooldown: Duration::from_secs(3600),
            dry_run: false,
            per_minute: 6,
            interval: Duration::from_secs(10),
        }
    }

    fn region(s: &str) -> RegionName {
        RegionName::new(s).expect("region")
    }

    fn placement() -> AccountRecord {
        AccountRecord {
            home: region("us-east"),
            epoch: Epoch(1),
            state: AccountState::Active,
            allowed_regions: vec![],
            moved_ms: None,
            pinned: false,
        }
    }

    fn counts(c: &[(&str, u64)]) -> BTreeMap<String, u64> {
        c.iter().map(|(r, n)| (r.to_string(), *n)).collect()
    }

    fn decide_for(c: &[(&str, u64)], p: &AccountRecord) -> Option<Decision> {
        decide("acct-42", &region("us-east"), &counts(c), p, &policy(), 1_000_000)
    }

    #[test]
    fn three_writes_from_elsewhere_and_none_from_home_move_the_account() {
        assert_eq!(
            decide_for(&[("eu-west", 3)], &placement()),
            Some(Decision::Move {
                to: region("eu-west"),
                why: "acct-42: 3 writes from eu-west in 24h, 0 from home us-east → moving to eu-west".into()
            })
        );
    }

    #[test]
    fn below_the_threshold_nothing_is_said() {
        assert_eq!(decide_for(&[("eu-west", 2)], &placement()), None);
        assert_eq!(decide_for(&[("us-east", 50)], &placement()), None);
    }

    #[test]
    fn the_candidate_must_dominate_home_and_every_other_region() {
        let skipped = |c: &[(&str, u64)]| match decide_for(c, &placement()) {
            Some(Decision::Skip { why }) => why,
            other => panic!("expected a skip, got {other:?}"),
        };
        assert!(skipped(&[("eu-west", 5), ("us-east", 5)]).contains("us-east sends as many or more"));
        assert!(skipped(&[("eu-west", 5), ("ap-south", 5)]).contains("sends as many (5)"));
        assert!(matches!(
            decide_for(&[("eu-west", 6), ("ap-south", 5), ("us-east", 1)], &placement()),
            Some(Decision::Move { .. })
        ));
    }

    #[test]
    fn residency_pins_cooldown_and_moves_in_flight_are_respected() {
        let why = |p: AccountRecord| match decide_for(&[("eu-west", 9)], &p) {
            Some(Decision::Skip { why }) => why,
            other => panic!("expected a skip, got {other:?}"),
        };
        let mut p = placement();
        p.allowed_regions = vec![region("us-east"), region("ap-south")];
        assert!(why(p).contains("eu-west is not among its allowed regions [us-east, ap-south]"));
        let mut p = placement();
        p.pinned = true;
        assert!(why(p).ends_with("skipped: pinned"));
        let mut p = placement();
        p.moved_ms = Some(1_000_000 - 60_000);
        // Moved at 940 s after the epoch: the hour of cooldown ends at
        // 4,540 s, 01:15 UTC.
        assert!(why(p).ends_with("skipped: cooldown until 01:15 UTC"), "cooldown");
        let mut p = placement();
        p.state = AccountState::Migrating {
            target: region("ap-south"),
        };
        assert!(why(p).contains("already moving to ap-south"));
        let mut p = placement();
        p.moved_ms = Some(940_000);
        let after = 940_000 + 3_600_001;
        assert!(matches!(
            decide(
                "acct-42",
                &region("us-east"),
                &counts(&[("eu-west", 9)]),
                &p,
                &policy(),
                after
            ),
            Some(Decision::Move { .. })
        ));
    }

    #[test]
    fn counts_of_every_router_add_up_within_the_window() {
        let now = 100 * 3600;
        let record = |bucket_offset: u64, n: u64| WriteCountsRecord {
            bucket_secs: 3600,
            published_ms: 0,
            accounts: [(
                "a".to_string(),
                [("eu-west".to_string(), vec![(now / 3600 - bucket_offset, n)])].into(),
            )]
            .into(),
        };
        let window = Duration::from_secs(24 * 3600);
        let totals = sum(&[record(0, 2), record(5, 1), record(30, 7)], now, window);
        assert_eq!(
            totals["a"]["eu-west"], 3,
            "two routers' counts add up; a bucket 30 h old does not"
        );
        assert!(expired(&record(30, 7), now, window));
        assert!(!expired(&record(23, 1), now, window));
    }
}
