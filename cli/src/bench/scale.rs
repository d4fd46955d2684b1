//! Section `scale`: a directory of a million accounts. A router loads it
//! in pages at start-up and holds every placement in memory, so what a
//! payments company's directory costs is measured here: the router's cold
//! start to Ready, the memory of its placement cache per account, the
//! placement lookup on the hot path, and how long a placement change takes
//! to reach the caches of every region's router.
//!
//! The cache is the router's own (`tern_router::placement::Directory`);
//! memory is the growth of this process's resident set while a second cache
//! loads, so it includes the allocator's rounding and the hash table's
//! spare capacity.

use std::time::{Duration, Instant};

use etcd_client::{Txn, TxnOp};
use tern_common::{AccountId, dir_account_key};
use tern_local::{Layout, LocalDeployment};
use tern_router::placement::Directory;

use super::workload::{ms, quantile};
use crate::CliError;

/// Puts per directory transaction while filling it (etcd's --max-txn-ops
/// is 1,000 in tern's groups).
const FILL_TXN: usize = 1000;
/// Routers whose caches a placement change must reach.
const ROUTERS: usize = 3;
/// Placement changes timed.
const CHANGES: usize = 20;

fn account(i: usize) -> String {
    format!("acct-{i:07}")
}

fn record(home: &str, epoch: u64) -> String {
    format!(r#"{{"home":"{home}","epoch":{epoch},"state":{{"kind":"active"}}}}"#)
}

/// The resident set of this process, bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

async fn wait_synced(cache: &Directory, limit: Duration) -> Result<Duration, CliError> {
    let started = Instant::now();
    while !cache.synced() {
        if started.elapsed() > limit {
            return Err(CliError::Setup(format!(
                "a placement cache did not load within {limit:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(started.elapsed())
}

pub async fn run(accounts: usize) -> Result<String, CliError> {
    println!("  scale: starting a directory and one region");
    let mut d = LocalDeployment::start(Layout::one_region("us-east")).await?;
    let dir = d.directory_client().await;

    println!("  scale: writing {accounts} placements");
    let filled = Instant::now();
    let writers = 4;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut c = dir.clone();
        tasks.push(tokio::spawn(async move {
            let mut start = w * FILL_TXN;
            while start < accounts {
                let ops: Vec<TxnOp> = (start..(start + FILL_TXN).min(accounts))
                    .map(|i| TxnOp::put(format!("/tern/dir/accounts/{}", account(i)), record("us-east", 1), None))
                    .collect();
                c.txn(Txn::new().and_then(ops)).await?;
                start += writers * FILL_TXN;
            }
            Ok::<_, etcd_client::Error>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| CliError::Setup(format!("a fill task failed: {e}")))?
            .map_err(|e| CliError::Setup(format!("filling the directory: {e}")))?;
    }
    let fill_time = filled.elapsed();

    // One cache loads; then the memory of a second one: by then the first
    // load's page buffers are back in the allocator, so the resident set
    // grows by what a cache holds.
    let cache = Directory::new(d.directory_client().await);
    let mut watches = vec![cache.spawn_watch()];
    let load = wait_synced(&cache, Duration::from_secs(600)).await?;
    let cached = cache.cached_accounts().await;
    let before = rss();
    let second = Directory::new(d.directory_client().await);
    watches.push(second.spawn_watch());
    wait_synced(&second, Duration::from_secs(600)).await?;
    let after = rss();
    let per_account = after.saturating_sub(before) as f64 / cached.max(1) as f64;
    let id_bytes = account(0).len() as f64;

    // Hot path: lookups of random cached accounts.
    let ids: Vec<AccountId> = (0..accounts.min(200_000))
        .map(|_| AccountId::new(account(rand::random_range(0..accounts))))
        .collect::<Result<_, _>>()
        .map_err(|e| CliError::Setup(format!("account id: {e}")))?;
    let mut lookups = Vec::with_capacity(ids.len());
    for id in &ids {
        let t = Instant::now();
        let found = cache.lookup(id).await;
        lookups.push(t.elapsed());
        if found.is_err() {
            return Err(CliError::Setup(format!("{id} is not in the cache")));
        }
    }
    lookups.sort_unstable();

    // Cold start: the region's router, restarted, until /readyz answers.
    println!("  scale: restarting the router");
    let started = Instant::now();
    d.restart_router("us-east").await?;
    let http = d
        .region("us-east")
        .router
        .as_ref()
        .map(|r| r.http_addr)
        .ok_or_else(|| CliError::Setup("no router".into()))?;
    while tern_local::http::http_get(http, "/readyz").await.is_none() {
        if started.elapsed() > Duration::from_secs(600) {
            return Err(CliError::Setup("the router did not become ready within 600 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cold_start = started.elapsed();

    // Propagation: a placement change until every router's cache has it.
    // The first cache is the one above; the others stand for the routers of
    // other regions, each with its own watch.
    let mut caches = vec![cache, second];
    for _ in 2..ROUTERS {
        let c = Directory::new(d.directory_client().await);
        watches.push(c.spawn_watch());
        wait_synced(&c, Duration::from_secs(600)).await?;
        caches.push(c);
    }
    let mut propagation = Vec::new();
    let mut writer = dir.clone();
    for n in 0..CHANGES {
        let id = AccountId::new(account(rand::random_range(0..accounts)))
            .map_err(|e| CliError::Setup(format!("account id: {e}")))?;
        let epoch = 2 + n as u64;
        let t = Instant::now();
        writer
            .put(dir_account_key(&id), record("eu-west", epoch), None)
            .await
            .map_err(|e| CliError::Setup(format!("moving {id}: {e}")))?;
        for c in &caches {
            while c.cached(&id).await.map(|p| p.epoch.0) != Some(epoch) {
                if t.elapsed() > Duration::from_secs(30) {
                    return Err(CliError::Setup(format!("the change of {id} never reached a cache")));
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        propagation.push(t.elapsed());
    }
    propagation.sort_unstable();
    for w in watches {
        w.abort();
    }
    drop(caches);
    drop(d);

    Ok(format!(
        "## Scale ({accounts} accounts in the directory)\n\n| measure | value |\n|---|---:|\n\
         | filling the directory ({FILL_TXN} puts per transaction, {writers} writers) | {:.1} s |\n\
         | one placement cache loading it (pages from {} keys, growing to ~4 MiB) | {:.1} s ({:.0} accounts/s) |\n\
         | router cold start to Ready | **{:.1} s** |\n\
         | memory per cached account (resident set growth while a second cache loads / accounts) | {per_account:.0} bytes |\n\
         | … on top of the account id ({id_bytes:.0} bytes here) | **{:.0} bytes** |\n\
         | placement lookup, p50 / p99 ({} lookups of random accounts) | {:.2} / **{:.2}** µs |\n\
         | a placement change reaching all {ROUTERS} routers' caches, p50 / max ({CHANGES} changes) | {:.1} / **{:.1}** ms |\n\n\
         Targets: at most 150 bytes per account on top of its id.\n",
        fill_time.as_secs_f64(),
        tern_router::placement::DIRECTORY_PAGE,
        load.as_secs_f64(),
        cached as f64 / load.as_secs_f64(),
        cold_start.as_secs_f64(),
        per_account - id_bytes,
        lookups.len(),
        ms(quantile(&lookups, 0.5)) * 1000.0,
        ms(quantile(&lookups, 0.99)) * 1000.0,
        ms(quantile(&propagation, 0.5)),
        ms(quantile(&propagation, 1.0)),
    ))
}
