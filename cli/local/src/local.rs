//! A multi-region deployment on this machine, out of real parts: an etcd
//! group per region, a directory group, one router per region, and
//! toxiproxy on every cross-region router link with the injected round trip.
//! The data-plane tests and `tern demo` both build on it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use tern_common::tls::{self, ClientAuth, Role, Tls};

use crate::etcd_cluster::{EtcdCluster, EtcdTls, Tuning};
use crate::pki::LocalPki;
use crate::process::ChildGuard;
use crate::toxiproxy::Toxiproxy;
use crate::{LocalError, Result, assets};

/// How a router or agent runs: as a task of this process (quick to start,
/// what the demo and most tests use), or as a process of its own, which is
/// what kill -9 and SIGSTOP need (`tern verify`'s faults).
enum Runner<T> {
    Task {
        stop: Option<oneshot::Sender<()>>,
        task: Option<JoinHandle<T>>,
    },
    Process(ChildGuard),
}

impl<T> Runner<T> {
    /// Graceful: the shutdown signal (SIGTERM for a process), then waits.
    async fn stop(&mut self) {
        match self {
            Self::Task { stop, task } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
                if let Some(task) = task.take() {
                    let _ = task.await;
                }
            }
            Self::Process(child) => {
                // SIGTERM starts the binary's graceful shutdown (a router
                // drains, an agent steps down); after 15 s, SIGKILL.
                child.signal(nix::sys::signal::Signal::SIGTERM);
                let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
                while child.check_running().is_ok() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                child.kill();
            }
        }
    }

    /// At once, with no step-down or drain (kill -9 for a process).
    fn kill(&mut self) {
        match self {
            Self::Task { task, .. } => {
                if let Some(task) = task.take() {
                    task.abort();
                }
            }
            Self::Process(child) => child.kill(),
        }
    }
}

impl<T> Drop for Runner<T> {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Binaries that make routers and agents run as processes of their own.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub router: PathBuf,
    pub agent: PathBuf,
}

impl Binaries {
    /// `tern-router` and `tern-agent` in `dir` (where cargo puts them beside
    /// `tern`), or an error naming the one missing and how to build it.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let found = |name: &'static str, flag: &'static str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(LocalError::MissingTernBinary {
                    name,
                    path: path.display().to_string(),
                    flag,
                })
            }
        };
        Ok(Self {
            router: found("tern-router", "router-binary")?,
            agent: found("tern-agent", "agent-binary")?,
        })
    }
}

/// Starts `binary` with `args` as a process of its own, logging (appended,
/// so a restart keeps the earlier run's lines) to `log`, and waits until
/// `http_addr`'s `path` answers 200.
async fn spawn_process(
    what: &str,
    binary: &Path,
    args: &[String],
    log: &Path,
    http_addr: SocketAddr,
    path: &str,
) -> Result<ChildGuard> {
    let mut cmd = std::process::Command::new(binary);
    cmd.args(args).env("RUST_LOG", "info");
    let mut child = ChildGuard::spawn(what, cmd, log)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        child.check_running()?;
        if crate::http::http_get(http_addr, path).await.is_some() {
            return Ok(child);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(LocalError::NotReady {
                what: what.to_string(),
                secs: 90,
                log: child.log_tail(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `args` with `--http-addr` on a port chosen here: a process's port 0
/// could not be learned.
fn with_http_port(args: &[String]) -> (Vec<String>, SocketAddr) {
    let addr = SocketAddr::from(([127, 0, 0, 1], assets::free_port()));
    let mut out: Vec<String> = args.iter().filter(|a| !a.starts_with("--http-addr")).cloned().collect();
    out.push(format!("--http-addr={addr}"));
    (out, addr)
}

/// A running router.
pub struct RouterGuard {
    pub region: String,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    runner: Runner<tern_router::Result<()>>,
}

impl RouterGuard {
    /// Starts a router in this process with `args` (flags as on the command line).
    pub async fn start(args: &[String]) -> Result<Self> {
        let config =
            tern_router::Config::try_parse_from(std::iter::once("tern-router".to_string()).chain(args.iter().cloned()))
                .map_err(|source| LocalError::Flags {
                    component: "router",
                    source,
                })?;
        let region = config.region.to_string();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (addr_tx, addr_rx) = oneshot::channel();
        let task = tokio::spawn(tern_router::server::run(
            config,
            async move {
                let _ = stop_rx.await;
            },
            move |running| {
                let _ = addr_tx.send(running);
            },
        ));
        let running = match tokio::time::timeout(Duration::from_secs(90), addr_rx).await {
            Ok(Ok(r)) => r,
            _ => {
                let why = match tokio::time::timeout(Duration::from_secs(1), task).await {
                    Ok(Ok(Err(e))) => e.to_string(),
                    _ => "no answer within 90 s".into(),
                };
                return Err(LocalError::NotStarted {
                    component: "router",
                    region,
                    reason: why,
                });
            }
        };
        Ok(Self {
            region,
            grpc_addr: running.grpc_addr,
            http_addr: running.http_addr,
            runner: Runner::Task {
                stop: Some(stop_tx),
                task: Some(task),
            },
        })
    }

    /// Starts `binary` as a router process with `args` (which must name
    /// `--listen` with a port) and waits until it is ready.
    pub async fn spawn(binary: &Path, args: &[String], log: &Path) -> Result<Self> {
        let config =
            tern_router::Config::try_parse_from(std::iter::once("tern-router".to_string()).chain(args.iter().cloned()))
                .map_err(|source| LocalError::Flags {
                    component: "router",
                    source,
                })?;
        let (args, http_addr) = with_http_port(args);
        let what = format!("router {}", config.region);
        let child = spawn_process(&what, binary, &args, log, http_addr, "/readyz").await?;
        Ok(Self {
            region: config.region.to_string(),
            grpc_addr: config.listen,
            http_addr,
            runner: Runner::Process(child),
        })
    }

    /// Stops gracefully, letting in-flight calls finish.
    pub async fn stop(mut self) {
        self.runner.stop().await;
    }

    /// Kills it at once: kill -9 of a process, abort of a task.
    pub fn kill(mut self) {
        self.runner.kill();
    }

    /// Freezes (true) or thaws (false) a router process with SIGSTOP /
    /// SIGCONT; false if it runs in this process, where that cannot be done.
    pub fn freeze(&self, frozen: bool) -> bool {
        freeze(&self.runner, frozen)
    }

    /// The value of the first metric line starting with `prefix`.
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        crate::http::metric(self.http_addr, prefix).await
    }

    /// Waits until the router accepts writes: its region's agent has
    /// confirmed the region's lease, renewed since it was claimed (the
    /// claim's own validity can be short when the directory is slow).
    pub async fn wait_for_lease(&self, region: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::time::Instant::now() < deadline {
            let valid = self.metric("tern_router_region_lease_valid ").await == Some(1.0);
            let remaining = self
                .metric("tern_router_region_lease_remaining_ms ")
                .await
                .unwrap_or(0.0);
            if valid && remaining >= 500.0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(LocalError::NotReady {
            what: format!("region {region}'s router (a valid region lease, confirmed by its agent)"),
            secs: 60,
            log: "(the router waits for its region's agent to lead and to hold the region's lease in the directory)"
                .into(),
        })
    }

    /// A gRPC client of this router.
    pub async fn client(&self) -> tern_api::RouterClient {
        connect(self.grpc_addr).await
    }
}

fn freeze<T>(runner: &Runner<T>, frozen: bool) -> bool {
    match runner {
        Runner::Process(child) => {
            child.signal(if frozen {
                nix::sys::signal::Signal::SIGSTOP
            } else {
                nix::sys::signal::Signal::SIGCONT
            });
            true
        }
        Runner::Task { .. } => false,
    }
}

/// A client of the router at `addr` (tern-api's; also named here, beside the
/// routers it reaches).
pub use tern_api::connect;

/// A running agent.
pub struct AgentGuard {
    pub region: String,
    pub http_addr: SocketAddr,
    /// Freezes an agent task as if its process were stopped (SIGSTOP); an
    /// agent process is frozen with [`AgentGuard::freeze`].
    pub pause: std::sync::Arc<std::sync::atomic::AtomicBool>,
    runner: Runner<tern_agent::Result<()>>,
}

impl AgentGuard {
    /// Starts an agent in this process with `args`.
    pub async fn start(args: &[String]) -> Result<Self> {
        let config =
            tern_agent::Config::try_parse_from(std::iter::once("tern-agent".to_string()).chain(args.iter().cloned()))
                .map_err(|source| LocalError::Flags {
                component: "agent",
                source,
            })?;
        let region = config.region.to_string();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(tern_agent::run(
            config,
            async move {
                let _ = stop_rx.await;
            },
            move |running| {
                let _ = tx.send(running);
            },
        ));
        let running = match tokio::time::timeout(Duration::from_secs(90), rx).await {
            Ok(Ok(r)) => r,
            _ => {
                return Err(LocalError::NotStarted {
                    component: "agent",
                    region,
                    reason: "no answer within 90 s".into(),
                });
            }
        };
        Ok(Self {
            region,
            http_addr: running.http_addr,
            pause: running.pause,
            runner: Runner::Task {
                stop: Some(stop_tx),
                task: Some(task),
            },
        })
    }

    /// Starts `binary` as an agent process with `args` and waits until it
    /// serves.
    pub async fn spawn(binary: &Path, args: &[String], log: &Path) -> Result<Self> {
        let config =
            tern_agent::Config::try_parse_from(std::iter::once("tern-agent".to_string()).chain(args.iter().cloned()))
                .map_err(|source| LocalError::Flags {
                component: "agent",
                source,
            })?;
        let (args, http_addr) = with_http_port(args);
        let what = format!("agent {}", config.region);
        // /healthz: only the elected agent of a region is ready.
        let child = spawn_process(&what, binary, &args, log, http_addr, "/healthz").await?;
        Ok(Self {
            region: config.region.to_string(),
            http_addr,
            pause: Default::default(),
            runner: Runner::Process(child),
        })
    }

    /// Steps down and stops.
    pub async fn stop(mut self) {
        self.runner.stop().await;
    }

    /// Kills it without stepping down, like kill -9.
    pub fn kill(mut self) {
        self.runner.kill();
    }

    /// Freezes (true) or thaws (false) the agent: SIGSTOP / SIGCONT of a
    /// process, the pause flag of a task.
    pub fn freeze(&self, frozen: bool) {
        if !freeze(&self.runner, frozen) {
            self.pause.store(frozen, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The value of the first metric line starting with `prefix`.
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        crate::http::metric(self.http_addr, prefix).await
    }
}

/// One region of a local deployment.
pub struct LocalRegion {
    pub name: String,
    pub group: EtcdCluster,
    pub router: Option<RouterGuard>,
    /// Router flags, kept to restart it.
    pub router_args: Vec<String>,
    pub agent: Option<AgentGuard>,
    /// Agent flags, kept to restart it or start a second one.
    pub agent_args: Vec<String>,
}

/// Layout of a local deployment.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Regions and the members of each region's group.
    pub regions: Vec<(String, usize)>,
    /// Directory members (spread over the regions in order).
    pub directory_members: usize,
    /// Round trip between two regions, in ms, keyed by the pair in either order.
    pub rtt_ms: BTreeMap<(String, String), u64>,
    /// Run a region agent per region, mirroring every other region through
    /// toxiproxy links with the same round trips.
    pub agents: bool,
    /// Routers and agents export traces here (OTLP/gRPC), each as its own
    /// instance.
    pub otlp_endpoint: Option<String>,
    /// TLS on every link, with certificates from a CA made for the
    /// deployment (see [`crate::pki`]): etcd requires client certificates,
    /// routers require them of their clients and trust forwarded calls by
    /// the peer router's certificate.
    pub tls: bool,
}

impl Layout {
    /// One region of one member, a one-member directory, no agents: the
    /// smallest deployment with a router.
    pub fn one_region(region: &str) -> Self {
        Self {
            regions: vec![(region.to_string(), 1)],
            directory_members: 1,
            rtt_ms: BTreeMap::new(),
            agents: false,
            otlp_endpoint: None,
            tls: false,
        }
    }

    pub fn rtt(&self, a: &str, b: &str) -> u64 {
        self.rtt_ms
            .get(&(a.to_string(), b.to_string()))
            .or_else(|| self.rtt_ms.get(&(b.to_string(), a.to_string())))
            .copied()
            .unwrap_or(0)
    }
}

/// A running local deployment. Dropping it stops every process it started.
pub struct LocalDeployment {
    pub layout: Layout,
    pub regions: Vec<LocalRegion>,
    pub directory: EtcdCluster,
    pub toxiproxy: Toxiproxy,
    /// Proxy name of the link from region a to region b's router.
    pub links: BTreeMap<(String, String), String>,
    /// Proxy names of the mirror link from region a's agent to region b's
    /// group members.
    pub mirror_links: BTreeMap<(String, String), Vec<String>>,
    /// Proxy names of region a's agent's links to the directory members.
    pub agent_directory_links: BTreeMap<String, Vec<String>>,
    /// Set when routers and agents run as processes of their own.
    pub binaries: Option<Binaries>,
    /// With `layout.tls`: the CA, and the certificate this harness (and
    /// a test's clients) use.
    pub pki: Option<LocalPki>,
    pub client_tls: Option<Tls>,
    pub dir: TempDir,
}

impl LocalDeployment {
    /// Starts everything, routers and agents in this process, and waits
    /// until every router serves.
    pub async fn start(layout: Layout) -> Result<Self> {
        Self::start_with(layout, None).await
    }

    /// Like [`LocalDeployment::start`]; with `binaries`, routers and agents
    /// run as processes of their own (to be killed and paused).
    pub async fn start_with(layout: Layout, binaries: Option<Binaries>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tern-local-")
            .tempdir()
            .map_err(|source| LocalError::Io {
                path: std::env::temp_dir().display().to_string(),
                source,
            })?;
        let toxiproxy = Toxiproxy::start(dir.path())?;
        let (pki, etcd_tls) = if layout.tls {
            let pki = LocalPki::new(&dir.path().join("pki"))?;
            let server_dir = pki.issue("etcd", &tls::identity(Role::Etcd, "local"))?;
            let client_dir = pki.issue_client("client", &tls::identity(Role::Client, "local"))?;
            let client = Tls::load(&client_dir, ClientAuth::Required).map_err(|e| LocalError::NotStarted {
                component: "certificates",
                region: "local".into(),
                reason: e.to_string(),
            })?;
            (Some(pki), Some(EtcdTls { server_dir, client }))
        } else {
            (None, None)
        };
        let scheme = if layout.tls { "https" } else { "http" };
        let directory = Self::start_directory(&layout, dir.path(), &toxiproxy, etcd_tls.clone()).await?;
        let mut regions = Vec::new();
        for (name, members) in &layout.regions {
            let group = match &etcd_tls {
                Some(t) => EtcdCluster::start_tls(dir.path(), name, *members, Tuning::default(), t.clone())?,
                None => EtcdCluster::start(dir.path(), name, *members, Tuning::default())?,
            };
            regions.push(LocalRegion {
                name: name.clone(),
                group,
                router: None,
                router_args: Vec::new(),
                agent: None,
                agent_args: Vec::new(),
            });
        }
        // Router ports are chosen first, so that proxies can point at them.
        let grpc_ports: Vec<u16> = regions.iter().map(|_| assets::free_port()).collect();
        let mut links = BTreeMap::new();
        let mut peers: Vec<Vec<String>> = vec![Vec::new(); regions.len()];
        for (i, from) in regions.iter().enumerate() {
            for (j, to) in regions.iter().enumerate() {
                if i == j {
                    continue;
                }
                let name = format!("{}-to-{}", from.name, to.name);
                let listen = toxiproxy.proxy(&name, &format!("127.0.0.1:{}", grpc_ports[j])).await?;
                let rtt = layout.rtt(&from.name, &to.name);
                if rtt > 0 {
                    toxiproxy.round_trip(&name, rtt).await?;
                }
                peers[i].push(format!("--peer={}={listen}", to.name));
                links.insert((from.name.clone(), to.name.clone()), name);
            }
        }
        let directory_endpoints = directory.endpoints().join(",");
        // Without TLS, the routers of one deployment share a peer token, as
        // the routers of one GeoCluster do: only calls that carry it count
        // as forwarded. With TLS they trust each other by certificate
        // alone, which is what the TLS tests exercise.
        let peer_token = (!layout.tls).then(|| format!("local-{:032x}", rand::random::<u128>()));
        for (i, region) in regions.iter_mut().enumerate() {
            let mut args = vec![
                format!("--region={}", region.name),
                format!("--listen=127.0.0.1:{}", grpc_ports[i]),
                "--http-addr=127.0.0.1:0".to_string(),
                format!("--group-endpoints={}", region.group.endpoints().join(",")),
                format!("--directory-endpoints={directory_endpoints}"),
                format!("--advertise=127.0.0.1:{}", grpc_ports[i]),
                "--log-format=text".to_string(),
            ];
            if let Some(token) = &peer_token {
                args.push(format!("--peer-token={token}"));
            }
            args.extend(tls_flag(pki.as_ref(), Role::Router, &region.name)?);
            args.extend(peers[i].iter().cloned());
            if !layout.agents {
                // No agent keeps a region lease: nothing to wait for.
                args.push("--region-lease=false".to_string());
            }
            if let Some(endpoint) = &layout.otlp_endpoint {
                args.push(format!("--otlp-endpoint={endpoint}"));
                args.push(format!("--instance={}-router", region.name));
            }
            region.router = Some(launch_router(binaries.as_ref(), dir.path(), &args).await?);
            region.router_args = args;
        }
        let mut mirror_links = BTreeMap::new();
        let mut agent_directory_links = BTreeMap::new();
        if layout.agents {
            let mut sources: Vec<Vec<String>> = vec![Vec::new(); regions.len()];
            for (i, from) in regions.iter().enumerate() {
                for (j, to) in regions.iter().enumerate() {
                    if i == j {
                        continue;
                    }
                    let mut names = Vec::new();
                    let mut urls = Vec::new();
                    for (k, endpoint) in to.group.endpoints().iter().enumerate() {
                        let name = format!("{}-mirror-{}-{k}", from.name, to.name);
                        let listen = toxiproxy.proxy(&name, authority(endpoint)).await?;
                        let rtt = layout.rtt(&from.name, &to.name);
                        if rtt > 0 {
                            toxiproxy.round_trip(&name, rtt).await?;
                        }
                        urls.push(format!("{scheme}://{listen}"));
                        names.push(name);
                    }
                    sources[i].push(format!("--source={}={}", to.name, urls.join("|")));
                    mirror_links.insert((from.name.clone(), to.name.clone()), names);
                }
            }
            for (i, region) in regions.iter_mut().enumerate() {
                // The agent reaches the directory through links of its own,
                // so a test can cut one region's agent off from it (its
                // routers must then stop writing before its lease expires).
                let mut names = Vec::new();
                let mut urls = Vec::new();
                for (k, endpoint) in directory.endpoints().iter().enumerate() {
                    let name = format!("{}-agent-directory-{k}", region.name);
                    let listen = toxiproxy.proxy(&name, authority(endpoint)).await?;
                    urls.push(format!("{scheme}://{listen}"));
                    names.push(name);
                }
                agent_directory_links.insert(region.name.clone(), names);
                let mut args = vec![
                    format!("--region={}", region.name),
                    format!("--group-endpoints={}", region.group.endpoints().join(",")),
                    format!("--directory-endpoints={}", urls.join(",")),
                    "--http-addr=127.0.0.1:0".to_string(),
                    "--publish-interval=500ms".to_string(),
                    "--election-ttl=2".to_string(),
                    "--log-format=text".to_string(),
                    format!("--identity={}-agent-a", region.name),
                ];
                args.extend(tls_flag(pki.as_ref(), Role::Agent, &region.name)?);
                args.extend(sources[i].iter().cloned());
                if let Some(endpoint) = &layout.otlp_endpoint {
                    args.push(format!("--otlp-endpoint={endpoint}"));
                }
                region.agent = Some(launch_agent(binaries.as_ref(), dir.path(), &args).await?);
                region.agent_args = args;
            }
            for region in &regions {
                if let Some(router) = &region.router {
                    router.wait_for_lease(&region.name).await?;
                }
            }
        }
        Ok(Self {
            layout,
            regions,
            directory,
            toxiproxy,
            links,
            mirror_links,
            agent_directory_links,
            binaries,
            client_tls: etcd_tls.map(|t| t.client),
            pki,
            dir,
        })
    }

    /// The directory group. With one member per region and round trips
    /// configured, members reach each other through toxiproxy: every member
    /// is reached through one proxy whose delay is half the mean round trip
    /// from its region to the others (etcd gives a member one peer URL for
    /// all, so per-pair delays cannot be modelled), and the group runs the
    /// cross-region Raft timing the operator gives directory groups.
    async fn start_directory(
        layout: &Layout,
        dir: &std::path::Path,
        toxiproxy: &Toxiproxy,
        tls: Option<EtcdTls>,
    ) -> Result<EtcdCluster> {
        let spread = layout.directory_members == layout.regions.len() && !layout.rtt_ms.is_empty();
        if !spread {
            return match tls {
                Some(t) => EtcdCluster::start_tls(dir, "directory", layout.directory_members, Tuning::default(), t),
                None => EtcdCluster::start(dir, "directory", layout.directory_members, Tuning::default()),
            };
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let ports: Vec<u16> = (0..layout.directory_members).map(|_| assets::free_port()).collect();
        let mut advertised = Vec::new();
        for (i, (region, _)) in layout.regions.iter().enumerate() {
            let name = format!("directory-peer-{region}");
            let listen = toxiproxy.proxy(&name, &format!("127.0.0.1:{}", ports[i])).await?;
            let others: Vec<u64> = layout
                .regions
                .iter()
                .filter(|(r, _)| r != region)
                .map(|(r, _)| layout.rtt(region, r))
                .collect();
            let mean = others.iter().sum::<u64>() / others.len().max(1) as u64;
            if mean > 0 {
                toxiproxy.round_trip(&name, mean).await?;
            }
            advertised.push(format!("{scheme}://{listen}"));
        }
        let max_rtt = layout.rtt_ms.values().copied().max().unwrap_or(100) as i32;
        let tuning = Tuning {
            heartbeat_ms: max_rtt.max(100),
            election_ms: (10 * max_rtt).max(1000),
        };
        EtcdCluster::start_with_peer_urls(
            dir,
            "directory",
            layout.directory_members,
            tuning,
            Some(&ports),
            tls,
            |i, _| advertised[i].clone(),
        )
    }

    pub fn region(&self, name: &str) -> &LocalRegion {
        self.regions
            .iter()
            .find(|r| r.name == name)
            .expect("a region of the layout")
    }

    pub fn region_mut(&mut self, name: &str) -> &mut LocalRegion {
        self.regions
            .iter_mut()
            .find(|r| r.name == name)
            .expect("a region of the layout")
    }

    /// A client of `region`'s router (with the harness's certificate when
    /// the deployment runs TLS).
    pub async fn client(&self, region: &str) -> tern_api::RouterClient {
        let router = self.region(region).router.as_ref().expect("router running");
        match &self.client_tls {
            Some(tls) => tern_api::RouterClient::new(
                tls.channel(&router.grpc_addr.to_string())
                    .expect("a socket address is host:port"),
            ),
            None => router.client().await,
        }
    }

    /// An etcd client of `region`'s group.
    pub async fn group_client(&self, region: &str) -> etcd_client::Client {
        self.region(region).group.connect().await.expect("the group answers")
    }

    /// An etcd client of the directory.
    pub async fn directory_client(&self) -> etcd_client::Client {
        self.directory.connect().await.expect("the directory answers")
    }

    /// Cuts (false) or restores (true) every mirror link from `from` to `to`.
    pub async fn set_mirror_link(&self, from: &str, to: &str, enabled: bool) -> Result<()> {
        for name in &self.mirror_links[&(from.to_string(), to.to_string())] {
            self.toxiproxy.set_enabled(name, enabled).await?;
        }
        Ok(())
    }

    /// Starts an agent for `region` with its usual flags plus `extra`.
    pub async fn start_agent(&self, region: &str, extra: &[String]) -> Result<AgentGuard> {
        // A flag given in `extra` replaces the usual one.
        let mut args: Vec<String> = self
            .region(region)
            .agent_args
            .iter()
            .filter(|a| {
                let flag = a.split('=').next().unwrap_or_default();
                !extra
                    .iter()
                    .any(|e| e.split('=').next() == Some(flag) && !flag.starts_with("--source"))
            })
            .cloned()
            .collect();
        args.extend_from_slice(extra);
        launch_agent(self.binaries.as_ref(), self.dir.path(), &args).await
    }

    /// Adds `router` and `agent` to `region`'s usual flags (kept for every
    /// later restart, a nemesis's too) and restarts both with them.
    pub async fn restart_with_flags(&mut self, region: &str, router: &[String], agent: &[String]) -> Result<()> {
        let r = self.region_mut(region);
        r.router_args.extend_from_slice(router);
        r.agent_args.extend_from_slice(agent);
        self.restart_router(region).await?;
        if let Some(a) = self.region_mut(region).agent.take() {
            a.stop().await;
        }
        let a = self.start_agent(region, &[]).await?;
        self.region_mut(region).agent = Some(a);
        if let Some(router) = &self.region(region).router {
            router.wait_for_lease(region).await?;
        }
        Ok(())
    }

    /// Loses `region` whole, as a failed data centre: its router and agent
    /// killed at once, every member of its group killed (kill -9).
    pub fn kill_region(&mut self, region: &str) {
        let r = self.region_mut(region);
        if let Some(router) = r.router.take() {
            router.kill();
        }
        if let Some(agent) = r.agent.take() {
            agent.kill();
        }
        for i in 0..r.group.members.len() {
            r.group.kill(i);
        }
    }

    /// Stops `region`'s router gracefully and starts it again with the same flags.
    pub async fn restart_router(&mut self, region: &str) -> Result<()> {
        if let Some(router) = self.region_mut(region).router.take() {
            router.stop().await;
        }
        self.start_router(region).await
    }

    /// Starts `region`'s router (stopped or killed before) with its flags:
    /// the same gRPC port, so links and peers reach it again.
    pub async fn start_router(&mut self, region: &str) -> Result<()> {
        self.start_router_with(region, &[]).await
    }

    /// Like `start_router`, with `extra` flags after the usual ones (a flag
    /// given twice takes the last value).
    pub async fn start_router_with(&mut self, region: &str, extra: &[String]) -> Result<()> {
        let (binaries, dir) = (self.binaries.clone(), self.dir.path().to_path_buf());
        let r = self.region_mut(region);
        let mut args = r.router_args.clone();
        args.extend_from_slice(extra);
        r.router = Some(launch_router(binaries.as_ref(), &dir, &args).await?);
        Ok(())
    }
}

/// A router: a process when `binaries` are given, else a task here.
async fn launch_router(binaries: Option<&Binaries>, dir: &Path, args: &[String]) -> Result<RouterGuard> {
    match binaries {
        Some(b) => RouterGuard::spawn(&b.router, args, &dir.join(format!("{}.log", log_name("router", args)))).await,
        None => RouterGuard::start(args).await,
    }
}

/// An agent: a process when `binaries` are given, else a task here.
async fn launch_agent(binaries: Option<&Binaries>, dir: &Path, args: &[String]) -> Result<AgentGuard> {
    match binaries {
        Some(b) => AgentGuard::spawn(&b.agent, args, &dir.join(format!("{}.log", log_name("agent", args)))).await,
        None => AgentGuard::start(args).await,
    }
}

/// With a CA: a certificate for `role` in `region` (directory
/// `<role>-<region>`) and the `--tls-dir` flag naming it.
fn tls_flag(pki: Option<&LocalPki>, role: Role, region: &str) -> Result<Option<String>> {
    let Some(pki) = pki else { return Ok(None) };
    let certs = pki.issue(&format!("{}-{region}", role.as_str()), &tls::identity(role, region))?;
    Ok(Some(format!("--tls-dir={}", certs.display())))
}

/// `host:port` of an endpoint URL.
fn authority(url: &str) -> &str {
    url.trim_start_matches("https://").trim_start_matches("http://")
}

/// `REGION-COMPONENT` from the `--region` flag among `args`.
fn log_name(component: &str, args: &[String]) -> String {
    let region = args
        .iter()
        .find_map(|a| a.strip_prefix("--region="))
        .unwrap_or("unknown");
    format!("{region}-{component}")
}
