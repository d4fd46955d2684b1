//! Records of the directory group, stored as JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{AccountId, Epoch, RegionName};

/// Where an account lives: `/tern/dir/accounts/{account}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub home: RegionName,
    pub epoch: Epoch,
    pub state: AccountState,
    /// Regions the account may be homed in; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_regions: Vec<RegionName>,
    /// When the account last moved (Unix ms, the switching agent's clock):
    /// the follow-the-sun cooldown counts from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_ms: Option<u64>,
    /// Never moved by the follow-the-sun policy (manual moves still are).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AccountState {
    Active,
    Migrating { target: RegionName },
}

/// A region: `/tern/dir/regions/{region}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionRecord {
    /// `host:port` of the region's routers, a DNS name or an address.
    pub router_endpoint: String,
    pub state: RegionState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successor: Option<RegionName>,
    #[serde(default)]
    pub region_epoch: u64,
    /// Written by the region's agent: how far behind each mirror of another
    /// region is, keyed by source region.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mirrors: BTreeMap<String, MirrorStatus>,
    /// Written by the region's agent: its group's members.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    /// Written by the region's agent while the region drains: how far the
    /// drain got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainProgress>,
}

/// A drain's progress, as the draining region's agent counts it
/// (`region-agent/src/drain.rs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainProgress {
    /// Unix ms when this agent started draining.
    pub started_ms: u64,
    /// Accounts homed in the region at the last count (moves under way
    /// included): the drain is done when this is 0.
    pub homed: u64,
    /// Moves this drain asked for that are under way.
    pub moving: u64,
    /// Moves this drain completed.
    pub moved: u64,
    /// Accounts that cannot leave now (no active region among their
    /// allowed regions, or their last move was refused); tried again.
    pub blocked: u64,
    /// Why the first blocked account is blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Unix ms of this count.
    pub updated_ms: u64,
}

/// What a mirror is doing, as its agent publishes it and routers read it
/// (a BOUNDED read is served from a mirror only while it streams).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MirrorState {
    /// The agent has not connected to the source yet.
    #[default]
    Starting,
    /// Applying the source's revisions as they come.
    Streaming,
    /// Copying a snapshot after the source compacted past the mirror.
    Resyncing,
    /// The link to the source is down; the agent reconnects.
    Disconnected,
    /// A failover made this region the source's successor: the mirror
    /// area serves the source's accounts and no longer follows the source.
    Promoted,
    /// Written by an agent newer than this reader.
    #[serde(other)]
    Unknown,
}

impl MirrorState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Streaming => "streaming",
            Self::Resyncing => "resyncing",
            Self::Disconnected => "disconnected",
            Self::Promoted => "promoted",
            Self::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for MirrorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`: tables align it with a width.
        f.pad(self.as_str())
    }
}

/// One mirror's replication lag as its agent measured it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorStatus {
    pub state: MirrorState,
    /// How stale the mirror is, in ms (the age of the newest applied source
    /// heartbeat on the source's clock, corrected by the measured offset);
    /// never negative.
    pub lag_ms: u64,
    /// The error bound of `lag_ms` (half the round trip of the offset
    /// measurement it used, plus drift since): the truth is within
    /// `lag_ms ± lag_error_ms`. u64::MAX before the first measurement.
    #[serde(default)]
    pub lag_error_ms: u64,
    /// Source revisions not yet applied.
    pub lag_revisions: i64,
    /// Last source revision applied.
    pub applied_revision: crate::SourceRevision,
    /// Clock offset of the source's agent from this one, in ms (positive:
    /// the source's clock is ahead), measured with timestamped round trips
    /// (never from heartbeat delays), within `lag_error_ms`.
    pub skew_ms: i64,
    /// Time since the last source heartbeat reached the mirror, ms.
    pub heartbeat_age_ms: u64,
    /// When this was measured (Unix ms, the agent's clock).
    pub measured_unix_ms: i64,
}

/// One member of a region's group, from its own status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub endpoint: String,
    pub is_leader: bool,
    pub raft_index: u64,
    pub applied_index: u64,
    /// Entries behind the leader's commit index.
    pub behind: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionState {
    Active,
    Draining,
    Failed,
}

impl AccountRecord {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("records always serialise")
    }
}

/// A hold on a region (`keys::dir_hold_key`): who holds it and why. The
/// agent names them when it refuses to claim the region's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionHold {
    pub by: String,
    pub reason: String,
    /// When it was put (Unix ms, the holder's clock), for people.
    pub since_ms: u64,
}

/// Who speaks for a region in the directory: `/tern/dir/leases/{region}`,
/// bound to a directory lease kept alive by the region's elected agent.
/// `leadership` is the creation revision of that agent's election key in
/// its own group; revisions only grow there, so a newer leader can take the
/// key over from a deposed one at once, and an older one never can.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLease {
    pub agent: String,
    pub leadership: i64,
    /// Set on the tombstone a failover leaves in the key: the region failed
    /// over to this successor, and no agent of it may claim the key again
    /// (its `leadership` is the largest there is) until it rejoins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_over_to: Option<String>,
}

impl RegionLease {
    /// The tombstone of a failover of the region to `successor`.
    pub fn failed_over(successor: &RegionName, region_epoch: u64) -> Self {
        Self {
            agent: format!("failover-{region_epoch}-to-{successor}"),
            leadership: i64::MAX,
            failed_over_to: Some(successor.to_string()),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("records always serialise")
    }
}

/// How routers reach their region's elected agent:
/// [`agent_endpoint_key`](crate::agent_endpoint_key), written by the agent
/// when it starts leading.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEndpoint {
    pub agent: String,
    /// `host:port` of its HTTP endpoint (`GET /lease`).
    pub http: String,
    pub leadership: i64,
}

/// The agent's answer to `GET /lease`: how long, from the moment it
/// answered, the region's lease key is certain to exist in the directory,
/// less the safety margin. A router adds it to the instant it *sent* the
/// request, on its own monotonic clock, and refuses writes after that.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAnswer {
    pub region: String,
    pub agent: String,
    pub leadership: i64,
    pub remaining_ms: u64,
    /// The lease's TTL: routers ask again every quarter of it.
    pub ttl_ms: u64,
}

impl RegionRecord {
    /// The record of a region nobody has written yet: active, no router
    /// endpoint, nothing measured. Whoever writes first starts from it.
    pub fn unwritten() -> Self {
        Self {
            router_endpoint: String::new(),
            state: RegionState::Active,
            successor: None,
            region_epoch: 0,
            mirrors: BTreeMap::new(),
            members: Vec::new(),
            drain: None,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("records always serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_states_keep_their_wire_names() {
        assert_eq!(
            serde_json::to_string(&MirrorState::Streaming).expect("json"),
            "\"streaming\""
        );
        let newer: MirrorState = serde_json::from_str("\"paused\"").expect("an unknown state reads");
        assert_eq!(newer, MirrorState::Unknown);
        assert_eq!(format!("{:<10}|", MirrorState::Resyncing), "resyncing |");
    }
}

/// A migration's intent record: `/tern/dir/migrations/{id}`. Whoever asks
/// for a move (`tern migrate`, the operator for an AccountMigration, the
/// follow-the-sun policy) creates it in phase `requested`; from then on only
/// the target region's elected agent writes it, at each step of the
/// protocol (DESIGN.md "Migration protocol"), so it says how far the move
/// got and an agent that restarts rolls the move forward or back from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub account: AccountId,
    pub target: RegionName,
    /// Compare-and-swap: refused unless the account is homed here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_source: Option<RegionName>,
    /// Why (audit trail): `manual`, `follow-the-sun: …`, a ticket.
    #[serde(default)]
    pub reason: String,
    pub phase: MigrationPhase,
    /// Unix ms.
    pub requested_ms: u64,
    /// Where the account was homed when the move started, and its epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<RegionName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_epoch: Option<Epoch>,
    /// The account's placement as the start wrote it (`migrating`): the
    /// switch compares the directory with it instead of reading it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<AccountRecord>,
    /// The source group's revision of the fence (step 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_revision: Option<i64>,
    /// Unix ms on the executing agent's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switched_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// Fence sent to switch acknowledged: the longest a write to the
    /// account waited (unknown when the agent restarted in between).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable_ms: Option<u64>,
    /// The last transition, or why the move failed or was rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl MigrationRecord {
    pub fn requested(
        account: AccountId,
        target: RegionName,
        expected_source: Option<RegionName>,
        reason: String,
        now_ms: u64,
    ) -> Self {
        Self {
            account,
            target,
            expected_source,
            reason,
            phase: MigrationPhase::Requested,
            requested_ms: now_ms,
            source: None,
            source_epoch: None,
            placement: None,
            fenced_revision: None,
            started_ms: None,
            fenced_ms: None,
            switched_ms: None,
            finished_ms: None,
            unavailable_ms: None,
            message: None,
        }
    }
}

/// Steps of the migration protocol, in order; `completed`, `rolled_back`
/// and `refused` are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Asked for; no agent has taken it up.
    Requested,
    /// The directory says `migrating`. The target's agent fences the
    /// source, waits for its mirror to reach the fence, copies the account
    /// into its home area and switches the directory, without writing the
    /// intent in between (each of those steps is idempotent and a restart
    /// does them again; a directory write would lengthen the window in
    /// which the account takes no writes).
    Fencing,
    /// The directory names the target; the source's fence becomes `moved`.
    Switching,
    /// Done: homed in the target.
    Completed,
    /// Undoing a move that could not finish (the source is unfenced, the
    /// directory names it again).
    RollingBack,
    /// Undone: the account stayed where it was.
    RolledBack,
    /// Refused before anything changed (not where expected, not allowed,
    /// the target's mirror unhealthy).
    Refused,
}

impl MigrationPhase {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::RolledBack | Self::Refused)
    }
}

/// Writes per account and origin region in a sliding window, as one router
/// counted them (`router/src/counts.rs`) and published them into its
/// region's group (`counts_key`): the evidence the home agent's
/// follow-the-sun policy sums over every router of the region. Each bucket
/// is `[bucket number, writes]`, the bucket number being Unix seconds /
/// `bucket_secs`, so buckets of different routers add up and old ones fall
/// out of the window wherever they were counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteCountsRecord {
    pub bucket_secs: u64,
    /// When the router published this (Unix ms, its clock).
    pub published_ms: u64,
    /// account → origin region → buckets.
    pub accounts: BTreeMap<String, BTreeMap<String, Vec<(u64, u64)>>>,
}

/// A write the failed region committed that its successor never had: what
/// `tern quarantine` lists. Nothing here is ever applied by tern.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantinedWrite {
    pub account: String,
    pub key: String,
    /// The value written (UTF-8 text), absent for a delete or a value that
    /// is not text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The value as hex, when it is not UTF-8 text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_hex: Option<String>,
    #[serde(default)]
    pub deleted: bool,
    /// The revision it committed at in the failed region's group; writes of
    /// one revision were one transaction.
    pub revision: i64,
    /// The failed region's clock (Unix ms) at its last heartbeat before the
    /// write: it committed after that, within a heartbeat interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_after_ms: Option<i64>,
}

/// Written by a failed-over region's agent once its quarantine is written
/// and its home area retired (every account's fence there says where the
/// account went): `/tern/dir/rejoin/{region}`. The region may rejoin only
/// once this names its current failover.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredHome {
    pub failover_epoch: u64,
    /// Fences set to `moved` by the retirement.
    pub fences: u64,
    pub written_unix_ms: u64,
}

/// What a quarantine holds, written once it is complete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineSummary {
    pub region: String,
    pub successor: String,
    pub failover_epoch: u64,
    /// The last revision of the failed region that the successor's mirror
    /// had applied whole (and how many events of the next one).
    pub applied: String,
    /// The failed region's revision when it was compared.
    pub compared_to_revision: i64,
    pub writes: u64,
    pub accounts: u64,
    /// False when the group's history was compacted past what was needed:
    /// then each key's latest value is listed, not every write.
    pub complete_history: bool,
    pub written_unix_ms: u64,
}
