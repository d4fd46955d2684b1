//! `tern`: the local multi-region demo (`tern demo`), a benchmark, status of
//! a deployment (`tern status`, also `kubectl tern status NAME` as the
//! kubectl plugin `kubectl-tern`), and a small client for tern's routers
//! (`tern create-account`, `tern put`, `tern get`). Both binaries call
//! [`main`].
#![forbid(unsafe_code)]

mod backup;
mod bench;
mod binaries;
mod client;
mod demo;
mod drain;
mod failover;
mod kubernetes;
mod leader;
mod migrate;
mod pin;
mod quarantine;
mod rejoin;
mod status;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// tern: a geo-partitioned, multi-region database control plane.
#[derive(Parser, Debug)]
#[command(name = "tern", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// A directory holding ca.crt, tls.crt and tls.key: talk to routers and
    /// etcd groups over TLS with this certificate (a deployment whose etcd
    /// requires client certificates, routers that require them of clients).
    #[arg(long, global = true, env = "TERN_TLS_DIR")]
    tls_dir: Option<std::path::PathBuf>,
    /// The name the router's certificate must carry, when --router is an
    /// address that is not it: a `kubectl port-forward` to the router's
    /// Service (give the Service's DNS name). Default: the --router host.
    #[arg(long, global = true, env = "TERN_TLS_SERVER_NAME", requires = "tls_dir")]
    tls_server_name: Option<String>,
}

/// The certificate of this run, from --tls-dir (the command is one
/// short-lived process: every connection it makes uses the same one), and
/// --tls-server-name.
static TLS: std::sync::OnceLock<Option<tern_common::tls::Tls>> = std::sync::OnceLock::new();
static SERVER_NAME: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// This run's TLS material, if --tls-dir was given.
pub(crate) fn tls() -> Option<&'static tern_common::tls::Tls> {
    TLS.get().and_then(Option::as_ref)
}

/// Connects to an etcd group as every command does: over TLS when
/// --tls-dir is given.
pub(crate) async fn etcd(
    endpoints: &[String],
    what: &str,
    deadline: std::time::Duration,
) -> Result<etcd_client::Client, tern_common::CommonError> {
    tern_common::etcd::connect_tls(endpoints, tls(), what, deadline).await
}

/// A client of the router at `addr`: over TLS when --tls-dir is given,
/// checking its certificate for --tls-server-name or else the host of
/// `addr`.
pub(crate) async fn router(addr: std::net::SocketAddr) -> Result<tern_api::RouterClient, CliError> {
    let name = SERVER_NAME.get().and_then(Option::as_deref);
    match (tls(), name) {
        (Some(t), Some(name)) => Ok(tern_api::RouterClient::new(t.channel_to(&addr.to_string(), name)?)),
        (Some(t), None) => Ok(tern_api::RouterClient::new(t.channel(&addr.to_string())?)),
        (None, _) => Ok(tern_api::connect(addr).await),
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a three-region deployment on this machine (etcd groups, a
    /// directory group, routers, toxiproxy links with cloud round trips),
    /// drive a workload from every region, and print what it measures.
    Demo(demo::DemoArgs),
    /// Create an account homed in a region.
    CreateAccount(client::CreateArgs),
    /// Write a value.
    Put(client::PutArgs),
    /// Read a value (strong read from the home region).
    Get(client::GetArgs),
    /// Move an account to another region (the migration protocol: fence,
    /// catch up, copy, switch), as the target region's agent carries it out.
    Migrate(migrate::MigrateArgs),
    /// Keep an account where it is: the follow-the-sun policy skips a
    /// pinned account (manual moves still move it); --unpin undoes it.
    Pin(pin::PinArgs),
    /// Fail a lost region over to a successor: shows what may be lost and
    /// asks first; refused while the region still holds its lease.
    Failover(failover::FailoverArgs),
    /// Planned switchover: move every account out of a region with the
    /// migration protocol (nothing lost); it takes no new accounts or moves
    /// in. --wait shows a progress bar.
    Drain(drain::DrainArgs),
    /// End a drain: no more moves out start, and the region takes accounts
    /// again.
    Undrain(drain::DrainArgs),
    /// Hand a region group's Raft leadership to another member before
    /// maintenance on the leader's (etcd MoveLeader: no election, writes
    /// keep flowing).
    MoveLeader(leader::MoveLeaderArgs),
    /// Let a failed-over region serve again (empty) once it is back, its
    /// losses are quarantined and its successor has re-homed its accounts.
    Rejoin(rejoin::RejoinArgs),
    /// Writes a failed region committed that its successor never had
    /// (listed when the region comes back; never applied by tern).
    Quarantine(quarantine::QuarantineArgs),
    /// Backups of a region's group or the directory's: `now` takes one
    /// (an etcd snapshot and its manifest in a directory), `list` shows them.
    Backup(backup::BackupArgs),
    /// Rebuild one member of a lost group from a backup (etcdutl snapshot
    /// restore, with revisions bumped past the lost group's); says what
    /// the backup lacks.
    Restore(backup::RestoreArgs),
    /// Per region: group members and Raft lag, mirror lag from every other
    /// region (revisions and ms), heartbeat age, clock skew.
    Status(status::StatusArgs),
    /// Measure router overhead against direct etcd and proxied-write latency
    /// against the injected round trip; prints a table and writes a report.
    Bench(bench::BenchArgs),
    /// Randomized runs of a mixed workload under injected faults, recorded
    /// as histories and judged by tern-verify's checkers (linearizability,
    /// nothing lost or applied twice, bounded staleness).
    Verify(verify::VerifyArgs),
}

/// Client URLs of a group's members: `explicit` when given; for
/// `directory`, the directory's own; else the region's members as its agent
/// published them in the directory.
pub(crate) async fn group_endpoints(
    group: &str,
    explicit: &[String],
    directory: &[String],
) -> Result<Vec<String>, CliError> {
    if !explicit.is_empty() {
        return Ok(explicit.to_vec());
    }
    if directory.is_empty() {
        return Err(CliError::Usage(format!(
            "name {group}'s group (--group URLS) or the directory (--directory URLS)"
        )));
    }
    if group == "directory" {
        return Ok(directory.to_vec());
    }
    let region = tern_common::RegionName::new(group).map_err(|e| CliError::Usage(format!("REGION: {e}")))?;
    let mut d = etcd(directory, "directory", std::time::Duration::from_secs(10)).await?;
    let key = tern_common::dir_region_key(&region);
    let found = d.get(key.clone(), None).await.map_err(|source| CliError::EtcdRequest {
        what: format!("reading {key}"),
        source,
    })?;
    let record: tern_common::RegionRecord = found
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice(kv.value()).ok())
        .ok_or_else(|| CliError::Usage(format!("REGION: no region {region} in the directory")))?;
    Ok(record.members.into_iter().map(|m| m.endpoint).collect())
}

/// Parses `args` (the program's name first) and runs the command, as the
/// command line would; for tests that drive the CLI in-process.
pub async fn run_args<I, T>(args: I) -> Result<(), CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::try_parse_from(args).map_err(|e| CliError::Usage(e.to_string()))?;
    run(cli.command).await
}

async fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Demo(args) => demo::run(args).await,
        Command::CreateAccount(args) => client::create(args).await,
        Command::Put(args) => client::put(args).await,
        Command::Get(args) => client::get(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Migrate(args) => migrate::run(args).await,
        Command::Pin(args) => pin::run(args).await,
        Command::Failover(args) => failover::run(args).await,
        Command::Drain(args) => drain::run(args, true).await,
        Command::Undrain(args) => drain::run(args, false).await,
        Command::MoveLeader(args) => leader::run(args).await,
        Command::Rejoin(args) => rejoin::run(args).await,
        Command::Quarantine(args) => quarantine::run(args).await,
        Command::Status(args) => status::run(args).await,
        Command::Backup(args) => backup::run(args).await,
        Command::Restore(args) => backup::restore(args).await,
        Command::Verify(args) => verify::run(args).await,
    }
}

/// Parses the command line and runs the command.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo, bench and verify run routers and agents in this process:
    // their logs go to stderr when asked for (RUST_LOG=tern_agent=debug),
    // and stay silent otherwise so the tables are readable.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let tls = match &cli.tls_dir {
        Some(dir) => match tern_common::tls::Tls::load(dir, tern_common::tls::ClientAuth::Required) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("tern: --tls-dir: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    if let Some(name) = &cli.tls_server_name
        && let Err(e) = tern_common::tls::check_server_name(name)
    {
        eprintln!("tern: --tls-server-name: {e}");
        return ExitCode::FAILURE;
    }
    let _ = TLS.set(tls);
    let _ = SERVER_NAME.set(cli.tls_server_name);
    match run(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Errors of the tern command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Setup(String),
    /// An etcd group could not be reached.
    #[error(transparent)]
    Etcd(#[from] tern_common::CommonError),
    /// A request to an etcd group failed.
    #[error("{what}: {source}")]
    EtcdRequest {
        what: String,
        #[source]
        source: etcd_client::Error,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The Kubernetes client could not be configured or a call failed.
    #[error("Kubernetes ({what}): {source}")]
    Kubernetes {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// Ctrl-C.
    #[error("interrupted {0}")]
    Interrupted(&'static str),
    /// Starting or driving the local deployment of `tern demo`/`tern bench`.
    #[error(transparent)]
    Local(#[from] tern_local::LocalError),
    #[error("the router answered {code:?}: {message}")]
    Rpc { code: tonic::Code, message: String },
    #[error("{0}")]
    Usage(String),
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        Self::Rpc {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}
