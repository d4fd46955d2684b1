//! How long idempotency records live. Each record is attached to an etcd
//! lease, so etcd deletes it once the retention has passed and a group's
//! keyspace does not grow with every idempotent write ever made. A retry
//! with the same key after that is a new write: clients retry within the
//! retention (24 h by default, as payment APIs keep their keys).
//!
//! One lease per time slice (a 24th of the retention, 1 s to 1 h) serves
//! every record written in that slice. Its TTL is the retention plus the
//! slice, so each record lives at least the retention and at most one slice
//! longer (etcd may extend a lease after a leader change, never shorten it),
//! and a router grants about 24 leases per retention period, not one per
//! write.

use std::time::{Duration, Instant};

use etcd_client::PutOptions;
use tokio::sync::Mutex;

use crate::leader::Group;

/// The lease of the current slice, granted once and shared.
pub struct RecordLeases {
    retention: Duration,
    slice: Duration,
    /// When the request for the lease was sent (its TTL runs from a moment
    /// after that) and its id.
    current: Mutex<Option<(Instant, i64)>>,
}

impl RecordLeases {
    pub fn new(retention: Duration) -> Self {
        let slice = (retention / 24).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        Self {
            retention,
            slice,
            current: Mutex::new(None),
        }
    }

    /// Options for putting a record now: the current slice's lease.
    pub async fn put_options(&self, group: &Group) -> Result<PutOptions, etcd_client::Error> {
        let mut current = self.current.lock().await;
        if let Some((asked, id)) = *current
            && asked.elapsed() < self.slice
        {
            return Ok(PutOptions::new().with_lease(id));
        }
        let asked = Instant::now();
        let ttl = (self.retention + self.slice).as_secs_f64().ceil() as i64;
        let id = group.any().lease_grant(ttl, None).await?.id();
        *current = Some((asked, id));
        Ok(PutOptions::new().with_lease(id))
    }

    /// When a record written now reaches the end of its retention (Unix
    /// ms): stored in the record, so a migration can give its copy the rest.
    pub fn expires_ms(&self) -> u64 {
        tern_common::unix_ms() + self.retention.as_millis() as u64
    }

    /// Drops the cached lease after etcd said it does not know it (revoked
    /// by hand, or the router was frozen longer than its TTL); the next
    /// record gets a new one.
    pub async fn forget(&self) {
        *self.current.lock().await = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_a_24th_of_the_retention_within_bounds() {
        assert_eq!(
            RecordLeases::new(Duration::from_secs(86_400)).slice,
            Duration::from_secs(3600)
        );
        assert_eq!(
            RecordLeases::new(Duration::from_secs(7 * 86_400)).slice,
            Duration::from_secs(3600)
        );
        assert_eq!(
            RecordLeases::new(Duration::from_secs(240)).slice,
            Duration::from_secs(10)
        );
        assert_eq!(RecordLeases::new(Duration::from_secs(2)).slice, Duration::from_secs(1));
    }
}
