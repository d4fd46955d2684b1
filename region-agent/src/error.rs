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
    #[error("source {source_region} compacted past revision {revision}; resynchronising from a snapshot")]
    Compacted { source_region: String, revision: i64 },
    #[error("malformed record {key}: {detail}")]
    Malformed { key: String, detail: String },
    #[error("{0}")]
    Config(String),
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
