//! `tern bench`: the data plane's speed goals, measured side by side in one
//! run on this machine's real parts, printed as a table and written to
//! target/bench/report.md.
//!
//! 1. Router overhead: the same write workload (same concurrency, same value
//!    sizes) straight to etcd with etcd-client, and through a router, in
//!    alternating rounds so that machine noise hits both alike.
//! 2. Proxied writes: for every ordered region pair, the latency of a write
//!    sent to the origin's router for an account homed in the other region,
//!    divided by the round trip toxiproxy injects between them.
//! 3. Mirrors: p99 of the measured mirror lag while the source takes 1,000
//!    writes/s over an 80 ms link, and the mirror's apply throughput while it
//!    catches up with a burst.
//! 4. Telemetry: a router with no OTLP endpoint against one built without
//!    the `otlp` feature (`telemetry`); the two router binaries are named by
//!    flags, and without them the section is skipped.
//!
//! `--sections` picks some of them.

mod telemetry;
mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use tern_api::pb;
use tern_local::{Layout, LocalDeployment};

use self::telemetry::RouterBuilds;
use self::workload::{ms, quantile, round, summarize};
use crate::CliError;
use crate::binaries::AssetsArgs;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Seconds per measuring round (router overhead runs 3 rounds of each,
    /// the telemetry section 5 of each build).
    #[arg(long, default_value_t = 5)]
    round_secs: u64,
    /// Concurrent writers in the overhead and telemetry benchmarks.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Sequential proxied writes per region pair.
    #[arg(long, default_value_t = 50)]
    proxied_writes: usize,
    /// etcd members per region group.
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// Sections to run, comma separated (default: all).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "overhead,proxied,mirrors,telemetry"
    )]
    sections: Vec<Section>,
    /// Where to write the report.
    #[arg(long, default_value = "target/bench/report.md")]
    report: PathBuf,
    /// tern-router built with its default features, for the telemetry
    /// section (with --router-binary-without-otlp; e2e/bench.sh builds both).
    /// Without the two, that section is skipped.
    #[arg(
        long,
        env = "TERN_BENCH_ROUTER",
        value_name = "PATH",
        requires = "router_binary_without_otlp"
    )]
    router_binary: Option<PathBuf>,
    /// tern-router built with `--no-default-features` (no `otlp` feature),
    /// for the telemetry section.
    #[arg(
        long,
        env = "TERN_BENCH_ROUTER_WITHOUT_OTLP",
        value_name = "PATH",
        requires = "router_binary"
    )]
    router_binary_without_otlp: Option<PathBuf>,
    #[command(flatten)]
    assets: AssetsArgs,
}

impl BenchArgs {
    /// The two router builds of the telemetry section, when both are named.
    fn router_builds(&self) -> Option<RouterBuilds> {
        Some(RouterBuilds {
            with_otlp: self.router_binary.clone()?,
            without_otlp: self.router_binary_without_otlp.clone()?,
        })
    }
}

/// The sections of the report.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    /// Router versus direct etcd, in-region writes.
    Overhead,
    /// Proxied write latency over the injected round trip, per region pair.
    Proxied,
    /// Mirror lag at 1,000 writes/s and catch-up throughput.
    Mirrors,
    /// A router with no OTLP endpoint versus one built without telemetry.
    Telemetry,
}

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];

/// Rounds of each path in the overhead section.
const OVERHEAD_ROUNDS: usize = 3;

pub async fn run(args: BenchArgs) -> Result<(), CliError> {
    let wants = |s: Section| args.sections.contains(&s);
    // Checked first: the telemetry section runs last, after minutes of others.
    let builds = args.router_builds().filter(|_| wants(Section::Telemetry));
    if let Some(builds) = &builds {
        builds.check()?;
    }
    args.assets.apply()?;
    let mut report = String::from("# tern bench\n\n");
    report.push_str(&format!(
        "Machine: {} cores; etcd groups of {} members with fsync off, on one machine; {} build.\n\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        args.members,
        if cfg!(debug_assertions) { "debug" } else { "release" }
    ));
    if wants(Section::Overhead) || wants(Section::Proxied) {
        report.push_str(&data_plane(&args).await?);
    }
    if wants(Section::Mirrors) {
        let mirrors = mirror_bench(&args).await?;
        print!("\n{mirrors}");
        report.push_str(&mirrors);
    }
    if wants(Section::Telemetry) {
        let telemetry = match &builds {
            Some(builds) => telemetry::run(builds, args.concurrency, args.round_secs).await?,
            None => telemetry::SKIPPED.to_string(),
        };
        print!("\n{telemetry}");
        report.push_str(&telemetry);
    }
    if let Some(parent) = args.report.parent() {
        std::fs::create_dir_all(parent).map_err(|source| CliError::Io {
            path: parent.display().to_string(),
            source,
        })?;
    }
    std::fs::write(&args.report, &report).map_err(|source| CliError::Io {
        path: args.report.display().to_string(),
        source,
    })?;
    println!("\nreport written to {}", args.report.display());
    Ok(())
}

/// Sections 1 and 2, on one three-region deployment.
async fn data_plane(args: &BenchArgs) -> Result<String, CliError> {
    let wants = |s: Section| args.sections.contains(&s);
    let rtt: BTreeMap<(String, String), u64> = BTreeMap::from([
        (("us-east".into(), "eu-west".into()), 80),
        (("us-east".into(), "ap-south".into()), 220),
        (("eu-west".into(), "ap-south".into()), 180),
    ]);
    let layout = Layout {
        regions: REGIONS.iter().map(|r| (r.to_string(), args.members)).collect(),
        directory_members: 3,
        rtt_ms: rtt.clone(),
        agents: false,
        otlp_endpoint: None,
    };
    println!(
        "tern bench: starting 3 regions × {} etcd members, routers, toxiproxy",
        args.members
    );
    let d = LocalDeployment::start(layout).await?;
    let mut report = String::new();
    if wants(Section::Overhead) {
        let overhead = overhead(&d, args).await?;
        print!("\n{overhead}");
        report.push_str(&overhead);
    }
    if wants(Section::Proxied) {
        let table = proxied(&d, args).await?;
        print!("\n{table}");
        report.push_str(&table);
    }
    drop(d);
    Ok(report)
}

/// Section 1: the same in-region writes straight to etcd and through the
/// router, interleaved.
async fn overhead(d: &LocalDeployment, args: &BenchArgs) -> Result<String, CliError> {
    // 1. Router overhead, in-region.
    let mut admin = d.client("us-east").await;
    admin
        .create_account(pb::CreateAccountRequest {
            account: "bench".into(),
            home_region: "us-east".into(),
            allowed_regions: vec![],
        })
        .await?;
    let etcd = d.group_client("us-east").await;
    let router_addr = d
        .region("us-east")
        .router
        .as_ref()
        .map(|r| r.grpc_addr)
        .ok_or_else(|| CliError::Setup("no router".into()))?;
    let leader = {
        let i = d
            .region("us-east")
            .group
            .leader()
            .await
            .ok_or_else(|| CliError::Setup("us-east has no leader".into()))?;
        let url = d.region("us-east").group.endpoints()[i].clone();
        etcd_client::Client::connect([url], None)
            .await
            .map_err(|e| CliError::Setup(format!("us-east leader: {e}")))?
    };
    let value = vec![7u8; 128];
    let mut direct_rounds = Vec::new();
    let mut leader_rounds = Vec::new();
    let mut txn_rounds = Vec::new();
    let mut router_rounds = Vec::new();
    for r in 0..OVERHEAD_ROUNDS {
        // Plain puts, by a client of every member and by one of the leader.
        let puts = |client: &etcd_client::Client| {
            let client = client.clone();
            let v = value.clone();
            round(args.concurrency, args.round_secs, move |w, n| {
                let mut c = client.clone();
                let v = v.clone();
                async move { c.put(format!("/bench/direct/{w}/{}", n % 64), v, None).await.is_ok() }
            })
        };
        println!("  overhead round {}: direct etcd", r + 1);
        direct_rounds.push(puts(&etcd).await);
        println!("  overhead round {}: direct etcd, the leader alone", r + 1);
        leader_rounds.push(puts(&leader).await);
        println!(
            "  overhead round {}: direct etcd, the router's fenced transaction",
            r + 1
        );
        let txn_client = etcd.clone();
        let v = value.clone();
        txn_rounds.push(
            round(args.concurrency, args.round_secs, move |w, n| {
                let mut c = txn_client.clone();
                let v = v.clone();
                async move {
                    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
                    let txn = Txn::new()
                        .when([Compare::value("/tern/a/bench/fence", CompareOp::Equal, "1:active")])
                        .and_then([TxnOp::put(format!("/tern/a/bench/d/direct-{w}-{}", n % 64), v, None)])
                        .or_else([TxnOp::get("/tern/a/bench/fence", None)]);
                    c.txn(txn).await.is_ok_and(|r| r.succeeded())
                }
            })
            .await,
        );
        println!("  overhead round {}: through the router", r + 1);
        let v = value.clone();
        let client = tern_api::connect(router_addr).await;
        router_rounds.push(
            round(args.concurrency, args.round_secs, move |w, n| {
                let mut c = client.clone();
                let v = v.clone();
                async move {
                    c.put(pb::PutRequest {
                        account: "bench".into(),
                        key: format!("{w}-{}", n % 64),
                        value: v,
                        idempotency_key: String::new(),
                    })
                    .await
                    .is_ok()
                }
            })
            .await,
        );
    }
    let (direct_tput, direct_p50, direct_p99) = summarize(&direct_rounds);
    let (leader_tput, leader_p50, leader_p99) = summarize(&leader_rounds);
    let (txn_tput, txn_p50, txn_p99) = summarize(&txn_rounds);
    let (router_tput, router_p50, router_p99) = summarize(&router_rounds);
    // Each round's ratio next to its direct round: a slow spell of the
    // machine shows as one low round instead of hiding in the total.
    let per_round = direct_rounds
        .iter()
        .zip(&router_rounds)
        .map(|(d, r)| {
            format!(
                "{:.2}",
                r.ops as f64 / r.elapsed.as_secs_f64() / (d.ops as f64 / d.elapsed.as_secs_f64())
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let overhead = format!(
        "## Router overhead (in-region writes, {} writers, {OVERHEAD_ROUNDS} × {} s rounds each, interleaved)\n\n\
         | path | writes/s | p50 | p99 |\n|---|---:|---:|---:|\n\
         | etcd-client put, direct (client spread over all members) | {direct_tput:.0} | {:.2} ms | {:.2} ms |\n\
         | etcd-client put, direct to the Raft leader alone | {leader_tput:.0} | {:.2} ms | {:.2} ms |\n\
         | etcd-client fenced txn (the router's transaction), direct | {txn_tput:.0} | {:.2} ms | {:.2} ms |\n\
         | router Put (fenced txn, group commit, to the leader) | {router_tput:.0} | {:.2} ms | {:.2} ms |\n\n\
         Throughput ratio router/direct put: **{:.2}** (target ≥ 0.9; per round {per_round}). Added latency: p50 **{:+.2} ms** (target < 0.5 ms), p99 {:+.2} ms.\n\
         Against the best a plain client can do, a put to the leader alone: ratio {:.2}, p50 {:+.2} ms.\n\
         The fence costs etcd: ratio fenced txn/put {:.2} (both spread over all members).\n\n",
        args.concurrency,
        args.round_secs,
        ms(direct_p50),
        ms(direct_p99),
        ms(leader_p50),
        ms(leader_p99),
        ms(txn_p50),
        ms(txn_p99),
        ms(router_p50),
        ms(router_p99),
        router_tput / direct_tput,
        ms(router_p50) - ms(direct_p50),
        ms(router_p99) - ms(direct_p99),
        router_tput / leader_tput,
        ms(router_p50) - ms(leader_p50),
        txn_tput / direct_tput,
    );
    Ok(overhead)
}

/// Section 2: proxied writes per ordered region pair over the injected
/// round trip.
async fn proxied(d: &LocalDeployment, args: &BenchArgs) -> Result<String, CliError> {
    let mut admin = d.client("us-east").await;
    // 2. Proxied writes per ordered region pair.
    for home in REGIONS {
        admin
            .create_account(pb::CreateAccountRequest {
                account: format!("bench-{home}"),
                home_region: home.into(),
                allowed_regions: vec![],
            })
            .await?;
    }
    let mut table = String::from(
        "## Proxied writes (sequential, one client)\n\n| from → home | injected RTT | p50 | p99 | p50 / RTT | p99 / RTT |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for from in REGIONS {
        let mut client = d.client(from).await;
        for home in REGIONS {
            if from == home {
                continue;
            }
            let rtt_ms = d.layout.rtt(from, home);
            let account = format!("bench-{home}");
            // Warm the pooled channel: the first call pays the TCP and HTTP/2
            // handshakes, which a long-running router has paid long before.
            let _ = client.put(put(&account, "warm")).await;
            let mut lat = Vec::new();
            for i in 0..args.proxied_writes {
                let t = Instant::now();
                client.put(put(&account, &format!("k{i}"))).await?;
                lat.push(t.elapsed());
            }
            lat.sort_unstable();
            let (p50, p99) = (quantile(&lat, 0.5), quantile(&lat, 0.99));
            table.push_str(&format!(
                "| {from} → {home} | {rtt_ms} ms | {:.1} ms | {:.1} ms | **{:.3}** | {:.3} |\n",
                ms(p50),
                ms(p99),
                ms(p50) / rtt_ms as f64,
                ms(p99) / rtt_ms as f64
            ));
        }
    }
    table.push_str("\nTarget: p50 / RTT ≤ 1.1.\n");
    Ok(table)
}

/// Section 3: mirror lag under a steady 1,000 writes/s and apply throughput.
async fn mirror_bench(args: &BenchArgs) -> Result<String, CliError> {
    const ONE_WAY_MS: u64 = 40;
    println!(
        "  mirrors: starting us-east and eu-west with agents, {} ms round trip",
        2 * ONE_WAY_MS
    );
    let d = LocalDeployment::start(Layout {
        regions: vec![("us-east".into(), args.members), ("eu-west".into(), args.members)],
        directory_members: 1,
        rtt_ms: BTreeMap::from([(("us-east".into(), "eu-west".into()), 2 * ONE_WAY_MS)]),
        agents: true,
        otlp_endpoint: None,
    })
    .await?;
    let source = d.group_client("eu-west").await;
    let agent = d
        .region("us-east")
        .agent
        .as_ref()
        .ok_or_else(|| CliError::Setup("no agent".into()))?;
    let lag_metric = "tern_agent_mirror_lag_ms{source=\"eu-west\"}";
    let applied_metric = "tern_agent_mirror_applied_revisions_total{source=\"eu-west\"}";
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Steady 1,000 writes/s from 8 writers, lag sampled every 100 ms.
    let secs = args.round_secs * 2;
    let writers = 8u64;
    let per_writer_every = Duration::from_micros(1_000_000 * writers / 1000);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut c = source.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(per_writer_every);
            let mut n = 0u64;
            let mut done = 0u64;
            while Instant::now() < until {
                tick.tick().await;
                if c.put(
                    format!("/tern/a/bench-mirror/d/{w}-{}", n % 100),
                    n.to_le_bytes().to_vec(),
                    None,
                )
                .await
                .is_ok()
                {
                    done += 1;
                }
                n += 1;
            }
            done
        }));
    }
    let mut lags = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(l) = agent.metric(lag_metric).await {
            lags.push(l);
        }
    }
    let mut written = 0;
    for t in tasks {
        written += t.await.unwrap_or(0);
    }
    lags.sort_by(f64::total_cmp);
    let q = |p: f64| {
        lags.get(((lags.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let rate = written as f64 / secs as f64;

    // Burst: as fast as 16 writers go, then time the mirror's catch-up.
    let before = agent.metric(applied_metric).await.unwrap_or(0.0);
    let burst = 20_000u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let mut c = source.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..burst / 16 {
                let _ = c
                    .put(
                        format!("/tern/a/bench-mirror/d/burst-{w}-{}", n % 100),
                        vec![1u8; 64],
                        None,
                    )
                    .await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let written_in = started.elapsed();
    let target = before + burst as f64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while agent.metric(applied_metric).await.unwrap_or(0.0) < target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let caught_up = started.elapsed();
    let applied = agent.metric(applied_metric).await.unwrap_or(0.0) - before;
    drop(d);
    Ok(format!(
        "## Mirrors (us-east mirroring eu-west over a {} ms round trip)\n\n| measure | value |\n|---|---:|\n| steady source write rate | {rate:.0} writes/s |\n| mirror lag p50 / p99 / max while steady | {:.0} / **{:.0}** / {:.0} ms |\n| burst of {burst} writes: source took | {:.1} s ({:.0} writes/s) |\n| mirror applied them by | {:.1} s → **{:.0} source revisions/s** applied |\n\nTarget: p99 lag under 200 ms plus the one-way delay ({} ms) at 1,000 writes/s.\n",
        2 * ONE_WAY_MS,
        q(0.5),
        q(0.99),
        q(1.0),
        written_in.as_secs_f64(),
        burst as f64 / written_in.as_secs_f64(),
        caught_up.as_secs_f64(),
        applied / caught_up.as_secs_f64(),
        200 + ONE_WAY_MS,
    ))
}

fn put(account: &str, key: &str) -> pb::PutRequest {
    pb::PutRequest {
        account: account.into(),
        key: key.into(),
        value: b"v".to_vec(),
        idempotency_key: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::BenchArgs;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        Command::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.bench)
    }

    #[test]
    fn telemetry_runs_only_with_both_router_builds() {
        let none = parse(&[]).expect("no flags parse");
        assert!(
            none.router_builds().is_none(),
            "nothing to compare: the section is skipped"
        );
        let both = parse(&["--router-binary", "/a", "--router-binary-without-otlp", "/b"]).expect("both parse");
        let builds = both.router_builds().expect("both named");
        assert_eq!(builds.with_otlp, std::path::Path::new("/a"));
        assert_eq!(builds.without_otlp, std::path::Path::new("/b"));
        for one in [["--router-binary", "/a"], ["--router-binary-without-otlp", "/b"]] {
            let err = parse(&one).expect_err("one build alone is refused");
            assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        }
    }

    #[test]
    fn a_named_build_that_is_not_there_is_a_usage_error_naming_its_flag() {
        let args = parse(&[
            "--router-binary",
            "/nonexistent/a",
            "--router-binary-without-otlp",
            "/nonexistent/b",
        ])
        .expect("both parse");
        let err = args
            .router_builds()
            .expect("both named")
            .check()
            .expect_err("no such files");
        assert!(err.to_string().starts_with("--router-binary /nonexistent/a"), "{err}");
    }
}
