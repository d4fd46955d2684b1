//! What every tern binary does around its `run`: structured logs with a
//! filter (`LogArgs`), a future that completes on SIGTERM or Ctrl-C so
//! shutdown can drain, and `Stop`, which hands that shutdown to every loop.

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

/// One shutdown future fanned out to every loop that must stop with it:
/// `stopped()` may be awaited any number of times, before or after the
/// shutdown happened.
#[derive(Clone)]
pub struct Stop {
    rx: tokio::sync::watch::Receiver<bool>,
}

impl Stop {
    /// Watches `shutdown` (on a task of its own).
    pub fn on(shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = tx.send(true);
        });
        Self { rx }
    }

    /// Completes once shutdown has begun.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
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
