//! Runs tern-operator in-process against a test API server, with the
//! credentials of its service account (bound only to operator/deploy/base/rbac.yaml,
//! or to an overlay's RBAC), and stops it when the guard drops.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::controlplane::{ControlPlane, client_from_kubeconfig};
use crate::{HarnessError, Result};

/// The user the API server sees for the operator's service account.
pub const OPERATOR_USER: &str = "system:serviceaccount:tern-system:tern-operator";

/// A running operator.
pub struct OperatorGuard {
    pub http_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<tern_operator::Result<()>>>,
}

impl OperatorGuard {
    /// Applies operator/deploy/base/rbac.yaml (idempotent) and starts an operator
    /// with `extra_args` as that service account. Fast lease timings keep
    /// takeover tests short.
    pub async fn start(cp: &ControlPlane, extra_args: &[&str]) -> Result<Self> {
        cp.kubectl(&["apply", "-f", "operator/deploy/base/rbac.yaml"])?;
        Self::start_installed(cp, extra_args).await
    }

    /// Starts an operator as its service account, bound to whatever RBAC
    /// the caller installed (an overlay of the bundle).
    pub async fn start_installed(cp: &ControlPlane, extra_args: &[&str]) -> Result<Self> {
        let kubeconfig = cp.user_kubeconfig(
            OPERATOR_USER,
            &["system:serviceaccounts", "system:serviceaccounts:tern-system"],
        )?;
        let client = client_from_kubeconfig(&kubeconfig).await?;
        let mut args = vec![
            "tern-operator",
            "--http-addr=127.0.0.1:0",
            "--lease-duration=4s",
            "--lease-retry=500ms",
            "--resync=60s",
            "--log-format=text",
        ];
        args.extend_from_slice(extra_args);
        let config = tern_operator::Config::try_parse_from(args).map_err(HarnessError::OperatorFlags)?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (addr_tx, addr_rx) = oneshot::channel();
        let task = tokio::spawn(tern_operator::run(
            config,
            client,
            async move {
                let _ = stop_rx.await;
            },
            move |running| {
                let _ = addr_tx.send(running.http_addr);
            },
        ));
        let http_addr = tokio::time::timeout(Duration::from_secs(10), addr_rx)
            .await
            .map_err(|_| HarnessError::OperatorNotStarted("did not start serving within 10 s"))?
            .map_err(|_| HarnessError::OperatorNotStarted("stopped before serving"))?;
        Ok(Self {
            http_addr,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// The operator's /metrics text.
    pub async fn metrics(&self) -> String {
        http_get(self.http_addr, "/metrics").await.unwrap_or_default()
    }

    /// The value of a metric line that starts with `prefix`, if present.
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        self.metrics()
            .await
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Stops gracefully (the lease is released) and returns how run() ended.
    pub async fn stop(mut self) -> Option<tern_operator::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.ok(),
            None => None,
        }
    }

    /// Kills the operator without releasing its lease, like a crashed pod.
    pub fn crash(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for OperatorGuard {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The loopback HTTP helpers of the local deployment, where tests have
/// always found them.
pub use tern_local::http::{http_get, metric};

/// Polls `check` every 100 ms until it returns `Some`, or panics with `what`
/// after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
