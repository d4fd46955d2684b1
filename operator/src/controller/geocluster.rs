//! GeoCluster reconcile as named steps: validate → build (`Desired`, a pure
//! function of the spec) → apply groups → apply components → prune →
//! status. Deletion goes through a finalizer that removes the workloads in
//! order and applies `deletionPolicy` to the volumes.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{self, Event as FinalizerEvent, finalizer};
use kube::{Api, ResourceExt};
use serde_json::json;
use tern_crds::{ClusterPhase, DeletionPolicy, GeoCluster, GeoClusterStatus, RegionGroup};

use crate::apply::{Outcome, apply, delete_matching};
use crate::build::geocluster::Desired;
use crate::context::{Context, key};
use crate::error::KubeContext;
use crate::{Error, Result, names, status, validate};

pub const CONTROLLER: &str = "geocluster";

pub async fn reconcile(gc: Arc<GeoCluster>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(CONTROLLER);
    let namespace = gc.namespace().unwrap_or_default();
    let api: Api<GeoCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let object_key = key(gc.as_ref());
    let result = finalizer(&api, names::FINALIZER, gc, |event| async {
        match event {
            FinalizerEvent::Apply(gc) => reconcile_apply(&gc, &ctx).await,
            FinalizerEvent::Cleanup(gc) => cleanup(&gc, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    });
    if result.is_ok() {
        ctx.succeeded(&object_key);
    }
    result
}

pub fn error_policy(gc: Arc<GeoCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    super::error_policy(CONTROLLER, gc.as_ref(), error, &ctx)
}

/// The pipeline of a GeoCluster that is not being deleted. Each step is a
/// function below, in this order: what it depends on is what the steps
/// before it produced.
async fn reconcile_apply(gc: &GeoCluster, ctx: &Context) -> Result<Action> {
    let now = Time(Timestamp::now());
    if let Err(reason) = validate::geocluster(gc, &ctx.managed) {
        return report_invalid(gc, ctx, reason, &now).await;
    }
    let desired = Desired::of(
        gc,
        &ctx.managed,
        &ctx.router_image,
        &ctx.agent_image,
        &ctx.operator_namespace,
    );
    apply_groups(gc, ctx, &desired).await?;
    ensure_peer_token(gc, ctx).await?;
    apply_components(gc, ctx, &desired).await?;
    prune_components(gc, ctx, &desired).await?;
    let current = prune_groups(gc, ctx, &desired).await?;
    update_status(gc, ctx, &desired, &current, &now).await?;
    Ok(Action::requeue(ctx.resync))
}

/// Validate: a spec the schema admits but this operator cannot act on is
/// reported in status and an event, and left alone until it changes.
async fn report_invalid(gc: &GeoCluster, ctx: &Context, reason: String, now: &Time) -> Result<Action> {
    let generation = gc.metadata.generation;
    let mut st = gc.status.clone().unwrap_or_default();
    st.observed_generation = generation;
    st.phase = Some(ClusterPhase::Degraded);
    for (type_, ok, message) in [
        (status::READY, false, reason.clone()),
        (status::PROGRESSING, false, String::new()),
        (status::DEGRADED, true, reason.clone()),
    ] {
        status::set_condition(
            &mut st.conditions,
            status::condition(type_, ok, "InvalidSpec", message, generation, now),
        );
    }
    if write_status(gc, ctx, st).await? {
        ctx.event(gc, EventType::Warning, "InvalidSpec", "Validate", reason.clone())
            .await;
    }
    Err(Error::InvalidSpec {
        kind: "GeoCluster",
        name: format!("{}/{}", gc.namespace().unwrap_or_default(), gc.name_any()),
        reason,
    })
}

/// Apply the RegionGroups (the RegionGroup controller runs their members).
async fn apply_groups(gc: &GeoCluster, ctx: &Context, desired: &Desired) -> Result<()> {
    for group in &desired.groups {
        let outcome = apply(&ctx.client, group).await?;
        let reason = match outcome {
            Outcome::Created => "GroupCreated",
            Outcome::Updated => "GroupUpdated",
            Outcome::Unchanged => continue,
        };
        let note = format!(
            "{:?} RegionGroup {} for region {} ({} members)",
            outcome,
            group.name_any(),
            group.spec.region,
            group.spec.replicas
        );
        tracing::info!(geocluster = %gc.name_any(), group = %group.name_any(), ?outcome, "applied RegionGroup");
        ctx.event(gc, EventType::Normal, reason, "Apply", note).await;
    }
    Ok(())
}

/// Ensure the Secret with the routers' peer token exists before routers
/// that read it start: created once with a random token, never changed.
async fn ensure_peer_token(gc: &GeoCluster, ctx: &Context) -> Result<()> {
    let namespace = gc.namespace().unwrap_or_default();
    let name = gc.peer_token_secret();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let existing = secrets
        .get_metadata_opt(&name)
        .await
        .context(|| format!("reading Secret {namespace}/{name}"))?;
    if existing.is_some() {
        return Ok(());
    }
    let secret = crate::build::components::peer_token_secret(gc, crate::build::components::new_peer_token());
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            let note = format!("created Secret {name} with the routers' peer token");
            ctx.event(gc, EventType::Normal, "PeerTokenCreated", "Apply", note)
                .await;
            Ok(())
        }
        // Created meanwhile (another replica, or by hand): keep that one.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(source) => Err(Error::Kube {
            action: format!("creating Secret {namespace}/{name}"),
            source,
        }),
    }
}

/// Apply the routers and agents of the managed regions, the agents'
/// identity first so their pods can start with it.
async fn apply_components(gc: &GeoCluster, ctx: &Context, desired: &Desired) -> Result<()> {
    if let Some((account, role, binding)) = &desired.agent_identity {
        apply(&ctx.client, account).await?;
        apply(&ctx.client, role).await?;
        apply(&ctx.client, binding).await?;
    }
    for region in &desired.components {
        apply(&ctx.client, &region.router_service).await?;
        for d in [&region.router, &region.agent] {
            let outcome = apply(&ctx.client, d).await?;
            if outcome != Outcome::Unchanged {
                let note = format!("{outcome:?} Deployment {} for region {}", d.name_any(), region.region);
                ctx.event(gc, EventType::Normal, "ComponentApplied", "Apply", note)
                    .await;
            }
        }
    }
    for policy in &desired.network_policies {
        apply(&ctx.client, policy).await?;
    }
    Ok(())
}

/// Prune the routers and agents of managed regions that left the spec.
async fn prune_components(gc: &GeoCluster, ctx: &Context, desired: &Desired) -> Result<()> {
    let name = gc.name_any();
    let namespace = gc.namespace().unwrap_or_default();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    for d in deployments
        .list(&ListParams::default().labels(&names::cluster_selector(&name)))
        .await
        .context(|| format!("listing the Deployments of {namespace}/{name}"))?
    {
        let region = d.labels().get(names::LABEL_REGION).cloned().unwrap_or_default();
        if ctx.managed.contains(&region) && !desired.has_region(&region) {
            let selector = format!(
                "{},{}={}",
                names::cluster_selector(&name),
                names::LABEL_INSTANCE,
                d.name_any()
            );
            delete_matching::<Deployment>(&ctx.client, &namespace, &selector).await?;
            delete_matching::<Service>(&ctx.client, &namespace, &selector).await?;
            let note = format!("deleted Deployment {} of region {region}", d.name_any());
            ctx.event(gc, EventType::Normal, "ComponentDeleted", "Prune", note)
                .await;
        }
    }
    // NetworkPolicies of a region that left, or of a spec.networkPolicy
    // removed.
    let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = format!(
        "{},{}={}",
        names::cluster_selector(&name),
        names::LABEL_COMPONENT,
        crate::build::network::COMPONENT
    );
    for p in policies
        .list(&ListParams::default().labels(&selector))
        .await
        .context(|| format!("listing the NetworkPolicies of {namespace}/{name}"))?
    {
        let region = p.labels().get(names::LABEL_REGION).cloned().unwrap_or_default();
        let wanted = desired
            .network_policies
            .iter()
            .any(|w| w.metadata.name == p.metadata.name);
        if ctx.managed.contains(&region) && !wanted {
            let policy = p.name_any();
            match policies.delete(&policy, &Default::default()).await {
                Ok(_) => {
                    let note = format!("deleted NetworkPolicy {policy} of region {region}");
                    ctx.event(gc, EventType::Normal, "ComponentDeleted", "Prune", note)
                        .await;
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e).context(|| format!("deleting NetworkPolicy {namespace}/{policy}")),
            }
        }
    }
    Ok(())
}

/// Prune the groups of managed regions that are no longer wanted (with their
/// members' objects, volumes as `deletionPolicy` says). Returns the groups
/// that stay, for the status.
async fn prune_groups(gc: &GeoCluster, ctx: &Context, desired: &Desired) -> Result<Vec<RegionGroup>> {
    let name = gc.name_any();
    let namespace = gc.namespace().unwrap_or_default();
    let groups_api: Api<RegionGroup> = Api::namespaced(ctx.client.clone(), &namespace);
    let existing = groups_api
        .list(&ListParams::default().labels(&names::cluster_selector(&name)))
        .await
        .context(|| format!("listing RegionGroups of {namespace}/{name}"))?;
    let mut current = Vec::new();
    for group in existing {
        let wanted = desired.groups.iter().any(|d| d.name_any() == group.name_any());
        if wanted {
            current.push(group);
        } else if ctx.managed.contains(&group.spec.region) {
            let selector = format!(
                "{},{}={}",
                names::cluster_selector(&name),
                names::LABEL_INSTANCE,
                group.name_any()
            );
            // The RegionGroup first: left behind, its own reconcile would
            // make the objects deleted below again.
            match groups_api.delete(&group.name_any(), &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    return Err(e).context(|| format!("deleting RegionGroup {namespace}/{}", group.name_any()));
                }
            }
            delete_group_objects(ctx, &namespace, &selector, gc.spec.deletion_policy).await?;
            let note = format!(
                "deleted RegionGroup {}: region {} or its directory members left the spec",
                group.name_any(),
                group.spec.region
            );
            ctx.event(gc, EventType::Normal, "GroupDeleted", "Prune", note).await;
        }
    }
    Ok(current)
}

/// Status from the groups: per-region phase and members, the conditions,
/// and an event when readiness flips. Writes nothing when nothing changed.
async fn update_status(
    gc: &GeoCluster,
    ctx: &Context,
    desired: &Desired,
    current: &[RegionGroup],
    now: &Time,
) -> Result<()> {
    let st = status::geocluster_status(gc, &desired.regions, current, now);
    let was_ready = gc.status.as_ref().and_then(|s| s.phase) == Some(ClusterPhase::Ready);
    let is_ready = st.phase == Some(ClusterPhase::Ready);
    let ready_regions = st.ready_regions.clone().unwrap_or_default();
    if write_status(gc, ctx, st).await? && was_ready != is_ready {
        let (type_, reason) = if is_ready {
            (EventType::Normal, "Ready")
        } else {
            (EventType::Warning, "NotReady")
        };
        ctx.event(
            gc,
            type_,
            reason,
            "UpdateStatus",
            format!("regions ready: {ready_regions}"),
        )
        .await;
    }
    Ok(())
}

/// Writes `status` unless it is what the object already has. Returns whether
/// it wrote.
async fn write_status(gc: &GeoCluster, ctx: &Context, status: GeoClusterStatus) -> Result<bool> {
    if gc.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let namespace = gc.namespace().unwrap_or_default();
    let api: Api<GeoCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    // The agents' fields were carried over only to compare; they stay theirs.
    let mut status = status;
    for r in status.regions.iter_mut() {
        r.keep_agent_fields(&tern_crds::RegionStatus::default());
    }
    let patch = json!({"apiVersion": "tern.dev/v1alpha1", "kind": "GeoCluster", "status": status});
    api.patch_status(
        &gc.name_any(),
        &PatchParams::apply(names::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .context(|| format!("writing status of GeoCluster {namespace}/{}", gc.name_any()))?;
    Ok(true)
}

/// Deletion, in order: the routers (no new traffic), the groups (so nothing
/// re-creates their objects), the members' StatefulSets, their Services,
/// budgets and configuration, and the volumes only under
/// `deletionPolicy: Delete`.
async fn cleanup(gc: &GeoCluster, ctx: &Context) -> Result<Action> {
    let name = gc.name_any();
    let namespace = gc.namespace().unwrap_or_default();
    let mut selector = names::cluster_selector(&name);
    if let Some(regions) = ctx.managed.named() {
        let list = regions.iter().cloned().collect::<Vec<_>>().join(",");
        selector.push_str(&format!(",{} in ({list})", names::LABEL_REGION));
    }
    delete_matching::<Deployment>(&ctx.client, &namespace, &selector).await?;
    let identity = format!("{},{}=agent", names::cluster_selector(&name), names::LABEL_COMPONENT);
    delete_matching::<RoleBinding>(&ctx.client, &namespace, &identity).await?;
    delete_matching::<Role>(&ctx.client, &namespace, &identity).await?;
    delete_matching::<ServiceAccount>(&ctx.client, &namespace, &identity).await?;
    let groups = delete_matching::<RegionGroup>(&ctx.client, &namespace, &selector).await?;
    let volumes = delete_group_objects(ctx, &namespace, &selector, gc.spec.deletion_policy).await?;
    delete_matching::<NetworkPolicy>(&ctx.client, &namespace, &selector).await?;
    let note = match gc.spec.deletion_policy {
        DeletionPolicy::Retain => format!(
            "deleted {} RegionGroups and their workloads; kept {volumes} PersistentVolumeClaims (deletionPolicy Retain)",
            groups.len()
        ),
        DeletionPolicy::Delete => format!(
            "deleted {} RegionGroups, their workloads and {volumes} PersistentVolumeClaims (deletionPolicy Delete)",
            groups.len()
        ),
    };
    tracing::info!(geocluster = %name, %note, "cleaned up");
    ctx.event(gc, EventType::Normal, "Deleted", "Cleanup", note).await;
    Ok(Action::await_change())
}

/// Deletes the objects that run the groups matching `selector`. Returns the
/// number of volumes deleted (Delete) or kept (Retain).
async fn delete_group_objects(ctx: &Context, namespace: &str, selector: &str, policy: DeletionPolicy) -> Result<usize> {
    let client = &ctx.client;
    delete_matching::<StatefulSet>(client, namespace, selector).await?;
    delete_matching::<PodDisruptionBudget>(client, namespace, selector).await?;
    delete_matching::<Service>(client, namespace, selector).await?;
    delete_matching::<ConfigMap>(client, namespace, selector).await?;
    match policy {
        DeletionPolicy::Delete => Ok(delete_matching::<PersistentVolumeClaim>(client, namespace, selector)
            .await?
            .len()),
        DeletionPolicy::Retain => {
            let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
            let kept = api
                .list(&ListParams::default().labels(selector))
                .await
                .context(|| format!("listing PersistentVolumeClaims in {namespace}"))?;
            Ok(kept.items.len())
        }
    }
}
