//! `tern demo`: a three-region deployment on this machine out of the real
//! parts (an etcd group of three members per region, a directory group,
//! routers, toxiproxy on every cross-region router link with round trips
//! from published cloud tables), a workload from clients in every region,
//! and a live table of what it measures. Ctrl-C, or the end of --duration,
//! stops every process it started.
//!
//! With `--follow-the-sun` the run is a compressed day: it is daytime in
//! one region after another (ap-south, eu-west, us-east, a third of the run
//! each), the awake region's clients write every account at full speed
//! while the others' write once every 2 s each, and the agents' follow-the-sun policy (a 24 s
//! window, 1 s buckets) moves the accounts to where the writers are awake.
//! The live table shows the moves and the unavailability each measured;
//! the summary lists every move and the reason its agent gave.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use rand::Rng;
use tern_api::pb;
use tern_local::jaeger::Jaeger;
use tern_local::otlp::{OtlpReceiver, ReceivedSpan};
use tern_local::{Layout, LocalDeployment};

use crate::CliError;
use crate::binaries::{AssetsArgs, Tools};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// How long the workload runs, in seconds (default 30; 90 with
    /// --follow-the-sun, a day of three 30 s shifts).
    #[arg(long)]
    duration: Option<u64>,
    /// A compressed day: one region's clients are busy at a time, and the
    /// agents move accounts to where they are written (follow the sun).
    #[arg(long)]
    follow_the_sun: bool,
    /// Keep the deployment up after the workload and print its endpoints,
    /// until Ctrl-C.
    #[arg(long)]
    keep: bool,
    /// Round trips between regions in ms, as A:B=MS, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "us-east:eu-west=80,us-east:ap-south=220,eu-west:ap-south=180"
    )]
    rtt: Vec<String>,
    /// etcd members per region group.
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// Concurrent clients per region.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Accounts homed in each region.
    #[arg(long, default_value_t = 3)]
    accounts: usize,
    /// Share of writes a client sends to accounts homed in other regions, 0-100.
    #[arg(long, default_value_t = 20)]
    remote_percent: u32,
    /// Start Jaeger (built from its Go module), send every router's traces to
    /// it and print its query address.
    #[arg(long)]
    jaeger: bool,
    /// Plain TCP on every link. By default the demo makes a CA of its own
    /// and runs TLS everywhere, as a production deployment would: etcd and
    /// the routers require client certificates, routers trust each other
    /// by certificate.
    #[arg(long)]
    plain: bool,
    #[command(flatten)]
    assets: AssetsArgs,
}

const REGIONS: [&str; 3] = ["us-east", "eu-west", "ap-south"];
/// The order the day passes through the regions (the sun goes west).
const SUN: [&str; 3] = ["ap-south", "eu-west", "us-east"];
/// What a client of a region where it is night waits between writes.
const NIGHT_PAUSE: Duration = Duration::from_secs(2);
/// The follow-the-sun window of the demo (1 s buckets: routers keep 24 per
/// window) and how often routers publish and agents look.
const SUN_WINDOW: &str = "24s";
const SUN_TICK: &str = "1s";

/// The agent and router flags of the demo's compressed day.
fn sun_flags(shift: Duration) -> (Vec<String>, Vec<String>) {
    let agent = vec![
        "--follow-the-sun".into(),
        format!("--follow-the-sun-window={SUN_WINDOW}"),
        format!("--follow-the-sun-interval={SUN_TICK}"),
        // An account moves once per shift at most.
        format!("--follow-the-sun-cooldown={}ms", (shift / 2).as_millis()),
        "--follow-the-sun-max-per-minute=60".into(),
    ];
    let router = vec![
        format!("--write-count-window={SUN_WINDOW}"),
        format!("--write-count-publish-interval={SUN_TICK}"),
    ];
    (agent, router)
}

/// Which region it is day in, `elapsed` into a day of `day`.
fn daytime(elapsed: Duration, day: Duration) -> usize {
    let shift = day.as_secs_f64() / SUN.len() as f64;
    ((elapsed.as_secs_f64() / shift.max(0.001)) as usize).min(SUN.len() - 1)
}

/// Latencies and errors of one region's clients.
#[derive(Default)]
struct Sample {
    local_us: Vec<u32>,
    proxied_us: Vec<u32>,
    errors: u64,
    /// The slowest proxied write: its latency and trace id.
    slowest: Option<(u32, String)>,
}

impl Sample {
    fn merge(&mut self, other: &Sample) {
        self.local_us.extend_from_slice(&other.local_us);
        self.proxied_us.extend_from_slice(&other.proxied_us);
        self.errors += other.errors;
        if let Some((us, id)) = &other.slowest
            && self.slowest.as_ref().is_none_or(|(t, _)| us > t)
        {
            self.slowest = Some((*us, id.clone()));
        }
    }
}

fn parse_rtt(specs: &[String]) -> Result<BTreeMap<(String, String), u64>, CliError> {
    let mut out = BTreeMap::new();
    for spec in specs {
        let bad = || CliError::Usage(format!("--rtt `{spec}` is not A:B=MS (for example us-east:eu-west=80)"));
        let (pair, ms) = spec.split_once('=').ok_or_else(bad)?;
        let (a, b) = pair.split_once(':').ok_or_else(bad)?;
        if !REGIONS.contains(&a) || !REGIONS.contains(&b) || a == b {
            return Err(CliError::Usage(format!(
                "--rtt `{spec}`: regions are {}",
                REGIONS.join(", ")
            )));
        }
        out.insert((a.to_string(), b.to_string()), ms.parse().map_err(|_| bad())?);
    }
    Ok(out)
}

fn percentile(sorted: &[u32], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(f64::from(sorted[i]) / 1000.0)
}

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1} ms")).unwrap_or_else(|| "-".into())
}

/// `text` to print so that, on a terminal (`redraw`), it replaces the
/// `previous` lines printed before it: the cursor goes up over them and each
/// line is cleared as it is written.
fn in_place(text: &str, redraw: bool, previous: usize) -> String {
    if !redraw {
        return text.to_string();
    }
    let mut out = String::new();
    if previous > 0 {
        out.push_str(&format!("\x1b[{previous}A"));
    }
    for line in text.lines() {
        out.push_str("\x1b[2K");
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn table(title: &str, samples: &BTreeMap<&str, Sample>, seconds: f64, lags: &BTreeMap<&str, String>) -> String {
    let mut out = format!(
        "{title}\n  {:<9} {:>7} {:>10} {:>10} {:>12} {:>12} {:>7}  {}\n",
        "region", "ops/s", "local p50", "local p99", "proxied p50", "proxied p99", "errors", "mirror lag (ms) from"
    );
    for region in REGIONS {
        let s = &samples[region];
        let mut local = s.local_us.clone();
        let mut proxied = s.proxied_us.clone();
        local.sort_unstable();
        proxied.sort_unstable();
        let ops = (local.len() + proxied.len()) as f64 / seconds.max(0.001);
        out.push_str(&format!(
            "  {:<9} {:>7.0} {:>10} {:>10} {:>12} {:>12} {:>7}  {}\n",
            region,
            ops,
            ms(percentile(&local, 0.5)),
            ms(percentile(&local, 0.99)),
            ms(percentile(&proxied, 0.5)),
            ms(percentile(&proxied, 0.99)),
            s.errors,
            lags.get(region).map(String::as_str).unwrap_or("-"),
        ));
    }
    out
}

pub async fn run(mut args: DemoArgs) -> Result<(), CliError> {
    let rtt = parse_rtt(&args.rtt)?;
    let duration = *args.duration.get_or_insert(if args.follow_the_sun { 90 } else { 30 });
    if args.follow_the_sun && duration < 30 {
        return Err(CliError::Usage(format!(
            "--duration {duration} is too short for --follow-the-sun: a day needs at least 30 s (three shifts of 10 s)"
        )));
    }
    if args.remote_percent > 100 || args.members == 0 || args.clients == 0 || args.accounts == 0 {
        return Err(CliError::Usage(
            "--remote-percent is 0-100; --members, --clients and --accounts are at least 1".into(),
        ));
    }
    args.assets.apply()?;
    println!(
        "tern demo: starting 3 regions × {} etcd members, a 3-member directory, 3 routers, toxiproxy links",
        args.members
    );
    for ((a, b), ms) in &rtt {
        println!("  round trip {a} ↔ {b}: {ms} ms");
    }
    // Routers export their traces to Jaeger (--jaeger) or to a receiver in
    // this process, so the demo can show where a cross-region write spends
    // its time.
    let jaeger_dir = tempfile::tempdir().map_err(|source| CliError::Io {
        path: std::env::temp_dir().display().to_string(),
        source,
    })?;
    let jaeger = if args.jaeger {
        crate::binaries::ensure(Tools::Jaeger)?;
        let j = Jaeger::start(jaeger_dir.path())?;
        println!(
            "  Jaeger: OTLP {}, query API http://{}/api/v3/traces/<trace id>",
            j.otlp_endpoint, j.query
        );
        Some(j)
    } else {
        None
    };
    // The demo's own receiver keeps the spans for the waterfall and passes
    // them on to Jaeger when it runs.
    let receiver = OtlpReceiver::start_forwarding(jaeger.as_ref().map(|j| j.otlp_endpoint.as_str()))
        .await
        .map_err(|e| CliError::Setup(format!("trace receiver: {e}")))?;
    let otlp = receiver.endpoint();
    let layout = Layout {
        regions: REGIONS.iter().map(|r| (r.to_string(), args.members)).collect(),
        directory_members: 3,
        rtt_ms: rtt,
        agents: true,
        otlp_endpoint: Some(otlp),
        tls: !args.plain,
    };
    let mut deployment = tokio::select! {
        d = LocalDeployment::start(layout) => d?,
        _ = tokio::signal::ctrl_c() => return Err(CliError::Interrupted("while starting")),
    };
    if args.follow_the_sun {
        let (agent, router) = sun_flags(Duration::from_secs(duration) / SUN.len() as u32);
        println!(
            "  follow the sun: agents {}; routers {}",
            agent.join(" "),
            router.join(" ")
        );
        for region in REGIONS {
            deployment.restart_with_flags(region, &router, &agent).await?;
        }
    }
    let outcome = drive(&deployment, &args).await;
    if let Ok(Some(slowest)) = &outcome {
        // One export period, so the last writes' spans have arrived.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        print!("{}", waterfall(&receiver.spans(), slowest));
        if let Some(j) = &jaeger {
            println!("  in Jaeger: http://{}/api/v3/traces/{slowest}", j.query);
        }
    }
    let outcome = outcome.map(|_| ());
    if outcome.is_ok() && args.keep {
        println!("\nThe deployment stays up until Ctrl-C. Routers:");
        for r in &deployment.regions {
            if let Some(router) = &r.router {
                println!(
                    "  {:<9} {}   (metrics: http://{}/metrics)",
                    r.name, router.grpc_addr, router.http_addr
                );
            }
        }
        let example = deployment.regions[1]
            .router
            .as_ref()
            .map(|r| r.grpc_addr.to_string())
            .unwrap_or_default();
        // With TLS every command needs the client certificate made for
        // the run.
        let tls = deployment
            .pki
            .as_ref()
            .map(|p| format!(" --tls-dir {}", p.dir("client").display()))
            .unwrap_or_default();
        println!(
            "Try: tern put{tls} --router {example} acct-us-east-0 greeting hello && tern get{tls} --router {example} acct-us-east-0 greeting"
        );
        let directory = deployment.directory.endpoints().join(",");
        println!("     tern status{tls} --directory {directory}");
        if let Some(p) = &deployment.pki {
            println!("Client certificate: {}", p.dir("client").display());
        }
        println!("Directory: {directory}");
        let _ = tokio::signal::ctrl_c().await;
    }
    println!("tern demo: stopping every process it started");
    drop(deployment);
    outcome
}

/// Runs the workload; returns the trace id of the slowest proxied write.
async fn drive(d: &LocalDeployment, args: &DemoArgs) -> Result<Option<String>, CliError> {
    // Accounts homed in each region, created through that region's router.
    let mut accounts: Vec<(String, String)> = Vec::new();
    for region in REGIONS {
        let mut c = d.client(region).await;
        for i in 0..args.accounts {
            let account = format!("acct-{region}-{i}");
            // A region refuses for a moment until its agent has claimed
            // its lease, which may be just after the deployment is up.
            crate::client::create_account_retrying(&mut c, &account, region, Duration::from_secs(30)).await?;
            accounts.push((account, region.to_string()));
        }
    }
    let duration = Duration::from_secs(args.duration.unwrap_or(30));
    println!(
        "created {} accounts; running the workload for {} s (Ctrl-C stops)\n",
        accounts.len(),
        duration.as_secs()
    );
    // The region where it is day now (an index into SUN), when following the sun.
    let sun = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sunny = args.follow_the_sun;

    let samples: Arc<BTreeMap<&str, Mutex<Sample>>> =
        Arc::new(REGIONS.iter().map(|r| (*r, Mutex::default())).collect());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accounts = Arc::new(accounts);
    let mut workers = Vec::new();
    for region in REGIONS {
        for client_id in 0..args.clients {
            let mut c = d.client(region).await;
            let samples = samples.clone();
            let stop = stop.clone();
            let accounts = accounts.clone();
            let remote = args.remote_percent;
            let sun = sun.clone();
            workers.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // By day every account is used from here; by night
                    // the clients trickle, as the plain demo's do.
                    let day = sunny && SUN[sun.load(std::sync::atomic::Ordering::Relaxed)] == region;
                    if sunny && !day {
                        tokio::time::sleep(NIGHT_PAUSE).await;
                    }
                    let (account, _) = {
                        let mut rng = rand::rng();
                        let want_remote = if day {
                            rng.random_range(0..REGIONS.len()) != 0
                        } else {
                            rng.random_range(0..100) < remote
                        };
                        let pool: Vec<&(String, String)> = accounts
                            .iter()
                            .filter(|(_, home)| (home != region) == want_remote)
                            .collect();
                        pool[rng.random_range(0..pool.len())].clone()
                    };
                    n += 1;
                    let key = format!("{region}-{client_id}-{n}");
                    let mut request = tonic::Request::new(pb::PutRequest {
                        account,
                        key: format!("k{}", n % 64),
                        value: n.to_le_bytes().to_vec(),
                        idempotency_key: key,
                    });
                    request.set_timeout(Duration::from_secs(2));
                    // Every write starts its own trace, so the slowest one can
                    // be found again.
                    let trace_id: String = (0..16).map(|_| format!("{:02x}", rand::rng().random::<u8>())).collect();
                    if let Ok(v) = format!("00-{trace_id}-{:016x}-01", rand::rng().random::<u64>() | 1).parse() {
                        request.metadata_mut().insert("traceparent", v);
                    }
                    let started = Instant::now();
                    let result = c.put(request).await;
                    let us = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
                    let mut s = samples[region].lock().unwrap_or_else(|e| e.into_inner());
                    match result {
                        Ok(r) if r.get_ref().meta.as_ref().is_some_and(|m| m.forwarded) => {
                            if s.slowest.as_ref().is_none_or(|(t, _)| us > *t) {
                                s.slowest = Some((us, trace_id));
                            }
                            s.proxied_us.push(us)
                        }
                        Ok(_) => s.local_us.push(us),
                        Err(_) => s.errors += 1,
                    }
                }
            }));
        }
    }

    let started = Instant::now();
    let started_ms = tern_common::unix_ms();
    let mut total: BTreeMap<&str, Sample> = REGIONS.iter().map(|r| (*r, Sample::default())).collect();
    let mut interrupted = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = Instant::now();
    // On a terminal the table redraws in place, like `top`; piped, each
    // second's table follows the last as plain lines.
    let redraw = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut drawn_lines = 0usize;
    let directory = d.directory_client().await;
    let mut moves: Vec<(String, tern_common::MigrationRecord)> = Vec::new();
    while started.elapsed() < duration {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => { interrupted = true; break; }
        }
        let mut interval: BTreeMap<&str, Sample> = BTreeMap::new();
        for region in REGIONS {
            let s = std::mem::take(&mut *samples[region].lock().unwrap_or_else(|e| e.into_inner()));
            total.get_mut(region).expect("every region").merge(&s);
            interval.insert(region, s);
        }
        let secs = last.elapsed().as_secs_f64();
        last = Instant::now();
        let lags = mirror_lags(d).await;
        let mut title = format!("t={:>3.0}s", started.elapsed().as_secs_f64());
        let mut text = String::new();
        if sunny {
            let now = daytime(started.elapsed(), duration);
            sun.store(now, std::sync::atomic::Ordering::Relaxed);
            title.push_str(&format!("  day in {} (of ap-south → eu-west → us-east)", SUN[now]));
            if let Ok(all) = tern_local::migrations::list(&directory).await {
                moves = automatic(all);
            }
        }
        text.push_str(&table(&title, &interval, secs, &lags));
        if sunny {
            text.push_str(&moves_line(&moves));
        }
        print!("{}", in_place(&text, redraw, drawn_lines));
        drawn_lines = text.lines().count();
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    for region in REGIONS {
        let s = std::mem::take(&mut *samples[region].lock().unwrap_or_else(|e| e.into_inner()));
        total.get_mut(region).expect("every region").merge(&s);
    }
    let lags = mirror_lags(d).await;
    let title = "summary (whole run; writes are idempotent puts, 2 s deadline)";
    println!("\n{}", table(title, &total, started.elapsed().as_secs_f64(), &lags));
    if sunny {
        if let Ok(all) = tern_local::migrations::list(&directory).await {
            moves = automatic(all);
        }
        print!("{}", moves_summary(&moves, started_ms));
    }
    for ((a, b), rtt) in &d.layout.rtt_ms {
        println!("  injected round trip {a} ↔ {b}: {rtt} ms");
    }
    if interrupted {
        return Err(CliError::Interrupted("while running"));
    }
    let slowest = total
        .values()
        .filter_map(|s| s.slowest.clone())
        .max_by_key(|(us, _)| *us);
    Ok(slowest.map(|(_, id)| id))
}

/// The moves the follow-the-sun policy asked for (intents `sun-…`), in the
/// order they were asked for.
fn automatic(all: Vec<(String, tern_common::MigrationRecord)>) -> Vec<(String, tern_common::MigrationRecord)> {
    let mut sun: Vec<_> = all
        .into_iter()
        .filter(|(id, _)| id.starts_with(tern_common::AUTOMATIC_MIGRATION_PREFIX))
        .collect();
    sun.sort_by_key(|(_, m)| m.requested_ms);
    sun
}

/// The live table's line about moves: how many, and the last few.
fn moves_line(moves: &[(String, tern_common::MigrationRecord)]) -> String {
    let done = moves
        .iter()
        .filter(|(_, m)| m.phase == tern_common::MigrationPhase::Completed)
        .count();
    let mut out = format!(
        "  moves: {done} completed, {} in flight\n",
        moves.iter().filter(|(_, m)| !m.phase.is_final()).count()
    );
    for (_, m) in moves.iter().rev().take(3) {
        out.push_str(&format!("    {}\n", move_text(m)));
    }
    out
}

/// `acct-x us-east → eu-west completed, 104 ms unavailable`.
fn move_text(m: &tern_common::MigrationRecord) -> String {
    let from = m
        .source
        .as_ref()
        .or(m.expected_source.as_ref())
        .map_or("?".to_string(), ToString::to_string);
    let phase = format!("{:?}", m.phase).to_lowercase();
    match m.unavailable_ms {
        Some(ms) => format!(
            "{:<16} {from:>8} → {:<8} {phase}, {ms} ms unavailable",
            m.account, m.target
        ),
        None => format!("{:<16} {from:>8} → {:<8} {phase}", m.account, m.target),
    }
}

/// The summary of a sunny run: every move, when, and its agent's reason.
fn moves_summary(moves: &[(String, tern_common::MigrationRecord)], started_ms: u64) -> String {
    let mut unavailable: Vec<u64> = moves.iter().filter_map(|(_, m)| m.unavailable_ms).collect();
    unavailable.sort_unstable();
    let q = |p: f64| {
        unavailable
            .get(((unavailable.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
    };
    let mut out = format!(
        "\nfollow the sun: {} moves, unavailability p50 {} p99 {}\n",
        moves.len(),
        q(0.5).map_or("-".into(), |v| format!("{v} ms")),
        q(0.99).map_or("-".into(), |v| format!("{v} ms")),
    );
    for (_, m) in moves {
        let at = m.requested_ms.saturating_sub(started_ms) as f64 / 1000.0;
        out.push_str(&format!(
            "  t={at:>4.0}s {}\n           why: {}\n",
            move_text(m),
            m.reason
        ));
    }
    out
}

/// Each region's measured lag of its mirrors, as its agent reports it:
/// "eu-west 92 · ap-south 113".
async fn mirror_lags(d: &LocalDeployment) -> BTreeMap<&'static str, String> {
    let mut out = BTreeMap::new();
    for region in REGIONS {
        let Some(agent) = d.region(region).agent.as_ref() else {
            continue;
        };
        let mut parts = Vec::new();
        for source in REGIONS.iter().filter(|s| **s != region) {
            let metric = format!("tern_agent_mirror_lag_ms{{source=\"{source}\"}}");
            let lag = match agent.metric(&metric).await {
                Some(v) if v < 1e9 => format!("{v:.0}"),
                _ => "-".into(),
            };
            parts.push(format!("{source} {lag}"));
        }
        out.insert(region, parts.join(" · "));
    }
    out
}

/// The trace of the slowest proxied write as a text waterfall: one line per
/// span, indented by parent, with its region, start offset and duration.
pub fn waterfall(spans: &[ReceivedSpan], trace_id: &str) -> String {
    let in_trace = |s: &&ReceivedSpan| s.trace_id.iter().map(|b| format!("{b:02x}")).collect::<String>() == trace_id;
    // The root here is the first router's request span (its parent is the
    // client's, which is not in the trace).
    let Some(root) = spans
        .iter()
        .filter(in_trace)
        .filter(|s| s.name == "router.request")
        .min_by_key(|s| s.start_ns)
    else {
        return format!("\nThe trace of the slowest proxied write ({trace_id}) has not arrived.\n");
    };
    let trace: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.trace_id == root.trace_id).collect();
    let total = root.duration_ms().max(0.001);
    let trace_id: String = root.trace_id.iter().map(|b| format!("{b:02x}")).collect();
    let mut out = format!(
        "\nSlowest proxied write (trace {trace_id}, account {}):\n",
        trace
            .iter()
            .find_map(|s| s.attribute("tern.account").filter(|a| !a.is_empty()))
            .unwrap_or("?")
    );
    fn walk(out: &mut String, trace: &[&ReceivedSpan], span: &ReceivedSpan, depth: usize, t0: u64, total: f64) {
        let offset = span.start_ns.saturating_sub(t0) as f64 / 1e6;
        let width = 40.0;
        let start = ((offset / total) * width).round() as usize;
        let len = ((span.duration_ms() / total) * width).round().max(1.0) as usize;
        let bar = format!(
            "{}{}",
            " ".repeat(start.min(40)),
            "█".repeat(len.min(40 - start.min(39)))
        );
        let region = span
            .attribute("tern.region")
            .or_else(|| span.attribute("tern.group"))
            .unwrap_or_else(|| span.instance.trim_end_matches("-router"));
        let name = format!("{}{}", "  ".repeat(depth), span.name);
        out.push_str(&format!(
            "  {name:<24} {region:<9} +{offset:>7.1} ms {:>7.1} ms |{bar:<40}|\n",
            span.duration_ms()
        ));
        let mut children: Vec<&&ReceivedSpan> = trace.iter().filter(|c| c.parent_span_id == span.span_id).collect();
        children.sort_by_key(|c| c.start_ns);
        for c in children {
            walk(out, trace, c, depth + 1, t0, total);
        }
    }
    walk(&mut out, &trace, root, 0, root.start_ns, total);
    out
}

#[cfg(test)]
mod tests {
    use super::in_place;

    #[test]
    fn a_terminal_table_redraws_over_the_last_and_a_pipe_gets_plain_lines() {
        let text = "t=1s\nus-east 10\n";
        assert_eq!(in_place(text, false, 2), text, "piped: plain lines");
        assert_eq!(in_place(text, true, 0), "\x1b[2Kt=1s\n\x1b[2Kus-east 10\n");
        assert!(in_place(text, true, 2).starts_with("\x1b[2A"), "up over the last table");
    }
}
