//! A multi-region deployment on this machine, out of real parts: an etcd
//! group per region, a directory group, one router per region, and
//! toxiproxy on every cross-region router link with the injected round trip.
//! The data-plane tests and `tern demo` both build on it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::etcd_cluster::{EtcdCluster, Tuning};
use crate::toxiproxy::Toxiproxy;
use crate::{LocalError, Result, assets};

/// A router running in this process.
pub struct RouterGuard {
    pub region: String,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<tern_router::Result<()>>>,
}

impl RouterGuard {
    /// Starts a router with `args` (flags as on the command line).
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
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// Stops gracefully, letting in-flight calls finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// The value of the first metric line starting with `prefix`.
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        crate::http::metric(self.http_addr, prefix).await
    }

    /// A gRPC client of this router.
    pub async fn client(&self) -> tern_api::RouterClient {
        connect(self.grpc_addr).await
    }
}

impl Drop for RouterGuard {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A client of the router at `addr` (tern-api's; also named here, beside the
/// routers it reaches).
pub use tern_api::connect;

/// An agent running in this process.
pub struct AgentGuard {
    pub region: String,
    pub http_addr: SocketAddr,
    /// Freezes the agent as if its process were stopped (SIGSTOP).
    pub pause: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<tern_agent::Result<()>>>,
}

impl AgentGuard {
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
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// Steps down and stops.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Kills it without stepping down, like kill -9.
    pub fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// The value of the first metric line starting with `prefix`.
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        crate::http::metric(self.http_addr, prefix).await
    }
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
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
}

impl Layout {
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
    pub dir: TempDir,
}

impl LocalDeployment {
    /// Starts everything and waits until every router serves.
    pub async fn start(layout: Layout) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tern-local-")
            .tempdir()
            .map_err(|source| LocalError::Io {
                path: std::env::temp_dir().display().to_string(),
                source,
            })?;
        let toxiproxy = Toxiproxy::start(dir.path())?;
        let directory = Self::start_directory(&layout, dir.path(), &toxiproxy).await?;
        let mut regions = Vec::new();
        for (name, members) in &layout.regions {
            regions.push(LocalRegion {
                name: name.clone(),
                group: EtcdCluster::start(dir.path(), name, *members, Tuning::default())?,
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
        // The routers of one deployment share a peer token, as the routers of
        // one GeoCluster do: only calls that carry it count as forwarded.
        let peer_token = format!("local-{:032x}", rand::random::<u128>());
        for (i, region) in regions.iter_mut().enumerate() {
            let mut args = vec![
                format!("--region={}", region.name),
                format!("--listen=127.0.0.1:{}", grpc_ports[i]),
                "--http-addr=127.0.0.1:0".to_string(),
                format!("--group-endpoints={}", region.group.endpoints().join(",")),
                format!("--directory-endpoints={directory_endpoints}"),
                format!("--advertise=127.0.0.1:{}", grpc_ports[i]),
                format!("--peer-token={peer_token}"),
                "--log-format=text".to_string(),
            ];
            args.extend(peers[i].iter().cloned());
            if let Some(endpoint) = &layout.otlp_endpoint {
                args.push(format!("--otlp-endpoint={endpoint}"));
                args.push(format!("--instance={}-router", region.name));
            }
            region.router = Some(RouterGuard::start(&args).await?);
            region.router_args = args;
        }
        let mut mirror_links = BTreeMap::new();
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
                        let upstream = endpoint.trim_start_matches("http://");
                        let listen = toxiproxy.proxy(&name, upstream).await?;
                        let rtt = layout.rtt(&from.name, &to.name);
                        if rtt > 0 {
                            toxiproxy.round_trip(&name, rtt).await?;
                        }
                        urls.push(format!("http://{listen}"));
                        names.push(name);
                    }
                    sources[i].push(format!("--source={}={}", to.name, urls.join("|")));
                    mirror_links.insert((from.name.clone(), to.name.clone()), names);
                }
            }
            for (i, region) in regions.iter_mut().enumerate() {
                let mut args = vec![
                    format!("--region={}", region.name),
                    format!("--group-endpoints={}", region.group.endpoints().join(",")),
                    format!("--directory-endpoints={directory_endpoints}"),
                    "--http-addr=127.0.0.1:0".to_string(),
                    "--publish-interval=500ms".to_string(),
                    "--election-ttl=2".to_string(),
                    "--log-format=text".to_string(),
                    format!("--identity={}-agent-a", region.name),
                ];
                args.extend(sources[i].iter().cloned());
                if let Some(endpoint) = &layout.otlp_endpoint {
                    args.push(format!("--otlp-endpoint={endpoint}"));
                }
                region.agent = Some(AgentGuard::start(&args).await?);
                region.agent_args = args;
            }
        }
        Ok(Self {
            layout,
            regions,
            directory,
            toxiproxy,
            links,
            mirror_links,
            dir,
        })
    }

    /// The directory group. With one member per region and round trips
    /// configured, members reach each other through toxiproxy: every member
    /// is reached through one proxy whose delay is half the mean round trip
    /// from its region to the others (etcd gives a member one peer URL for
    /// all, so per-pair delays cannot be modelled), and the group runs the
    /// cross-region Raft timing the operator gives directory groups.
    async fn start_directory(layout: &Layout, dir: &std::path::Path, toxiproxy: &Toxiproxy) -> Result<EtcdCluster> {
        let spread = layout.directory_members == layout.regions.len() && !layout.rtt_ms.is_empty();
        if !spread {
            return EtcdCluster::start(dir, "directory", layout.directory_members, Tuning::default());
        }
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
            advertised.push(format!("http://{listen}"));
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

    /// A client of `region`'s router.
    pub async fn client(&self, region: &str) -> tern_api::RouterClient {
        self.region(region)
            .router
            .as_ref()
            .expect("router running")
            .client()
            .await
    }

    /// An etcd client of `region`'s group.
    pub async fn group_client(&self, region: &str) -> etcd_client::Client {
        etcd_client::Client::connect(self.region(region).group.endpoints(), None)
            .await
            .expect("the group answers")
    }

    /// An etcd client of the directory.
    pub async fn directory_client(&self) -> etcd_client::Client {
        etcd_client::Client::connect(self.directory.endpoints(), None)
            .await
            .expect("the directory answers")
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
        AgentGuard::start(&args).await
    }

    /// Stops `region`'s router gracefully and starts it again with the same flags.
    pub async fn restart_router(&mut self, region: &str) -> Result<()> {
        let r = self.region_mut(region);
        if let Some(router) = r.router.take() {
            router.stop().await;
        }
        let args = r.router_args.clone();
        r.router = Some(RouterGuard::start(&args).await?);
        Ok(())
    }
}
