//! Test harness for tern: real etcd and kube-apiserver processes started the
//! way controller-runtime's envtest starts them, several at once when a test
//! needs several "clusters", and torn down on drop, also when a test panics.
//!
//! The binaries come from `e2e/build-tools.sh`, which builds them from the Go
//! module proxy at pinned versions.
#![forbid(unsafe_code)]

pub mod assets;
pub mod certs;
pub mod controlplane;
pub mod dns;
pub mod etcd;
pub mod etcd_cluster;
pub mod jaeger;
pub mod local;
pub mod operator;
pub mod otlp;
pub mod process;
pub mod toxiproxy;

pub use controlplane::ControlPlane;

/// Errors of the harness. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(
        "test binary `{name}` not found at {path}: run `e2e/build-tools.sh` first (or point TERN_ASSETS at a directory that has it)"
    )]
    MissingBinary { name: String, path: String },
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
    #[error("certificate generation failed: {0}")]
    Certs(#[from] rcgen::Error),
    #[error("i/o error at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kubernetes client error: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig error: {0}")]
    Kubeconfig(String),
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("`kubectl {args}` failed: {stderr}")]
    Kubectl { args: String, stderr: String },
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// The repository root (the workspace that holds this crate).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ sits inside the repository")
        .to_path_buf()
}

/// Sends the logs of in-process components (the operator) to the test's
/// captured output, filtered by RUST_LOG (default `info`). Safe to call from
/// every test.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_runtime=warn,kube_client=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
