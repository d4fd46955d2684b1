//! `tern rejoin REGION`: a failed-over region serves again, empty. Refused
//! until it is back (its agent has written its quarantine and retired its
//! home area), its successor has re-homed every one of its accounts, and no
//! move into or out of it is open (`tern_common::failover::rejoin`). Its
//! successor then mirrors it again from a snapshot; accounts move back
//! with `tern migrate` (or follow the sun).

use std::time::Duration;

use clap::Args;
use tern_common::RegionName;

use crate::CliError;

#[derive(Args, Debug)]
pub struct RejoinArgs {
    /// The failed-over region.
    region: String,
    /// Client URLs of the directory group (printed by `tern demo --keep`).
    #[arg(long, env = "TERN_DIRECTORY_ENDPOINTS", value_delimiter = ',', required = true)]
    directory: Vec<String>,
}

pub async fn run(args: RejoinArgs) -> Result<(), CliError> {
    let region = RegionName::new(&args.region).map_err(|e| CliError::Usage(format!("REGION: {e}")))?;
    let mut d = crate::etcd(&args.directory, "directory", Duration::from_secs(10)).await?;
    let done = tern_common::failover::rejoin(&mut d, &region)
        .await
        .map_err(|e| CliError::Setup(format!("rejoin {region}: {e}")))?;
    println!(
        "{region} rejoined (region epoch {}): its agent claims its lease again and it serves, with no accounts; {} mirrors it again from a snapshot. Move accounts back with `tern migrate ACCOUNT --to {region}`.",
        done.epoch, done.former_successor
    );
    Ok(())
}
