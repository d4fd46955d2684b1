//! The tern-router binary: flags and environment → logs → run, draining
//! gracefully on SIGTERM or Ctrl-C.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use tern_router::config::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    config.logs.init("tern-router");
    match tern_router::server::run(config, tern_common::process::shutdown_signal(), |_| {}).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "tern-router stopped");
            ExitCode::FAILURE
        }
    }
}
