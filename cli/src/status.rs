//! `tern status`: per region, the group's members with their Raft lag and
//! leader, and the lag of every mirror (revisions and ms), heartbeat age and
//! clock skew, as the region agents published them in the directory. The
//! model is CloudNativePG's `kubectl cnpg status`.

use std::fmt::Write as _;

use clap::Args;
use etcd_client::GetOptions;
use std::collections::BTreeMap;

use tern_common::{DIR_HOLDS, DIR_LEASES, DIR_REGIONS, RegionHold, RegionLease, RegionRecord};

use crate::CliError;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A GeoCluster in Kubernetes (as `kubectl tern status NAME`); its
    /// status is written by the operator and the region agents.
    name: Option<String>,
    /// Namespace of NAME.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Kubeconfig; default: $KUBECONFIG or ~/.kube/config.
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// Or: client URLs of a directory group (printed by `tern demo --keep`).
    #[arg(
        long,
        env = "TERN_DIRECTORY_ENDPOINTS",
        value_delimiter = ',',
        conflicts_with = "name"
    )]
    directory: Vec<String>,
    /// The data-loss budget failover readiness is judged against (the
    /// GeoCluster's `spec.failover.maxDataLossLag`), e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = tern_common::parse_duration)]
    max_data_loss_lag: std::time::Duration,
}

pub async fn run(args: StatusArgs) -> Result<(), CliError> {
    match (&args.name, args.directory.is_empty()) {
        (Some(name), true) => kubernetes(name, &args.namespace, args.kubeconfig.as_deref()).await,
        (None, false) => directory(args).await,
        _ => Err(CliError::Usage(
            "name a GeoCluster (tern status NAME) or a directory (tern status --directory URLS)".into(),
        )),
    }
}

/// Status of a GeoCluster from its Kubernetes status.
async fn kubernetes(name: &str, namespace: &str, kubeconfig: Option<&std::path::Path>) -> Result<(), CliError> {
    let client = crate::kubernetes::client(kubeconfig).await?;
    let api: kube::Api<tern_crds::GeoCluster> = kube::Api::namespaced(client, namespace);
    let gc = api.get(name).await.map_err(|e| CliError::Kubernetes {
        what: format!("reading GeoCluster {namespace}/{name}"),
        source: Box::new(e),
    })?;
    print!("{}", render_geocluster(&gc));
    Ok(())
}

/// The status tables of a GeoCluster.
pub fn render_geocluster(gc: &tern_crds::GeoCluster) -> String {
    let mut out = String::new();
    let st = gc.status.clone().unwrap_or_default();
    let _ = writeln!(
        out,
        "GeoCluster {}: {} (regions ready {})",
        gc.metadata.name.as_deref().unwrap_or("?"),
        st.phase.map_or("Unknown", |p| p.as_str()),
        st.ready_regions.as_deref().unwrap_or("-")
    );
    for c in &st.conditions {
        let _ = writeln!(out, "  {:<12} {:<6} {:<16} {}", c.type_, c.status, c.reason, c.message);
    }
    for r in &st.regions {
        let _ = writeln!(
            out,
            "\nRegion {}: {} — group {}/{} ready (leader {}), directory {}/{} ready, agent {}, members behind: {}",
            r.name,
            r.phase.as_str(),
            r.ready_members,
            r.members,
            r.group_leader.as_deref().unwrap_or("-"),
            r.directory_ready_members,
            r.directory_members,
            r.agent.as_deref().unwrap_or("-"),
            r.members_behind.map(|n| n.to_string()).unwrap_or_else(|| "-".into())
        );
        let _ = writeln!(
            out,
            "    {:<10} {:<11} {:>9} {:>9} {:>14} {:>9}",
            "source", "state", "lag", "± error", "lag revisions", "skew"
        );
        for m in &r.mirrors {
            let _ = writeln!(
                out,
                "    {:<10} {:<11} {:>9} {:>9} {:>14} {:>6} ms",
                m.source,
                m.state,
                age(u64::try_from(m.lag_ms).unwrap_or(0)),
                age(u64::try_from(m.lag_error_ms).unwrap_or(0)),
                m.lag_revisions,
                m.skew_ms
            );
        }
        if r.mirrors.is_empty() {
            let _ = writeln!(out, "    (no agent has reported mirror lag)");
        }
        if let Some(d) = &r.drain {
            let _ = writeln!(
                out,
                "    draining: {}",
                crate::drain::render(&crate::drain::progress(d))
            );
        }
    }
    out
}

/// Status of a deployment from its directory's region records.
async fn directory(args: StatusArgs) -> Result<(), CliError> {
    let mut client = crate::etcd(&args.directory, "directory", std::time::Duration::from_secs(5)).await?;
    let resp = client
        .get(DIR_REGIONS, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|source| CliError::EtcdRequest {
            what: "reading the region records".into(),
            source,
        })?;
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
    let holders: BTreeMap<String, RegionLease> = by_region(&mut client, DIR_LEASES, "the region leases").await?;
    let holds: BTreeMap<String, RegionHold> = by_region(&mut client, DIR_HOLDS, "the holds on regions").await?;
    print!("{}", render(&records, &holders, &holds));
    let mut live = BTreeMap::new();
    for (name, record) in &records {
        if let Some(answer) = lease_answer(name, record).await {
            live.insert(name.clone(), answer);
        }
    }
    print!("{}", readiness(&records, &live, args.max_data_loss_lag));
    let migrations = tern_local::migrations::list(&client).await?;
    print!("{}", render_migrations(&migrations, RECENT_MIGRATIONS));
    Ok(())
}

/// The records under `prefix`, one per region, by region name (one that
/// cannot be parsed is left out).
async fn by_region<T: serde::de::DeserializeOwned>(
    client: &mut etcd_client::Client,
    prefix: &str,
    what: &str,
) -> Result<BTreeMap<String, T>, CliError> {
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|source| CliError::EtcdRequest {
            what: format!("reading {what}"),
            source,
        })?;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let name = String::from_utf8_lossy(kv.key()).trim_start_matches(prefix).to_string();
            Some((name, serde_json::from_slice(kv.value()).ok()?))
        })
        .collect())
}

/// What the region's elected agent says of its lease (`GET /lease`), found
/// through the announcement in the region's own group, whose members its
/// record lists. None when any of it cannot be reached.
async fn lease_answer(region: &str, record: &RegionRecord) -> Option<tern_common::LeaseAnswer> {
    let name = tern_common::RegionName::new(region).ok()?;
    let endpoints: Vec<String> = record.members.iter().map(|m| m.endpoint.clone()).collect();
    if endpoints.is_empty() {
        return None;
    }
    let mut group = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tern_common::etcd::client(&endpoints, crate::tls(), None),
    )
    .await
    .ok()?
    .ok()?;
    let found = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        group.get(tern_common::agent_endpoint_key(&name), None),
    )
    .await
    .ok()?
    .ok()?;
    let agent: tern_common::AgentEndpoint = serde_json::from_slice(found.kvs().first()?.value()).ok()?;
    let (code, body) = tern_common::ops::http_get(&agent.http, "/lease", std::time::Duration::from_secs(2))
        .await
        .ok()?;
    (code == 200).then(|| serde_json::from_str(&body).ok()).flatten()
}

/// Per region: how long its lease is certain to stay valid (as its agent
/// answers), and whether it could be failed over within `budget`: the
/// successor whose mirror of it is least behind, and by how much.
pub fn readiness(
    records: &[(String, RegionRecord)],
    live: &BTreeMap<String, tern_common::LeaseAnswer>,
    budget: std::time::Duration,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Leases and failover readiness (data-loss budget {})",
        age(budget.as_millis() as u64)
    );
    let _ = writeln!(
        out,
        "  {:<10} {:<22} {:<28} {:<20} failover",
        "region", "lease valid for", "least behind mirror of it", "behind (± error)"
    );
    for (name, r) in records {
        let lease = match (r.state, live.get(name)) {
            (tern_common::RegionState::Failed, _) => "failed over".to_string(),
            (_, Some(a)) => format!("{} (TTL {})", age(a.remaining_ms), age(a.ttl_ms)),
            (_, None) => "unknown (no agent answer)".to_string(),
        };
        let best = records
            .iter()
            .filter(|(other, o)| other != name && o.state == tern_common::RegionState::Active)
            .filter_map(|(other, o)| o.mirrors.get(name.as_str()).map(|m| (other, m)))
            .min_by_key(|(_, m)| m.lag_ms.saturating_add(m.lag_error_ms));
        let (mirror, behind, verdict) = match (r.state, best) {
            (tern_common::RegionState::Failed, _) => ("-".to_string(), "-".to_string(), "-".to_string()),
            (_, None) => ("none".into(), "-".into(), "no successor mirrors it".into()),
            (_, Some((other, m))) => {
                let incomplete = matches!(
                    m.state,
                    tern_common::MirrorState::Starting | tern_common::MirrorState::Resyncing
                );
                let bound = m.lag_ms.saturating_add(m.lag_error_ms);
                let verdict = if incomplete {
                    format!("not ready: {other}'s mirror is {}", m.state.as_str())
                } else if m.lag_ms == u64::MAX {
                    "not ready: lag not measured yet".to_string()
                } else if u128::from(bound) <= budget.as_millis() {
                    "ready".to_string()
                } else {
                    "over the budget (tern failover --force)".to_string()
                };
                (
                    format!("{other} ({})", m.state.as_str()),
                    if m.lag_ms == u64::MAX {
                        "-".into()
                    } else {
                        format!("{} ± {}", age(m.lag_ms), age(m.lag_error_ms))
                    },
                    verdict,
                )
            }
        };
        let _ = writeln!(out, "  {name:<10} {lease:<22} {mirror:<28} {behind:<20} {verdict}");
    }
    out
}

/// Finished migrations `tern status` lists (the newest).
const RECENT_MIGRATIONS: usize = 10;

/// Migrations in flight, then the `recent` newest finished ones.
pub fn render_migrations(all: &[(String, tern_common::MigrationRecord)], recent: usize) -> String {
    let mut out = String::new();
    let (mut open, mut done): (Vec<_>, Vec<_>) = all.iter().partition(|(_, m)| !m.phase.is_final());
    open.sort_by_key(|(_, m)| m.requested_ms);
    done.sort_by_key(|(_, m)| std::cmp::Reverse(m.finished_ms.unwrap_or(m.requested_ms)));
    let line = |out: &mut String, id: &str, m: &tern_common::MigrationRecord| {
        let _ = writeln!(out, "  {id:<28} {:<14} {}", m.account, crate::migrate::describe(m));
    };
    let _ = writeln!(out, "Migrations in flight: {}", open.len());
    for (id, m) in &open {
        line(&mut out, id, m);
    }
    let _ = writeln!(out, "Recent migrations ({} kept in the directory):", done.len());
    for (id, m) in done.iter().take(recent) {
        line(&mut out, id, m);
    }
    out
}

fn age(ms: u64) -> String {
    if ms >= 1_000_000_000 {
        "never".into()
    } else {
        format!("{ms} ms")
    }
}

/// The status tables, one block per region; `holders` are the agents
/// holding each region's lease in the directory, `holds` the holds on
/// regions (a region restored from a backup, until its fences agree).
pub fn render(
    records: &[(String, RegionRecord)],
    holders: &BTreeMap<String, RegionLease>,
    holds: &BTreeMap<String, RegionHold>,
) -> String {
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
        if r.state == tern_common::RegionState::Failed {
            let _ = writeln!(
                out,
                "  Failed over to {} at region epoch {}: its accounts are served there; `tern quarantine list {name}` shows what was lost",
                r.successor.as_ref().map(|s| s.as_str()).unwrap_or("?"),
                r.region_epoch
            );
        }
        if r.state == tern_common::RegionState::Failed
            && let Some(p) = &r.drain
        {
            let _ = writeln!(
                out,
                "  Re-homing into {}: {}{}",
                r.successor.as_ref().map(|s| s.as_str()).unwrap_or("?"),
                crate::drain::render(p),
                if p.homed == 0 {
                    format!(" — every account re-homed; `tern rejoin {name}` once it is back")
                } else {
                    String::new()
                }
            );
        }
        if r.state == tern_common::RegionState::Draining {
            match &r.drain {
                Some(p) => {
                    let _ = writeln!(out, "  Draining: {}", crate::drain::render(p));
                }
                None => {
                    let _ = writeln!(out, "  Draining: its agent has not counted its accounts yet");
                }
            }
        }
        if let Some(h) = holds.get(name) {
            let _ = writeln!(
                out,
                "  Held by {}: {}. No agent of it claims the region's lease, and its routers refuse writes, until the hold is lifted (docs/backup.md)",
                h.by, h.reason
            );
        }
        match holders.get(name) {
            Some(h) if h.failed_over_to.is_some() => {
                let _ = writeln!(
                    out,
                    "  The failover's tombstone holds the region's lease: no agent of it may speak for it, its routers refuse writes"
                );
            }
            Some(h) => {
                let _ = writeln!(
                    out,
                    "  Agent {} holds the region's lease (leadership revision {}); its routers accept writes while it renews it",
                    h.agent, h.leadership
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  No agent holds the region's lease: none is elected, or it cannot reach the directory; what follows may be stale"
                );
            }
        }
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
            "    {:<10} {:<11} {:>9} {:>9} {:>14} {:>14} {:>9}",
            "source", "state", "lag", "± error", "lag revisions", "heartbeat age", "skew"
        );
        for (source, m) in &r.mirrors {
            let _ = writeln!(
                out,
                "    {:<10} {:<11} {:>9} {:>9} {:>14} {:>14} {:>6} ms",
                source,
                m.state,
                age(m.lag_ms),
                age(m.lag_error_ms),
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

#[cfg(test)]
mod tests {
    use super::*;
    use tern_common::{AccountId, MigrationPhase, MigrationRecord, RegionName};

    #[test]
    fn a_held_region_says_who_holds_it_and_why() {
        let records = vec![
            ("us-east".to_string(), RegionRecord::unwritten()),
            ("eu-west".to_string(), RegionRecord::unwritten()),
        ];
        let holds = BTreeMap::from([(
            "us-east".to_string(),
            RegionHold {
                by: "tern-operator".into(),
                reason: "payments-us-east restored from backup us-east-20261203T113457.236Z".into(),
                since_ms: 0,
            },
        )]);
        let out = render(&records, &BTreeMap::new(), &holds);
        let us = out.split("Region eu-west").next().expect("us-east's block");
        assert!(
            us.contains("Held by tern-operator: payments-us-east restored from backup us-east-20261203T113457.236Z"),
            "{out}"
        );
        assert_eq!(out.matches("Held by").count(), 1, "{out}");
    }

    #[test]
    fn readiness_names_the_least_behind_successor_and_judges_it_against_the_budget() {
        let mirror = |lag_ms: u64, state: tern_common::MirrorState| tern_common::MirrorStatus {
            state,
            lag_ms,
            lag_error_ms: 40,
            lag_revisions: 0,
            applied_revision: tern_common::SourceRevision(0),
            skew_ms: 0,
            heartbeat_age_ms: 0,
            measured_unix_ms: 0,
        };
        let mut us = RegionRecord::unwritten();
        us.mirrors
            .insert("eu-west".into(), mirror(9_000, tern_common::MirrorState::Disconnected));
        let mut eu = RegionRecord::unwritten();
        eu.mirrors
            .insert("us-east".into(), mirror(50, tern_common::MirrorState::Streaming));
        let mut ap = RegionRecord::unwritten();
        ap.mirrors
            .insert("us-east".into(), mirror(400, tern_common::MirrorState::Streaming));
        let records = vec![
            ("ap-south".to_string(), ap),
            ("eu-west".to_string(), eu),
            ("us-east".to_string(), us),
        ];
        let live = BTreeMap::from([(
            "us-east".to_string(),
            tern_common::LeaseAnswer {
                region: "us-east".into(),
                agent: "a".into(),
                leadership: 1,
                remaining_ms: 1_600,
                ttl_ms: 2_000,
            },
        )]);
        let text = readiness(&records, &live, std::time::Duration::from_secs(5));
        let line = |r: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(r))
                .expect("a line")
                .to_string()
        };
        let us_line = line("us-east");
        assert!(
            us_line.contains("eu-west (streaming)") && us_line.ends_with("ready"),
            "{us_line}"
        );
        assert!(us_line.contains("(TTL"), "{us_line}");
        let eu_line = line("eu-west");
        assert!(eu_line.contains("over the budget"), "{eu_line}");
        assert!(eu_line.contains("unknown"), "{eu_line}");
        assert!(line("ap-south").contains("no successor mirrors it"), "{text}");
    }

    #[test]
    fn migrations_in_flight_come_first_then_the_newest_finished() {
        let m = |account: &str, phase: MigrationPhase, at: u64| {
            let mut r = MigrationRecord::requested(
                AccountId::new(account).expect("a"),
                RegionName::new("eu-west").expect("r"),
                None,
                "t".into(),
                at,
            );
            r.phase = phase;
            r.finished_ms = phase.is_final().then_some(at);
            r.source = Some(RegionName::new("us-east").expect("r"));
            r
        };
        let all = vec![
            ("old".to_string(), m("acct-old", MigrationPhase::Completed, 1)),
            ("new".to_string(), m("acct-new", MigrationPhase::Refused, 3)),
            ("going".to_string(), m("acct-going", MigrationPhase::Fencing, 2)),
        ];
        let text = render_migrations(&all, 1);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "Migrations in flight: 1");
        assert!(
            lines[1].contains("acct-going") && lines[1].contains("us-east → eu-west"),
            "{text}"
        );
        assert!(lines[2].starts_with("Recent migrations (2"), "{text}");
        assert!(lines[3].contains("acct-new") && lines[3].contains("refused"), "{text}");
        assert_eq!(lines.len(), 4, "only the newest finished one: {text}");
    }
}
