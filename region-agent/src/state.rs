//! What the agent's loops share: identity, clocks, and per-mirror state.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tern_common::{MemberStatus, MirrorStatus, RegionName, SourceRevision};
use tokio::time::Instant;

use crate::lag::LagEstimator;
use crate::metrics::Metrics;

/// One mirror as its loop sees it.
#[derive(Debug, Default)]
pub struct MirrorState {
    pub lag: LagEstimator,
    /// Last source revision applied to the mirror.
    pub applied: SourceRevision,
    /// Source revisions confirmed to hold nothing more for the mirror (watch
    /// progress), so the mirror is current up to here.
    pub confirmed: SourceRevision,
    /// Newest source revision seen in a response header.
    pub source_revision: SourceRevision,
    pub state: tern_common::MirrorState,
}

pub struct Shared {
    pub region: RegionName,
    pub identity: String,
    /// Differs from one start of the agent to the next: heartbeats carry it,
    /// so a mirror knows when its source's clock may have changed.
    pub boot: u64,
    pub clock_offset_ms: i64,
    pub metrics: Arc<Metrics>,
    pub mirrors: Mutex<BTreeMap<RegionName, MirrorState>>,
    pub members: Mutex<Vec<MemberStatus>>,
    /// Test hook: a paused agent does nothing, like a stopped process.
    pub paused: Arc<AtomicBool>,
    /// Kubernetes events on the GeoCluster, when running with --geocluster.
    pub events: Option<crate::events::Events>,
    /// Spans of heartbeats and mirrored revisions, when exporting.
    pub telemetry: tern_common::telemetry::Telemetry,
    /// This leadership's hold on the region's directory lease key, once
    /// `publish` has claimed it: every directory write of the agent
    /// carries its guard.
    pub claim: Mutex<Option<crate::publish::Claim>>,
    /// The directory lease whose keep-alive was last answered, and when
    /// (this agent's monotonic clock) that keep-alive was *sent*: the
    /// directory extended the lease after that instant, so the lease key
    /// lives at least until then plus the TTL.
    pub lease_renewed: Mutex<Option<(i64, Instant)>>,
    /// The failpoint this start of the agent stops at (`failpoints` builds).
    #[cfg(feature = "failpoints")]
    pub failpoint: Mutex<Option<String>>,
}

/// An id for this start of the agent: the start time in ns mixed with the
/// process id.
pub fn boot_id() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 40)
}

impl Shared {
    /// This agent's wall clock (with the configured test offset), Unix ms.
    pub fn wall_ms(&self) -> i64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        now + self.clock_offset_ms
    }

    /// What this agent's next heartbeat echoes: per mirrored region, its
    /// newest heartbeat applied.
    pub fn echoes(&self) -> BTreeMap<String, crate::heartbeat::Echo> {
        let mirrors = self.mirrors.lock().unwrap_or_else(|e| e.into_inner());
        mirrors
            .iter()
            .filter_map(|(source, m)| Some((source.to_string(), m.lag.echo()?)))
            .collect()
    }

    /// The directory lease claim of the current leadership, if held.
    pub fn claim(&self) -> Option<crate::publish::Claim> {
        self.claim.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Notes that a renewal of lease `lease` sent at `sent` was answered;
    /// kept when it is the lease the claim in the directory is bound to
    /// (the same keep-alive loop renews the election lease too).
    pub fn renewed(&self, lease: i64, sent: Instant) {
        if self.claim().is_some_and(|c| c.lease == lease) {
            self.granted(lease, sent);
        }
    }

    /// Notes that the directory lease `lease`, requested at `sent`, was
    /// granted: its TTL runs from a moment after `sent`.
    pub fn granted(&self, lease: i64, sent: Instant) {
        let mut r = self.lease_renewed.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none_or(|(l, at)| l != lease || at < sent) {
            *r = Some((lease, sent));
        }
    }

    /// How long the region's lease key is certain to exist in the
    /// directory from now, less `margin`: zero or more while this agent
    /// holds the key, else why it cannot say.
    pub fn lease_remaining(
        &self,
        ttl: std::time::Duration,
        margin: std::time::Duration,
    ) -> Result<(crate::publish::Claim, std::time::Duration), String> {
        let claim = self.claim().ok_or_else(|| {
            format!(
                "the agent does not hold region {}'s lease in the directory",
                self.region
            )
        })?;
        let renewed = *self.lease_renewed.lock().unwrap_or_else(|e| e.into_inner());
        match renewed {
            Some((lease, sent)) if lease == claim.lease => {
                let until = sent + ttl.saturating_sub(margin);
                Ok((claim, until.saturating_duration_since(Instant::now())))
            }
            _ => Err(format!(
                "no renewal of region {}'s directory lease answered yet",
                self.region
            )),
        }
    }

    /// Whether the named failpoint is the one set (and not yet reached):
    /// reaching it clears it, so the next leadership goes on. Always false
    /// in builds without the `failpoints` feature.
    #[cfg(not(feature = "failpoints"))]
    pub fn failpoint(&self, _name: &str) -> bool {
        false
    }

    #[cfg(feature = "failpoints")]
    pub fn failpoint(&self, name: &str) -> bool {
        let mut set = self.failpoint.lock().unwrap_or_else(|e| e.into_inner());
        if set.as_deref() == Some(name) {
            *set = None;
            true
        } else {
            false
        }
    }

    pub fn with_mirror<T>(&self, source: &RegionName, f: impl FnOnce(&mut MirrorState) -> T) -> T {
        let mut mirrors = self.mirrors.lock().unwrap_or_else(|e| e.into_inner());
        f(mirrors.entry(source.clone()).or_default())
    }

    /// Every mirror's status now.
    pub fn mirror_statuses(&self) -> BTreeMap<String, MirrorStatus> {
        let now = Instant::now();
        let wall = self.wall_ms();
        let mirrors = self.mirrors.lock().unwrap_or_else(|e| e.into_inner());
        mirrors
            .iter()
            .map(|(source, m)| {
                let effective = m.applied.max(m.confirmed);
                let lag = m.lag.lag_ms(now);
                let offset = m.lag.offset(now);
                (
                    source.to_string(),
                    MirrorStatus {
                        state: m.state,
                        lag_ms: lag.map_or(u64::MAX, |(ms, _)| ms),
                        lag_error_ms: lag.map_or(u64::MAX, |(_, error)| error),
                        lag_revisions: m.source_revision.since(effective),
                        applied_revision: m.applied,
                        skew_ms: offset.map_or(0, |o| o.ms),
                        heartbeat_age_ms: m
                            .lag
                            .heartbeat_age(now)
                            .map(|d| d.as_millis() as u64)
                            .unwrap_or(u64::MAX),
                        measured_unix_ms: wall,
                    },
                )
            })
            .collect()
    }
}
