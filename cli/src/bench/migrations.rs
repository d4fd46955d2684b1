//! Section `migrations`: how long a move keeps an account from taking
//! writes, per region pair, against the design's 2·RTT(S,T) + 50 ms; and
//! how many accounts per second leave one region when many moves are asked
//! for at once (what draining a region will cost).
//!
//! Three regions with the demo's round trips, agents carrying the moves
//! out. The unavailability of a move is measured twice: as its agent
//! records it in the intent (from just before the fence is sent to the
//! copy landing in the target, when writes commit there again;
//! docs/migrations.md), and as clients see it: one writer in the source's
//! region and one in the target's write back to back through their own
//! routers, and the gap is from the last write acknowledged as committed in
//! the source to the first acknowledged as committed in the target.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tern_api::pb;
use tern_common::{AccountId, MigrationId, MigrationPhase, RegionName};
use tern_local::{Layout, LocalDeployment, migrations};

use crate::CliError;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

fn rtt_table() -> BTreeMap<(String, String), u64> {
    BTreeMap::from([
        (("us-east".into(), "eu-west".into()), 80),
        (("us-east".into(), "ap-south".into()), 220),
        (("eu-west".into(), "ap-south".into()), 180),
    ])
}

fn q(sorted: &[u64], p: f64) -> u64 {
    sorted
        .get(((sorted.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or(0)
}

fn setup_error(what: &str) -> impl Fn(tern_local::LocalError) -> CliError + '_ {
    move |e| CliError::Setup(format!("{what}: {e}"))
}

pub async fn run(members: usize, per_pair: usize, bulk: usize) -> Result<String, CliError> {
    println!("  migrations: starting 3 regions × {members} etcd members with agents");
    let rtt = rtt_table();
    let mut d = LocalDeployment::start(Layout {
        regions: REGIONS.iter().map(|r| (r.to_string(), members)).collect(),
        directory_members: 3,
        rtt_ms: rtt.clone(),
        agents: true,
        otlp_endpoint: None,
        tls: false,
    })
    .await?;
    // No per-minute limit: the bulk phase measures the executor, not it.
    for region in REGIONS {
        if let Some(a) = d.region_mut(region).agent.take() {
            a.stop().await;
        }
        let agent = d
            .start_agent(
                region,
                &[
                    "--migrations-per-minute=1000000".into(),
                    "--drain-moves-per-minute=1000000".into(),
                ],
            )
            .await?;
        d.region_mut(region).agent = Some(agent);
    }
    let dir = d.directory_client().await;
    // Every mirror measured (a move refuses to start before).
    let until = Instant::now() + Duration::from_secs(60);
    for region in REGIONS {
        let agent = d
            .region(region)
            .agent
            .as_ref()
            .ok_or_else(|| CliError::Setup("no agent".into()))?;
        for source in REGIONS.iter().filter(|s| **s != region) {
            let metric = format!("tern_agent_mirror_lag_ms{{source=\"{source}\"}}");
            while !agent.metric(&metric).await.is_some_and(|l| l < 1e12) {
                if Instant::now() > until {
                    return Err(CliError::Setup(format!(
                        "{region}'s mirror of {source} never measured its lag"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    let mut rows = String::new();
    let mut n = 0usize;
    for s in REGIONS {
        for t in REGIONS.iter().filter(|t| **t != s) {
            println!("  migrations: {per_pair} moves {s} → {t}");
            let mut client = d.client(s).await;
            let mut waited = Vec::new();
            let mut gaps = Vec::new();
            let mut failed = 0;
            for _ in 0..per_pair {
                n += 1;
                let account = format!("mig-{n}");
                client
                    .create_account(pb::CreateAccountRequest {
                        account: account.clone(),
                        home_region: s.into(),
                        allowed_regions: vec![],
                    })
                    .await?;
                for k in 0..3 {
                    client
                        .put(pb::PutRequest {
                            account: account.clone(),
                            key: format!("k{k}"),
                            value: vec![7u8; 64],
                            idempotency_key: format!("i{k}"),
                        })
                        .await?;
                }
                // Let the target's mirror hold the account first, as it
                // would for an account that has lived somewhere a while.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let stop = Arc::new(AtomicBool::new(false));
                let mut writers = Vec::new();
                for via in [s, *t] {
                    writers.push(tokio::spawn(write_back_to_back(
                        d.client(via).await,
                        account.clone(),
                        stop.clone(),
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                let r = move_one(&dir, &format!("bench-{n}"), &account, t, s).await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
                stop.store(true, Ordering::Relaxed);
                let mut acks = Vec::new();
                for w in writers {
                    acks.extend(w.await.map_err(|e| CliError::Setup(format!("a writer: {e}")))??);
                }
                match (r.phase, r.unavailable_ms) {
                    (MigrationPhase::Completed, Some(ms)) => waited.push(ms),
                    _ => failed += 1,
                }
                let last_in_source = acks.iter().filter(|(_, home)| home == s).map(|(at, _)| *at).max();
                let first_in_target = acks.iter().filter(|(_, home)| home == t).map(|(at, _)| *at).min();
                if let (Some(last), Some(first)) = (last_in_source, first_in_target) {
                    gaps.push(first.saturating_duration_since(last).as_millis() as u64);
                }
            }
            waited.sort_unstable();
            gaps.sort_unstable();
            let rtt_ms = rtt
                .get(&(s.to_string(), t.to_string()))
                .or_else(|| rtt.get(&(t.to_string(), s.to_string())))
                .copied()
                .unwrap_or(0);
            let target = 2 * rtt_ms + 50;
            let p99 = q(&waited, 0.99);
            let gap_p99 = q(&gaps, 0.99);
            rows.push_str(&format!(
                "| {s} → {t} | {rtt_ms} ms | {}{} | {} ms | **{p99} ms** | {} ms | {} ms | **{gap_p99} ms** | {target} ms | {} |\n",
                waited.len(),
                if failed > 0 {
                    format!(" ({failed} failed)")
                } else {
                    String::new()
                },
                q(&waited, 0.5),
                waited.last().copied().unwrap_or(0),
                q(&gaps, 0.5),
                if p99.max(gap_p99) <= target && failed == 0 && gaps.len() == waited.len() {
                    "met"
                } else {
                    "**not met**"
                },
            ));
        }
    }

    println!("  migrations: {bulk} moves us-east → eu-west at once");
    let mut client = d.client("us-east").await;
    let mut accounts = Vec::new();
    for i in 0..bulk {
        let account = format!("bulk-{i}");
        client
            .create_account(pb::CreateAccountRequest {
                account: account.clone(),
                home_region: "us-east".into(),
                allowed_regions: vec![],
            })
            .await?;
        client
            .put(pb::PutRequest {
                account: account.clone(),
                key: "k".into(),
                value: vec![7u8; 64],
                idempotency_key: String::new(),
            })
            .await?;
        accounts.push(account);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let to = RegionName::new("eu-west").map_err(|e| CliError::Setup(e.to_string()))?;
    let from = RegionName::new("us-east").map_err(|e| CliError::Setup(e.to_string()))?;
    // Asked for together, as a drain would.
    let mut ids = Vec::new();
    let mut asks = tokio::task::JoinSet::new();
    for (i, account) in accounts.iter().enumerate() {
        let id = MigrationId::new(format!("bulk-{i}")).map_err(|e| CliError::Setup(e.to_string()))?;
        let a = AccountId::new(account.as_str()).map_err(|e| CliError::Setup(e.to_string()))?;
        let (dir, to, from, id2) = (dir.clone(), to.clone(), from.clone(), id.clone());
        asks.spawn(async move { migrations::request(&dir, &id2, &a, &to, Some(from), "bench").await });
        ids.push(id);
    }
    while let Some(asked) = asks.join_next().await {
        asked
            .map_err(|e| CliError::Setup(format!("asking for a bulk move: {e}")))?
            .map_err(setup_error("asking for a bulk move"))?;
    }
    let mut completed = 0;
    // Where a bulk move's time goes: waiting for its turn (asked → started)
    // and being carried out (started → finished).
    let (mut queued, mut carried) = (Vec::new(), Vec::new());
    // From the intents' own times: the first asked for to the last
    // finished (reading 200 intents back one by one takes a while itself).
    let (mut first_asked, mut last_finished) = (u64::MAX, 0u64);
    for id in &ids {
        let r = migrations::wait(&dir, id, Duration::from_secs(600), |_| {})
            .await
            .map_err(setup_error("waiting for a bulk move"))?;
        if r.phase == MigrationPhase::Completed {
            completed += 1;
        }
        if let (Some(s), Some(f)) = (r.started_ms, r.finished_ms) {
            queued.push(s.saturating_sub(r.requested_ms));
            carried.push(f.saturating_sub(s));
            first_asked = first_asked.min(r.requested_ms);
            last_finished = last_finished.max(f);
        }
    }
    let took = if last_finished > first_asked {
        Duration::from_millis(last_finished - first_asked)
    } else {
        started.elapsed()
    };
    queued.sort_unstable();
    carried.sort_unstable();
    let (drained, drain_took) = drain(&d, bulk).await?;
    drop(d);
    Ok(format!(
        "## Migrations (3 regions, the demo's round trips, {members} etcd members each)\n\n\
         Write unavailability of a move, {per_pair} moves per ordered pair, one at a time, \
         each account with 3 keys and 3 idempotency records, written back to back during the \
         move by one client in the source's region and one in the target's. *Agent*: fence \
         sent to the copy landing in the target, as the target's agent records it; *clients*: \
         last write acknowledged as committed in the source to the first acknowledged as \
         committed in the target.\n\n\
         | source → target | RTT | moves | agent p50 | agent p99 | agent max | clients p50 | clients p99 | target 2·RTT + 50 ms | |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n{rows}\n\
         Bulk: {bulk} moves us-east → eu-west asked for at once: {completed} completed, the first asked for to the last finished in \
         {:.1} s, **{:.1} accounts/s** (the target's agent carries out up to 16 at once); \
         a move waited p50 {} ms / max {} ms for its turn and took p50 {} ms / p99 {} ms from \
         its start to its completion.\n\n\
         Drain: ap-south drained (`tern drain`) of {drained} accounts in {:.1} s, **{:.1} accounts/s** \
         into us-east and eu-west (16 moves under way at once, the drain's pace unlimited here; \
         its default, `--drain-moves-per-minute` 600, is 10/s).\n",
        took.as_secs_f64(),
        completed as f64 / took.as_secs_f64(),
        q(&queued, 0.5),
        queued.last().copied().unwrap_or(0),
        q(&carried, 0.5),
        q(&carried, 0.99),
        drain_took.as_secs_f64(),
        drained as f64 / drain_took.as_secs_f64().max(0.001),
    ))
}

/// Creates `n` accounts in ap-south (a write each), drains the region and
/// waits until no account is homed there: the accounts moved and how long
/// it took from setting the drain.
async fn drain(d: &LocalDeployment, n: usize) -> Result<(u64, Duration), CliError> {
    println!("  migrations: draining ap-south of {n} accounts (and those moved there)");
    let mut client = d.client("ap-south").await;
    for i in 0..n {
        let account = format!("drain-bench-{i}");
        client
            .create_account(pb::CreateAccountRequest {
                account: account.clone(),
                home_region: "ap-south".into(),
                allowed_regions: vec![],
            })
            .await?;
        client
            .put(pb::PutRequest {
                account,
                key: "k".into(),
                value: vec![7u8; 64],
                idempotency_key: String::new(),
            })
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let region = RegionName::new("ap-south").map_err(|e| CliError::Setup(e.to_string()))?;
    let mut dir = d.directory_client().await;
    let set_at = tern_common::unix_ms();
    let started = Instant::now();
    tern_common::drain::set_draining(&mut dir, &region, true)
        .await
        .map_err(|e| CliError::Setup(format!("draining ap-south: {e}")))?;
    let until = started + Duration::from_secs(600);
    loop {
        let found = dir
            .get(tern_common::dir_region_key(&region), None)
            .await
            .map_err(|source| CliError::EtcdRequest {
                what: "reading ap-south's record".into(),
                source,
            })?;
        let progress = found
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<tern_common::RegionRecord>(kv.value()).ok())
            .and_then(|r| r.drain)
            .filter(|p| p.updated_ms >= set_at);
        if let Some(p) = progress.filter(|p| p.homed == 0 && p.moving == 0) {
            return Ok((p.moved, started.elapsed()));
        }
        if Instant::now() > until {
            return Err(CliError::Setup("ap-south was not drained within 600 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `account` back to back through `client` until `stop`; returns
/// when each write was acknowledged and the region it committed in.
async fn write_back_to_back(
    mut client: tern_api::RouterClient,
    account: String,
    stop: Arc<AtomicBool>,
) -> Result<Vec<(Instant, String)>, CliError> {
    let mut acks = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let resp = client
            .put(pb::PutRequest {
                account: account.clone(),
                key: "during-move".into(),
                value: n.to_le_bytes().to_vec(),
                idempotency_key: String::new(),
            })
            .await?
            .into_inner();
        let home = resp.meta.map(|m| m.home_region).unwrap_or_default();
        acks.push((Instant::now(), home));
    }
    Ok(acks)
}

async fn move_one(
    dir: &etcd_client::Client,
    id: &str,
    account: &str,
    to: &str,
    from: &str,
) -> Result<tern_common::MigrationRecord, CliError> {
    let bad = |e: tern_common::InvalidInput| CliError::Setup(e.to_string());
    let id = MigrationId::new(id).map_err(bad)?;
    let a = AccountId::new(account).map_err(bad)?;
    let t = RegionName::new(to).map_err(bad)?;
    let f = RegionName::new(from).map_err(bad)?;
    migrations::request(dir, &id, &a, &t, Some(f), "bench")
        .await
        .map_err(setup_error("asking for a move"))?;
    migrations::wait(dir, &id, Duration::from_secs(60), |_| {})
        .await
        .map_err(setup_error("waiting for a move"))
}
