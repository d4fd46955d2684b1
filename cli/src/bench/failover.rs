//! Section `failover`: the recovery time of a lost region (DESIGN.md
//! "Failover", issue 13). Two regions with the demo's 80 ms round trip;
//! us-east holds N accounts (placements in the directory, fences in its
//! group, mirrored at eu-west), and eu-west's agent fails it over
//! automatically. Writers load us-east; then the whole region is killed
//! (router, agent, every member of its group) and a client writes one of
//! its accounts through eu-west's router until a write is acknowledged.
//!
//! RTO = kill → that first acknowledged write. It is the lease TTL (the
//! key must expire) plus the margin plus detection, promotion and routing;
//! the failover itself writes two directory keys whatever N is, which is
//! what running it at 10 and at N accounts side by side shows.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::{Txn, TxnOp};
use tern_api::pb;
use tern_common::{RegionName, dir_region_key};
use tern_local::{Layout, LocalDeployment};

use super::workload::{ms, quantile};
use crate::CliError;

/// Puts per transaction while filling (etcd's --max-txn-ops is 1,000).
const FILL_TXN: usize = 1000;
/// Kills per size.
const REPEATS: usize = 3;
/// The agents' lease TTL (seconds) and margin, as tern-local runs them.
const TTL_SECS: u64 = 2;
const MARGIN: Duration = Duration::from_millis(500);

/// One kill: RTO, and when the failover was committed (from the kill).
struct Kill {
    rto: Duration,
    failed_over: Option<Duration>,
}

pub async fn run(members: usize, accounts: usize) -> Result<String, CliError> {
    let mut rows = Vec::new();
    for n in [10, accounts] {
        let mut kills = Vec::new();
        for k in 0..REPEATS {
            println!("  failover: {n} accounts, kill {} of {REPEATS}", k + 1);
            kills.push(once(members, n).await?);
        }
        rows.push((n, kills));
    }
    let mut out = String::from("## Failover (a whole region killed under load)\n\n");
    out.push_str(&format!(
        "us-east and eu-west, {members} etcd members each, 80 ms round trip; eu-west fails us-east over automatically \
         (lease TTL {TTL_SECS} s, margin {} ms). RTO: kill → first write of one of us-east's accounts acknowledged through \
         eu-west's router. Target: TTL + margin + 2 s = {:.1} s. {REPEATS} kills per size.\n\n",
        MARGIN.as_millis(),
        TTL_SECS as f64 + MARGIN.as_secs_f64() + 2.0
    ));
    out.push_str(
        "| accounts in us-east | RTO p50 | RTO max | failover committed after (p50) |\n|---:|---:|---:|---:|\n",
    );
    for (n, kills) in &rows {
        let mut rto: Vec<Duration> = kills.iter().map(|k| k.rto).collect();
        rto.sort();
        let mut committed: Vec<Duration> = kills.iter().filter_map(|k| k.failed_over).collect();
        committed.sort();
        out.push_str(&format!(
            "| {n} | {:.0} ms | {:.0} ms | {:.0} ms |\n",
            ms(quantile(&rto, 0.5)),
            ms(rto.last().copied().unwrap_or_default()),
            ms(quantile(&committed, 0.5)),
        ));
    }
    Ok(out)
}

async fn once(members: usize, accounts: usize) -> Result<Kill, CliError> {
    let mut d = LocalDeployment::start(Layout {
        regions: vec![("us-east".into(), members), ("eu-west".into(), members)],
        directory_members: 1,
        rtt_ms: BTreeMap::from([(("us-east".into(), "eu-west".into()), 80)]),
        agents: true,
        otlp_endpoint: None,
        tls: false,
    })
    .await?;
    d.restart_with_flags(
        "eu-west",
        &[],
        &[
            "--failover-mode=automatic".into(),
            "--failover-order=us-east=eu-west".into(),
        ],
    )
    .await?;
    fill(&d, accounts).await?;
    let mut us = d.client("us-east").await;
    us.create_account(pb::CreateAccountRequest {
        account: "probe".into(),
        home_region: "us-east".into(),
        allowed_regions: vec![],
    })
    .await?;
    us.put(put("before")).await?;
    wait_mirrored(&d).await?;

    // Load on us-east until it dies.
    let mut load = Vec::new();
    for _ in 0..4 {
        let mut c = d.client("us-east").await;
        load.push(tokio::spawn(async move {
            loop {
                let _ = c.put(put("load")).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed = Instant::now();
    d.kill_region("us-east");
    for l in &load {
        l.abort();
    }
    let mut eu = d.client("eu-west").await;
    let mut dir = d.directory_client().await;
    let key = dir_region_key(&RegionName::new("us-east").expect("valid"));
    let mut failed_over = None;
    let limit = Duration::from_secs(60);
    let rto = loop {
        if failed_over.is_none()
            && let Ok(r) = dir.get(key.clone(), None).await
            && r.kvs()
                .first()
                .is_some_and(|kv| String::from_utf8_lossy(kv.value()).contains("\"failed\""))
        {
            failed_over = Some(killed.elapsed());
        }
        if eu.put(put("after")).await.is_ok() {
            break killed.elapsed();
        }
        if killed.elapsed() > limit {
            return Err(CliError::Setup(format!(
                "no write of a failed region's account was acknowledged within {limit:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    Ok(Kill { rto, failed_over })
}

fn put(value: &str) -> pb::PutRequest {
    pb::PutRequest {
        account: "probe".into(),
        key: "k".into(),
        value: value.as_bytes().to_vec(),
        idempotency_key: String::new(),
    }
}

/// `accounts` accounts homed in us-east: placements in the directory, fences
/// in us-east's group (which eu-west mirrors).
async fn fill(d: &LocalDeployment, accounts: usize) -> Result<(), CliError> {
    let mut dir = d.directory_client().await;
    let mut group = d.group_client("us-east").await;
    let failed = |what: &'static str| move |e: etcd_client::Error| CliError::Setup(format!("filling {what}: {e}"));
    let mut start = 0;
    while start < accounts {
        let ids: Vec<String> = (start..(start + FILL_TXN).min(accounts))
            .map(|i| format!("fo-{i:07}"))
            .collect();
        let placements: Vec<TxnOp> = ids
            .iter()
            .map(|a| {
                TxnOp::put(
                    format!("/tern/dir/accounts/{a}"),
                    r#"{"home":"us-east","epoch":1,"state":{"kind":"active"}}"#,
                    None,
                )
            })
            .collect();
        dir.txn(Txn::new().and_then(placements))
            .await
            .map_err(failed("the directory"))?;
        let fences: Vec<TxnOp> = ids
            .iter()
            .map(|a| TxnOp::put(format!("/tern/a/{a}/fence"), "1:active", None))
            .collect();
        group
            .txn(Txn::new().and_then(fences))
            .await
            .map_err(failed("us-east's group"))?;
        start += FILL_TXN;
    }
    Ok(())
}

/// Waits until eu-west's mirror of us-east holds the probe's value.
async fn wait_mirrored(d: &LocalDeployment) -> Result<(), CliError> {
    let mut eu = d.group_client("eu-west").await;
    let until = Instant::now() + Duration::from_secs(120);
    while Instant::now() < until {
        if let Ok(r) = eu.get("/tern/r/us-east/tern/a/probe/d/k", None).await
            && r.kvs().first().is_some_and(|kv| kv.value() == b"before")
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(CliError::Setup("eu-west's mirror of us-east never caught up".into()))
}
