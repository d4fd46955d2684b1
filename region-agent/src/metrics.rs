//! Prometheus metrics of an agent: mirror lag per source (ms and revisions),
//! clock skew, heartbeat age, applied revisions, resyncs, refused writes,
//! and the Raft lag of the region's own members.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

/// A migration's or a follow-the-sun decision's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    pub member: String,
}

/// A scheduled backup's group (the region's or `directory`) and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackupLabels {
    pub group: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub group: String,
}

type G = Gauge<i64, AtomicI64>;

pub struct Metrics {
    registry: Registry,
    pub lag_ms: Family<SourceLabels, G>,
    pub lag_revisions: Family<SourceLabels, G>,
    pub skew_ms: Family<SourceLabels, G>,
    pub lag_error_ms: Family<SourceLabels, G>,
    pub clock_offset_warning: Family<SourceLabels, G>,
    pub heartbeat_age_ms: Family<SourceLabels, G>,
    pub applied_revisions: Family<SourceLabels, Counter>,
    pub resyncs: Family<SourceLabels, Counter>,
    /// Backlogs caught up by a relay of several watches.
    pub relayed_catchups: Family<SourceLabels, Counter>,
    pub member_behind: Family<MemberLabels, G>,
    /// Moves into this region that ended, by outcome.
    pub migrations: Family<OutcomeLabels, Counter>,
    /// Fence to switch of the last completed move into this region, ms.
    pub migration_unavailable_ms: G,
    /// Follow-the-sun decisions about accounts homed here, by outcome.
    pub sun_decisions: Family<OutcomeLabels, Counter>,
    pub is_leader: G,
    pub refused_writes: Counter,
    pub heartbeats: Counter,
    /// Regions this agent failed over (Automatic mode).
    pub failovers: Counter,
    /// Writes of this region that its successor never had, quarantined.
    pub quarantined_writes: Counter,
    /// While draining: accounts still homed here.
    pub drain_homed: G,
    /// Moves out of this region a drain asked for.
    pub drain_moves: Counter,
    /// Scheduled backups taken, by group and outcome.
    pub backups: Family<BackupLabels, Counter>,
    /// When the newest backup of a group began (Unix seconds).
    pub last_backup_seconds: Family<GroupLabels, G>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tern_agent");
        let m = Self {
            lag_ms: Family::default(),
            lag_revisions: Family::default(),
            skew_ms: Family::default(),
            lag_error_ms: Family::default(),
            clock_offset_warning: Family::default(),
            heartbeat_age_ms: Family::default(),
            applied_revisions: Family::default(),
            resyncs: Family::default(),
            relayed_catchups: Family::default(),
            member_behind: Family::default(),
            migrations: Family::default(),
            migration_unavailable_ms: G::default(),
            sun_decisions: Family::default(),
            is_leader: G::default(),
            refused_writes: Counter::default(),
            heartbeats: Counter::default(),
            failovers: Counter::default(),
            quarantined_writes: Counter::default(),
            drain_homed: G::default(),
            drain_moves: Counter::default(),
            backups: Family::default(),
            last_backup_seconds: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "mirror_lag_ms",
            "How stale the mirror of a source region may be, ms",
            m.lag_ms.clone(),
        );
        registry.register(
            "mirror_lag_revisions",
            "Source revisions not yet applied to the mirror",
            m.lag_revisions.clone(),
        );
        registry.register(
            "clock_skew_ms",
            "Clock offset of the source's agent, measured from timestamped round trips, ms (positive: ahead)",
            m.skew_ms.clone(),
        );
        registry.register(
            "mirror_lag_error_ms",
            "Error bound of mirror_lag_ms and clock_skew_ms (half the round trip of the offset measurement plus drift), ms",
            m.lag_error_ms.clone(),
        );
        registry.register(
            "clock_offset_warning",
            "1 while the source's clock is off by more than --max-clock-offset beyond the error bound",
            m.clock_offset_warning.clone(),
        );
        registry.register(
            "heartbeat_age_ms",
            "Time since the source's newest heartbeat reached the mirror, ms",
            m.heartbeat_age_ms.clone(),
        );
        registry.register(
            "mirror_applied_revisions",
            "Source revisions applied to the mirror",
            m.applied_revisions.clone(),
        );
        registry.register(
            "mirror_resyncs",
            "Full resynchronisations from a snapshot (the source compacted past the mirror)",
            m.resyncs.clone(),
        );
        registry.register(
            "mirror_relayed_catchups",
            "Backlogs of at least 2,000 source revisions caught up by several watches at once (relay.rs)",
            m.relayed_catchups.clone(),
        );
        registry.register(
            "raft_member_behind",
            "Entries a member of this region's group is behind the leader's commit index",
            m.member_behind.clone(),
        );
        registry.register(
            "migrations",
            "Moves of accounts into this region that ended: completed, rolled_back, refused",
            m.migrations.clone(),
        );
        registry.register(
            "migration_unavailable_ms",
            "Fence to directory switch of the last completed move into this region, ms",
            m.migration_unavailable_ms.clone(),
        );
        registry.register(
            "follow_the_sun_decisions",
            "Follow-the-sun decisions about accounts homed here: moved, would_move (dry run), skipped",
            m.sun_decisions.clone(),
        );
        registry.register(
            "is_leader",
            "1 while this agent is the region's active agent",
            m.is_leader.clone(),
        );
        registry.register(
            "refused_writes",
            "Writes refused because this agent no longer held leadership",
            m.refused_writes.clone(),
        );
        registry.register("heartbeats", "Heartbeats written", m.heartbeats.clone());
        registry.register(
            "failovers",
            "Lost regions this agent failed over to its own region (automatic failover)",
            m.failovers.clone(),
        );
        registry.register(
            "quarantined_writes",
            "Writes this region committed that its successor never had, written to the quarantine after the region came back from a failover",
            m.quarantined_writes.clone(),
        );
        registry.register(
            "drain_homed_accounts",
            "While this region drains: accounts still homed here (0 when drained, or not draining)",
            m.drain_homed.clone(),
        );
        registry.register(
            "drain_moves",
            "Moves of accounts out of this region that a drain asked for",
            m.drain_moves.clone(),
        );
        registry.register(
            "backups",
            "Scheduled backups (etcd snapshots) taken by this agent, by group and outcome (ok; failed: not taken, or the backups could not be read; prune_failed: taken, old ones not deleted)",
            m.backups.clone(),
        );
        registry.register(
            "last_backup_timestamp_seconds",
            "When the newest complete backup of a group began, Unix seconds, exported by the leading agent only (alert when it is older than the schedule allows)",
            m.last_backup_seconds.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    pub fn outcome(outcome: &str) -> OutcomeLabels {
        OutcomeLabels {
            outcome: outcome.to_string(),
        }
    }

    pub fn source(source: &str) -> SourceLabels {
        SourceLabels {
            source: source.to_string(),
        }
    }
}
