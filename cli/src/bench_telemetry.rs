//! `tern bench`, section 4: what a router with no OTLP endpoint pays for
//! carrying telemetry. Two router binaries, one built with the default
//! features and one built without the `otlp` feature (no exporter, no trace
//! context), run side by side as processes on the same etcd group, and the
//! same write workload goes to each in alternating rounds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tern_e2e::local::{Layout, LocalDeployment};
use tern_e2e::process::ChildGuard;
use tern_router::pb;

use crate::CliError;
use crate::bench::{BenchArgs, Round, ms, round, summarize};

/// Rounds per build; alternating, so machine noise hits both alike. The
/// ratio is of the per-round medians: one round that a busy machine slows
/// by 5% (it happens here) does not decide it.
const ROUNDS: usize = 5;

/// Builds tern-router with and without the `otlp` feature (same profile as
/// this binary) and keeps both under target/bench.
fn build_variants() -> Result<(PathBuf, PathBuf), CliError> {
    let root = tern_e2e::repo_root();
    let release = !cfg!(debug_assertions);
    let profile_dir = root.join("target").join(if release { "release" } else { "debug" });
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).map_err(|e| CliError::Setup(format!("{}: {e}", out.display())))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut built = Vec::new();
    for (name, features) in [
        ("tern-router-without-telemetry", &["--no-default-features"][..]),
        ("tern-router-with-telemetry", &[][..]),
    ] {
        println!("  telemetry: building {name}");
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(&root)
            .args(["build", "--quiet", "-p", "tern-router", "--bin", "tern-router"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .args(features)
            .status()
            .map_err(|e| CliError::Setup(format!("running {cargo}: {e}")))?;
        if !status.success() {
            return Err(CliError::Setup(format!("building {name} failed")));
        }
        let to = out.join(name);
        std::fs::copy(profile_dir.join("tern-router"), &to)
            .map_err(|e| CliError::Setup(format!("{}: {e}", to.display())))?;
        built.push(to);
    }
    Ok((built[1].clone(), built[0].clone()))
}

/// A router process serving us-east of `d`; no OTLP variable reaches it.
fn start_router(binary: &Path, d: &LocalDeployment, log: &Path) -> Result<(ChildGuard, SocketAddr), CliError> {
    let port = tern_e2e::assets::free_port();
    let mut cmd = Command::new(binary);
    cmd.args([
        "--region=us-east".to_string(),
        format!("--listen=127.0.0.1:{port}"),
        "--http-addr=127.0.0.1:0".to_string(),
        format!("--group-endpoints={}", d.region("us-east").group.endpoints().join(",")),
        format!("--directory-endpoints={}", d.directory.endpoints().join(",")),
        "--log-format=text".to_string(),
    ])
    .env("RUST_LOG", "warn")
    .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
    .env_remove("TERN_TRACE_SAMPLING_RATIO");
    let name = binary
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let child = ChildGuard::spawn(&name, cmd, log)?;
    Ok((child, SocketAddr::from(([127, 0, 0, 1], port))))
}

async fn wait_serving(addr: SocketAddr, child: &mut ChildGuard) -> Result<(), CliError> {
    for _ in 0..300 {
        child.check_running()?;
        let mut c = tern_e2e::local::connect(addr).await;
        if c.put(put("ready")).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(CliError::Setup(format!(
        "router at {addr} never served: {}",
        child.log_tail()
    )))
}

fn put(key: &str) -> pb::PutRequest {
    pb::PutRequest {
        account: "bench-otel".into(),
        key: key.into(),
        value: vec![7u8; 128],
        idempotency_key: String::new(),
    }
}

async fn writes(addr: SocketAddr, args: &BenchArgs) -> Round {
    let client = tern_e2e::local::connect(addr).await;
    round(args.concurrency, args.round_secs, move |w, n| {
        let mut c = client.clone();
        async move { c.put(put(&format!("{w}-{}", n % 64))).await.is_ok() }
    })
    .await
}

/// Runs section 4 and returns its report.
pub async fn run(args: &BenchArgs) -> Result<String, CliError> {
    let (with, without) = build_variants()?;
    // One etcd member: with three, each router's client may land on the
    // leader or on a follower that forwards its proposals, and that, not the
    // build, would decide which router is faster.
    let d = LocalDeployment::start(Layout {
        regions: vec![("us-east".into(), 1)],
        directory_members: 1,
        rtt_ms: Default::default(),
        agents: false,
        otlp_endpoint: None,
    })
    .await?;
    d.client("us-east")
        .await
        .create_account(pb::CreateAccountRequest {
            account: "bench-otel".into(),
            home_region: "us-east".into(),
            allowed_regions: vec![],
        })
        .await?;
    let (mut with_child, with_addr) = start_router(&with, &d, &d.dir.path().join("router-with.log"))?;
    let (mut without_child, without_addr) = start_router(&without, &d, &d.dir.path().join("router-without.log"))?;
    wait_serving(with_addr, &mut with_child).await?;
    wait_serving(without_addr, &mut without_child).await?;

    let mut with_rounds = Vec::new();
    let mut without_rounds = Vec::new();
    for r in 0..ROUNDS {
        // Alternate which build goes first, so neither always runs warm.
        let order = if r % 2 == 0 { [false, true] } else { [true, false] };
        for telemetry in order {
            let (addr, rounds, what) = if telemetry {
                (with_addr, &mut with_rounds, "built with telemetry, no endpoint")
            } else {
                (without_addr, &mut without_rounds, "built without telemetry")
            };
            println!("  telemetry round {}: router {what}", r + 1);
            rounds.push(writes(addr, args).await);
        }
    }
    with_child.check_running()?;
    without_child.check_running()?;
    let (w_tput, w_p50, w_p99) = summarize(&with_rounds);
    let (o_tput, o_p50, o_p99) = summarize(&without_rounds);
    let rates =
        |rounds: &[Round]| -> Vec<f64> { rounds.iter().map(|r| r.ops as f64 / r.elapsed.as_secs_f64()).collect() };
    let per_round = |rounds: &[Round]| {
        rates(rounds)
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let median = |rounds: &[Round]| {
        let mut r = rates(rounds);
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    Ok(format!(
        "## Telemetry with no endpoint ({} writers, {ROUNDS} × {} s rounds per build, alternating)\n\n\
         | router build | writes/s (all rounds) | median round | p50 | p99 | writes/s per round |\n|---|---:|---:|---:|---:|---|\n\
         | without the `otlp` feature | {o_tput:.0} | {:.0} | {:.2} ms | {:.2} ms | {} |\n\
         | default (telemetry compiled in, no endpoint) | {w_tput:.0} | {:.0} | {:.2} ms | {:.2} ms | {} |\n\n\
         Throughput ratio default/without, median rounds: **{:.3}** (target ≥ 0.98); all rounds: {:.3}. Both are \
         processes on the same one-member etcd group; nothing is exported (no endpoint).\n",
        args.concurrency,
        args.round_secs,
        median(&without_rounds),
        ms(o_p50),
        ms(o_p99),
        per_round(&without_rounds),
        median(&with_rounds),
        ms(w_p50),
        ms(w_p99),
        per_round(&with_rounds),
        median(&with_rounds) / median(&without_rounds),
        w_tput / o_tput,
    ))
}
