//! Declaring a region failed (DESIGN.md "Failover"): one directory
//! transaction, whoever makes it (the successor's agent in Automatic mode,
//! `tern failover` in Manual mode), guarded by the absence of the failed
//! region's lease key. The key exists while the region's agent keeps its
//! lease, and the region's routers stop writing before it can expire
//! (router `lease` module), so a region that still writes is never failed
//! over.
//!
//! The transaction writes the region's record `{failed, successor T,
//! region epoch F}` and leaves a tombstone in the lease key (a
//! `RegionLease` whose leadership no agent can exceed), so the failed
//! region's agent cannot claim the key again when it comes back, and its
//! routers stay closed until it rejoins. Its cost does not depend on the
//! number of accounts: routers send every account of the failed region to
//! the successor from its record.

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};

use crate::{RegionLease, RegionName, RegionRecord, RegionState, dir_lease_key, dir_region_key};

/// Why a region was not failed over.
#[derive(Debug, thiserror::Error)]
pub enum FailoverRefused {
    #[error("region {region} is already failed over to {successor} (region epoch {epoch})")]
    AlreadyFailed {
        region: RegionName,
        successor: String,
        epoch: u64,
    },
    #[error(
        "region {region} still holds its lease in the directory (agent {agent}): it is not lost, and its routers may still write; for planned maintenance drain it instead"
    )]
    StillLeased { region: RegionName, agent: String },
    #[error("region {region} has no record in the directory: no such region")]
    UnknownRegion { region: RegionName },
    #[error("the successor {successor} is region {region} itself")]
    SelfSuccessor { region: RegionName, successor: RegionName },
    #[error("{key} is malformed: {detail}")]
    Malformed { key: String, detail: String },
    #[error(
        "the directory changed while failing {region} over (its lease key or record was written); nothing was written"
    )]
    Raced { region: RegionName },
    #[error("directory ({what}): {source}")]
    Etcd {
        what: String,
        #[source]
        source: etcd_client::Error,
    },
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedOver {
    pub region: RegionName,
    pub successor: RegionName,
    /// The region epoch F of this failover.
    pub epoch: u64,
}

/// The failed region's record and lease key as read before a failover.
#[derive(Clone, Debug)]
pub struct RegionView {
    pub record: Option<RegionRecord>,
    /// The record's mod revision (0: absent).
    pub record_revision: i64,
    /// Who holds the lease key, if anyone.
    pub lease: Option<RegionLease>,
}

/// Reads what a failover of `region` depends on.
pub async fn view(c: &mut Client, region: &RegionName) -> Result<RegionView, FailoverRefused> {
    let etcd = |what: String| move |source| FailoverRefused::Etcd { what, source };
    let key = dir_region_key(region);
    let found = c.get(key.clone(), None).await.map_err(etcd(format!("reading {key}")))?;
    let (record, record_revision) = match found.kvs().first() {
        Some(kv) => (
            Some(
                serde_json::from_slice::<RegionRecord>(kv.value()).map_err(|e| FailoverRefused::Malformed {
                    key: key.clone(),
                    detail: e.to_string(),
                })?,
            ),
            kv.mod_revision(),
        ),
        None => (None, 0),
    };
    let lease_key = dir_lease_key(region);
    let found = c
        .get(lease_key.clone(), None)
        .await
        .map_err(etcd(format!("reading {lease_key}")))?;
    let lease = match found.kvs().first() {
        Some(kv) => {
            Some(
                serde_json::from_slice::<RegionLease>(kv.value()).map_err(|e| FailoverRefused::Malformed {
                    key: lease_key.clone(),
                    detail: e.to_string(),
                })?,
            )
        }
        None => None,
    };
    Ok(RegionView {
        record,
        record_revision,
        lease,
    })
}

/// `region`'s record, if `seen` shows it lost: known, not failed over
/// already, its lease key gone. What [`declare_failed`] checks before its
/// transaction, for a caller to check before anything else.
pub fn lost<'a>(region: &RegionName, seen: &'a RegionView) -> Result<&'a RegionRecord, FailoverRefused> {
    let Some(record) = &seen.record else {
        return Err(FailoverRefused::UnknownRegion { region: region.clone() });
    };
    if record.state == RegionState::Failed {
        return Err(FailoverRefused::AlreadyFailed {
            region: region.clone(),
            successor: record.successor.as_ref().map(|s| s.to_string()).unwrap_or_default(),
            epoch: record.region_epoch,
        });
    }
    if let Some(holder) = &seen.lease {
        return Err(FailoverRefused::StillLeased {
            region: region.clone(),
            agent: holder.agent.clone(),
        });
    }
    Ok(record)
}

/// Marks `region` failed with `successor`, if its lease key is absent and
/// its record unchanged since `seen`. `guard` is one more compare (the
/// successor agent's own lease claim) or None (an operator's command).
pub async fn declare_failed(
    c: &mut Client,
    region: &RegionName,
    successor: &RegionName,
    seen: &RegionView,
    guard: Option<Compare>,
) -> Result<FailedOver, FailoverRefused> {
    if region == successor {
        return Err(FailoverRefused::SelfSuccessor {
            region: region.clone(),
            successor: successor.clone(),
        });
    }
    let record = lost(region, seen)?;
    let epoch = record.region_epoch + 1;
    let failed = RegionRecord {
        state: RegionState::Failed,
        successor: Some(successor.clone()),
        region_epoch: epoch,
        ..record.clone()
    };
    let record_key = dir_region_key(region);
    let lease_key = dir_lease_key(region);
    let mut when = vec![
        Compare::create_revision(lease_key.clone(), CompareOp::Equal, 0),
        Compare::mod_revision(record_key.clone(), CompareOp::Equal, seen.record_revision),
    ];
    when.extend(guard);
    let txn = Txn::new().when(when).and_then([
        TxnOp::put(record_key, failed.to_json(), None),
        TxnOp::put(lease_key, RegionLease::failed_over(successor, epoch).to_json(), None),
    ]);
    let resp = c.txn(txn).await.map_err(|source| FailoverRefused::Etcd {
        what: format!("failing {region} over to {successor}"),
        source,
    })?;
    if !resp.succeeded() {
        return Err(FailoverRefused::Raced { region: region.clone() });
    }
    Ok(FailedOver {
        region: region.clone(),
        successor: successor.clone(),
        epoch,
    })
}

/// Why a failed-over region may not rejoin yet.
#[derive(Debug, thiserror::Error)]
pub enum RejoinRefused {
    #[error("region {region} is not failed over (it is {state}): nothing to rejoin")]
    NotFailed { region: RegionName, state: String },
    #[error(
        "region {region} has not come back yet: its agent compares its writes with {successor}'s (the quarantine) and retires its home area when it returns; start it first"
    )]
    NotBack { region: RegionName, successor: String },
    #[error(
        "{accounts} accounts are still homed in {region} (served from {successor}'s mirror area); {successor} re-homes them by itself, `tern status` shows how far it got"
    )]
    AccountsLeft {
        region: RegionName,
        successor: String,
        accounts: u64,
    },
    #[error("{moves} moves into or out of {region} are not finished yet; rejoin once they are")]
    MovesOpen { region: RegionName, moves: u64 },
    #[error("{key} is malformed: {detail}")]
    Malformed { key: String, detail: String },
    #[error("the directory changed while {region} rejoined (its record or lease key was written); nothing was written")]
    Raced { region: RegionName },
    #[error("directory ({what}): {source}")]
    Etcd {
        what: String,
        #[source]
        source: etcd_client::Error,
    },
}

/// What rejoining did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejoined {
    pub region: RegionName,
    pub former_successor: RegionName,
    pub epoch: u64,
}

/// Lets a failed-over `region` serve again, as an empty region: once it is
/// back and has reported what it lost (the quarantine) and retired its
/// home area (`RetiredHome` for this failover), once its successor has
/// re-homed every one of its accounts, and no move into or out of it is
/// open. One transaction, compared on the record and on the tombstone as
/// read: the record becomes `active` (keeping its region epoch), and the
/// tombstone is deleted, so the region's agent can claim its lease again.
/// The successor then stops serving its mirror area (it deletes its
/// promotion marker) and mirrors the region again from a snapshot.
pub async fn rejoin(c: &mut Client, region: &RegionName) -> Result<Rejoined, RejoinRefused> {
    let etcd = |what: String| move |source| RejoinRefused::Etcd { what, source };
    let key = dir_region_key(region);
    let found = c.get(key.clone(), None).await.map_err(etcd(format!("reading {key}")))?;
    let Some(kv) = found.kvs().first() else {
        return Err(RejoinRefused::NotFailed {
            region: region.clone(),
            state: "not in the directory".into(),
        });
    };
    let record_revision = kv.mod_revision();
    let record: RegionRecord = serde_json::from_slice(kv.value()).map_err(|e| RejoinRefused::Malformed {
        key: key.clone(),
        detail: e.to_string(),
    })?;
    let (RegionState::Failed, Some(successor)) = (record.state, record.successor.clone()) else {
        return Err(RejoinRefused::NotFailed {
            region: region.clone(),
            state: format!("{:?}", record.state).to_lowercase(),
        });
    };
    let epoch = record.region_epoch;
    let retired_key = crate::dir_rejoin_key(region);
    let retired = c
        .get(retired_key.clone(), None)
        .await
        .map_err(etcd(format!("reading {retired_key}")))?;
    let retired_now = retired
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice::<crate::RetiredHome>(kv.value()).ok())
        .is_some_and(|r| r.failover_epoch == epoch);
    if !retired_now {
        return Err(RejoinRefused::NotBack {
            region: region.clone(),
            successor: successor.to_string(),
        });
    }
    // The moves first, then the accounts: a move that lands an account in
    // the region after this read was open at it, and refuses the rejoin.
    let intents = c
        .get(
            crate::DIR_MIGRATIONS,
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .map_err(etcd("reading the migration intents".into()))?;
    let open = intents
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice::<crate::MigrationRecord>(kv.value()).ok())
        .filter(|m| !m.phase.is_final() && (m.target == *region || m.source.as_ref() == Some(region)))
        .count() as u64;
    if open > 0 {
        return Err(RejoinRefused::MovesOpen {
            region: region.clone(),
            moves: open,
        });
    }
    let mut left = 0;
    let mut pages = crate::etcd::Pages::prefix(crate::DIR_ACCOUNTS, 5_000);
    while let Some(page) = pages.next(c).await.map_err(etcd("listing the accounts".into()))? {
        left += page
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice::<crate::AccountRecord>(kv.value()).ok())
            .filter(|a| a.home == *region)
            .count() as u64;
    }
    if left > 0 {
        return Err(RejoinRefused::AccountsLeft {
            region: region.clone(),
            successor: successor.to_string(),
            accounts: left,
        });
    }
    let lease_key = dir_lease_key(region);
    let active = RegionRecord {
        state: RegionState::Active,
        successor: None,
        drain: None,
        ..record
    };
    let txn = Txn::new()
        .when([
            Compare::mod_revision(key.clone(), CompareOp::Equal, record_revision),
            Compare::value(
                lease_key.clone(),
                CompareOp::Equal,
                RegionLease::failed_over(&successor, epoch).to_json(),
            ),
        ])
        .and_then([TxnOp::put(key, active.to_json(), None), TxnOp::delete(lease_key, None)]);
    let resp = c.txn(txn).await.map_err(etcd(format!("rejoining {region}")))?;
    if !resp.succeeded() {
        return Err(RejoinRefused::Raced { region: region.clone() });
    }
    Ok(Rejoined {
        region: region.clone(),
        former_successor: successor,
        epoch,
    })
}
