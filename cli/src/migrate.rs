//! `tern migrate ACCOUNT --to REGION`: asks the target region's agent to
//! move an account there (an intent record in the directory, DESIGN.md
//! "Migration protocol") and, with `--wait`, follows it to the end.

use std::time::Duration;

use clap::Args;
use tern_common::{AccountId, MigrationId, MigrationPhase, MigrationRecord, RegionName};
use tern_local::migrations;

use crate::CliError;

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The account to move.
    account: String,
    /// The region to move it to (its agent carries the move out).
    #[arg(long)]
    to: String,
    /// Compare-and-swap: refuse unless the account is homed here when the
    /// move starts.
    #[arg(long)]
    expect_from: Option<String>,
    /// Why, for the audit trail (kept in the intent record).
    #[arg(long, default_value = "manual")]
    reason: String,
    /// The migration's id; asking twice with one id moves the account once.
    /// Default: `cli-ACCOUNT-UNIXMS`.
    #[arg(long)]
    id: Option<String>,
    /// Follow the move until it completes, is refused or rolled back; the
    /// exit status says which.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, e.g. 60s.
    #[arg(long, default_value = "60s", value_parser = tern_common::parse_duration)]
    timeout: Duration,
    /// Client URLs of the directory group (printed by `tern demo --keep`).
    #[arg(long, env = "TERN_DIRECTORY_ENDPOINTS", value_delimiter = ',', required = true)]
    directory: Vec<String>,
}

pub async fn run(args: MigrateArgs) -> Result<(), CliError> {
    let account = AccountId::new(&args.account).map_err(|e| CliError::Usage(format!("ACCOUNT: {e}")))?;
    let to = RegionName::new(&args.to).map_err(|e| CliError::Usage(format!("--to: {e}")))?;
    let expect_from = args
        .expect_from
        .as_deref()
        .map(RegionName::new)
        .transpose()
        .map_err(|e| CliError::Usage(format!("--expect-from: {e}")))?;
    if expect_from.as_ref() == Some(&to) {
        return Err(CliError::Usage(format!(
            "--expect-from and --to are both {to}: the account would not move"
        )));
    }
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("cli-{account}-{}", tern_common::unix_ms()));
    let id = MigrationId::new(id).map_err(|e| CliError::Usage(format!("--id: {e}")))?;
    let directory = tern_common::etcd::connect(&args.directory, "directory", Duration::from_secs(10)).await?;
    let created = migrations::request(&directory, &id, &account, &to, expect_from, &args.reason).await?;
    if created {
        println!("migration {id}: {account} to {to} requested");
    } else {
        println!("migration {id} exists already; following it");
    }
    if !args.wait {
        return Ok(());
    }
    let done = migrations::wait(&directory, &id, args.timeout, |r| println!("  {}", describe(r))).await?;
    match done.phase {
        MigrationPhase::Completed => Ok(()),
        _ => Err(CliError::Setup(format!(
            "migration {id} {}: {}",
            phase_name(done.phase),
            done.message.as_deref().unwrap_or("no reason given")
        ))),
    }
}

fn phase_name(p: MigrationPhase) -> &'static str {
    match p {
        MigrationPhase::Requested => "requested",
        MigrationPhase::Fencing => "fencing",
        MigrationPhase::Switching => "switching",
        MigrationPhase::Completed => "completed",
        MigrationPhase::RollingBack => "rolling back",
        MigrationPhase::RolledBack => "rolled back",
        MigrationPhase::Refused => "refused",
    }
}

/// One line per phase reached.
pub fn describe(r: &MigrationRecord) -> String {
    let mut line = format!("{:<12}", phase_name(r.phase));
    if let Some(s) = &r.source {
        line.push_str(&format!(" {} → {}", s, r.target));
    }
    if let Some(ms) = r.unavailable_ms {
        line.push_str(&format!(", writes waited at most {ms} ms"));
    }
    if let Some(m) = &r.message {
        line.push_str(&format!(" ({m})"));
    }
    line
}
