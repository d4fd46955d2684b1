//! Where everything lives in etcd (DESIGN.md "Keys"). Keys are built only
//! from validated identifiers, so no request can address a key outside its
//! account.

use std::fmt;

use crate::{AccountId, Epoch, IdempotencyKey, InvalidInput, MigrationId, RegionName, UserKey};

/// Prefix of everything tern writes into a region group.
pub const ROOT: &str = "/tern/";

/// Prefix of every account's keys in a region group.
pub const GROUP_ACCOUNTS: &str = "/tern/a/";

/// Prefix of all keys of one account in its home group.
pub fn account_prefix(account: &AccountId) -> String {
    format!("{GROUP_ACCOUNTS}{account}/")
}

/// The account's fence: `"{epoch}:active"`, `"{epoch}:fenced"` or
/// `"{epoch}:moved:{region}"`. Every write is guarded by it.
pub fn fence_key(account: &AccountId) -> String {
    format!("/tern/a/{account}/fence")
}

/// Prefix of the account's user data.
pub fn data_prefix(account: &AccountId) -> String {
    format!("/tern/a/{account}/d/")
}

/// One user value.
pub fn data_key(account: &AccountId, key: &UserKey) -> String {
    format!("/tern/a/{account}/d/{key}")
}

/// Prefix of the account's idempotency records.
pub fn idempotency_prefix(account: &AccountId) -> String {
    format!("/tern/a/{account}/idem/")
}

/// The recorded result of an idempotent write.
pub fn idempotency_key(account: &AccountId, key: &IdempotencyKey) -> String {
    format!("/tern/a/{account}/idem/{key}")
}

/// The agent's heartbeat in its own region's group.
pub fn heartbeat_key(region: &RegionName) -> String {
    format!("/tern/hb/{region}")
}

/// Where a region's agent mirrors another region's keys.
pub fn mirror_prefix(source: &RegionName) -> String {
    format!("/tern/r/{source}/")
}

/// Where a region's agent mirrors one key of another region.
pub fn mirror_key(source: &RegionName, key: &[u8]) -> Vec<u8> {
    let mut k = format!("/tern/r/{source}").into_bytes();
    k.extend_from_slice(key);
    k
}

/// The applied-revision record of a mirror: the last source revision it
/// holds, written in the same transaction as that revision's keys.
pub fn mirror_applied_key(source: &RegionName) -> String {
    format!("/tern/r/{source}/applied")
}

/// The closed-time record of a mirror: a time on this region's clock (Unix
/// ms, as decimal text) such that the mirror holds every write the source
/// acknowledged before it. The agent writes it in the transaction that
/// applies a source heartbeat (the heartbeat's time, corrected by the
/// measured clock offset and its error bound), so a router that reads it
/// together with a mirrored value knows how stale that value may be:
/// `now − closed`, never less than the truth.
pub fn mirror_closed_key(source: &RegionName) -> String {
    format!("/tern/r/{source}/closed")
}

/// Prefix of the mirrored keys of `source` (the applied record is outside it).
pub fn mirror_data_prefix(source: &RegionName) -> String {
    format!("/tern/r/{source}/tern/")
}

/// The range of a region group that other regions mirror: account keys and
/// heartbeats, [MIRRORED_START, MIRRORED_END). It also spans the agents'
/// election keys (`/tern/agent/`), which mirrors skip; mirrors of mirrors
/// (`/tern/r/`) are outside it.
pub const MIRRORED_START: &str = "/tern/a/";
pub const MIRRORED_END: &str = "/tern/hb0";

/// Whether a key of a source group is copied into mirrors.
pub fn is_mirrored(key: &[u8]) -> bool {
    key.starts_with(b"/tern/a/") || key.starts_with(b"/tern/hb/")
}

/// Prefix of the write counts the region's routers publish (follow the
/// sun), in the region's own group; outside the mirrored range.
pub const COUNTS_PREFIX: &str = "/tern/stats/counts/";

/// One router's write counts: `{COUNTS_PREFIX}{instance}/{chunk}`.
pub fn counts_key(instance: &str, chunk: usize) -> String {
    format!("{COUNTS_PREFIX}{instance}/{chunk:04}")
}

/// Name of the election of a region's agents, in the region's own group.
pub fn agent_election(region: &RegionName) -> String {
    format!("/tern/agent/{region}/leader")
}

/// Where the region's elected agent says how to reach it (an
/// [`AgentEndpoint`](crate::AgentEndpoint)), in the region's own group, on
/// the agent's election lease: routers read it to ask the agent until when
/// the region's lease is valid. Outside the mirrored range.
pub fn agent_endpoint_key(region: &RegionName) -> String {
    format!("/tern/leader/{region}")
}

/// The promotion marker of a failover, in the successor's own group: its
/// value is the failover's region epoch (decimal). Writes to the accounts
/// of the failed region `source`, served from the successor's mirror area,
/// are guarded by it, and the mirror of `source` stops applying once it
/// exists. Outside the mirrored range.
pub fn promotion_key(source: &RegionName) -> String {
    format!("/tern/promoted/{source}")
}

/// Directory: an account's placement.
pub fn dir_account_key(account: &AccountId) -> String {
    format!("{DIR_ACCOUNTS}{account}")
}

/// Directory: prefix of every placement (what routers watch).
pub const DIR_ACCOUNTS: &str = "/tern/dir/accounts/";

/// Directory: prefix of every region record.
pub const DIR_REGIONS: &str = "/tern/dir/regions/";

/// Directory: a region's record.
pub fn dir_region_key(region: &RegionName) -> String {
    format!("{DIR_REGIONS}{region}")
}

/// Directory: prefix of every region's lease key.
pub const DIR_LEASES: &str = "/tern/dir/leases/";

/// Directory: a region's lease key (a `RegionLease` on a directory lease).
pub fn dir_lease_key(region: &RegionName) -> String {
    format!("{DIR_LEASES}{region}")
}

/// Directory: prefix of the holds on regions.
pub const DIR_HOLDS: &str = "/tern/dir/holds/";

/// Directory: a hold on a region (a `RegionHold`). While it exists the
/// region's agent claims no lease, so its routers commit nothing: the
/// operator holds a region restored from a backup until the restored
/// group's fences agree with the directory (docs/backup.md).
pub fn dir_hold_key(region: &RegionName) -> String {
    format!("{DIR_HOLDS}{region}")
}

/// Directory: the roll lock of the directory's members (a JSON record of
/// the region and member, on a lease): the operators of the directory's
/// shares, each in its own cluster, restart one directory member at a time
/// (operator/src/controller/regiongroup/directory_roll.rs).
pub const DIR_ROLL_LOCK: &str = "/tern/dir/ops/roll";

/// Directory: prefix of every migration's intent record.
pub const DIR_MIGRATIONS: &str = "/tern/dir/migrations/";

/// Directory: prefix of every quarantine (writes a failed region committed
/// that its successor never had).
pub const DIR_QUARANTINE: &str = "/tern/dir/quarantine/";

/// Directory: prefix of the quarantine of `region`'s failover at region
/// epoch `epoch`: its summary and its writes.
pub fn dir_quarantine_prefix(region: &RegionName, epoch: u64) -> String {
    format!("{DIR_QUARANTINE}{region}/{epoch}/")
}

/// Directory: the summary of a quarantine (a `QuarantineSummary`), written
/// last: while it is missing, the quarantine is incomplete.
pub fn dir_quarantine_summary(region: &RegionName, epoch: u64) -> String {
    format!("{}summary", dir_quarantine_prefix(region, epoch))
}

/// Directory: one quarantined write (a `QuarantinedWrite`), ordered by the
/// revision it committed at in the failed region's group.
pub fn dir_quarantine_write(region: &RegionName, epoch: u64, revision: i64, index: usize) -> String {
    format!("{}w/{revision:020}-{index:06}", dir_quarantine_prefix(region, epoch))
}

/// Directory: prefix of what failed-over regions report before they may
/// rejoin (a `RetiredHome` per region).
pub const DIR_REJOIN: &str = "/tern/dir/rejoin/";

/// Directory: `region`'s `RetiredHome`.
pub fn dir_rejoin_key(region: &RegionName) -> String {
    format!("{DIR_REJOIN}{region}")
}

/// How the ids of the moves the follow-the-sun policy asks for begin
/// (`sun-{account}-{unix ms}`): what tells an automatic move from another.
pub const AUTOMATIC_MIGRATION_PREFIX: &str = "sun-";

/// How the ids of the moves a drain asks for begin (`drain-{account}-{unix
/// ms}`): they are paced by the drain (at the source), not by the target's
/// per-minute limit.
pub const DRAIN_MIGRATION_PREFIX: &str = "drain-";

/// How the ids of the moves a successor asks for begin when it re-homes a
/// failed region's accounts from its promoted mirror area into its own
/// (`rehome-{account}-{unix ms}`).
pub const REHOME_MIGRATION_PREFIX: &str = "rehome-";

/// Directory: a migration's intent record (a `MigrationRecord`).
pub fn dir_migration_key(id: &MigrationId) -> String {
    format!("{DIR_MIGRATIONS}{id}")
}

/// The account whose fence `key` is (`/tern/a/{account}/fence`); none for
/// any other key of the account, a user key ending in `/fence` included.
pub fn account_of_fence_key(key: &[u8]) -> Option<AccountId> {
    let key = std::str::from_utf8(key).ok()?;
    let account = key.strip_prefix(GROUP_ACCOUNTS)?.strip_suffix("/fence")?;
    AccountId::new(account).ok()
}

/// The account id at the end of a directory placement key.
pub fn account_of_dir_key(key: &[u8]) -> Option<AccountId> {
    let key = std::str::from_utf8(key).ok()?;
    AccountId::new(key.strip_prefix(DIR_ACCOUNTS)?).ok()
}

/// The migration id of a directory intent key.
pub fn migration_of_dir_key(key: &[u8]) -> Option<MigrationId> {
    let key = std::str::from_utf8(key).ok()?;
    MigrationId::new(key.strip_prefix(DIR_MIGRATIONS)?).ok()
}

/// The region at the end of a directory key under `prefix`
/// ([`DIR_REGIONS`] or [`DIR_LEASES`]).
pub fn region_of_dir_key(key: &[u8], prefix: &str) -> Option<RegionName> {
    let key = std::str::from_utf8(key).ok()?;
    RegionName::new(key.strip_prefix(prefix)?).ok()
}

/// The user key of a data key of `account`.
pub fn user_key_of(account: &AccountId, key: &[u8]) -> Option<String> {
    let key = std::str::from_utf8(key).ok()?;
    key.strip_prefix(&data_prefix(account)).map(str::to_string)
}

/// An account's fence value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub epoch: Epoch,
    pub state: FenceState,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceState {
    /// The group is the account's home at this epoch: writes commit.
    Active,
    /// A migration has frozen the account here.
    Fenced,
    /// The account moved to another region.
    Moved(RegionName),
}

impl Fence {
    pub fn active(epoch: Epoch) -> Self {
        Self {
            epoch,
            state: FenceState::Active,
        }
    }

    pub fn fenced(epoch: Epoch) -> Self {
        Self {
            epoch,
            state: FenceState::Fenced,
        }
    }

    pub fn moved(epoch: Epoch, to: RegionName) -> Self {
        Self {
            epoch,
            state: FenceState::Moved(to),
        }
    }

    pub fn parse(value: &[u8]) -> Result<Self, InvalidInput> {
        let malformed = || InvalidInput::Malformed {
            field: "fence",
            value: String::from_utf8_lossy(value).into_owned(),
            rule: "{epoch}:active | {epoch}:fenced | {epoch}:moved:{region}",
        };
        let text = std::str::from_utf8(value).map_err(|_| malformed())?;
        let (epoch, rest) = text.split_once(':').ok_or_else(malformed)?;
        let epoch = Epoch(epoch.parse().map_err(|_| malformed())?);
        let state = match rest {
            "active" => FenceState::Active,
            "fenced" => FenceState::Fenced,
            _ => {
                let region = rest.strip_prefix("moved:").ok_or_else(malformed)?;
                FenceState::Moved(RegionName::new(region).map_err(|_| malformed())?)
            }
        };
        Ok(Self { epoch, state })
    }
}

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state {
            FenceState::Active => write!(f, "{}:active", self.epoch),
            FenceState::Fenced => write!(f, "{}:fenced", self.epoch),
            FenceState::Moved(r) => write!(f, "{}:moved:{r}", self.epoch),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let a = AccountId::new("acct-1").expect("valid");
        let k = UserKey::new("balance").expect("valid");
        assert_eq!(fence_key(&a), "/tern/a/acct-1/fence");
        assert_eq!(data_key(&a, &k), "/tern/a/acct-1/d/balance");
        assert_eq!(user_key_of(&a, b"/tern/a/acct-1/d/balance").as_deref(), Some("balance"));
        assert_eq!(account_of_dir_key(b"/tern/dir/accounts/acct-1"), Some(a.clone()));
        assert_eq!(account_of_fence_key(fence_key(&a).as_bytes()), Some(a.clone()));
        // A user key named like a fence is not one.
        let lookalike = data_key(&a, &UserKey::new("fence").expect("valid"));
        assert_eq!(account_of_fence_key(lookalike.as_bytes()), None);
        assert!(account_prefix(&a).starts_with(GROUP_ACCOUNTS));
        assert!(data_key(&a, &k).starts_with(&account_prefix(&a)));
        // Mirrors never copy it, and watches of the mirrored range skip it.
        let leader = agent_endpoint_key(&RegionName::new("eu-west").expect("valid"));
        assert!(!is_mirrored(leader.as_bytes()));
        assert!(leader.as_str() >= MIRRORED_END);
        let promoted = promotion_key(&RegionName::new("eu-west").expect("valid"));
        assert!(!is_mirrored(promoted.as_bytes()) && promoted.as_str() >= MIRRORED_END);
    }

    #[test]
    fn fences_round_trip() {
        let r = RegionName::new("eu-west").expect("valid");
        for f in [
            Fence::active(Epoch(3)),
            Fence {
                epoch: Epoch(4),
                state: FenceState::Fenced,
            },
            Fence {
                epoch: Epoch(5),
                state: FenceState::Moved(r),
            },
        ] {
            assert_eq!(Fence::parse(f.to_string().as_bytes()).expect("parses"), f);
        }
        assert!(Fence::parse(b"x:active").is_err());
        assert!(Fence::parse(b"3:gone").is_err());
    }
}
