//! RegionGroup reconcile: the next step of a membership change, if one is
//! due → build the member objects → apply → status from the StatefulSet.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;
use tern_crds::{GroupRole, RegionGroup, RegionGroupStatus};

use crate::apply::{Outcome, apply};
use crate::build::regiongroup::Members;
use crate::context::{Context, key};
use crate::error::KubeContext;
use crate::etcd_flags::ClusterState;
use crate::membership::{self, Progress, Step};
use crate::status::MemberCounts;
use crate::{Error, Result, build, names, status};

pub const CONTROLLER: &str = "regiongroup";

pub async fn reconcile(rg: Arc<RegionGroup>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.managed.contains(&rg.spec.region) || rg.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let name = rg.name_any();
    let namespace = rg.namespace().unwrap_or_default();
    let sts_api = Api::<StatefulSet>::namespaced(ctx.client.clone(), &namespace);
    let running = sts_api
        .get_opt(&name)
        .await
        .context(|| format!("reading StatefulSet {namespace}/{name}"))?
        .and_then(|s| s.spec.replicas);
    let mut st = rg.status.clone().unwrap_or_default();
    let change = membership_change(&rg, &ctx, running, &mut st).await;
    let objects = build::regiongroup::group_objects_with(&rg, &change.members);

    // Configuration and network identity before the members that use them.
    apply(&ctx.client, &objects.config_map).await?;
    apply(&ctx.client, &objects.peer_service).await?;
    apply(&ctx.client, &objects.client_service).await?;
    apply(&ctx.client, &objects.pdb).await?;
    match apply(&ctx.client, &objects.stateful_set).await? {
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
    let counts = MemberCounts::of(sts.as_ref());
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
    Ok(Action::requeue(if change.in_progress {
        MEMBERSHIP_POLL
    } else {
        ctx.resync
    }))
}

/// How often a membership change in progress is looked at again: a
/// learner catching up, a pod starting.
const MEMBERSHIP_POLL: Duration = Duration::from_secs(2);

/// The members the group's objects are built with, after this reconcile's
/// membership step.
struct Change {
    members: Members,
    in_progress: bool,
}

/// Takes the next step of a Raft membership change, if the group's size
/// differs from its spec or a change is unfinished (see
/// `crate::membership`), and records it in `st`. A group that has never
/// changed is not asked anything: etcd is contacted only for a change.
async fn membership_change(
    rg: &RegionGroup,
    ctx: &Context,
    running: Option<i32>,
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
        // A new group bootstraps with its full size.
        st.membership_change = None;
        return Change {
            members: Members::bootstrap(rg),
            in_progress: false,
        };
    };
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
    let peer_url = |o: i32| format!("http://{}:{}", host(o), names::PEER_PORT);
    let endpoints: Vec<String> = (0..pods)
        .map(|o| format!("http://{}:{}", host(o), names::CLIENT_PORT))
        .collect();
    let waiting = |st: &mut RegionGroupStatus, why: String| {
        tracing::info!(group = %group, %why, "membership change waits");
        st.membership_change = Some(format!("{desired} members wanted, {pods} running: waiting: {why}"));
        Change {
            members: known(st, pods),
            in_progress: true,
        }
    };
    let observed = match membership::observe(&endpoints).await {
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
        _ => match membership::execute(&step, &observed).await {
            Ok(Progress::Done) => {
                ctx.event(rg, EventType::Normal, "MembershipStep", "Resize", what.clone())
                    .await;
                pods
            }
            Ok(Progress::Waiting(why)) => return waiting(st, why),
            Err(e) => return waiting(st, membership::reason(e)),
        },
    };
    tracing::info!(group = %group, step = %what, "membership change");
    st.membership_change = Some(format!("{desired} members wanted: {what}"));
    Change {
        members: known(st, pods),
        in_progress: true,
    }
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
