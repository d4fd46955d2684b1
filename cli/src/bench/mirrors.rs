//! Section `mirrors`: can a region's mirror keep up with the fastest writer?
//! us-east's agent mirrors eu-west over a link with a 40 ms one-way delay.
//!
//! 1. Steady: the source takes writes at the router's sustained rate
//!    (measured by the overhead section in the same run, else 1,000/s)
//!    while the mirror's published lag is sampled.
//! 2. Catch-up: the mirror link is cut, a burst is written, the link is
//!    restored, and the backlog's apply rate is timed; then `etcdctl
//!    make-mirror` (etcd's own mirroring tool, the pinned etcd's) replays
//!    the same revisions over the same link, alone too. Both are done when
//!    the burst's last key reaches their destination.

use std::time::{Duration, Instant};

use etcd_client::Client;
use tern_local::{Layout, LocalDeployment};

use crate::CliError;

const ONE_WAY_MS: u64 = 40;
/// Writes in the catch-up burst: large enough that the reconnection after
/// the link heals (a few hundred ms) is not most of what is timed.
const BURST: u64 = 50_000;
/// What both mirrors copy, and where make-mirror puts it in us-east.
const PREFIX: &str = "/tern/a/bench-mirror/";
const MAKE_MIRROR_DEST: &str = "/bench-make-mirror/";

pub async fn run(members: usize, round_secs: u64, router_rate: Option<f64>) -> Result<String, CliError> {
    println!(
        "  mirrors: starting us-east and eu-west with agents, {} ms round trip",
        2 * ONE_WAY_MS
    );
    let d = LocalDeployment::start(Layout {
        regions: vec![("us-east".into(), members), ("eu-west".into(), members)],
        directory_members: 1,
        rtt_ms: [(("us-east".into(), "eu-west".into()), 2 * ONE_WAY_MS)].into(),
        agents: true,
        otlp_endpoint: None,
        tls: false,
    })
    .await?;
    let source = d.group_client("eu-west").await;
    let local = d.group_client("us-east").await;
    let agent = d
        .region("us-east")
        .agent
        .as_ref()
        .ok_or_else(|| CliError::Setup("no agent".into()))?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 1. Steady writes at the router's rate, lag sampled every 100 ms.
    let target_rate = router_rate.unwrap_or(1000.0).max(1.0);
    let secs = round_secs * 2;
    let writers = 32u64;
    let per_writer_every = Duration::from_secs_f64(writers as f64 / target_rate);
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut c = source.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(per_writer_every);
            let (mut n, mut done) = (0u64, 0u64);
            while Instant::now() < until {
                tick.tick().await;
                let key = format!("{PREFIX}d/{w}-{}", n % 100);
                if c.put(key, n.to_le_bytes().to_vec(), None).await.is_ok() {
                    done += 1;
                }
                n += 1;
            }
            done
        }));
    }
    let lag_metric = "tern_agent_mirror_lag_ms{source=\"eu-west\"}";
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
    // Let the mirror drain the steady phase before the backlog is built.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 2. Catch-up from a backlog, tern's mirror next to make-mirror.
    println!("  mirrors: cutting the link, writing a burst of {BURST}");
    let before = revision(&source).await?;
    d.set_mirror_link("us-east", "eu-west", false).await?;
    burst(&source).await?;
    let mut end = source.clone();
    end.put(format!("{PREFIX}end"), "1", None)
        .await
        .map_err(|e| CliError::Setup(format!("writing the burst's end: {e}")))?;
    let backlog = revision(&source).await? - before;
    let relays_metric = "tern_agent_mirror_relayed_catchups_total{source=\"eu-west\"}";
    let relays_before = agent.metric(relays_metric).await.unwrap_or(0.0);
    // tern's mirror alone, then make-mirror alone replaying the same
    // revisions over the same link: neither slows the other down.
    d.set_mirror_link("us-east", "eu-west", true).await?;
    let give_up = Duration::from_secs(300);
    let burst_keys = format!("{PREFIX}d/burst-");
    let tern = catch_up(
        &local,
        &format!("/tern/r/eu-west{burst_keys}"),
        &format!("/tern/r/eu-west{PREFIX}end"),
        give_up,
    )
    .await;
    let relayed = agent.metric(relays_metric).await.unwrap_or(0.0) > relays_before;
    let make_mirror = start_make_mirror(&d, before)?;
    let theirs = match &make_mirror {
        Some(_) => {
            catch_up(
                &local,
                &format!("{MAKE_MIRROR_DEST}d/burst-"),
                &format!("{MAKE_MIRROR_DEST}end"),
                give_up,
            )
            .await
        }
        None => CatchUp::default(),
    };
    drop(make_mirror);
    drop(d);
    let shown = |t: Option<Duration>| {
        t.map_or_else(
            || format!("not within {} s", give_up.as_secs()),
            |t| format!("{:.2} s", t.as_secs_f64()),
        )
    };
    let row = |name: &str, c: &CatchUp, bold: &str| {
        format!(
            "| {name} | {} | {} | {bold}{:.0} revisions/s{bold} | {:.0} revisions/s |\n",
            shown(c.first),
            shown(c.done),
            c.rate(backlog),
            c.applying_rate(backlog),
        )
    };
    let make_mirror_row = if make_mirror_ran(&theirs) {
        row(
            "`etcdctl make-mirror --rev`, same link, same revisions, after tern's",
            &theirs,
            "",
        )
    } else {
        "| `etcdctl make-mirror` | not run: no etcdctl next to etcd (e2e/build-tools.sh builds it) | | | |\n"
            .to_string()
    };
    let tern_row = row(
        &format!(
            "tern (exact resume, fences, heartbeats, lag), {}",
            if relayed { "a relay of watches" } else { "one watch" }
        ),
        &tern,
        "**",
    );
    let router_note = match router_rate {
        Some(r) => format!("the router's sustained rate in this run ({r:.0} writes/s)"),
        None => "1,000 writes/s (the overhead section did not run)".into(),
    };
    Ok(format!(
        "## Mirrors (us-east mirroring eu-west over a {} ms round trip)\n\n\
         Steady writes at {router_note}:\n\n\
         | measure | value |\n|---|---:|\n\
         | source write rate reached | {rate:.0} writes/s |\n\
         | mirror lag p50 / p99 / max | {:.0} / **{:.0}** / {:.0} ms |\n\n\
         Catch-up from a backlog of {backlog} source revisions (link cut during a burst of {BURST} writes, then restored):\n\n\
         | mirror | first burst revision applied | caught up | rate from the link's restoration | rate once applying |\n\
         |---|---:|---:|---:|---:|\n{tern_row}{make_mirror_row}\n\
         Times count from the link's restoration; the first column is the reconnection (tern's agent \
         retries every 200 ms while the link is down) or make-mirror's start. Targets: p99 lag under \
         200 ms plus the one-way delay ({} ms) at the router's sustained rate; catch-up at least 5× that \
         rate{}; not slower than make-mirror.\n",
        2 * ONE_WAY_MS,
        q(0.5),
        q(0.99),
        q(1.0),
        200 + ONE_WAY_MS,
        router_rate.map_or(String::new(), |r| format!(" ({:.0} revisions/s)", 5.0 * r)),
    ))
}

/// The source's current revision.
async fn revision(c: &Client) -> Result<i64, CliError> {
    let r = c
        .clone()
        .get("/", None)
        .await
        .map_err(|e| CliError::Setup(format!("reading the source's revision: {e}")))?;
    Ok(r.header().map_or(0, |h| h.revision()))
}

/// When a mirror applied the burst's first revision and its last, counted
/// from the link's restoration.
#[derive(Default)]
struct CatchUp {
    first: Option<Duration>,
    done: Option<Duration>,
}

impl CatchUp {
    fn rate(&self, backlog: i64) -> f64 {
        self.done.map_or(0.0, |t| backlog as f64 / t.as_secs_f64())
    }

    fn applying_rate(&self, backlog: i64) -> f64 {
        match (self.first, self.done) {
            (Some(f), Some(t)) if t > f => backlog as f64 / (t - f).as_secs_f64(),
            _ => 0.0,
        }
    }
}

fn make_mirror_ran(c: &CatchUp) -> bool {
    c.first.is_some() || c.done.is_some()
}

/// Polls every 10 ms until a key under `burst` exists and then `end`;
/// gives up past `limit`.
async fn catch_up(c: &Client, burst: &str, end: &str, limit: Duration) -> CatchUp {
    let started = Instant::now();
    let mut out = CatchUp::default();
    while started.elapsed() < limit {
        if out.first.is_none() && exists(c, burst, true).await {
            out.first = Some(started.elapsed());
        }
        if out.first.is_some() && exists(c, end, false).await {
            out.done = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    out
}

async fn exists(c: &Client, key: &str, prefix: bool) -> bool {
    let options = etcd_client::GetOptions::new().with_count_only();
    let options = if prefix { options.with_prefix() } else { options };
    c.clone().get(key, Some(options)).await.is_ok_and(|r| r.count() > 0)
}

/// As fast as 16 writers go: one source revision per write.
async fn burst(source: &Client) -> Result<(), CliError> {
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let mut c = source.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..BURST / 16 {
                c.put(format!("{PREFIX}d/burst-{w}-{}", n % 100), vec![1u8; 64], None)
                    .await?;
            }
            Ok::<_, etcd_client::Error>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| CliError::Setup(format!("a burst writer failed: {e}")))?
            .map_err(|e| CliError::Setup(format!("writing the burst: {e}")))?;
    }
    Ok(())
}

/// `etcdctl make-mirror` from eu-west (through us-east's mirror link, the
/// proxies tern's agent uses) into us-east under its own prefix, replaying
/// from the revision after `from`. None without an etcdctl.
fn start_make_mirror(d: &LocalDeployment, from: i64) -> Result<Option<tern_local::process::ChildGuard>, CliError> {
    let Ok(etcdctl) = tern_local::assets::binary("etcdctl") else {
        return Ok(None);
    };
    let source_urls = d
        .region("us-east")
        .agent_args
        .iter()
        .find_map(|a| a.strip_prefix("--source=eu-west="))
        .map(|urls| urls.replace('|', ","))
        .ok_or_else(|| CliError::Setup("no mirror link from us-east to eu-west".into()))?;
    let dest = d.region("us-east").group.endpoints()[0].clone();
    let mut cmd = std::process::Command::new(etcdctl);
    cmd.arg(format!("--endpoints={source_urls}"))
        .arg("make-mirror")
        .arg(format!("--prefix={PREFIX}"))
        .arg(format!("--dest-prefix={MAKE_MIRROR_DEST}"))
        .arg(format!("--rev={from}"))
        .arg(dest);
    let log = d.dir.path().join("make-mirror.log");
    Ok(Some(tern_local::process::ChildGuard::spawn(
        "etcdctl make-mirror",
        cmd,
        &log,
    )?))
}
