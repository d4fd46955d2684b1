//! Writes per account by origin region in a sliding window: the evidence the
//! home agent uses to move an account where it is used (follow the sun). The
//! window is split into buckets, so memory per account is bounded, and the
//! number of accounts tracked is capped.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tern_common::{AccountId, RegionName};

/// Buckets per window: counts age out in steps of window / BUCKETS.
const BUCKETS: u64 = 24;

/// (bucket number, writes in it), oldest first.
type Buckets = Vec<(u64, u64)>;

pub struct WriteCounts {
    bucket_secs: u64,
    max_accounts: usize,
    inner: Mutex<HashMap<AccountId, HashMap<RegionName, Buckets>>>,
}

impl WriteCounts {
    pub fn new(window: Duration, max_accounts: usize) -> Self {
        Self {
            bucket_secs: (window.as_secs() / BUCKETS).max(1),
            max_accounts,
            inner: Mutex::default(),
        }
    }

    /// Counts one write to `account` from `origin` at `now_secs` (Unix time).
    pub fn record(&self, account: &AccountId, origin: &RegionName, now_secs: u64) {
        let bucket = now_secs / self.bucket_secs;
        let oldest = bucket.saturating_sub(BUCKETS - 1);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !inner.contains_key(account) && inner.len() >= self.max_accounts {
            // Full: drop accounts whose counts have all aged out; if none
            // have, this account is not tracked (bounded memory first).
            inner.retain(|_, by_origin| by_origin.values().flatten().any(|(b, _)| *b >= oldest));
            if inner.len() >= self.max_accounts {
                return;
            }
        }
        let buckets = inner
            .entry(account.clone())
            .or_default()
            .entry(origin.clone())
            .or_default();
        buckets.retain(|(b, _)| *b >= oldest);
        match buckets.last_mut() {
            Some((b, n)) if *b == bucket => *n += 1,
            _ => buckets.push((bucket, 1)),
        }
    }

    /// Writes per origin region within the window ending at `now_secs`.
    pub fn window(&self, account: &AccountId, now_secs: u64) -> HashMap<RegionName, u64> {
        let oldest = (now_secs / self.bucket_secs).saturating_sub(BUCKETS - 1);
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .get(account)
            .map(|by_origin| {
                by_origin
                    .iter()
                    .map(|(r, b)| (r.clone(), b.iter().filter(|(b, _)| *b >= oldest).map(|(_, n)| n).sum()))
                    .filter(|(_, n)| *n > 0)
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn tracked_accounts(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (AccountId, RegionName, RegionName) {
        (
            AccountId::new("a").expect("valid"),
            RegionName::new("us-east").expect("valid"),
            RegionName::new("eu-west").expect("valid"),
        )
    }

    #[test]
    fn counts_slide_out_of_the_window() {
        let (a, us, eu) = ids();
        let c = WriteCounts::new(Duration::from_secs(24 * 3600), 10);
        let t0 = 1_000_000_000;
        c.record(&a, &us, t0);
        c.record(&a, &eu, t0);
        c.record(&a, &eu, t0 + 3600);
        let w = c.window(&a, t0 + 3600);
        assert_eq!((w[&us], w[&eu]), (1, 2));
        let later = c.window(&a, t0 + 24 * 3600);
        assert_eq!(later.get(&us), None);
        assert_eq!(later.get(&eu), Some(&1));
    }

    #[test]
    fn memory_is_bounded() {
        let (_, us, _) = ids();
        let c = WriteCounts::new(Duration::from_secs(3600), 2);
        for i in 0..5 {
            c.record(&AccountId::new(format!("acct-{i}")).expect("valid"), &us, 100);
        }
        assert_eq!(c.tracked_accounts(), 2);
    }
}
