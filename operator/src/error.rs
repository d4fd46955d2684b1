//! The operator's one error type. Each error knows whether waiting helps
//! (transient: requeue with backoff) or only a change to the object does
//! (permanent: an invalid spec).

/// Errors of the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object is valid for the schema but not for the operator; nothing
    /// will change until somebody edits it.
    #[error("invalid {kind} {name}: {reason}")]
    InvalidSpec {
        kind: &'static str,
        name: String,
        reason: String,
    },
    /// A call to the API server failed.
    #[error("kubernetes API error while {action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// Another replica holds the leader lease now.
    #[error("lost leadership: {0}")]
    LostLeadership(String),
    /// The trace exporter could not be set up.
    #[error("cannot start: {0}")]
    Startup(#[from] tern_common::CommonError),
    /// A certificate Secret that spec.tls names is missing or unusable.
    #[error("TLS Secret {secret}: {reason}")]
    Tls { secret: String, reason: String },
    /// A flag or environment variable is wrong.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A desired object could not be turned into JSON (a bug: the builders
    /// make only serialisable objects).
    #[error("cannot serialise a desired object: {0}")]
    Serialize(String),
    /// The directory group (where migrations are asked for) could not be
    /// reached or answered an error: retried.
    #[error("directory ({what}): {reason}")]
    Directory { what: String, reason: String },
    /// A Raft membership change cannot take its next step now: the group
    /// is unreachable, a member is down, or etcd refused. Retried; the
    /// reason is in the RegionGroup's status.
    #[error("membership change: {reason}")]
    Membership { reason: String },
    /// The metrics and health server could not start.
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether retrying without a change to the object can help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::InvalidSpec { .. } | Self::Config(_))
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidSpec { .. } => "invalid_spec",
            Self::Kube { .. } => "kube_api",
            Self::Finalizer(_) => "finalizer",
            Self::LostLeadership(_) => "lost_leadership",
            Self::Config(_) => "config",
            Self::Startup(_) => "startup",
            Self::Serialize(_) => "serialize",
            Self::Http { .. } => "http",
            Self::Tls { .. } => "tls",
            Self::Directory { .. } => "directory",
            Self::Membership { .. } => "membership",
        }
    }
}

/// Attaches what the operator was doing to a kube error.
pub trait KubeContext<T> {
    fn context(self, action: impl FnOnce() -> String) -> Result<T>;
}

impl<T> KubeContext<T> for Result<T, kube::Error> {
    fn context(self, action: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Kube {
            action: action(),
            source,
        })
    }
}
