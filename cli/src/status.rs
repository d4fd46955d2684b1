//! `tern status`: per region, the group's members with their Raft lag and
//! leader, and the lag of every mirror (revisions and ms), heartbeat age and
//! clock skew, as the region agents published them in the directory. The
//! model is CloudNativePG's `kubectl cnpg status`.

use std::fmt::Write as _;

use clap::Args;
use etcd_client::GetOptions;
use tern_common::{DIR_REGIONS, RegionRecord};

use crate::CliError;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Client URLs of the directory group (printed by `tern demo --keep`).
    #[arg(long, env = "TERN_DIRECTORY_ENDPOINTS", value_delimiter = ',', required = true)]
    directory: Vec<String>,
}

pub async fn run(args: StatusArgs) -> Result<(), CliError> {
    let mut client = tern_common::etcd::connect(&args.directory, "directory", std::time::Duration::from_secs(5))
        .await
        .map_err(CliError::Setup)?;
    let resp = client
        .get(DIR_REGIONS, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| CliError::Setup(format!("reading the region records: {e}")))?;
    let mut records = Vec::new();
    for kv in resp.kvs() {
        let name = String::from_utf8_lossy(kv.key())
            .trim_start_matches(DIR_REGIONS)
            .to_string();
        let record: RegionRecord = serde_json::from_slice(kv.value())
            .map_err(|e| CliError::Setup(format!("region record {name} is malformed: {e}")))?;
        records.push((name, record));
    }
    if records.is_empty() {
        return Err(CliError::Setup("the directory has no region records yet".into()));
    }
    print!("{}", render(&records));
    Ok(())
}

fn age(ms: u64) -> String {
    if ms >= 1_000_000_000 {
        "never".into()
    } else {
        format!("{ms} ms")
    }
}

/// The status tables, one block per region.
pub fn render(records: &[(String, RegionRecord)]) -> String {
    let mut out = String::new();
    for (name, r) in records {
        let _ = writeln!(
            out,
            "Region {name}: {:?}, routers at {}",
            r.state,
            if r.router_endpoint.is_empty() {
                "-"
            } else {
                &r.router_endpoint
            }
        );
        let _ = writeln!(out, "  Group members");
        let _ = writeln!(
            out,
            "    {:<28} {:<7} {:>11} {:>13} {:>7}",
            "endpoint", "role", "raft index", "applied index", "behind"
        );
        for m in &r.members {
            let role = if m.is_leader { "leader" } else { "follower" };
            let _ = writeln!(
                out,
                "    {:<28} {:<7} {:>11} {:>13} {:>7}",
                m.endpoint, role, m.raft_index, m.applied_index, m.behind
            );
        }
        if r.members.is_empty() {
            let _ = writeln!(out, "    (no agent has reported yet)");
        }
        let _ = writeln!(out, "  Mirrors of other regions");
        let _ = writeln!(
            out,
            "    {:<10} {:<11} {:>9} {:>14} {:>14} {:>9}",
            "source", "state", "lag", "lag revisions", "heartbeat age", "skew"
        );
        for (source, m) in &r.mirrors {
            let _ = writeln!(
                out,
                "    {:<10} {:<11} {:>9} {:>14} {:>14} {:>6} ms",
                source,
                m.state,
                age(m.lag_ms),
                m.lag_revisions,
                age(m.heartbeat_age_ms),
                m.skew_ms
            );
        }
        if r.mirrors.is_empty() {
            let _ = writeln!(out, "    (none reported)");
        }
        out.push('\n');
    }
    out
}
