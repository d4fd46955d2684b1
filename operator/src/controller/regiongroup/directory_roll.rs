//! The rolling update of a directory share. Its members are one part of
//! the directory group; the others run in other regions' clusters under
//! their own operators. A share rolls as a data group does
//! (`crate::upgrade::plan`: followers first, leadership handed over before
//! its holder restarts, every member answering and caught up before each
//! restart), with the other shares' members counted for the group's health
//! and leadership and never restarted from here.
//!
//! A share takes the directory's roll lock (`/tern/dir/ops/roll`, on a
//! lease) before it even looks, and plans each step (a restart, a
//! hand-over) from what it sees under the lock: two operators that found
//! the group healthy at the same moment would otherwise each restart a
//! member, and a directory of three, one member per region, would lose its
//! quorum; two that hand leadership over at once could pass it back and
//! forth. The share renews the lock on every look while it rolls, and gives
//! it back once its members all run the current template, their pods are
//! ready and the whole directory has settled (`upgrade::settled`); an
//! operator that stops lets it lapse with its lease.

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use tern_common::DIR_ROLL_LOCK;
use tern_crds::RegionGroup;

use crate::names;

pub use crate::membership::OTHERS_FROM;

/// How long the lock outlives an operator that took it and then stopped.
const LOCK_TTL_SECS: i64 = 60;

/// The lock's value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct RollLock {
    region: String,
    share: String,
    since_ms: u64,
}

/// The members of the directory outside this share (`pods` members of
/// its own): ordinal (from [`OTHERS_FROM`]), name and client URL, from the
/// share's bootstrap list, which names every directory member.
pub fn other_members(rg: &RegionGroup, pods: i32) -> Vec<(i32, String, String)> {
    let group = rg.name_any();
    rg.spec
        .initial_cluster
        .iter()
        .filter(|m| !(0..pods).any(|o| names::member_name(&group, o) == m.name))
        // A peer URL tern did not make is asked as it is: it does not answer
        // as a client, so the roll waits rather than leaving the member out.
        .map(|m| {
            (
                m.name.clone(),
                client_url(&m.peer_url).unwrap_or_else(|| m.peer_url.clone()),
            )
        })
        .enumerate()
        .map(|(i, (name, url))| (OTHERS_FROM + i as i32, name, url))
        .collect()
}

/// A member's client URL from its peer URL: the same host, on the client
/// port.
fn client_url(peer_url: &str) -> Option<String> {
    let (host, port) = peer_url.rsplit_once(':')?;
    (port.parse::<i32>().ok()? == names::PEER_PORT).then(|| format!("{host}:{}", names::CLIENT_PORT))
}

/// Takes the roll lock for `share` of `region` (or renews it, if the
/// region holds it already); the reason it waits otherwise.
pub async fn lock(client: &mut Client, region: &str, share: &str) -> Result<(), String> {
    let found = client
        .get(DIR_ROLL_LOCK, None)
        .await
        .map_err(|e| format!("reading the directory's roll lock: {e}"))?;
    let seen = found.kvs().first();
    if let Some(kv) = seen
        && let Ok(held) = serde_json::from_slice::<RollLock>(kv.value())
        && held.region != region
    {
        return Err(format!(
            "{} of region {} rolls (the directory's roll lock, {DIR_ROLL_LOCK}): one directory member at a time",
            held.share, held.region
        ));
    }
    let lease = client
        .lease_grant(LOCK_TTL_SECS, None)
        .await
        .map_err(|e| format!("granting the roll lock's lease: {e}"))?;
    let value = serde_json::to_vec(&RollLock {
        region: region.to_string(),
        share: share.to_string(),
        since_ms: tern_common::unix_ms(),
    })
    .map_err(|e| e.to_string())?;
    // As read: absent, or this region's. Another region's taken since
    // wins.
    let unchanged = match seen {
        Some(kv) => Compare::mod_revision(DIR_ROLL_LOCK, CompareOp::Equal, kv.mod_revision()),
        None => Compare::create_revision(DIR_ROLL_LOCK, CompareOp::Equal, 0),
    };
    let put = TxnOp::put(DIR_ROLL_LOCK, value, Some(PutOptions::new().with_lease(lease.id())));
    // The caller's client bounds each call.
    let taken = client
        .txn(Txn::new().when([unchanged]).and_then([put]))
        .await
        .map_err(|e| format!("taking the directory's roll lock: {e}"))?;
    if taken.succeeded() {
        // Renewed: the lease it was on goes now rather than in a minute
        // (a share renews every few seconds while it rolls).
        if let Some(old) = seen.map(|kv| kv.lease()).filter(|l| *l != 0) {
            let _ = client.lease_revoke(old).await;
        }
        Ok(())
    } else {
        Err("another region took the directory's roll lock first: one directory member at a time".into())
    }
}

/// Gives the roll lock back if `region` holds it.
pub async fn unlock(client: &mut Client, region: &str) -> Result<(), String> {
    let found = client
        .get(DIR_ROLL_LOCK, None)
        .await
        .map_err(|e| format!("reading the directory's roll lock: {e}"))?;
    let Some(kv) = found.kvs().first() else {
        return Ok(());
    };
    if serde_json::from_slice::<RollLock>(kv.value()).is_ok_and(|l| l.region == region) {
        let unchanged = Compare::mod_revision(DIR_ROLL_LOCK, CompareOp::Equal, kv.mod_revision());
        client
            .txn(
                Txn::new()
                    .when([unchanged])
                    .and_then([TxnOp::delete(DIR_ROLL_LOCK, None)]),
            )
            .await
            .map_err(|e| format!("giving the directory's roll lock back: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::geocluster::region_groups;
    use crate::build::testing::example;
    use crate::regions::RegionFilter;
    use tern_crds::GroupRole;

    #[test]
    fn a_share_sees_the_other_shares_members_at_their_client_urls() {
        let groups = region_groups(&example(), &RegionFilter::all());
        let share = groups
            .iter()
            .find(|g| g.spec.role == GroupRole::Directory)
            .expect("a directory share");
        let own = share.spec.replicas;
        let others = other_members(share, own);
        assert_eq!(
            others.len() as i32 + own,
            share.spec.initial_cluster.len() as i32,
            "{others:?}"
        );
        for (i, (ordinal, name, url)) in others.iter().enumerate() {
            assert_eq!(*ordinal, OTHERS_FROM + i as i32);
            assert!(!name.starts_with(&format!("{}-", share.name_any())), "{name}");
            assert!(url.ends_with(":2379") && url.contains(name.as_str()), "{url}");
        }
    }

    #[test]
    fn a_client_url_is_the_peer_host_on_the_client_port() {
        assert_eq!(
            client_url("https://m-0.g-peer.ns.svc.cluster.local:2380").as_deref(),
            Some("https://m-0.g-peer.ns.svc.cluster.local:2379")
        );
        assert_eq!(client_url("https://m-0.g-peer:9999"), None);
    }
}
