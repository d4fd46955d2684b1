//! What every tern binary does around its `run`: structured logs with a
//! filter, and a future that completes on SIGTERM or Ctrl-C so shutdown can
//! drain.

use tracing_subscriber::EnvFilter;

/// Installs the log subscriber: JSON lines or text, filtered by `filter`
/// (tracing's EnvFilter syntax; an invalid one falls back to `info` and says so).
pub fn init_logs(binary: &str, json: bool, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("{binary}: --log-filter `{filter}` is invalid ({e}); using `info`");
        EnvFilter::new("info")
    });
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
}

/// Completes on SIGTERM (Kubernetes stopping a pod) or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
