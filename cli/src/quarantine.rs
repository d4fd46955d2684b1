//! `tern quarantine list|export [REGION]`: the writes failed regions
//! committed that their successors never had (region-agent `quarantine`).
//! `list` prints a summary per failover and the writes as a table; `export`
//! prints them as JSON, one object per failover with its writes, for the
//! people who decide what to re-apply. tern never applies them.

use std::time::Duration;

use clap::{Args, Subcommand};
use etcd_client::GetOptions;
use serde::Serialize;
use tern_common::{DIR_QUARANTINE, QuarantineSummary, QuarantinedWrite};

use crate::CliError;

#[derive(Args, Debug)]
pub struct QuarantineArgs {
    #[command(subcommand)]
    command: QuarantineCommand,
}

#[derive(Subcommand, Debug)]
enum QuarantineCommand {
    /// A summary per failover and its writes as a table.
    List(Target),
    /// Every failover's summary and writes as JSON.
    Export(Target),
}

#[derive(Args, Debug)]
struct Target {
    /// Only this failed region's quarantine.
    region: Option<String>,
    /// Client URLs of the directory group (printed by `tern demo --keep`).
    #[arg(long, env = "TERN_DIRECTORY_ENDPOINTS", value_delimiter = ',', required = true)]
    directory: Vec<String>,
}

/// One failover's quarantine as exported.
#[derive(Debug, Serialize)]
struct Quarantine {
    pub region: String,
    pub failover_epoch: u64,
    /// None while the region's agent is still writing it.
    pub summary: Option<QuarantineSummary>,
    pub writes: Vec<QuarantinedWrite>,
}

pub async fn run(args: QuarantineArgs) -> Result<(), CliError> {
    match args.command {
        QuarantineCommand::List(t) => {
            let all = read(&t).await?;
            if all.is_empty() {
                println!("nothing is quarantined");
            }
            for q in &all {
                print!("{}", list(q));
            }
        }
        QuarantineCommand::Export(t) => {
            let all = read(&t).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&all).map_err(|e| CliError::Setup(e.to_string()))?
            );
        }
    }
    Ok(())
}

fn list(q: &Quarantine) -> String {
    let mut out = match &q.summary {
        Some(s) => format!(
            "{} failed over to {} (region epoch {}): {} writes of {} accounts quarantined; the successor had applied {}, compared up to revision {}{}\n",
            s.region,
            s.successor,
            s.failover_epoch,
            s.writes,
            s.accounts,
            s.applied,
            s.compared_to_revision,
            if s.complete_history {
                ""
            } else {
                " (history compacted: latest value per key only)"
            }
        ),
        None => format!(
            "{} (region epoch {}): incomplete, the region's agent is still writing it\n",
            q.region, q.failover_epoch
        ),
    };
    if !q.writes.is_empty() {
        out.push_str(&format!(
            "  {:<20} {:<24} {:>10}  {:<16} value\n",
            "account", "key", "revision", "after (unix ms)"
        ));
    }
    for w in &q.writes {
        let value = if w.deleted {
            "(deleted)".to_string()
        } else {
            w.value
                .clone()
                .or_else(|| w.value_hex.as_ref().map(|h| format!("0x{h}")))
                .unwrap_or_default()
        };
        out.push_str(&format!(
            "  {:<20} {:<24} {:>10}  {:<16} {value}\n",
            w.account,
            w.key,
            w.revision,
            w.committed_after_ms
                .map(|m| m.to_string())
                .unwrap_or_else(|| "-".into())
        ));
    }
    out
}

/// Every quarantine in the directory (of `t.region` only, if given),
/// oldest failover first.
async fn read(t: &Target) -> Result<Vec<Quarantine>, CliError> {
    let directory = crate::etcd(&t.directory, "directory", Duration::from_secs(10)).await?;
    let prefix = match &t.region {
        Some(r) => {
            let r = tern_common::RegionName::new(r).map_err(|e| CliError::Usage(format!("REGION: {e}")))?;
            format!("{DIR_QUARANTINE}{r}/")
        }
        None => DIR_QUARANTINE.to_string(),
    };
    let found = directory
        .clone()
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|source| CliError::EtcdRequest {
            what: "reading the quarantine".into(),
            source,
        })?;
    let mut all: Vec<Quarantine> = Vec::new();
    for kv in found.kvs() {
        let Some(rest) = std::str::from_utf8(kv.key())
            .ok()
            .and_then(|k| k.strip_prefix(DIR_QUARANTINE))
        else {
            continue;
        };
        // {region}/{epoch}/summary or {region}/{epoch}/w/{revision}-{i}
        let mut parts = rest.splitn(3, '/');
        let (Some(region), Some(epoch), Some(item)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Ok(epoch) = epoch.parse::<u64>() else { continue };
        let entry = match all.iter().position(|q| q.region == region && q.failover_epoch == epoch) {
            Some(i) => &mut all[i],
            None => {
                all.push(Quarantine {
                    region: region.to_string(),
                    failover_epoch: epoch,
                    summary: None,
                    writes: Vec::new(),
                });
                all.last_mut().expect("just pushed")
            }
        };
        let malformed = |e: serde_json::Error| CliError::Setup(format!("{rest} in the quarantine is malformed: {e}"));
        if item == "summary" {
            entry.summary = Some(serde_json::from_slice(kv.value()).map_err(malformed)?);
        } else {
            entry
                .writes
                .push(serde_json::from_slice(kv.value()).map_err(malformed)?);
        }
    }
    Ok(all)
}
