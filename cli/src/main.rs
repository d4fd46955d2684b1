//! The `tern` command.
#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tern_cli::main().await
}
