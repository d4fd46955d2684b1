//! The measuring both kinds of bench section share: writers driven for a
//! fixed time, their latencies, and the figures a table prints from them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// The `q` quantile (0–1) of sorted latencies; zero when there are none.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// A duration in ms.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Throughput, p50 and p99 over `rounds`.
pub fn summarize(rounds: &[Round]) -> (f64, Duration, Duration) {
    let ops: usize = rounds.iter().map(|r| r.ops).sum();
    let secs: f64 = rounds.iter().map(|r| r.elapsed.as_secs_f64()).sum();
    let mut all: Vec<Duration> = rounds.iter().flat_map(|r| r.latencies.iter().copied()).collect();
    all.sort_unstable();
    (ops as f64 / secs, quantile(&all, 0.5), quantile(&all, 0.99))
}

/// What one round of writers did: successful writes, for how long, and
/// each one's latency (sorted).
pub struct Round {
    pub ops: usize,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

/// Runs `concurrency` writers calling `op(writer, n)` for `secs`.
pub async fn round<F, Fut>(concurrency: usize, secs: u64, op: F) -> Round
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let op = op.clone();
        let latencies = latencies.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut n = 0u64;
            while Instant::now() < until {
                let t = Instant::now();
                if op(w, n).await {
                    mine.push(t.elapsed());
                }
                n += 1;
            }
            latencies.lock().await.extend(mine);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed();
    let mut latencies = Arc::try_unwrap(latencies).map(Mutex::into_inner).unwrap_or_default();
    latencies.sort_unstable();
    Round {
        ops: latencies.len(),
        elapsed,
        latencies,
    }
}
