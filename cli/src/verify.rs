//! `tern verify`: randomized runs of a mixed workload against a local
//! three-region deployment while toxiproxy injects faults on the links
//! between regions; every operation is recorded as a tern-verify history
//! and judged by its checkers (linearizability per key, what etcd applied
//! against what clients were told, bounded staleness). Each run writes its
//! history as JSON lines next to a report, so a failure can be checked
//! again offline.
//!
//! Faults so far are the ones toxiproxy makes (resets and cuts after send,
//! latency spikes on router links, a held delay on mirror links); killing
//! processes needs routers and agents as separate processes (issue 10).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tern_api::pb;
use tern_local::toxiproxy::Stream;
use tern_local::{Layout, LocalDeployment};
use tern_verify::{History, Outcome, Record, Request};

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

/// A fault toxiproxy can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Fault {
    /// Connections between routers reset 100 ms in (half of them), re-armed
    /// every 500 ms: links fail after requests left.
    Reset,
    /// Connections between routers cut after 2 KiB of answers.
    Limit,
    /// 300 ms more each way between routers.
    Latency,
    /// 600 ms more on every mirror link, held: BOUNDED reads must notice.
    MirrorDelay,
}

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
    /// Faults to draw from, comma separated; each run injects one or two.
    #[arg(long, value_delimiter = ',', default_value = "reset,limit,latency")]
    faults: Vec<Fault>,
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
    pub faults: Vec<Fault>,
    pub by_outcome: BTreeMap<&'static str, usize>,
    pub violations: Vec<tern_verify::Violation>,
    pub unknown_keys: Vec<String>,
    pub history: PathBuf,
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
    args.assets.apply()?;
    std::fs::create_dir_all(&args.out).map_err(|source| CliError::Io {
        path: args.out.display().to_string(),
        source,
    })?;
    let first = args.seed.unwrap_or_else(rand::random);
    let mut failed = 0;
    for i in 0..u64::from(args.runs) {
        let report = run_once(&args, first.wrapping_add(i)).await?;
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

/// `--check`: the checkers again on a saved history, offline.
fn check_saved(path: &std::path::Path) -> Result<(), CliError> {
    let history = History::load(path).map_err(|e| CliError::Setup(e.to_string()))?;
    let applied_file = applied_path(path);
    let applied: Option<tern_verify::applied::Applied> = match std::fs::read_to_string(&applied_file) {
        Ok(text) => {
            Some(serde_json::from_str(&text).map_err(|e| CliError::Setup(format!("{}: {e}", applied_file.display())))?)
        }
        Err(_) => {
            println!("no {}: the applied checker is skipped", applied_file.display());
            None
        }
    };
    let lin = tern_verify::judge(&history, applied.as_ref(), PER_KEY);
    let violations = &lin.violations;
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
    println!(
        "run seed {}: {} ops {:?}, faults {:?}, {} violations{}; history {}",
        r.seed,
        r.ops,
        r.by_outcome,
        r.faults,
        r.violations.len(),
        if r.unknown_keys.is_empty() {
            String::new()
        } else {
            format!(", keys the checker ran out of time on: {:?}", r.unknown_keys)
        },
        r.history.display()
    );
    for v in &r.violations {
        println!("  [{}] {}: {}", v.checker, v.key, v.detail);
    }
}

/// One run: a deployment, the workload, the faults, healing, the checks.
pub async fn run_once(args: &VerifyArgs, seed: u64) -> Result<RunReport, CliError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let layout = Layout {
        regions: REGIONS.iter().map(|r| (r.to_string(), 1)).collect(),
        directory_members: 1,
        rtt_ms: BTreeMap::from([
            (("us-east".into(), "eu-west".into()), 40),
            (("us-east".into(), "ap-south".into()), 80),
            (("eu-west".into(), "ap-south".into()), 60),
        ]),
        agents: true,
        otlp_endpoint: None,
    };
    let d = LocalDeployment::start(layout).await?;
    // Accounts: `accounts` homed in each region.
    let mut accounts = Vec::new();
    for home in REGIONS {
        let mut c = d.client(home).await;
        for a in 0..args.accounts {
            let account = format!("v-{home}-{a}");
            c.create_account(pb::CreateAccountRequest {
                account: account.clone(),
                home_region: home.into(),
                allowed_regions: vec![],
            })
            .await?;
            accounts.push((account, home));
        }
    }
    // One or two faults, drawn with the run's seed.
    let mut faults = vec![args.faults[rng.random_range(0..args.faults.len())]];
    let second = args.faults[rng.random_range(0..args.faults.len())];
    if rng.random_bool(0.5) && !faults.contains(&second) {
        faults.push(second);
    }

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
            clients.push(tokio::spawn(client(
                id,
                c,
                accounts,
                client_seed,
                started,
                started + duration,
                pause,
                records,
            )));
            id += 1;
        }
    }
    // The faults hold the middle third of the run, then heal.
    tokio::time::sleep(duration / 3).await;
    let before_faults = records.lock().unwrap_or_else(|e| e.into_inner()).len();
    let injected = inject(&d, &faults, duration / 3).await?;
    heal(&d, &injected).await?;
    for c in clients {
        let _ = c.await;
    }
    let mut history = History {
        records: std::mem::take(&mut *records.lock().unwrap_or_else(|e| e.into_inner())),
    };
    // After healing every account takes a write and answers a read.
    final_round(&d, &accounts, started, &mut history).await?;

    let mut violations = Vec::new();
    let minimum = args.clients * REGIONS.len() * (args.duration as usize / 3);
    if before_faults < minimum {
        violations.push(tern_verify::Violation {
            checker: "throughput",
            key: String::new(),
            detail: format!("only {before_faults} operations before the faults (at least {minimum} expected)"),
        });
    }
    let applied = applied(&d, &accounts).await?;
    let lin = tern_verify::judge(&history, Some(&applied), PER_KEY);
    violations.extend(lin.violations);
    let path = args.out.join(format!("history-{seed}.jsonl"));
    history.save(&path).map_err(|e| CliError::Setup(e.to_string()))?;
    save_applied(&path, &applied)?;
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
        faults,
        by_outcome,
        violations,
        unknown_keys: lin.unknown,
        history: path,
    })
}

/// What a client was told, as the history records it.
fn outcome(code: tonic::Code, cas: bool) -> Outcome {
    use tonic::Code::*;
    match code {
        Ok => Outcome::Ok {
            value: None,
            swapped: cas.then_some(true),
            staleness_ms: None,
        },
        FailedPrecondition if cas => Outcome::Ok {
            value: None,
            swapped: Some(false),
            staleness_ms: None,
        },
        Unknown | DeadlineExceeded | Cancelled => Outcome::Indeterminate {
            reason: format!("{code:?}"),
        },
        _ => Outcome::Failed {
            reason: format!("{code:?}"),
        },
    }
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(DEADLINE);
    r
}

/// One client: a random mix of operations on every account's keys until
/// `until`, at most one per `pause`. An idempotent write whose outcome is
/// unknown is retried with the same key, as a client should.
#[allow(clippy::too_many_arguments)]
async fn client(
    id: u32,
    mut c: tern_api::RouterClient,
    accounts: Vec<String>,
    seed: u64,
    started: Instant,
    until: Instant,
    pause: Duration,
    records: Arc<Mutex<Vec<Record>>>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let us = || started.elapsed().as_micros() as u64;
    // What this client last knew each key to hold: what a CAS expects.
    let mut known: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut n = 0u64;
    while Instant::now() < until {
        let account = &accounts[rng.random_range(0..accounts.len())];
        let key = format!("k{}", rng.random_range(0..KEYS));
        let full = format!("{account}/{key}");
        let value = format!("c{id}-{n}");
        n += 1;
        let idem = rng.random_bool(0.5).then(|| format!("c{id}-{n}"));
        let draw = rng.random_range(0..100);
        let mut attempts = if idem.is_some() { 3 } else { 1 };
        loop {
            attempts -= 1;
            let invoke_us = us();
            let (req, out) = match draw {
                0..30 => {
                    let r = c
                        .put(request(pb::PutRequest {
                            account: account.clone(),
                            key: key.clone(),
                            value: value.clone().into_bytes(),
                            idempotency_key: idem.clone().unwrap_or_default(),
                        }))
                        .await;
                    let code = r.err().map_or(tonic::Code::Ok, |e| e.code());
                    (Request::Put { value: value.clone() }, outcome(code, false))
                }
                30..50 => {
                    let expect = known.get(&full).cloned().flatten();
                    let compare = match &expect {
                        Some(v) => pb::Compare {
                            key: key.clone(),
                            target: pb::compare::Target::Value as i32,
                            op: pb::compare::Op::Equal as i32,
                            value: v.clone().into_bytes(),
                            number: 0,
                        },
                        None => pb::Compare {
                            key: key.clone(),
                            target: pb::compare::Target::Version as i32,
                            op: pb::compare::Op::Equal as i32,
                            value: vec![],
                            number: 0,
                        },
                    };
                    let r = c
                        .txn(request(pb::TxnRequest {
                            account: account.clone(),
                            compares: vec![compare],
                            ops: vec![pb::Operation {
                                op: Some(pb::operation::Op::Put(pb::PutOp {
                                    key: key.clone(),
                                    value: value.clone().into_bytes(),
                                })),
                            }],
                            idempotency_key: idem.clone().unwrap_or_default(),
                        }))
                        .await;
                    let code = r.err().map_or(tonic::Code::Ok, |e| e.code());
                    (
                        Request::Cas {
                            expect,
                            new: Some(value.clone()),
                        },
                        outcome(code, true),
                    )
                }
                50..60 => {
                    let r = c
                        .delete(request(pb::DeleteRequest {
                            account: account.clone(),
                            key: key.clone(),
                            idempotency_key: idem.clone().unwrap_or_default(),
                        }))
                        .await;
                    let code = r.err().map_or(tonic::Code::Ok, |e| e.code());
                    (Request::Delete, outcome(code, false))
                }
                60..80 => {
                    let r = c
                        .get(request(pb::GetRequest {
                            account: account.clone(),
                            key: key.clone(),
                            read: None,
                        }))
                        .await;
                    let out = match r {
                        Ok(r) => {
                            let r = r.into_inner();
                            Outcome::Ok {
                                value: r.found.then(|| String::from_utf8_lossy(&r.value).into_owned()),
                                swapped: None,
                                staleness_ms: None,
                            }
                        }
                        Err(e) => Outcome::Failed {
                            reason: format!("{:?}", e.code()),
                        },
                    };
                    (Request::Get, out)
                }
                _ => {
                    let r = c
                        .get(request(pb::GetRequest {
                            account: account.clone(),
                            key: key.clone(),
                            read: Some(pb::ReadOptions {
                                consistency: pb::Consistency::Bounded as i32,
                                max_staleness_ms: BOUND_MS,
                            }),
                        }))
                        .await;
                    let out = match r {
                        Ok(r) => {
                            let r = r.into_inner();
                            let meta = r.meta.unwrap_or_default();
                            Outcome::Ok {
                                value: r.found.then(|| String::from_utf8_lossy(&r.value).into_owned()),
                                swapped: None,
                                staleness_ms: meta.from_mirror.then_some(u64::from(meta.staleness_ms)),
                            }
                        }
                        Err(e) => Outcome::Failed {
                            reason: format!("{:?}", e.code()),
                        },
                    };
                    (
                        Request::GetBounded {
                            max_staleness_ms: u64::from(BOUND_MS),
                        },
                        out,
                    )
                }
            };
            // What the key holds now, as far as this client can tell.
            match (&req, &out) {
                (Request::Get, Outcome::Ok { value, .. }) => {
                    known.insert(full.clone(), value.clone());
                }
                (Request::Put { value } | Request::Cas { new: Some(value), .. }, Outcome::Ok { swapped, .. })
                    if *swapped != Some(false) =>
                {
                    known.insert(full.clone(), Some(value.clone()));
                }
                (Request::Delete, Outcome::Ok { .. }) => {
                    known.insert(full.clone(), None);
                }
                (_, Outcome::Indeterminate { .. }) => {
                    known.remove(&full);
                }
                _ => {}
            }
            let unknown = matches!(out, Outcome::Indeterminate { .. });
            records.lock().unwrap_or_else(|e| e.into_inner()).push(Record {
                client: id,
                key: full.clone(),
                invoke_us,
                complete_us: us(),
                request: req,
                outcome: out,
                idempotency_key: idem.clone(),
            });
            if !(unknown && attempts > 0 && Instant::now() < until) {
                break;
            }
        }
        tokio::time::sleep(pause).await;
    }
}

/// A toxic in place, to remove when healing.
struct Injected {
    proxy: String,
    toxic: String,
}

/// Holds `faults` for `hold`, re-arming the one-shot ones.
async fn inject(d: &LocalDeployment, faults: &[Fault], hold: Duration) -> Result<Vec<Injected>, CliError> {
    let router_links: Vec<String> = d.links.values().cloned().collect();
    let mirror_links: Vec<String> = d.mirror_links.values().flatten().cloned().collect();
    let mut held = Vec::new();
    for f in faults {
        match f {
            Fault::Latency => {
                for p in &router_links {
                    d.toxiproxy
                        .toxic(
                            p,
                            "spike",
                            "latency",
                            Stream::Upstream,
                            1.0,
                            serde_json::json!({"latency": 300}),
                        )
                        .await?;
                    held.push(Injected {
                        proxy: p.clone(),
                        toxic: "spike".into(),
                    });
                }
            }
            Fault::MirrorDelay => {
                for p in &mirror_links {
                    d.toxiproxy
                        .toxic(
                            p,
                            "held",
                            "latency",
                            Stream::Downstream,
                            1.0,
                            serde_json::json!({"latency": 600}),
                        )
                        .await?;
                    held.push(Injected {
                        proxy: p.clone(),
                        toxic: "held".into(),
                    });
                }
            }
            Fault::Reset | Fault::Limit => {}
        }
    }
    let until = Instant::now() + hold;
    while Instant::now() < until {
        for f in faults {
            let (name, kind, attributes) = match f {
                Fault::Reset => ("reset", "reset_peer", serde_json::json!({"timeout": 100})),
                Fault::Limit => ("limit", "limit_data", serde_json::json!({"bytes": 2048})),
                _ => continue,
            };
            for p in &router_links {
                // Re-arm: a fresh toxic starts its timer and byte count again.
                // toxiproxy's API times out now and then while its links
                // are busy resetting; a missed re-arm only makes the fault
                // milder, so the run goes on.
                let _ = d.toxiproxy.remove_toxic(p, name).await;
                if let Err(e) = d
                    .toxiproxy
                    .toxic(p, name, kind, Stream::Downstream, 0.5, attributes.clone())
                    .await
                {
                    tracing::debug!(proxy = %p, error = %e, "could not re-arm a fault");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for f in faults {
        let name = match f {
            Fault::Reset => "reset",
            Fault::Limit => "limit",
            _ => continue,
        };
        for p in &router_links {
            held.push(Injected {
                proxy: p.clone(),
                toxic: name.into(),
            });
        }
    }
    Ok(held)
}

async fn heal(d: &LocalDeployment, injected: &[Injected]) -> Result<(), CliError> {
    for i in injected {
        let _ = d.toxiproxy.remove_toxic(&i.proxy, &i.toxic).await;
    }
    Ok(())
}

/// After healing: one write per account through its home region (it must
/// succeed within 10 s) and a strong read of every key, recorded.
async fn final_round(
    d: &LocalDeployment,
    accounts: &[(String, &str)],
    started: Instant,
    history: &mut History,
) -> Result<(), CliError> {
    let us = || started.elapsed().as_micros() as u64;
    for (account, home) in accounts {
        let mut c = d.client(home).await;
        let value = format!("final-{account}");
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            let invoke_us = us();
            let r = c
                .put(request(pb::PutRequest {
                    account: account.clone(),
                    key: "k0".into(),
                    value: value.clone().into_bytes(),
                    idempotency_key: format!("final-{account}"),
                }))
                .await;
            let code = r.as_ref().err().map_or(tonic::Code::Ok, |e| e.code());
            history.records.push(Record {
                client: u32::MAX,
                key: format!("{account}/k0"),
                invoke_us,
                complete_us: us(),
                request: Request::Put { value: value.clone() },
                outcome: outcome(code, false),
                idempotency_key: Some(format!("final-{account}")),
            });
            if r.is_ok() {
                break;
            }
            if Instant::now() > give_up {
                return Err(CliError::Setup(format!(
                    "the final write to {account} did not succeed after healing: {code:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for k in 0..KEYS {
            let key = format!("k{k}");
            let invoke_us = us();
            let r = c
                .get(request(pb::GetRequest {
                    account: account.clone(),
                    key: key.clone(),
                    read: None,
                }))
                .await?
                .into_inner();
            history.records.push(Record {
                client: u32::MAX,
                key: format!("{account}/{key}"),
                invoke_us,
                complete_us: us(),
                request: Request::Get,
                outcome: Outcome::Ok {
                    value: r.found.then(|| String::from_utf8_lossy(&r.value).into_owned()),
                    swapped: None,
                    staleness_ms: None,
                },
                idempotency_key: None,
            });
        }
    }
    Ok(())
}

/// The values every key took in its home group, from etcd's own history.
async fn applied(d: &LocalDeployment, accounts: &[(String, &str)]) -> Result<tern_verify::applied::Applied, CliError> {
    let mut out = tern_verify::applied::Applied::new();
    for (account, home) in accounts {
        let prefix = format!("/tern/a/{account}/d/");
        let mut c = d.group_client(home).await;
        let last = c
            .get(prefix.clone(), Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .map_err(|source| CliError::EtcdRequest {
                what: format!("reading {prefix}"),
                source,
            })?
            .kvs()
            .iter()
            .map(|kv| kv.mod_revision())
            .max()
            .unwrap_or(0);
        if last == 0 {
            continue;
        }
        let mut stream = c
            .watch(
                prefix.clone(),
                Some(etcd_client::WatchOptions::new().with_prefix().with_start_revision(1)),
            )
            .await
            .map_err(|source| CliError::EtcdRequest {
                what: format!("watching {prefix} from its first revision"),
                source,
            })?;
        let mut seen = 0;
        while seen < last {
            let Some(resp) = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .map_err(|_| CliError::Setup(format!("the history of {prefix} did not arrive")))?
                .map_err(|source| CliError::EtcdRequest {
                    what: format!("watching {prefix}"),
                    source,
                })?
            else {
                break;
            };
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                seen = seen.max(kv.mod_revision());
                if event.event_type() == etcd_client::EventType::Put {
                    let key = String::from_utf8_lossy(kv.key());
                    let user = key.trim_start_matches(&prefix);
                    out.entry(format!("{account}/{user}"))
                        .or_default()
                        .push(String::from_utf8_lossy(kv.value()).into_owned());
                }
            }
        }
    }
    Ok(out)
}
