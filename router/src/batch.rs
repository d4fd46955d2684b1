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
//! as it would have reached each one alone. A write whose caller gave up
//! (deadline) while it queued is dropped, never sent late.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Txn, TxnOp, TxnOpResponse, TxnResponse};
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::leader::Group;

/// Bytes of one batch at most: under etcd's default request limit (1.5 MiB)
/// with room for the keys and framing. A larger write goes alone.
const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// How long a batch may wait for etcd before its writes are answered with
/// an unknown outcome and its slot is freed: a backstop only, a batch is
/// abandoned as soon as every caller in it has given up (deadline).
const BATCH_TIMEOUT: Duration = Duration::from_secs(60);

/// What one write's transaction returned: the commit revision and its own
/// (possibly nested) response.
pub type Outcome = std::result::Result<(i64, TxnResponse), BatchError>;

/// Why a write's shared transaction gave no answer for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    /// etcd (or the link to it) failed the whole transaction; every write
    /// in it gets the same error, as it would have alone.
    #[error("etcd: {0}")]
    Etcd(#[source] Arc<etcd_client::Error>),
    /// The queue is closed: the router is stopping. Never sent.
    #[error("the router is shutting down")]
    ShuttingDown,
    /// The batch was given up (every caller's deadline passed, or etcd did
    /// not answer within the backstop timeout) after it may have been sent.
    #[error("the shared commit was abandoned before etcd answered")]
    Abandoned,
    /// etcd answered the batch with something other than one nested
    /// response per write.
    #[error("etcd answered a nested transaction with {0}")]
    Malformed(String),
}

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
    /// Starts the batching task on the current runtime: at most
    /// `max_writes` writes per transaction and `in_flight` transactions at
    /// once. One in flight makes the largest batches and, on the 2-core
    /// benchmark, the most writes per CPU second (1.0 vs 0.9 of direct etcd
    /// with two); more helps where a commit waits on a slow disk rather
    /// than on CPU.
    pub fn start(group: Group, max_writes: usize, in_flight: usize, sizes: Histogram) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(group, rx, max_writes.max(1), in_flight, sizes));
        Self { queue }
    }

    /// Runs `txn` in the next batch.
    pub async fn submit(&self, txn: Txn, shape: Batchable) -> Outcome {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { txn, shape, reply })
            .map_err(|_| BatchError::ShuttingDown)?;
        // A dropped reply means the batch task ended with the write taken:
        // it may have been sent.
        answer.await.map_err(|_| BatchError::Abandoned)?
    }
}

async fn run(
    group: Group,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    max_writes: usize,
    in_flight: usize,
    sizes: Histogram,
) {
    let slots = Arc::new(Semaphore::new(in_flight.max(1)));
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
        // A caller past its deadline has stopped waiting and told its client
        // so: its write is not sent late, where it could land after the
        // client's retry.
        waiting.retain(|p| !p.reply.is_closed());
        if waiting.is_empty() {
            continue;
        }
        let batch = form(&mut waiting, max_writes, |p| &p.shape);
        sizes.observe(batch.len() as f64);
        let group = group.clone();
        tokio::spawn(async move {
            send(&group, batch).await;
            drop(slot);
        });
    }
}

/// Takes the next batch from the front of `waiting`: the first write always,
/// then every later one that fits (count, bytes, no key already written by
/// the batch). What does not fit keeps its place in line.
fn form<T>(waiting: &mut VecDeque<T>, max_writes: usize, shape: impl Fn(&T) -> &Batchable) -> Vec<T> {
    let mut batch: Vec<T> = Vec::new();
    let mut keys: HashSet<String> = HashSet::new();
    let mut bytes = 0;
    let mut rest = VecDeque::new();
    while let Some(p) = waiting.pop_front() {
        let s = shape(&p);
        let fits = batch.is_empty()
            || (batch.len() < max_writes
                && bytes + s.bytes <= MAX_BATCH_BYTES
                && s.keys.iter().all(|k| !keys.contains(k)));
        if fits {
            bytes += s.bytes;
            keys.extend(s.keys.iter().cloned());
            batch.push(p);
        } else {
            rest.push_back(p);
        }
    }
    *waiting = rest;
    batch
}

async fn send(group: &Group, batch: Vec<Pending>) {
    let (mut txns, mut replies): (Vec<Txn>, Vec<oneshot::Sender<Outcome>>) =
        batch.into_iter().map(|p| (p.txn, p.reply)).unzip();
    // Alone: the write's own transaction, not nested.
    let alone = txns.len() == 1;
    let txn = if alone {
        txns.pop().expect("one write")
    } else {
        Txn::new().and_then(txns.into_iter().map(TxnOp::txn).collect::<Vec<_>>())
    };
    // Once every caller has given up, nobody waits for the answer: free the
    // slot for the writes behind. (Their callers were told the outcome is
    // unknown, as with any deadline.)
    let answer = tokio::select! {
        r = tokio::time::timeout(BATCH_TIMEOUT, group.txn(txn)) => match r {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(BatchError::Etcd(Arc::new(e))),
            Err(_) => {
                tracing::warn!(timeout = ?BATCH_TIMEOUT, "etcd did not answer a shared commit");
                Err(BatchError::Abandoned)
            }
        },
        () = all_closed(&mut replies) => return,
    };
    let resp = match answer {
        Ok(resp) => resp,
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    if alone {
        let _ = replies.pop().expect("one write").send(Ok((revision, resp)));
        return;
    }
    let mut responses = resp.op_responses().into_iter();
    for reply in replies {
        let outcome = match responses.next() {
            Some(TxnOpResponse::Txn(t)) => Ok((revision, t)),
            other => Err(BatchError::Malformed(format!("{other:?}"))),
        };
        let _ = reply.send(outcome);
    }
}

/// Completes when every receiver of `replies` is gone.
async fn all_closed(replies: &mut [oneshot::Sender<Outcome>]) {
    for r in replies {
        r.closed().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(keys: &[&str], bytes: usize) -> Batchable {
        Batchable {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            bytes,
        }
    }

    fn keys(batch: &[Batchable]) -> Vec<String> {
        batch.iter().map(|b| b.keys.join("+")).collect()
    }

    #[test]
    fn a_batch_never_writes_a_key_twice_and_conflicts_keep_their_place() {
        let mut waiting = VecDeque::from([
            write(&["a"], 10),
            write(&["b", "idem-1"], 10),
            write(&["a"], 10),
            write(&["c"], 10),
            write(&["idem-1"], 10),
        ]);
        let first = form(&mut waiting, 32, |b| b);
        assert_eq!(keys(&first), ["a", "b+idem-1", "c"]);
        let second = form(&mut waiting, 32, |b| b);
        assert_eq!(keys(&second), ["a", "idem-1"]);
        assert!(waiting.is_empty());
    }

    #[test]
    fn a_batch_is_bounded_by_count_and_bytes() {
        let mut waiting: VecDeque<_> = (0..5).map(|i| write(&[&format!("k{i}")], 10)).collect();
        assert_eq!(form(&mut waiting, 2, |b| b).len(), 2);
        assert_eq!(waiting.len(), 3);

        // A write larger than the limit still goes, alone.
        let mut waiting = VecDeque::from([write(&["big"], MAX_BATCH_BYTES + 1), write(&["small"], 10)]);
        assert_eq!(keys(&form(&mut waiting, 32, |b| b)), ["big"]);
        let mut waiting = VecDeque::from([write(&["x"], MAX_BATCH_BYTES - 5), write(&["y"], 10), write(&["z"], 5)]);
        assert_eq!(keys(&form(&mut waiting, 32, |b| b)), ["x", "z"]);
    }
}
