//! The tern-agent binary: flags and environment → logs → run, stepping down
//! on SIGTERM or Ctrl-C.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use tern_agent::config::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(e) = config.validate() {
        eprintln!("tern-agent: {e}");
        return ExitCode::from(2);
    }
    config.logs.init("tern-agent");
    match tern_agent::run(config, tern_common::process::shutdown_signal(), |_| {}).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "tern-agent stopped");
            ExitCode::FAILURE
        }
    }
}
