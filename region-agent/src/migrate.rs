//! Moving accounts into this region (DESIGN.md "Migration protocol"). A move
//! is asked for by creating an intent record in the directory
//! (`/tern/dir/migrations/{id}`, phase `requested`); the elected agent of
//! the *target* region carries it out, because every step but two is local
//! to it: it mirrors the source, so it waits on its own mirror and copies
//! from it into its own group; only the fence and the `moved` marker are
//! written into the source's group, through the mirror's connection.
//!
//! ```text
//! requested ──► fencing ───────────────────────────────────────────────► completed
//!   │ directory: account      fence S: E:active → E:fenced
//!   │ `migrating`, intent     wait: T's mirror applied ≥ r
//!   ▼                         copy into T's home area, fence E+1:active last  ◄─ landed
//! refused                     S: E:fenced → E:moved:T
//!                             directory: {T, E+1, active} + intent `completed`
//!                               │ (before landing only: mirror too slow,
//!                               ▼  fence not as expected)
//!                             rolling_back ──► rolled_back (S unfenced, directory {S, E, active})
//! ```
//!
//! Routers follow the fences ahead of the directory (a source fenced for
//! this move, or marked moved, sends a write on to T at E+1, where it waits
//! for the copy), so writes commit in T from the moment its fence is
//! `E+1:active`: that is the point of no return. From there the move only
//! goes forward, is never copied again and never rolled back, and the
//! window in which the account takes no writes is one round trip to the
//! source, the mirror's delay and a local copy; the `moved` marker and the
//! directory switch follow outside it.
//!
//! Every step is idempotent, so an agent that restarts (or a new leader)
//! does again whatever its phase says: in `fencing` it first looks whether
//! the copy landed, the fence CAS finds the fence already set and takes its
//! revision, the copy deletes what an earlier attempt left and writes it
//! again, and the directory switch compares the account's `migrating`
//! record. Local writes carry the leadership guard, directory writes the
//! region's lease claim. Named failpoints (feature `failpoints`) stop the
//! agent at each step.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};
use tern_common::etcd::Pages;
use tern_common::{
    AccountId, AccountRecord, AccountState, DIR_MIGRATIONS, Epoch, Fence, MigrationId, MigrationPhase, MigrationRecord,
    MirrorState, RegionLease, RegionName, account_prefix, dir_account_key, dir_lease_key, dir_migration_key, fence_key,
    mirror_key, promotion_key,
};
use tokio::time::Instant;

use crate::election::Leadership;
use crate::error::{AgentError, EtcdContext, Result};
use crate::publish::Claim;
use crate::state::Shared;

/// Operations and bytes per copy transaction (etcd runs with
/// --max-txn-ops=1024 and --max-request-bytes=1.5 MiB).
const COPY_OPS: usize = 1000;
const COPY_BYTES: usize = 1024 * 1024;
/// Retention given to a copied idempotency record that does not say when
/// its own ends (written before records carried it): the router's default.
const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// Copied records share leases whose TTLs are rounded up to this.
const LEASE_STEP_SECS: i64 = 60;
/// Moves one agent carries out at once.
const PARALLEL_MOVES: usize = 16;
/// Finished intents kept per target region (the audit trail).
const KEEP_FINISHED: usize = 1000;

/// Limits of the migration executor, from the agent's flags.
#[derive(Clone, Debug)]
pub struct Settings {
    pub per_minute: u32,
    pub max_lag: Duration,
    pub catch_up_timeout: Duration,
}

impl From<&crate::Config> for Settings {
    fn from(c: &crate::Config) -> Self {
        Self {
            per_minute: c.migrations_per_minute,
            max_lag: c.migration_max_lag,
            catch_up_timeout: c.migration_catch_up_timeout,
        }
    }
}

/// Runs moves into this region until leadership ends.
pub async fn run(
    directory: Client,
    local: Client,
    sources: BTreeMap<RegionName, Client>,
    leadership: Leadership,
    shared: Arc<Shared>,
    settings: Settings,
) -> AgentError {
    let m = Migrator {
        directory,
        local,
        sources,
        leadership,
        shared,
        settings,
        started: std::sync::Mutex::new(VecDeque::new()),
        adopted: std::sync::Mutex::new(std::collections::BTreeSet::new()),
        regions: std::sync::Mutex::new(BTreeMap::new()),
        reload: std::sync::atomic::AtomicBool::new(false),
    };
    let serving = async {
        loop {
            match m.serve().await {
                Err(e @ (AgentError::NotLeader(_) | AgentError::Failpoint(_))) => return e,
                Err(e) => {
                    tracing::warn!(error = %e, "following the migration intents failed; loading them again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(()) => {}
            }
        }
    };
    // The region records, once a second, beside the moves (never in their
    // way: a directory round trip per move step was what a bulk move paid).
    let refreshing = async {
        loop {
            m.refresh_regions().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        e = serving => e,
        never = refreshing => never,
    }
}

/// What a step decided.
enum Next {
    /// The intent moved on: drive it further.
    Go,
    /// Not now (rate limit): looked at again within a second.
    Later,
}

struct Migrator {
    directory: Client,
    local: Client,
    sources: BTreeMap<RegionName, Client>,
    leadership: Leadership,
    shared: Arc<Shared>,
    settings: Settings,
    /// When recent moves started, for the per-minute limit.
    started: std::sync::Mutex<VecDeque<Instant>>,
    /// Regions that failed over to this one: their agents can no longer
    /// finish the moves into them, so this agent settles those.
    adopted: std::sync::Mutex<std::collections::BTreeSet<RegionName>>,
    /// Every region's record as last read (at most a second old).
    regions: std::sync::Mutex<BTreeMap<RegionName, tern_common::RegionRecord>>,
    /// Set when `adopted` changed: the intents are loaded again.
    reload: std::sync::atomic::AtomicBool,
}

/// An intent record as read, with the revision its next write compares.
#[derive(Clone)]
struct Intent {
    id: MigrationId,
    record: MigrationRecord,
    revision: i64,
}

/// What a fence compare-and-swap in the source found.
enum Swapped {
    /// It held the expected value and now holds the new one, at this
    /// revision of the source group.
    Now(i64),
    /// It did not: the value it holds (None: no fence) and that value's
    /// revision.
    Found(Option<(Vec<u8>, i64)>),
}

impl Swapped {
    /// Whether the fence is `want`, by this swap or before it.
    fn is(&self, want: &Fence) -> bool {
        match self {
            Swapped::Now(_) => true,
            Swapped::Found(found) => found.as_ref().is_some_and(|(v, _)| v == want.to_string().as_bytes()),
        }
    }

    fn shown(&self) -> String {
        match self {
            Swapped::Now(_) => "as expected".into(),
            Swapped::Found(None) => "absent".into(),
            Swapped::Found(Some((v, _))) => String::from_utf8_lossy(v).into_owned(),
        }
    }
}

/// This region's fence of an account as read.
struct LocalFence {
    value: Option<Vec<u8>>,
    /// Holds while the fence stays as read.
    unchanged: Compare,
}

impl LocalFence {
    fn is(&self, want: &Fence) -> bool {
        self.value.as_deref() == Some(want.to_string().as_bytes())
    }
}

/// What the fence-and-copy steps leave for the switch: the keys copied and
/// the window (fenced revision, fenced at, landed at, Unix ms), each
/// unknown when an earlier attempt did that part.
struct Landed {
    keys: Option<usize>,
    window: Option<(i64, u64, u64)>,
}

/// Where a move's source keeps the account's fence. Usually the source
/// region's own group, reached through the mirror's connection. When the
/// source failed over to *this* region (a re-homing), the fence is the one
/// in this group's promoted mirror area of it, written under the
/// promotion marker and this agent's leadership: the source's group holds
/// nothing that counts any more. When it failed over to another region,
/// its group is not written at all (`failed`).
#[derive(Clone)]
struct SourceGroup {
    client: Client,
    /// The failed source whose promoted mirror area in this group holds
    /// the fence.
    promoted: Option<RegionName>,
    failed: bool,
    /// What every fence write into it must also compare: the promotion
    /// marker and this leadership for a promoted area, this leadership
    /// for this region's own group, nothing for another region's group.
    guards: Vec<Compare>,
}

impl SourceGroup {
    fn fence_key(&self, account: &AccountId) -> Vec<u8> {
        match &self.promoted {
            Some(source) => mirror_key(source, fence_key(account).as_bytes()),
            None => fence_key(account).into_bytes(),
        }
    }

    fn guards(&self) -> Vec<Compare> {
        self.guards.clone()
    }
}

/// Sets `account`'s fence in a source group from `from` to `to`, or reads
/// what it is instead: every fence write of a move is this one transaction.
async fn swap_fence(src: &SourceGroup, account: &AccountId, from: &Fence, to: &Fence) -> Result<Swapped> {
    let fence = src.fence_key(account);
    let mut when = vec![Compare::value(fence.clone(), CompareOp::Equal, from.to_string())];
    when.extend(src.guards());
    let resp = src
        .client
        .clone()
        .txn(
            Txn::new()
                .when(when)
                .and_then([TxnOp::put(fence.clone(), to.to_string(), None)])
                .or_else([TxnOp::get(fence, None)]),
        )
        .await
        .during(|| format!("setting {account}'s fence from {from} to {to}"))?;
    if resp.succeeded() {
        return Ok(Swapped::Now(resp.header().map_or(0, |h| h.revision())));
    }
    Ok(Swapped::Found(match resp.op_responses().first() {
        Some(etcd_client::TxnOpResponse::Get(g)) => g.kvs().first().map(|kv| (kv.value().to_vec(), kv.mod_revision())),
        _ => None,
    }))
}

impl Migrator {
    /// Loads the intents that target this region, then follows the
    /// directory's watch of them (a cache, as routers keep placements:
    /// no re-read of the whole prefix per change) and carries out the open
    /// ones, oldest first, up to [`PARALLEL_MOVES`] at a time: a move starts
    /// as soon as another finishes, not when a whole batch has. A watch that
    /// ends or is cancelled is set up again from a fresh load, while the
    /// moves under way go on. Returns only on an error that ends the
    /// leadership's loops.
    async fn serve(&self) -> Result<()> {
        use futures::StreamExt;
        let mut intents: BTreeMap<MigrationId, Intent> = BTreeMap::new();
        let mut stream: Option<etcd_client::WatchStream> = None;
        let mut running = futures::stream::FuturesUnordered::new();
        // Intents being driven, and when each may be driven again (a rate
        // limit, a failed step).
        let mut busy: std::collections::HashSet<MigrationId> = std::collections::HashSet::new();
        let mut not_before: BTreeMap<MigrationId, Instant> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut trimmed_at = Instant::now();
        loop {
            // A region newly failed over to this one: load the intents
            // again, with the moves into it.
            if self.reload.swap(false, std::sync::atomic::Ordering::Relaxed) {
                stream = None;
            }
            if stream.is_none() {
                match self.load().await {
                    Ok((loaded, s)) => {
                        intents = loaded;
                        stream = Some(s);
                    }
                    Err(e) => tracing::warn!(error = %e, "loading the migration intents failed; trying again"),
                }
            }
            if stream.is_some()
                && let Some(claim) = self.shared.claim()
            {
                let now = Instant::now();
                let mut ready: Vec<&Intent> = intents
                    .values()
                    .filter(|i| !i.record.phase.is_final() && !busy.contains(&i.id))
                    .filter(|i| not_before.get(&i.id).is_none_or(|t| *t <= now))
                    .collect();
                ready.sort_by_key(|i| i.record.requested_ms);
                for intent in ready.into_iter().take(PARALLEL_MOVES.saturating_sub(busy.len())) {
                    busy.insert(intent.id.clone());
                    let (mut intent, claim) = (intent.clone(), claim.clone());
                    running.push(async move {
                        let outcome = self.drive(&mut intent, &claim).await;
                        (intent, outcome)
                    });
                }
                // Trimming waits for a quiet moment: it is a directory
                // write per intent, and the moves under way are not polled
                // while it runs.
                if running.is_empty() && trimmed_at.elapsed() > Duration::from_secs(10) {
                    trimmed_at = Instant::now();
                    let finished: Vec<Intent> = intents
                        .values()
                        .filter(|i| i.record.phase.is_final())
                        .cloned()
                        .collect();
                    if let Err(e) = self.trim(finished, &claim).await {
                        tracing::warn!(error = %e, "trimming finished migrations failed; trying again later");
                    }
                }
            }
            let next_event = async {
                match stream.as_mut() {
                    Some(s) => s.message().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some((intent, outcome)) = running.next(), if !running.is_empty() => {
                    busy.remove(&intent.id);
                    match outcome {
                        Err(e @ (AgentError::NotLeader(_) | AgentError::Failpoint(_))) => return Err(e),
                        Err(e) => {
                            // The driven copy may hold changes that were
                            // never saved: it is dropped, and the cache (the
                            // watch's view) drives the next attempt.
                            tracing::warn!(migration = %intent.id, error = %e, "a migration step failed; trying again");
                            not_before.insert(intent.id.clone(), Instant::now() + Duration::from_millis(200));
                        }
                        Ok(()) => {
                            if intent.record.phase.is_final() {
                                not_before.remove(&intent.id);
                            } else {
                                // Held back (rate limit): again within a second.
                                not_before.insert(intent.id.clone(), Instant::now() + Duration::from_secs(1));
                            }
                            // What this agent saved, unless the watch
                            // brought newer.
                            let newer = intents.get(&intent.id).is_none_or(|known| known.revision <= intent.revision);
                            if newer {
                                intents.insert(intent.id.clone(), intent);
                            }
                        }
                    }
                }
                message = next_event => {
                    match message {
                        Ok(Some(message)) if !message.canceled() => {
                            for event in message.events() {
                                let Some(kv) = event.kv() else { continue };
                                let value = match event.event_type() {
                                    etcd_client::EventType::Put => Some((kv.value(), kv.mod_revision())),
                                    etcd_client::EventType::Delete => None,
                                };
                                self.apply(&mut intents, kv.key(), value);
                            }
                        }
                        // Ended or cancelled (a compaction, say): load again.
                        _ => {
                            tracing::info!("the watch of migration intents ended; loading them again");
                            stream = None;
                        }
                    }
                }
                _ = tick.tick() => {}
            }
        }
    }

    /// Every intent that targets this region, and a watch from just after
    /// the revision they were read at.
    async fn load(&self) -> Result<(BTreeMap<MigrationId, Intent>, etcd_client::WatchStream)> {
        let resp = self
            .directory
            .clone()
            .get(DIR_MIGRATIONS, Some(GetOptions::new().with_prefix()))
            .await
            .during(|| "reading migration intents".into())?;
        let loaded_at = resp.header().map_or(0, |h| h.revision());
        let mut intents = BTreeMap::new();
        for kv in resp.kvs() {
            self.apply(&mut intents, kv.key(), Some((kv.value(), kv.mod_revision())));
        }
        let stream = self
            .directory
            .clone()
            .watch(
                DIR_MIGRATIONS,
                Some(WatchOptions::new().with_prefix().with_start_revision(loaded_at + 1)),
            )
            .await
            .during(|| "watching migration intents".into())?;
        Ok((intents, stream))
    }

    /// Folds one intent key (None: deleted) into `intents`, keeping only
    /// those that target this region and never going back to an older
    /// revision.
    fn apply(&self, intents: &mut BTreeMap<MigrationId, Intent>, key: &[u8], value: Option<(&[u8], i64)>) {
        let Some(id) = tern_common::migration_of_dir_key(key) else {
            return;
        };
        let Some((value, revision)) = value else {
            intents.remove(&id);
            return;
        };
        let record: MigrationRecord = match serde_json::from_slice(value) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(migration = %id, error = %e, "ignoring a malformed migration intent");
                return;
            }
        };
        let adopted = self
            .adopted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&record.target);
        if record.target != self.shared.region && !adopted {
            return;
        }
        if intents.get(&id).is_some_and(|known| known.revision > revision) {
            return;
        }
        intents.insert(id.clone(), Intent { id, record, revision });
    }

    /// Reads every region's record into the cache, and which regions failed
    /// over to this one (flagging a reload when that changed).
    async fn refresh_regions(&self) {
        let resp = match self
            .directory
            .clone()
            .get(tern_common::DIR_REGIONS, Some(GetOptions::new().with_prefix()))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "reading the region records failed");
                return;
            }
        };
        let records: BTreeMap<RegionName, tern_common::RegionRecord> = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let region = tern_common::region_of_dir_key(kv.key(), tern_common::DIR_REGIONS)?;
                Some((region, serde_json::from_slice(kv.value()).ok()?))
            })
            .collect();
        let here: std::collections::BTreeSet<RegionName> = records
            .iter()
            .filter(|(_, r)| {
                r.state == tern_common::RegionState::Failed && r.successor.as_ref() == Some(&self.shared.region)
            })
            .map(|(region, _)| region.clone())
            .collect();
        *self.regions.lock().unwrap_or_else(|e| e.into_inner()) = records;
        let mut adopted = self.adopted.lock().unwrap_or_else(|e| e.into_inner());
        if *adopted != here {
            *adopted = here;
            self.reload.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// `region`'s record from the cache, else from the directory.
    async fn region_record(&self, region: &RegionName) -> Result<Option<tern_common::RegionRecord>> {
        if let Some(r) = self.regions.lock().unwrap_or_else(|e| e.into_inner()).get(region) {
            return Ok(Some(r.clone()));
        }
        let key = tern_common::dir_region_key(region);
        let found = self
            .directory
            .clone()
            .get(key.clone(), None)
            .await
            .during(|| format!("reading {key}"))?;
        Ok(found
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
    }

    /// Takes one intent through its steps until it is final or must wait.
    async fn drive(&self, i: &mut Intent, claim: &Claim) -> Result<()> {
        if i.record.target != self.shared.region {
            return self.settle_adopted(i, claim).await;
        }
        loop {
            let next = match i.record.phase {
                MigrationPhase::Requested => self.start(i, claim).await?,
                MigrationPhase::Fencing => self.fence_copy_switch(i, claim).await?,
                MigrationPhase::Switching => self.mark_moved(i, claim).await?,
                MigrationPhase::RollingBack => self.roll_back(i, claim).await?,
                MigrationPhase::Completed | MigrationPhase::RolledBack | MigrationPhase::Refused => return Ok(()),
            };
            if matches!(next, Next::Later) {
                return Ok(());
            }
        }
    }

    fn failpoint(&self, name: &str) -> Result<()> {
        if self.shared.failpoint(name) {
            tracing::warn!(failpoint = name, "failpoint reached: stopping as if crashed");
            return Err(AgentError::Failpoint(name.into()));
        }
        Ok(())
    }

    fn fail(&self, i: &Intent, reason: impl Into<String>) -> AgentError {
        AgentError::Migration {
            id: i.id.to_string(),
            reason: reason.into(),
        }
    }

    /// Writes the intent (and `also`) if it is still as read and this agent
    /// still holds the region's directory lease.
    async fn save(&self, i: &mut Intent, claim: &Claim, extra: Vec<Compare>, also: Vec<TxnOp>) -> Result<bool> {
        let key = dir_migration_key(&i.id);
        let value = serde_json::to_string(&i.record).map_err(|e| self.fail(i, e.to_string()))?;
        let mut when = vec![
            claim.guard(),
            Compare::mod_revision(key.clone(), CompareOp::Equal, i.revision),
        ];
        when.extend(extra);
        let mut then = vec![TxnOp::put(key, value, None)];
        then.extend(also);
        let resp = self
            .directory
            .clone()
            .txn(Txn::new().when(when).and_then(then))
            .await
            .during(|| format!("writing migration {}", i.id))?;
        if resp.succeeded() {
            i.revision = resp.header().map_or(0, |h| h.revision());
        }
        Ok(resp.succeeded())
    }

    /// Ends a move before anything changed, saying why.
    async fn refuse(&self, i: &mut Intent, claim: &Claim, why: String) -> Result<Next> {
        self.refuse_when(i, claim, why, vec![]).await
    }

    /// [`Self::refuse`], only while `when` holds in the directory too.
    async fn refuse_when(&self, i: &mut Intent, claim: &Claim, why: String, when: Vec<Compare>) -> Result<Next> {
        i.record.phase = MigrationPhase::Refused;
        i.record.finished_ms = Some(tern_common::unix_ms());
        i.record.message = Some(why.clone());
        if !self.save(i, claim, when, vec![]).await? {
            return Err(self.fail(i, "the intent or what the refusal rests on changed under the agent"));
        }
        tracing::warn!(migration = %i.id, account = %i.record.account, to = %i.record.target, reason = %why, "migration refused");
        self.shared
            .metrics
            .migrations
            .get_or_create(&crate::metrics::Metrics::outcome("refused"))
            .inc();
        Ok(Next::Go)
    }

    /// `requested` → `fencing`: checks the move and marks the account
    /// `migrating` in the same directory transaction as the intent.
    async fn start(&self, i: &mut Intent, claim: &Claim) -> Result<Next> {
        let account_key = dir_account_key(&i.record.account);
        let resp = self
            .directory
            .clone()
            .get(account_key.clone(), None)
            .await
            .during(|| format!("reading the placement of {}", i.record.account))?;
        let Some(kv) = resp.kvs().first() else {
            let why = format!("account {} does not exist", i.record.account);
            return self.refuse(i, claim, why).await;
        };
        let account_revision = kv.mod_revision();
        let placement: AccountRecord = serde_json::from_slice(kv.value()).map_err(|e| AgentError::Malformed {
            key: account_key.clone(),
            detail: e.to_string(),
        })?;
        let target = self.shared.region.clone();
        let home = placement.home.clone();
        if let AccountState::Migrating { target: other } = &placement.state {
            let why = format!("account {} is already moving from {home} to {other}", i.record.account);
            return self.refuse(i, claim, why).await;
        }
        if home == target {
            let why = format!("account {} is already homed in {target}", i.record.account);
            return self.refuse(i, claim, why).await;
        }
        if let Some(expected) = &i.record.expected_source
            && *expected != home
        {
            let why = format!(
                "account {} is homed in {home}, not in {expected} as the request expects",
                i.record.account
            );
            return self.refuse(i, claim, why).await;
        }
        // Where the home's lease key says its accounts are served: a
        // failed-over home's successor serves them from its mirror area.
        let lease_key = dir_lease_key(&home);
        let lease = self
            .directory
            .clone()
            .get(lease_key.clone(), None)
            .await
            .during(|| format!("reading {lease_key}"))?;
        let lease_created = lease.kvs().first().map_or(0, |kv| kv.create_revision());
        let failed_over_to = lease
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<RegionLease>(kv.value()).ok())
            .and_then(|l| l.failed_over_to);
        // Re-homing: the successor moves the account from its promoted
        // mirror area into its own home area. The data is here already, so
        // residency and the mirror's health do not enter into it.
        let rehoming = failed_over_to.as_deref() == Some(target.as_str());
        if !rehoming && !placement.allowed_regions.is_empty() && !placement.allowed_regions.contains(&target) {
            let allowed: Vec<String> = placement.allowed_regions.iter().map(ToString::to_string).collect();
            let why = format!(
                "{target} is not among account {}'s allowed regions [{}] (data residency)",
                i.record.account,
                allowed.join(", ")
            );
            return self.refuse(i, claim, why).await;
        }
        // From the cache (a drain set within the last second may let a move
        // in; the drain moves it out again), confirmed from the directory
        // before refusing (an undrain a moment ago lets it in).
        let cached = self
            .region_record(&target)
            .await?
            .is_some_and(|r| r.state != tern_common::RegionState::Active);
        let draining = cached && {
            let key = tern_common::dir_region_key(&target);
            self.directory
                .clone()
                .get(key.clone(), None)
                .await
                .during(|| format!("reading {key}"))?
                .kvs()
                .first()
                .and_then(|kv| serde_json::from_slice::<tern_common::RegionRecord>(kv.value()).ok())
                .is_some_and(|r| r.state != tern_common::RegionState::Active)
        };
        if draining {
            let why =
                format!("{target} is draining: it takes no accounts until it is undrained (`tern undrain {target}`)");
            return self.refuse(i, claim, why).await;
        }
        if !self.sources.contains_key(&home) {
            let why = format!("{target} does not mirror {home}");
            return self.refuse(i, claim, why).await;
        }
        // A failed-over home no longer holds the account's truth: its
        // successor writes it, in an area only the successor has. So only
        // the successor moves it (`tern verify` found a move copying the
        // failed region's stale data over what the successor had
        // acknowledged). The start compares the home's lease key as read,
        // so a failover in between (which requires the key gone and leaves
        // a tombstone) makes it fail.
        if let Some(successor) = &failed_over_to
            && !rehoming
        {
            let why = format!(
                "account {}'s home region {home} failed over to {successor}, which serves it; only {successor} can take it over (it re-homes such accounts by itself)",
                i.record.account
            );
            return self.refuse(i, claim, why).await;
        }
        let mirror = self.shared.mirror_statuses().remove(home.as_str());
        let healthy = rehoming
            || mirror.as_ref().is_some_and(|m| {
                m.state == MirrorState::Streaming && m.lag_ms <= self.settings.max_lag.as_millis() as u64
            });
        if !healthy {
            let why = match mirror {
                Some(m) if m.lag_ms == u64::MAX => {
                    format!(
                        "{target}'s mirror of {home} is {:?} and its lag is not measured yet",
                        m.state
                    )
                }
                Some(m) => format!(
                    "{target}'s mirror of {home} is {:?} with a lag of {} ms (at most {} ms to start a move)",
                    m.state,
                    m.lag_ms,
                    self.settings.max_lag.as_millis()
                ),
                None => format!("{target}'s mirror of {home} has not started"),
            };
            return self.refuse(i, claim, why).await;
        }
        // A drain's moves are paced by the drain, at the source; a
        // re-homing is local.
        if !rehoming && !i.id.as_str().starts_with(tern_common::DRAIN_MIGRATION_PREFIX) {
            let window = Duration::from_secs(60);
            let mut started = self.started.lock().unwrap_or_else(|e| e.into_inner());
            while started.front().is_some_and(|t| t.elapsed() > window) {
                started.pop_front();
            }
            if started.len() >= self.settings.per_minute as usize {
                tracing::info!(migration = %i.id, account = %i.record.account, "migration waits: {} moves into {target} in the last minute", started.len());
                return Ok(Next::Later);
            }
            // Counted now: moves start concurrently.
            started.push_back(Instant::now());
        }
        let migrating = AccountRecord {
            state: AccountState::Migrating { target: target.clone() },
            ..placement.clone()
        };
        i.record.phase = MigrationPhase::Fencing;
        i.record.placement = Some(migrating.clone());
        i.record.source = Some(home.clone());
        i.record.source_epoch = Some(placement.epoch);
        i.record.started_ms = Some(tern_common::unix_ms());
        i.record.message = Some(format!("moving from {home} at epoch {}", placement.epoch));
        let account_value = serde_json::to_string(&migrating).map_err(|e| self.fail(i, e.to_string()))?;
        let saved = self
            .save(
                i,
                claim,
                vec![
                    Compare::mod_revision(account_key.clone(), CompareOp::Equal, account_revision),
                    Compare::create_revision(lease_key, CompareOp::Equal, lease_created),
                ],
                vec![TxnOp::put(account_key, account_value, None)],
            )
            .await?;
        if !saved {
            return Err(self.fail(i, "the intent or the account's placement changed under the agent"));
        }
        tracing::info!(migration = %i.id, account = %i.record.account, from = %home, to = %target, epoch = placement.epoch.0, reason = %i.record.reason, "migration started");
        self.failpoint("migrate.after-directory")?;
        Ok(Next::Go)
    }

    /// The source, its epoch and where its fence is, as the intent names
    /// them and the directory says the source is (failed over to here, to
    /// another region, or not).
    async fn source(&self, i: &Intent) -> Result<(RegionName, Epoch, SourceGroup)> {
        let (Some(source), Some(epoch)) = (i.record.source.clone(), i.record.source_epoch) else {
            return Err(self.fail(i, "the intent names no source"));
        };
        // From the cache: a failover it has not seen yet makes the step
        // fail against the lost region and be tried again.
        let record = self.region_record(&source).await?;
        if let Some(r) = record
            && r.state == tern_common::RegionState::Failed
        {
            if r.successor.as_ref() == Some(&self.shared.region) {
                return Ok((
                    source.clone(),
                    epoch,
                    SourceGroup {
                        client: self.local.clone(),
                        guards: vec![
                            Compare::value(promotion_key(&source), CompareOp::Equal, r.region_epoch.to_string()),
                            self.leadership.guard(),
                        ],
                        promoted: Some(source),
                        failed: false,
                    },
                ));
            }
            if let Some(client) = self.sources.get(&source) {
                return Ok((
                    source,
                    epoch,
                    SourceGroup {
                        client: client.clone(),
                        promoted: None,
                        failed: true,
                        guards: Vec::new(),
                    },
                ));
            }
        }
        let client = self
            .sources
            .get(&source)
            .cloned()
            .ok_or_else(|| self.fail(i, format!("{} does not mirror {source}", self.shared.region)))?;
        Ok((
            source,
            epoch,
            SourceGroup {
                client,
                promoted: None,
                failed: false,
                guards: Vec::new(),
            },
        ))
    }

    /// This region's fence of `account` as read: its value and a compare
    /// that holds while it stays so (no fence: while there is none).
    async fn local_fence(&self, account: &AccountId) -> Result<LocalFence> {
        let key = fence_key(account);
        let resp = self
            .local
            .clone()
            .get(key.clone(), None)
            .await
            .during(|| format!("reading {account}'s fence here"))?;
        Ok(match resp.kvs().first() {
            Some(kv) => LocalFence {
                value: Some(kv.value().to_vec()),
                unchanged: Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision()),
            },
            None => LocalFence {
                value: None,
                unchanged: Compare::version(key, CompareOp::Equal, 0),
            },
        })
    }

    /// `fencing` → `completed` (or `rolling_back` before the copy landed).
    async fn fence_copy_switch(&self, i: &mut Intent, claim: &Claim) -> Result<Next> {
        let (source, epoch, client) = self.source(i).await?;
        let account = i.record.account.clone();
        let target_epoch = epoch.next();
        let here = self.local_fence(&account).await?;
        let landed = here.is(&Fence::active(target_epoch));
        let Landed { keys, window } = if landed {
            // An earlier attempt got past the point of no return; the
            // window it measured died with it.
            tracing::info!(migration = %i.id, account = %account, "the copy landed in an earlier attempt: finishing the move");
            Landed {
                keys: None,
                window: None,
            }
        } else {
            match self
                .fence_and_copy(i, claim, &source, epoch, &client, here.unchanged)
                .await?
            {
                Ok(done) => done,
                Err(next) => return Ok(next),
            }
        };
        // Step 6 before 5: routers that reach the source learn where the
        // account went for certain, whatever their directory cache says.
        self.mark_source_moved(i, &source, epoch, &client).await?;
        self.failpoint("migrate.after-moved")?;
        // Step 5: the directory names this region.
        let account_key = dir_account_key(&account);
        // The placement as the start wrote it (kept in the intent, so no
        // directory read is needed); compared by value.
        let migrating = match i.record.placement.clone() {
            Some(p) => p,
            None => {
                let current = self
                    .directory
                    .clone()
                    .get(account_key.clone(), None)
                    .await
                    .during(|| format!("reading the placement of {account}"))?;
                match current.kvs().first().map(|kv| serde_json::from_slice(kv.value())) {
                    Some(Ok(p)) => p,
                    _ => return Err(self.fail(i, format!("the placement of {account} vanished"))),
                }
            }
        };
        let expected_migrating = AccountRecord {
            home: source.clone(),
            epoch,
            state: AccountState::Migrating {
                target: self.shared.region.clone(),
            },
            ..migrating.clone()
        };
        if migrating != expected_migrating {
            return Err(self.fail(
                i,
                format!("the placement of {account} is {migrating:?}, not migrating from {source}"),
            ));
        }
        let switched = AccountRecord {
            home: self.shared.region.clone(),
            epoch: target_epoch,
            state: AccountState::Active,
            moved_ms: Some(tern_common::unix_ms()),
            ..migrating.clone()
        };
        i.record.phase = MigrationPhase::Completed;
        if let Some((fenced_revision, fenced_ms, landed_ms)) = window {
            i.record.fenced_revision = Some(fenced_revision);
            i.record.fenced_ms = Some(fenced_ms);
            i.record.unavailable_ms = Some(landed_ms.saturating_sub(fenced_ms));
        }
        i.record.message = Some(match keys {
            Some(keys) => format!(
                "{keys} keys copied; homed in {} at epoch {target_epoch}",
                self.shared.region
            ),
            None => format!("homed in {} at epoch {target_epoch}", self.shared.region),
        });
        let expected_value = serde_json::to_string(&expected_migrating).map_err(|e| self.fail(i, e.to_string()))?;
        let switched_value = serde_json::to_string(&switched).map_err(|e| self.fail(i, e.to_string()))?;
        let now = tern_common::unix_ms();
        i.record.switched_ms = Some(now);
        i.record.finished_ms = Some(now);
        let saved = self
            .save(
                i,
                claim,
                vec![Compare::value(account_key.clone(), CompareOp::Equal, expected_value)],
                vec![TxnOp::put(account_key, switched_value, None)],
            )
            .await?;
        if !saved {
            return Err(self.fail(i, "the intent or the account's placement changed under the agent"));
        }
        self.completed(i, &source);
        self.failpoint("migrate.after-switch")?;
        Ok(Next::Go)
    }

    /// Steps 2–4: fence the source, wait for this region's mirror to reach
    /// the fence, copy. `Ok(Ok((keys, window)))` once the copy landed, the
    /// window (fenced revision, fenced at, landed at) only when this attempt
    /// set the fence; `Ok(Err(next))` when the move is being rolled back
    /// instead.
    async fn fence_and_copy(
        &self,
        i: &mut Intent,
        claim: &Claim,
        source: &RegionName,
        epoch: Epoch,
        client: &SourceGroup,
        here_unchanged: Compare,
    ) -> Result<std::result::Result<Landed, Next>> {
        let account = i.record.account.clone();
        let fence = client.fence_key(&account);
        if client.failed {
            // Its successor serves the account now, from a mirror that may
            // hold less than this one: the move cannot go on from here.
            let why = format!("{source} failed over before {account}'s copy landed here");
            return Ok(Err(self.begin_roll_back(i, claim, why).await?));
        }
        let fenced_at = tern_common::unix_ms();
        // Step 2: fence the source (or find it fenced by an earlier attempt,
        // whose start of the window is not known here). A fence found set
        // is written again, compared on its revision: the write makes it
        // this attempt's, so anything that read the old one (a stray-fence
        // repair) can no longer swap it, and the mirror waits for it.
        let (fenced_revision, fenced_at) = match swap_fence(
            client,
            &account,
            &Fence::active(epoch),
            &Fence::fenced(epoch),
        )
        .await?
        {
            Swapped::Now(revision) => (revision, Some(fenced_at)),
            Swapped::Found(Some((value, revision))) if value == Fence::fenced(epoch).to_string().as_bytes() => {
                let mut when = vec![Compare::mod_revision(fence.clone(), CompareOp::Equal, revision)];
                when.extend(client.guards());
                let resp = client
                    .client
                    .clone()
                    .txn(Txn::new().when(when).and_then([TxnOp::put(
                        fence.clone(),
                        Fence::fenced(epoch).to_string(),
                        None,
                    )]))
                    .await
                    .during(|| format!("taking over {account}'s fence in {source}"))?;
                if !resp.succeeded() {
                    return Err(self.fail(i, format!("{account}'s fence in {source} changed while taken over")));
                }
                (resp.header().map_or(revision, |h| h.revision()), None)
            }
            // Re-homing an account this region's mirror never held at
            // E (created in, or moved into, the failed region after the
            // mirror's last revision): everything it had at E is in the
            // failed region's quarantine, and no router can write it
            // here (its guard needs that fence). It is re-homed empty,
            // so that it takes writes again and the region can rejoin.
            Swapped::Found(found)
                if client.promoted.is_some()
                    && found
                        .as_ref()
                        .is_none_or(|(v, _)| Fence::parse(v).is_ok_and(|f| f.epoch < epoch)) =>
            {
                tracing::warn!(
                    migration = %i.id, account = %account, from = %source, epoch = epoch.0,
                    "this region's mirror never held the account at its epoch: re-homed empty (its writes are in {source}'s quarantine)"
                );
                let keys = self.copy(i, source, epoch.next(), here_unchanged, true).await?;
                return Ok(Ok(Landed {
                    keys: Some(keys),
                    window: None,
                }));
            }
            other => {
                let why = format!(
                    "{account}'s fence in {source} is {}, not {}",
                    other.shown(),
                    Fence::active(epoch)
                );
                return Ok(Err(self.begin_roll_back(i, claim, why).await?));
            }
        };
        self.failpoint("migrate.after-fence")?;
        // Step 3: this region's mirror of the source reaches the fence
        // (a promoted area is the fence's own group: nothing to wait for).
        let deadline = Instant::now() + self.settings.catch_up_timeout;
        while client.promoted.is_none() {
            let applied = self.shared.with_mirror(source, |m| m.applied);
            if applied.0 >= fenced_revision {
                break;
            }
            if Instant::now() > deadline {
                let why = format!(
                    "{}'s mirror of {source} did not reach the fence's revision {fenced_revision} within {:?} (applied {})",
                    self.shared.region, self.settings.catch_up_timeout, applied
                );
                return Ok(Err(self.begin_roll_back(i, claim, why).await?));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mirrored_fence = mirror_key(source, fence_key(&account).as_bytes());
        let mirrored = self
            .local
            .clone()
            .get(mirrored_fence, None)
            .await
            .during(|| format!("reading the mirrored fence of {account}"))?;
        let value = mirrored.kvs().first().map(|kv| kv.value().to_vec());
        if value.as_deref() != Some(Fence::fenced(epoch).to_string().as_bytes()) {
            let why = format!(
                "the mirror of {source} holds {account}'s fence as {}, not {}",
                value.map_or("absent".into(), |v| String::from_utf8_lossy(&v).into_owned()),
                Fence::fenced(epoch)
            );
            return Ok(Err(self.begin_roll_back(i, claim, why).await?));
        }
        self.failpoint("migrate.after-catch-up")?;
        // Step 4: copy into this region's home area, the fence last.
        let keys = self.copy(i, source, epoch.next(), here_unchanged, false).await?;
        // Writes commit here from now on: the window ends.
        let landed_at = tern_common::unix_ms();
        tracing::info!(
            migration = %i.id, account = %account, from = %source, to = %self.shared.region,
            epoch = epoch.next().0, keys, unavailable_ms = ?fenced_at.map(|f| landed_at.saturating_sub(f)),
            "migration landed: the account takes writes here"
        );
        self.failpoint("migrate.after-copy")?;
        Ok(Ok(Landed {
            keys: Some(keys),
            window: fenced_at.map(|f| (fenced_revision, f, landed_at)),
        }))
    }

    /// Logs and counts a completed move.
    fn completed(&self, i: &Intent, source: &RegionName) {
        tracing::info!(migration = %i.id, account = %i.record.account, from = %source, to = %self.shared.region, unavailable_ms = ?i.record.unavailable_ms, "migration completed");
        self.shared
            .metrics
            .migrations
            .get_or_create(&crate::metrics::Metrics::outcome("completed"))
            .inc();
        if let Some(ms) = i.record.unavailable_ms {
            self.shared.metrics.migration_unavailable_ms.set(ms as i64);
        }
    }

    /// Copies the account from the mirror area into this region's home
    /// area: what an earlier attempt left is deleted first, the fence
    /// `E+1:active` is written in the last transaction. The first
    /// transaction holds only while this region's fence is as the attempt
    /// read it (`here_unchanged`), the later ones while there is none: a
    /// landing of an earlier attempt still on its way (a cancelled step)
    /// makes them fail instead of deleting or overwriting what writes
    /// committed after it. Returns the keys copied.
    async fn copy(
        &self,
        i: &Intent,
        source: &RegionName,
        target_epoch: Epoch,
        here_unchanged: Compare,
        empty: bool,
    ) -> Result<usize> {
        let account = &i.record.account;
        let home_prefix = account_prefix(account);
        let mirrored_prefix = String::from_utf8_lossy(&mirror_key(source, home_prefix.as_bytes())).into_owned();
        let strip = mirror_key(source, b"").len();
        let fence = fence_key(account);
        let mut pages = Pages::prefix(&mirrored_prefix, 1000);
        let mut items: Vec<(String, Vec<u8>)> = Vec::new();
        let mut local = self.local.clone();
        while let Some(page) = pages
            .next(&mut local)
            .await
            .during(|| format!("reading the mirrored keys of {account}"))?
        {
            for kv in page.kvs() {
                let key = String::from_utf8_lossy(&kv.key()[strip..]).into_owned();
                if key != fence && !empty {
                    items.push((key, kv.value().to_vec()));
                }
            }
        }
        // Idempotency records get leases for what is left of their
        // retention, shared per minute of TTL.
        let now = tern_common::unix_ms();
        let mut leases: BTreeMap<i64, i64> = BTreeMap::new();
        let mut ops: Vec<(TxnOp, usize)> = Vec::new();
        let mut copied = 0;
        for (key, value) in &items {
            let mut options = None;
            if key.contains("/idem/") {
                let expires = serde_json::from_slice::<serde_json::Value>(value)
                    .ok()
                    .and_then(|v| v.get("expires_ms")?.as_u64());
                let left_ms = match expires {
                    Some(e) if e <= now => continue,
                    Some(e) => e - now,
                    None => DEFAULT_RETENTION.as_millis() as u64,
                };
                let ttl = (left_ms as i64 / 1000 + 1).div_euclid(LEASE_STEP_SECS) * LEASE_STEP_SECS + LEASE_STEP_SECS;
                let lease = match leases.get(&ttl) {
                    Some(l) => *l,
                    None => {
                        let l = local
                            .lease_grant(ttl, None)
                            .await
                            .during(|| format!("granting a lease for {account}'s idempotency records"))?
                            .id();
                        leases.insert(ttl, l);
                        l
                    }
                };
                options = Some(etcd_client::PutOptions::new().with_lease(lease));
            }
            ops.push((
                TxnOp::put(key.clone(), value.clone(), options),
                key.len() + value.len() + 16,
            ));
            copied += 1;
        }
        let fence_op = TxnOp::put(fence.clone(), Fence::active(target_epoch).to_string(), None);
        // etcd refuses a transaction that deletes a range and puts a key
        // inside it: the delete goes first, on its own.
        let mut txns: Vec<Vec<TxnOp>> = vec![
            vec![TxnOp::delete(
                home_prefix.clone(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )],
            Vec::new(),
        ];
        let mut bytes = 0;
        for (op, size) in ops {
            let full = txns
                .last()
                .is_some_and(|t| t.len() >= COPY_OPS - 1 || bytes + size > COPY_BYTES);
            if full {
                txns.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            if let Some(t) = txns.last_mut() {
                t.push(op);
            }
        }
        // The fence last: with the rest where it fits.
        match txns.last_mut() {
            Some(t) if t.len() < COPY_OPS - 1 && bytes + 64 < COPY_BYTES => t.push(fence_op),
            _ => txns.push(vec![fence_op]),
        }
        let count = txns.len();
        let mut unchanged = here_unchanged;
        for (n, then) in txns.into_iter().enumerate() {
            let resp = local
                .txn(
                    Txn::new()
                        .when([self.leadership.guard(), unchanged.clone()])
                        .and_then(then),
                )
                .await
                .during(|| format!("copying {account} ({}/{count})", n + 1))?;
            if !resp.succeeded() {
                // The election key or the fence changed: the next attempt
                // reads the fence again (a lost leadership ends the loops
                // anyway).
                return Err(self.fail(
                    i,
                    format!("a copy of {account} was refused: the election key or its fence here changed"),
                ));
            }
            unchanged = Compare::version(fence.clone(), CompareOp::Equal, 0);
            if n == 1 && count > 2 {
                self.failpoint("migrate.mid-copy")?;
            }
        }
        Ok(copied)
    }

    /// The source's fence: `E:fenced` → `E:moved:T`. Past the landing the
    /// source must not take writes: an active fence there (unfenced behind
    /// the move's back) is closed too, and what it may have committed since
    /// the fence is reported.
    async fn mark_source_moved(
        &self,
        i: &Intent,
        source: &RegionName,
        epoch: Epoch,
        client: &SourceGroup,
    ) -> Result<()> {
        let account = &i.record.account;
        if client.failed {
            // No router of a failed-over region writes (its lease is a
            // tombstone); its fences are retired when it rejoins.
            tracing::info!(migration = %i.id, account = %account, source = %source, "the source failed over: its fence is not marked");
            return Ok(());
        }
        let moved = Fence::moved(epoch, self.shared.region.clone());
        let swapped = swap_fence(client, account, &Fence::fenced(epoch), &moved).await?;
        if swapped.is(&moved) {
            return Ok(());
        }
        let reopened =
            matches!(&swapped, Swapped::Found(Some((v, _))) if v == Fence::active(epoch).to_string().as_bytes());
        if reopened
            && swap_fence(client, account, &Fence::active(epoch), &moved)
                .await?
                .is(&moved)
        {
            let note = format!(
                "{account} was active again in {source} after its move to {} landed; closed now. Writes committed in {source} after the fence may be missing in {}",
                self.shared.region, self.shared.region
            );
            tracing::error!(migration = %i.id, account = %account, "{note}");
            if let Some(events) = &self.shared.events {
                events.warning("MoveSourceReopened", "Migrate", note).await;
            }
        } else {
            tracing::warn!(migration = %i.id, account = %account, found = %swapped.shown(), "the source's fence was neither fenced nor moved; left as it is");
        }
        Ok(())
    }

    /// `switching` → `completed`: the source's fence says where the account
    /// went. Only intents left by an agent that switched the directory
    /// before marking the source (before the marker moved ahead of the
    /// switch) are in this phase.
    async fn mark_moved(&self, i: &mut Intent, claim: &Claim) -> Result<Next> {
        let (source, epoch, client) = self.source(i).await?;
        self.mark_source_moved(i, &source, epoch, &client).await?;
        self.failpoint("migrate.after-moved")?;
        i.record.phase = MigrationPhase::Completed;
        i.record.finished_ms = Some(tern_common::unix_ms());
        if !self.save(i, claim, vec![], vec![]).await? {
            return Err(self.fail(i, "the intent changed under the agent"));
        }
        self.completed(i, &source);
        Ok(Next::Go)
    }

    async fn begin_roll_back(&self, i: &mut Intent, claim: &Claim, why: String) -> Result<Next> {
        tracing::warn!(migration = %i.id, account = %i.record.account, reason = %why, "rolling the migration back");
        i.record.phase = MigrationPhase::RollingBack;
        i.record.message = Some(why);
        if !self.save(i, claim, vec![], vec![]).await? {
            return Err(self.fail(i, "the intent changed under the agent"));
        }
        Ok(Next::Go)
    }

    /// `rolling_back` → `rolled_back`: what the move wrote here goes, the
    /// source is unfenced, the directory names the source again.
    async fn roll_back(&self, i: &mut Intent, claim: &Claim) -> Result<Next> {
        let (source, epoch, client) = self.source(i).await?;
        let account = i.record.account.clone();
        let here = self.local_fence(&account).await?;
        if here.is(&Fence::active(epoch.next())) {
            // Past the point of no return (writes may have committed
            // here): deleting the copy would lose them. Forward instead.
            tracing::error!(migration = %i.id, account = %account, "a rollback found the copy landed: finishing the move instead");
            i.record.phase = MigrationPhase::Fencing;
            if !self.save(i, claim, vec![], vec![]).await? {
                return Err(self.fail(i, "the intent changed under the agent"));
            }
            return Ok(Next::Go);
        }
        let resp = self
            .local
            .clone()
            .txn(
                Txn::new()
                    .when([self.leadership.guard(), here.unchanged])
                    .and_then([TxnOp::delete(
                        account_prefix(&account),
                        Some(etcd_client::DeleteOptions::new().with_prefix()),
                    )]),
            )
            .await
            .during(|| format!("removing the partial copy of {account}"))?;
        if !resp.succeeded() {
            return Err(self.fail(i, "a rollback was refused: the election key or the fence here changed"));
        }
        // A failed-over source is not written: its successor re-homes the
        // account, fencing it there again if its mirror holds the fence.
        let swapped = if client.failed {
            Swapped::Now(0)
        } else {
            swap_fence(&client, &account, &Fence::fenced(epoch), &Fence::active(epoch)).await?
        };
        if !swapped.is(&Fence::active(epoch)) {
            tracing::warn!(migration = %i.id, account = %account, found = %swapped.shown(), "the source's fence was not as the rollback expects; left as it is");
        }
        let account_key = dir_account_key(&account);
        let current = self
            .directory
            .clone()
            .get(account_key.clone(), None)
            .await
            .during(|| format!("reading the placement of {account}"))?;
        let mut also = Vec::new();
        let mut extra = Vec::new();
        if let Some(kv) = current.kvs().first()
            && let Ok(p) = serde_json::from_slice::<AccountRecord>(kv.value())
            && p.home == source
            && p.epoch == epoch
            && matches!(&p.state, AccountState::Migrating { target } if *target == self.shared.region)
        {
            let restored = AccountRecord {
                state: AccountState::Active,
                ..p
            };
            extra.push(Compare::mod_revision(
                account_key.clone(),
                CompareOp::Equal,
                kv.mod_revision(),
            ));
            also.push(TxnOp::put(
                account_key,
                serde_json::to_string(&restored).map_err(|e| self.fail(i, e.to_string()))?,
                None,
            ));
        }
        i.record.phase = MigrationPhase::RolledBack;
        i.record.finished_ms = Some(tern_common::unix_ms());
        if !self.save(i, claim, extra, also).await? {
            return Err(self.fail(i, "the intent or the account's placement changed under the agent"));
        }
        tracing::warn!(migration = %i.id, account = %account, source = %source, reason = i.record.message.as_deref().unwrap_or(""), "migration rolled back: the account stays in its source");
        self.shared
            .metrics
            .migrations
            .get_or_create(&crate::metrics::Metrics::outcome("rolled_back"))
            .inc();
        Ok(Next::Go)
    }

    /// A move into a region that failed over to this one, left unfinished
    /// (its executor was the failed region's agent). What this region's
    /// promoted mirror of the target holds decides: if the copy's landing
    /// `E+1:active` is there, the move happened as far as anything this
    /// region serves is concerned, and it is finished (the source marked
    /// moved, the directory naming the failed target at E+1, served here
    /// and then re-homed); otherwise it is rolled back (the source
    /// unfenced, the directory naming it again). Writes the failed target
    /// committed after the landing that the mirror never had are in its
    /// quarantine, like any other of its writes this region lacks. A move
    /// not started yet is refused.
    async fn settle_adopted(&self, i: &mut Intent, claim: &Claim) -> Result<()> {
        let target = i.record.target.clone();
        let account = i.record.account.clone();
        if i.record.phase.is_final() {
            return Ok(());
        }
        // The cached view of which regions failed over here is up to a
        // second old: a region that has just rejoined is its own agent's
        // business again, and a move into it requested right after the
        // rejoin must not be refused here. So the directory is read now,
        // and a refusal compares the record it rests on.
        let key = tern_common::dir_region_key(&target);
        let found = self
            .directory
            .clone()
            .get(key.clone(), None)
            .await
            .during(|| format!("reading {key}"))?;
        let record = found.kvs().first().and_then(|kv| {
            let r = serde_json::from_slice::<tern_common::RegionRecord>(kv.value()).ok()?;
            Some((r, kv.mod_revision()))
        });
        let Some((record, record_revision)) = record.filter(|(r, _)| {
            r.state == tern_common::RegionState::Failed && r.successor.as_ref() == Some(&self.shared.region)
        }) else {
            // Not adopted any more: forgotten at the reload this flags (its
            // own agent drives it now).
            self.refresh_regions().await;
            return Ok(());
        };
        if i.record.phase == MigrationPhase::Requested {
            let why = format!("{target} failed over to {} before the move started", self.shared.region);
            let unchanged = Compare::mod_revision(key, CompareOp::Equal, record_revision);
            self.refuse_when(i, claim, why, vec![unchanged]).await?;
            return Ok(());
        }
        // Only a promoted mirror has stopped for good: before that it could
        // still apply the landing, and the writes after it, which a
        // rollback decided now would leave in an area nobody serves.
        let failover = Some(record.region_epoch);
        let marker = crate::mirror::promoted(&self.local, &target).await?;
        if marker.is_none() || marker != failover {
            return Ok(());
        }
        let (source, epoch, src) = match (&i.record.source, i.record.source_epoch) {
            // A move out of this very region: its fence is here.
            (Some(s), Some(e)) if *s == self.shared.region => (
                s.clone(),
                e,
                SourceGroup {
                    client: self.local.clone(),
                    promoted: None,
                    failed: false,
                    guards: vec![self.leadership.guard()],
                },
            ),
            _ => self.source(i).await?,
        };
        let mirrored = self
            .local
            .clone()
            .get(mirror_key(&target, fence_key(&account).as_bytes()), None)
            .await
            .during(|| format!("reading the mirrored fence of {account} in {target}"))?;
        let landed = mirrored
            .kvs()
            .first()
            .is_some_and(|kv| kv.value() == Fence::active(epoch.next()).to_string().as_bytes());
        let account_key = dir_account_key(&account);
        let current = self
            .directory
            .clone()
            .get(account_key.clone(), None)
            .await
            .during(|| format!("reading the placement of {account}"))?;
        let Some(kv) = current.kvs().first() else {
            return Err(self.fail(i, format!("the placement of {account} vanished")));
        };
        let placement: AccountRecord = serde_json::from_slice(kv.value()).map_err(|e| self.fail(i, e.to_string()))?;
        let migrating = placement.home == source
            && placement.epoch == epoch
            && matches!(&placement.state, AccountState::Migrating { target: t } if *t == target);
        // The account's placement afterwards (only while it is still the
        // move's `migrating` one).
        let settled = if landed {
            if !src.failed {
                let moved = Fence::moved(epoch, target.clone());
                let swapped = swap_fence(&src, &account, &Fence::fenced(epoch), &moved).await?;
                if !swapped.is(&moved) {
                    tracing::warn!(migration = %i.id, account = %account, found = %swapped.shown(), "the source's fence was not fenced for this move; left as it is");
                }
            }
            i.record.phase = MigrationPhase::Completed;
            i.record.message = Some(format!(
                "{target} failed over to {} after the copy landed there: finished by {} (homed in {target} at epoch {}, served by its successor)",
                self.shared.region,
                self.shared.region,
                epoch.next()
            ));
            AccountRecord {
                home: target.clone(),
                epoch: epoch.next(),
                state: AccountState::Active,
                moved_ms: Some(tern_common::unix_ms()),
                ..placement.clone()
            }
        } else {
            if !src.failed {
                // Fenced for this move, or already marked moved to the
                // failed target (which marked it after a landing this
                // region never saw: what it wrote since is in its
                // quarantine): the source takes the account back.
                let active = Fence::active(epoch);
                let mut swapped = swap_fence(&src, &account, &Fence::fenced(epoch), &active).await?;
                let moved = Fence::moved(epoch, target.clone());
                if matches!(&swapped, Swapped::Found(Some((v, _))) if v == moved.to_string().as_bytes()) {
                    swapped = swap_fence(&src, &account, &moved, &active).await?;
                }
                if !swapped.is(&active) {
                    // Restoring the directory now would name a home that
                    // refuses the account's writes.
                    return Err(self.fail(
                        i,
                        format!(
                            "{account}'s fence in {source} is {}, not {} or {moved}: not rolled back",
                            swapped.shown(),
                            Fence::fenced(epoch)
                        ),
                    ));
                }
            }
            i.record.phase = MigrationPhase::RolledBack;
            i.record.message = Some(format!(
                "{target} failed over to {} before its copy of {account} reached it: rolled back by {} ({account} stays in {source})",
                self.shared.region, self.shared.region
            ));
            AccountRecord {
                state: AccountState::Active,
                ..placement.clone()
            }
        };
        let (extra, also) = if migrating {
            (
                vec![Compare::mod_revision(
                    account_key.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )],
                vec![TxnOp::put(account_key, settled.to_json(), None)],
            )
        } else {
            (Vec::new(), Vec::new())
        };
        i.record.finished_ms = Some(tern_common::unix_ms());
        if !self.save(i, claim, extra, also).await? {
            return Err(self.fail(i, "the intent or the account's placement changed under the agent"));
        }
        tracing::warn!(migration = %i.id, account = %account, from = %source, to = %target, landed, "a move into a failed-over region was settled by its successor");
        Ok(())
    }

    /// Deletes the oldest finished intents of this region beyond
    /// [`KEEP_FINISHED`].
    async fn trim(&self, mut finished: Vec<Intent>, claim: &Claim) -> Result<()> {
        if finished.len() <= KEEP_FINISHED {
            return Ok(());
        }
        finished.sort_by_key(|i| i.record.finished_ms.unwrap_or(i.record.requested_ms));
        // A few at a time: each is a directory write.
        let excess = (finished.len() - KEEP_FINISHED).min(20);
        for i in finished.into_iter().take(excess) {
            let key = dir_migration_key(&i.id);
            self.directory
                .clone()
                .txn(
                    Txn::new()
                        .when([
                            claim.guard(),
                            Compare::mod_revision(key.clone(), CompareOp::Equal, i.revision),
                        ])
                        .and_then([TxnOp::delete(key, None)]),
                )
                .await
                .during(|| format!("deleting finished migration {}", i.id))?;
        }
        Ok(())
    }
}
