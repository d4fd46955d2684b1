//! The tern-operator binary: flags and environment → logs → client → run,
//! stopping gracefully on SIGTERM or Ctrl-C.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use tern_operator::config::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    config.logs.init("tern-operator");
    if let Err(e) = config.validate() {
        eprintln!("tern-operator: {e}");
        return ExitCode::from(2);
    }
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no Kubernetes configuration (in-cluster or KUBECONFIG)");
            return ExitCode::FAILURE;
        }
    };
    match tern_operator::run(config, client, tern_common::process::shutdown_signal(), |_| {}).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "tern-operator stopped");
            ExitCode::FAILURE
        }
    }
}
