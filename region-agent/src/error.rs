//! The agent's one error type.

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("etcd ({what}): {source}")]
    Etcd {
        what: String,
        #[source]
        source: etcd_client::Error,
    },
    /// Another agent of this region leads now; this one must not act.
    #[error("lost leadership of region {0}")]
    NotLeader(String),
    /// The region's lease key in the directory is not this agent's claim:
    /// held by a newer leader (this agent is deposed) or expired (`holder`
    /// None). Directory writes are refused until the agent claims it again.
    #[error("region {region}'s directory lease is held by {}, leadership revision {leadership}", holder.as_deref().unwrap_or("nobody"))]
    DirectoryLeaseLost {
        region: String,
        holder: Option<String>,
        leadership: i64,
    },
    /// The region was failed over: its lease key holds the failover's
    /// tombstone, and no agent of it may speak for it until it rejoins.
    #[error("region {region} was failed over to {successor}; it serves nothing until it rejoins")]
    FailedOver { region: String, successor: String },
    /// The region is held (`/tern/dir/holds/{region}`): its agent claims
    /// no lease, and its routers commit nothing, until the hold goes.
    #[error("region {region} is held by {by} ({reason}); it serves nothing until the hold is lifted")]
    Held { region: String, by: String, reason: String },
    #[error("source {source_region} compacted past revision {revision}; resynchronising from a snapshot")]
    Compacted { source_region: String, revision: i64 },
    /// A record this agent reads could not be parsed.
    #[error("malformed record {key}: {detail}")]
    Malformed { key: String, detail: String },
    /// The watch of a source ended without compaction (closed by the link
    /// or the server, or canceled): it is started again from the applied
    /// record.
    #[error("the watch of {source_region} ended: {reason}")]
    WatchEnded { source_region: String, reason: String },
    /// The mirror's applied record changed under this agent while it still
    /// leads (a previous leader's last write landed): the stream restarts
    /// from the record.
    #[error("the applied record of the mirror of {source_region} changed under this agent")]
    AppliedRecordMoved { source_region: String },
    /// A heartbeat write did not answer in time (the group electing a
    /// leader); the next tick writes again.
    #[error("a heartbeat write took longer than {0:?}")]
    HeartbeatTimedOut(std::time::Duration),
    /// A migration step could not go on (the source unreachable, a record
    /// malformed); the intent record keeps the step and it is tried again.
    #[error("migration {id}: {reason}")]
    Migration { id: String, reason: String },
    /// A test build's failpoint was reached: the agent stops leading as if
    /// it had crashed there.
    #[error("failpoint {0} reached")]
    Failpoint(String),
    /// Flags that contradict each other.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An etcd group or the trace exporter could not be set up.
    #[error("cannot start: {0}")]
    Startup(#[from] tern_common::CommonError),
    /// The Kubernetes client could not be configured.
    #[error("Kubernetes client ({what}): {source}")]
    Kubernetes {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The ops endpoints could not listen.
    #[error("cannot serve ops endpoints on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = AgentError> = std::result::Result<T, E>;

/// Attaches what the agent was doing to an etcd error.
pub trait EtcdContext<T> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> EtcdContext<T> for std::result::Result<T, etcd_client::Error> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| AgentError::Etcd { what: what(), source })
    }
}
