//! Test harness for tern: real etcd and kube-apiserver processes started the
//! way controller-runtime's envtest starts them, several at once when a test
//! needs several "clusters", and torn down on drop, also when a test panics;
//! a DNS server the tests control; the operator in-process.
//!
//! The local multi-region deployment (etcd groups, routers, agents,
//! toxiproxy, trace receivers) is product code in `tern-local`, which `tern
//! demo` runs too; its modules are re-exported here so that a test finds
//! everything under `tern_e2e`. The binaries come from `e2e/build-tools.sh`,
//! which builds them from the Go module proxy at pinned versions.
#![forbid(unsafe_code)]

pub mod certs;
pub mod controlplane;
pub mod dns;
pub mod etcd;
pub mod mirrors;
pub mod node;
pub mod operator;
pub mod scenarios;

pub use controlplane::ControlPlane;
pub use tern_local::{assets, etcd_cluster, jaeger, local, otlp, process, toxiproxy};

/// Errors of the harness. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// Finding a binary, starting or driving a process of the local
    /// deployment.
    #[error(transparent)]
    Local(#[from] tern_local::LocalError),
    #[error("could not start {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} did not become ready within {secs} s; its log follows:\n{log}")]
    NotReady { what: String, secs: u64, log: String },
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
    #[error("operator flags refused: {0}")]
    OperatorFlags(#[source] clap::Error),
    #[error("the in-process operator {0}")]
    OperatorNotStarted(&'static str),
    #[error("`kubectl {args}` failed: {stderr}")]
    Kubectl { args: String, stderr: String },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    /// A multi-cluster scenario did not see what it expects.
    #[error("scenario failed: {0}")]
    Scenario(String),
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

impl tern_local::assets::StartFailure for HarnessError {
    fn exited_early(&self) -> bool {
        matches!(self, Self::Local(e) if e.exited_early())
    }
}

/// The repository root (the workspace that holds this crate).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ sits inside the repository")
        .to_path_buf()
}

/// Sends the logs of in-process components (the operator) to the test's
/// captured output, filtered by RUST_LOG (default `info`; the harness's DNS
/// server, which logs every query at info, only warnings). Safe to call
/// from every test.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube_runtime=warn,kube_client=off,hickory_server=warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Creates an account through `region`'s router as a well-behaved client
/// does: a refusal that says the region is not serving *yet* (UNAVAILABLE
/// with `tern-region-not-serving`: its lease not confirmed at this instant,
/// as on a loaded machine right after start) changed nothing, so it is
/// retried after the delay the router asks for, for up to 20 s. Any other
/// answer is the test's to judge.
pub async fn create_account(
    d: &local::LocalDeployment,
    region: &str,
    account: &str,
    home: &str,
    allowed: &[&str],
) -> std::result::Result<(), tonic::Status> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut client = d.client(region).await;
    loop {
        let request = tern_api::pb::CreateAccountRequest {
            account: account.into(),
            home_region: home.into(),
            allowed_regions: allowed.iter().map(|a| a.to_string()).collect(),
        };
        match client.create_account(request).await {
            Ok(_) => return Ok(()),
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && s.metadata().contains_key(tern_router::error::NOT_SERVING)
                    && std::time::Instant::now() < deadline =>
            {
                let wait = s
                    .metadata()
                    .get("retry-after-ms")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(100u64);
                tracing::info!(%region, %account, status = %s.message(), "not serving yet: retrying the account's creation");
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            }
            Err(s) => return Err(s),
        }
    }
}
