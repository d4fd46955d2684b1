//! RegionGroup reconcile: the next step of a membership change, if one is
//! due → build the member objects → apply → status from the StatefulSet.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, EvictParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;
use tern_common::backup_request;
use tern_crds::{GroupRole, PreUpgradeBackup, RegionGroup, RegionGroupStatus};

use crate::apply::{Outcome, apply, apply_existing};
use crate::build::regiongroup::Members;
use crate::context::{Context, key};
use crate::error::KubeContext;
use crate::etcd_flags::ClusterState;
use crate::membership::{self, Progress, Step};
use crate::status::MemberCounts;
use crate::{Error, Result, build, names, status};

pub mod directory_roll;
mod replace;
mod restore;

pub const CONTROLLER: &str = "regiongroup";

pub async fn reconcile(rg: Arc<RegionGroup>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.managed.contains(&rg.spec.region) || rg.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let name = rg.name_any();
    let namespace = rg.namespace().unwrap_or_default();
    let sts_api = Api::<StatefulSet>::namespaced(ctx.client.clone(), &namespace);
    let existing = sts_api
        .get_opt(&name)
        .await
        .context(|| format!("reading StatefulSet {namespace}/{name}"))?;
    let running = existing.as_ref().and_then(|s| s.spec.replicas);
    // The group as it is stored now, status and all: the cache can lag
    // this operator's own last status write by a moment, and a status
    // computed from it would write older values back over newer ones (the
    // pre-upgrade backup's id, a step of a membership change).
    let fresh = Api::<RegionGroup>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(&name)
        .await
        .context(|| format!("reading RegionGroup {namespace}/{name}"))?;
    let Some(fresh) = fresh else {
        return Ok(Action::await_change());
    };
    let rg = Arc::new(fresh);
    let mut st = rg.status.clone().unwrap_or_default();
    // With TLS the members take no client without a certificate: every
    // call the operator makes below is made with its own.
    let tls = match &rg.spec.tls {
        Some(t) => Some(crate::certs::client_tls(&ctx.client, &namespace, &t.client_secret).await?),
        None => None,
    };
    let ready = existing
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let change = membership_change(&rg, &ctx, tls.as_ref(), running, ready, &mut st).await;
    let mut objects = build::regiongroup::group_objects_with(&rg, &change.members);
    hold_refused_upgrade(&rg, &ctx, existing.as_ref(), &mut objects.stateful_set, &mut st).await;
    let held = hold_for_backup(
        &rg,
        &ctx,
        tls.as_ref(),
        existing.as_ref(),
        &mut objects.stateful_set,
        &mut st,
    )
    .await;

    // Configuration and network identity before the members that use them.
    apply(&ctx.client, &objects.config_map).await?;
    apply(&ctx.client, &objects.peer_service).await?;
    apply(&ctx.client, &objects.client_service).await?;
    apply(&ctx.client, &objects.pdb).await?;
    if existing.is_none() {
        match restore::step(&rg, &ctx, &mut st).await? {
            restore::Step::Proceed => {}
            restore::Step::Wait => {
                write_status(&rg, &ctx, st).await?;
                return Ok(Action::requeue(MEMBERSHIP_POLL));
            }
            // The group's Raft membership is now the restored one: the
            // next reconcile makes the StatefulSet from it.
            restore::Step::Restored => {
                write_status(&rg, &ctx, st).await?;
                return Ok(Action::requeue(Duration::ZERO));
            }
        }
    }
    // Found at the start of this reconcile, the StatefulSet is only
    // updated: deleted since (a lost group, to be restored), it is made
    // again by the next reconcile, after the checks above.
    let outcome = match &existing {
        None => apply(&ctx.client, &objects.stateful_set).await?,
        Some(_) => match apply_existing(&ctx.client, &objects.stateful_set).await? {
            Some(outcome) => outcome,
            None => {
                tracing::info!(group = %name, "StatefulSet deleted during the reconcile; the next one makes it");
                return Ok(Action::requeue(Duration::ZERO));
            }
        },
    };
    match outcome {
        Outcome::Created => {
            let note = format!("created StatefulSet {name} with {} members", change.members.pods);
            ctx.event(rg.as_ref(), EventType::Normal, "MembersCreated", "Apply", note)
                .await;
        }
        Outcome::Updated => {
            let note = format!(
                "updated StatefulSet {name}: {} members, rolling one member at a time",
                change.members.pods
            );
            ctx.event(rg.as_ref(), EventType::Normal, "MembersUpdated", "Apply", note)
                .await;
        }
        Outcome::Unchanged => {}
    }

    let sts = sts_api
        .get_opt(&name)
        .await
        .context(|| format!("reading StatefulSet {namespace}/{name}"))?;
    let rolling = if change.in_progress {
        // One change of the members at a time: a resize first.
        false
    } else {
        rolling_update(&rg, &ctx, tls.as_ref(), sts.as_ref(), &mut st).await
    };
    // Why the members still run the image they run, and looked at again
    // as often as a roll.
    if let Some(why) = &held {
        st.upgrade_refused = Some(why.clone());
    }
    let rolling = rolling || held.is_some();
    let counts = MemberCounts::of(sts.as_ref());
    // A restored group's fences, once a quorum of its members serves.
    let fences_pending = counts.desired > 0
        && counts.ready >= build::regiongroup::quorum(counts.desired)
        && restore::agree_fences(&rg, &ctx, tls.as_ref(), &endpoints(&rg, counts.desired), &mut st).await
            == restore::Pending::Yes;
    let rolling = rolling || fences_pending;
    let phase = counts.phase();
    let detail = format!(
        "{}/{} members ready, {} current",
        counts.ready, counts.desired, counts.updated
    );
    let now = Time(Timestamp::now());
    status::phase_conditions(&mut st.conditions, phase, detail, rg.metadata.generation, &now);
    st.observed_generation = rg.metadata.generation;
    st.phase = phase;
    st.ready_members = counts.ready;
    st.updated_members = counts.updated;
    write_status(&rg, &ctx, st).await?;
    ctx.succeeded(&key(rg.as_ref()));
    Ok(Action::requeue(if change.in_progress || rolling {
        MEMBERSHIP_POLL
    } else {
        ctx.resync
    }))
}

/// The pods of a group's members.
async fn member_pods(ctx: &Context, namespace: &str, group: &str) -> std::result::Result<Vec<Pod>, kube::Error> {
    let selector = names::selector_labels(group)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    Api::<Pod>::namespaced(ctx.client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .map(|l| l.items)
}

fn first_image(pod: Option<&k8s_openapi::api::core::v1::PodSpec>) -> Option<String> {
    pod.and_then(|p| p.containers.first()).and_then(|c| c.image.clone())
}

/// Keeps the members on their deployed etcd image when the spec's would
/// break etcd's version-skew rule (`crate::upgrade::image_change`), judged
/// against every image a member's pod runs (under `OnDelete` the template
/// changes at once and the pods later, so the template alone is not what
/// runs), or the StatefulSet's when no pod runs. The rest of the template
/// still follows the spec, and the status and an event say why.
async fn hold_refused_upgrade(
    rg: &RegionGroup,
    ctx: &Context,
    existing: Option<&StatefulSet>,
    desired: &mut StatefulSet,
    st: &mut RegionGroupStatus,
) {
    let template = existing.and_then(|s| first_image(s.spec.template.spec.as_ref()));
    let (Some(template), Some(wanted)) = (template, first_image(desired.spec.template.spec.as_ref())) else {
        st.upgrade_refused = None;
        return;
    };
    // No change asked for (every reconcile but one): the template's image
    // was judged when it was set, and no pod needs listing.
    if template == wanted {
        st.upgrade_refused = None;
        return;
    }
    let namespace = rg.namespace().unwrap_or_default();
    let mut running: Vec<String> = member_pods(ctx, &namespace, &rg.name_any())
        .await
        .unwrap_or_default()
        .iter()
        .filter_map(|p| first_image(p.spec.as_ref()))
        .collect();
    if running.is_empty() {
        running.push(template.clone());
    }
    running.sort();
    running.dedup();
    let refused = running
        .iter()
        .find_map(|deployed| crate::upgrade::image_change(deployed, &wanted).err());
    match refused {
        None => st.upgrade_refused = None,
        Some(why) => {
            if let Some(c) = desired
                .spec
                .template
                .spec
                .as_mut()
                .and_then(|p| p.containers.first_mut())
            {
                c.image = Some(template.clone());
            }
            let note = format!(
                "the template stays on {template} (members run {}): {why}",
                running.join(", ")
            );
            if st.upgrade_refused.as_deref() != Some(note.as_str()) {
                ctx.event(rg, EventType::Warning, "UpgradeRefused", "Upgrade", note.clone())
                    .await;
            }
            st.upgrade_refused = Some(note);
        }
    }
}

/// Takes the next step of a rolling update of a data group's members (its
/// StatefulSet's strategy is `OnDelete`): when some member's pod runs an
/// older template revision, `crate::upgrade::plan` names the pod to evict
/// or the leadership to hand over, from what the members and their pods
/// report. Returns whether an update is under way; records it in
/// `st.rolling_update`.
async fn rolling_update(
    rg: &RegionGroup,
    ctx: &Context,
    tls: Option<&tern_common::tls::Tls>,
    sts: Option<&StatefulSet>,
    st: &mut RegionGroupStatus,
) -> bool {
    let Some(sts) = sts else {
        st.rolling_update = None;
        return false;
    };
    let Some(revision) = sts.status.as_ref().and_then(|s| s.update_revision.clone()) else {
        // No StatefulSet controller has looked at it (a test API server).
        st.rolling_update = None;
        return false;
    };
    let group = rg.name_any();
    let namespace = rg.namespace().unwrap_or_default();
    let replicas = sts.spec.replicas.unwrap_or(0);
    let updated = |st: &mut RegionGroupStatus, note: String| {
        tracing::info!(group = %group, step = %note, "rolling update");
        st.rolling_update = Some(note);
        true
    };
    // Just applied: until the StatefulSet controller has seen the new
    // template, its updateRevision is the old one and every pod looks
    // current.
    let seen = sts.status.as_ref().and_then(|s| s.observed_generation);
    if seen < sts.metadata.generation {
        if st.rolling_update.is_some() {
            return updated(
                st,
                "waiting: the StatefulSet controller has not seen the template yet".into(),
            );
        }
        return true;
    }
    // Every pod on the newest revision, as the StatefulSet counts them:
    // nothing to roll, and no pod to list.
    let counted = sts.status.as_ref().map(|s| s.updated_replicas.unwrap_or(0));
    if counted == Some(replicas) && st.rolling_update.is_none() {
        return false;
    }
    let pods = match member_pods(ctx, &namespace, &group).await {
        Ok(pods) => pods,
        Err(e) => return updated(st, format!("waiting: cannot list the members' pods: {e}")),
    };
    let pod_of = |o: i32| {
        let name = names::member_name(&group, o);
        let pod = pods.iter().find(|p| p.metadata.name.as_deref() == Some(name.as_str()));
        // A pod not there yet is made from the newest revision, and is not
        // ready.
        let current = pod
            .is_none_or(|p| p.labels().get("controller-revision-hash").map(String::as_str) == Some(revision.as_str()));
        let state = crate::upgrade::PodState {
            ready: pod.is_some_and(|p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            }),
            terminating: pod.is_some_and(|p| p.metadata.deletion_timestamp.is_some()),
        };
        (current, state)
    };
    let directory = rg.spec.role == GroupRole::Directory;
    let mut members: Vec<(i32, String, String)> = member_urls(rg, replicas, tls.is_some())
        .into_iter()
        .map(|(o, url)| (o, names::member_name(&group, o), url))
        .collect();
    if directory {
        members.extend(directory_roll::other_members(rg, replicas));
    }
    let directory_client = async || {
        let urls: Vec<&str> = members.iter().map(|(_, _, u)| u.as_str()).collect();
        tern_common::etcd::client(&urls, tls, Some(GROUP_CALL_TIMEOUT))
            .await
            .map_err(|e| format!("cannot reach the directory: {e}"))
    };
    // The other shares' members count for the directory's health and
    // leadership; they are not this operator's to restart.
    let observe = || {
        crate::upgrade::observe_named(&members, tls, |o| {
            if o >= directory_roll::OTHERS_FROM {
                (true, crate::upgrade::PodState::READY)
            } else {
                pod_of(o)
            }
        })
    };
    if (0..replicas).all(|o| pod_of(o).0) {
        // A directory share gives the roll lock back only once its last
        // restarted member is back and the whole directory has settled: a
        // pod not made again yet counts as current.
        if directory && st.rolling_update.is_some() {
            let given_back = match crate::upgrade::settled(&observe().await) {
                Ok(()) => match directory_client().await {
                    Ok(mut c) => directory_roll::unlock(&mut c, &rg.spec.region).await,
                    Err(e) => Err(e),
                },
                Err(why) => Err(why),
            };
            if let Err(why) = given_back {
                return updated(
                    st,
                    format!(
                        "every member runs the current template; waiting before giving the directory's roll lock back: {why}"
                    ),
                );
            }
        }
        if st.rolling_update.take().is_some() {
            let note = format!("every member of {group} runs the current template");
            ctx.event(rg, EventType::Normal, "RollingUpdateDone", "RollingUpdate", note)
                .await;
        }
        return false;
    }
    let on_current = (0..replicas).filter(|o| pod_of(*o).0).count();
    let progress = format!("{on_current}/{replicas} members on the current template");
    // A directory share takes the roll lock before it looks: a step
    // (a restart, a hand-over) is planned from what is seen under the lock,
    // so two operators never act on the same healthy view. Held, and
    // renewed, until the share has rolled and the directory settled.
    if directory {
        let locked = match directory_client().await {
            Ok(mut c) => directory_roll::lock(&mut c, &rg.spec.region, &group).await,
            Err(e) => Err(e),
        };
        if let Err(why) = locked {
            return updated(st, format!("{progress}: waiting: {why}"));
        }
    }
    let states = observe().await;
    let note = match crate::upgrade::plan(&states) {
        crate::upgrade::Step::Steady => return false,
        crate::upgrade::Step::Wait { reason } => {
            // Nothing of this share in flight (its members all ready, none
            // going): the lock goes back while it waits, so that what it
            // waits for (another share's lost member, replaced under the
            // lock) is not held up behind it. Taken again before its next
            // step, which is planned under it.
            let idle = (0..replicas).all(|o| {
                let (_, state) = pod_of(o);
                state.ready && !state.terminating
            });
            if directory
                && idle
                && let Ok(mut c) = directory_client().await
                && let Err(e) = directory_roll::unlock(&mut c, &rg.spec.region).await
            {
                tracing::info!(%group, error = %e, "the roll lock lapses with its lease");
            }
            format!("{progress}: waiting: {reason}")
        }
        crate::upgrade::Step::Restart { ordinal } => {
            let pod = names::member_name(&group, ordinal);
            // An eviction, not a delete: the PodDisruptionBudget arbitrates
            // against a node drain happening at the same time. A group of
            // one is deleted: its budget (a quorum of one) never allows it,
            // and its restart is the outage the plan accepts. So is a
            // directory share's member: its budget counts the share alone
            // (a quorum of a share of two is both), while the directory's
            // quorum is what `plan` and the roll lock guard.
            let pods_api = Api::<Pod>::namespaced(ctx.client.clone(), &namespace);
            let restarted = if replicas > 1 && !directory {
                pods_api.evict(&pod, &EvictParams::default()).await.map(|_| ())
            } else {
                pods_api.delete(&pod, &DeleteParams::default()).await.map(|_| ())
            };
            match restarted {
                Ok(_) => {
                    let note = format!("{progress}: restarting {pod} on the current template");
                    ctx.event(rg, EventType::Normal, "MemberRestarted", "RollingUpdate", note.clone())
                        .await;
                    note
                }
                Err(kube::Error::Api(e)) if e.code == 429 => {
                    format!("{progress}: waiting: the PodDisruptionBudget allows no disruption of {pod} now")
                }
                Err(kube::Error::Api(e)) if e.code == 404 => format!("{progress}: {pod} is being replaced"),
                Err(e) => format!("{progress}: waiting: evicting {pod}: {e}"),
            }
        }
        crate::upgrade::Step::MoveLeader { from, to } => {
            let leader = states.iter().find(|m| m.id == from);
            let url = leader.and_then(|l| members.iter().find(|(o, _, _)| *o == l.ordinal));
            let moved = match url {
                Some((_, _, url)) => match tern_common::etcd::client(&[url.as_str()], tls, None).await {
                    Ok(mut c) => c.move_leader(to).await.map(|_| ()).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
                None => Err("the leader is gone".into()),
            };
            match moved {
                Ok(()) => {
                    let note =
                        format!("{progress}: leadership handed from {from:x} to {to:x} before the leader restarts");
                    ctx.event(rg, EventType::Normal, "LeaderHandedOver", "RollingUpdate", note.clone())
                        .await;
                    note
                }
                Err(e) => format!("{progress}: waiting: handing leadership over: {e}"),
            }
        }
    };
    updated(st, note)
}

/// Each member's client URL, by ordinal.
/// The client URLs of a group's first `members` members.
fn endpoints(rg: &RegionGroup, members: i32) -> Vec<String> {
    member_urls(rg, members, rg.spec.tls.is_some())
        .into_iter()
        .map(|(_, url)| url)
        .collect()
}

fn member_urls(rg: &RegionGroup, replicas: i32, tls: bool) -> Vec<(i32, String)> {
    let group = rg.name_any();
    let namespace = rg.namespace().unwrap_or_default();
    (0..replicas)
        .map(|o| {
            let host = names::member_host(
                &group,
                &names::member_name(&group, o),
                &namespace,
                &rg.spec.cluster_domain,
            );
            (o, format!("{}://{host}:{}", names::scheme(tls), names::CLIENT_PORT))
        })
        .collect()
}

/// Keeps a data group's member template as its StatefulSet has it until
/// the pre-upgrade backup of a change of etcd image is taken
/// (spec.preUpgradeBackup): no member runs the new image before it, not
/// even one whose pod a node drain or a crash restarts while the roll
/// waits. The whole template waits, not only the image, so that a change
/// of image and settings together rolls once, after the backup. Returns
/// why it holds.
async fn hold_for_backup(
    rg: &RegionGroup,
    ctx: &Context,
    tls: Option<&tern_common::tls::Tls>,
    existing: Option<&StatefulSet>,
    desired: &mut StatefulSet,
    st: &mut RegionGroupStatus,
) -> Option<String> {
    if !rg.spec.pre_upgrade_backup {
        return None;
    }
    let deployed = existing.and_then(|s| first_image(s.spec.template.spec.as_ref()))?;
    let wanted = first_image(desired.spec.template.spec.as_ref())?;
    if deployed == wanted {
        return None;
    }
    let replicas = existing.and_then(|s| s.spec.replicas).unwrap_or(0);
    let members = member_urls(rg, replicas, tls.is_some());
    let reason = pre_upgrade_backup(rg, ctx, tls, &members, &wanted, st).await?;
    if let Some(existing) = existing {
        desired.spec.template = existing.spec.template.clone();
    }
    Some(format!(
        "the members' template stays on {deployed} until a backup is taken before {wanted}: {reason}"
    ))
}

/// Before the first member restarts on another etcd image: a backup of
/// the group asked of the region's agent through the group
/// (`tern_common::backup_request`) and taken after the roll began, so that
/// an upgrade that goes wrong can be undone by a restore that loses
/// nothing acknowledged before it. Returns why the roll waits, or `None`
/// once the backup is taken (recorded in `st.pre_upgrade_backup`).
async fn pre_upgrade_backup(
    rg: &RegionGroup,
    ctx: &Context,
    tls: Option<&tern_common::tls::Tls>,
    members: &[(i32, String)],
    image: &str,
    st: &mut RegionGroupStatus,
) -> Option<String> {
    let this_roll = st.pre_upgrade_backup.as_ref().filter(|b| b.image == image);
    if this_roll.is_some_and(|b| b.backup.is_some()) {
        return None;
    }
    let asked = this_roll.map(|b| b.requested_revision);
    let urls: Vec<&str> = members.iter().map(|(_, u)| u.as_str()).collect();
    let mut client = match tern_common::etcd::client(&urls, tls, Some(GROUP_CALL_TIMEOUT)).await {
        Ok(c) => c,
        Err(e) => return Some(format!("cannot reach the group for the pre-upgrade backup: {e}")),
    };
    let group = rg.name_any();
    // A request of this roll still waiting in the group (the status that
    // named it was not written, or was read a moment old) is answered by
    // the same backup: it is not asked again. One already answered may be
    // of an earlier roll onto the same image, whose backup is too old.
    let asked = match asked {
        Some(r) => Some(r),
        None => match backup_request::read(&mut client).await {
            Ok((Some((r, request)), last))
                if request.tag == image && backup_request::pending(Some(r), last.as_ref()) =>
            {
                st.pre_upgrade_backup = Some(PreUpgradeBackup {
                    image: image.to_string(),
                    requested_revision: r,
                    backup: None,
                });
                Some(r)
            }
            Ok(_) => None,
            Err(e) => return Some(format!("reading the group's backup request: {e}")),
        },
    };
    let Some(revision) = asked else {
        let request = backup_request::Request {
            by: "tern-operator".into(),
            reason: format!("before rolling {group} onto {image}"),
            tag: image.to_string(),
        };
        return Some(match backup_request::ask(&mut client, &request).await {
            Ok(revision) => {
                st.pre_upgrade_backup = Some(PreUpgradeBackup {
                    image: image.to_string(),
                    requested_revision: revision,
                    backup: None,
                });
                let note = format!(
                    "asked {} for a backup of {group} at revision {revision}, before the first member restarts on {image}",
                    backer(rg)
                );
                ctx.event(
                    rg,
                    EventType::Normal,
                    "PreUpgradeBackupAsked",
                    "RollingUpdate",
                    note.clone(),
                )
                .await;
                note
            }
            Err(e) => format!("asking for the pre-upgrade backup: {e}"),
        });
    };
    match backup_request::answer(&mut client, revision).await {
        Ok(Some(taken)) => {
            let note = format!(
                "backup {} of {group} taken (revisions {}..{}), holding every write acknowledged before revision {revision}; rolling onto {image}",
                taken.id, taken.revision_min, taken.revision_max
            );
            ctx.event(rg, EventType::Normal, "PreUpgradeBackupTaken", "RollingUpdate", note)
                .await;
            if let Some(b) = st.pre_upgrade_backup.as_mut() {
                b.backup = Some(taken.id);
            }
            None
        }
        // No backup volume, an agent that is down or a backup that keeps
        // failing: the roll waits, and says where to look.
        Ok(None) => Some(format!(
            "the pre-upgrade backup asked at revision {revision} is not taken yet (by {}: its log and tern_agent_backups_total say why)",
            backer(rg)
        )),
        Err(e) => Some(format!("reading whether the pre-upgrade backup is taken: {e}")),
    }
}

/// Who takes a group's backups: its region's agent, or for a directory
/// share the one agent that backs the directory up.
fn backer(rg: &RegionGroup) -> String {
    match rg.spec.role {
        GroupRole::Data => format!("{}'s agent", rg.spec.region),
        GroupRole::Directory => "the agent that backs the directory up (the GeoCluster's first region's)".into(),
    }
}

/// How often a membership change in progress is looked at again: a
/// learner catching up, a pod starting.
const MEMBERSHIP_POLL: Duration = Duration::from_secs(2);

/// A call to a group: the pre-upgrade backup's request, the directory's
/// roll lock.
const GROUP_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The members the group's objects are built with, after this reconcile's
/// membership step.
struct Change {
    members: Members,
    in_progress: bool,
}

/// Takes the next step of a Raft membership change, if the group's size
/// differs from its spec or a change is unfinished (see
/// `crate::membership`), and records it in `st`. etcd is contacted only
/// for a change, and once to record a running group's membership
/// (`replace::record_membership`).
async fn membership_change(
    rg: &RegionGroup,
    ctx: &Context,
    tls: Option<&tern_common::tls::Tls>,
    running: Option<i32>,
    ready: i32,
    st: &mut RegionGroupStatus,
) -> Change {
    let desired = rg.spec.replicas;
    let known = |st: &RegionGroupStatus, pods: i32| Members {
        pods,
        initial_cluster: if st.raft_members.is_empty() {
            // Until the membership has changed: the bootstrap list (for a
            // directory share, every region's members).
            rg.spec.initial_cluster.clone()
        } else {
            st.raft_members.clone()
        },
        state: if st.raft_members.is_empty() {
            ClusterState::New
        } else {
            ClusterState::Existing
        },
    };
    let Some(pods) = running else {
        // Without a StatefulSet, its claims may go too (deletionPolicy
        // Delete, a restore, by hand): the members' volumes are recorded
        // again once they run, rather than new claims taken for lost
        // volumes. A replacement under way keeps its own.
        if st.member_replacement.is_none() {
            st.member_volumes.clear();
        }
        if st.raft_members.is_empty() {
            // A new group bootstraps with its full size.
            st.membership_change = None;
            return Change {
                members: Members::bootstrap(rg),
                in_progress: false,
            };
        }
        // A StatefulSet deleted after the group's membership changed: it
        // comes back as the members etcd last had, all joining what runs
        // (members with data ignore it). Bootstrapping `spec.replicas`
        // as `new` could start a second cluster beside the first. A
        // directory share's recorded membership is the whole directory's,
        // of which the share runs its own (fixed) members.
        let pods = match rg.spec.role {
            GroupRole::Data => st.raft_members.len() as i32,
            GroupRole::Directory => rg.spec.replicas,
        };
        return Change {
            members: known(st, pods),
            in_progress: rg.spec.role == GroupRole::Data,
        };
    };
    // A member whose volume was lost is replaced before anything else.
    if replace::step(rg, ctx, tls, pods, ready, st).await {
        return Change {
            members: known(st, pods),
            in_progress: true,
        };
    }
    // A change counts as begun once etcd has answered; one that never got
    // that far (etcd unreachable, then the spec reverted) is simply gone.
    let unfinished = st.membership_change.is_some() && !st.raft_members.is_empty();
    if rg.spec.role != GroupRole::Data || (pods == desired && !unfinished) {
        st.membership_change = None;
        return Change {
            members: known(st, pods),
            in_progress: false,
        };
    }

    let group = rg.name_any();
    let namespace = rg.namespace().unwrap_or_default();
    let host = |o: i32| {
        names::member_host(
            &group,
            &names::member_name(&group, o),
            &namespace,
            &rg.spec.cluster_domain,
        )
    };
    let scheme = names::scheme(rg.spec.tls.is_some());
    let peer_url = |o: i32| format!("{scheme}://{}:{}", host(o), names::PEER_PORT);
    let endpoints: Vec<String> = (0..pods)
        .map(|o| format!("{scheme}://{}:{}", host(o), names::CLIENT_PORT))
        .collect();
    let waiting = |st: &mut RegionGroupStatus, why: String| {
        tracing::info!(group = %group, %why, "membership change waits");
        st.membership_change = Some(format!("{desired} members wanted, {pods} running: waiting: {why}"));
        Change {
            members: known(st, pods),
            in_progress: true,
        }
    };
    let observed = match membership::observe(&endpoints, tls).await {
        Ok(m) => m,
        Err(e) => return waiting(st, membership::reason(e)),
    };
    st.raft_members = membership::initial_cluster(&observed, |o| names::member_name(&group, o), peer_url);
    let step = match membership::plan(&observed, pods, desired, peer_url) {
        Ok(step) => step,
        Err(e) => return waiting(st, membership::reason(e)),
    };
    let what = step.describe(&group);
    let pods = match &step {
        Step::Steady => {
            // The volumes of members removed by this change (kept on the
            // scale-down, see the StatefulSet's retention policy).
            for o in pods..pods + MAX_REMOVED {
                if let Some(why) = clear_volume(ctx, &namespace, &group, o).await {
                    return waiting(st, why);
                }
            }
            if st.membership_change.take().is_some() {
                let note = format!("{group} has {desired} members");
                ctx.event(rg, EventType::Normal, "MembershipChanged", "Resize", note)
                    .await;
            }
            return Change {
                members: known(st, pods),
                in_progress: false,
            };
        }
        Step::StartPod { replicas } | Step::StopPod { replicas } => *replicas,
        _ => {
            if let Step::AddLearner { ordinal, .. } = &step
                && let Some(why) = clear_volume(ctx, &namespace, &group, *ordinal).await
            {
                return waiting(st, why);
            }
            // Recorded before etcd is changed: an operator that dies right
            // after the step still knows a change is unfinished, even if
            // the spec goes back to the size that runs.
            let mut before = st.clone();
            before.membership_change = Some(format!("{desired} members wanted: {what}"));
            if let Err(e) = write_status(rg, ctx, before).await {
                return waiting(st, format!("cannot record the step before taking it: {e}"));
            }
            match membership::execute(&step, &observed, tls).await {
                Ok(Progress::Done) => {
                    ctx.event(rg, EventType::Normal, "MembershipStep", "Resize", what.clone())
                        .await;
                    pods
                }
                Ok(Progress::Waiting(why)) => return waiting(st, why),
                Err(e) => return waiting(st, membership::reason(e)),
            }
        }
    };
    tracing::info!(group = %group, step = %what, "membership change");
    st.membership_change = Some(format!("{desired} members wanted: {what}"));
    Change {
        members: known(st, pods),
        in_progress: true,
    }
}

/// How many ordinals above the group's size are looked at for a removed
/// member's volume when a change ends (a group shrinks by at most six).
const MAX_REMOVED: i32 = 8;

/// Deletes the volume of ordinal `ordinal`, which is not a member, and
/// says what it waits for, if anything: a member added at that ordinal must
/// start empty (a removed member's data cannot rejoin), and a shrink leaves
/// the removed member's volume behind. A volume still used by a pod that is
/// stopping is deleted once the pod has gone (Kubernetes' PVC protection).
async fn clear_volume(ctx: &Context, namespace: &str, group: &str, ordinal: i32) -> Option<String> {
    let name = build::regiongroup::member_claim_name(&names::member_name(group, ordinal));
    let api = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), namespace);
    let found = match api
        .list(&ListParams::default().fields(&format!("metadata.name={name}")))
        .await
    {
        Ok(list) => list.items.into_iter().next(),
        Err(e) => return Some(format!("cannot look for volume {name}: {e}")),
    };
    let pvc = found?;
    if pvc.metadata.deletion_timestamp.is_none() {
        if let Err(e) = api.delete(&name, &DeleteParams::default()).await {
            return Some(format!("cannot delete volume {name} of a removed member: {e}"));
        }
        tracing::info!(%group, volume = %name, ordinal, "deleted the volume of an ordinal that is not a member");
    }
    Some(format!(
        "volume {name} of a removed member is being deleted (a member at ordinal {ordinal} must start empty)"
    ))
}

pub fn error_policy(rg: Arc<RegionGroup>, error: &Error, ctx: Arc<Context>) -> Action {
    super::error_policy(CONTROLLER, rg.as_ref(), error, &ctx)
}

async fn write_status(rg: &RegionGroup, ctx: &Context, status: RegionGroupStatus) -> Result<()> {
    if rg.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let namespace = rg.namespace().unwrap_or_default();
    let api: Api<RegionGroup> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({"apiVersion": "tern.dev/v1alpha1", "kind": "RegionGroup", "status": status});
    api.patch_status(
        &rg.name_any(),
        &PatchParams::apply(names::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .context(|| format!("writing status of RegionGroup {namespace}/{}", rg.name_any()))?;
    Ok(())
}
