//! The home side of every request: one etcd transaction on the region's own
//! group, guarded by the account's fence (DESIGN.md, write path step 2), with
//! the idempotency record written in the same transaction.
//!
//!   if value(fence) == "E:active" [and version(idem) == 0] [and user compares]
//!   then <ops> [+ idempotency record]
//!   else get(fence) [+ get(idempotency record)]
//!
//! Callers describe what to do as `Work` in tern's terms (keys of one
//! account, values, compares); this module alone turns it into etcd
//! operations, nested transactions and batch shapes, checks the request
//! against etcd's size limit before sending it, and reads the answer back
//! into an `Output`.

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse};
use serde::{Deserialize, Serialize};
use tern_common::{
    AccountId, Epoch, Fence, FenceState, IdempotencyKey, RegionName, fence_key, idempotency_key, mirror_closed_key,
    mirror_key, promotion_key,
};

use crate::batch::{BatchError, Batchable, Batcher};
use crate::error::{Delivery, Result, RouterError, classify_etcd};
use crate::leader::Group;
use crate::lease::LeaseGate;
use crate::retention::RecordLeases;

/// etcd's default `--max-request-bytes` (1.5 MiB): a larger request is
/// refused whole. tern's groups run with the default.
pub const ETCD_MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// Room kept under that limit for the fence compare, the idempotency record
/// and gRPC framing.
const REQUEST_HEADROOM: usize = 16 * 1024;
/// Bytes a write adds to a transaction besides its keys and values
/// (compares, operation headers, framing): for the batch size limit.
const OP_OVERHEAD: usize = 64;

/// A compare of a Txn on one of the account's keys (a full etcd key).
#[derive(Clone, Debug)]
pub struct Check {
    pub key: String,
    pub relation: Relation,
    pub target: Target,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relation {
    Equal,
    NotEqual,
    Greater,
    Less,
}

#[derive(Clone, Debug)]
pub enum Target {
    Value(Vec<u8>),
    /// 0: the key does not exist.
    Version(i64),
    ModRevision(i64),
}

/// One operation of a Txn on one of the account's keys.
#[derive(Clone, Debug)]
pub enum Step {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
    Get { key: String },
}

/// What a request does in the account's keys (full etcd keys, already
/// validated to lie under the account's prefix).
#[derive(Clone, Debug)]
pub enum Work {
    Put {
        key: String,
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
    Get {
        key: String,
    },
    /// Keys in `[start, end)`, at most `limit`.
    List {
        start: String,
        end: Vec<u8>,
        limit: i64,
    },
    Txn {
        checks: Vec<Check>,
        steps: Vec<Step>,
    },
}

impl Work {
    /// Whether it changes data (and so may be applied twice if repeated).
    pub fn writes(&self) -> bool {
        match self {
            Self::Put { .. } | Self::Delete { .. } => true,
            Self::Get { .. } | Self::List { .. } => false,
            Self::Txn { steps, .. } => steps.iter().any(|s| !matches!(s, Step::Get { .. })),
        }
    }

    /// Bytes of keys, values and compares it sends.
    fn size(&self) -> usize {
        match self {
            Self::Put { key, value } => key.len() + value.len() + OP_OVERHEAD,
            Self::Delete { key } | Self::Get { key } => key.len() + OP_OVERHEAD,
            Self::List { start, end, .. } => start.len() + end.len() + OP_OVERHEAD,
            Self::Txn { checks, steps } => {
                let checks: usize = checks
                    .iter()
                    .map(|c| {
                        c.key.len()
                            + OP_OVERHEAD
                            + match &c.target {
                                Target::Value(v) => v.len(),
                                _ => 0,
                            }
                    })
                    .sum();
                let steps: usize = steps
                    .iter()
                    .map(|s| match s {
                        Step::Put { key, value } => key.len() + value.len() + OP_OVERHEAD,
                        Step::Delete { key } | Step::Get { key } => key.len() + OP_OVERHEAD,
                    })
                    .sum();
                checks + steps
            }
        }
    }
}

/// One key as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// The full etcd key (in the home area).
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub version: i64,
}

/// A read of a mirror: what it holds, and its closed time (this region's
/// clock, Unix ms) from the same snapshot; None when its agent has not
/// measured the clock offset to the source yet.
#[derive(Clone, Debug)]
pub struct MirrorRead {
    pub output: Output,
    pub closed_ms: Option<i64>,
}

/// What committed work returned, shaped like the `Work`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Put,
    Delete {
        existed: bool,
    },
    Get(Option<Item>),
    List(Vec<Item>),
    /// One entry per `Step::Get`, in order.
    Txn {
        gets: Vec<Option<Item>>,
    },
}

/// The idempotency record stored with a write: what the replay of a retry
/// answers with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The operation (`put`, `delete`, `txn`).
    pub op: String,
    /// The request's fingerprint: a retry must carry the same.
    pub fp: String,
    /// Delete: whether the key existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub existed: Option<bool>,
    /// When the retention ends (Unix ms, the writing router's clock). The
    /// record's etcd lease enforces it in this group; a migration copies
    /// the record into another group with a lease for what is left of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
}

/// What a guarded transaction found.
#[derive(Debug)]
pub enum Guarded {
    /// Committed at this revision.
    Done { revision: i64, output: Output },
    /// The idempotency key was used before: its record and the revision it
    /// committed at.
    Replayed { record: Record, revision: i64 },
    /// The fence does not say `E:active`: what it says instead (None: no
    /// fence, the account is not homed in this group).
    Fence(Option<Fence>),
    /// The fence held but a user compare did not.
    CompareFailed,
    /// The account is served from a promoted mirror area whose promotion
    /// marker is not (yet) the one expected: the successor's agent has not
    /// written it, or a newer failover replaced it.
    NotPromoted,
}

/// Where in the region's group an account's keys live.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Area {
    /// Its home area (`/tern/a/...`): the account is homed in this region.
    #[default]
    Home,
    /// The mirror area of a failed region `source` that this region
    /// succeeded at region epoch `failover` (`/tern/r/{source}/tern/a/...`):
    /// writes are guarded by the promotion marker as well as by the
    /// account's fence there (the source's fence as last mirrored).
    Promoted { source: RegionName, failover: u64 },
}

impl Area {
    /// `key` (a home-area key) in this area.
    pub fn key(&self, key: &str) -> String {
        match self {
            Self::Home => key.to_string(),
            Self::Promoted { source, .. } => String::from_utf8_lossy(&mirror_key(source, key.as_bytes())).into_owned(),
        }
    }

    fn end(&self, end: &[u8]) -> Vec<u8> {
        match self {
            Self::Home => end.to_vec(),
            Self::Promoted { source, .. } => mirror_key(source, end),
        }
    }

    /// A key read in this area, as the home-area key the client knows.
    fn home_key(&self, key: &mut Vec<u8>) {
        if let Self::Promoted { source, .. } = self {
            unmirror(source, key);
        }
    }

    /// `work` with its keys in this area.
    fn work(&self, work: &Work) -> Work {
        if *self == Self::Home {
            return work.clone();
        }
        let k = |key: &String| self.key(key);
        match work {
            Work::Put { key, value } => Work::Put {
                key: k(key),
                value: value.clone(),
            },
            Work::Delete { key } => Work::Delete { key: k(key) },
            Work::Get { key } => Work::Get { key: k(key) },
            Work::List { start, end, limit } => Work::List {
                start: k(start),
                end: self.end(end),
                limit: *limit,
            },
            Work::Txn { checks, steps } => Work::Txn {
                checks: checks
                    .iter()
                    .map(|c| Check {
                        key: k(&c.key),
                        ..c.clone()
                    })
                    .collect(),
                steps: steps
                    .iter()
                    .map(|s| match s {
                        Step::Put { key, value } => Step::Put {
                            key: k(key),
                            value: value.clone(),
                        },
                        Step::Delete { key } => Step::Delete { key: k(key) },
                        Step::Get { key } => Step::Get { key: k(key) },
                    })
                    .collect(),
            },
        }
    }

    /// `output` with its keys as the client knows them.
    fn output(&self, output: Output) -> Output {
        if *self == Self::Home {
            return output;
        }
        let item = |mut i: Item| {
            self.home_key(&mut i.key);
            i
        };
        match output {
            Output::Get(i) => Output::Get(i.map(item)),
            Output::List(items) => Output::List(items.into_iter().map(item).collect()),
            Output::Txn { gets } => Output::Txn {
                gets: gets.into_iter().map(|g| g.map(item)).collect(),
            },
            other => other,
        }
    }
}

/// The region's own group.
#[derive(Clone)]
pub struct HomeStore {
    group: Group,
    batcher: Option<Batcher>,
    leases: Arc<RecordLeases>,
    /// Whether the region may write now: checked before every transaction
    /// on the home area.
    gate: Arc<LeaseGate>,
}

impl HomeStore {
    /// Writes share transactions, up to `max_writes` in one (1: never),
    /// `in_flight` at a time; idempotency records live for `retention`.
    pub fn new(
        group: Group,
        max_writes: usize,
        in_flight: usize,
        retention: std::time::Duration,
        sizes: prometheus_client::metrics::histogram::Histogram,
        gate: Arc<LeaseGate>,
    ) -> Self {
        let batcher = (max_writes > 1).then(|| Batcher::start(group.clone(), max_writes, in_flight, sizes));
        Self {
            group,
            batcher,
            leases: Arc::new(RecordLeases::new(retention)),
            gate,
        }
    }

    /// How to put an idempotency record now (attached to the lease that
    /// ends its retention).
    async fn record_options(&self) -> Result<PutOptions> {
        self.leases
            .put_options(&self.group)
            .await
            .map_err(|e| RouterError::group("granting the lease of idempotency records", e))
    }

    /// Runs `work` for `account` at `epoch` in `area` as one transaction
    /// guarded by the fence (and in a promoted area by the promotion
    /// marker) and, with a key, by the idempotency record `record`.
    pub async fn run(
        &self,
        account: &AccountId,
        epoch: Epoch,
        area: &Area,
        idempotency: Option<(&IdempotencyKey, Record)>,
        work: &Work,
    ) -> Result<Guarded> {
        self.gate.check()?;
        if let (Area::Promoted { source, .. }, Work::Txn { checks, .. }) = (area, work)
            && checks
                .iter()
                .any(|c| matches!(c.target, Target::ModRevision(_)) || matches!(c.target, Target::Version(n) if n != 0))
        {
            // Revisions and versions are the failed region's group's until
            // the failover and this group's after it (a resync even starts
            // versions again): such a compare could hold by accident.
            return Err(RouterError::BadRequest(format!(
                "compares on mod_revision or version (other than 0, absent) are refused while the account is served by {source}'s successor after a failover: compare values instead"
            )));
        }
        let translated;
        let work = if *area == Area::Home {
            work
        } else {
            translated = area.work(work);
            &translated
        };
        let size = work.size() + idempotency.as_ref().map_or(0, |(k, _)| k.as_str().len() + 512);
        if size > ETCD_MAX_REQUEST_BYTES - REQUEST_HEADROOM {
            return Err(RouterError::TooLarge {
                what: "the request's keys, values and compares",
                size,
                limit: ETCD_MAX_REQUEST_BYTES - REQUEST_HEADROOM,
                rule: "one request is one etcd transaction, and etcd refuses transactions over 1.5 MiB",
            });
        }
        let idempotency = idempotency.map(|(k, r)| {
            (
                k,
                Record {
                    expires_ms: Some(self.leases.expires_ms()),
                    ..r
                },
            )
        });
        let fence = area.key(&fence_key(account));
        let mut when = vec![Compare::value(
            fence.clone(),
            CompareOp::Equal,
            Fence::active(epoch).to_string(),
        )];
        let mut otherwise = vec![TxnOp::get(fence, None)];
        let mut written: Vec<String> = Vec::new();
        let idem_key = idempotency
            .as_ref()
            .map(|(k, _)| area.key(&idempotency_key(account, k)));
        let options = match &idem_key {
            Some(_) => Some(self.record_options().await?),
            None => None,
        };
        let mut then = match work {
            Work::Put { key, value } => {
                written.push(key.clone());
                vec![TxnOp::put(key.clone(), value.clone(), None)]
            }
            Work::Delete { key } => {
                written.push(key.clone());
                match (&idempotency, &idem_key, &options) {
                    // Whether the key existed is decided inside the
                    // transaction and recorded, so a replay can answer it.
                    (Some((_, record)), Some(idem), Some(options)) => {
                        let existed = Record {
                            existed: Some(true),
                            ..record.clone()
                        };
                        let absent = Record {
                            existed: Some(false),
                            ..record.clone()
                        };
                        vec![TxnOp::txn(
                            Txn::new()
                                .when([Compare::version(key.clone(), CompareOp::Greater, 0)])
                                .and_then([
                                    TxnOp::delete(key.clone(), None),
                                    TxnOp::put(idem.clone(), to_json(&existed), Some(options.clone())),
                                ])
                                .or_else([TxnOp::put(idem.clone(), to_json(&absent), Some(options.clone()))]),
                        )]
                    }
                    _ => vec![TxnOp::delete(key.clone(), None)],
                }
            }
            Work::Get { key } => vec![TxnOp::get(key.clone(), None)],
            Work::List { start, end, limit } => vec![TxnOp::get(
                start.clone(),
                Some(GetOptions::new().with_range(end.clone()).with_limit(*limit)),
            )],
            Work::Txn { checks, steps } => {
                when.extend(checks.iter().map(compare));
                steps
                    .iter()
                    .map(|s| match s {
                        Step::Put { key, value } => TxnOp::put(key.clone(), value.clone(), None),
                        Step::Delete { key } => TxnOp::delete(key.clone(), None),
                        Step::Get { key } => TxnOp::get(key.clone(), None),
                    })
                    .collect()
            }
        };
        if let (Some((_, record)), Some(idem), Some(options)) = (&idempotency, &idem_key, options) {
            when.push(Compare::version(idem.clone(), CompareOp::Equal, 0));
            // A keyed Delete writes its record in its nested transaction.
            if !matches!(work, Work::Delete { .. }) {
                then.push(TxnOp::put(idem.clone(), to_json(record), Some(options)));
            }
            written.push(idem.clone());
            otherwise.push(TxnOp::get(idem.clone(), None));
        }
        if let Area::Promoted { source, failover } = area {
            let marker = promotion_key(source);
            when.push(Compare::value(marker.clone(), CompareOp::Equal, failover.to_string()));
            otherwise.push(TxnOp::get(marker, None));
        }
        let txn = Txn::new().when(when).and_then(then).or_else(otherwise);
        // Checked again right before sending: granting the records' lease
        // may have taken a while (the time from the check to the commit is
        // what the lease margin must cover).
        self.gate.check()?;
        // Puts and Deletes may share a commit; reads (whose answers could be
        // large) and user transactions go alone.
        let batchable = matches!(work, Work::Put { .. } | Work::Delete { .. });
        let sent = match (&self.batcher, batchable) {
            (Some(batcher), true) => {
                batcher
                    .submit(
                        txn,
                        Batchable {
                            keys: written,
                            bytes: size,
                        },
                    )
                    .await
            }
            _ => self
                .group
                .txn(txn)
                .await
                .map(|resp| (resp.header().map(|h| h.revision()).unwrap_or(0), resp))
                .map_err(|e| BatchError::Etcd(Arc::new(e))),
        };
        let (revision, resp) = match sent {
            Ok(r) => r,
            Err(e) => return Err(self.failed(e, work).await),
        };
        let guarded = read_answer(&resp, revision, epoch, idempotency.is_some(), work, area)?;
        Ok(match guarded {
            Guarded::Done { revision, output } => Guarded::Done {
                revision,
                output: area.output(output),
            },
            other => other,
        })
    }

    /// What a failed transaction means for its caller.
    async fn failed(&self, e: BatchError, work: &Work) -> RouterError {
        let etcd = match e {
            BatchError::ShuttingDown => return RouterError::ShuttingDown,
            BatchError::Etcd(etcd) => etcd,
            BatchError::Abandoned | BatchError::Malformed(_) => {
                return RouterError::unknown("the commit this write shared was not answered", e);
            }
        };
        match classify_etcd(&etcd) {
            Delivery::Refused => {
                // The only NotFound a transaction can cause: the lease of
                // the idempotency records is gone (revoked, or the router
                // was frozen past its TTL). The next record gets a new one.
                if matches!(&*etcd, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::NotFound) {
                    self.leases.forget().await;
                    return RouterError::GroupUnavailable {
                        what: "the lease of idempotency records expired",
                        source: etcd,
                    };
                }
                RouterError::Refused(etcd)
            }
            Delivery::NotSent => RouterError::GroupUnavailable {
                what: "the transaction was not sent",
                source: etcd,
            },
            Delivery::Unknown if work.writes() => {
                RouterError::unknown("the region group's answer to the transaction was lost", etcd)
            }
            Delivery::Unknown => RouterError::GroupUnavailable {
                what: "a read was not answered",
                source: etcd,
            },
        }
    }

    /// A BOUNDED read from this region's mirror of `home`: `work` on the
    /// mirrored copies of the account's keys, if the mirror holds the
    /// account at `epoch` (None: it does not, serve it from the home).
    pub async fn read_mirror(
        &self,
        account: &AccountId,
        home: &RegionName,
        epoch: Epoch,
        work: &Work,
    ) -> Result<Option<MirrorRead>> {
        let op = match work {
            Work::Get { key } => TxnOp::get(mirror_key(home, key.as_bytes()), None),
            Work::List { start, end, limit } => TxnOp::get(
                mirror_key(home, start.as_bytes()),
                Some(GetOptions::new().with_range(mirror_key(home, end)).with_limit(*limit)),
            ),
            _ => return Ok(None),
        };
        let fence = mirror_key(home, fence_key(account).as_bytes());
        let txn = Txn::new()
            .when([Compare::value(
                fence,
                CompareOp::Equal,
                Fence::active(epoch).to_string(),
            )])
            .and_then([op, TxnOp::get(mirror_closed_key(home), None)]);
        let resp = self
            .group
            .any()
            .txn(txn)
            .await
            .map_err(|e| RouterError::group("reading the mirror", e))?;
        if !resp.succeeded() {
            // The mirror does not hold the account at this epoch (new, or moving).
            return Ok(None);
        }
        let unmirror = |mut item: Item| {
            unmirror(home, &mut item.key);
            item
        };
        let responses = resp.op_responses();
        let closed_ms =
            first_item(responses.get(1)).and_then(|kv| std::str::from_utf8(&kv.value).ok()?.parse::<i64>().ok());
        let output = match work {
            Work::Get { .. } => Output::Get(first_item(responses.first()).map(unmirror)),
            _ => Output::List(items(responses.first()).into_iter().map(unmirror).collect()),
        };
        Ok(Some(MirrorRead { output, closed_ms }))
    }

    /// Writes `1:active` as the fence of a new account unless it has one.
    /// Returns the fence the account has afterwards.
    pub async fn create_fence(&self, account: &AccountId, epoch: Epoch) -> Result<Fence> {
        self.gate.check()?;
        let key = fence_key(account);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), Fence::active(epoch).to_string(), None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self
            .group
            .txn(txn)
            .await
            .map_err(|e| RouterError::group("creating the account's fence", e))?;
        if resp.succeeded() {
            return Ok(Fence::active(epoch));
        }
        match first_item(resp.op_responses().first()) {
            Some(kv) => parse_fence(&kv.value),
            None => Err(RouterError::Internal(format!(
                "fence of {account} vanished during creation"
            ))),
        }
    }

    /// Removes a fence this router created for an account that ended up homed
    /// elsewhere (a lost creation race), if nothing wrote to it since.
    pub async fn remove_unused_fence(&self, account: &AccountId) -> Result<()> {
        let key = fence_key(account);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 1)])
            .and_then([TxnOp::delete(key, None)]);
        self.group
            .txn(txn)
            .await
            .map_err(|e| RouterError::group("removing an unused fence", e))?;
        Ok(())
    }
}

/// `/tern/r/{source}/tern/a/...` → `/tern/a/...`
fn unmirror(source: &RegionName, key: &mut Vec<u8>) {
    let strip = mirror_key(source, b"").len();
    key.drain(..strip.min(key.len()));
}

fn to_json(record: &Record) -> String {
    serde_json::to_string(record).expect("a record always serialises")
}

fn compare(c: &Check) -> Compare {
    let op = match c.relation {
        Relation::Equal => CompareOp::Equal,
        Relation::NotEqual => CompareOp::NotEqual,
        Relation::Greater => CompareOp::Greater,
        Relation::Less => CompareOp::Less,
    };
    match &c.target {
        Target::Value(v) => Compare::value(c.key.clone(), op, v.clone()),
        Target::Version(n) => Compare::version(c.key.clone(), op, *n),
        Target::ModRevision(n) => Compare::mod_revision(c.key.clone(), op, *n),
    }
}

fn parse_fence(value: &[u8]) -> Result<Fence> {
    Fence::parse(value).map_err(|e| RouterError::Internal(format!("the account's fence is unreadable: {e}")))
}

fn to_item(kv: &etcd_client::KeyValue) -> Item {
    Item {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
    }
}

fn first_item(r: Option<&TxnOpResponse>) -> Option<Item> {
    match r {
        Some(TxnOpResponse::Get(g)) => g.kvs().first().map(to_item),
        _ => None,
    }
}

fn items(r: Option<&TxnOpResponse>) -> Vec<Item> {
    match r {
        Some(TxnOpResponse::Get(g)) => g.kvs().iter().map(to_item).collect(),
        _ => Vec::new(),
    }
}

/// Reads a guarded transaction's answer.
fn read_answer(
    resp: &TxnResponse,
    revision: i64,
    epoch: Epoch,
    keyed: bool,
    work: &Work,
    area: &Area,
) -> Result<Guarded> {
    let responses = resp.op_responses();
    if resp.succeeded() {
        let output = match work {
            Work::Put { .. } => Output::Put,
            Work::Delete { .. } => Output::Delete {
                existed: match responses.first() {
                    Some(TxnOpResponse::Delete(d)) => d.deleted() > 0,
                    Some(TxnOpResponse::Txn(t)) => t.succeeded(),
                    _ => false,
                },
            },
            Work::Get { .. } => Output::Get(first_item(responses.first())),
            Work::List { .. } => Output::List(items(responses.first())),
            Work::Txn { steps, .. } => Output::Txn {
                gets: steps
                    .iter()
                    .zip(&responses)
                    .filter(|(s, _)| matches!(s, Step::Get { .. }))
                    .map(|(_, r)| first_item(Some(r)))
                    .collect(),
            },
        };
        return Ok(Guarded::Done { revision, output });
    }
    if let Area::Promoted { failover, .. } = area {
        // The marker's read is the last of the `else` branch.
        let marker = first_item(responses.last());
        if marker.is_none_or(|m| m.value != failover.to_string().into_bytes()) {
            return Ok(Guarded::NotPromoted);
        }
    }
    let fence = match first_item(responses.first()) {
        Some(kv) => Some(parse_fence(&kv.value)?),
        None => None,
    };
    let active = fence
        .as_ref()
        .is_some_and(|f| f.epoch == epoch && f.state == FenceState::Active);
    if !active {
        return Ok(Guarded::Fence(fence));
    }
    if keyed && let Some(kv) = first_item(responses.get(1)) {
        let record = serde_json::from_slice(&kv.value)
            .map_err(|e| RouterError::Internal(format!("the idempotency record is unreadable: {e}")))?;
        return Ok(Guarded::Replayed {
            record,
            revision: kv.mod_revision,
        });
    }
    Ok(Guarded::CompareFailed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_puts_deletes_and_changing_txns_write() {
        assert!(
            Work::Put {
                key: "k".into(),
                value: vec![]
            }
            .writes()
        );
        assert!(!Work::Get { key: "k".into() }.writes());
        let reads_only = Work::Txn {
            checks: vec![],
            steps: vec![Step::Get { key: "k".into() }],
        };
        assert!(!reads_only.writes());
    }

    #[test]
    fn records_keep_their_wire_format() {
        let r = Record {
            op: "delete".into(),
            fp: "ab".into(),
            existed: Some(true),
            expires_ms: Some(1_800_000_000_000),
        };
        assert_eq!(
            to_json(&r),
            r#"{"op":"delete","fp":"ab","existed":true,"expires_ms":1800000000000}"#
        );
        let put: Record = serde_json::from_str(r#"{"op":"put","fp":"cd"}"#).expect("an older record");
        assert_eq!((put.existed, put.expires_ms), (None, None));
    }
}
