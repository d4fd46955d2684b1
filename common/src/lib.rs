//! What tern's router and region agent share, kept in one small crate because
//! both must agree on it byte for byte: the identifiers (validated newtypes),
//! the key layout of region groups and the directory group (DESIGN.md
//! "Keys"), the fence values and the directory records. It also holds the ops
//! endpoints (`/metrics`, `/healthz`, `/readyz`), the log set-up and the
//! OTLP trace export that every tern binary, operator included, does the
//! same way.
#![forbid(unsafe_code)]

pub mod backup;
pub mod backup_request;
pub mod drain;
pub mod duration;
pub mod etcd;
pub mod failover;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod ops;
pub mod process;
pub mod records;
pub mod telemetry;
pub mod tls;

pub use duration::parse_duration;
pub use ids::*;
pub use keys::*;
pub use records::*;

/// The wall clock as Unix time (zero before 1970): what records that say
/// when something happened (`MigrationRecord`, `WriteCountsRecord`,
/// idempotency records' expiry) are stamped with.
pub fn unix_now() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// [`unix_now`] in ms.
pub fn unix_ms() -> u64 {
    unix_now().as_millis() as u64
}

/// What can fail in the parts every binary shares: connecting to an etcd
/// group and setting up trace export. (Refused input is `InvalidInput`.)
#[derive(Debug, thiserror::Error)]
pub enum CommonError {
    /// No connection to any endpoint could be made before the deadline.
    #[error("cannot connect to the {what} etcd at {endpoints}: {source}")]
    EtcdConnect {
        what: String,
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    /// Connected, but no member answered a status call before the deadline.
    #[error("the {what} etcd at {endpoints} does not answer: {source}")]
    EtcdUnanswered {
        what: String,
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    /// A backup's file could not be written, read or deleted.
    #[error("{what}: {path}: {source}")]
    BackupIo {
        what: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The member a backup streams from refused or broke off.
    #[error("backing up the {group} group from {member}: {what}: {source}")]
    BackupEtcd {
        group: String,
        member: String,
        what: String,
        #[source]
        source: etcd_client::Error,
    },
    /// A backup is damaged, incomplete or of an unknown format.
    #[error("{0}")]
    Backup(String),
    /// A TLS directory's files are missing, malformed or do not go
    /// together (names the file and what is wrong).
    #[error("TLS: {0}")]
    Tls(String),
    /// The OTLP exporter could not be built for this endpoint.
    #[error("cannot export traces to {endpoint}: {source}")]
    TraceExport {
        endpoint: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// Why an identifier, key or value was refused. Each message names the field
/// and the rule it broke, and is shown to clients as INVALID_ARGUMENT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is {len} bytes long; the limit is {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} contains {what}, which is not allowed: {rule}")]
    Forbidden {
        field: &'static str,
        what: String,
        rule: &'static str,
    },
    #[error("{field} `{value}` is malformed: {rule}")]
    Malformed {
        field: &'static str,
        value: String,
        rule: &'static str,
    },
}
