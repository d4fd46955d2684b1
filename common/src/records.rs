//! Records of the directory group, stored as JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Epoch, RegionName};

/// Where an account lives: `/tern/dir/accounts/{account}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub home: RegionName,
    pub epoch: Epoch,
    pub state: AccountState,
    /// Regions the account may be homed in; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_regions: Vec<RegionName>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// One mirror's replication lag as its agent measured it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorStatus {
    /// `streaming`, `resyncing` or `disconnected`.
    pub state: String,
    /// How stale the mirror may be, in ms; never negative.
    pub lag_ms: u64,
    /// Source revisions not yet applied.
    pub lag_revisions: i64,
    /// Last source revision applied.
    pub applied_revision: i64,
    /// Estimated clock offset of the source's agent from this one, in ms
    /// (positive: the source's clock is ahead). Reported, never folded into lag.
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

impl RegionRecord {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("records always serialise")
    }
}
