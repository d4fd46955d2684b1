//! Typed configuration from flags and environment, parsed once at start-up.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tern_common::RegionName;

/// tern-agent: the region agent. One agent per region is active (elected
/// through the region's own etcd group); it heartbeats into its group,
/// mirrors every other region's group into its own, measures replication lag
/// and publishes it.
#[derive(Parser, Clone, Debug)]
#[command(name = "tern-agent", version, about, long_about = None)]
pub struct Config {
    /// The region this agent serves (a DNS label, e.g. us-east).
    #[arg(long, env = "TERN_REGION", value_parser = parse_region)]
    pub region: RegionName,

    /// Client URLs of this region's etcd group, comma separated.
    #[arg(long, env = "TERN_GROUP_ENDPOINTS", value_delimiter = ',', required = true)]
    pub group_endpoints: Vec<String>,

    /// Client URLs of the directory group, comma separated.
    #[arg(long, env = "TERN_DIRECTORY_ENDPOINTS", value_delimiter = ',', required = true)]
    pub directory_endpoints: Vec<String>,

    /// A directory holding ca.crt, tls.crt and tls.key (a mounted
    /// cert-manager or kubernetes.io/tls Secret). Set: the agent dials every
    /// etcd group (its own, the directory, the regions it mirrors) over TLS
    /// with this certificate and checks theirs against ca.crt; the files
    /// are read again every few seconds, so a rotated certificate needs no
    /// restart. Unset: plain TCP.
    #[arg(long, env = "TERN_TLS_DIR")]
    pub tls_dir: Option<std::path::PathBuf>,

    /// REGION=URL[|URL...]: a region to mirror and its group's client URLs.
    /// Repeat for every other region.
    #[arg(long = "source", env = "TERN_AGENT_SOURCES", value_delimiter = ',', value_parser = parse_source)]
    pub sources: Vec<(RegionName, Vec<String>)>,

    /// How often the agent heartbeats into its own group, e.g. 100ms.
    #[arg(long, env = "TERN_HEARTBEAT_INTERVAL", default_value = "100ms", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// How often lag is published to the directory, e.g. 1s.
    #[arg(long, env = "TERN_PUBLISH_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub publish_interval: Duration,

    /// TTL of the leadership lease in seconds: a standby takes over at most
    /// this long after the active agent dies.
    #[arg(long, env = "TERN_ELECTION_TTL", default_value_t = 3)]
    pub election_ttl: i64,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "TERN_AGENT_HTTP_ADDR", default_value = "0.0.0.0:7402")]
    pub http_addr: SocketAddr,

    /// `host:port` at which this agent's HTTP endpoint is reached by the
    /// region's routers (they ask it until when the region's lease is
    /// valid). Default: --http-addr, with an unspecified address replaced by
    /// $POD_IP (Kubernetes) or 127.0.0.1.
    #[arg(long, env = "TERN_AGENT_ADVERTISE_HTTP")]
    pub advertise_http: Option<String>,

    /// Safety margin taken off the region's lease validity before routers
    /// are told it (for clock rate drift and a write in flight), and waited
    /// by a successor after the lease key disappears before it fails the
    /// region over. Less than half the --election-ttl.
    #[arg(long, env = "TERN_LEASE_MARGIN", default_value = "500ms", value_parser = parse_duration)]
    pub lease_margin: Duration,

    /// `manual` (default): a lost region is failed over only by an
    /// operator (`tern failover`). `automatic`: this agent fails a lost
    /// region over when it is that region's first live successor (see
    /// --failover-order), within the data-loss budget.
    #[arg(long, env = "TERN_FAILOVER_MODE", default_value = "manual", value_parser = ["manual", "automatic"])]
    pub failover_mode: String,

    /// Successors of a region, most preferred first: REGION=SUCCESSOR|...,
    /// repeated or comma-separated. A region without an order is never
    /// failed over automatically.
    #[arg(long = "failover-order", env = "TERN_FAILOVER_ORDER", value_delimiter = ',', value_parser = parse_order)]
    pub failover_order: Vec<(RegionName, Vec<RegionName>)>,

    /// Data-loss budget of automatic failover: refused while the lost
    /// region's mirror here was last measured further behind than this
    /// (lag plus its error bound).
    #[arg(long, env = "TERN_MAX_DATA_LOSS_LAG", default_value = "5s", value_parser = parse_duration)]
    pub max_data_loss_lag: Duration,

    /// Identity in the election; the pod name in Kubernetes.
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub identity: String,

    /// A clock offset to a source region larger than this (beyond its error
    /// bound) is a warning of its own: a metric, a log line and, with
    /// --geocluster, an event. Lag stays corrected by the offset.
    #[arg(long, env = "TERN_MAX_CLOCK_OFFSET", default_value = "500ms", value_parser = parse_duration)]
    pub max_clock_offset: Duration,

    /// Test hook: add this many ms to the agent's wall clock, to test clock
    /// skew between regions. Leave 0 in production.
    #[arg(
        long,
        env = "TERN_CLOCK_OFFSET_MS",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub clock_offset_ms: i64,

    /// Most migrations this agent starts into its region per minute (moves
    /// of accounts homed elsewhere to here); more wait their turn.
    #[arg(long, env = "TERN_MIGRATIONS_PER_MINUTE", default_value_t = 60)]
    pub migrations_per_minute: u32,

    /// While this region drains: most moves out of it asked for per minute
    /// (the targets' --migrations-per-minute does not apply to them).
    #[arg(long, env = "TERN_DRAIN_MOVES_PER_MINUTE", default_value_t = 600, value_parser = clap::value_parser!(u32).range(1..))]
    pub drain_moves_per_minute: u32,

    /// While this region drains: most of its moves under way at once.
    #[arg(long, env = "TERN_DRAIN_PARALLEL", default_value_t = 16, value_parser = parse_parallel)]
    pub drain_parallel: usize,

    /// A migration is refused unless this region's mirror of the source
    /// streams with a lag under this, e.g. 5s: the account's writes would
    /// wait that long for the mirror to catch up.
    #[arg(long, env = "TERN_MIGRATION_MAX_LAG", default_value = "5s", value_parser = parse_duration)]
    pub migration_max_lag: Duration,

    /// How long a migration waits for the mirror to reach the fence before
    /// it is rolled back (the account unfenced where it was).
    #[arg(long, env = "TERN_MIGRATION_CATCH_UP_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub migration_catch_up_timeout: Duration,

    /// How long after a move out of this region completed the account's
    /// data and idempotency records here are deleted (its fence stays, to
    /// tell stale routers where it went), e.g. 10m.
    #[arg(long, env = "TERN_MOVED_CLEANUP_DELAY", default_value = "10m", value_parser = parse_duration)]
    pub moved_cleanup_delay: Duration,

    /// Follow the sun: move accounts homed here to the region their writes
    /// come from (GeoCluster `spec.followTheSun.enabled`).
    #[arg(long, env = "TERN_FOLLOW_THE_SUN")]
    pub follow_the_sun: bool,

    /// Writes from one region within the window before a move is considered.
    #[arg(long, env = "TERN_FOLLOW_THE_SUN_THRESHOLD", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub follow_the_sun_threshold: u64,

    /// The window writes are counted over, e.g. 24h (the routers'
    /// --write-count-window should match).
    #[arg(long, env = "TERN_FOLLOW_THE_SUN_WINDOW", default_value = "24h", value_parser = parse_duration)]
    pub follow_the_sun_window: Duration,

    /// Least time between two moves of one account, e.g. 1h.
    #[arg(long, env = "TERN_FOLLOW_THE_SUN_COOLDOWN", default_value = "1h", value_parser = parse_duration)]
    pub follow_the_sun_cooldown: Duration,

    /// Only explain the moves that would be made (logs, events, metrics).
    #[arg(long, env = "TERN_FOLLOW_THE_SUN_DRY_RUN")]
    pub follow_the_sun_dry_run: bool,

    /// Most automatic moves out of this region per minute.
    #[arg(long, env = "TERN_FOLLOW_THE_SUN_MAX_PER_MINUTE", default_value_t = 6)]
    pub follow_the_sun_max_per_minute: u32,

    /// How often the policy looks at the counts, e.g. 10s.
    #[arg(long, env = "TERN_FOLLOW_THE_SUN_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub follow_the_sun_interval: Duration,

    /// Scheduled backups: while this agent leads, a backup (etcd snapshot
    /// and manifest, as `tern backup now` writes) of the region's group
    /// goes into DIR/<region>/ every --backup-every. Unset: none.
    #[arg(long, env = "TERN_AGENT_BACKUP_DIR", value_name = "DIR")]
    pub backup_dir: Option<std::path::PathBuf>,

    /// Time between two scheduled backups, e.g. 1h (at least 1s).
    #[arg(long, env = "TERN_AGENT_BACKUP_EVERY", default_value = "1h", value_parser = parse_backup_every)]
    pub backup_every: Duration,

    /// Scheduled backups kept per group; older ones are deleted.
    #[arg(long, env = "TERN_AGENT_BACKUP_KEEP", default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..))]
    pub backup_keep: u32,

    /// Back up the directory group as well (into DIR/directory/): one
    /// region's agent should (the operator picks the first region listed).
    #[arg(long, env = "TERN_AGENT_BACKUP_DIRECTORY_GROUP", requires = "backup_dir")]
    pub backup_directory_group: bool,

    /// Test hook, only in builds with the `failpoints` feature: stop
    /// leading (as a crash would) once, on reaching this named step of a
    /// migration (see `migrate.rs`).
    #[cfg(feature = "failpoints")]
    #[arg(long, env = "TERN_FAILPOINT")]
    pub failpoint: Option<String>,

    /// The GeoCluster whose status this agent writes its region's lag into
    /// (own field manager, own fields). Unset: no Kubernetes publishing.
    #[arg(long, env = "TERN_GEOCLUSTER")]
    pub geocluster: Option<String>,

    /// Namespace of --geocluster.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Kubeconfig for --geocluster; unset: in-cluster configuration or
    /// $KUBECONFIG.
    #[arg(long)]
    pub kubeconfig: Option<std::path::PathBuf>,

    #[command(flatten)]
    pub trace: tern_common::telemetry::TraceArgs,

    #[command(flatten)]
    pub logs: tern_common::process::LogArgs,
}

fn parse_region(s: &str) -> Result<RegionName, String> {
    RegionName::new(s).map_err(|e| e.to_string())
}

fn parse_backup_every(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("`{s}` is less than 1s between backups"));
    }
    Ok(d)
}

fn parse_parallel(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=256).contains(&n) => Ok(n),
        _ => Err(format!("`{s}` is not a number of moves from 1 to 256")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    tern_common::parse_duration(s)
}

fn parse_order(s: &str) -> Result<(RegionName, Vec<RegionName>), String> {
    let (region, order) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not REGION=SUCCESSOR[|SUCCESSOR...]"))?;
    let region = parse_region(region)?;
    let order = order
        .split('|')
        .filter(|o| !o.is_empty())
        .map(parse_region)
        .collect::<Result<Vec<_>, _>>()?;
    if order.is_empty() {
        return Err(format!("`{s}`: name at least one successor"));
    }
    if order.contains(&region) {
        return Err(format!("`{s}`: region {region} cannot be its own successor"));
    }
    Ok((region, order))
}

fn parse_source(s: &str) -> Result<(RegionName, Vec<String>), String> {
    let (region, urls) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not REGION=URL[|URL...]"))?;
    let urls: Vec<String> = urls.split('|').filter(|u| !u.is_empty()).map(str::to_string).collect();
    if urls.is_empty()
        || urls
            .iter()
            .any(|u| !u.starts_with("http://") && !u.starts_with("https://"))
    {
        return Err(format!("`{s}`: every URL must start with http:// or https://"));
    }
    Ok((parse_region(region)?, urls))
}

impl Config {
    /// Where routers reach this agent's HTTP endpoint, bound at `bound`.
    pub fn advertised_http(&self, bound: SocketAddr) -> String {
        if let Some(a) = &self.advertise_http {
            return a.clone();
        }
        if !bound.ip().is_unspecified() {
            return bound.to_string();
        }
        match std::env::var("POD_IP") {
            Ok(ip) if !ip.is_empty() => format!("{ip}:{}", bound.port()),
            _ => format!("127.0.0.1:{}", bound.port()),
        }
    }

    pub fn identity(&self) -> String {
        if self.identity.is_empty() {
            format!("{}-agent-{}", self.region, std::process::id())
        } else {
            self.identity.clone()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.sources.iter().any(|(r, _)| *r == self.region) {
            return Err(format!("--source: region {} cannot mirror itself", self.region));
        }
        if self.election_ttl < 2 {
            return Err("--election-ttl must be at least 2 seconds".into());
        }
        if self.lease_margin.is_zero() || self.lease_margin * 2 >= Duration::from_secs(self.election_ttl as u64) {
            return Err(format!(
                "--lease-margin {:?} must be more than 0 and less than half the --election-ttl ({} s)",
                self.lease_margin, self.election_ttl
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let base = [
            "tern-agent",
            "--group-endpoints=http://a:2379",
            "--directory-endpoints=http://d:2379",
        ];
        Config::try_parse_from(base.iter().chain(args.iter()).copied())
    }

    #[test]
    fn sources_and_durations() {
        let c = parse(&[
            "--region=us-east",
            "--source=eu-west=http://e1:2379|http://e2:2379",
            "--heartbeat-interval=50ms",
        ])
        .expect("valid");
        assert_eq!(c.sources[0].1.len(), 2);
        assert_eq!(c.heartbeat_interval, Duration::from_millis(50));
        c.validate().expect("valid");
        let e = parse(&["--region=us-east", "--source=eu-west=e1:2379"])
            .expect_err("no scheme")
            .to_string();
        assert!(e.contains("--source") && e.contains("http://"), "{e}");
        let c = parse(&["--region=us-east", "--source=us-east=http://x:1"]).expect("parses");
        assert!(c.validate().expect_err("self").contains("itself"));
        let c = parse(&["--region=us-east", "--failover-order=eu-west=us-east|ap-south"]).expect("valid");
        assert_eq!(c.failover_order[0].1.len(), 2);
        let e = parse(&["--region=us-east", "--failover-order=eu-west=eu-west"])
            .expect_err("own successor")
            .to_string();
        assert!(e.contains("own successor"), "{e}");
        let c = parse(&["--region=us-east", "--election-ttl=2", "--lease-margin=1s"]).expect("parses");
        assert!(c.validate().expect_err("margin").contains("--lease-margin"));
    }
}
