//! The placement cache: every account's home and epoch, and every region's
//! record, kept current by a watch on the directory group so that routing a
//! request costs no round trip. A miss costs one linearizable directory read.
//! The load reads the directory in pages at one revision and the watch
//! starts right after it, so a directory of a million accounts loads
//! within gRPC's message limit and no change made during the load is missed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, EventType, Txn, TxnOp, WatchOptions};
use prometheus_client::metrics::counter::Counter;
use tern_common::etcd::{Pages, WATCH_MESSAGE_LIMIT};
use tern_common::{
    AccountId, AccountRecord, AccountState, DIR_ACCOUNTS, DIR_REGIONS, RegionName, RegionRecord, RegionState,
    account_of_dir_key, dir_account_key, dir_region_key,
};
use tokio::sync::RwLock;

use crate::error::{Result, RouterError};
use crate::store::Area;

mod cache;
use cache::AccountCache;

/// What the router knows about an account.
pub type Placement = AccountRecord;

/// The directory client and the caches it feeds.
#[derive(Clone)]
pub struct Directory {
    client: Client,
    /// Placements and the directory revision each was read at: an older
    /// watch event never overwrites a newer read.
    accounts: Arc<RwLock<AccountCache>>,
    /// Region records and when this router received each.
    regions: Arc<RwLock<HashMap<RegionName, (RegionRecord, std::time::Instant)>>>,
    synced: Arc<AtomicBool>,
    /// Keys in the first page of the load.
    page: i64,
    /// When each account was last read from the directory, for
    /// [`Directory::refresh_throttled`].
    recent: Arc<std::sync::Mutex<HashMap<AccountId, Instant>>>,
    reads: Counter,
}

/// The shortest time between two directory reads of one account that a
/// fence miss may cause: during a long migration or a directory that lags
/// its fence, a router sends at most four reads a second per account, and
/// the watch brings the change anyway.
pub const REFRESH_GAP: Duration = Duration::from_millis(250);

/// Keys in the first page of the directory load; later pages grow to about
/// 4 MiB (`Pages`), ~40,000 placement records.
pub const DIRECTORY_PAGE: i64 = 5_000;

impl Directory {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            accounts: Arc::default(),
            regions: Arc::default(),
            synced: Arc::default(),
            page: DIRECTORY_PAGE,
            recent: Arc::default(),
            reads: Counter::default(),
        }
    }

    /// The same, counting each linearizable directory read in `reads`.
    pub fn counting_reads(mut self, reads: Counter) -> Self {
        self.reads = reads;
        self
    }

    /// The same with `page` keys in the first page of the load (tests use
    /// small pages to load a small directory in several pages).
    pub fn with_page_size(mut self, page: i64) -> Self {
        self.page = page;
        self
    }

    /// Whether the caches have been loaded since start.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    pub async fn cached(&self, account: &AccountId) -> Option<Placement> {
        self.accounts.read().await.get(account)
    }

    pub async fn cached_accounts(&self) -> usize {
        self.accounts.read().await.len()
    }

    /// The account's placement: from the cache, or one linearizable read.
    /// An account homed in a failed region is placed in its successor
    /// (see [`Directory::area`]).
    pub async fn lookup(&self, account: &AccountId) -> Result<Placement> {
        if let Some(p) = self.cached(account).await {
            return Ok(self.serving(p).await);
        }
        self.refresh(account).await
    }

    /// `p` with the home that serves it: the successor of a failed home
    /// region, when the account was not moving or is being re-homed by
    /// that successor (another move out of a failed region ends where its
    /// fences say, DESIGN.md "Failover").
    async fn serving(&self, mut p: Placement) -> Placement {
        if let Some(record) = self.region(&p.home).await
            && record.state == RegionState::Failed
            && let Some(successor) = record.successor
        {
            // A move to the successor is its re-homing: the account is
            // served there, from the mirror area until the move lands.
            let rehoming = matches!(&p.state, AccountState::Migrating { target } if *target == successor);
            if p.state == AccountState::Active || rehoming {
                p.home = successor;
            }
        }
        p
    }

    /// Where `here`'s group keeps `account` at `epoch`: its mirror area of
    /// the failed region the account is homed in, when `here` succeeded
    /// it; else its home area.
    pub async fn area(&self, account: &AccountId, here: &RegionName, epoch: tern_common::Epoch) -> Area {
        let Some(raw) = self.cached(account).await else {
            return Area::Home;
        };
        let served = match &raw.state {
            AccountState::Active => true,
            AccountState::Migrating { target } => target == here,
        };
        if raw.home == *here || raw.epoch != epoch || !served {
            return Area::Home;
        }
        match self.region(&raw.home).await {
            Some(r) if r.state == RegionState::Failed && r.successor.as_ref() == Some(here) => Area::Promoted {
                source: raw.home,
                failover: r.region_epoch,
            },
            _ => Area::Home,
        }
    }

    /// The placement as [`Directory::refresh`] reads it, unless the account
    /// was read from the directory less than [`REFRESH_GAP`] ago: then the
    /// cache, which the watch keeps current. Bounds the directory reads that
    /// many calls retrying on one fenced account can cause.
    pub async fn refresh_throttled(&self, account: &AccountId) -> Result<Placement> {
        let now = Instant::now();
        let recent = {
            let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            recent
                .get(account)
                .is_some_and(|at| now.duration_since(*at) < REFRESH_GAP)
        };
        if recent && let Some(p) = self.cached(account).await {
            return Ok(self.serving(p).await);
        }
        self.refresh(account).await
    }

    /// Reads the placement from the directory (linearizable) and caches it.
    pub async fn refresh(&self, account: &AccountId) -> Result<Placement> {
        self.reads.inc();
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            // Kept small: only accounts read in the last gap matter.
            if recent.len() >= 4096 {
                recent.retain(|_, at| now.duration_since(*at) < REFRESH_GAP);
            }
            recent.insert(account.clone(), now);
        }
        let resp = self
            .client
            .clone()
            .get(dir_account_key(account), None)
            .await
            .map_err(RouterError::DirectoryUnavailable)?;
        match resp.kvs().first() {
            Some(kv) => {
                let p = parse_account(kv.value())?;
                self.accounts.write().await.upsert(account, &p, kv.mod_revision());
                Ok(self.serving(p).await)
            }
            None => {
                self.accounts.write().await.remove(account);
                Err(RouterError::UnknownAccount(account.clone()))
            }
        }
    }

    /// Regions whose record says they serve and take accounts (not
    /// draining, not failed), by name.
    pub async fn active_regions(&self) -> Vec<RegionName> {
        let mut active: Vec<RegionName> = self
            .regions
            .read()
            .await
            .iter()
            .filter(|(_, (r, _))| r.state == RegionState::Active)
            .map(|(name, _)| name.clone())
            .collect();
        active.sort();
        active
    }

    pub async fn region(&self, region: &RegionName) -> Option<RegionRecord> {
        self.regions.read().await.get(region).map(|(r, _)| r.clone())
    }

    /// Registers (or updates) this region's router endpoint.
    pub async fn register_region(&self, region: &RegionName, endpoint: &str) -> Result<()> {
        let key = dir_region_key(region);
        let mut client = self.client.clone();
        // Compare-and-swap on the record's version: the record also carries
        // what agents publish and a failover's state, which a blind write
        // read a moment earlier would undo.
        for _ in 0..10 {
            let current = client
                .get(key.clone(), None)
                .await
                .map_err(RouterError::DirectoryUnavailable)?;
            let (version, mut record) = match current.kvs().first() {
                Some(kv) => (
                    kv.version(),
                    serde_json::from_slice::<RegionRecord>(kv.value())
                        .map_err(|e| RouterError::Internal(format!("region record {key}: {e}")))?,
                ),
                None => (0, RegionRecord::unwritten()),
            };
            if record.router_endpoint != endpoint {
                record.router_endpoint = endpoint.to_string();
                let txn = Txn::new()
                    .when([Compare::version(key.clone(), CompareOp::Equal, version)])
                    .and_then([TxnOp::put(key.clone(), record.to_json(), None)]);
                let written = client
                    .txn(txn)
                    .await
                    .map_err(RouterError::DirectoryUnavailable)?
                    .succeeded();
                if !written {
                    continue;
                }
            }
            self.regions
                .write()
                .await
                .insert(region.clone(), (record, std::time::Instant::now()));
            return Ok(());
        }
        Err(RouterError::Unavailable(format!(
            "region record {key} kept changing while this router registered its endpoint"
        )))
    }

    /// Creates the placement record if the account does not exist. Returns
    /// the record that is in the directory afterwards and whether this call
    /// created it.
    pub async fn create(&self, account: &AccountId, record: &AccountRecord) -> Result<(AccountRecord, bool)> {
        let key = dir_account_key(account);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), record.to_json(), None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(RouterError::DirectoryUnavailable)?;
        if resp.succeeded() {
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            self.accounts.write().await.upsert(account, record, revision);
            return Ok((record.clone(), true));
        }
        for op in resp.op_responses() {
            if let etcd_client::TxnOpResponse::Get(get) = op
                && let Some(kv) = get.kvs().first()
            {
                let existing = parse_account(kv.value())?;
                self.accounts
                    .write()
                    .await
                    .upsert(account, &existing, kv.mod_revision());
                return Ok((existing, false));
            }
        }
        Err(RouterError::Internal(format!(
            "directory create of {account} neither succeeded nor found a record"
        )))
    }

    /// Loads both caches and keeps them current until the process ends. A
    /// broken watch (compaction, a lost connection) reloads from scratch.
    pub fn spawn_watch(&self) -> tokio::task::JoinHandle<()> {
        let dir = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = dir.load_and_watch().await {
                    tracing::warn!(error = %e, "directory watch ended; reloading");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    }

    async fn load_and_watch(&self) -> Result<()> {
        let mut client = self.client.clone();
        let mut pages = Pages::prefix("/tern/dir/", self.page);
        let mut accounts = AccountCache::default();
        let mut regions = HashMap::new();
        while let Some(page) = pages
            .next(&mut client)
            .await
            .map_err(RouterError::DirectoryUnavailable)?
        {
            for kv in page.kvs() {
                apply_put(kv.key(), kv.value(), kv.mod_revision(), &mut accounts, &mut regions);
            }
        }
        let revision = pages.revision().unwrap_or(0);
        *self.accounts.write().await = accounts;
        *self.regions.write().await = regions;
        self.synced.store(true, Ordering::Relaxed);
        let mut stream = client
            .watch_client()
            .max_decoding_message_size(WATCH_MESSAGE_LIMIT)
            .watch(
                "/tern/dir/",
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1)
                        .with_progress_notify(),
                ),
            )
            .await
            .map_err(RouterError::DirectoryUnavailable)?;
        while let Some(resp) = stream.message().await.map_err(RouterError::DirectoryUnavailable)? {
            if resp.canceled() {
                return Err(RouterError::Unavailable(format!(
                    "directory watch canceled: {}",
                    resp.cancel_reason()
                )));
            }
            let mut accounts = self.accounts.write().await;
            let mut regions = self.regions.write().await;
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => apply_put(kv.key(), kv.value(), kv.mod_revision(), &mut accounts, &mut regions),
                    EventType::Delete => {
                        if let Some(a) = account_of_dir_key(kv.key()) {
                            accounts.remove_before(&a, kv.mod_revision());
                        } else if let Some(r) = region_of_key(kv.key()) {
                            regions.remove(&r);
                        }
                    }
                }
            }
        }
        Err(RouterError::Unavailable("directory watch stream closed".into()))
    }
}

fn parse_account(value: &[u8]) -> Result<AccountRecord> {
    serde_json::from_slice(value).map_err(|e| RouterError::Internal(format!("malformed placement record: {e}")))
}

fn region_of_key(key: &[u8]) -> Option<RegionName> {
    tern_common::region_of_dir_key(key, DIR_REGIONS)
}

fn apply_put(
    key: &[u8],
    value: &[u8],
    revision: i64,
    accounts: &mut AccountCache,
    regions: &mut HashMap<RegionName, (RegionRecord, std::time::Instant)>,
) {
    if key.starts_with(DIR_ACCOUNTS.as_bytes()) {
        match (account_of_dir_key(key), serde_json::from_slice::<AccountRecord>(value)) {
            (Some(a), Ok(p)) => accounts.upsert(&a, &p, revision),
            _ => {
                tracing::warn!(key = %String::from_utf8_lossy(key), "ignoring a malformed placement record")
            }
        }
    } else if let Some(r) = region_of_key(key) {
        match serde_json::from_slice::<RegionRecord>(value) {
            Ok(rec) => {
                regions.insert(r, (rec, std::time::Instant::now()));
            }
            Err(e) => tracing::warn!(region = %r, error = %e, "ignoring a malformed region record"),
        }
    }
}
