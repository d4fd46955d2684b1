//! The replacement of a member whose volume was lost (a node gone with its
//! local volume, a claim deleted): etcd still counts the member, but it
//! cannot start on an empty volume, so the group runs a voter short until
//! the member is removed from Raft and added back
//! (`membership::plan_replacement`).
//!
//! A directory share's member is replaced the same way, in the directory:
//! the other shares' members (from the share's bootstrap list) count for
//! the quorum and are asked for the membership, and each step is taken
//! under the directory's roll lock, so that two shares never change the
//! directory's members at once. The share's ConfigMap then tells a member
//! that starts empty the directory's membership, `existing`.
//!
//! A lost volume is noticed by its claim: the operator records each
//! member's claim uid once every member is ready on its own
//! (status.memberVolumes), and a member whose claim has another uid since
//! is replaced, one at a time, and only while the others keep a quorum.
//! The volumes recorded are forgotten when the group is restored from a
//! backup (every claim is new then, and no member lost anything).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use tern_crds::{GroupRole, MemberReplacement, RegionGroup, RegionGroupStatus};

use super::directory_roll;
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
    let directory = rg.spec.role == GroupRole::Directory;
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
        // Only while every member runs on the claim recorded for it: a
        // claim on its way out or made again may have a member behind it
        // that bootstraps a cluster of its own with `new`.
        let on_recorded = claims
            .iter()
            .all(|(name, uid)| uid.is_some() && st.member_volumes.get(name) == uid.as_ref());
        if lost.is_none() && ready == pods && on_recorded && st.raft_members.is_empty() && !directory {
            record_membership(rg, tls, pods, st).await;
        }
        let Some((o, uid, was)) = lost else {
            return false;
        };
        let o = o as i32;
        let name = member(o);
        // A group of one or two cannot replace it: without it, the others
        // have no quorum (`too_small`).
        let what = match pods {
            _ if directory => {
                "its data is gone, and the directory's other members still count it as a member that cannot start on an empty volume (etcd: \"member has already been bootstrapped\"); replacing it (removed from the directory's Raft group, added back as a learner, promoted once caught up), under the directory's roll lock"
            }
            1 => "the group's only copy of its data is gone with it",
            2 => "its data is gone, and a group of two cannot replace a member (the other has no quorum without it)",
            _ => {
                "its data is gone, and etcd still counts it as a member that cannot start on an empty volume; replacing it (removed from the Raft group, added back as a learner, promoted once caught up)"
            }
        };
        let note = format!(
            "the volume of {name} is new (claim {} is {uid}, was {was}): {what}",
            member_claim_name(&name)
        );
        tracing::warn!(%group, member = %name, "a member's volume was lost");
        ctx.event(rg, EventType::Warning, "MemberVolumeLost", "Replace", note.clone())
            .await;
        st.member_replacement = Some(MemberReplacement {
            member: name,
            claim_uid: uid,
            message: note,
            ..MemberReplacement::default()
        });
    }
    let Some(mut r) = st.member_replacement.clone() else {
        return false;
    };
    // A directory share's members are a part of the directory: whether
    // the others keep a quorum without the member is the directory's to
    // say (`plan_replacement` counts every share's voters).
    if pods < 3 && !directory {
        let live = (0..pods).find(|o| member(*o) == r.member).and_then(&claim_uid);
        return too_small(rg, ctx, pods, live, st, r).await;
    }
    let Some(ordinal) = (0..MAX_ORDINALS).find(|o| member(*o) == r.member) else {
        return waiting(st, &group, format!("{} is not a member name of {group}", r.member));
    };

    let host = |o: i32| names::member_host(&group, &member(o), &namespace, &rg.spec.cluster_domain);
    let scheme = names::scheme(rg.spec.tls.is_some());
    // A directory share's group is every share's members: the others
    // (from the bootstrap list) take ordinals from OTHERS_FROM.
    let others: Vec<(i32, tern_crds::ClusterMember, String)> = if directory {
        directory_roll::other_members(rg, pods)
            .into_iter()
            .filter_map(|(o, name, client)| {
                let m = rg.spec.initial_cluster.iter().find(|m| m.name == name)?;
                Some((o, m.clone(), client))
            })
            .collect()
    } else {
        Vec::new()
    };
    let other = |o: i32| others.iter().find(|(x, _, _)| *x == o);
    let peer_url = |o: i32| match other(o) {
        Some((_, m, _)) => m.peer_url.clone(),
        None => format!("{scheme}://{}:{}", host(o), names::PEER_PORT),
    };
    let name_of = |o: i32| match other(o) {
        Some((_, m, _)) => m.name.clone(),
        None => member(o),
    };
    let endpoints: Vec<String> = (0..pods)
        .filter(|o| *o != ordinal)
        .map(|o| format!("{scheme}://{}:{}", host(o), names::CLIENT_PORT))
        .chain(others.iter().map(|(_, _, client)| client.clone()))
        .collect();
    let observed = match membership::observe(&endpoints, tls).await {
        Ok(m) => m,
        Err(e) => return waiting(st, &group, membership::reason(e)),
    };
    // What a member that starts empty is told, from this reconcile on:
    // `existing`, and the membership with the member at its address (the
    // same name and address before its removal and after it is added
    // back). A pod restarted before the ConfigMap says so would start with
    // what it said before (`new`, for a group never resized) and write a
    // log of its own to its volume.
    let mut raft_members = membership::initial_cluster(&observed, name_of, peer_url);
    if !raft_members.iter().any(|m| m.name == r.member) {
        raft_members.push(tern_crds::ClusterMember {
            name: r.member.clone(),
            peer_url: peer_url(ordinal),
        });
        raft_members.sort_by_key(|m| {
            (0..MAX_ORDINALS)
                .chain(others.iter().map(|(o, _, _)| *o))
                .find(|o| name_of(*o) == m.name)
        });
    }
    st.raft_members = raft_members;
    let config_ready = rg.status.as_ref().is_some_and(|s| s.raft_members == st.raft_members);
    let removed = r.removed_id.as_deref().and_then(|h| u64::from_str_radix(h, 16).ok());
    // A volume made since the member left Raft and its claim was cleared:
    // no pod can have written to it as the old member.
    let live = claim_uid(ordinal);
    let fresh = r.cleared && live.as_ref().is_some_and(|u| *u != r.claim_uid);
    let pods_api = Api::<Pod>::namespaced(ctx.client.clone(), &namespace);
    // While the old member is still in Raft: its claim is new, but a
    // member that answers as itself, caught up, did not lose its data (a
    // claim made again some other way, a volume bound again). It stays,
    // leader or not, and its claim is recorded. Asked on every reconcile
    // until it is removed, and given a moment on a new claim first.
    let old = observed
        .members
        .iter()
        .find(|m| m.peer_urls.contains(&peer_url(ordinal)) && removed.is_none_or(|id| id == m.id));
    if let Some(old) = old {
        let url = format!("{scheme}://{}:{}", host(ordinal), names::CLIENT_PORT);
        if membership::serves(&url, old.id, &endpoints, tls).await {
            let note = format!(
                "{}'s claim is new, but the member serves, caught up, as itself: not replaced; its new claim is recorded",
                r.member
            );
            tracing::info!(%group, member = %r.member, "member serves: not replaced");
            ctx.event(rg, EventType::Normal, "MemberKept", "Replace", note).await;
            if let Some(uid) = live {
                st.member_volumes.insert(r.member.clone(), uid);
            }
            st.member_replacement = None;
            // The lock is the replacement's unless the share rolls: then
            // it is the roll's, given back once the roll has settled.
            if directory && st.rolling_update.is_none() {
                release(&endpoints, tls, &rg.spec.region).await;
            }
            return false;
        }
        if removed.is_none()
            && let Some(wait) = starting(&claims, &pods_api, &r.member).await
        {
            return waiting(
                st,
                &group,
                format!(
                    "{} may still start on its new claim as itself (another {} s)",
                    r.member,
                    wait.as_secs()
                ),
            );
        }
    }
    // A directory share changes the directory's members under its roll
    // lock: one change of them at a time across the shares (two shares
    // replacing at once could each remove a voter), and never while
    // another share restarts one for a roll. The step is planned from what
    // was seen before the lock; a change by another share meanwhile would
    // have to have held the lock, and etcd refuses a second learner.
    if directory && let Err(why) = take_lock(&endpoints, tls, &rg.spec.region, &group).await {
        return waiting(st, &group, why);
    }
    let step = match membership::plan_replacement(&observed, ordinal, removed, fresh, r.restarted, peer_url) {
        Ok(step) => step,
        Err(e) => return waiting(st, &group, membership::reason(e)),
    };
    let what = step.describe(&group);
    match &step {
        Step::Steady => {
            let Some(uid) = live else {
                return waiting(st, &group, format!("{} has no claim in use", r.member));
            };
            let note = format!("{} replaced: a voter again, on its new volume", r.member);
            tracing::info!(%group, member = %r.member, "member replaced");
            ctx.event(rg, EventType::Normal, "MemberReplaced", "Replace", note)
                .await;
            st.member_volumes.insert(r.member.clone(), uid);
            st.member_replacement = None;
            // The lock is the replacement's unless the share rolls: then
            // it is the roll's, given back once the roll has settled.
            if directory && st.rolling_update.is_none() {
                release(&endpoints, tls, &rg.spec.region).await;
            }
            return false;
        }
        Step::RestartPod { .. } | Step::ClearVolume { .. } if !config_ready => {
            return waiting(
                st,
                &group,
                "the ConfigMap is told the membership a member that starts empty joins".into(),
            );
        }
        Step::RestartPod { .. } => {
            // Deleted, the pod is made again at once by the StatefulSet
            // and reads the membership in the ConfigMap; failing, it would
            // wait out its crash back-off.
            if let Err(e) = delete_pod(&pods_api, &r.member).await {
                return waiting(st, &group, format!("cannot restart pod {}: {e}", r.member));
            }
            r.restarted = true;
        }
        Step::ClearVolume { .. } => {
            match clear(&api, &pods_api, &claims, &r).await {
                Ok(deleted) => {
                    if let Some(uid) = deleted {
                        r.claim_uid = uid;
                    }
                    r.cleared = true;
                }
                Err(e) => return waiting(st, &group, format!("cannot delete the volume of {}: {e}", r.member)),
            }
            st.member_replacement = Some(r.clone());
            return waiting(st, &group, format!("{what}: waiting for its new, empty claim"));
        }
        _ => {
            if let Some(done) = take(rg, ctx, tls, st, &mut r, &step, &observed).await {
                return done;
            }
        }
    }
    tracing::info!(%group, member = %r.member, step = %what, "member replacement");
    r.message = format!("replacing {}: {what}", r.member);
    st.member_replacement = Some(r);
    true
}

/// Takes (or renews) the directory's roll lock for `share` of `region`,
/// through the directory's members at `endpoints`.
async fn take_lock(
    endpoints: &[String],
    tls: Option<&tern_common::tls::Tls>,
    region: &str,
    share: &str,
) -> Result<(), String> {
    let urls: Vec<&str> = endpoints.iter().map(String::as_str).collect();
    let mut c = tern_common::etcd::client(&urls, tls, Some(super::GROUP_CALL_TIMEOUT))
        .await
        .map_err(|e| format!("cannot reach the directory: {e}"))?;
    directory_roll::lock(&mut c, region, share).await
}

/// Gives the directory's roll lock back once a replacement has ended; one
/// that cannot be given back lapses with its lease.
async fn release(endpoints: &[String], tls: Option<&tern_common::tls::Tls>, region: &str) {
    let urls: Vec<&str> = endpoints.iter().map(String::as_str).collect();
    let given_back = match tern_common::etcd::client(&urls, tls, Some(super::GROUP_CALL_TIMEOUT)).await {
        Ok(mut c) => directory_roll::unlock(&mut c, region).await,
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = given_back {
        tracing::info!(%region, error = %e, "the directory's roll lock lapses with its lease");
    }
}

/// Takes a Raft step of the replacement: `None` once done, or what `step`
/// returns while it waits.
async fn take(
    rg: &RegionGroup,
    ctx: &Context,
    tls: Option<&tern_common::tls::Tls>,
    st: &mut RegionGroupStatus,
    r: &mut MemberReplacement,
    step: &Step,
    observed: &membership::Membership,
) -> Option<bool> {
    let group = rg.name_any();
    let what = step.describe(&group);
    // Recorded before etcd is changed: a member at the address with
    // another id is then known for the replacement, even if this operator
    // dies right after the step.
    if matches!(step, Step::Remove { .. } | Step::AddLearner { .. }) && r.removed_id.is_none() {
        let id = match step {
            Step::Remove { id, .. } => *id,
            // Removed by someone else: no member has id 0.
            _ => 0,
        };
        r.removed_id = Some(format!("{id:x}"));
        r.message = format!("replacing {}: {what}", r.member);
        let mut before = st.clone();
        before.member_replacement = Some(r.clone());
        if let Err(e) = super::write_status(rg, ctx, before).await {
            st.member_replacement = Some(r.clone());
            return Some(waiting(
                st,
                &group,
                format!("cannot record the step before taking it: {e}"),
            ));
        }
    }
    match membership::execute_replacement(step, observed, tls).await {
        Ok(Progress::Done) => {
            ctx.event(rg, EventType::Normal, "MemberReplacement", "Replace", what)
                .await;
            None
        }
        Ok(Progress::Waiting(why)) => {
            st.member_replacement = Some(r.clone());
            Some(waiting(st, &group, why))
        }
        Err(e) => {
            st.member_replacement = Some(r.clone());
            Some(waiting(st, &group, membership::reason(e)))
        }
    }
}

/// Records the group's Raft membership in status once its members have
/// all been ready, so that the ConfigMap tells a member that starts without
/// data to join the cluster it had (`existing`) rather than to bootstrap one
/// (`new`): a member whose volume was lost then cannot start a second,
/// empty cluster under the group's name. That matters most for a group of
/// one, whose lost volume held the only copy of its data. Tried again on
/// the next reconcile if etcd does not answer.
async fn record_membership(
    rg: &RegionGroup,
    tls: Option<&tern_common::tls::Tls>,
    pods: i32,
    st: &mut RegionGroupStatus,
) {
    let group = rg.name_any();
    let namespace = rg.namespace().unwrap_or_default();
    let member = |o: i32| names::member_name(&group, o);
    let host = |o: i32| names::member_host(&group, &member(o), &namespace, &rg.spec.cluster_domain);
    let scheme = names::scheme(rg.spec.tls.is_some());
    let endpoints: Vec<String> = (0..pods)
        .map(|o| format!("{scheme}://{}:{}", host(o), names::CLIENT_PORT))
        .collect();
    match membership::observe(&endpoints, tls).await {
        Ok(observed) => {
            st.raft_members = membership::initial_cluster(&observed, member, |o| {
                format!("{scheme}://{}:{}", host(o), names::PEER_PORT)
            });
            tracing::info!(%group, members = st.raft_members.len(), "Raft membership recorded");
        }
        Err(e) => {
            tracing::info!(%group, error = %membership::reason(e), "Raft membership not recorded yet");
        }
    }
}

/// The hold put on the region of a group of one that lost its volume.
fn hold_reason(group: &str, r: &MemberReplacement) -> String {
    format!(
        "{} of {group} lost its volume (its claim is now {}), and with it the group's only copy of its data: restore the group from a backup (docs/backup.md)",
        r.member, r.claim_uid
    )
}

/// A member of a group of one or two lost its volume: it cannot be
/// replaced, since without it the others have no quorum. It is kept if it
/// serves on its new claim after all (a claim bound again to its volume);
/// told to join the cluster it had, a member that starts empty cannot, and
/// in a group of two, ready means both serve. Otherwise the group waits
/// for a restore from a backup, and a group of one has its region held in
/// the directory meanwhile: no agent claims its lease, so its routers
/// commit nothing, even on an empty group made again under its name.
/// True until the member is kept.
async fn too_small(
    rg: &RegionGroup,
    ctx: &Context,
    pods: i32,
    live: Option<String>,
    st: &mut RegionGroupStatus,
    mut r: MemberReplacement,
) -> bool {
    let group = rg.name_any();
    let namespace = rg.namespace().unwrap_or_default();
    let pods_api = Api::<Pod>::namespaced(ctx.client.clone(), &namespace);
    let reason = hold_reason(&group, &r);
    // Told `existing` by the ConfigMap in effect: a member that is ready
    // started with data.
    let told_existing = rg.status.as_ref().is_some_and(|s| !s.raft_members.is_empty());
    if told_existing
        && let Some(uid) = live
        && pod_ready(&pods_api, &r.member).await
    {
        // Asked whether or not `held` says so: the hold may have been put
        // by a reconcile whose status was then not written.
        let lifted = if pods == 1 {
            match super::restore::lift_hold(rg, ctx, &reason).await {
                Ok(lifted) => lifted,
                Err(why) => {
                    st.member_replacement = Some(r);
                    return waiting(
                        st,
                        &group,
                        format!("cannot lift the hold of region {}: {why}", rg.spec.region),
                    );
                }
            }
        } else {
            false
        };
        let note = format!(
            "{}'s claim is new, but the member serves on it: its data was not lost; its new claim is recorded{}",
            r.member,
            if lifted {
                ", and the operator's hold of the region lifted"
            } else {
                ""
            }
        );
        tracing::info!(%group, member = %r.member, "member serves: kept");
        ctx.event(rg, EventType::Normal, "MemberKept", "Replace", note).await;
        st.member_volumes.insert(r.member.clone(), uid);
        st.member_replacement = None;
        return false;
    }
    if pods == 1 && !r.held {
        match super::restore::hold(rg, ctx, reason).await {
            Ok(()) => {
                r.held = true;
                // The last restore no longer describes the group: setting
                // restoreFrom to its backup restores it again. (One that
                // still names it is not taken as asking: see
                // `restore::lost`.)
                if rg.spec.restore.is_none() {
                    st.restore = None;
                }
                let note = format!(
                    "region {} held in the directory: {} lost the group's only copy of its data",
                    rg.spec.region, r.member
                );
                tracing::warn!(%group, member = %r.member, "region held");
                ctx.event(rg, EventType::Warning, "RegionHeld", "Replace", note).await;
            }
            Err(why) => {
                st.member_replacement = Some(r);
                return waiting(
                    st,
                    &group,
                    format!("cannot hold region {} in the directory: {why}", rg.spec.region),
                );
            }
        }
    }
    r.message = if pods == 1 {
        format!(
            "{} lost its volume, and with it the group's only copy of its data: region {} is held in the directory (its agent claims no lease, its routers refuse writes), and the member, told to join the cluster it had, does not start empty. Restore the group from a backup (restoreFrom, docs/backup.md). To accept an empty region instead, remove restoreFrom if set, delete this RegionGroup (the GeoCluster makes it again, new) and lift the hold by hand (etcdctl del /tern/dir/holds/{})",
            r.member, rg.spec.region, rg.spec.region
        )
    } else {
        format!(
            "{} lost its volume, and a group of {pods} cannot replace a member (the others have no quorum without it): the group serves again once the member does, or once it is restored from a backup (restoreFrom, docs/backup.md)",
            r.member
        )
    };
    st.member_replacement = Some(r);
    true
}

/// Whether `member`'s pod is ready.
async fn pod_ready(pods: &Api<Pod>, member: &str) -> bool {
    pods.get_opt(member).await.ok().flatten().is_some_and(|p| {
        p.status
            .and_then(|s| s.conditions)
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    })
}

/// How long a member on a new claim is given to start on it and answer
/// as itself before it is removed.
const START_GRACE: Duration = Duration::from_secs(20);

/// How much longer to wait before removing `member`: its pod is not ready,
/// and its claim was made less than [`START_GRACE`] ago.
async fn starting(claims: &[PersistentVolumeClaim], pods: &Api<Pod>, member: &str) -> Option<Duration> {
    let name = member_claim_name(member);
    let made = claims
        .iter()
        .find(|c| c.name_any() == name)?
        .metadata
        .creation_timestamp
        .clone()?;
    let age = Duration::try_from(Timestamp::now().duration_since(made.0)).unwrap_or_default();
    let left = START_GRACE.checked_sub(age)?;
    (!pod_ready(pods, member).await).then_some(left)
}

/// Deletes a member's pod; one already gone is no error.
async fn delete_pod(pods: &Api<Pod>, name: &str) -> Result<(), kube::Error> {
    match pods.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Clears the volume of a member removed from Raft: its claim (which a
/// pod may have written to as the old member) is deleted, and its pod,
/// which holds it until it goes. The StatefulSet makes both again, the
/// claim empty. Returns the uid of the claim deleted, if one was.
async fn clear(
    claims_api: &Api<PersistentVolumeClaim>,
    pods: &Api<Pod>,
    claims: &[PersistentVolumeClaim],
    r: &MemberReplacement,
) -> Result<Option<String>, kube::Error> {
    let name = member_claim_name(&r.member);
    let Some(claim) = claims.iter().find(|c| c.name_any() == name) else {
        // Gone: the StatefulSet makes it with the pod. A pod it made while
        // the claim was being deleted waits unscheduled, and a StatefulSet
        // controller that makes the claims of new pods only would leave it
        // so: deleted, it comes back with its claim.
        if let Some(pod) = pods.get_opt(&r.member).await?
            && pod.spec.as_ref().is_none_or(|s| s.node_name.is_none())
        {
            delete_pod(pods, &r.member).await?;
        }
        return Ok(None);
    };
    match &claim.metadata.deletion_timestamp {
        None => {
            match claims_api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
            delete_pod(pods, &r.member).await?;
            Ok(claim.uid())
        }
        // Being deleted: held by a pod that started on it before the
        // delete; a pod made since waits unscheduled and holds nothing.
        Some(since) => match pods.get_opt(&r.member).await? {
            Some(pod)
                if pod.spec.as_ref().is_some_and(|s| s.node_name.is_some())
                    && pod.metadata.creation_timestamp.as_ref().is_some_and(|t| t.0 < since.0) =>
            {
                delete_pod(pods, &r.member).await.map(|()| claim.uid())
            }
            _ => Ok(claim.uid()),
        },
    }
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
