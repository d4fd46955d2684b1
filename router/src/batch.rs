//! Group commit: concurrent writes to the region's group share one etcd
//! transaction, each as a nested transaction with its own fence compare, so
//! a busy router makes one Raft proposal for many writes instead of one each.
//!
//! A batch is formed from whatever is queued when a slot frees up (no timer:
//! an idle router sends a lone write at once), holds at most `max_writes`
//! writes and about `MAX_BATCH_BYTES`, and never two writes that touch the
//! same key (etcd refuses a transaction that writes a key twice); a write
//! that conflicts waits for the next batch, ahead of newer ones. Each write
//! still succeeds or fails on its own compares; they share the commit
//! revision. An error of the whole transaction reaches every write in it,
//! as it would have reached each one alone.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use etcd_client::{Client, Txn, TxnOp, TxnOpResponse, TxnResponse};
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Bytes of one batch at most: under etcd's default request limit (1.5 MiB)
/// with room for the keys and framing. A larger write goes alone.
const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// Batches in flight at once: enough to keep etcd busy while the next batch
/// forms.
const IN_FLIGHT: usize = 4;

/// What one write's transaction returned: the commit revision and its own
/// (possibly nested) response.
pub type Outcome = std::result::Result<(i64, TxnResponse), String>;

/// What a write may share a transaction with.
#[derive(Debug, Clone)]
pub struct Batchable {
    /// Every key the write puts or deletes.
    pub keys: Vec<String>,
    /// About how many bytes it adds to the request.
    pub bytes: usize,
}

struct Pending {
    txn: Txn,
    shape: Batchable,
    reply: oneshot::Sender<Outcome>,
}

/// The queue in front of the group; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    queue: mpsc::UnboundedSender<Pending>,
}

impl Batcher {
    /// Starts the batching task on the current runtime.
    pub fn start(client: Client, max_writes: usize, sizes: Histogram) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(client, rx, max_writes.max(1), sizes));
        Self { queue }
    }

    /// Runs `txn` in the next batch.
    pub async fn submit(&self, txn: Txn, shape: Batchable) -> Outcome {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { txn, shape, reply })
            .map_err(|_| "the router is shutting down".to_string())?;
        answer
            .await
            .map_err(|_| "the batch of this write was dropped".to_string())?
    }
}

async fn run(client: Client, mut rx: mpsc::UnboundedReceiver<Pending>, max_writes: usize, sizes: Histogram) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    // Writes that conflicted with a batch: first in line for the next one.
    let mut waiting: VecDeque<Pending> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match rx.recv().await {
                Some(p) => waiting.push_back(p),
                None => return,
            }
        }
        // Wait for a slot before forming the batch: what queues meanwhile
        // joins it.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        while let Ok(p) = rx.try_recv() {
            waiting.push_back(p);
        }
        let mut batch = Vec::new();
        let mut keys: HashSet<String> = HashSet::new();
        let mut bytes = 0;
        let mut rest = VecDeque::new();
        while let Some(p) = waiting.pop_front() {
            let fits = batch.is_empty()
                || (batch.len() < max_writes
                    && bytes + p.shape.bytes <= MAX_BATCH_BYTES
                    && p.shape.keys.iter().all(|k| !keys.contains(k)));
            if fits {
                bytes += p.shape.bytes;
                keys.extend(p.shape.keys.iter().cloned());
                batch.push(p);
            } else {
                rest.push_back(p);
            }
        }
        waiting = rest;
        sizes.observe(batch.len() as f64);
        let client = client.clone();
        tokio::spawn(async move {
            send(client, batch).await;
            drop(slot);
        });
    }
}

async fn send(mut client: Client, mut batch: Vec<Pending>) {
    if batch.len() == 1 {
        // Alone: the write's own transaction, not nested.
        let p = batch.pop().expect("one write");
        let outcome = client
            .txn(p.txn)
            .await
            .map(|r| (r.header().map(|h| h.revision()).unwrap_or(0), r))
            .map_err(|e| e.to_string());
        let _ = p.reply.send(outcome);
        return;
    }
    let (txns, replies): (Vec<TxnOp>, Vec<oneshot::Sender<Outcome>>) =
        batch.into_iter().map(|p| (TxnOp::txn(p.txn), p.reply)).unzip();
    match client.txn(Txn::new().and_then(txns)).await {
        Ok(resp) => {
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            let mut responses = resp.op_responses().into_iter();
            for reply in replies {
                let outcome = match responses.next() {
                    Some(TxnOpResponse::Txn(t)) => Ok((revision, t)),
                    other => Err(format!("etcd answered a nested transaction with {other:?}")),
                };
                let _ = reply.send(outcome);
            }
        }
        Err(e) => {
            let e = e.to_string();
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
