//! tern-agent: the region agent. It reads as a list of named loops, each in
//! its own module:
//!
//! - `election`: one active agent per region, through the region's own group;
//! - `heartbeat`: a timestamped sequence number into the group every 100 ms;
//! - `mirror`: every other region's keys and heartbeats, whole source
//!   revisions packed into local transactions (`plan`), resumed from the
//!   applied record, a large backlog caught up by several watches at once
//!   (`relay`), resynced after compaction;
//! - `lag`: replication lag in ms from heartbeats that echo each other (a
//!   timestamped round trip measures the clock offset);
//! - `members`: Raft lag of the region's own members;
//! - `publish`: metrics and the region's record in the directory, guarded
//!   by the region's lease key there;
//! - `migrate`: moves of accounts into this region, step by step from their
//!   intent records in the directory (DESIGN.md "Migration protocol");
//! - `cleanup`: the data of accounts that moved away, deleted a while after
//!   (their `moved` fence stays);
//! - `lease`: tells the region's routers until when the region's lease is
//!   valid (they refuse writes after it);
//! - `failover`: promotes this region's mirror of a failed region it
//!   succeeds, and in Automatic mode fails a lost region over;
//! - `quarantine`: when this region comes back from a failover, the writes
//!   its successor never had, listed for people and never applied;
//! - `sun`: the follow-the-sun policy, asking for moves of accounts homed
//!   here from the routers' published write counts;
//! - `backup`: scheduled backups of the region's group (and, when asked,
//!   the directory's) into a directory, the newest N kept, and backups
//!   asked for through the group (the operator's before an etcd upgrade);
//! - `kubernetes`: the region's lag in the GeoCluster status, when asked.
//!
//! Heartbeats and mirrored revisions are traced (`agent.heartbeat`,
//! `agent.mirror`, `agent.mirror.resync`) when an OTLP endpoint is set.
#![forbid(unsafe_code)]

pub mod backup;
pub mod cleanup;
pub mod config;
pub mod drain;
pub mod election;
pub mod error;
pub mod events;
pub mod failover;
pub mod heartbeat;
pub mod kubernetes;
pub mod lag;
pub mod lease;
pub mod members;
pub mod metrics;
pub mod migrate;
pub mod mirror;
pub mod plan;
pub mod publish;
pub mod quarantine;
pub mod relay;
pub mod state;
pub mod sun;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use config::Config;
pub use error::{AgentError, Result};

use state::Shared;

/// Where a started agent serves, and its test hook.
#[derive(Clone, Debug)]
pub struct Running {
    pub http_addr: SocketAddr,
    /// Set to freeze the agent as if its process were stopped.
    pub pause: Arc<AtomicBool>,
}

/// Runs an agent until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_start: impl FnOnce(Running) + Send,
) -> Result<()> {
    config.validate().map_err(AgentError::InvalidConfig)?;
    let tls = match &config.tls_dir {
        Some(dir) => Some(
            tern_common::tls::Tls::load(dir, tern_common::tls::ClientAuth::Required).map_err(|e| {
                AgentError::InvalidConfig(format!(
                    "--tls-dir (TERN_TLS_DIR): {}",
                    e.to_string().trim_start_matches("TLS: ")
                ))
            })?,
        ),
        None => None,
    };
    let connect = |endpoints: Vec<String>, what: String| {
        let tls = tls.clone();
        async move {
            tern_common::etcd::connect_tls(&endpoints, tls.as_ref(), &what, Duration::from_secs(60))
                .await
                .map_err(AgentError::Startup)
        }
    };
    let group = connect(config.group_endpoints.clone(), "region group".into()).await?;
    let directory = connect(config.directory_endpoints.clone(), "directory".into()).await?;
    let metrics = Arc::new(metrics::Metrics::default());
    let paused = Arc::new(AtomicBool::new(false));
    let kube_client = match &config.geocluster {
        Some(_) => Some(kubernetes::client(config.kubeconfig.as_deref()).await?),
        None => None,
    };
    let events = kube_client
        .clone()
        .zip(config.geocluster.as_deref())
        .map(|(c, name)| events::Events::new(c, &config.namespace, name, &config.identity()));
    let identity = config.identity();
    let telemetry = tern_common::telemetry::Telemetry::from_args(
        &config.trace,
        tern_common::telemetry::Identity {
            component: "agent",
            region: Some(config.region.as_str()),
            instance: &identity,
        },
        tls.as_ref(),
    )?;
    let shared = Arc::new(Shared {
        region: config.region.clone(),
        identity: config.identity(),
        boot: state::boot_id(),
        clock_offset_ms: config.clock_offset_ms,
        metrics: metrics.clone(),
        mirrors: Default::default(),
        members: Default::default(),
        paused: paused.clone(),
        events,
        telemetry,
        claim: Default::default(),
        lease_renewed: Default::default(),
        #[cfg(feature = "failpoints")]
        failpoint: std::sync::Mutex::new(config.failpoint.clone()),
    });

    let stop = tern_common::process::Stop::on(shutdown);
    let stopped = || stop.stopped();
    let render: tern_common::ops::MetricsFn = {
        let metrics = metrics.clone();
        Arc::new(move || metrics.encode())
    };
    let ready: tern_common::ops::ReadyFn = Arc::new(|| Ok(()));
    let lease_routes = lease::routes(
        shared.clone(),
        Duration::from_secs(config.election_ttl as u64),
        config.lease_margin,
    );
    let (http_addr, http_task) = tern_common::ops::serve_with(config.http_addr, render, ready, lease_routes, stopped())
        .await
        .map_err(|source| AgentError::Listen {
            addr: config.http_addr,
            source,
        })?;
    on_start(Running {
        http_addr,
        pause: paused.clone(),
    });
    let advertised = config.advertised_http(http_addr);
    tracing::info!(region = %config.region, identity = %shared.identity, %http_addr, %advertised, "tern-agent starting");

    let members_task = tokio::spawn(members::run(
        config.group_endpoints.clone(),
        tls.clone(),
        shared.clone(),
        config.publish_interval,
    ));
    let mut sources = Vec::new();
    for (region, endpoints) in &config.sources {
        sources.push((
            region.clone(),
            connect(endpoints.clone(), format!("source {region}")).await?,
        ));
    }
    loop {
        let leadership = tokio::select! {
            l = election::campaign(&group, &shared, config.election_ttl) => match l {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "campaign failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
            _ = stopped() => break,
        };
        metrics.is_leader.set(1);
        // A previous leadership's claim is no guard for this one.
        *shared.claim.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let mut loops = tokio::task::JoinSet::new();
        loops.spawn(election::keep_alive(
            group.clone(),
            leadership.lease,
            config.election_ttl,
            shared.clone(),
        ));
        loops.spawn(lease::announce(
            group.clone(),
            leadership.clone(),
            shared.clone(),
            advertised.clone(),
        ));
        loops.spawn(heartbeat::run(
            group.clone(),
            leadership.clone(),
            shared.clone(),
            config.heartbeat_interval,
        ));
        for (region, client) in &sources {
            loops.spawn(mirror::run(
                group.clone(),
                client.clone(),
                region.clone(),
                leadership.clone(),
                shared.clone(),
            ));
        }
        loops.spawn(publish::run(
            directory.clone(),
            shared.clone(),
            leadership.clone(),
            config.election_ttl,
            config.publish_interval,
            config.max_clock_offset,
        ));
        loops.spawn(migrate::run(
            directory.clone(),
            group.clone(),
            sources.iter().cloned().collect(),
            leadership.clone(),
            shared.clone(),
            migrate::Settings::from(&config),
        ));
        loops.spawn(cleanup::run(
            directory.clone(),
            group.clone(),
            leadership.clone(),
            shared.clone(),
            config.moved_cleanup_delay,
        ));
        loops.spawn(failover::run(
            directory.clone(),
            group.clone(),
            leadership.clone(),
            shared.clone(),
            failover::Policy::from(&config),
        ));
        loops.spawn(quarantine::run(
            directory.clone(),
            group.clone(),
            sources.iter().cloned().collect(),
            shared.clone(),
        ));
        loops.spawn(drain::run(
            directory.clone(),
            group.clone(),
            shared.clone(),
            drain::Settings::from(&config),
        ));
        loops.spawn(sun::run(
            directory.clone(),
            group.clone(),
            leadership.clone(),
            shared.clone(),
            sun::Policy::from(&config),
        ));
        if let Some(dir) = &config.backup_dir {
            let mut groups = vec![(config.region.to_string(), config.group_endpoints.clone())];
            let mut clients = vec![group.clone()];
            if config.backup_directory_group {
                groups.push(("directory".to_string(), config.directory_endpoints.clone()));
                clients.push(directory.clone());
            }
            loops.spawn(backup::run(
                backup::Settings {
                    dir: dir.clone(),
                    every: config.backup_every,
                    keep: config.backup_keep as usize,
                    groups,
                    tls: tls.clone(),
                },
                clients,
                leadership.clone(),
                shared.clone(),
            ));
        }
        let status_writer = kube_client
            .clone()
            .zip(config.geocluster.clone())
            .map(|(client, name)| {
                tokio::spawn(kubernetes::run(
                    client,
                    config.namespace.clone(),
                    name,
                    shared.clone(),
                    config.publish_interval,
                ))
            });
        let stopping = tokio::select! {
            ended = loops.join_next() => {
                let why = match ended {
                    Some(Ok(e)) => e.to_string(),
                    Some(Err(e)) => format!("a loop panicked: {e}"),
                    None => "no loops".into(),
                };
                tracing::warn!(region = %config.region, reason = %why, "leadership ended; campaigning again");
                false
            }
            _ = stopped() => true,
        };
        loops.abort_all();
        if let Some(w) = status_writer {
            w.abort();
        }
        metrics.is_leader.set(0);
        // Only the leader speaks for the backups.
        metrics.last_backup_seconds.clear();
        // Step down at once, so a standby (or this agent's next campaign)
        // need not wait for the lease: the region's routers refuse writes
        // until a leader speaks for the region again. Nothing of this
        // leadership runs any more, and a write of it still in flight is
        // refused once its election key is gone.
        let _ = group.clone().lease_revoke(leadership.lease).await;
        if stopping {
            break;
        }
        while paused.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    members_task.abort();
    http_task.abort();
    shared.telemetry.shutdown().await;
    tracing::info!(region = %config.region, "tern-agent stopped");
    Ok(())
}
