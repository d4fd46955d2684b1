//! Draining this region (planned switchover, DESIGN.md "Failover"): while
//! the directory says the region is `draining` (`tern drain`, or the
//! GeoCluster's `spec.regions[].drain`, through `tern_common::drain`), the
//! elected agent moves every account homed here out with the migration
//! protocol, so nothing is lost (RPO 0) and each account is unavailable
//! only for its own move's window.
//!
//! Each round (every second) it follows the moves it asked for, counts the
//! accounts still homed here when nothing is queued, and asks for more:
//! intent records `drain-{account}-{ms}` (expected source: here) for the
//! target's agent, like any move. At most `--drain-parallel` are under way
//! and `--drain-moves-per-minute` start per minute; the targets' own
//! per-minute limit does not apply to them (the drain paces itself).
//!
//! Where each account goes: among the active regions (not draining, not
//! failed) in its allowed regions, the one its writes come from most (the
//! routers' counts, as follow the sun reads them), else the first of this
//! region's failover successors, else the first by name. An account with
//! nowhere to go, or whose move was refused or rolled back, is *blocked*
//! and tried again later; the progress (`DrainProgress` in the region's
//! record: homed, moving, moved, blocked and why) is what `tern drain`,
//! `tern status` and the GeoCluster's status show.
//!
//! The same loop re-homes the accounts of a region that failed over to
//! this one (kind `Rehome`, docs/failover.md §9): once this region's mirror
//! of it is promoted, each of its accounts moves from the promoted mirror
//! area into this region's own home area (`rehome-…` intents, carried out
//! by this agent), with the progress in the failed region's record.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse};
use tern_common::etcd::Pages;
use tern_common::{
    AccountId, AccountRecord, AccountState, COUNTS_PREFIX, DIR_ACCOUNTS, DIR_REGIONS, DRAIN_MIGRATION_PREFIX,
    DrainProgress, MigrationId, MigrationPhase, MigrationRecord, REHOME_MIGRATION_PREFIX, RegionName, RegionRecord,
    RegionState, WriteCountsRecord, dir_account_key, dir_migration_key, promotion_key,
};
use tokio::time::Instant;

use crate::error::{AgentError, EtcdContext, Result};
use crate::state::Shared;

/// How often a round runs.
const TICK: Duration = Duration::from_secs(1);
/// How long a blocked account waits before it is tried again.
const RETRY_BLOCKED: Duration = Duration::from_secs(5);
/// The least time between two counts of the accounts homed here.
const RECOUNT: Duration = Duration::from_secs(2);
/// The same once none is left.
const RECOUNT_DONE: Duration = Duration::from_secs(30);

/// The drain's limits, from the agent's flags.
#[derive(Clone, Debug)]
pub struct Settings {
    pub per_minute: u32,
    pub parallel: usize,
    /// This region's failover successors, most preferred first.
    pub successors: Vec<RegionName>,
    /// The window of the routers' write counts (follow the sun's).
    pub window: Duration,
}

impl From<&crate::Config> for Settings {
    fn from(c: &crate::Config) -> Self {
        Self {
            per_minute: c.drain_moves_per_minute,
            parallel: c.drain_parallel,
            successors: c
                .failover_order
                .iter()
                .find(|(r, _)| *r == c.region)
                .map(|(_, order)| order.clone())
                .unwrap_or_default(),
            window: c.follow_the_sun_window,
        }
    }
}

/// Where `placement`'s account goes: among `active` regions it may live
/// in, the one that sent it the most writes (`counts`, origin → writes),
/// else the first of `successors`, else the first by name. Err says why
/// there is none.
pub fn choose(
    placement: &AccountRecord,
    counts: Option<&BTreeMap<String, u64>>,
    active: &[RegionName],
    successors: &[RegionName],
) -> std::result::Result<RegionName, String> {
    let allowed = |r: &RegionName| placement.allowed_regions.is_empty() || placement.allowed_regions.contains(r);
    let candidates: Vec<&RegionName> = active.iter().filter(|r| allowed(r)).collect();
    if candidates.is_empty() {
        return Err(if placement.allowed_regions.is_empty() {
            "no other region is active".to_string()
        } else {
            let allowed: Vec<String> = placement.allowed_regions.iter().map(ToString::to_string).collect();
            format!("none of its allowed regions [{}] is active", allowed.join(", "))
        });
    }
    let written = |r: &RegionName| counts.and_then(|c| c.get(r.as_str())).copied().unwrap_or(0);
    if let Some(busiest) = candidates
        .iter()
        .filter(|r| written(r) > 0)
        .max_by(|a, b| written(a).cmp(&written(b)).then(b.cmp(a)))
    {
        return Ok((*busiest).clone());
    }
    if let Some(s) = successors.iter().find(|s| candidates.contains(s)) {
        return Ok(s.clone());
    }
    let mut sorted = candidates;
    sorted.sort();
    Ok(sorted[0].clone())
}

/// Every region's record, by name.
pub async fn regions(directory: &Client) -> Result<BTreeMap<RegionName, RegionRecord>> {
    let resp = directory
        .clone()
        .get(DIR_REGIONS, Some(GetOptions::new().with_prefix()))
        .await
        .during(|| "reading the region records".into())?;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let region = tern_common::region_of_dir_key(kv.key(), DIR_REGIONS)?;
            let record = serde_json::from_slice::<RegionRecord>(kv.value()).ok()?;
            Some((region, record))
        })
        .collect())
}

/// One drain, from the round that saw the region draining.
struct Drain {
    started_ms: u64,
    /// Accounts to look at, in the order listed.
    queue: VecDeque<AccountId>,
    /// Moves asked for and not finished: account → intent.
    moving: BTreeMap<AccountId, MigrationId>,
    /// Accounts that cannot leave now, why, and when to try again.
    blocked: BTreeMap<AccountId, (String, Instant)>,
    /// Targets that refused or rolled back an account's last moves.
    avoid: BTreeMap<AccountId, std::collections::BTreeSet<RegionName>>,
    homed: u64,
    moved: u64,
    counted_at: Option<Instant>,
    started: VecDeque<Instant>,
    written: Option<DrainProgress>,
}

impl Drain {
    fn new() -> Self {
        Self {
            started_ms: tern_common::unix_ms(),
            queue: VecDeque::new(),
            moving: BTreeMap::new(),
            blocked: BTreeMap::new(),
            avoid: BTreeMap::new(),
            homed: 0,
            moved: 0,
            counted_at: None,
            started: VecDeque::new(),
            written: None,
        }
    }

    fn progress(&self) -> DrainProgress {
        DrainProgress {
            started_ms: self.started_ms,
            homed: self.homed,
            moving: self.moving.len() as u64,
            moved: self.moved,
            blocked: self.blocked.len() as u64,
            message: self
                .blocked
                .iter()
                .next()
                .map(|(account, (why, _))| format!("{account}: {why}")),
            updated_ms: tern_common::unix_ms(),
        }
    }
}

/// What a job moves out, and where to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// This region drains: its accounts go to other active regions.
    Drain,
    /// A region that failed over to this one: its accounts, served from
    /// this group's promoted mirror area, move into this region's home
    /// area (at the next epoch), so that the failed region can rejoin.
    Rehome,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Drain => DRAIN_MIGRATION_PREFIX,
            Kind::Rehome => REHOME_MIGRATION_PREFIX,
        }
    }
}

/// Runs drains and re-homings until leadership ends.
pub async fn run(directory: Client, local: Client, shared: Arc<Shared>, settings: Settings) -> AgentError {
    let mut jobs: BTreeMap<RegionName, Drain> = BTreeMap::new();
    loop {
        tokio::time::sleep(TICK).await;
        if let Err(e) = round(&directory, &local, &shared, &settings, &mut jobs).await {
            if matches!(e, AgentError::NotLeader(_)) {
                return e;
            }
            tracing::warn!(error = %e, "draining: a round failed; trying again");
        }
    }
}

async fn round(
    directory: &Client,
    local: &Client,
    shared: &Shared,
    settings: &Settings,
    jobs: &mut BTreeMap<RegionName, Drain>,
) -> Result<()> {
    let Some(claim) = shared.claim() else {
        return Ok(());
    };
    let here = shared.region.clone();
    let regions = regions(directory).await?;
    let Some(mine) = regions.get(&here) else {
        return Ok(());
    };
    if mine.state != RegionState::Draining {
        if let Some(d) = jobs.remove(&here) {
            tracing::info!(region = %here, moved = d.moved, homed = d.homed, "undrained: no more moves start; those under way finish");
            if let Some(events) = &shared.events {
                events
                    .normal(
                        "RegionUndrained",
                        "Drain",
                        format!(
                            "{here} is active again after moving {} accounts out; {} stay",
                            d.moved, d.homed
                        ),
                    )
                    .await;
            }
        }
        if mine.drain.is_some() && mine.state == RegionState::Active {
            let mut c = directory.clone();
            crate::publish::write_record(&mut c, &here, &claim, |r| r.drain = None).await?;
        }
    }
    // Regions that failed over to this one, once promoted here: their
    // accounts are re-homed.
    let mut rehome = Vec::new();
    for (region, record) in &regions {
        if record.state != RegionState::Failed || record.successor.as_ref() != Some(&here) {
            continue;
        }
        let marker = local
            .clone()
            .get(promotion_key(region), None)
            .await
            .during(|| format!("reading the promotion marker of {region}"))?;
        let promoted = marker
            .kvs()
            .first()
            .is_some_and(|kv| kv.value() == record.region_epoch.to_string().as_bytes());
        if promoted {
            rehome.push(region.clone());
        }
    }
    jobs.retain(|r, _| *r == here || rehome.contains(r));
    let active: Vec<RegionName> = regions
        .iter()
        .filter(|(r, record)| **r != here && record.state == RegionState::Active)
        .map(|(r, _)| r.clone())
        .collect();
    let mut work: Vec<(RegionName, Kind)> = rehome.into_iter().map(|r| (r, Kind::Rehome)).collect();
    if mine.state == RegionState::Draining {
        work.push((here.clone(), Kind::Drain));
    }
    for (from, kind) in work {
        let d = jobs.entry(from.clone()).or_insert_with(|| {
            match kind {
                Kind::Drain => tracing::info!(region = %from, "draining: every account homed here moves out"),
                Kind::Rehome => {
                    tracing::info!(region = %from, successor = %here, "re-homing the failed region's accounts here")
                }
            }
            Drain::new()
        });
        step(directory, local, shared, settings, &claim, &from, kind, &active, d).await?;
    }
    Ok(())
}

/// One round of one job: follow its moves, count, ask for more, and
/// publish the progress into `from`'s record.
#[allow(clippy::too_many_arguments)]
async fn step(
    directory: &Client,
    local: &Client,
    shared: &Shared,
    settings: &Settings,
    claim: &crate::publish::Claim,
    from: &RegionName,
    kind: Kind,
    active: &[RegionName],
    d: &mut Drain,
) -> Result<()> {
    let here = shared.region.clone();
    follow(directory, d).await?;
    let now = Instant::now();
    // Once nothing is homed there, counting again is only for accounts that
    // arrive anyway (a move that was under way elsewhere): less often.
    let every = if d.homed == 0 && d.counted_at.is_some() {
        RECOUNT_DONE
    } else {
        RECOUNT
    };
    if d.queue.is_empty() && d.moving.is_empty() && d.counted_at.is_none_or(|t| now - t >= every) {
        count(directory, from, d).await?;
        d.counted_at = Some(now);
    }
    if !d.queue.is_empty() {
        start_moves(directory, local, shared, settings, claim, from, kind, active, d).await?;
    }
    let progress = d.progress();
    let changed = d.written.as_ref().is_none_or(|w| {
        (w.homed, w.moving, w.moved, w.blocked, &w.message)
            != (
                progress.homed,
                progress.moving,
                progress.moved,
                progress.blocked,
                &progress.message,
            )
    });
    // Written only when it changed: `tern rejoin` compares the failed
    // region's record, so a re-homing that rewrote it regularly could hold
    // the rejoin off.
    if !changed {
        return Ok(());
    }
    let (started, ended) = match kind {
        Kind::Drain => (
            (
                "RegionDraining",
                format!("{from} drains: {} accounts homed here move out", progress.homed),
            ),
            (
                "RegionDrained",
                format!("{from} is drained: {} accounts moved out", progress.moved),
            ),
        ),
        Kind::Rehome => (
            (
                "RegionRehoming",
                format!(
                    "{from} failed over to {here}: its {} accounts move from {here}'s mirror area into {here}'s own",
                    progress.homed
                ),
            ),
            (
                "RegionRehomed",
                format!(
                    "every account of {from} is homed in {here} ({} moved): {from} can rejoin (`tern rejoin {from}`)",
                    progress.moved
                ),
            ),
        ),
    };
    if d.written.is_none()
        && let Some(events) = &shared.events
    {
        events.normal(started.0, "Drain", started.1).await;
    }
    if progress.homed == 0 && d.written.as_ref().is_none_or(|w| w.homed > 0) {
        tracing::info!(region = %from, moved = progress.moved, ?kind, "no account is homed in the region any more");
        if let Some(events) = &shared.events {
            events.normal(ended.0, "Drain", ended.1).await;
        }
    }
    if kind == Kind::Drain {
        shared.metrics.drain_homed.set(progress.homed as i64);
    }
    let mut c = directory.clone();
    let value = progress.clone();
    let state = match kind {
        Kind::Drain => RegionState::Draining,
        Kind::Rehome => RegionState::Failed,
    };
    crate::publish::write_record(&mut c, from, claim, move |r| {
        if r.state == state {
            r.drain = Some(value.clone());
        }
    })
    .await?;
    d.written = Some(progress);
    Ok(())
}

/// Reads the moves under way (one transaction) and settles the finished.
async fn follow(directory: &Client, d: &mut Drain) -> Result<()> {
    if d.moving.is_empty() {
        return Ok(());
    }
    let asked: Vec<(AccountId, MigrationId)> = d.moving.iter().map(|(a, m)| (a.clone(), m.clone())).collect();
    let gets: Vec<TxnOp> = asked
        .iter()
        .map(|(_, m)| TxnOp::get(dir_migration_key(m), None))
        .collect();
    let resp = directory
        .clone()
        .txn(Txn::new().and_then(gets))
        .await
        .during(|| "reading the drain's moves".into())?;
    for ((account, id), op) in asked.into_iter().zip(resp.op_responses()) {
        let TxnOpResponse::Get(found) = op else { continue };
        let record = found
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<MigrationRecord>(kv.value()).ok());
        match record.map(|r| (r.phase, r.message, r.target)) {
            Some((MigrationPhase::Completed, _, _)) => {
                d.moving.remove(&account);
                d.blocked.remove(&account);
                d.moved += 1;
                d.homed = d.homed.saturating_sub(1);
            }
            Some((MigrationPhase::Refused | MigrationPhase::RolledBack, message, target)) => {
                d.moving.remove(&account);
                let why = message.unwrap_or_else(|| format!("move {id} did not complete"));
                // The next attempt tries another region first (this one's
                // mirror may lag, or it may be cut off).
                d.avoid.entry(account.clone()).or_default().insert(target);
                d.blocked.insert(account, (why, Instant::now() + RETRY_BLOCKED));
            }
            // Trimmed before this round saw it: the next count settles it.
            None => {
                d.moving.remove(&account);
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Counts the accounts homed here (one snapshot of the directory, in
/// pages) and queues those not moving.
async fn count(directory: &Client, here: &RegionName, d: &mut Drain) -> Result<()> {
    let mut c = directory.clone();
    let mut pages = Pages::prefix(DIR_ACCOUNTS, 5_000);
    let mut homed = 0;
    let mut queue = VecDeque::new();
    let mut still: std::collections::BTreeSet<AccountId> = std::collections::BTreeSet::new();
    while let Some(page) = pages
        .next(&mut c)
        .await
        .during(|| "listing the accounts homed here".into())?
    {
        for kv in page.kvs() {
            let Some(account) = tern_common::account_of_dir_key(kv.key()) else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<AccountRecord>(kv.value()) else {
                continue;
            };
            if record.home != *here {
                continue;
            }
            homed += 1;
            still.insert(account.clone());
            if record.state == AccountState::Active && !d.moving.contains_key(&account) {
                queue.push_back(account);
            }
        }
    }
    d.homed = homed;
    d.queue = queue;
    d.blocked.retain(|a, _| still.contains(a));
    d.avoid.retain(|a, _| still.contains(a));
    Ok(())
}

/// Asks for moves of queued accounts, within the limits.
#[allow(clippy::too_many_arguments)]
async fn start_moves(
    directory: &Client,
    local: &Client,
    shared: &Shared,
    settings: &Settings,
    claim: &crate::publish::Claim,
    from: &RegionName,
    kind: Kind,
    active: &[RegionName],
    d: &mut Drain,
) -> Result<()> {
    let here = shared.region.clone();
    let counts = match kind {
        Kind::Drain => write_counts(local, settings.window).await.unwrap_or_default(),
        Kind::Rehome => BTreeMap::new(),
    };
    let now = Instant::now();
    while d.started.front().is_some_and(|t| now - *t > Duration::from_secs(60)) {
        d.started.pop_front();
    }
    let room = settings
        .parallel
        .saturating_sub(d.moving.len())
        .min((settings.per_minute as usize).saturating_sub(d.started.len()));
    // The next accounts whose turn it is (blocked ones wait out their
    // pause at the back of the queue).
    let mut later = VecDeque::new();
    let mut batch: Vec<AccountId> = Vec::new();
    while batch.len() < room {
        let Some(account) = d.queue.pop_front() else { break };
        if d.blocked.get(&account).is_some_and(|(_, retry)| *retry > now) {
            later.push_back(account);
        } else {
            batch.push(account);
        }
    }
    d.queue.extend(later);
    if batch.is_empty() {
        return Ok(());
    }
    // Their placements now, in one round trip (the count may be old).
    let gets: Vec<TxnOp> = batch.iter().map(|a| TxnOp::get(dir_account_key(a), None)).collect();
    let found = directory
        .clone()
        .txn(Txn::new().and_then(gets))
        .await
        .during(|| "reading the placements of the next accounts".into())?;
    let mut when = vec![claim.guard()];
    let mut puts = Vec::new();
    let mut asked: Vec<(AccountId, MigrationId, RegionName)> = Vec::new();
    for (account, op) in batch.into_iter().zip(found.op_responses()) {
        let TxnOpResponse::Get(g) = op else { continue };
        let Some(placement) = g
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<AccountRecord>(kv.value()).ok())
        else {
            continue;
        };
        if placement.home != *from || placement.state != AccountState::Active {
            continue;
        }
        let target = match kind {
            Kind::Rehome => here.clone(),
            Kind::Drain => match choose(
                &placement,
                counts.get(account.as_str()),
                &untried(active, d.avoid.entry(account.clone()).or_default()),
                &settings.successors,
            ) {
                Ok(t) => t,
                Err(why) => {
                    d.blocked.insert(account, (why, now + RETRY_BLOCKED));
                    continue;
                }
            },
        };
        let now_ms = tern_common::unix_ms();
        let Ok(id) = MigrationId::new(format!("{}{account}-{now_ms}", kind.prefix())) else {
            d.blocked.insert(
                account.clone(),
                (format!("no migration id fits account {account}"), now + RETRY_BLOCKED),
            );
            continue;
        };
        let why = match kind {
            Kind::Drain => format!("drain of {from}"),
            Kind::Rehome => format!("re-homing in {here} after {from} failed over"),
        };
        let record = MigrationRecord::requested(account.clone(), target.clone(), Some(from.clone()), why, now_ms);
        let mkey = dir_migration_key(&id);
        let value = serde_json::to_string(&record).map_err(|e| AgentError::Malformed {
            key: mkey.clone(),
            detail: e.to_string(),
        })?;
        when.push(Compare::create_revision(mkey.clone(), CompareOp::Equal, 0));
        puts.push(TxnOp::put(mkey, value, None));
        asked.push((account, id, target));
    }
    if asked.is_empty() {
        return Ok(());
    }
    // Asked for together, in one transaction guarded by this agent's claim
    // (ids are new: an id taken already fails it, and the next round asks
    // again with new ones).
    let done = directory
        .clone()
        .txn(Txn::new().when(when).and_then(puts))
        .await
        .during(|| "asking for moves".into())?
        .succeeded();
    if !done {
        d.queue.extend(asked.into_iter().map(|(a, _, _)| a));
        return Ok(());
    }
    for (account, id, target) in asked {
        tracing::info!(account = %account, to = %target, migration = %id, ?kind, "move asked for");
        if kind == Kind::Drain {
            shared.metrics.drain_moves.inc();
        }
        d.started.push_back(now);
        d.blocked.remove(&account);
        d.moving.insert(account, id);
    }
    Ok(())
}

/// `active` without the regions in `avoid`, unless that leaves none: then
/// all of them again (and `avoid` starts over).
fn untried(active: &[RegionName], avoid: &mut std::collections::BTreeSet<RegionName>) -> Vec<RegionName> {
    let left: Vec<RegionName> = active.iter().filter(|r| !avoid.contains(*r)).cloned().collect();
    if left.is_empty() {
        avoid.clear();
        return active.to_vec();
    }
    left
}

/// Writes per origin region of every account, as the routers here counted
/// them within `window`.
async fn write_counts(local: &Client, window: Duration) -> Result<BTreeMap<String, BTreeMap<String, u64>>> {
    let resp = local
        .clone()
        .get(COUNTS_PREFIX, Some(GetOptions::new().with_prefix()))
        .await
        .during(|| "reading the routers' write counts".into())?;
    let records: Vec<WriteCountsRecord> = resp
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
        .collect();
    Ok(crate::sun::sum(&records, tern_common::unix_now().as_secs(), window))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> RegionName {
        RegionName::new(s).expect("valid")
    }

    fn placement(allowed: &[&str]) -> AccountRecord {
        AccountRecord {
            home: r("us-east"),
            epoch: tern_common::Epoch(1),
            state: AccountState::Active,
            allowed_regions: allowed.iter().map(|a| r(a)).collect(),
            moved_ms: None,
            pinned: false,
        }
    }

    #[test]
    fn an_account_goes_where_its_writes_come_from_else_to_the_successor() {
        let active = [r("ap-south"), r("eu-west")];
        let successors = [r("eu-west"), r("ap-south")];
        let counts: BTreeMap<String, u64> = [("ap-south".to_string(), 4), ("eu-west".to_string(), 1)].into();
        assert_eq!(
            choose(&placement(&[]), Some(&counts), &active, &successors),
            Ok(r("ap-south"))
        );
        assert_eq!(choose(&placement(&[]), None, &active, &successors), Ok(r("eu-west")));
        assert_eq!(choose(&placement(&[]), None, &active, &[]), Ok(r("ap-south")));
        // Residency beats both.
        assert_eq!(
            choose(&placement(&["us-east", "eu-west"]), Some(&counts), &active, &[]),
            Ok(r("eu-west"))
        );
    }

    #[test]
    fn a_target_that_refused_is_tried_last() {
        let active = [r("ap-south"), r("eu-west")];
        let mut avoid: std::collections::BTreeSet<RegionName> = [r("ap-south")].into();
        assert_eq!(untried(&active, &mut avoid), vec![r("eu-west")]);
        avoid.insert(r("eu-west"));
        assert_eq!(untried(&active, &mut avoid), active.to_vec());
        assert!(avoid.is_empty(), "every region refused once: all of them again");
    }

    #[test]
    fn an_account_with_nowhere_to_go_is_blocked_with_the_reason() {
        let e = choose(&placement(&["us-east", "us-west"]), None, &[r("eu-west")], &[]).expect_err("blocked");
        assert!(e.contains("us-east, us-west") && e.contains("active"), "{e}");
        let e = choose(&placement(&[]), None, &[], &[]).expect_err("blocked");
        assert!(e.contains("no other region"), "{e}");
    }
}
