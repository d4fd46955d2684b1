//! `tern verify`: randomized runs of a mixed workload against a local
//! three-region deployment while toxiproxy injects faults on the links
//! between regions; every operation is recorded as a tern-verify history
//! and judged by its checkers (linearizability per key, what etcd applied
//! against what clients were told, bounded staleness). Each run writes its
//! history as JSON lines next to a report, so a failure can be checked
//! again offline.
//!
//! Modules: `workload` (the clients and the final round), `nemesis` (the
//! faults and their healing), `moves` (accounts migrated during the run),
//! `etcd_history` (what etcd applied, watched for the whole run).

mod etcd_history;
mod lost;
mod moves;
mod nemesis;
mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
pub use nemesis::Fault;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tern_local::{Binaries, Layout, LocalDeployment};
use tern_verify::{History, Outcome};

use crate::CliError;
use crate::binaries::AssetsArgs;

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
/// Keys per account.
const KEYS: usize = 2;
/// Deadline of every request.
const DEADLINE: Duration = Duration::from_secs(2);
/// How long the linearizability search may take per key.
const PER_KEY: Duration = Duration::from_secs(30);
/// The bound of BOUNDED reads.
const BOUND_MS: u32 = 1000;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Runs, each on a deployment of its own.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// Seed of the first run (run i uses seed + i); default: random.
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds of workload per run; the faults hold the middle third.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Clients per region, each with its own connection to its region's router.
    #[arg(long, default_value_t = 2)]
    clients: usize,
    /// Accounts homed in each region.
    #[arg(long, default_value_t = 2)]
    accounts: usize,
    /// Most operations per second per client.
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// Weights of the operations: put, cas (compare-and-set on the value or
    /// on absence), delete, get (STRONG) and bounded (BOUNDED(1 s) get);
    /// names left out weigh 0.
    #[arg(
        long,
        default_value = "put=30,cas=20,delete=10,get=20,bounded=20",
        value_parser = workload::Mix::parse
    )]
    mix: workload::Mix,
    /// Faults to draw from, comma separated; each run injects one or two:
    /// run i the (seed + i)-th of the list, so consecutive runs cover them
    /// all, and half of the runs one more drawn at random.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "reset,limit,latency,mirror-delay,blackhole,partition,kill-router,pause-router,kill-agent,pause-agent,kill-member,kill-leader,pause-leader,compaction,clock-offset,bandwidth,drain"
    )]
    faults: Vec<Fault>,
    /// Accounts moved to another region during each run (the migration
    /// protocol, asked for one after another over the run, faults or not);
    /// 0: none.
    #[arg(long, default_value_t = 3)]
    moves: usize,
    /// Agents move accounts by themselves too: follow the sun with a 10 s
    /// window, the default threshold (3 writes), a 5 s cooldown, looking
    /// every 500 ms (routers publish their counts as often). Every client
    /// writes every account, so accounts move whenever one region's writes
    /// happen to dominate.
    #[arg(long)]
    follow_the_sun: bool,
    /// Run the deployment with TLS on every link (certificates from a CA
    /// made for the run; etcd and routers require client certificates).
    #[arg(long)]
    tls: bool,
    /// The tern-router binary the deployment runs (as processes, to kill
    /// and pause); default: beside this `tern`.
    #[arg(long, value_name = "PATH")]
    router_binary: Option<PathBuf>,
    /// The tern-agent binary; default: beside this `tern`.
    #[arg(long, value_name = "PATH")]
    agent_binary: Option<PathBuf>,
    /// Where histories and reports go.
    #[arg(long, default_value = "target/verify")]
    out: PathBuf,
    /// Check a saved history again instead of running (HISTORY.jsonl, with
    /// what etcd applied in HISTORY.applied.json beside it when saved).
    #[arg(long, value_name = "HISTORY")]
    check: Option<PathBuf>,
    #[command(flatten)]
    assets: AssetsArgs,
}

/// What one run found.
#[derive(Debug)]
pub struct RunReport {
    pub seed: u64,
    pub ops: usize,
    pub faults: Vec<String>,
    pub by_outcome: BTreeMap<&'static str, usize>,
    pub violations: Vec<tern_verify::Violation>,
    pub unknown_keys: Vec<String>,
    pub history: PathBuf,
    pub moves: moves::Moves,
    /// Writes lost with a region, as its quarantine reported them.
    pub lost: lost::Lost,
}

pub async fn run(args: VerifyArgs) -> Result<(), CliError> {
    if let Some(path) = &args.check {
        return check_saved(path);
    }
    if args.runs == 0 || args.clients == 0 || args.accounts == 0 || args.rate == 0 || args.duration < 6 {
        return Err(CliError::Usage(
            "--runs, --clients, --accounts and --rate are at least 1, --duration at least 6".into(),
        ));
    }
    if args.faults.is_empty() {
        return Err(CliError::Usage("--faults names at least one fault".into()));
    }
    let binaries = binaries(&args)?;
    args.assets.apply()?;
    std::fs::create_dir_all(&args.out).map_err(|source| CliError::Io {
        path: args.out.display().to_string(),
        source,
    })?;
    let first = args.seed.unwrap_or_else(rand::random);
    let mut failed = 0;
    for i in 0..u64::from(args.runs) {
        let report = run_once(&args, &binaries, first.wrapping_add(i)).await?;
        print_report(&report);
        if !report.violations.is_empty() || !report.unknown_keys.is_empty() {
            failed += 1;
        }
    }
    if failed > 0 {
        return Err(CliError::Setup(format!(
            "{failed} of {} runs found violations (histories in {})",
            args.runs,
            args.out.display()
        )));
    }
    Ok(())
}

/// The router and agent binaries: named, or beside this `tern` (cargo
/// builds them there with `cargo build` or the test suite).
fn binaries(args: &VerifyArgs) -> Result<Binaries, CliError> {
    let here = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(std::path::Path::to_path_buf))
        .unwrap_or_default();
    let mut found = match Binaries::in_dir(&here) {
        Ok(b) => b,
        Err(e) if args.router_binary.is_none() || args.agent_binary.is_none() => return Err(e.into()),
        Err(_) => Binaries {
            router: PathBuf::new(),
            agent: PathBuf::new(),
        },
    };
    for (flag, given, slot) in [
        ("--router-binary", &args.router_binary, &mut found.router),
        ("--agent-binary", &args.agent_binary, &mut found.agent),
    ] {
        if let Some(path) = given {
            if !path.is_file() {
                return Err(CliError::Usage(format!("{flag} {}: no such file", path.display())));
            }
            *slot = path.clone();
        }
    }
    Ok(found)
}

/// Where a history's applied values are saved.
fn applied_path(history: &std::path::Path) -> PathBuf {
    history.with_extension("applied.json")
}

fn save_applied(history: &std::path::Path, applied: &tern_verify::applied::Applied) -> Result<(), CliError> {
    let path = applied_path(history);
    let text = serde_json::to_string_pretty(applied).expect("a map of strings serialises");
    std::fs::write(&path, text).map_err(|source| CliError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Where a run's quarantined writes are saved (runs that lose a region).
fn quarantine_path(history: &std::path::Path) -> PathBuf {
    history.with_extension("quarantine.json")
}

/// `--check`: the checkers again on a saved history, offline.
fn check_saved(path: &std::path::Path) -> Result<(), CliError> {
    let mut history = History::load(path).map_err(|e| CliError::Setup(e.to_string()))?;
    let applied_file = applied_path(path);
    let mut applied: Option<tern_verify::applied::Applied> = match std::fs::read_to_string(&applied_file) {
        Ok(text) => {
            Some(serde_json::from_str(&text).map_err(|e| CliError::Setup(format!("{}: {e}", applied_file.display())))?)
        }
        Err(_) => {
            println!("no {}: the applied checker is skipped", applied_file.display());
            None
        }
    };
    let mut violations = Vec::new();
    if let Ok(text) = std::fs::read_to_string(quarantine_path(path)) {
        let quarantined: Vec<tern_common::QuarantinedWrite> = serde_json::from_str(&text)
            .map_err(|e| CliError::Setup(format!("{}: {e}", quarantine_path(path).display())))?;
        let mut none = tern_verify::applied::Applied::new();
        let lost = lost::reconcile(&mut history, applied.as_mut().unwrap_or(&mut none), &quarantined);
        violations.extend(lost.violations);
    }
    let lin = tern_verify::judge(&history, applied.as_ref(), PER_KEY);
    violations.extend(lin.violations.iter().cloned());
    let violations = &violations;
    println!(
        "{}: {} ops, {} keys, {} violations{}",
        path.display(),
        history.records.len(),
        lin.keys,
        violations.len(),
        if lin.unknown.is_empty() {
            String::new()
        } else {
            format!(", keys the checker ran out of time on: {:?}", lin.unknown)
        }
    );
    for v in violations {
        println!("  [{}] {}: {}", v.checker, v.key, v.detail);
    }
    if violations.is_empty() && lin.unknown.is_empty() {
        Ok(())
    } else {
        Err(CliError::Setup(format!(
            "{} violations in {}",
            violations.len(),
            path.display()
        )))
    }
}

fn print_report(r: &RunReport) {
    let mut by_checker: BTreeMap<&str, usize> = BTreeMap::new();
    for v in &r.violations {
        *by_checker.entry(v.checker).or_default() += 1;
    }
    println!(
        "run seed {}: {} ops {:?}, faults {:?}, {} violations{}{}; history {}",
        r.seed,
        r.ops,
        r.by_outcome,
        r.faults,
        r.violations.len(),
        if by_checker.is_empty() {
            String::new()
        } else {
            format!(" {by_checker:?}")
        },
        if r.unknown_keys.is_empty() {
            String::new()
        } else {
            format!(", keys the checker ran out of time on: {:?}", r.unknown_keys)
        },
        r.history.display()
    );
    let m = &r.moves;
    if !m.described.is_empty() {
        println!(
            "  moves: {} completed (writes waited at most {} ms), {} rolled back, {} refused, {} unfinished: {}",
            m.completed,
            m.unavailable_ms.iter().max().copied().unwrap_or(0),
            m.rolled_back,
            m.refused,
            m.unfinished,
            m.described.join("; ")
        );
    }
    let l = &r.lost;
    if l.quarantined > 0
        || r.faults
            .iter()
            .any(|f| f.starts_with("kill-region") || f.starts_with("cut-directory"))
    {
        println!(
            "  lost with the region and quarantined: {} writes ({} acknowledged, {} with an unknown outcome); {} reads or failed compares may have seen one of them",
            l.quarantined, l.acknowledged, l.unknown, l.reads_of_lost
        );
    }
    for v in &r.violations {
        println!("  [{}] {}: {}", v.checker, v.key, v.detail);
    }
}

/// One run: a deployment, the workload, the faults, healing, the checks.
pub async fn run_once(args: &VerifyArgs, binaries: &Binaries, seed: u64) -> Result<RunReport, CliError> {
    let mut rng = StdRng::seed_from_u64(seed);
    // us-east's group has three members (member and leader faults hit it),
    // the others one; the directory has a member per region, reaching its
    // peers through toxiproxy (partitions and blackholes cut it).
    let layout = Layout {
        regions: REGIONS
            .iter()
            .map(|r| (r.to_string(), if *r == nemesis::REPLICATED { 3 } else { 1 }))
            .collect(),
        directory_members: REGIONS.len(),
        rtt_ms: BTreeMap::from([
            (("us-east".into(), "eu-west".into()), 40),
            (("us-east".into(), "ap-south".into()), 80),
            (("eu-west".into(), "ap-south".into()), 60),
        ]),
        agents: true,
        otlp_endpoint: None,
        tls: args.tls,
    };
    let mut d = LocalDeployment::start_with(layout, Some(binaries.clone())).await?;
    if args.follow_the_sun {
        let router = ["--write-count-publish-interval=500ms".to_string()];
        let agent = [
            "--follow-the-sun",
            "--follow-the-sun-window=10s",
            "--follow-the-sun-cooldown=5s",
            "--follow-the-sun-interval=500ms",
        ]
        .map(String::from);
        for region in REGIONS {
            d.restart_with_flags(region, &router, &agent).await?;
        }
    }
    // Accounts: `accounts` homed in each region.
    let mut accounts = Vec::new();
    for home in REGIONS {
        let mut c = d.client(home).await;
        for a in 0..args.accounts {
            let account = format!("v-{home}-{a}");
            // A region whose agent re-claims its lease (a renewal late on
            // a busy machine) refuses for a moment.
            crate::client::create_account_retrying(&mut c, &account, home, Duration::from_secs(30)).await?;
            accounts.push((account, home));
        }
    }
    let etcd_history = etcd_history::EtcdHistory::start(&d);
    // The run's first fault walks the list with the seed; half of the runs
    // add one more, drawn.
    let mut faults = vec![args.faults[(seed % args.faults.len() as u64) as usize]];
    let second = args.faults[rng.random_range(0..args.faults.len())];
    if rng.random_bool(0.5) && !faults.contains(&second) && !faults[0].loses_a_region() && !second.loses_a_region() {
        faults.push(second);
    }
    // A run that loses a region has automatic failover on: the successors
    // in REGIONS order, a budget that lets the failover happen whatever is
    // lost (the quarantine must then name it), and no deletes (lost writes
    // are matched to the history by value).
    let loses_a_region = faults.iter().any(|f| f.loses_a_region());
    let mix = if loses_a_region {
        for region in REGIONS {
            d.restart_with_flags(region, &[], &failover_flags()).await?;
        }
        args.mix.without_deletes()
    } else {
        args.mix
    };

    let started = Instant::now();
    let duration = Duration::from_secs(args.duration);
    let records = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    let mut id = 0u32;
    for region in REGIONS {
        for _ in 0..args.clients {
            let c = d.client(region).await;
            let accounts = accounts.iter().map(|(a, _)| a.clone()).collect();
            let records = records.clone();
            let client_seed = rng.random();
            let pause = Duration::from_secs(1) / args.rate;
            clients.push(tokio::spawn(workload::client(
                id,
                c,
                accounts,
                client_seed,
                started,
                started + duration,
                pause,
                mix,
                records,
            )));
            id += 1;
        }
    }
    let mover = tokio::spawn(moves::run(
        d.directory_client().await,
        accounts.iter().map(|(a, _)| a.clone()).collect(),
        REGIONS.iter().map(|r| r.to_string()).collect(),
        seed,
        args.moves,
        started + duration,
    ));
    // The faults hold the middle third of the run, then heal.
    tokio::time::sleep(duration / 3).await;
    let before_faults = records.lock().unwrap_or_else(|e| e.into_inner()).len();
    let mut nemesis = nemesis::Nemesis::new();
    for f in &faults {
        nemesis.inject(&mut d, *f, &mut rng).await?;
    }
    nemesis.hold(&d, duration / 3).await?;
    nemesis.heal(&mut d).await?;
    for c in clients {
        let _ = c.await;
    }
    let mut moves = mover.await.unwrap_or_default();
    moves::count_automatic(&d.directory_client().await, &mut moves).await;
    let mut history = History {
        records: std::mem::take(&mut *records.lock().unwrap_or_else(|e| e.into_inner())),
    };
    // After healing every account takes a write and answers a read.
    workload::final_round(&d, &accounts, started, &mut history).await?;

    let mut violations = Vec::new();
    // Like etcd's robustness suite: a run whose workload barely ran before
    // the faults proves nothing.
    let minimum = args.clients * REGIONS.len() * (args.duration as usize / 3);
    if before_faults < minimum {
        violations.push(tern_verify::Violation {
            checker: "throughput",
            key: String::new(),
            detail: format!("only {before_faults} operations before the faults (at least {minimum} expected)"),
        });
    }
    violations.extend(nemesis.did_not_bite(&d).await);
    let finished = etcd_history.finish(&d).await?;
    let mut applied = finished.applied.clone();
    violations.extend(
        finished
            .split_brain
            .iter()
            .cloned()
            .map(|detail| tern_verify::Violation {
                checker: "split-brain",
                key: String::new(),
                detail,
            }),
    );
    // Saved as recorded, with what etcd applied and the quarantine: `--check`
    // reconciles and judges them again.
    let path = args.out.join(format!("history-{seed}.jsonl"));
    history.save(&path).map_err(|e| CliError::Setup(e.to_string()))?;
    save_applied(&path, &applied)?;
    let lost = if nemesis.lost_regions.is_empty() {
        lost::Lost::default()
    } else {
        let quarantined = lost::read_quarantine(&d).await?;
        let text = serde_json::to_string_pretty(&quarantined).expect("records always serialise");
        std::fs::write(quarantine_path(&path), text).map_err(|source| CliError::Io {
            path: quarantine_path(&path).display().to_string(),
            source,
        })?;
        let stopped = lost::stopped(&d, &nemesis.lost_regions).await?;
        violations.extend(lost::check_stopped(&finished.home_writes, &stopped, &quarantined));
        let lost = lost::reconcile(&mut history, &mut applied, &quarantined);
        violations.extend(lost.violations.clone());
        lost
    };
    let lin = tern_verify::judge(&history, Some(&applied), PER_KEY);
    violations.extend(lin.violations);
    let mut by_outcome = BTreeMap::new();
    for r in &history.records {
        let kind = match r.outcome {
            Outcome::Ok { .. } => "ok",
            Outcome::Failed { .. } => "failed",
            Outcome::Indeterminate { .. } => "unknown",
        };
        *by_outcome.entry(kind).or_default() += 1;
    }
    Ok(RunReport {
        seed,
        ops: history.records.len(),
        faults: nemesis.described,
        by_outcome,
        violations,
        unknown_keys: lin.unknown,
        history: path,
        moves,
        lost,
    })
}

/// The agents' failover flags for runs that lose a region: automatic, each
/// region succeeded by the next ones in REGIONS order.
fn failover_flags() -> Vec<String> {
    let mut flags = vec![
        "--failover-mode=automatic".to_string(),
        "--max-data-loss-lag=1h".to_string(),
    ];
    for (i, region) in REGIONS.iter().enumerate() {
        let order: Vec<&str> = (1..REGIONS.len()).map(|k| REGIONS[(i + k) % REGIONS.len()]).collect();
        flags.push(format!("--failover-order={region}={}", order.join("|")));
    }
    flags
}
