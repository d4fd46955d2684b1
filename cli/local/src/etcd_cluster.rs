//! Real etcd clusters for the data-plane tests and the local demo: N members
//! on loopback ports from the OS, started with the same member flags the
//! operator deploys (`tern_operator::etcd_flags::member_args`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tern_crds::ClusterMember;
use tern_operator::etcd_flags::{ClusterState, MemberConfig, member_args};

use crate::process::ChildGuard;
use crate::{LocalError, Result, assets};

/// One member: its name, URLs and process.
pub struct Member {
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
    /// Plain-HTTP metrics and health endpoint, with TLS (the client URL
    /// then wants a client certificate).
    metrics_url: Option<String>,
    args: Vec<String>,
    log: PathBuf,
    process: Option<ChildGuard>,
}

/// A group of etcd members that form one Raft group.
pub struct EtcdCluster {
    pub name: String,
    pub members: Vec<Member>,
    /// Where the members' data and logs are.
    dir: PathBuf,
    tuning: Tuning,
    tls: Option<EtcdTls>,
}

/// A group that speaks TLS to clients and peers and requires their
/// certificates (`--client-cert-auth`).
#[derive(Clone)]
pub struct EtcdTls {
    /// The members' certificate directory (ca.crt, tls.crt, tls.key).
    pub server_dir: PathBuf,
    /// What this harness dials the members with.
    pub client: tern_common::tls::Tls,
}

/// Raft timing of a cluster.
#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    pub heartbeat_ms: i32,
    pub election_ms: i32,
}

impl Default for Tuning {
    /// Inside a region: etcd's defaults.
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_ms: 1000,
        }
    }
}

fn scheme(tls: Option<&EtcdTls>) -> &'static str {
    if tls.is_some() { "https" } else { "http" }
}

/// With TLS, health and metrics on a plain-HTTP port of their own.
fn metrics_url(tls: Option<&EtcdTls>) -> Option<String> {
    tls.map(|_| format!("http://127.0.0.1:{}", assets::free_port()))
}

impl Member {
    /// Where /health, /livez and /metrics answer without a certificate.
    fn health_base(&self) -> &str {
        self.metrics_url.as_deref().unwrap_or(&self.client_url)
    }
}

/// Where member `name` keeps its data.
fn data_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.data"))
}

/// The command line of local member `m` (the operator's member flags, on
/// loopback, without fsync): others reach it at `advertise_peer`, and it
/// bootstraps or joins `initial` as `state` says.
#[allow(clippy::too_many_arguments)]
fn local_args(
    m: &Member,
    dir: &Path,
    advertise_peer: &str,
    initial: &[ClusterMember],
    token: &str,
    state: ClusterState,
    tuning: Tuning,
    tls: Option<&EtcdTls>,
) -> Vec<String> {
    let data_dir = data_dir(dir, &m.name);
    let tls_dir = tls.map(|t| t.server_dir.to_string_lossy().into_owned());
    member_args(&MemberConfig {
        name: &m.name,
        data_dir: &data_dir.to_string_lossy(),
        listen_client_urls: &m.client_url,
        listen_peer_urls: &m.peer_url,
        listen_metrics_urls: m.metrics_url.as_deref(),
        advertise_client_urls: &m.client_url,
        advertise_peer_urls: advertise_peer,
        initial_cluster: initial,
        cluster_token: token,
        state,
        heartbeat_interval_ms: tuning.heartbeat_ms,
        election_timeout_ms: tuning.election_ms,
        unsafe_no_fsync: true,
        tls_dir: tls_dir.as_deref(),
    })
}

impl EtcdCluster {
    /// Starts `size` members with data under `dir` and waits until the group
    /// has a leader.
    pub fn start(dir: &Path, name: &str, size: usize, tuning: Tuning) -> Result<Self> {
        Self::start_with_peer_urls(dir, name, size, tuning, None, None, |_, url| url.to_string())
    }

    /// Like `start`, over TLS with `tls`'s certificates.
    pub fn start_tls(dir: &Path, name: &str, size: usize, tuning: Tuning, tls: EtcdTls) -> Result<Self> {
        Self::start_with_peer_urls(dir, name, size, tuning, None, Some(tls), |_, url| url.to_string())
    }

    /// Like `start`, but the URL that others use to reach member `i` is
    /// `advertise(i, listen_url)` (a toxiproxy listener, for example), and
    /// member `i` listens for peers on `peer_ports[i]` when given.
    pub fn start_with_peer_urls(
        dir: &Path,
        name: &str,
        size: usize,
        tuning: Tuning,
        peer_ports: Option<&[u16]>,
        tls: Option<EtcdTls>,
        advertise: impl Fn(usize, &str) -> String,
    ) -> Result<Self> {
        assets::retry_port_clash(|| {
            // A failed attempt's members are killed (dropped) and their data
            // removed, so the next one starts a fresh cluster.
            for i in 0..size {
                let _ = std::fs::remove_dir_all(data_dir(dir, &format!("{name}-{i}")));
            }
            Self::start_once(dir, name, size, tuning, peer_ports, tls.clone(), &advertise)
        })
    }

    fn start_once(
        dir: &Path,
        name: &str,
        size: usize,
        tuning: Tuning,
        peer_ports: Option<&[u16]>,
        tls: Option<EtcdTls>,
        advertise: &impl Fn(usize, &str) -> String,
    ) -> Result<Self> {
        let binary = assets::binary("etcd")?;
        let scheme = scheme(tls.as_ref());
        let mut members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("{name}-{i}"),
                client_url: format!("{scheme}://127.0.0.1:{}", assets::free_port()),
                peer_url: format!(
                    "{scheme}://127.0.0.1:{}",
                    peer_ports
                        .and_then(|p| p.get(i).copied())
                        .unwrap_or_else(assets::free_port)
                ),
                metrics_url: metrics_url(tls.as_ref()),
                args: Vec::new(),
                log: dir.join(format!("{name}-{i}.log")),
                process: None,
            })
            .collect();
        let initial: Vec<ClusterMember> = members
            .iter()
            .enumerate()
            .map(|(i, m)| ClusterMember {
                name: m.name.clone(),
                peer_url: advertise(i, &m.peer_url),
            })
            .collect();
        for (i, m) in members.iter_mut().enumerate() {
            m.args = local_args(
                m,
                dir,
                &initial[i].peer_url,
                &initial,
                name,
                ClusterState::New,
                tuning,
                tls.as_ref(),
            );
        }
        let mut cluster = Self {
            name: name.to_string(),
            members,
            dir: dir.to_path_buf(),
            tuning,
            tls,
        };
        for i in 0..size {
            cluster.start_member(i, &binary)?;
        }
        for i in 0..size {
            cluster.wait_member(i, Duration::from_secs(60))?;
        }
        Ok(cluster)
    }

    fn start_member(&mut self, i: usize, binary: &Path) -> Result<()> {
        let m = &mut self.members[i];
        let mut cmd = Command::new(binary);
        cmd.args(&m.args);
        m.process = Some(ChildGuard::spawn(&format!("etcd {}", m.name), cmd, &m.log)?);
        Ok(())
    }

    fn wait_member(&mut self, i: usize, limit: Duration) -> Result<()> {
        let m = &mut self.members[i];
        let url = format!("{}/health", m.health_base());
        let process = m.process.as_mut().expect("started above");
        process.wait_until(limit, || crate::http::get_ok(&url))
    }

    /// Picks the ports of a member that is not in the group yet (the next
    /// one a grow adds, `NAME-i`) and returns its index; `join` starts it.
    pub fn reserve_member(&mut self) -> usize {
        let i = self.members.len();
        let name = format!("{}-{i}", self.name);
        let scheme = scheme(self.tls.as_ref());
        self.members.push(Member {
            client_url: format!("{scheme}://127.0.0.1:{}", assets::free_port()),
            peer_url: format!("{scheme}://127.0.0.1:{}", assets::free_port()),
            metrics_url: metrics_url(self.tls.as_ref()),
            args: Vec::new(),
            log: self.dir.join(format!("{name}.log")),
            process: None,
            name,
        });
        i
    }

    /// Starts member `i`, already added to the group (as a learner), so
    /// that it joins it: `initial-cluster-state=existing`, with `members`
    /// the group's membership including itself, as etcd requires. Waits
    /// until it is live (a learner does not answer /health).
    pub fn join(&mut self, i: usize, members: &[ClusterMember]) -> Result<()> {
        let binary = assets::binary("etcd")?;
        let m = &mut self.members[i];
        m.args = local_args(
            m,
            &self.dir,
            &m.peer_url,
            members,
            &self.name,
            ClusterState::Existing,
            self.tuning,
            self.tls.as_ref(),
        );
        self.start_member(i, &binary)?;
        let m = &mut self.members[i];
        let url = format!("{}/livez", m.health_base());
        let process = m.process.as_mut().expect("started above");
        process.wait_until(Duration::from_secs(60), || crate::http::get_ok(&url))
    }

    /// Stops member `i` for good and deletes its data, as a StatefulSet
    /// scale-down with `whenScaled: Delete` does to a removed member.
    pub fn retire(&mut self, i: usize) {
        self.kill(i);
        let _ = std::fs::remove_dir_all(self.data_dir(i));
    }

    /// Where member `i` keeps its data.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        data_dir(&self.dir, &self.members[i].name)
    }

    /// A client of `endpoints` of this group, with the harness's
    /// certificate when the group speaks TLS.
    pub async fn client(&self, endpoints: &[&str]) -> std::result::Result<etcd_client::Client, etcd_client::Error> {
        tern_common::etcd::client(endpoints, self.tls.as_ref().map(|t| &t.client), None).await
    }

    /// A client of every member.
    pub async fn connect(&self) -> std::result::Result<etcd_client::Client, etcd_client::Error> {
        let endpoints = self.endpoints();
        let endpoints: Vec<&str> = endpoints.iter().map(String::as_str).collect();
        self.client(&endpoints).await
    }

    /// The group's TLS set-up, if it speaks TLS.
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    /// Client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Kills member `i` with SIGKILL (kill -9).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].process.take() {
            p.kill();
        }
    }

    /// Freezes member `i` (SIGSTOP): its connections stay open and nothing
    /// answers, like a hung node.
    pub fn pause(&self, i: usize) {
        if let Some(p) = &self.members[i].process {
            p.signal(nix::sys::signal::Signal::SIGSTOP);
        }
    }

    /// Thaws a member frozen by `pause`.
    pub fn resume(&self, i: usize) {
        if let Some(p) = &self.members[i].process {
            p.signal(nix::sys::signal::Signal::SIGCONT);
        }
    }

    /// Restarts every killed member with its data, all before waiting for
    /// any (a lone member of a lost group cannot answer without a quorum).
    pub fn restart_all(&mut self) -> Result<()> {
        let binary = assets::binary("etcd")?;
        let killed: Vec<usize> = (0..self.members.len())
            .filter(|i| self.members[*i].process.is_none())
            .collect();
        for i in &killed {
            self.start_member(*i, &binary)?;
        }
        for i in killed {
            self.wait_member(i, Duration::from_secs(60))?;
        }
        Ok(())
    }

    /// Starts a killed member with its data, without waiting for it to
    /// serve (it may never: a member that cannot join its group).
    pub fn start_without_waiting(&mut self, i: usize) -> Result<()> {
        let binary = assets::binary("etcd")?;
        self.start_member(i, &binary)
    }

    /// Restarts a killed member with its data.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        let binary = assets::binary("etcd")?;
        self.start_member(i, &binary)?;
        self.wait_member(i, Duration::from_secs(60))
    }

    /// Transactions member `i` has answered with OK since it started (its
    /// gRPC server metrics).
    pub async fn txns_served(&self, i: usize) -> f64 {
        let addr = self.members[i]
            .health_base()
            .trim_start_matches("http://")
            .parse()
            .expect("health URLs are http://IP:PORT");
        crate::http::metric(
            addr,
            "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\"",
        )
        .await
        .unwrap_or(0.0)
    }

    /// Hands Raft leadership to member `to` (etcd's MoveLeader, sent to the
    /// leader), as an operator would before maintenance on the leader's node.
    pub async fn move_leader(&self, to: usize) -> Result<()> {
        let failed = |reason: String| LocalError::Etcd {
            group: self.name.clone(),
            action: format!("moving the leader to member {to}"),
            reason,
        };
        let leader = self.leader().await.ok_or_else(|| failed("no leader".into()))?;
        let mut c = self
            .client(&[self.members[leader].client_url.as_str()])
            .await
            .map_err(|e| failed(e.to_string()))?;
        let members = c.member_list().await.map_err(|e| failed(e.to_string()))?;
        let id = members
            .members()
            .iter()
            .find(|m| m.name() == self.members[to].name)
            .map(|m| m.id())
            .ok_or_else(|| failed("not in the member list".into()))?;
        c.move_leader(id).await.map_err(|e| failed(e.to_string()))?;
        Ok(())
    }

    /// Index of the member that is the Raft leader now, asked of each member.
    pub async fn leader(&self) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if m.process.is_none() {
                continue;
            }
            let Ok(mut c) = self.client(&[m.client_url.as_str()]).await else {
                continue;
            };
            if let Ok(status) = c.status().await
                && status.leader() == status.header().map(|h| h.member_id()).unwrap_or(0)
            {
                return Some(i);
            }
        }
        None
    }
}
