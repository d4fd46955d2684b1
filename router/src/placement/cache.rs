//! The account half of the placement cache, laid out for a million
//! accounts: each entry is the account id and 24 bytes (epoch, directory
//! revision, and small indexes into tables of the few distinct regions,
//! states and allowed-region lists), so a router holds a directory of a
//! million accounts in about 90 MB on top of the ids (`tern bench
//! --sections scale` measures it). A `Placement` is rebuilt on lookup.

use std::collections::HashMap;
use std::hash::Hash;

use tern_common::{AccountId, AccountRecord, AccountState, Epoch, RegionName};

/// Distinct values stored once, named by their index.
#[derive(Debug)]
struct Table<T> {
    items: Vec<T>,
    index: HashMap<T, u32>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            index: HashMap::new(),
        }
    }
}

impl<T: Clone + Eq + Hash> Table<T> {
    fn intern(&mut self, item: &T) -> u32 {
        if let Some(i) = self.index.get(item) {
            return *i;
        }
        let i = u32::try_from(self.items.len()).expect("fewer than 2^32 distinct values");
        self.items.push(item.clone());
        self.index.insert(item.clone(), i);
        i
    }

    fn get(&self, i: u32) -> &T {
        &self.items[i as usize]
    }
}

/// One account: 24 bytes.
#[derive(Clone, Copy, Debug)]
struct Slot {
    epoch: u64,
    /// Directory revision the placement was read at: an older watch event
    /// never overwrites a newer read.
    revision: i64,
    home: u16,
    state: u16,
    allowed: u32,
}

#[derive(Debug, Default)]
pub struct AccountCache {
    slots: HashMap<Box<str>, Slot>,
    regions: Table<RegionName>,
    states: Table<AccountState>,
    allowed: Table<Vec<RegionName>>,
}

impl AccountCache {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn get(&self, account: &AccountId) -> Option<AccountRecord> {
        self.slots.get(account.as_str()).map(|s| self.record(s))
    }

    /// The directory revision of the cached placement.
    pub fn revision(&self, account: &AccountId) -> Option<i64> {
        self.slots.get(account.as_str()).map(|s| s.revision)
    }

    /// Stores `record` read at `revision`, unless the cache holds a newer
    /// one.
    pub fn upsert(&mut self, account: &AccountId, record: &AccountRecord, revision: i64) {
        if self.revision(account).is_some_and(|newer| newer > revision) {
            return;
        }
        let region =
            |t: &mut Table<RegionName>, r: &RegionName| u16::try_from(t.intern(r)).expect("fewer than 65,536 regions");
        let slot = Slot {
            epoch: record.epoch.0,
            revision,
            home: region(&mut self.regions, &record.home),
            state: u16::try_from(self.states.intern(&record.state)).expect("fewer than 65,536 account states"),
            allowed: self.allowed.intern(&record.allowed_regions),
        };
        match self.slots.get_mut(account.as_str()) {
            Some(s) => *s = slot,
            None => {
                self.slots.insert(account.as_str().into(), slot);
            }
        }
    }

    pub fn remove(&mut self, account: &AccountId) {
        self.slots.remove(account.as_str());
    }

    /// Removes the account if the cache holds it at a revision before
    /// `revision` (a delete seen by the watch).
    pub fn remove_before(&mut self, account: &AccountId, revision: i64) {
        if self.revision(account).is_some_and(|r| r < revision) {
            self.slots.remove(account.as_str());
        }
    }

    /// What routing needs of a placement: the follow-the-sun fields
    /// (`moved_ms`, `pinned`) are the agents' and are not kept.
    fn record(&self, s: &Slot) -> AccountRecord {
        AccountRecord {
            home: self.regions.get(u32::from(s.home)).clone(),
            epoch: Epoch(s.epoch),
            state: self.states.get(u32::from(s.state)).clone(),
            allowed_regions: self.allowed.get(s.allowed).clone(),
            moved_ms: None,
            pinned: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(home: &str, epoch: u64, state: AccountState, allowed: &[&str]) -> AccountRecord {
        AccountRecord {
            home: RegionName::new(home).expect("region"),
            epoch: Epoch(epoch),
            state,
            allowed_regions: allowed.iter().map(|r| RegionName::new(*r).expect("region")).collect(),
            moved_ms: None,
            pinned: false,
        }
    }

    #[test]
    fn placements_come_back_as_stored_and_newer_wins() {
        let mut cache = AccountCache::default();
        let a = AccountId::new("acct-a").expect("id");
        let b = AccountId::new("acct-b").expect("id");
        let migrating = AccountState::Migrating {
            target: RegionName::new("eu-west").expect("region"),
        };
        let ra = record("us-east", 3, AccountState::Active, &[]);
        let rb = record("eu-west", 1, migrating, &["eu-west", "us-east"]);
        cache.upsert(&a, &ra, 10);
        cache.upsert(&b, &rb, 11);
        assert_eq!(cache.get(&a), Some(ra.clone()));
        assert_eq!(cache.get(&b), Some(rb.clone()));
        assert_eq!(cache.len(), 2);

        // An older event does not overwrite a newer read.
        cache.upsert(&a, &record("ap-south", 2, AccountState::Active, &[]), 9);
        assert_eq!(cache.get(&a), Some(ra));
        let moved = record("ap-south", 4, AccountState::Active, &["ap-south"]);
        cache.upsert(&a, &moved, 12);
        assert_eq!(cache.get(&a), Some(moved));

        // A delete older than the cached read is ignored; a newer one removes.
        cache.remove_before(&b, 11);
        assert!(cache.get(&b).is_some());
        cache.remove_before(&b, 13);
        assert_eq!(cache.get(&b), None);
        assert_eq!(cache.len(), 1);
        // Three regions, two states, three allowed lists: stored once each.
        assert_eq!(cache.regions.items.len(), 3);
        assert_eq!(cache.states.items.len(), 2);
        assert_eq!(cache.allowed.items.len(), 3);
    }

    #[test]
    fn an_entry_is_small() {
        assert_eq!(std::mem::size_of::<Slot>(), 24);
    }
}
