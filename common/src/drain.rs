//! Draining a region (planned switchover): its record in the directory says
//! `draining`, and from then on its agent moves every account out with the
//! migration protocol (`region-agent/src/drain.rs`), no target accepts a
//! move into it, and no account is created in it. Undraining sets it
//! `active` again: moves under way finish, no new ones start, and accounts
//! may come back (by hand or by follow the sun).
//!
//! Whoever asks (`tern drain`, the operator from `spec.regions[].drain`)
//! changes only the record's `state`, with a compare-and-swap on its
//! version, because the region's routers and agent write other fields of
//! the same record.

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};

use crate::{RegionName, RegionRecord, RegionState, dir_region_key};

/// Why a region's drain state was not changed.
#[derive(Debug, thiserror::Error)]
pub enum DrainRefused {
    #[error("region {region} has no record in the directory: no such region (its routers register it)")]
    UnknownRegion { region: RegionName },
    #[error("region {region} failed over to {successor}: it serves nothing to drain or undrain until it rejoins")]
    Failed { region: RegionName, successor: String },
    #[error("{key} is malformed: {detail}")]
    Malformed { key: String, detail: String },
    #[error("region record {key} kept changing while its drain state was written; nothing was written")]
    Raced { key: String },
    #[error("directory ({what}): {source}")]
    Etcd {
        what: String,
        #[source]
        source: etcd_client::Error,
    },
}

/// The record as it was before, and after.
#[derive(Clone, Debug)]
pub struct Changed {
    pub before: RegionRecord,
    pub after: RegionRecord,
}

impl Changed {
    /// Whether the call changed anything.
    pub fn changed(&self) -> bool {
        self.before.state != self.after.state
    }
}

/// Sets `region` draining (`drain`) or active again. Idempotent; refused
/// for a failed region.
pub async fn set_draining(c: &mut Client, region: &RegionName, drain: bool) -> Result<Changed, DrainRefused> {
    let key = dir_region_key(region);
    for _ in 0..10 {
        let found = c.get(key.clone(), None).await.map_err(|source| DrainRefused::Etcd {
            what: format!("reading {key}"),
            source,
        })?;
        let Some(kv) = found.kvs().first() else {
            return Err(DrainRefused::UnknownRegion { region: region.clone() });
        };
        let before: RegionRecord = serde_json::from_slice(kv.value()).map_err(|e| DrainRefused::Malformed {
            key: key.clone(),
            detail: e.to_string(),
        })?;
        let wanted = if drain {
            RegionState::Draining
        } else {
            RegionState::Active
        };
        match before.state {
            RegionState::Failed => {
                return Err(DrainRefused::Failed {
                    region: region.clone(),
                    successor: before.successor.as_ref().map(|s| s.to_string()).unwrap_or_default(),
                });
            }
            state if state == wanted => {
                return Ok(Changed {
                    after: before.clone(),
                    before,
                });
            }
            _ => {}
        }
        let after = RegionRecord {
            state: wanted,
            ..before.clone()
        };
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, kv.version())])
            .and_then([TxnOp::put(key.clone(), after.to_json(), None)]);
        let written = c
            .txn(txn)
            .await
            .map_err(|source| DrainRefused::Etcd {
                what: format!("writing {key}"),
                source,
            })?
            .succeeded();
        if written {
            return Ok(Changed { before, after });
        }
    }
    Err(DrainRefused::Raced { key })
}
