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
        // One change of the members at a time.
        if st.membership_change.is_some() || pods != rg.spec.replicas {
            return false;
        }
        let lost = (0..pods).find_map(|o| {
            let recorded = st.member_volumes.get(&member(o))?;
            let uid = claim_uid(o)?;
            (uid != *recorded).then(|| (o, uid, recorded.clone()))
        });
        let Some((o, uid, was)) = lost else {
            if ready == pods {
                st.member_volumes = (0..pods).filter_map(|o| Some((member(o), claim_uid(o)?))).collect();
            }
            return false;
        };
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
