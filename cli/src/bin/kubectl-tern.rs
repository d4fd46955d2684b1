//! `kubectl-tern`: the same command as `tern`, found by kubectl as a plugin,
//! so `kubectl tern status NAME` works.
#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tern_cli::main().await
}
