//! Publishing lag: Prometheus gauges, and this region's record in the
//! directory (read by routers to decide bounded-staleness reads, and by
//! `tern status`). The record is updated with compare-and-swap on its
//! version, so the router's endpoint and the failover fields written by
//! others are kept.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use tern_common::{RegionRecord, RegionState, dir_region_key};

use crate::metrics::Metrics;
use crate::state::Shared;

pub async fn run(directory: Client, shared: Arc<Shared>, interval: Duration, max_clock_offset: Duration) {
    let key = dir_region_key(&shared.region);
    let mut c = directory;
    let mut warned: BTreeSet<String> = BTreeSet::new();
    loop {
        tokio::time::sleep(interval).await;
        let mirrors = shared.mirror_statuses();
        for (source, m) in &mirrors {
            let labels = Metrics::source(source);
            let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            shared.metrics.lag_ms.get_or_create(&labels).set(clamp(m.lag_ms));
            shared
                .metrics
                .lag_error_ms
                .get_or_create(&labels)
                .set(clamp(m.lag_error_ms));
            shared.metrics.lag_revisions.get_or_create(&labels).set(m.lag_revisions);
            shared.metrics.skew_ms.get_or_create(&labels).set(m.skew_ms);
            // Off for sure: beyond the threshold even at the near end of
            // the error bound.
            let off = m.lag_error_ms != u64::MAX
                && m.skew_ms.unsigned_abs().saturating_sub(m.lag_error_ms) > max_clock_offset.as_millis() as u64;
            shared
                .metrics
                .clock_offset_warning
                .get_or_create(&labels)
                .set(i64::from(off));
            if off && warned.insert(source.clone()) {
                let note = format!(
                    "region {}: the clock of {source}'s agent is off by {} ms (± {} ms), more than {} ms; lag stays corrected by it",
                    shared.region,
                    m.skew_ms,
                    m.lag_error_ms,
                    max_clock_offset.as_millis()
                );
                tracing::warn!(source = %source, skew_ms = m.skew_ms, error_ms = m.lag_error_ms, "{note}");
                if let Some(events) = &shared.events {
                    events.warn("ClockOffset", note).await;
                }
            } else if !off {
                warned.remove(source);
            }
            shared
                .metrics
                .heartbeat_age_ms
                .get_or_create(&labels)
                .set(clamp(m.heartbeat_age_ms));
        }
        let members = shared.members.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for _ in 0..3 {
            let current = match c.get(key.clone(), None).await {
                Ok(r) => r.kvs().first().map(|kv| (kv.version(), kv.value().to_vec())),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the region record");
                    break;
                }
            };
            let (version, mut record) = match current {
                Some((v, bytes)) => match serde_json::from_slice::<RegionRecord>(&bytes) {
                    Ok(r) => (v, r),
                    Err(e) => {
                        tracing::warn!(error = %e, "the region record is malformed; not publishing");
                        break;
                    }
                },
                None => (
                    0,
                    RegionRecord {
                        router_endpoint: String::new(),
                        state: RegionState::Active,
                        successor: None,
                        region_epoch: 0,
                        mirrors: Default::default(),
                        members: Vec::new(),
                    },
                ),
            };
            record.mirrors = mirrors.clone();
            record.members = members.clone();
            let txn = Txn::new()
                .when([Compare::version(key.clone(), CompareOp::Equal, version)])
                .and_then([TxnOp::put(key.clone(), record.to_json(), None)]);
            match c.txn(txn).await {
                Ok(r) if r.succeeded() => break,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot publish the region record");
                    break;
                }
            }
        }
    }
}
