//! `tern bench`, section 4: what a router with no OTLP endpoint pays for
//! carrying telemetry. Two router binaries, one built with the default
//! features and one built without the `otlp` feature (no exporter, no trace
//! context), run side by side as processes on the same etcd group, and the
//! same write workload goes to each in alternating rounds. The binaries are
//! given (`--router-binary`, `--router-binary-without-otlp`), not built here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tern_api::pb;
use tern_local::process::ChildGuard;
use tern_local::{Layout, LocalDeployment};

use super::workload::{Round, ms, round, summarize};
use crate::CliError;

/// Rounds per build; alternating, so machine noise hits both alike. The
/// ratio is of the per-round medians: one round that a busy machine slows
/// by 5% (it happens here) does not decide it.
const ROUNDS: usize = 5;

/// The two router binaries compared, named on the command line: a `tern`
/// installed without its source benches them as well as one in a checkout.
pub struct RouterBuilds {
    /// Built with the default features (telemetry compiled in).
    pub with_otlp: PathBuf,
    /// Built with `--no-default-features`.
    pub without_otlp: PathBuf,
}

impl RouterBuilds {
    /// An error naming the flag whose binary is not there.
    pub fn check(&self) -> Result<(), CliError> {
        for (flag, path) in [
            ("--router-binary", &self.with_otlp),
            ("--router-binary-without-otlp", &self.without_otlp),
        ] {
            if !path.is_file() {
                return Err(CliError::Usage(format!("{flag} {}: no such file", path.display())));
            }
        }
        Ok(())
    }
}

/// The section's text when the two builds are not named.
pub const SKIPPED: &str = "## Telemetry with no endpoint\n\n\
Skipped: this section compares two router builds, named with `--router-binary PATH` (default features) and \
`--router-binary-without-otlp PATH` (`cargo build --release -p tern-router --no-default-features`), or \
TERN_BENCH_ROUTER and TERN_BENCH_ROUTER_WITHOUT_OTLP. In a checkout, `e2e/bench.sh` builds both and passes them.\n";

/// A router process (`name`) serving us-east of `d`; no OTLP variable
/// reaches it. Its log goes to `name`.log in the deployment's directory.
fn start_router(name: &str, binary: &Path, d: &LocalDeployment) -> Result<(ChildGuard, SocketAddr), CliError> {
    let port = tern_local::assets::free_port();
    let mut cmd = Command::new(binary);
    cmd.args([
        "--region=us-east".to_string(),
        format!("--listen=127.0.0.1:{port}"),
        "--http-addr=127.0.0.1:0".to_string(),
        format!("--group-endpoints={}", d.region("us-east").group.endpoints().join(",")),
        format!("--directory-endpoints={}", d.directory.endpoints().join(",")),
        "--log-format=text".to_string(),
        // Both builds alike: the section measures trace export only.
        "--region-lease=false".to_string(),
    ])
    .env("RUST_LOG", "warn")
    .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
    .env_remove("TERN_TRACE_SAMPLING_RATIO");
    let child = ChildGuard::spawn(name, cmd, &d.dir.path().join(format!("{name}.log")))?;
    Ok((child, SocketAddr::from(([127, 0, 0, 1], port))))
}

async fn wait_serving(addr: SocketAddr, child: &mut ChildGuard) -> Result<(), CliError> {
    for _ in 0..300 {
        child.check_running()?;
        let mut c = tern_api::connect(addr).await;
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

async fn writes(addr: SocketAddr, concurrency: usize, round_secs: u64) -> Round {
    let client = tern_api::connect(addr).await;
    round(concurrency, round_secs, move |w, n| {
        let mut c = client.clone();
        async move { c.put(put(&format!("{w}-{}", n % 64))).await.is_ok() }
    })
    .await
}

/// Runs section 4 with `concurrency` writers and rounds of `round_secs`,
/// and returns its report.
pub async fn run(builds: &RouterBuilds, concurrency: usize, round_secs: u64) -> Result<String, CliError> {
    // One etcd member: with three, each router's client may land on the
    // leader or on a follower that forwards its proposals, and that, not the
    // build, would decide which router is faster.
    let d = LocalDeployment::start(Layout::one_region("us-east")).await?;
    d.client("us-east")
        .await
        .create_account(pb::CreateAccountRequest {
            account: "bench-otel".into(),
            home_region: "us-east".into(),
            allowed_regions: vec![],
        })
        .await?;
    let (mut with_child, with_addr) = start_router("router-with-otlp", &builds.with_otlp, &d)?;
    let (mut without_child, without_addr) = start_router("router-without-otlp", &builds.without_otlp, &d)?;
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
            rounds.push(writes(addr, concurrency, round_secs).await);
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
        concurrency,
        round_secs,
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
