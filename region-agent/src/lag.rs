//! Replication lag in milliseconds, right when idle, never negative, and
//! apart from clock skew.
//!
//! Every heartbeat carries the source agent's wall clock. When the mirror
//! applies one at local time r, `r - wall` is the one-way delay d plus the
//! clock offset between the two agents. Round trips to the source (timed by
//! this agent, one clock) give d ≈ RTT / 2, so the offset (skew) is
//! min(r - wall) - min(RTT) / 2 and is reported on its own. The lag is then
//!
//!   lag = (now - r_last) + max(0, (r_last - wall_last) - skew)
//!
//! the age of the newest heartbeat the mirror holds plus its estimated travel
//! time: on an idle source it stays near d plus at most one heartbeat
//! interval, it grows one ms per ms while the link is cut, and neither term
//! can go below zero.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Samples kept for the minimum filters.
const WINDOW: usize = 64;

#[derive(Debug, Default)]
pub struct LagEstimator {
    /// r - wall of recent heartbeats, ms.
    offsets: VecDeque<i64>,
    rtts: VecDeque<Duration>,
    last: Option<(Instant, i64)>,
}

impl LagEstimator {
    /// A source heartbeat written at `wall_ms` (source clock) reached the
    /// mirror at `now` / `now_wall_ms` (this agent's clocks).
    pub fn heartbeat(&mut self, now: Instant, now_wall_ms: i64, wall_ms: i64) {
        let offset = now_wall_ms - wall_ms;
        push(&mut self.offsets, offset);
        self.last = Some((now, offset));
    }

    /// A round trip to the source took `rtt`.
    pub fn round_trip(&mut self, rtt: Duration) {
        push(&mut self.rtts, rtt);
    }

    fn one_way_ms(&self) -> i64 {
        self.rtts.iter().min().map(|d| (d.as_millis() / 2) as i64).unwrap_or(0)
    }

    /// Clock offset of the source from this agent, ms (positive: the source
    /// is ahead).
    pub fn skew_ms(&self) -> Option<i64> {
        let min = *self.offsets.iter().min()?;
        Some(self.one_way_ms() - min)
    }

    /// Time since the newest heartbeat reached the mirror.
    pub fn heartbeat_age(&self, now: Instant) -> Option<Duration> {
        self.last.map(|(at, _)| now.saturating_duration_since(at))
    }

    /// The mirror's lag, ms; None before the first heartbeat.
    pub fn lag_ms(&self, now: Instant) -> Option<u64> {
        let (at, offset) = self.last?;
        let age = now.saturating_duration_since(at).as_millis() as u64;
        let skew = self.skew_ms().unwrap_or(0);
        // offset = d + (local - source) = d - skew.
        let travel = (offset + skew).max(0) as u64;
        Some(age + travel)
    }
}

fn push<T>(q: &mut VecDeque<T>, v: T) {
    if q.len() == WINDOW {
        q.pop_front();
    }
    q.push_back(v);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Heartbeats every 100 ms over a link with one-way delay `d`, from a
    /// source whose clock is `skew` ms ahead.
    fn feed(e: &mut LagEstimator, start: Instant, d: u64, skew: i64, beats: u64) -> Instant {
        let mut now = start;
        for i in 0..beats {
            let sent_wall = 1_000_000 + (i * 100) as i64;
            now = start + Duration::from_millis(i * 100 + d);
            let local_wall = sent_wall - skew + d as i64;
            e.heartbeat(now, local_wall, sent_wall);
            e.round_trip(Duration::from_millis(2 * d + 1));
        }
        now
    }

    #[tokio::test(start_paused = true)]
    async fn lag_is_the_link_delay_when_idle() {
        let mut e = LagEstimator::default();
        let now = feed(&mut e, Instant::now(), 40, 0, 50);
        let lag = e.lag_ms(now).expect("heartbeats seen");
        assert!((40..=41).contains(&lag), "{lag}");
        // Just before the next heartbeat: at most one interval more.
        let lag = e.lag_ms(now + Duration::from_millis(99)).expect("seen");
        assert!(lag <= 40 + 100, "{lag}");
    }

    #[tokio::test(start_paused = true)]
    async fn skew_is_reported_not_added() {
        for skew in [-5000, -40, 0, 70, 5000] {
            let mut e = LagEstimator::default();
            let now = feed(&mut e, Instant::now(), 40, skew, 50);
            let lag = e.lag_ms(now).expect("seen");
            assert!((39..=41).contains(&lag), "skew {skew}: lag {lag}");
            let measured = e.skew_ms().expect("measured");
            assert!((measured - skew).abs() <= 1, "skew {skew}: measured {measured}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lag_grows_while_cut() {
        let mut e = LagEstimator::default();
        let now = feed(&mut e, Instant::now(), 10, 0, 20);
        let later = now + Duration::from_secs(3);
        assert!(e.lag_ms(later).expect("seen") >= 3000);
    }
}
