//! Typed configuration from flags and environment, parsed once at start-up.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tern_common::{RegionName, limits};

/// tern-router: serves requests for accounts homed in its region from the
/// region's Raft group, and forwards the others to their home region's router.
#[derive(Parser, Clone, Debug)]
#[command(name = "tern-router", version, about, long_about = None)]
pub struct Config {
    /// The region this router serves (a DNS label, e.g. us-east).
    #[arg(long, env = "TERN_REGION", value_parser = parse_region)]
    pub region: RegionName,

    /// Address of the gRPC API.
    #[arg(long, env = "TERN_ROUTER_LISTEN", default_value = "0.0.0.0:7400")]
    pub listen: SocketAddr,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "TERN_ROUTER_HTTP_ADDR", default_value = "0.0.0.0:7401")]
    pub http_addr: SocketAddr,

    /// Client URLs of this region's etcd group, comma separated.
    #[arg(long, env = "TERN_GROUP_ENDPOINTS", value_delimiter = ',', required = true)]
    pub group_endpoints: Vec<String>,

    /// Client URLs of the directory group, comma separated.
    #[arg(long, env = "TERN_DIRECTORY_ENDPOINTS", value_delimiter = ',', required = true)]
    pub directory_endpoints: Vec<String>,

    /// host:port under which other regions reach this router; registered in
    /// the directory's region record. Unset: not registered (another process
    /// registers the region).
    #[arg(long, env = "TERN_ROUTER_ADVERTISE")]
    pub advertise: Option<String>,

    /// REGION=HOST:PORT: reach REGION's router at HOST:PORT instead of the
    /// endpoint in its region record (a proxy, or a fixed address). Repeat or
    /// comma-separate.
    #[arg(long = "peer", env = "TERN_ROUTER_PEERS", value_delimiter = ',', value_parser = parse_peer)]
    pub peers: Vec<(RegionName, String)>,

    /// Secret shared by the routers of one GeoCluster (16 to 256 visible
    /// ASCII characters): sent with every forwarded call, and required of
    /// calls that claim to be forwarded (`tern-forwarded`,
    /// `tern-origin-region`); without it such headers are ignored and
    /// counted, so clients cannot forge them. Unset: no call is trusted as
    /// forwarded (forwarding still works, the home router serves it as its
    /// own client's).
    #[arg(long, env = "TERN_PEER_TOKEN", value_parser = parse_peer_token, hide_env_values = true)]
    pub peer_token: Option<crate::peer::PeerToken>,

    /// A directory holding ca.crt, tls.crt and tls.key (a mounted
    /// cert-manager or kubernetes.io/tls Secret). Set: the gRPC API serves
    /// TLS, and the router dials etcd and other regions' routers with this
    /// certificate, checking theirs against ca.crt. The files are read again
    /// every few seconds, so a rotated certificate needs no restart. A
    /// forwarded call is trusted from a client certificate naming
    /// spiffe://tern/router/<origin region>. Unset: plain TCP everywhere.
    #[arg(long, env = "TERN_TLS_DIR")]
    pub tls_dir: Option<std::path::PathBuf>,

    /// With --tls-dir: `required` refuses, in the handshake, every client of
    /// the gRPC API without a certificate from ca.crt (the API's
    /// authentication); `optional` lets such clients in.
    #[arg(long, env = "TERN_TLS_CLIENT_AUTH", default_value = "required", value_parser = parse_client_auth, requires = "tls_dir")]
    pub tls_client_auth: tern_common::tls::ClientAuth,

    /// DNS server (IP:PORT) for resolving region endpoints; default: the
    /// system's resolver.
    #[arg(long, env = "TERN_DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,

    /// Deadline of a request that carries none, e.g. 5s.
    #[arg(long, env = "TERN_DEFAULT_DEADLINE", default_value = "5s", value_parser = parse_duration)]
    pub default_deadline: Duration,

    /// Window over which writes are counted per account and origin region
    /// (follow the sun), e.g. 24h.
    #[arg(long, env = "TERN_WRITE_COUNT_WINDOW", default_value = "24h", value_parser = parse_duration)]
    pub write_count_window: Duration,

    /// How often the write counts are published into the region's group
    /// for the agent's follow-the-sun policy, e.g. 10s.
    #[arg(long, env = "TERN_WRITE_COUNT_PUBLISH_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub write_count_publish_interval: Duration,

    /// Most accounts whose writes are counted; bounds the memory used.
    #[arg(long, env = "TERN_WRITE_COUNT_ACCOUNTS", default_value_t = 100_000)]
    pub write_count_accounts: usize,

    /// Most writes that share one etcd transaction (group commit: each
    /// keeps its own fence compare and outcome). 1 sends every write alone.
    #[arg(long, env = "TERN_WRITE_BATCH_MAX", default_value_t = 32, value_parser = clap::value_parser!(u16).range(limits::WRITE_BATCH_MAX.0 as i64..=limits::WRITE_BATCH_MAX.1 as i64))]
    pub write_batch_max: u16,

    /// How long an idempotency key is remembered: a retry with the same key
    /// within it returns the first result; after it, etcd has deleted the
    /// record and the key is new again. 1s to 2160h (90 days), e.g. 24h.
    #[arg(long, env = "TERN_IDEMPOTENCY_RETENTION", default_value = "24h", value_parser = parse_retention)]
    pub idempotency_retention: Duration,

    /// Group-commit transactions in flight at once. 1 makes the largest
    /// batches and the most writes per CPU second; raise it where a commit
    /// waits on a slow disk rather than on CPU.
    #[arg(long, env = "TERN_WRITE_BATCHES_IN_FLIGHT", default_value_t = 1, value_parser = clap::value_parser!(u8).range(limits::WRITE_BATCHES_IN_FLIGHT.0 as i64..=limits::WRITE_BATCHES_IN_FLIGHT.1 as i64))]
    pub write_batches_in_flight: u8,

    /// Send requests to the region group's Raft leader, found through its
    /// advertised client URL, instead of spreading them over every member
    /// (a follower forwards each write to the leader: more CPU and latency).
    /// Turn off when the members' advertised URLs do not reach them from
    /// the router.
    #[arg(long, env = "TERN_GROUP_LEADER_DIRECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub group_leader_direct: bool,

    /// Refuse writes and STRONG reads unless the region's elected agent has
    /// confirmed the region's lease in the directory (fail closed: a region
    /// cut off from the directory stops writing before another may take
    /// its accounts over). Turn off only for a router run without agents.
    #[arg(long, env = "TERN_REGION_LEASE", default_value_t = true, action = clap::ArgAction::Set)]
    pub region_lease: bool,

    /// Test hook: add this many ms to the router's wall clock, as the
    /// agent's flag of the same name does, to model a region whose clocks
    /// are off together. Leave 0 in production.
    #[arg(
        long,
        env = "TERN_CLOCK_OFFSET_MS",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub clock_offset_ms: i64,

    /// On shutdown, finish in-flight requests for at most this long, e.g. 10s.
    #[arg(long, env = "TERN_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    #[command(flatten)]
    pub trace: tern_common::telemetry::TraceArgs,

    /// Service instance id in traces; default: <region>-<pid>.
    #[arg(long, env = "POD_NAME")]
    pub instance: Option<String>,

    #[command(flatten)]
    pub logs: tern_common::process::LogArgs,
}

fn parse_region(s: &str) -> Result<RegionName, String> {
    RegionName::new(s).map_err(|e| e.to_string())
}

fn parse_peer(s: &str) -> Result<(RegionName, String), String> {
    let (region, endpoint) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not REGION=HOST:PORT"))?;
    let region = parse_region(region)?;
    crate::dns::split_endpoint(endpoint).map_err(|e| e.to_string())?;
    Ok((region, endpoint.to_string()))
}

fn parse_peer_token(s: &str) -> Result<crate::peer::PeerToken, String> {
    crate::peer::PeerToken::new(s)
}

fn parse_client_auth(s: &str) -> Result<tern_common::tls::ClientAuth, String> {
    match s {
        "required" => Ok(tern_common::tls::ClientAuth::Required),
        "optional" => Ok(tern_common::tls::ClientAuth::Optional),
        other => Err(format!("`{other}` is neither `required` nor `optional`")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    tern_common::parse_duration(s)
}

fn parse_retention(s: &str) -> Result<Duration, String> {
    limits::IDEMPOTENCY_RETENTION.parse(s)
}

impl Config {
    pub fn peer_map(&self) -> HashMap<RegionName, String> {
        self.peers.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let base = [
            "tern-router",
            "--group-endpoints=http://a:2379",
            "--directory-endpoints=http://d:2379",
        ];
        Config::try_parse_from(base.iter().chain(args.iter()).copied())
    }

    #[test]
    fn flags() {
        let c = parse(&[
            "--region=us-east",
            "--peer=eu-west=127.0.0.1:9000",
            "--default-deadline=250ms",
        ])
        .expect("valid");
        assert_eq!(c.region.as_str(), "us-east");
        assert_eq!(
            c.peer_map()[&RegionName::new("eu-west").expect("valid")],
            "127.0.0.1:9000"
        );
        assert_eq!(c.default_deadline, Duration::from_millis(250));
    }

    #[test]
    fn client_auth_needs_a_tls_dir() {
        let c = parse(&["--region=us-east"]).expect("the default needs no --tls-dir");
        assert!(c.tls_dir.is_none());
        let e = parse(&["--region=us-east", "--tls-client-auth=optional"])
            .expect_err("client auth without TLS")
            .to_string();
        assert!(e.contains("--tls-dir"), "{e}");
        let e = parse(&["--region=us-east", "--tls-dir=/t", "--tls-client-auth=maybe"])
            .expect_err("unknown mode")
            .to_string();
        assert!(e.contains("maybe") && e.contains("required"), "{e}");
    }

    #[test]
    fn bad_flags_name_the_flag_and_rule() {
        let e = parse(&["--region=US_EAST"]).expect_err("bad region").to_string();
        assert!(e.contains("--region") && e.contains("DNS label"), "{e}");
        let e = parse(&["--region=us-east", "--peer=eu-west"])
            .expect_err("bad peer")
            .to_string();
        assert!(e.contains("--peer") && e.contains("REGION=HOST:PORT"), "{e}");
        let e = parse(&["--region=us-east", "--default-deadline=soon"])
            .expect_err("bad duration")
            .to_string();
        assert!(e.contains("--default-deadline"), "{e}");
        let e = parse(&["--region=us-east", "--write-batch-max=0"])
            .expect_err("no writes per batch")
            .to_string();
        assert!(e.contains("--write-batch-max") && e.contains("1..=128"), "{e}");
        let e = parse(&["--region=us-east", "--idempotency-retention=500ms"])
            .expect_err("retention below a second")
            .to_string();
        assert!(e.contains("--idempotency-retention") && e.contains("1s..=2160h"), "{e}");
        let e = parse(&["--region=us-east", "--write-batches-in-flight=0"])
            .expect_err("no transactions in flight")
            .to_string();
        assert!(e.contains("--write-batches-in-flight") && e.contains("1..=16"), "{e}");
        let e = parse(&["--region=us-east", "--group-leader-direct=maybe"])
            .expect_err("not a boolean")
            .to_string();
        assert!(e.contains("--group-leader-direct") && e.contains("maybe"), "{e}");
        let e = parse(&["--region=us-east", "--peer-token=short"])
            .expect_err("a short token")
            .to_string();
        assert!(e.contains("--peer-token") && e.contains("16 to 256"), "{e}");
        assert!(
            !e.contains("short\n"),
            "the value is not echoed beyond clap's own line: {e}"
        );
        let e = parse(&["--region=us-east", "--trace-sampling-ratio=2"])
            .expect_err("ratio above 1")
            .to_string();
        assert!(
            e.contains("--trace-sampling-ratio") && e.contains("between 0 and 1"),
            "{e}"
        );
    }
}
