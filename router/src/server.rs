//! Wiring a router process: etcd clients for the region group and the
//! directory, the placement watch, the gRPC server, the ops endpoints, and a
//! graceful drain on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tern_common::tls::Tls;

use crate::Config;
use crate::counts::WriteCounts;
use crate::dns::Dns;
use crate::error::{Result, RouterError};
use crate::execute::Executor;
use crate::forward::Forwarder;
use crate::leader::Group;
use crate::metrics::Metrics;
use crate::pb::router_server::RouterServer;
use crate::placement::Directory;
use crate::service::RouterService;
use crate::store::HomeStore;

/// Where a started router listens.
#[derive(Clone, Copy, Debug)]
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
}

/// Connects to etcd, retrying until it answers (a router may start before
/// its group) or `deadline` passes.
pub async fn connect_etcd(endpoints: &[String], tls: Option<&Tls>, what: &str, deadline: Duration) -> Result<Client> {
    Ok(tern_common::etcd::connect_tls(endpoints, tls, what, deadline).await?)
}

/// Runs a router until `shutdown` completes; then stops accepting calls and
/// lets in-flight ones finish for up to the drain timeout.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_start: impl FnOnce(Running) + Send,
) -> Result<()> {
    let tls = match &config.tls_dir {
        Some(dir) => Some(Tls::load(dir, config.tls_client_auth).map_err(|e| {
            tern_common::CommonError::Tls(format!(
                "--tls-dir (TERN_TLS_DIR): {}",
                e.to_string().trim_start_matches("TLS: ")
            ))
        })?),
        None => None,
    };
    let group = connect_etcd(
        &config.group_endpoints,
        tls.as_ref(),
        "region group",
        Duration::from_secs(60),
    )
    .await?;
    let metrics = Arc::new(Metrics::default());
    let group = if config.group_leader_direct {
        Group::follow_leader(group, tls.clone(), metrics.group_leader.clone())
    } else {
        Group::spread(group)
    };
    let directory_client = connect_etcd(
        &config.directory_endpoints,
        tls.as_ref(),
        "directory",
        Duration::from_secs(60),
    )
    .await?;
    let directory = Directory::new(directory_client).counting_reads(metrics.directory_reads.clone());
    let watch_task = directory.spawn_watch();
    if let Some(endpoint) = &config.advertise {
        directory.register_region(&config.region, endpoint).await?;
    }
    let instance = config
        .instance
        .clone()
        .unwrap_or_else(|| format!("{}-{}-{}", config.region, std::process::id(), config.listen.port()));
    let telemetry = crate::telemetry::Telemetry::from_args(
        &config.trace,
        tern_common::telemetry::Identity {
            component: "router",
            region: Some(config.region.as_str()),
            instance: &instance,
        },
        tls.as_ref(),
    )?;
    let counts = Arc::new(WriteCounts::new(config.write_count_window, config.write_count_accounts));
    let counts_task = tokio::spawn(counts.clone().publish(
        group.clone(),
        config.region.clone(),
        instance.clone(),
        config.write_count_publish_interval,
    ));
    let gate = Arc::new(crate::lease::LeaseGate::new(
        config.region.clone(),
        config.region_lease,
        metrics.lease.clone(),
    ));
    let lease_task = tokio::spawn(gate.clone().run(group.clone()));
    let service = Executor {
        region: config.region.clone(),
        directory: directory.clone(),
        store: HomeStore::new(
            group,
            config.write_batch_max.into(),
            config.write_batches_in_flight.into(),
            config.idempotency_retention,
            metrics.write_batch_size.clone(),
            gate,
        ),
        forwarder: Forwarder::new(
            config.region.clone(),
            config.peer_token.clone(),
            Dns::new(config.dns_server)?,
            config.peer_map(),
            directory.clone(),
            tls.clone(),
        ),
        counts,
        metrics: metrics.clone(),
        default_deadline: config.default_deadline,
        telemetry,
        peer_token: config.peer_token.clone(),
        clock_offset_ms: config.clock_offset_ms,
    };
    let service = RouterService(Arc::new(service));

    let stop = tern_common::process::Stop::on(shutdown);
    let stopped = || stop.stopped();

    let render: tern_common::ops::MetricsFn = {
        let metrics = metrics.clone();
        Arc::new(move || metrics.encode())
    };
    let ready: tern_common::ops::ReadyFn = {
        let directory = directory.clone();
        Arc::new(move || {
            if directory.synced() {
                Ok(())
            } else {
                Err("the placement cache has not loaded from the directory yet".into())
            }
        })
    };
    let (http_addr, http_task) = tern_common::ops::serve(config.http_addr, render, ready, stopped())
        .await
        .map_err(|source| RouterError::Listen {
            what: "ops endpoints",
            addr: config.http_addr,
            source,
        })?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| RouterError::Listen {
            what: "gRPC",
            addr: config.listen,
            source,
        })?;
    let grpc_addr = listener.local_addr().map_err(|source| RouterError::Listen {
        what: "gRPC",
        addr: config.listen,
        source,
    })?;
    on_start(Running { grpc_addr, http_addr });
    tracing::info!(region = %config.region, %grpc_addr, %http_addr, tls = tls.is_some(), "tern-router serving");

    // TCP_NODELAY is set on every accepted connection (the builder's does
    // not apply to a listener of our own), or Nagle's algorithm holds small
    // responses back until the client's delayed ACK (~40 ms at p99).
    let incoming = tern_common::tls::incoming(listener, tls.clone());
    let drain = config.drain_timeout;
    let server = tonic::transport::Server::builder()
        .add_service(RouterServer::new(service.clone()))
        .serve_with_incoming_shutdown(incoming, stopped());
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r,
        _ = async {
            stopped().await;
            tokio::time::sleep(drain).await;
        } => {
            tracing::warn!(?drain, "in-flight calls did not finish within the drain timeout");
            Ok(())
        }
    };
    watch_task.abort();
    counts_task.abort();
    lease_task.abort();
    http_task.abort();
    // Export what is still buffered.
    service.0.telemetry.shutdown().await;
    tracing::info!(region = %config.region, "tern-router stopped");
    result.map_err(RouterError::Serve)
}
