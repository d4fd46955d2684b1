//! RegionGroup reconcile: build the member objects → apply → status from the
//! StatefulSet.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;
use tern_crds::{RegionGroup, RegionGroupStatus};

use crate::apply::{Outcome, apply};
use crate::context::{Context, key};
use crate::error::KubeContext;
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
    let objects = build::regiongroup::group_objects(&rg);

    // Configuration and network identity before the members that use them.
    apply(&ctx.client, &objects.config_map).await?;
    apply(&ctx.client, &objects.peer_service).await?;
    apply(&ctx.client, &objects.client_service).await?;
    apply(&ctx.client, &objects.pdb).await?;
    match apply(&ctx.client, &objects.stateful_set).await? {
        Outcome::Created => {
            let note = format!("created StatefulSet {name} with {} members", rg.spec.replicas);
            ctx.event(rg.as_ref(), EventType::Normal, "MembersCreated", "Apply", note)
                .await;
        }
        Outcome::Updated => {
            let note = format!(
                "updated StatefulSet {name}: {} members, rolling one member at a time",
                rg.spec.replicas
            );
            ctx.event(rg.as_ref(), EventType::Normal, "MembersUpdated", "Apply", note)
                .await;
        }
        Outcome::Unchanged => {}
    }

    let sts = Api::<StatefulSet>::namespaced(ctx.client.clone(), &namespace)
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
    let mut st = rg.status.clone().unwrap_or_default();
    status::phase_conditions(&mut st.conditions, phase, detail, rg.metadata.generation, &now);
    st.observed_generation = rg.metadata.generation;
    st.phase = phase;
    st.ready_members = counts.ready;
    st.updated_members = counts.updated;
    write_status(&rg, &ctx, st).await?;
    ctx.succeeded(&key(rg.as_ref()));
    Ok(Action::requeue(ctx.resync))
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
