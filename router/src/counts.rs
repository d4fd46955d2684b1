//! Writes per account by origin region in a sliding window: the evidence the
//! home agent uses to move an account where it is used (follow the sun). The
//! window is split into buckets, so memory per account is bounded, and the
//! number of accounts tracked is capped.
//!
//! Every write to an account homed here passes through a router of this
//! region (writes from elsewhere are forwarded here, their origin in a
//! header only a peer router holding the token may set), so the routers of
//! the home region together see all of them. Each publishes its counts into
//! the region's group every `--write-count-publish-interval`
//! (`/tern/stats/counts/{instance}/{chunk}`), where the agent sums them;
//! accounts written only from this region are left out (they cannot
//! move), which keeps the records small.
//! A router that restarts loses what it counted since its last publish;
//! what it published stays until its buckets leave the window (the agent
//! deletes it then), so counts survive restarts, approximately.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tern_common::{AccountId, RegionName, WriteCountsRecord, counts_key};

use crate::leader::Group;

/// Accounts per published record: a record stays far below etcd's request
/// limit (an account with three origins is ~150 bytes).
const ACCOUNTS_PER_RECORD: usize = 5_000;

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

    /// What was counted in the window ending at `now_secs` for accounts
    /// written from somewhere other than `home` (only those can move), as
    /// records of at most `per_record` accounts.
    pub fn snapshot(
        &self,
        now_secs: u64,
        per_record: usize,
        published_ms: u64,
        home: &RegionName,
    ) -> Vec<WriteCountsRecord> {
        let oldest = (now_secs / self.bucket_secs).saturating_sub(BUCKETS - 1);
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut records = Vec::new();
        let mut current = WriteCountsRecord {
            bucket_secs: self.bucket_secs,
            published_ms,
            ..Default::default()
        };
        for (account, by_origin) in inner.iter() {
            let origins: std::collections::BTreeMap<String, Vec<(u64, u64)>> = by_origin
                .iter()
                .map(|(r, b)| {
                    (
                        r.to_string(),
                        b.iter().filter(|(b, _)| *b >= oldest).copied().collect::<Vec<_>>(),
                    )
                })
                .filter(|(_, b)| !b.is_empty())
                .collect();
            if !origins.keys().any(|origin| origin != home.as_str()) {
                continue;
            }
            current.accounts.insert(account.to_string(), origins);
            if current.accounts.len() >= per_record.max(1) {
                let next = WriteCountsRecord {
                    bucket_secs: self.bucket_secs,
                    published_ms,
                    ..Default::default()
                };
                records.push(std::mem::replace(&mut current, next));
            }
        }
        if !current.accounts.is_empty() {
            records.push(current);
        }
        records
    }

    /// Publishes the counts into the region's group every `interval` until
    /// aborted: one key per record, and the keys of records this router no
    /// longer has deleted. Failures are logged and tried again next time.
    pub async fn publish(
        self: std::sync::Arc<Self>,
        group: Group,
        region: RegionName,
        instance: String,
        interval: Duration,
    ) {
        let mut published = 0usize;
        loop {
            tokio::time::sleep(interval).await;
            let now = tern_common::unix_now();
            let records = self.snapshot(now.as_secs(), ACCOUNTS_PER_RECORD, now.as_millis() as u64, &region);
            let mut client = group.any();
            let mut failed = false;
            for (n, record) in records.iter().enumerate() {
                let Ok(value) = serde_json::to_vec(record) else {
                    continue;
                };
                if let Err(e) = client.put(counts_key(&instance, n), value, None).await {
                    tracing::warn!(error = %e, "could not publish write counts");
                    failed = true;
                    break;
                }
            }
            if failed {
                continue;
            }
            for n in records.len()..published {
                let _ = client.delete(counts_key(&instance, n), None).await;
            }
            published = records.len();
        }
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
    fn a_snapshot_holds_the_window_in_records_of_bounded_size() {
        let (a, us, eu) = ids();
        let c = WriteCounts::new(Duration::from_secs(24 * 3600), 10);
        let t0 = 1_000_000_000;
        c.record(&a, &eu, t0);
        c.record(&a, &eu, t0);
        c.record(&a, &us, t0 - 2 * 24 * 3600);
        let b = AccountId::new("b").expect("valid");
        c.record(&b, &us, t0);
        c.record(&b, &eu, t0);
        let home_only = AccountId::new("c").expect("valid");
        c.record(&home_only, &us, t0);
        let records = c.snapshot(t0, 1, 7, &us);
        assert_eq!(records.len(), 2, "one account per record, none written only from home");
        let all: std::collections::BTreeMap<_, _> = records.iter().flat_map(|r| r.accounts.clone()).collect();
        let bucket = t0 / c.bucket_secs;
        assert_eq!(all["a"]["eu-west"], vec![(bucket, 2)]);
        assert!(
            !all["a"].contains_key("us-east"),
            "a bucket out of the window is not published"
        );
        assert_eq!(all["b"]["us-east"], vec![(bucket, 1)]);
        assert!(counts_key("r1", 0).starts_with(tern_common::COUNTS_PREFIX));
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
