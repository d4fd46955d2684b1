//! tern-operator: turns a GeoCluster into per-region Raft groups.
//!
//! The reconcile of each resource is a short pipeline of small steps (see
//! `controller/`): read, validate (`validate`), build the desired objects as a
//! pure function of the spec (`build`), apply them with server-side apply
//! (`apply`), compute the status (`status`). `run` wires the controllers to a
//! client, behind leader election (`leader`), with metrics and health
//! endpoints (`tern_common::ops`).
#![forbid(unsafe_code)]

pub mod apply;
pub mod build;
pub mod certs;
pub mod config;
pub mod context;
pub mod controller;
pub mod error;
pub mod etcd_flags;
pub mod fences;
pub mod hash;
pub mod leader;
pub mod membership;
pub mod metrics;
pub mod names;
pub mod regions;
pub mod status;
pub mod upgrade;
pub mod validate;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::utils::Predicate;
use kube::runtime::{Controller, WatchStreamExt, predicates, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use tern_crds::{GeoCluster, RegionGroup};

pub use config::Config;
pub use error::{Error, Result};

use context::Context;
use leader::{LeaderElector, LeaseTiming};

/// A running operator's handle for tests: where its endpoints are.
#[derive(Clone, Debug)]
pub struct Running {
    pub http_addr: SocketAddr,
}

/// Runs the operator until `shutdown` completes (Ok) or leadership is lost
/// (Err). `on_start` receives the bound HTTP address once serving.
pub async fn run(
    config: Config,
    client: Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_start: impl FnOnce(Running) + Send,
) -> Result<()> {
    config.validate()?;
    let identity = config.identity();
    let metrics = Arc::new(metrics::Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let stop = tern_common::process::Stop::on(shutdown);
    let stopped = || stop.stopped();

    let render = {
        let metrics = metrics.clone();
        Arc::new(move || metrics.encode())
    };
    let is_ready = {
        let ready = ready.clone();
        Arc::new(move || {
            if ready.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("not connected to the API server yet".to_string())
            }
        })
    };
    let (http_addr, http_task) = tern_common::ops::serve(config.http_addr, render, is_ready, stopped())
        .await
        .map_err(|source| Error::Http {
            addr: config.http_addr.to_string(),
            source,
        })?;
    on_start(Running { http_addr });
    tracing::info!(%http_addr, identity = %identity, regions = ?config.regions, "tern-operator starting");

    // Ready once the API server answers; a standby replica is ready too.
    match client.apiserver_version().await {
        Ok(v) => {
            tracing::info!(server = %v.git_version, "connected to the API server");
            ready.store(true, Ordering::Relaxed);
        }
        Err(e) => tracing::warn!(error = %e, "API server not reachable yet"),
    }

    let mut elector = config.leader_elect.then(|| {
        LeaderElector::new(
            client.clone(),
            &config.leader_election_namespace,
            &config.leader_election_id,
            &identity,
            LeaseTiming {
                duration: config.lease_duration,
                retry: config.lease_retry,
            },
        )
    });
    if let Some(elector) = elector.as_mut() {
        tokio::select! {
            r = elector.acquire() => r?,
            _ = stopped() => {
                let _ = http_task.await;
                return Ok(());
            }
        }
        ready.store(true, Ordering::Relaxed);
    }
    metrics.is_leader.set(1);

    let mut ctx = Context::new(
        client.clone(),
        &identity,
        metrics.clone(),
        config.region_filter(),
        config.resync,
        config.router_image.clone(),
        config.agent_image.clone(),
    );
    ctx.telemetry = tern_common::telemetry::Telemetry::from_args(
        &config.trace,
        tern_common::telemetry::Identity {
            component: "operator",
            region: None,
            instance: &identity,
        },
        // The operator has no certificate of its own (it reads each
        // GeoCluster's from its Secret): it exports over http:// only.
        None,
    )?;
    ctx.directory_endpoints = config.directory_endpoints.clone();
    ctx.automatic_history = config.automatic_migration_history as usize;
    ctx.operator_namespace = config.leader_election_namespace.clone();
    let ctx = Arc::new(ctx);
    let audit = controller::audit::run(client.clone(), config.namespace.clone(), ctx.clone());
    let regions = controller::regions::run(client.clone(), config.namespace.clone(), ctx.clone());
    let controllers = {
        let (ctx, namespace) = (ctx.clone(), config.namespace.clone());
        async move {
            futures::join!(controllers(client, &namespace, ctx), audit, regions);
        }
    };
    let outcome = match elector.as_mut() {
        Some(elector) => {
            tokio::select! {
                _ = controllers => Ok(()),
                lost = elector.hold() => Err(lost),
                _ = stopped() => Ok(()),
            }
        }
        None => {
            tokio::select! {
                _ = controllers => Ok(()),
                _ = stopped() => Ok(()),
            }
        }
    };
    metrics.is_leader.set(0);
    if let Some(elector) = elector.as_mut()
        && outcome.is_ok()
    {
        elector.release().await;
    }
    http_task.abort();
    ctx.telemetry.shutdown().await;
    tracing::info!("tern-operator stopped");
    outcome
}

fn scoped<K>(client: Client, namespace: &str) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    if namespace.is_empty() {
        Api::all(client)
    } else {
        Api::namespaced(client, namespace)
    }
}

async fn controllers(client: Client, namespace: &str, ctx: Arc<Context>) {
    // Only objects this operator made are watched, so the caches stay small in
    // a busy cluster.
    let ours = watcher::Config::default().labels(&format!("{}={}", names::LABEL_MANAGED_BY, names::MANAGER));
    // A GeoCluster is reconciled when its spec (generation) or finalizers
    // change, not on status-only updates: its region agents patch status
    // about every second, and each patch would otherwise cost a reconcile
    // that reads every child. Finalizers pass too, because the finalizer
    // helper waits for the update that adds ours, and annotations (one
    // steers the operator: names::ANNOTATION_SKIP_PRE_UPGRADE_BACKUP).
    // Changes of owned objects
    // still trigger, and `resync` repairs drift in between.
    let (reader, writer) = reflector::store();
    let spec_changes = watcher(
        scoped::<GeoCluster>(client.clone(), namespace),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .applied_objects()
    .predicate_filter(
        predicates::generation
            .combine(predicates::finalizers)
            .combine(predicates::annotations),
        Default::default(),
    );
    let geoclusters = Controller::for_stream(spec_changes, reader)
        .owns(scoped::<RegionGroup>(client.clone(), namespace), ours.clone())
        .owns(scoped::<Deployment>(client.clone(), namespace), ours.clone())
        .run(
            |gc, ctx| {
                controller::traced(
                    "geocluster",
                    gc.clone(),
                    ctx.clone(),
                    controller::geocluster::reconcile(gc, ctx),
                )
            },
            controller::geocluster::error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    // Likewise a RegionGroup's own status writes do not reconcile it again.
    let (reader, writer) = reflector::store();
    let group_changes = watcher(scoped::<RegionGroup>(client.clone(), namespace), ours.clone())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    let migrations = Controller::new(
        scoped::<tern_crds::AccountMigration>(client.clone(), namespace),
        watcher::Config::default(),
    )
    .run(
        |m, ctx| {
            controller::traced(
                "accountmigration",
                m.clone(),
                ctx.clone(),
                controller::migration::reconcile(m, ctx),
            )
        },
        controller::migration::error_policy,
        ctx.clone(),
    )
    .for_each(|_| futures::future::ready(()));
    let groups = Controller::for_stream(group_changes, reader)
        .owns(scoped::<StatefulSet>(client.clone(), namespace), ours.clone())
        .owns(scoped::<Service>(client.clone(), namespace), ours.clone())
        .owns(scoped::<PodDisruptionBudget>(client.clone(), namespace), ours.clone())
        .owns(scoped::<ConfigMap>(client.clone(), namespace), ours.clone())
        // The members' claims belong to the StatefulSet, not the group: a
        // claim made again (a member's lost volume, replaced) is mapped to
        // its group by label.
        .watches(scoped::<PersistentVolumeClaim>(client, namespace), ours, |claim| {
            let group = claim.labels().get(names::LABEL_INSTANCE)?;
            Some(ObjectRef::<RegionGroup>::new(group).within(&claim.namespace()?))
        })
        .run(
            |rg, ctx| {
                controller::traced(
                    "regiongroup",
                    rg.clone(),
                    ctx.clone(),
                    controller::regiongroup::reconcile(rg, ctx),
                )
            },
            controller::regiongroup::error_policy,
            ctx,
        )
        .for_each(|_| futures::future::ready(()));
    futures::join!(geoclusters, groups, migrations);
}
