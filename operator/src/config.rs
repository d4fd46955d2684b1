//! Typed configuration from flags and environment, parsed once at start-up.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tern_common::parse_duration;

use crate::regions::RegionFilter;
use crate::{Error, Result};

/// tern-operator: provisions tern's per-region Raft groups (etcd clusters) and
/// the global directory group from GeoCluster resources.
#[derive(Parser, Clone, Debug)]
#[command(name = "tern-operator", version, about, long_about = None)]
pub struct Config {
    /// Regions this operator manages, comma separated. Empty: every region of
    /// every GeoCluster. In a multi-cluster deployment each cluster's operator
    /// names its own region(s) and the same GeoCluster is applied everywhere.
    #[arg(long, env = "TERN_OPERATOR_REGIONS", value_delimiter = ',')]
    pub regions: Vec<String>,

    /// Watch only this namespace. Empty: all namespaces.
    #[arg(long, env = "TERN_OPERATOR_NAMESPACE", default_value = "")]
    pub namespace: String,

    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "TERN_OPERATOR_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Elect a leader among replicas through a Lease, so that only one
    /// reconciles. Turn off only when exactly one replica can ever run.
    #[arg(long, env = "TERN_OPERATOR_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tern-system")]
    pub leader_election_namespace: String,

    /// Name of the leader-election Lease. Operators with different --regions
    /// in one cluster need different names.
    #[arg(long, env = "TERN_OPERATOR_LEASE_NAME", default_value = "tern-operator")]
    pub leader_election_id: String,

    /// How long the lease stays valid without renewal, e.g. 15s. A standby
    /// takes over at most this long after the leader dies.
    #[arg(long, env = "TERN_OPERATOR_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// How often the leader renews the lease and a standby retries, e.g. 2s.
    #[arg(long, env = "TERN_OPERATOR_LEASE_RETRY", default_value = "2s", value_parser = parse_duration)]
    pub lease_retry: Duration,

    /// Identity in the lease and in events; the pod name in Kubernetes.
    #[arg(long, env = "POD_NAME", default_value = "")]
    pub identity: String,

    /// Reconcile every object at least this often, to repair drift, e.g. 5m.
    #[arg(long, env = "TERN_OPERATOR_RESYNC", default_value = "5m", value_parser = parse_duration)]
    pub resync: Duration,

    /// Router image for GeoClusters whose spec.router.image is unset.
    #[arg(long, env = "TERN_ROUTER_IMAGE", default_value = crate::build::components::DEFAULT_IMAGE)]
    pub router_image: String,

    /// Agent image for GeoClusters whose spec.agent.image is unset.
    #[arg(long, env = "TERN_AGENT_IMAGE", default_value = crate::build::components::DEFAULT_AGENT_IMAGE)]
    pub agent_image: String,

    /// Client URLs of the directory group, comma separated, for carrying
    /// out AccountMigrations; default: the GeoCluster's directory Services
    /// (an operator outside the cluster's network needs this).
    #[arg(long, env = "TERN_OPERATOR_DIRECTORY_ENDPOINTS", value_delimiter = ',')]
    pub directory_endpoints: Vec<String>,

    /// Moves the agents decide themselves (follow the sun) are recorded as
    /// AccountMigration objects (label tern.dev/trigger=follow-the-sun),
    /// the newest this many per GeoCluster; 0 records none.
    #[arg(long, env = "TERN_OPERATOR_AUTOMATIC_MIGRATION_HISTORY", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub automatic_migration_history: u32,

    #[command(flatten)]
    pub trace: tern_common::telemetry::TraceArgs,

    #[command(flatten)]
    pub logs: tern_common::process::LogArgs,
}

impl Config {
    /// Checks what clap cannot, with errors that name the flag.
    pub fn validate(&self) -> Result<()> {
        if let Some(bad) = self.regions.iter().find(|r| !tern_common::limits::is_region_name(r)) {
            return Err(Error::Config(format!(
                "--regions: `{bad}` is not a region name (a DNS label of at most 20 characters: lower-case letters, digits, '-')"
            )));
        }
        if self.lease_retry >= self.lease_duration {
            return Err(Error::Config(format!(
                "--lease-retry ({:?}) must be shorter than --lease-duration ({:?})",
                self.lease_retry, self.lease_duration
            )));
        }
        Ok(())
    }

    pub fn region_filter(&self) -> RegionFilter {
        RegionFilter::only(self.regions.iter().filter(|r| !r.is_empty()).cloned())
    }

    /// The identity in the lease: the flag, else the host name plus the pid.
    pub fn identity(&self) -> String {
        if !self.identity.is_empty() {
            return self.identity.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "tern-operator".into());
        format!("{}-{}", host.trim(), std::process::id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("tern-operator").chain(args.iter().copied()))
    }

    #[test]
    fn flags_parse_and_validate() {
        let c = parse(&["--regions=us-east,eu-west", "--lease-duration=10s"]).expect("valid flags");
        c.validate().expect("valid config");
        assert!(c.region_filter().contains("us-east"));
        assert!(!c.region_filter().contains("ap-south"));
        assert_eq!(c.lease_duration, Duration::from_secs(10));
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let err = parse(&["--regions=US_East"])
            .expect("clap accepts strings")
            .validate()
            .expect_err("bad region");
        assert!(
            err.to_string().contains("--regions") && err.to_string().contains("US_East"),
            "{err}"
        );
        let err = parse(&["--lease-duration=soon"]).expect_err("bad duration");
        assert!(err.to_string().contains("--lease-duration"), "{err}");
        let err = parse(&["--lease-duration=2s", "--lease-retry=3s"])
            .expect("parses")
            .validate()
            .expect_err("retry too long");
        assert!(err.to_string().contains("--lease-retry"), "{err}");
    }
}
