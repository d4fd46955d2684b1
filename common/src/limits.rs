//! Names, patterns and bounds that the CRD schema, the operator and the
//! binaries must agree on, defined once. `tern-crds` builds its schema
//! patterns and CEL range rules from these constants and the binaries check
//! their flags with the functions here, so `kubectl apply` refuses exactly
//! what a binary would refuse later at start-up.

use std::time::Duration;

pub use crate::ids::{MAX_ACCOUNT_ID, MAX_REGION_NAME};

/// An RFC 1123 DNS label (its length limit is the caller's): pod names,
/// etcd member names.
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A region name: a DNS label of at most [`MAX_REGION_NAME`] characters,
/// because it becomes part of object names, DNS names and etcd member names.
/// [`is_region_name`] is the same rule in Rust.
pub const REGION_NAME_PATTERN: &str = DNS_LABEL_PATTERN;

/// A backup's id (`crate::backup`): its group's name, a '-', and the UTC
/// time it began, to the millisecond (`eu-west-20261202T162810.805Z`).
pub const BACKUP_ID_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?-[0-9]{8}T[0-9]{6}\.[0-9]{3}Z$";

/// Whether `s` is a region name ([`REGION_NAME_PATTERN`], at most
/// [`MAX_REGION_NAME`] bytes).
pub fn is_region_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_REGION_NAME
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Longest GeoCluster name. The operator appends a region and suffixes
/// (`<cluster>-dir-<region>-config`, the StatefulSet's revision label
/// `<cluster>-dir-<region>-<10-char hash>`), which must stay within 63
/// characters with a region of [`MAX_REGION_NAME`].
pub const MAX_CLUSTER_NAME: usize = 24;

/// A GeoCluster name: an RFC 1035 label (starts with a letter, no dots),
/// because it starts the names of Services, which Kubernetes requires to be
/// RFC 1035 labels.
pub const CLUSTER_NAME_PATTERN: &str = r"^[a-z]([-a-z0-9]*[a-z0-9])?$";

/// Whether `s` is a GeoCluster name ([`CLUSTER_NAME_PATTERN`], at most
/// [`MAX_CLUSTER_NAME`] bytes).
pub fn is_cluster_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_CLUSTER_NAME
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[b.len() - 1] != b'-'
}

/// An account id's characters (see [`crate::AccountId`]; it also refuses
/// `..` and more than [`MAX_ACCOUNT_ID`] bytes).
pub const ACCOUNT_ID_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$";

/// A duration as [`crate::parse_duration`] reads it and as CEL's
/// `duration()` reads it too: number+unit pairs, units ns, us, µs, ms, s,
/// m, h, decimals with digits on both sides of the point, no sign, no spaces.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// An OTLP/gRPC endpoint: `http(s)://host[:port][/path]`, the host a name
/// or a bracketed IPv6 address. [`is_otlp_endpoint`] is the same rule in
/// Rust; anything else would fail when the exporter is built at start-up.
pub const OTLP_ENDPOINT_PATTERN: &str = r"^https?://([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/[^\s]*)?$";

/// Whether `s` matches [`OTLP_ENDPOINT_PATTERN`].
pub fn is_otlp_endpoint(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("http://").or_else(|| s.strip_prefix("https://")) else {
        return false;
    };
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    let (host_ok, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let Some((addr, tail)) = v6.split_once(']') else {
                return false;
            };
            let port = match tail {
                "" => None,
                _ => match tail.strip_prefix(':') {
                    Some(p) => Some(p),
                    None => return false,
                },
            };
            let addr_ok = !addr.is_empty() && addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.');
            (addr_ok, port)
        }
        None => {
            let (host, port) = match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            };
            let name_ok = !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            (name_ok, port)
        }
    };
    let port_ok = port.is_none_or(|p| (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok && !path.contains(char::is_whitespace)
}

/// Allowed range of a duration setting, both ends included. The ends are
/// duration strings so that the same text goes into the CRD's CEL rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurationRange {
    pub min: &'static str,
    pub max: &'static str,
}

impl DurationRange {
    /// The lower end.
    pub fn min(&self) -> Duration {
        crate::parse_duration(self.min).expect("range ends are valid durations (unit-tested)")
    }

    /// The upper end.
    pub fn max(&self) -> Duration {
        crate::parse_duration(self.max).expect("range ends are valid durations (unit-tested)")
    }

    /// Parses `text` and checks it lies in the range.
    pub fn parse(&self, text: &str) -> Result<Duration, String> {
        let d = crate::parse_duration(text)?;
        if d < self.min() || d > self.max() {
            return Err(format!("`{text}` is outside {}..={}", self.min, self.max));
        }
        Ok(d)
    }
}

/// How long a router remembers an idempotency key (GeoCluster
/// `spec.router.idempotencyRetention`, router `--idempotency-retention`).
pub const IDEMPOTENCY_RETENTION: DurationRange = DurationRange {
    min: "1s",
    max: "2160h",
};

/// Time between two scheduled backups (GeoCluster `spec.backup.every`).
pub const BACKUP_EVERY: DurationRange = DurationRange { min: "1m", max: "720h" };

/// Scheduled backups kept per group, at most.
pub const MAX_BACKUPS_KEPT: u32 = 1000;

/// Follow-the-sun counting window (`spec.followTheSun.window`).
pub const FOLLOW_THE_SUN_WINDOW: DurationRange = DurationRange {
    min: "1m",
    max: "2160h",
};

/// Least time between two moves of one account (`spec.followTheSun.cooldown`).
pub const FOLLOW_THE_SUN_COOLDOWN: DurationRange = DurationRange {
    min: "1s",
    max: "2160h",
};

/// Data-loss budget of automatic failover (`spec.failover.maxDataLossLag`):
/// above an hour an automatic failover is no longer a small loss.
pub const MAX_DATA_LOSS_LAG: DurationRange = DurationRange { min: "1ms", max: "1h" };

/// Most writes that share one etcd transaction (`spec.router.writeBatchMax`,
/// router `--write-batch-max`).
pub const WRITE_BATCH_MAX: (i32, i32) = (1, 128);

/// Group-commit transactions in flight per router
/// (`spec.router.writeBatchesInFlight`, router `--write-batches-in-flight`).
pub const WRITE_BATCHES_IN_FLIGHT: (i32, i32) = (1, 16);

/// Members of one region's data group: odd, so a majority survives the loss
/// of a minority of zones.
pub const GROUP_REPLICAS: (i32, i32) = (1, 7);

/// Members of an etcd group in all: the length limit of a RegionGroup's
/// `initialCluster`, and so of the directory group.
pub const MAX_GROUP_MEMBERS: i32 = 63;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_ends_parse_and_are_ordered() {
        for r in [
            IDEMPOTENCY_RETENTION,
            FOLLOW_THE_SUN_WINDOW,
            FOLLOW_THE_SUN_COOLDOWN,
            MAX_DATA_LOSS_LAG,
        ] {
            assert!(r.min() < r.max(), "{r:?}");
        }
        assert_eq!(IDEMPOTENCY_RETENTION.max(), Duration::from_secs(90 * 86_400));
        assert!(IDEMPOTENCY_RETENTION.parse("24h").is_ok());
        let err = IDEMPOTENCY_RETENTION.parse("500ms").expect_err("below 1s");
        assert!(err.contains("1s..=2160h"), "{err}");
        assert!(IDEMPOTENCY_RETENTION.parse("2161h").is_err());
    }

    #[test]
    fn names() {
        for ok in ["us-east", "a", "1st", "eu-west-2"] {
            assert!(is_region_name(ok), "{ok}");
        }
        for bad in ["", "US", "us_east", "-x", "x-", "a.b", "a-very-long-region-name-x"] {
            assert!(!is_region_name(bad), "{bad}");
        }
        assert!(is_cluster_name("payments"));
        for ok in [
            "http://collector:4317",
            "https://otel.example.com",
            "http://[::1]:4317/v1",
            "http://otel_c",
        ] {
            assert!(is_otlp_endpoint(ok), "{ok}");
        }
        for bad in [
            "collector:4317",
            "http://",
            "http://a b",
            "http://[::1",
            "http://c:port",
            "http://c:123456",
            "http://[]:1",
            "http://[::1]x",
        ] {
            assert!(!is_otlp_endpoint(bad), "{bad}");
        }
        for bad in ["1payments", "pay.ments", "pay-", "", &"p".repeat(25)] {
            assert!(!is_cluster_name(bad), "{bad}");
        }
    }
}
