//! Records of the directory group, stored as JSON.

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
