//! After a group was restored from a backup under a live directory, its
//! accounts' fences are as they were when the backup was taken, and the
//! directory has moved on: accounts created in the region since have no
//! fence there (the router refuses them forever, "its fence is missing"),
//! and accounts that moved away since have an active fence again, which a
//! router with a placement older than the move could still write through.
//! This module makes the fences agree with the directory once, right after
//! the restore, and says what it did (docs/backup.md).
//!
//! The rules, per account the directory knows:
//! - homed elsewhere, and active or fenced here: the fence becomes
//!   `{epoch}:moved:{home}`, so that nothing commits here and a stale
//!   router is sent on;
//! - homed here at epoch E, and here `E:active`: nothing to do;
//! - homed here, and no fence here (created after the backup) or an older
//!   active one (moved away and back since): `E:active`. The account holds
//!   what the backup held, as every account of the region does, and its
//!   later writes are lost with theirs;
//! - homed here, and here `moved` or `fenced`: left alone and named. What
//!   the group holds of such an account predates its latest stay here,
//!   which the backup did not see; a person decides;
//! - moving (a migration from or to this region in flight): left to the
//!   migration, and named.
//!
//! And per account the group holds writable (active or fenced) that the
//! directory does not know: named, and left alone. No router reaches it.
//! Under a live directory that happens only to an account whose creation
//! was under way; under a directory restored from a backup older than the
//! group's (a GeoCluster restored whole), to every account created between
//! the two backups. Placing it is a person's decision: the directory's
//! record holds its allowed regions and pins, which the group does not.

use std::collections::BTreeMap;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use tern_common::etcd::Pages;
use tern_common::{
    AccountId, AccountRecord, AccountState, DIR_ACCOUNTS, Fence, FenceState, GROUP_ACCOUNTS, RegionName,
    account_of_dir_key, account_of_fence_key, fence_key,
};

/// One fence to write, and what it replaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repair {
    pub account: AccountId,
    /// The fence as restored (`None`: none).
    pub was: Option<Fence>,
    pub fence: Fence,
}

/// What the comparison found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub repairs: Vec<Repair>,
    /// Homed here, but the fence here is `moved` or `fenced`.
    pub for_a_person: Vec<(AccountId, Fence)>,
    /// A migration from or to this region is in flight.
    pub migrating: Vec<AccountId>,
    /// Writable here (active or fenced), unknown to the directory.
    pub unknown: Vec<(AccountId, Fence)>,
}

/// The fences `region`'s group should get, from the directory's `accounts`
/// and the fences it holds (`fences`; absent accounts have none).
pub fn plan(
    region: &RegionName,
    accounts: &BTreeMap<AccountId, AccountRecord>,
    fences: &BTreeMap<AccountId, Fence>,
) -> Plan {
    let mut out = Plan::default();
    for (account, record) in accounts {
        let here = fences.get(account);
        if let AccountState::Migrating { target } = &record.state
            && (&record.home == region || target == region)
        {
            out.migrating.push(account.clone());
            continue;
        }
        let repair = |fence: Fence| Repair {
            account: account.clone(),
            was: here.cloned(),
            fence,
        };
        if &record.home != region {
            if let Some(f) = here
                && matches!(f.state, FenceState::Active | FenceState::Fenced)
            {
                out.repairs.push(repair(Fence::moved(f.epoch, record.home.clone())));
            }
            continue;
        }
        match here {
            Some(f) if *f == Fence::active(record.epoch) => {}
            None => out.repairs.push(repair(Fence::active(record.epoch))),
            Some(f) if f.state == FenceState::Active && f.epoch < record.epoch => {
                out.repairs.push(repair(Fence::active(record.epoch)));
            }
            Some(f) => out.for_a_person.push((account.clone(), f.clone())),
        }
    }
    out.unknown = fences
        .iter()
        .filter(|(a, f)| !accounts.contains_key(*a) && matches!(f.state, FenceState::Active | FenceState::Fenced))
        .map(|(a, f)| (a.clone(), f.clone()))
        .collect();
    out
}

/// Reads the directory's accounts and the group's fences, and writes the
/// plan's repairs, each only if the fence is still what was read.
pub async fn reconcile(
    region: &RegionName,
    directory: &mut Client,
    group: &mut Client,
) -> Result<Plan, etcd_client::Error> {
    let mut accounts = BTreeMap::new();
    let mut pages = Pages::prefix(DIR_ACCOUNTS, 5_000);
    while let Some(page) = pages.next(directory).await? {
        for kv in page.kvs() {
            if let (Some(account), Ok(record)) = (
                account_of_dir_key(kv.key()),
                serde_json::from_slice::<AccountRecord>(kv.value()),
            ) {
                accounts.insert(account, record);
            }
        }
    }
    // Every fence the group holds, in one pass over the accounts' keys (at
    // one revision), with the accounts the directory does not know. It
    // reads the accounts' values too: done once per restore, it costs
    // about what the restore wrote.
    let mut fences = BTreeMap::new();
    // Each fence's revision as read: a repair compares it, not the value,
    // so that a fence changed and changed back meanwhile is not taken for
    // the one read.
    let mut read_at = BTreeMap::new();
    let mut pages = Pages::prefix(GROUP_ACCOUNTS, 5_000);
    while let Some(page) = pages.next(group).await? {
        for kv in page.kvs() {
            let Some(account) = account_of_fence_key(kv.key()) else {
                continue;
            };
            read_at.insert(account.clone(), kv.mod_revision());
            if let Ok(f) = Fence::parse(kv.value()) {
                fences.insert(account, f);
            }
        }
    }
    let plan = plan(region, &accounts, &fences);
    for r in &plan.repairs {
        let key = fence_key(&r.account);
        let unchanged = match read_at.get(&r.account) {
            Some(rev) => Compare::mod_revision(key.clone(), CompareOp::Equal, *rev),
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
        };
        // A fence changed since it was read (a router, a migration) is
        // theirs now: left as it is.
        group
            .txn(
                Txn::new()
                    .when(vec![unchanged])
                    .and_then(vec![TxnOp::put(key, r.fence.to_string(), None)]),
            )
            .await?;
    }
    Ok(plan)
}

/// `plan` for people: counts, and the first few accounts of each kind.
pub fn describe(plan: &Plan) -> String {
    const SHOWN: usize = 5;
    let some = |ids: Vec<String>| {
        let n = ids.len();
        let mut s = ids.into_iter().take(SHOWN).collect::<Vec<_>>().join(", ");
        if n > SHOWN {
            s += &format!(" and {} more", n - SHOWN);
        }
        s
    };
    let (moved, active): (Vec<&Repair>, Vec<&Repair>) = plan
        .repairs
        .iter()
        .partition(|r| matches!(r.fence.state, FenceState::Moved(_)));
    let mut parts = Vec::new();
    if !active.is_empty() {
        parts.push(format!(
            "{} accounts homed here made writable again at their current epoch, with what the backup held of them (none if created or moved here since: {})",
            active.len(),
            some(active.iter().map(|r| r.account.to_string()).collect())
        ));
    }
    if !moved.is_empty() {
        parts.push(format!(
            "{} accounts that moved away since the backup fenced as moved ({})",
            moved.len(),
            some(moved.iter().map(|r| r.account.to_string()).collect())
        ));
    }
    if !plan.for_a_person.is_empty() {
        parts.push(format!(
            "{} accounts homed here left unwritable, their fence here predating their latest stay (a person decides: {})",
            plan.for_a_person.len(),
            some(plan.for_a_person.iter().map(|(a, f)| format!("{a} ({f})")).collect())
        ));
    }
    if !plan.migrating.is_empty() {
        parts.push(format!(
            "{} accounts left to their migration in flight ({})",
            plan.migrating.len(),
            some(plan.migrating.iter().map(ToString::to_string).collect())
        ));
    }
    if !plan.unknown.is_empty() {
        parts.push(format!(
            "{} accounts the group holds writable that the directory does not know, left unreachable (created after the directory's backup, or while the directory was lost; a person places them: {})",
            plan.unknown.len(),
            some(plan.unknown.iter().map(|(a, f)| format!("{a} ({f})")).collect())
        ));
    }
    if parts.is_empty() {
        "fences agree with the directory".into()
    } else {
        format!("fences made to agree with the directory: {}", parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_common::Epoch;

    fn region(s: &str) -> RegionName {
        RegionName::new(s).expect("region")
    }

    fn account(s: &str) -> AccountId {
        AccountId::new(s).expect("account")
    }

    fn record(home: &str, epoch: u64, migrating_to: Option<&str>) -> AccountRecord {
        AccountRecord {
            home: region(home),
            epoch: Epoch(epoch),
            state: match migrating_to {
                Some(t) => AccountState::Migrating { target: region(t) },
                None => AccountState::Active,
            },
            allowed_regions: vec![],
            moved_ms: None,
            pinned: false,
        }
    }

    #[test]
    fn fences_follow_the_directory_and_doubtful_ones_are_named() {
        let here = region("us-east");
        let accounts = BTreeMap::from([
            (account("same"), record("us-east", 1, None)),
            (account("created-since"), record("us-east", 1, None)),
            (account("back-since"), record("us-east", 3, None)),
            (account("left-since"), record("eu-west", 2, None)),
            (account("left-long-ago"), record("eu-west", 2, None)),
            (account("here-since-backup"), record("us-east", 3, None)),
            (account("moving"), record("us-east", 1, Some("eu-west"))),
            (account("elsewhere"), record("ap-south", 1, None)),
        ]);
        let fences = BTreeMap::from([
            (account("same"), Fence::active(Epoch(1))),
            (account("back-since"), Fence::active(Epoch(1))),
            (account("left-since"), Fence::active(Epoch(1))),
            (account("left-long-ago"), Fence::moved(Epoch(1), region("eu-west"))),
            (account("here-since-backup"), Fence::moved(Epoch(2), region("eu-west"))),
            (account("moving"), Fence::fenced(Epoch(1))),
            (account("unplaced"), Fence::active(Epoch(1))),
            (account("unplaced-gone"), Fence::moved(Epoch(1), region("eu-west"))),
        ]);
        let p = plan(&here, &accounts, &fences);
        // Writable here, unknown to the directory: named; one that moved
        // away is no one's loss here.
        assert_eq!(p.unknown, vec![(account("unplaced"), Fence::active(Epoch(1)))]);
        let repairs: BTreeMap<String, String> = p
            .repairs
            .iter()
            .map(|r| (r.account.to_string(), r.fence.to_string()))
            .collect();
        assert_eq!(
            repairs,
            BTreeMap::from([
                ("back-since".into(), "3:active".into()),
                ("created-since".into(), "1:active".into()),
                ("left-since".into(), "1:moved:eu-west".into()),
            ])
        );
        assert_eq!(
            p.for_a_person,
            vec![(account("here-since-backup"), Fence::moved(Epoch(2), region("eu-west")))]
        );
        assert_eq!(p.migrating, vec![account("moving")]);
        let text = describe(&p);
        for want in ["created-since", "left-since", "here-since-backup", "moving", "unplaced"] {
            assert!(text.contains(want), "{want} in {text}");
        }
    }

    #[test]
    fn a_group_that_agrees_needs_nothing() {
        let accounts = BTreeMap::from([(account("a"), record("us-east", 2, None))]);
        let fences = BTreeMap::from([(account("a"), Fence::active(Epoch(2)))]);
        let p = plan(&region("us-east"), &accounts, &fences);
        assert_eq!(p, Plan::default());
        assert_eq!(describe(&p), "fences agree with the directory");
    }
}
