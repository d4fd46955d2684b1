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
//! 3. Mirrors: p99 of the measured mirror lag while the source takes writes
//!    at the router's sustained rate (section 1) over an 80 ms link, and the
//!    mirror's catch-up rate from a backlog next to `etcdctl make-mirror`.
//! 4. Telemetry: a router with no OTLP endpoint against one built without
//!    the `otlp` feature (`telemetry`); the two router binaries are named by
//!    flags, and without them the section is skipped.
//! 5. Scale: a directory of a million accounts: router cold start, memory
//!    per cached account, lookup latency, placement propagation.
//! 6. Migrations: write unavailability of a move per region pair, bulk moves, a drain.
//! 7. Failover: the recovery time of a region killed whole, at 10 and at
//!    100,000 accounts side by side.
//! 8. TLS: router writes in a plain deployment and in one with TLS on every
//!    link, alternating rounds.
//!
//! `--sections` picks some of them.

mod failover;
mod migrations;
mod mirrors;
mod scale;
mod telemetry;
mod tls;
mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

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
        default_value = "overhead,proxied,mirrors,telemetry,scale,migrations,failover,tls"
    )]
    sections: Vec<Section>,
    /// Accounts in the directory for the scale section.
    #[arg(long, default_value_t = 1_000_000)]
    scale_accounts: usize,
    /// Moves per ordered region pair in the migrations section.
    #[arg(long, default_value_t = 10)]
    migration_moves: usize,
    /// Accounts moved at once out of one region in the migrations section.
    #[arg(long, default_value_t = 200)]
    migration_bulk: usize,
    /// Accounts homed in the killed region in the failover section (also
    /// run with 10, side by side).
    #[arg(long, default_value_t = 100_000)]
    failover_accounts: usize,
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
    /// Mirror lag at the router's sustained rate and catch-up throughput next to make-mirror.
    Mirrors,
    /// A router with no OTLP endpoint versus one built without telemetry.
    Telemetry,
    /// A directory of a million accounts.
    Scale,
    /// Write unavailability of a move per region pair, bulk moves, and how
    /// fast a drain empties a region.
    Migrations,
    /// Recovery time of a region killed whole, at 10 and at many accounts.
    Failover,
    /// Router writes with TLS on every link versus plain TCP.
    Tls,
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
    // The router's sustained write rate, once the overhead section has
    // measured it: the mirror must keep up with the fastest writer.
    let mut router_rate = None;
    if wants(Section::Overhead) || wants(Section::Proxied) {
        let (section, rate) = data_plane(&args).await?;
        report.push_str(&section);
        router_rate = rate;
    }
    if wants(Section::Mirrors) {
        let mirrors = mirrors::run(args.members, args.round_secs, router_rate).await?;
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
    if wants(Section::Scale) {
        let scale = scale::run(args.scale_accounts).await?;
        print!("\n{scale}");
        report.push_str(&scale);
    }
    if wants(Section::Migrations) {
        let section = migrations::run(args.members, args.migration_moves, args.migration_bulk).await?;
        print!("\n{section}");
        report.push_str(&section);
    }
    if wants(Section::Failover) {
        let section = failover::run(args.members, args.failover_accounts).await?;
        print!("\n{section}");
        report.push_str(&section);
    }
    if wants(Section::Tls) {
        let section = tls::run(&args).await?;
        print!("\n{section}");
        report.push_str(&section);
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

/// Sections 1 and 2, on one three-region deployment; with the router's
/// sustained write rate when section 1 ran.
async fn data_plane(args: &BenchArgs) -> Result<(String, Option<f64>), CliError> {
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
        tls: false,
    };
    println!(
        "tern bench: starting 3 regions × {} etcd members, routers, toxiproxy",
        args.members
    );
    let d = LocalDeployment::start(layout).await?;
    let mut report = String::new();
    let mut rate = None;
    if wants(Section::Overhead) {
        let (overhead, router_tput) = overhead(&d, args).await?;
        print!("\n{overhead}");
        report.push_str(&overhead);
        rate = Some(router_tput);
    }
    if wants(Section::Proxied) {
        let table = proxied(&d, args).await?;
        print!("\n{table}");
        report.push_str(&table);
    }
    drop(d);
    Ok((report, rate))
}

/// Section 1: the same in-region writes straight to etcd and through the
/// router, interleaved. Also returns the router's throughput.
async fn overhead(d: &LocalDeployment, args: &BenchArgs) -> Result<(String, f64), CliError> {
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
    Ok((overhead, router_tput))
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
