//! Catching up faster than one etcd watch can. etcd sends a watch that is
//! behind at most 1,000 revisions per sync of its unsynced watchers, and
//! syncs a lagging watcher every 100 ms (`watchBatchMaxRevs`,
//! `watchResyncPeriod` in etcd's `storage/mvcc`), so one watch catches up at
//! 10,000 revisions/s at best. With a large backlog the mirror opens several
//! watches ("legs") over the same range, started at staggered revisions
//! across the backlog, so etcd fills them in parallel, and reads them as a
//! relay: the first leg until it has delivered the revision before the
//! second one's start, then the second, and so on; the last goes on as the
//! live stream. Each leg delivers whole revisions in order, and a leg that
//! hands over may already have delivered some of its successor's revisions:
//! the mirror loop drops events at or below the newest revision it has
//! taken, so no revision is applied twice or out of order. What a leg
//! buffers before its turn is bounded by gRPC flow control and etcd's
//! per-watch queue.

use std::collections::VecDeque;

use etcd_client::{Client, WatchOptions, WatchResponse, WatchStream};
use tern_common::etcd::WATCH_MESSAGE_LIMIT;

/// A backlog of at least this many revisions is caught up by a relay.
pub const RELAY_MIN_BACKLOG: i64 = 2_000;
/// The most legs of one relay. etcd reads the unsynced range once per sync
/// for all lagging watches together, so a leg costs the source little; the
/// first leg's share bounds the catch-up time (measured: 4 legs over 20,000
/// revisions took 0.91 s, the first leg alone 0.67 s of it; with 16 legs
/// the relay was bound by applying, ~30,000 revisions/s here).
const MAX_LEGS: i64 = 32;
/// Revisions per leg, as far as `MAX_LEGS` allows: what etcd sends a
/// lagging watch in one sync, so every leg is filled by the first.
const LEG_REVISIONS: i64 = 1_000;

struct Leg {
    start: i64,
    stream: WatchStream,
}

pub struct Relay {
    legs: VecDeque<Leg>,
}

/// Where the legs start: `from`, then evenly across `from..=newest`.
fn starts(from: i64, newest: i64) -> Vec<i64> {
    let backlog = newest - from + 1;
    if backlog < RELAY_MIN_BACKLOG {
        return vec![from];
    }
    let legs = ((backlog + LEG_REVISIONS - 1) / LEG_REVISIONS).clamp(1, MAX_LEGS);
    (0..legs).map(|i| from + i * backlog / legs).collect()
}

impl Relay {
    /// Watches from revision `from`, `options` giving the range; `newest` is
    /// the source's current revision, which sizes the relay.
    pub async fn open(
        client: &Client,
        key: &[u8],
        options: WatchOptions,
        from: i64,
        newest: i64,
    ) -> Result<Self, etcd_client::Error> {
        // Opened together: each waits for etcd's answer, one round trip
        // to a source that may be across an ocean.
        let legs = futures::future::try_join_all(starts(from, newest).into_iter().map(|start| {
            let options = options.clone().with_start_revision(start);
            async move {
                let stream = client
                    .watch_client()
                    .max_decoding_message_size(WATCH_MESSAGE_LIMIT)
                    .watch(key, Some(options))
                    .await?;
                Ok::<_, etcd_client::Error>(Leg { start, stream })
            }
        }))
        .await?;
        Ok(Self { legs: legs.into() })
    }

    /// How many legs are left (1: a plain watch).
    pub fn legs(&self) -> usize {
        self.legs.len()
    }

    /// The next response of the leg whose turn it is; hands over to the next
    /// leg once this one has delivered the revision before the next start
    /// (by an event, or by a progress notice past it).
    pub async fn message(&mut self) -> Result<Option<WatchResponse>, etcd_client::Error> {
        let Some(leg) = self.legs.front_mut() else {
            return Ok(None);
        };
        let resp = leg.stream.message().await?;
        if let (Some(r), Some(next)) = (&resp, self.legs.get(1)) {
            let reached = match r
                .events()
                .iter()
                .filter_map(|e| e.kv())
                .map(|kv| kv.mod_revision())
                .max()
            {
                Some(rev) => Some(rev),
                // A progress notice: everything up to its header is delivered.
                None if !r.created() && !r.canceled() => r.header().map(|h| h.revision()),
                None => None,
            };
            if reached.is_some_and(|rev| rev >= next.start - 1) {
                tracing::debug!(next = next.start, "relay: handing over to the next leg");
                // Dropping the finished leg's stream ends its watch.
                self.legs.pop_front();
            }
        }
        Ok(resp)
    }

    /// Asks the leg whose turn it is for a progress notice.
    pub async fn request_progress(&mut self) -> Result<(), etcd_client::Error> {
        match self.legs.front_mut() {
            Some(leg) => leg.stream.request_progress().await,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_backlog_is_one_watch_and_a_large_one_is_spread() {
        assert_eq!(starts(101, 1_000), vec![101]);
        assert_eq!(starts(1, RELAY_MIN_BACKLOG - 1), vec![1]);
        assert_eq!(starts(1, 2_000), vec![1, 1_001]);
        assert_eq!(starts(1, 2_001), vec![1, 668, 1_335]);
        assert_eq!(starts(1, 4_000), vec![1, 1_001, 2_001, 3_001]);
        let many = starts(1, 100_000);
        assert_eq!(many.len(), MAX_LEGS as usize);
        assert_eq!(many[1], 1 + 100_000 / MAX_LEGS);
        assert_eq!(starts(500, 500 + 2_999), vec![500, 1_500, 2_500]);
        assert!(starts(1, 1_000_000).windows(2).all(|w| w[1] > w[0]));
    }
}
