//! tern-local: a multi-region tern deployment on this machine, out of the
//! real parts: etcd groups started with the operator's member flags, routers
//! and agents (in this process, or as processes of their own when their
//! binaries are given, so that they can be killed and paused), toxiproxy on
//! the cross-region links, and an OTLP receiver (or Jaeger) for their
//! traces. `tern demo`, `tern bench` and `tern verify` run it; the
//! end-to-end tests build on it.
//!
//! etcd, toxiproxy and Jaeger are external binaries found by [`assets`]: in a
//! checkout, `e2e/build-tools.sh` builds them at pinned versions.
#![forbid(unsafe_code)]

pub mod assets;
pub mod etcd_cluster;
pub mod http;
pub mod jaeger;
pub mod local;
pub mod migrations;
pub mod otlp;
pub mod pki;
pub mod process;
pub mod toxiproxy;

pub use local::{Binaries, Layout, LocalDeployment};

/// Errors of a local deployment. Each says which part failed and, where
/// there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(
        "`{name}` not found at {path}: build the pinned binaries with `e2e/build-tools.sh` in a tern checkout, \
         and name their directory with TERN_ASSETS (or `tern demo`/`tern bench --assets DIR`)"
    )]
    MissingBinary { name: String, path: String },
    #[error(
        "no directory of binaries to find `{name}` in: this tern was not built in a checkout that has them; \
         name a directory holding etcd and toxiproxy-server with TERN_ASSETS (or `tern demo`/`tern bench --assets DIR`)"
    )]
    NoAssetsDir { name: String },
    #[error(
        "`{name}` not found at {path}: build it beside `tern` (`cargo build -p {name}`; e2e/verify.sh does), \
         or name it (`tern verify --{flag} PATH`)"
    )]
    MissingTernBinary {
        name: &'static str,
        path: String,
        flag: &'static str,
    },
    #[error("could not start {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} did not become ready within {secs} s; its log follows:\n{log}")]
    NotReady { what: String, secs: u64, log: String },
    #[error("{what} exited early ({status}); its log follows:\n{log}")]
    Exited { what: String, status: String, log: String },
    #[error("i/o error at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd group {group}: {action}: {reason}")]
    Etcd {
        group: String,
        action: String,
        reason: String,
    },
    #[error("toxiproxy {request}: {reason}")]
    Toxiproxy { request: String, reason: String },
    #[error("{component} flags refused: {source}")]
    Flags {
        component: &'static str,
        #[source]
        source: clap::Error,
    },
    #[error("{component} of {region} did not start: {reason}")]
    NotStarted {
        component: &'static str,
        region: String,
        reason: String,
    },
}

pub type Result<T, E = LocalError> = std::result::Result<T, E>;

/// The tern checkout this crate was built in, when it is still there (a
/// `tern` run from its checkout builds and finds the pinned binaries in it; an
/// installed one has none and is told so).
pub fn source_checkout() -> Option<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent()?.parent()?;
    root.join("e2e/build-tools.sh").is_file().then(|| root.to_path_buf())
}
