//! The command line of one etcd member, computed by a pure function. The
//! operator uses it for the StatefulSets it deploys and `tern demo` for the
//! local processes it starts, so both run the same configuration.

use tern_crds::ClusterMember;

/// Whether a member bootstraps a new cluster or joins a running one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterState {
    New,
    Existing,
}

/// Everything that distinguishes one member's command line.
#[derive(Clone, Debug)]
pub struct MemberConfig<'a> {
    /// Member name; in a StatefulSet `$(POD_NAME)`, which Kubernetes expands.
    pub name: &'a str,
    pub data_dir: &'a str,
    /// Addresses the member listens on.
    pub listen_client_urls: &'a str,
    pub listen_peer_urls: &'a str,
    /// Address of the metrics and health endpoints (`/metrics`, `/readyz`).
    pub listen_metrics_urls: Option<&'a str>,
    /// Addresses other members and clients use.
    pub advertise_client_urls: &'a str,
    pub advertise_peer_urls: &'a str,
    /// Every member of the group at bootstrap.
    pub initial_cluster: &'a [ClusterMember],
    pub cluster_token: &'a str,
    pub state: ClusterState,
    /// Raft tuning: about one round trip between members for the heartbeat,
    /// at least five heartbeats (ten across regions) for the election timeout.
    pub heartbeat_interval_ms: i32,
    pub election_timeout_ms: i32,
    /// Tests and the local demo only: skip fsync.
    pub unsafe_no_fsync: bool,
    /// A directory with `ca.crt`, `tls.crt` and `tls.key` (a mounted
    /// cert-manager Secret): clients and peers then speak TLS and must show
    /// a certificate from that CA, so nothing but tern's components reach
    /// the group. The URLs above must then be https://.
    pub tls_dir: Option<&'a str>,
}

/// Most operations in one transaction. A migration copies an account's keys
/// into the target's home area in one transaction where it fits, so the
/// default of 128 is raised.
pub const MAX_TXN_OPS: u32 = 1024;

/// The etcd arguments of a member.
pub fn member_args(m: &MemberConfig<'_>) -> Vec<String> {
    let initial_cluster = m
        .initial_cluster
        .iter()
        .map(|p| format!("{}={}", p.name, p.peer_url))
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec![
        format!("--name={}", m.name),
        format!("--data-dir={}", m.data_dir),
        format!("--listen-client-urls={}", m.listen_client_urls),
        format!("--advertise-client-urls={}", m.advertise_client_urls),
        format!("--listen-peer-urls={}", m.listen_peer_urls),
        format!("--initial-advertise-peer-urls={}", m.advertise_peer_urls),
        format!("--initial-cluster={initial_cluster}"),
        format!("--initial-cluster-token={}", m.cluster_token),
        format!(
            "--initial-cluster-state={}",
            match m.state {
                ClusterState::New => "new",
                ClusterState::Existing => "existing",
            }
        ),
        format!("--heartbeat-interval={}", m.heartbeat_interval_ms),
        format!("--election-timeout={}", m.election_timeout_ms),
        format!("--max-txn-ops={MAX_TXN_OPS}"),
        // Mirrors resume from their last applied revision; an hour of history
        // lets an agent restart without a full resync.
        "--auto-compaction-mode=periodic".to_string(),
        "--auto-compaction-retention=1h".to_string(),
        "--logger=zap".to_string(),
        "--log-level=warn".to_string(),
    ];
    if let Some(metrics) = m.listen_metrics_urls {
        args.push(format!("--listen-metrics-urls={metrics}"));
    }
    if m.unsafe_no_fsync {
        args.push("--unsafe-no-fsync".to_string());
    }
    if let Some(dir) = m.tls_dir {
        // etcd reads the certificate and key at every handshake: a renewed
        // Secret takes effect without a restart. It reads the CA file once,
        // at start: a new CA needs the members restarted (docs/security.md).
        for side in ["", "peer-"] {
            args.push(format!("--{side}cert-file={dir}/tls.crt"));
            args.push(format!("--{side}key-file={dir}/tls.key"));
            args.push(format!("--{side}trusted-ca-file={dir}/ca.crt"));
            args.push(format!("--{side}client-cert-auth"));
        }
        // Members share one certificate named by DNS wildcards, which etcd
        // cannot match against a connecting peer's IP address (it would
        // refuse every peer); the CA still vouches for each of them.
        args.push("--peer-skip-client-san-verification".to_string());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_list_every_peer_and_the_tuning() {
        let peers = vec![
            ClusterMember {
                name: "a".into(),
                peer_url: "http://a:2380".into(),
            },
            ClusterMember {
                name: "b".into(),
                peer_url: "http://b:2380".into(),
            },
        ];
        let args = member_args(&MemberConfig {
            name: "a",
            data_dir: "/d",
            listen_client_urls: "http://0.0.0.0:2379",
            listen_peer_urls: "http://0.0.0.0:2380",
            listen_metrics_urls: None,
            advertise_client_urls: "http://a:2379",
            advertise_peer_urls: "http://a:2380",
            initial_cluster: &peers,
            cluster_token: "tok",
            state: ClusterState::New,
            heartbeat_interval_ms: 100,
            election_timeout_ms: 1000,
            unsafe_no_fsync: false,
            tls_dir: None,
        });
        assert!(args.contains(&"--initial-cluster=a=http://a:2380,b=http://b:2380".to_string()));
        assert!(args.contains(&"--heartbeat-interval=100".to_string()));
        assert!(args.contains(&"--election-timeout=1000".to_string()));
        assert!(args.contains(&"--initial-cluster-state=new".to_string()));
        assert!(!args.iter().any(|a| a.contains("no-fsync")));
    }
}
