//! `tern failover REGION [--to T] [--force] [--yes]`: an operator fails a
//! lost region over (Manual mode, or Automatic mode refused by the budget).
//!
//! Before it acts it shows what may be lost, from what the successor's agent
//! last published about its mirror of the region (revisions and time
//! behind), and asks for the region's name unless `--yes`. It writes the
//! same guarded transaction an agent would (`tern_common::failover`): it is
//! refused while the region still holds its lease, so it can never create a
//! second writer. Which writes were lost, per account and key, is known
//! once the region returns (quarantine); until then the numbers here are
//! the bound.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use clap::Args;
use tern_common::failover::{self, FailoverRefused};
use tern_common::{DIR_REGIONS, MirrorState, MirrorStatus, RegionName, RegionRecord, RegionState};

use crate::CliError;

#[derive(Args, Debug)]
pub struct FailoverArgs {
    /// The lost region.
    region: String,
    /// The successor that takes its accounts over. Default: the live region
    /// whose mirror of it is furthest ahead (the least loss).
    #[arg(long)]
    to: Option<String>,
    /// Fail over even when more than --max-data-loss-lag may be lost.
    #[arg(long)]
    force: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
    /// The data-loss budget: without --force, refused when the successor's
    /// mirror was last measured further behind than this.
    #[arg(long, default_value = "5s", value_parser = tern_common::parse_duration)]
    max_data_loss_lag: Duration,
    /// Client URLs of the directory group (printed by `tern demo --keep`).
    #[arg(long, env = "TERN_DIRECTORY_ENDPOINTS", value_delimiter = ',', required = true)]
    directory: Vec<String>,
}

fn region(what: &str, s: &str) -> Result<RegionName, CliError> {
    RegionName::new(s).map_err(|e| CliError::Usage(format!("{what}: {e}")))
}

pub async fn run(args: FailoverArgs) -> Result<(), CliError> {
    let lost = region("REGION", &args.region)?;
    let mut d = crate::etcd(&args.directory, "directory", Duration::from_secs(10)).await?;
    let records = read_records(&mut d).await?;
    let view = failover::view(&mut d, &lost).await.map_err(refused)?;
    let successor = match &args.to {
        Some(t) => {
            let t = region("--to", t)?;
            match records.get(&t) {
                Some(r) if r.state == RegionState::Active => t,
                Some(_) => return Err(CliError::Usage(format!("--to {t}: region {t} is not active"))),
                None => return Err(CliError::Usage(format!("--to {t}: no such region in the directory"))),
            }
        }
        None => best_successor(&records, &lost)
            .ok_or_else(|| CliError::Usage(format!("no active region mirrors {lost}; name the successor with --to")))?,
    };
    let mirror = records
        .get(&successor)
        .and_then(|r| r.mirrors.get(lost.as_str()))
        .cloned();
    // A promotion of an earlier failover that was never ended (the
    // successor's agent was down when the region rejoined): its agent ends
    // it when it runs again; until then routers would wait on the old
    // marker.
    if let Some(m) = &mirror
        && m.state == MirrorState::Promoted
        && records.get(&lost).is_none_or(|r| r.state != RegionState::Failed)
    {
        return Err(CliError::Usage(format!(
            "{successor}'s mirror of {lost} is still promoted from an earlier failover: {successor}'s agent ends that when it runs; name another successor with --to, or start it first"
        )));
    }
    // The successor's agent promotes only a complete mirror.
    if let Some(m) = &mirror
        && matches!(m.state, MirrorState::Starting | MirrorState::Resyncing)
    {
        return Err(CliError::Usage(format!(
            "{successor}'s mirror of {lost} is {} (incomplete): it would not be promoted; name another successor with --to",
            m.state.as_str()
        )));
    }
    println!("Failing {lost} over to {successor}.");
    match &view.lease {
        Some(holder) => println!(
            "  {lost}'s lease: held by {} (the failover will be refused)",
            holder.agent
        ),
        None => println!("  {lost}'s lease: gone (its routers stopped writing before it expired)"),
    }
    let over_budget = match &mirror {
        Some(m) => {
            println!("  {}", describe(&lost, &successor, m));
            last_heard_lag(m).is_none_or(|lag| lag > args.max_data_loss_lag)
        }
        None => {
            println!("  {successor} never published a mirror of {lost}: how much may be lost is unknown");
            true
        }
    };
    println!(
        "  Which writes were lost, per account and key, is reported when {lost} returns (quarantine); nothing is lost silently."
    );
    // A region that is not lost (it holds its lease, or failed over
    // already) is refused whatever the budget: asking for --force first
    // would send the operator down the wrong path.
    failover::lost(&lost, &view).map_err(refused)?;
    if over_budget && !args.force {
        return Err(CliError::Usage(format!(
            "more than the budget of {:?} may be lost; run again with --force to fail over anyway",
            args.max_data_loss_lag
        )));
    }
    if !args.yes {
        confirm(&lost)?;
    }
    let done = failover::declare_failed(&mut d, &lost, &successor, &view, None)
        .await
        .map_err(refused)?;
    println!(
        "{lost} failed over to {} at region epoch {}: routers send its accounts there.",
        done.successor, done.epoch
    );
    // The successor's agent promotes its mirror; its record says when.
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < until {
        let records = read_records(&mut d).await?;
        if records
            .get(&successor)
            .and_then(|r| r.mirrors.get(lost.as_str()))
            .is_some_and(|m| m.state == MirrorState::Promoted)
        {
            println!("{successor} promoted its mirror of {lost}: it serves {lost}'s accounts.");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("{successor}'s agent has not reported the promotion yet; writes to {lost}'s accounts wait for it.");
    Ok(())
}

fn refused(e: FailoverRefused) -> CliError {
    CliError::Usage(format!("failover refused: {e}"))
}

/// How far behind the mirror was when the lost region was last heard from
/// (its newest heartbeat applied), error bound included: what a region that
/// crashed loses. None when never measured.
fn last_heard_lag(m: &MirrorStatus) -> Option<Duration> {
    if m.lag_ms == u64::MAX || m.lag_error_ms == u64::MAX || m.heartbeat_age_ms == u64::MAX {
        return None;
    }
    Some(Duration::from_millis(
        m.lag_ms.saturating_sub(m.heartbeat_age_ms) + m.lag_error_ms,
    ))
}

/// What the successor's mirror of `lost` lacks, as last published.
fn describe(lost: &RegionName, successor: &RegionName, m: &MirrorStatus) -> String {
    let published = (tern_common::unix_ms() as i64 - m.measured_unix_ms).max(0) as f64 / 1000.0;
    let lag = match last_heard_lag(m) {
        Some(lag) => format!(
            "{} ms behind when {lost} was last heard from, {:.1} s before it was published",
            lag.as_millis(),
            m.heartbeat_age_ms as f64 / 1000.0
        ),
        None => "its lag was never measured".to_string(),
    };
    format!(
        "{successor}'s mirror of {lost} (state {}): applied up to revision {}, {} revisions behind; {lag} (published {published:.1} s ago). A crashed region loses what it acknowledged in that lag; one cut off from {successor} while still serving, everything it acknowledged after it was last heard from",
        m.state.as_str(),
        m.applied_revision.0,
        m.lag_revisions,
    )
}

/// The active region other than `lost` whose mirror of it is the least
/// behind.
fn best_successor(
    records: &std::collections::BTreeMap<RegionName, RegionRecord>,
    lost: &RegionName,
) -> Option<RegionName> {
    records
        .iter()
        .filter(|(r, rec)| *r != lost && rec.state == RegionState::Active)
        .filter_map(|(r, rec)| rec.mirrors.get(lost.as_str()).map(|m| (r, m)))
        .min_by_key(|(_, m)| (m.lag_revisions, m.lag_ms))
        .map(|(r, _)| r.clone())
}

fn confirm(lost: &RegionName) -> Result<(), CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::Usage("stdin is not a terminal: confirm with --yes".into()));
    }
    print!("Type {lost} to fail it over: ");
    std::io::stdout().flush().ok();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| CliError::Setup(format!("reading the confirmation: {e}")))?;
    if line.trim() != lost.as_str() {
        return Err(CliError::Usage("not confirmed; nothing was written".into()));
    }
    Ok(())
}

async fn read_records(
    d: &mut etcd_client::Client,
) -> Result<std::collections::BTreeMap<RegionName, RegionRecord>, CliError> {
    let found = d
        .get(DIR_REGIONS, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .map_err(|source| CliError::EtcdRequest {
            what: "reading region records".into(),
            source,
        })?;
    Ok(found
        .kvs()
        .iter()
        .filter_map(|kv| {
            let name = tern_common::region_of_dir_key(kv.key(), DIR_REGIONS)?;
            Some((name, serde_json::from_slice(kv.value()).ok()?))
        })
        .collect())
}
