//! Replication lag in milliseconds, and the clock offset it is corrected by,
//! measured apart (DESIGN.md, "Lag").
//!
//! **Offset.** Heartbeats are the round trip, as NTP's four-timestamp
//! exchange: each heartbeat of region B echoes, for every region A it
//! mirrors, the newest heartbeat of A it applied (A's time `t0`) and when it
//! applied it (B's time `t1`); the heartbeat itself carries B's time `t2`,
//! and A applies it at its time `t3`. Then
//!
//!   offset = ((t1 − t0) + (t2 − t3)) / 2      (B's clock minus A's)
//!   delay  = (t3 − t0) − (t2 − t1)            (the round trip, B's wait excluded)
//!
//! and the true offset is within delay / 2 of it, whatever the delays are,
//! as long as each direction takes no negative time. Of the samples of the
//! last minute the one with the smallest error (delay / 2 plus 100 ppm of
//! drift since) is used, as NTP's clock filter does: a delay that sets in
//! and persists makes new samples worse, never the estimate wrong, so a
//! delay that persists is lag, not skew.
//!
//! **Lag.** The age of the newest applied source heartbeat on the source's
//! clock, corrected by the offset:
//!
//!   lag = (now − applied_at) + max(0, applied_wall − (source_wall − offset))
//!
//! published with the offset's error bound. A restarted agent has no
//! sample until its own heartbeat has gone to the source and come back
//! (lag is unknown meanwhile); its first lag then covers the backlog, since
//! the newest applied heartbeat is as old as the backlog.
//!
//! **Closed time.** For routers, which must never report less staleness than
//! the truth, the agent writes with each applied heartbeat the local time
//! before which the mirror holds every source write: `source_wall − offset −
//! error` (`closed_ms`).

use std::collections::VecDeque;
use std::time::Duration;

use tern_common::RegionName;
use tokio::time::Instant;

use crate::heartbeat::{Echo, Heartbeat};

/// How long offset samples are kept.
const WINDOW: Duration = Duration::from_secs(60);
/// Most samples kept (ten heartbeats a second for a minute).
const MAX_SAMPLES: usize = 600;
/// Drift allowed between two clocks, ppm: an old sample's error grows by it.
const DRIFT_PPM: u64 = 100;

/// One four-timestamp exchange.
#[derive(Clone, Copy, Debug)]
struct Sample {
    offset_ms: i64,
    delay_ms: i64,
    at: Instant,
}

impl Sample {
    fn error_ms(&self, now: Instant) -> u64 {
        let age_ms = now.saturating_duration_since(self.at).as_millis() as u64;
        // Half the round trip, rounded up, plus the drift since.
        (self.delay_ms as u64).div_ceil(2) + age_ms * DRIFT_PPM / 1_000_000
    }
}

/// The source's clock minus this agent's, within `error_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offset {
    pub ms: i64,
    pub error_ms: u64,
}

/// The newest source heartbeat the mirror applied.
#[derive(Clone, Copy, Debug)]
struct Last {
    /// When it was applied (this agent's monotonic and wall clocks).
    at: Instant,
    at_wall_ms: i64,
    /// Its time on the source's clock.
    source_wall_ms: i64,
}

#[derive(Debug, Default)]
pub struct LagEstimator {
    samples: VecDeque<Sample>,
    last: Option<Last>,
    /// The source agent's start the samples were taken against.
    source_boot: Option<u64>,
}

impl LagEstimator {
    /// A source heartbeat `beat` was applied to the mirror at `now` /
    /// `now_wall_ms` (this agent's clocks): `sample`, then `applied`.
    pub fn heartbeat(&mut self, now: Instant, now_wall_ms: i64, beat: &Heartbeat, local: &RegionName) {
        self.sample(now, now_wall_ms, beat, local);
        self.applied(now, now_wall_ms, beat);
    }

    /// The mirror now holds `beat`, applied at `now` / `now_wall_ms`.
    pub fn applied(&mut self, now: Instant, now_wall_ms: i64, beat: &Heartbeat) {
        self.last = Some(Last {
            at: now,
            at_wall_ms: now_wall_ms,
            source_wall_ms: beat.wall_ms,
        });
    }

    /// `beat` has arrived (it need not be applied yet): its echo of
    /// `local`'s heartbeats, if any, is a sample of the offset. Fed before
    /// the closed time of the transaction that applies it is computed, so a
    /// heartbeat showing that the source's clock changed never gets a closed
    /// time from the old offset.
    pub fn sample(&mut self, now: Instant, now_wall_ms: i64, beat: &Heartbeat, local: &RegionName) {
        // Another start of the source agent may run on another clock (a
        // failover to another node, a clock stepped while it was down): what
        // was measured against the previous one no longer holds.
        if self.source_boot != Some(beat.boot) {
            self.samples.clear();
            self.source_boot = Some(beat.boot);
        }
        let Some(echo) = beat.echoes.get(local.as_str()) else {
            return;
        };
        let (t0, t1, t2, t3) = (echo.sent_ms, echo.received_ms, beat.wall_ms, now_wall_ms);
        let delay_ms = (t3 - t0) - (t2 - t1);
        if delay_ms < 0 {
            // Only possible if a clock stepped back mid-exchange.
            return;
        }
        let offset_ms = ((t1 - t0) + (t2 - t3)).div_euclid(2);
        // A sample that contradicts the estimate (their error intervals do
        // not meet) means a clock stepped: the older samples are void.
        if let Some(best) = self.offset(now)
            && offset_ms.abs_diff(best.ms) > best.error_ms + (delay_ms as u64).div_ceil(2)
        {
            self.samples.clear();
        }
        while self.samples.len() >= MAX_SAMPLES
            || self
                .samples
                .front()
                .is_some_and(|s| now.saturating_duration_since(s.at) > WINDOW)
        {
            self.samples.pop_front();
        }
        self.samples.push_back(Sample {
            offset_ms,
            delay_ms,
            at: now,
        });
    }

    /// What this agent echoes back to the source in its next heartbeat: the
    /// newest source heartbeat applied, and when.
    pub fn echo(&self) -> Option<Echo> {
        self.last.map(|l| Echo {
            sent_ms: l.source_wall_ms,
            received_ms: l.at_wall_ms,
        })
    }

    /// The best offset measured in the last minute.
    pub fn offset(&self, now: Instant) -> Option<Offset> {
        self.samples
            .iter()
            .filter(|s| now.saturating_duration_since(s.at) <= WINDOW)
            .min_by_key(|s| s.error_ms(now))
            .map(|s| Offset {
                ms: s.offset_ms,
                error_ms: s.error_ms(now),
            })
    }

    /// Time since the newest heartbeat reached the mirror.
    pub fn heartbeat_age(&self, now: Instant) -> Option<Duration> {
        self.last.map(|l| now.saturating_duration_since(l.at))
    }

    /// The mirror's lag and its error bound, ms; None before the first
    /// heartbeat and the first offset sample.
    pub fn lag_ms(&self, now: Instant) -> Option<(u64, u64)> {
        let last = self.last?;
        let offset = self.offset(now)?;
        let age = now.saturating_duration_since(last.at).as_millis() as u64;
        let travel = (last.at_wall_ms - (last.source_wall_ms - offset.ms)).max(0) as u64;
        Some((age + travel, offset.error_ms))
    }

    /// The local time before which a mirror that holds the source heartbeat
    /// written at `source_wall_ms` holds every source write: that time on
    /// this clock, minus the error bound. None without an offset.
    pub fn closed_ms(&self, now: Instant, source_wall_ms: i64) -> Option<i64> {
        let offset = self.offset(now)?;
        Some(source_wall_ms - offset.ms - offset.error_ms as i64)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn region(name: &str) -> RegionName {
        RegionName::new(name).expect("valid")
    }

    /// Two agents, A (measuring) and B (the source), heartbeating every 100
    /// ms; B's clock is `skew` ms ahead of A's. `a_to_b` and `b_to_a` give
    /// the one-way delay of heartbeat i in each direction. Returns the
    /// instant of A's last application.
    fn exchange(
        e: &mut LagEstimator,
        start: Instant,
        skew: i64,
        beats: u64,
        a_to_b: impl Fn(u64) -> u64,
        b_to_a: impl Fn(u64) -> u64,
    ) -> Instant {
        let a = region("us-east");
        let mut now = start;
        for i in 0..beats {
            // True time of B's heartbeat i; A's heartbeat i left at the same
            // true time and reached B after a_to_b(i).
            let true_ms = 1_000_000 + (i * 100) as i64;
            let a_sent = true_ms; // A's clock is the true clock.
            let b_received = true_ms + a_to_b(i) as i64 + skew;
            let b_sent = b_received.max(true_ms + skew) + 1;
            let beat = Heartbeat {
                seq: i,
                wall_ms: b_sent,
                agent: "b".into(),
                boot: 1,
                echoes: BTreeMap::from([(
                    a.to_string(),
                    Echo {
                        sent_ms: a_sent,
                        received_ms: b_received,
                    },
                )]),
            };
            let arrival = (b_sent - skew) + b_to_a(i) as i64;
            now = start + Duration::from_millis((arrival - 1_000_000) as u64);
            e.heartbeat(now, arrival, &beat, &a);
        }
        now
    }

    #[test]
    fn offset_is_measured_within_its_bound_and_lag_is_the_link_delay() {
        for skew in [-5000, -40, 0, 70, 5000] {
            let mut e = LagEstimator::default();
            let now = exchange(&mut e, Instant::now(), skew, 50, |_| 40, |_| 40);
            let offset = e.offset(now).expect("measured");
            assert!(
                (offset.ms - skew).unsigned_abs() <= offset.error_ms,
                "skew {skew}: {offset:?}"
            );
            assert!(offset.error_ms <= 41, "{offset:?}");
            let (lag, error) = e.lag_ms(now).expect("lag");
            assert!(lag.abs_diff(40) <= error, "skew {skew}: lag {lag} ± {error}");
        }
    }

    #[test]
    fn a_delay_that_persists_is_lag_not_skew() {
        // 40 ms each way for 10 s, then 1,000 ms more from B to A for 50 s.
        let slow = |i: u64| if i >= 100 { 1040 } else { 40 };
        let start = Instant::now();
        let mut e = LagEstimator::default();
        let mut at = start;
        for beats in [150, 300, 600] {
            e = LagEstimator::default();
            at = exchange(&mut e, start, 250, beats, |_| 40, slow);
            let (lag, error) = e.lag_ms(at).expect("lag");
            assert!(
                lag + error >= 1040 && lag <= 1040 + error,
                "{beats} beats: {lag} ± {error}"
            );
            let offset = e.offset(at).expect("offset");
            assert!((offset.ms - 250).unsigned_abs() <= offset.error_ms, "{offset:?}");
        }
        // Closed time is never after the truth: B's heartbeat left at true
        // time `b_sent − skew`, and the mirror holds nothing newer.
        let last = e.last.expect("applied");
        let closed = e.closed_ms(at, last.source_wall_ms).expect("closed");
        assert!(closed <= last.source_wall_ms - 250, "{closed}");
    }

    #[test]
    fn lag_grows_while_cut_and_is_unknown_before_an_echo() {
        let mut e = LagEstimator::default();
        assert_eq!(e.lag_ms(Instant::now()), None);
        let now = exchange(&mut e, Instant::now(), 0, 20, |_| 10, |_| 10);
        let later = now + Duration::from_secs(3);
        assert!(e.lag_ms(later).expect("seen").0 >= 3000);
        // A heartbeat without an echo (the source has not seen ours yet)
        // gives no offset.
        let mut fresh = LagEstimator::default();
        let beat = Heartbeat {
            seq: 1,
            wall_ms: 5,
            agent: "b".into(),
            boot: 1,
            echoes: BTreeMap::new(),
        };
        fresh.heartbeat(Instant::now(), 10, &beat, &region("us-east"));
        assert_eq!(fresh.lag_ms(Instant::now()), None);
        assert!(fresh.echo().is_some());
    }

    #[test]
    fn a_stepped_or_restarted_source_clock_voids_the_old_samples() {
        let start = Instant::now();
        let mut e = LagEstimator::default();
        let at = exchange(&mut e, start, 0, 50, |_| 40, |_| 40);
        assert!(e.offset(at).expect("measured").ms.abs() <= 1);
        // The source's clock jumps 1,148 ms ahead (same agent): the first
        // sample after the jump contradicts the estimate and replaces it.
        let mut stepped = LagEstimator::default();
        let jump_at = exchange(&mut stepped, start, 0, 50, |_| 40, |_| 40);
        let later = exchange(&mut stepped, jump_at, 1148, 2, |_| 40, |_| 40);
        let offset = stepped.offset(later).expect("measured");
        assert!(offset.ms.abs_diff(1148) <= offset.error_ms, "{offset:?}");
        // A heartbeat from another start of the source agent, without an
        // echo yet: no offset (so no closed time) until one comes back.
        let beat = Heartbeat {
            seq: 1,
            wall_ms: 2_000_000,
            agent: "b".into(),
            boot: 2,
            echoes: BTreeMap::new(),
        };
        e.heartbeat(at, 2_000_000, &beat, &region("us-east"));
        assert_eq!(e.offset(at), None);
        assert_eq!(e.closed_ms(at, 2_000_000), None);
    }
}
