//! Real Kubernetes nodes for the node e2e, one per cluster: a kubelet, a
//! containerd with runc and the CNI bridge, and kube-proxy, in a network
//! namespace of their own, joined to a bridge on the host; beside the test
//! API server a kube-controller-manager and a kube-scheduler. Images come
//! from OCI archives imported into containerd (no registry); the cluster DNS
//! is the harness's DNS server on the bridge, fed from every cluster's
//! Services and EndpointSlices ([`ClusterDns`]), so names resolve across
//! clusters as the multi-cluster example needs.
//!
//! Everything a node starts (its daemons, the shims, the containers) lives
//! in one cgroup subtree named after the node, so stopping it (a failover
//! scenario) or dropping it kills exactly that, also what containerd
//! started; leftovers of a test killed outright are swept at the next start.
//!
//! What this machine needs that a normal node does not (docs/kubernetes.md
//! has the table): CAP_SYS_RESOURCE is not granted here, so containerd
//! clamps OOM score adjustments to its own (`restrict_oom_score_adj`); the
//! host is cgroup v1, which kubelet 1.37 runs only with `failCgroupV1:
//! false`; the daemons enter the node's network namespace with `nsenter`,
//! because `ip netns exec` remounts /sys and kubelet then finds no cgroups.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node as KubeNode, PersistentVolume};
use kube::api::{Api, PostParams};

use crate::controlplane::{ApiOptions, ControlPlane, write};
use crate::process::ChildGuard;
use crate::{HarnessError, Result, assets};

/// Prefix of every host object a node e2e makes (bridge, netns, cgroups,
/// directories), so a sweep finds the leftovers of an earlier run.
const PREFIX: &str = "tern-node";
/// The host bridge the nodes hang off, and its address: the nodes' gateway,
/// where the API servers listen and the cluster DNS answers.
const BRIDGE: &str = "ternnode0";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 31, 250, 1);
/// The pause image every pod sandbox runs (built from the pinned
/// Kubernetes source by build-tools.sh).
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10.1";

/// What one cluster of the node e2e is: its name (a region), its node's
/// zone label, and its cluster domain.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub name: String,
    pub zone: String,
    pub domain: String,
}

/// One cluster: API server, controller-manager, scheduler and one node.
pub struct NodeCluster {
    pub spec: ClusterSpec,
    /// The node, or None once stopped.
    pub node: Option<Node>,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: String,
    pub service_cidr: String,
    scheduler: ChildGuard,
    controllers: ChildGuard,
    // Dropped last: the API server outlives what talks to it.
    pub cp: ControlPlane,
}

/// The host side of the node network: the bridge, and the routes to every
/// node's pods and services. Removed on drop, with the host's kernel
/// settings put back. Holds the machine's node-e2e lock: one at a time.
pub struct NodeNetwork {
    routes: Vec<String>,
    _lock: std::fs::File,
}

/// Where the lock lives, and the host kernel settings saved before a run
/// (kubelet rewrites some host-wide: `setupKernelTunables`), so that a run
/// killed before its drop is undone by the next one's sweep.
const LOCK: &str = "/run/tern-node-e2e.lock";
const SAVED_SYSCTLS: &str = "/run/tern-node-e2e.sysctls";
/// What kubelet (protectKernelDefaults: false) and the node network change.
const SYSCTLS: [&str; 7] = [
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
];

impl NodeNetwork {
    /// Takes the lock (another node e2e running is an error, not a sweep),
    /// sweeps what an earlier run left, saves the host's kernel settings and
    /// creates the bridge.
    pub fn create() -> Result<Self> {
        let lock = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK)
            .map_err(|source| HarnessError::Io {
                path: LOCK.into(),
                source,
            })?;
        if lock.try_lock().is_err() {
            return Err(HarnessError::Command {
                command: format!("lock {LOCK}"),
                stderr: "another node e2e holds the lock on this machine; wait for it to finish".into(),
            });
        }
        sweep();
        let saved: String = SYSCTLS
            .iter()
            .filter_map(|k| {
                std::fs::read_to_string(format!("/proc/sys/{k}"))
                    .ok()
                    .map(|v| format!("{k}={}\n", v.trim()))
            })
            .collect();
        write(Path::new(SAVED_SYSCTLS), &saved)?;
        let net = Self {
            routes: Vec::new(),
            _lock: lock,
        };
        run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        run("ip", &["addr", "add", &format!("{GATEWAY}/24"), "dev", BRIDGE])?;
        run("ip", &["link", "set", BRIDGE, "up"])?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|source| HarnessError::Io {
            path: "/proc/sys/net/ipv4/ip_forward".into(),
            source,
        })?;
        Ok(net)
    }

    /// The address where host services the pods use listen (DNS, API).
    pub fn gateway(&self) -> Ipv4Addr {
        GATEWAY
    }

    fn route(&mut self, cidr: &str, via: Ipv4Addr) -> Result<()> {
        // Never take over a route the host already has.
        let out = Command::new("ip").args(["route", "show", "exact", cidr]).output();
        if out.is_ok_and(|o| !o.stdout.is_empty()) {
            return Err(HarnessError::Command {
                command: format!("ip route add {cidr}"),
                stderr: format!("this host already routes {cidr}; the node e2e needs that range"),
            });
        }
        run("ip", &["route", "add", cidr, "via", &via.to_string()])?;
        self.routes.push(cidr.to_string());
        Ok(())
    }
}

impl Drop for NodeNetwork {
    fn drop(&mut self) {
        for cidr in &self.routes {
            let _ = run("ip", &["route", "del", cidr]);
        }
        let _ = run("ip", &["link", "del", BRIDGE]);
        restore_sysctls();
        clean_host_leftovers();
    }
}

/// Puts back the kernel settings saved at the start of a run.
fn restore_sysctls() {
    let Ok(saved) = std::fs::read_to_string(SAVED_SYSCTLS) else {
        return;
    };
    for line in saved.lines() {
        if let Some((key, value)) = line.split_once('=')
            && SYSCTLS.contains(&key)
        {
            let _ = std::fs::write(format!("/proc/sys/{key}"), value);
        }
    }
    let _ = std::fs::remove_file(SAVED_SYSCTLS);
}

/// What the nodes leave in host-wide places whatever their configuration:
/// libcni's result cache (fixed at /var/lib/cni), shim sockets nobody
/// listens on any more (/run/containerd/s), kubelet's device-plugin socket
/// (a fixed path) and the links in /var/log/containers to pod logs that
/// are gone. Only what is dead or ours is removed.
fn clean_host_leftovers() {
    let dead_socket = |p: &Path| std::os::unix::net::UnixStream::connect(p).is_err();
    for dir in ["/run/containerd/s", "/var/lib/kubelet/device-plugins"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if dead_socket(&e.path()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    // <network>-<sandbox id>-<interface>: the bridge's entries are named
    // after our network; the loopback ones go with their sandboxes
    // (`forget_cni_results`).
    if let Ok(entries) = std::fs::read_dir("/var/lib/cni/results") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("tern-node-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/var/log/containers") {
        for e in entries.flatten() {
            if std::fs::metadata(e.path()).is_err() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    for dir in ["/var/lib/kubelet/device-plugins", "/var/lib/kubelet"] {
        let _ = std::fs::remove_dir(dir);
    }
}

impl NodeCluster {
    /// Starts cluster number `index` (0-based; it picks the addresses):
    /// API server, controllers, scheduler, and a node with the images of
    /// `images` (OCI archives) loaded.
    pub async fn start(net: &mut NodeNetwork, index: u8, spec: ClusterSpec, images: &Path) -> Result<Self> {
        let node_ip = Ipv4Addr::new(172, 31, 250, 10 + index);
        let pod_cidr = format!("10.244.{}.0/24", 10 + index);
        let service_cidr = format!("10.96.{}.0/24", 10 + index);
        let cp = ControlPlane::start_with(&spec.name, &ApiOptions::for_nodes(GATEWAY, &service_cidr)).await?;
        let kubeconfig = cp.kubeconfig().display().to_string();
        let ca = cp.dir().join("certs/serving-ca.crt");
        write(&ca, &cp.serving_ca_pem)?;

        let cm_port = assets::free_port();
        let mut cmd = Command::new(assets::binary("kube-controller-manager")?);
        cmd.args([
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--leader-elect=false".into(),
            format!("--root-ca-file={}", ca.display()),
            format!(
                "--service-account-private-key-file={}",
                cp.cert_dir().join("sa.key").display()
            ),
            format!("--secure-port={cm_port}"),
            "--bind-address=127.0.0.1".into(),
            // The nodes' pod ranges are fixed by the harness, not allocated.
            "--controllers=*,-node-ipam-controller".into(),
            // A stopped node is NotReady after 20 s rather than 40: the
            // failover scenario stops one.
            "--node-monitor-grace-period=20s".into(),
        ]);
        let controllers = ChildGuard::spawn(
            &format!("kube-controller-manager {}", spec.name),
            cmd,
            &cp.dir().join("kube-controller-manager.log"),
        )?;
        let sched_port = assets::free_port();
        let mut cmd = Command::new(assets::binary("kube-scheduler")?);
        cmd.args([
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--leader-elect=false".into(),
            format!("--secure-port={sched_port}"),
            "--bind-address=127.0.0.1".into(),
        ]);
        let scheduler = ChildGuard::spawn(
            &format!("kube-scheduler {}", spec.name),
            cmd,
            &cp.dir().join("kube-scheduler.log"),
        )?;

        let node = Node::start(NodeConfig {
            name: format!("{}-node", spec.name),
            cluster: &cp,
            ip: node_ip,
            pod_cidr: pod_cidr.clone(),
            dns: GATEWAY,
            domain: spec.domain.clone(),
            zone: spec.zone.clone(),
            region: spec.name.clone(),
            index,
            images,
        })
        .await?;
        let mut controllers = controllers;
        let mut scheduler = scheduler;
        controllers.check_running()?;
        scheduler.check_running()?;
        net.route(&pod_cidr, node_ip)?;
        net.route(&service_cidr, node_ip)?;
        let cluster = Self {
            spec,
            node: Some(node),
            node_ip,
            pod_cidr,
            service_cidr,
            scheduler,
            controllers,
            cp,
        };
        // Enough for the scenarios' busiest cluster (us-east): the backup
        // claim, three members and a directory member, two new claims for
        // a replaced member (the claim made again, then cleared), one for
        // a lost member of one and one for its restore. Retained volumes
        // are not reused.
        cluster.create_volumes(12).await?;
        Ok(cluster)
    }

    /// What a storage provisioner would do (kind ships local-path): `count`
    /// hostPath volumes on the node, bound to claims by the controller-
    /// manager. Retained: the test's directory goes with the cluster.
    async fn create_volumes(&self, count: usize) -> Result<()> {
        let api: Api<PersistentVolume> = Api::all(self.cp.client().await?);
        for i in 0..count {
            let path = self.cp.dir().join(format!("volumes/pv-{i}"));
            std::fs::create_dir_all(&path).map_err(|source| HarnessError::Io {
                path: path.display().to_string(),
                source,
            })?;
            // As local-path makes its directories: writable by every pod's
            // user (the agents run as 65532, and a hostPath volume ignores
            // fsGroup).
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).map_err(|source| {
                HarnessError::Io {
                    path: path.display().to_string(),
                    source,
                }
            })?;
            let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": format!("{}-pv-{i}", self.spec.name)},
                "spec": {
                    "capacity": {"storage": "100Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "hostPath": {"path": path.display().to_string(), "type": "Directory"},
                }
            }))
            .map_err(|e| HarnessError::Kubeconfig(format!("volume manifest: {e}")))?;
            api.create(&PostParams::default(), &pv).await?;
        }
        Ok(())
    }

    /// Stops the node as a power cut would: every process on it killed at
    /// once, the API server and controllers left running (they see it go
    /// NotReady).
    pub fn stop_node(&mut self) {
        if let Some(mut node) = self.node.take() {
            node.kill();
        }
    }

    /// Logs of the node's daemons and the control plane, for a failed test.
    pub fn logs(&self) -> String {
        let mut out = format!("--- {} kube-apiserver\n{}\n", self.spec.name, self.cp.apiserver_log());
        out += &format!("--- controller-manager\n{}\n", self.controllers.log_tail());
        out += &format!("--- scheduler\n{}\n", self.scheduler.log_tail());
        if let Some(node) = &self.node {
            out += &node.logs();
        }
        out
    }
}

impl Drop for NodeCluster {
    fn drop(&mut self) {
        self.stop_node();
        self.scheduler.kill();
        self.controllers.kill();
    }
}

struct NodeConfig<'a> {
    name: String,
    cluster: &'a ControlPlane,
    ip: Ipv4Addr,
    pod_cidr: String,
    dns: Ipv4Addr,
    domain: String,
    zone: String,
    region: String,
    index: u8,
    images: &'a Path,
}

/// A node: kubelet, containerd and kube-proxy in network namespace
/// `netns`, every process of it in cgroup subtree `cgroup`.
pub struct Node {
    pub name: String,
    netns: String,
    cgroup: String,
    dir: PathBuf,
    daemons: Vec<ChildGuard>,
}

impl Node {
    async fn start(config: NodeConfig<'_>) -> Result<Self> {
        let short = config.name.clone();
        let netns = format!("{PREFIX}-{short}");
        let dir = config.cluster.dir().join("node");
        let mut node = Self {
            name: config.name.clone(),
            netns: netns.clone(),
            cgroup: format!("{PREFIX}-{short}"),
            dir: dir.clone(),
            daemons: Vec::new(),
        };
        node.network(config.ip, config.index)?;
        node.cgroups()?;

        // containerd: its state, sockets, runc's state, the pods' network
        // namespaces and the CNI's address leases all under the node's
        // directory, so nothing is shared with another node.
        let bin = assets::dir().ok_or_else(|| HarnessError::Kubeconfig("no assets directory".into()))?;
        let sock = dir.join("containerd/containerd.sock");
        let containerd_toml = dir.join("containerd.toml");
        write(&containerd_toml, &containerd_config(&dir, &bin))?;
        write(
            &dir.join("cni/net.d/10-tern.conflist"),
            &cni_config(&dir, &config.pod_cidr),
        )?;
        let containerd = node.spawn(
            "containerd",
            &bin.join("containerd"),
            &[format!("--config={}", containerd_toml.display())],
        )?;
        node.daemons.push(containerd);
        wait_for(Duration::from_secs(30), || sock.exists(), "containerd's socket")?;
        node.import_images(&bin.join("ctr"), &sock, config.images)?;

        let kubelet_yaml = dir.join("kubelet.yaml");
        write(&kubelet_yaml, &kubelet_config(&config, &node.cgroup, &sock))?;
        let kubelet = node.spawn(
            "kubelet",
            &bin.join("kubelet"),
            &[
                format!("--config={}", kubelet_yaml.display()),
                format!("--kubeconfig={}", config.cluster.kubeconfig().display()),
                format!("--root-dir={}", dir.join("kubelet").display()),
                format!("--cert-dir={}", dir.join("kubelet/pki").display()),
                format!("--hostname-override={}", config.name),
                format!("--node-ip={}", config.ip),
                // What kind's nodes get from a cloud provider: the zone the
                // members spread over, the region routers and agents select.
                format!(
                    "--node-labels=topology.kubernetes.io/zone={},topology.kubernetes.io/region={}",
                    config.zone, config.region
                ),
            ],
        )?;
        node.daemons.push(kubelet);
        let proxy = node.spawn(
            "kube-proxy",
            &bin.join("kube-proxy"),
            &[
                format!("--kubeconfig={}", config.cluster.kubeconfig().display()),
                "--proxy-mode=nftables".into(),
                format!("--hostname-override={}", config.name),
                format!("--cluster-cidr={}", config.pod_cidr),
                // Without br_netfilter a reply from a pod on the same bridge
                // would bypass the node's NAT: masquerade every service hop.
                "--masquerade-all".into(),
                "--conntrack-max-per-core=0".into(),
                "--metrics-bind-address=127.0.0.1:10249".into(),
                "--healthz-bind-address=127.0.0.1:10256".into(),
            ],
        )?;
        node.daemons.push(proxy);

        // Ready: registered and reporting Ready.
        let nodes: Api<KubeNode> = Api::all(config.cluster.client().await?);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            for d in &mut node.daemons {
                d.check_running()?;
            }
            if let Ok(Some(n)) = nodes.get_opt(&config.name).await {
                let ready = n
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                if ready {
                    return Ok(node);
                }
            }
            if Instant::now() > deadline {
                return Err(HarnessError::NotReady {
                    what: format!("node {}", config.name),
                    secs: 120,
                    log: node.logs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The node's namespace, with a veth to the host bridge.
    fn network(&self, ip: Ipv4Addr, index: u8) -> Result<()> {
        let host_end = format!("{PREFIX}-{index}");
        run("ip", &["netns", "add", &self.netns])?;
        run(
            "ip",
            &[
                "link",
                "add",
                &host_end,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &self.netns,
            ],
        )?;
        run("ip", &["link", "set", &host_end, "master", BRIDGE, "up"])?;
        let ns = |args: &[&str]| {
            let mut all = vec!["-n", self.netns.as_str()];
            all.extend_from_slice(args);
            run("ip", &all)
        };
        ns(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns(&["link", "set", "eth0", "up"])?;
        ns(&["link", "set", "lo", "up"])?;
        ns(&["route", "add", "default", "via", &GATEWAY.to_string()])?;
        run(
            "ip",
            &["netns", "exec", &self.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
        )
    }

    /// The node's cgroup in every v1 hierarchy (kubelet's cgroupRoot), and
    /// `system` under it for the daemons.
    fn cgroups(&self) -> Result<()> {
        for h in hierarchies() {
            for sub in ["", "/system"] {
                let path = h.join(format!("{}{sub}", self.cgroup));
                std::fs::create_dir_all(&path).map_err(|source| HarnessError::Io {
                    path: path.display().to_string(),
                    source,
                })?;
                // A new cpuset has no CPUs or memory nodes until given its
                // parent's.
                if h.ends_with("cpuset") {
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        let value = std::fs::read_to_string(h.join(file)).unwrap_or_default();
                        let _ = std::fs::write(path.join(file), value.trim());
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts a daemon inside the node's network namespace and cgroup.
    fn spawn(&self, what: &str, binary: &Path, args: &[String]) -> Result<ChildGuard> {
        let cgroups: Vec<String> = hierarchies()
            .iter()
            .map(|h| h.join(format!("{}/system", self.cgroup)).display().to_string())
            .collect();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            // A daemon that failed to join the cgroup would escape the kill.
            .arg(r#"set -e; for d in $TERN_NODE_CGROUPS; do echo $$ > "$d/cgroup.procs"; done; exec nsenter --net="$TERN_NODE_NETNS" -- "$@""#)
            .arg("tern-node")
            .arg(binary)
            .args(args)
            .env("TERN_NODE_CGROUPS", cgroups.join(" "))
            .env("TERN_NODE_NETNS", format!("/run/netns/{}", self.netns))
            .env("PATH", path_with(binary.parent()));
        let log = self.dir.join(format!("{what}.log"));
        ChildGuard::spawn(&format!("{what} on {}", self.name), cmd, &log).map_err(Into::into)
    }

    fn import_images(&self, ctr: &Path, sock: &Path, images: &Path) -> Result<()> {
        let entries = std::fs::read_dir(images).map_err(|source| HarnessError::Io {
            path: images.display().to_string(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "tar") {
                continue;
            }
            let out = Command::new(ctr)
                .arg(format!("--address={}", sock.display()))
                .args(["--namespace=k8s.io", "images", "import"])
                .arg(&path)
                .output()
                .map_err(|source| HarnessError::Spawn {
                    what: "ctr".into(),
                    source,
                })?;
            if !out.status.success() {
                return Err(HarnessError::Command {
                    command: format!("ctr images import {}", path.display()),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                });
            }
        }
        Ok(())
    }

    fn logs(&self) -> String {
        self.daemons
            .iter()
            .map(|d| format!("--- {}\n{}\n", d.name(), d.log_tail()))
            .collect()
    }

    /// Kills every process of the node (daemons, shims, containers) and
    /// removes its mounts, cgroups and namespace.
    fn kill(&mut self) {
        kill_cgroup(&self.cgroup);
        for d in &mut self.daemons {
            d.kill();
        }
        unmount_under(&self.dir);
        forget_cni_results(&self.dir);
        remove_cgroup(&self.cgroup);
        let _ = run("ip", &["netns", "del", &self.netns]);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn containerd_config(dir: &Path, bin: &Path) -> String {
    let d = dir.display();
    let b = bin.display();
    format!(
        r#"version = 3
root = "{d}/containerd/root"
state = "{d}/containerd/state"
[grpc]
  address = "{d}/containerd/containerd.sock"
[ttrpc]
  address = "{d}/containerd/containerd.sock.ttrpc"
[plugins.'io.containerd.cri.v1.runtime']
  # CAP_SYS_RESOURCE is not granted on this machine: lowering a process's
  # OOM score adjustment fails, so it is clamped to containerd's own.
  restrict_oom_score_adj = true
  # The pods' network namespaces under the node's directory, not in
  # /run/netns where every node would share them.
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = '{b}/runc'
        Root = '{d}/runc'
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['{b}/cni']
    conf_dir = '{d}/cni/net.d'
[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '{PAUSE_IMAGE}'
"#
    )
}

/// The pods' network: a bridge in the node's namespace, addresses from the
/// node's range. No masquerading: pod addresses are routed between nodes.
fn cni_config(dir: &Path, pod_cidr: &str) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "tern-node",
        "plugins": [{
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "dataDir": dir.join("ipam").display().to_string(),
                "ranges": [[{"subnet": pod_cidr}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            }
        }]
    })
    .to_string()
}

fn kubelet_config(config: &NodeConfig<'_>, cgroup: &str, sock: &Path) -> String {
    let ca = config.cluster.cert_dir().join("client-ca.crt");
    serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        // The host is cgroup v1 (hybrid); kubelet 1.36+ refuses it unless told.
        "failCgroupV1": false,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": format!("/{cgroup}"),
        "authentication": {
            // The API server calls without a client certificate (logs,
            // port-forward); a test node lets it in.
            "anonymous": {"enabled": true},
            "webhook": {"enabled": false},
            "x509": {"clientCAFile": ca.display().to_string()},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDNS": [config.dns.to_string()],
        "clusterDomain": config.domain,
        "containerRuntimeEndpoint": format!("unix://{}", sock.display()),
        "failSwapOn": false,
        // The test machine's disk is shared and may be fuller than a node's
        // would be: never evict for disk.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "0%", "imagefs.available": "0%", "nodefs.inodesFree": "0%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "address": config.ip.to_string(),
        "readOnlyPort": 0,
        "healthzPort": 0,
        "resolvConf": "",
        "serializeImagePulls": false,
        "localStorageCapacityIsolation": false,
        "maxPods": 50,
        // The pods' logs under the node's directory, not /var/log/pods.
        "podLogsDir": config.cluster.dir().join("node/pod-logs").display().to_string(),
    })
    .to_string()
}

/// The mounted cgroup v1 hierarchies (not the unified one).
fn hierarchies() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    out.retain(|p| p.join("cgroup.procs").exists() && !p.ends_with("unified"));
    out.sort();
    out
}

/// SIGKILL to every process in the cgroup subtree, until none is left.
fn kill_cgroup(cgroup: &str) {
    let Some(root) = hierarchies()
        .into_iter()
        .find(|h| h.ends_with("pids") || h.ends_with("memory"))
    else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = procs_under(&root.join(cgroup));
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn procs_under(dir: &Path) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                out.extend(procs_under(&e.path()));
            }
        }
    }
    out
}

/// Removes the cgroup subtree in every hierarchy, deepest first.
fn remove_cgroup(cgroup: &str) {
    fn remove(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    remove(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    for h in hierarchies() {
        remove(&h.join(cgroup));
    }
    // runc also makes the containers' cgroups in the unified hierarchy.
    remove(&Path::new("/sys/fs/cgroup/unified").join(cgroup));
}

/// Removes libcni's cached results (fixed at /var/lib/cni/results) of the
/// pod sandboxes a node's containerd made: those named in its state under
/// `node_dir`.
fn forget_cni_results(node_dir: &Path) {
    let sandboxes = node_dir.join("containerd/root/io.containerd.grpc.v1.cri/sandboxes");
    let ids: Vec<String> = std::fs::read_dir(&sandboxes)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if ids.is_empty() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir("/var/lib/cni/results") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if ids.iter().any(|id| name.contains(&format!("-{id}-"))) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Lazily unmounts every mount point below `dir` (container root
/// filesystems, the pods' namespaces and volumes), deepest first.
fn unmount_under(dir: &Path) {
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").args(["-l", &p]).output();
    }
}

/// Removes what an earlier node e2e left (a test killed before its drops
/// ran): processes and cgroups, mounts, namespaces and the bridge.
fn sweep() {
    let mut cgroups = std::collections::BTreeSet::new();
    for h in hierarchies() {
        if let Ok(entries) = std::fs::read_dir(&h) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(PREFIX) {
                    cgroups.insert(name);
                }
            }
        }
    }
    for c in &cgroups {
        kill_cgroup(c);
    }
    let tmp = std::env::temp_dir().display().to_string();
    let stale: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|p| p.starts_with(&format!("{tmp}/tern-cp-")) && p.contains("/node/"))
        .collect();
    for p in stale.iter().rev() {
        let _ = Command::new("umount").args(["-l", p]).output();
    }
    for c in &cgroups {
        remove_cgroup(c);
    }
    // The stale clusters' directories (only node clusters have node/).
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let stale_cluster =
                e.file_name().to_string_lossy().starts_with("tern-cp-") && e.path().join("node").is_dir();
            if stale_cluster && !cgroups.is_empty() {
                forget_cni_results(&e.path().join("node"));
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name.starts_with(PREFIX) {
                let _ = run("ip", &["netns", "del", name]);
            }
        }
    }
    let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
    restore_sysctls();
    clean_host_leftovers();
}

fn path_with(dir: Option<&Path>) -> String {
    let mut path = String::new();
    if let Some(d) = dir {
        path.push_str(&d.display().to_string());
        path.push(':');
    }
    path.push_str("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path
}

fn wait_for(limit: Duration, mut ready: impl FnMut() -> bool, what: &str) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !ready() {
        if Instant::now() > deadline {
            return Err(HarnessError::NotReady {
                what: what.to_string(),
                secs: limit.as_secs(),
                log: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Runs a host command (ip, sysctl); an error carries its stderr.
fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| HarnessError::Spawn {
            what: program.to_string(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HarnessError::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// The cluster DNS of the node e2e: every cluster's Services
/// (`svc.ns.svc.<domain>`, the cluster IP; a headless Service its first
/// endpoint) and the hostnames in their EndpointSlices
/// (`pod.svc.ns.svc.<domain>`, as StatefulSet members are named), read
/// once a second from every API server into one table, so a pod in one
/// cluster resolves names of another (what CoreDNS forwarding per domain
/// does in the kind e2e).
pub struct ClusterDns {
    pub dns: crate::dns::TestDns,
    task: tokio::task::JoinHandle<()>,
}

impl ClusterDns {
    /// Serves on port 53 of the gateway; `clusters` are (client, domain).
    pub async fn start(clusters: Vec<(kube::Client, String)>) -> Result<Self> {
        let dns = crate::dns::TestDns::start_on((GATEWAY, 53).into()).await?;
        let table = dns.clone_handle();
        let task = tokio::spawn(async move {
            loop {
                let mut names = HashMap::new();
                for (client, domain) in &clusters {
                    // A cluster that does not answer keeps nothing: its
                    // names go, as CoreDNS's would with its API server.
                    let _ = cluster_names(client, domain, &mut names).await;
                }
                table.replace(names, 5);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Ok(Self { dns, task })
    }
}

impl Drop for ClusterDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn cluster_names(client: &kube::Client, domain: &str, names: &mut HashMap<String, Ipv4Addr>) -> Result<()> {
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let services: Api<Service> = Api::all(client.clone());
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let mut headless = Vec::new();
    for svc in services.list(&Default::default()).await? {
        let (Some(name), Some(ns)) = (svc.metadata.name.clone(), svc.metadata.namespace.clone()) else {
            continue;
        };
        let ip = svc.spec.as_ref().and_then(|s| s.cluster_ip.clone()).unwrap_or_default();
        let fqdn = format!("{name}.{ns}.svc.{domain}");
        match ip.parse::<Ipv4Addr>() {
            Ok(ip) => {
                names.insert(fqdn, ip);
            }
            Err(_) => headless.push(fqdn),
        }
    }
    for slice in slices.list(&Default::default()).await? {
        let labels = slice.metadata.labels.clone().unwrap_or_default();
        let (Some(svc), Some(ns)) = (
            labels.get("kubernetes.io/service-name"),
            slice.metadata.namespace.clone(),
        ) else {
            continue;
        };
        let service = format!("{svc}.{ns}.svc.{domain}");
        for endpoint in slice.endpoints.unwrap_or_default() {
            let Some(ip) = endpoint.addresses.first().and_then(|a| a.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            if let Some(host) = endpoint.hostname {
                names.insert(format!("{host}.{service}"), ip);
            }
            if headless.contains(&service) {
                names.entry(service.clone()).or_insert(ip);
            }
        }
    }
    Ok(())
}
