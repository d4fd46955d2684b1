//! What every tern binary does around its `run`: structured logs with a
//! filter, and a future that completes on SIGTERM or Ctrl-C so shutdown can
//! drain.

use tracing_subscriber::EnvFilter;

/// The log flags every tern binary takes.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "TERN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Log filter in tracing's EnvFilter syntax, e.g. `info,tern_router=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
}

/// JSON lines for log collectors, text for people.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

impl LogArgs {
    /// Installs the log subscriber these flags ask for.
    pub fn init(&self, binary: &str) {
        init_logs(binary, self.log_format == LogFormat::Json, &self.log_filter);
    }
}

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
