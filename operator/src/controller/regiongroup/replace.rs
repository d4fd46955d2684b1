//! The replacement of a data group's member whose volume was lost (a node
//! gone with its local volume, a claim deleted): etcd still counts the
//! member, but it cannot start on an empty volume, so the group runs a
//! voter short until the member is removed from Raft and added back
//! (`membership::plan_replacement`).
//!
//! A lost volume is noticed by its claim: the operator records each
//! member's claim uid once every member is ready on its own
//! (status.memberVolumes), and a member whose claim has another uid since
//! is replaced, one at a time, and only while the others keep a quorum.
//! The volumes recorded are forgotten when the group is restored from a
//! backup (every claim is new then, and no member lost anything).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, ListParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use tern_crds::{GroupRole, MemberReplacement, RegionGroup, RegionGroupStatus};

use crate::build::regiongroup::member_claim_name;
use crate::context::Context;
use crate::membership::{self, Progress, Step};
use crate::names;

/// The most ordinals a group has (as `membership`).
const MAX_ORDINALS: i32 = 16;

/// Records the members' volumes, notices a member whose volume is new, and
/// takes the next step of its replacement. True while a replacement is
/// under way: no other change of the members starts meanwhile.
pub async fn step(
    rg: &RegionGroup,
    ctx: &Context,
    tls: Option<&tern_common::tls::Tls>,
    pods: i32,
    ready: i32,
    st: &mut RegionGroupStatus,
) -> bool {
    if rg.spec.role != GroupRole::Data {
        return false;
    }
    let group = rg.name_any();
    let namespace = rg.namespace().unwrap_or_default();
    let member = |o: i32| names::member_name(&group, o);
    // Only members that run: an ordinal removed and added again later is a
    // new member, not a replaced one.
    st.member_volumes
        .retain(|name, _| (0..pods).any(|o| member(o) == *name));
    let api = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &namespace);
    let claims = match api
        .list(&ListParams::default().labels(&format!("{}={group}", names::LABEL_INSTANCE)))
        .await
    {
        Ok(list) => list.items,
        Err(e) => {
            let why = format!("cannot list the members' volumes: {e}");
            return waiting(st, &group, why);
        }
    };
    // A claim in use, not one on its way out.
    let claim_uid = |o: i32| {
        let name = member_claim_name(&member(o));
        claims
            .iter()
            .find(|c| c.name_any() == name && c.metadata.deletion_timestamp.is_none())
            .and_then(|c| c.uid())
    };

    if st.member_replacement.is_none() {
        if pods != rg.spec.replicas {
            return false;
        }
        let claims: Vec<(String, Option<String>)> = (0..pods).map(|o| (member(o), claim_uid(o))).collect();
        let lost = notice(&mut st.member_volumes, &claims, ready == pods);
        // One change of the members at a time: a replacement waits for the
        // end of a resize (volumes are recorded during one: a new member's
        // is its own).
        if st.membership_change.is_some() {
            return false;
        }
        let Some((o, uid, was)) = lost else {
            return false;
        };
        let o = o as i32;
        let name = member(o);
        let note = format!(
            "the volume of {name} is new (claim {} is {uid}, was {was}): its data is gone, and etcd still counts it as a member that cannot start on an empty volume; replacing it (removed from the Raft group, added back as a learner, promoted once caught up)",
            member_claim_name(&name)
        );
        tracing::warn!(%group, member = %name, "a member's volume was lost; replacing the member");
        ctx.event(rg, EventType::Warning, "MemberVolumeLost", "Replace", note.clone())
            .await;
        st.member_replacement = Some(MemberReplacement {
            member: name,
            claim_uid: uid,
            removed_id: None,
            restarted: false,
            message: note,
        });
    }
    let Some(mut r) = st.member_replacement.clone() else {
        return false;
    };
    let Some(ordinal) = (0..MAX_ORDINALS).find(|o| member(*o) == r.member) else {
        return waiting(st, &group, format!("{} is not a member name of {group}", r.member));
    };

    let host = |o: i32| names::member_host(&group, &member(o), &namespace, &rg.spec.cluster_domain);
    let scheme = names::scheme(rg.spec.tls.is_some());
    let peer_url = |o: i32| format!("{scheme}://{}:{}", host(o), names::PEER_PORT);
    let endpoints: Vec<String> = (0..pods)
        .filter(|o| *o != ordinal)
        .map(|o| format!("{scheme}://{}:{}", host(o), names::CLIENT_PORT))
        .collect();
    let observed = match membership::observe(&endpoints, tls).await {
        Ok(m) => m,
        Err(e) => return waiting(st, &group, membership::reason(e)),
    };
    // What a member that starts empty is told: the membership, with the
    // member at its address (the same name and address before its removal
    // and after it is added back), and `existing`.
    if observed
        .members
        .iter()
        .any(|m| m.peer_urls.contains(&peer_url(ordinal)))
    {
        st.raft_members = membership::initial_cluster(&observed, member, peer_url);
    }
    let removed = r.removed_id.as_deref().and_then(|h| u64::from_str_radix(h, 16).ok());
    let step = match membership::plan_replacement(&observed, ordinal, removed, r.restarted, peer_url) {
        Ok(step) => step,
        Err(e) => return waiting(st, &group, membership::reason(e)),
    };
    let what = step.describe(&group);
    match &step {
        Step::Steady => {
            let note = format!("{} replaced: a voter again, on its new volume", r.member);
            tracing::info!(%group, member = %r.member, "member replaced");
            ctx.event(rg, EventType::Normal, "MemberReplaced", "Replace", note)
                .await;
            st.member_volumes.insert(r.member.clone(), r.claim_uid.clone());
            st.member_replacement = None;
            return false;
        }
        Step::RestartPod { .. } => {
            // Deleted, the pod is made again at once by the StatefulSet
            // and reads the membership written to the config by the
            // reconcile that added it back; failing, it would wait out
            // its crash back-off.
            let pods_api = Api::<Pod>::namespaced(ctx.client.clone(), &namespace);
            match pods_api.delete(&r.member, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return waiting(st, &group, format!("cannot restart pod {}: {e}", r.member)),
            }
            r.restarted = true;
        }
        _ => {
            // Recorded before etcd is changed: a member at the address
            // with another id is then known for the replacement, even if
            // this operator dies right after the step.
            if matches!(step, Step::Remove { .. } | Step::AddLearner { .. }) && r.removed_id.is_none() {
                let id = match &step {
                    Step::Remove { id, .. } => *id,
                    // Removed by someone else: no member has id 0.
                    _ => 0,
                };
                r.removed_id = Some(format!("{id:x}"));
                r.message = format!("replacing {}: {what}", r.member);
                let mut before = st.clone();
                before.member_replacement = Some(r.clone());
                if let Err(e) = super::write_status(rg, ctx, before).await {
                    return waiting(st, &group, format!("cannot record the step before taking it: {e}"));
                }
            }
            match membership::execute(&step, &observed, tls).await {
                Ok(Progress::Done) => {
                    ctx.event(rg, EventType::Normal, "MemberReplacement", "Replace", what.clone())
                        .await;
                }
                Ok(Progress::Waiting(why)) => {
                    st.member_replacement = Some(r);
                    return waiting(st, &group, why);
                }
                Err(e) => {
                    st.member_replacement = Some(r);
                    return waiting(st, &group, membership::reason(e));
                }
            }
        }
    }
    tracing::info!(%group, member = %r.member, step = %what, "member replacement");
    r.message = format!("replacing {}: {what}", r.member);
    st.member_replacement = Some(r);
    true
}

/// The first member (its index in `claims`, its claim's uid and the one
/// recorded) whose claim is not the one recorded for it: its volume was
/// lost. Without one, the volumes of members not recorded yet are recorded
/// when every member is ready. `claims` holds each member's name and the
/// uid of its claim in use (`None`: missing, or being deleted).
///
/// A member's volume is recorded once and changed only by its
/// replacement: the ready count lags a pod deleted a moment ago, and a
/// claim made again meanwhile must not be taken for the member's own.
fn notice(
    recorded: &mut BTreeMap<String, String>,
    claims: &[(String, Option<String>)],
    all_ready: bool,
) -> Option<(usize, String, String)> {
    let lost = claims.iter().enumerate().find_map(|(i, (name, uid))| {
        let was = recorded.get(name)?;
        let uid = uid.as_ref()?;
        (uid != was).then(|| (i, uid.clone(), was.clone()))
    });
    if lost.is_none() && all_ready {
        for (name, uid) in claims {
            if let Some(uid) = uid {
                recorded.entry(name.clone()).or_insert_with(|| uid.clone());
            }
        }
    }
    lost
}

/// The replacement under way waits: why goes to its status.
fn waiting(st: &mut RegionGroupStatus, group: &str, why: String) -> bool {
    tracing::info!(%group, %why, "member replacement waits");
    match st.member_replacement.as_mut() {
        Some(r) => {
            r.message = format!("replacing {}: waiting: {why}", r.member);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(uids: &[Option<&str>]) -> Vec<(String, Option<String>)> {
        uids.iter()
            .enumerate()
            .map(|(i, u)| (format!("g-{i}"), u.map(str::to_string)))
            .collect()
    }

    #[test]
    fn volumes_are_recorded_once_every_member_is_ready() {
        let mut recorded = BTreeMap::new();
        assert_eq!(
            notice(&mut recorded, &claims(&[Some("a"), Some("b"), Some("c")]), false),
            None
        );
        assert!(recorded.is_empty(), "not before every member is ready");
        assert_eq!(
            notice(&mut recorded, &claims(&[Some("a"), Some("b"), Some("c")]), true),
            None
        );
        assert_eq!(recorded.len(), 3);
    }

    #[test]
    fn a_claim_made_again_is_a_lost_volume_even_while_the_ready_count_lags() {
        let mut recorded = BTreeMap::new();
        notice(&mut recorded, &claims(&[Some("a"), Some("b"), Some("c")]), true);
        // Its claim being deleted, the pod gone a moment ago but still
        // counted ready: nothing lost yet, and the record kept.
        assert_eq!(
            notice(&mut recorded, &claims(&[Some("a"), None, Some("c")]), true),
            None
        );
        assert_eq!(recorded.get("g-1").map(String::as_str), Some("b"));
        // The claim made again: lost, even if counted ready.
        assert_eq!(
            notice(&mut recorded, &claims(&[Some("a"), Some("b2"), Some("c")]), true),
            Some((1, "b2".to_string(), "b".to_string()))
        );
        assert_eq!(
            recorded.get("g-1").map(String::as_str),
            Some("b"),
            "changed only by the replacement"
        );
    }
}
