//! The home side of every request: one etcd transaction on the region's own
//! group, guarded by the account's fence (DESIGN.md, write path step 2), with
//! the idempotency record written in the same transaction.
//!
//!   if value(fence) == "E:active" [and version(idem) == 0] [and user compares]
//!   then <ops> [+ idempotency record]
//!   else get(fence) [+ get(idempotency record)]

use std::sync::Arc;

use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde_json::json;
use tern_common::{AccountId, Epoch, Fence, FenceState, IdempotencyKey, fence_key, idempotency_key};

use crate::batch::{Batchable, Batcher};
use crate::error::{Result, RouterError};
use crate::leader::Group;
use crate::retention::RecordLeases;

/// What a guarded transaction found.
#[derive(Debug)]
pub enum Guarded<T> {
    /// Committed at this revision.
    Done { revision: i64, value: T },
    /// The idempotency key was used before: its record and the revision it
    /// committed at.
    Replayed { record: serde_json::Value, revision: i64 },
    /// The fence does not say `E:active`: what it says instead (None: no
    /// fence, the account is not homed in this group).
    Fence(Option<Fence>),
    /// The fence held but a user compare did not.
    CompareFailed,
}

/// A write or read to run under the fence.
pub struct Guard<'a> {
    pub account: &'a AccountId,
    pub epoch: Epoch,
    /// The key and the record to store under it. No record: an operation
    /// of the transaction writes it (a nested transaction), the guard only
    /// checks that the key is unused.
    pub idempotency: Option<(&'a IdempotencyKey, Option<serde_json::Value>)>,
    pub compares: Vec<Compare>,
    pub ops: Vec<TxnOp>,
    /// Set for a write that may share an etcd transaction with others (see
    /// `batch`): the keys its ops write (the idempotency record is added
    /// here) and its size. Unset: sent alone (reads, whose answers could be
    /// large, and user transactions).
    pub batch: Option<Batchable>,
}

/// The region's own group.
#[derive(Clone)]
pub struct HomeStore {
    group: Group,
    batcher: Option<Batcher>,
    leases: Arc<RecordLeases>,
}

impl HomeStore {
    /// Writes marked batchable share transactions, up to `max_writes` in
    /// one (1: never), `in_flight` at a time; idempotency records live for
    /// `retention`.
    pub fn new(
        group: Group,
        max_writes: usize,
        in_flight: usize,
        retention: std::time::Duration,
        sizes: prometheus_client::metrics::histogram::Histogram,
    ) -> Self {
        let batcher = (max_writes > 1).then(|| Batcher::start(group.clone(), max_writes, in_flight, sizes));
        Self {
            group,
            batcher,
            leases: Arc::new(RecordLeases::new(retention)),
        }
    }

    /// How to put an idempotency record now (attached to the lease that
    /// ends its retention).
    pub async fn record_options(&self) -> Result<PutOptions> {
        self.leases
            .put_options(&self.group)
            .await
            .map_err(|e| RouterError::Unavailable(format!("cannot get a lease for idempotency records: {e}")))
    }

    /// A client of every member, for reads any member may serve.
    pub fn any_member(&self) -> etcd_client::Client {
        self.group.any()
    }

    /// Runs `guard` as one transaction. `extract` turns the then-branch
    /// responses into the caller's result.
    pub async fn run<T>(&self, guard: Guard<'_>, extract: impl FnOnce(&[TxnOpResponse]) -> T) -> Result<Guarded<T>> {
        let fence = fence_key(guard.account);
        let mut when = vec![Compare::value(
            fence.clone(),
            CompareOp::Equal,
            Fence::active(guard.epoch).to_string(),
        )];
        let mut then = guard.ops;
        let mut otherwise = vec![TxnOp::get(fence, None)];
        let mut batch = guard.batch;
        if let Some((key, record)) = &guard.idempotency {
            let idem = idempotency_key(guard.account, key);
            if let Some(b) = batch.as_mut() {
                b.keys.push(idem.clone());
            }
            when.push(Compare::version(idem.clone(), CompareOp::Equal, 0));
            if let Some(record) = record {
                then.push(TxnOp::put(
                    idem.clone(),
                    record.to_string(),
                    Some(self.record_options().await?),
                ));
            }
            otherwise.push(TxnOp::get(idem, None));
        }
        when.extend(guard.compares);
        let txn = Txn::new().when(when).and_then(then).or_else(otherwise);
        let sent = match (&self.batcher, batch) {
            (Some(batcher), Some(shape)) => batcher.submit(txn, shape).await,
            _ => self
                .txn(txn)
                .await
                .map(|resp| (resp.header().map(|h| h.revision()).unwrap_or(0), resp))
                .map_err(|e| e.to_string()),
        };
        let (revision, resp) = match sent {
            Ok(r) => r,
            Err(e) => {
                if e.contains("requested lease not found") {
                    self.leases.forget().await;
                }
                return Err(RouterError::OutcomeUnknown(format!("etcd transaction failed: {e}")));
            }
        };
        let responses = resp.op_responses();
        if resp.succeeded() {
            return Ok(Guarded::Done {
                revision,
                value: extract(&responses),
            });
        }
        let first_kv = |i: usize| -> Option<KeyValue> {
            match responses.get(i) {
                Some(TxnOpResponse::Get(g)) => g.kvs().first().cloned(),
                _ => None,
            }
        };
        let fence = match first_kv(0) {
            Some(kv) => Some(Fence::parse(kv.value()).map_err(|e| RouterError::Internal(e.to_string()))?),
            None => None,
        };
        let active = fence
            .as_ref()
            .is_some_and(|f| f.epoch == guard.epoch && f.state == FenceState::Active);
        if !active {
            return Ok(Guarded::Fence(fence));
        }
        if guard.idempotency.is_some()
            && let Some(kv) = first_kv(1)
        {
            let record = serde_json::from_slice(kv.value()).unwrap_or_else(|_| json!({}));
            return Ok(Guarded::Replayed {
                record,
                revision: kv.mod_revision(),
            });
        }
        Ok(Guarded::CompareFailed)
    }

    /// Writes `1:active` as the fence of a new account unless it has one.
    /// Returns the fence the account has afterwards.
    pub async fn create_fence(&self, account: &AccountId, epoch: Epoch) -> Result<Fence> {
        let key = fence_key(account);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), Fence::active(epoch).to_string(), None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.txn(txn).await?;
        if resp.succeeded() {
            return Ok(Fence::active(epoch));
        }
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(g) = op
                && let Some(kv) = g.kvs().first()
            {
                return Fence::parse(kv.value()).map_err(|e| RouterError::Internal(e.to_string()));
            }
        }
        Err(RouterError::Internal(format!(
            "fence of {account} vanished during creation"
        )))
    }

    /// Removes a fence this router created for an account that ended up homed
    /// elsewhere (a lost creation race), if nothing wrote to it since.
    pub async fn remove_unused_fence(&self, account: &AccountId) -> Result<()> {
        let key = fence_key(account);
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 1)])
            .and_then([TxnOp::delete(key, None)]);
        self.txn(txn).await?;
        Ok(())
    }

    /// One transaction on the group's leader (see `leader`).
    async fn txn(&self, txn: Txn) -> std::result::Result<etcd_client::TxnResponse, etcd_client::Error> {
        txn_on(&self.group, txn).await
    }

    /// A range read under the fence, for List.
    pub fn range_op(start: &str, end: &[u8], limit: i64) -> TxnOp {
        TxnOp::get(start, Some(GetOptions::new().with_range(end).with_limit(limit)))
    }
}

/// Runs `txn` where `group` sends requests now, and tells the group what
/// the answer says about its leader.
pub(crate) async fn txn_on(
    group: &Group,
    txn: Txn,
) -> std::result::Result<etcd_client::TxnResponse, etcd_client::Error> {
    /// Tells the group when the request is dropped unanswered.
    struct Unanswered<'a>(Option<&'a Group>);
    impl Drop for Unanswered<'_> {
        fn drop(&mut self) {
            if let Some(group) = self.0 {
                group.suspect();
            }
        }
    }
    let mut unanswered = Unanswered(Some(group));
    let answer = group.kv().txn(txn).await;
    unanswered.0 = None;
    match answer {
        Ok(resp) => {
            group.saw(resp.header());
            Ok(resp)
        }
        Err(e) => {
            // The member may be gone or no longer lead; a refused request
            // (too large, bad compare) says nothing about the leader.
            let lost = match &e {
                etcd_client::Error::GRpcStatus(s) => matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
                ),
                etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
                _ => false,
            };
            if lost {
                group.failed();
            }
            Err(e)
        }
    }
}
