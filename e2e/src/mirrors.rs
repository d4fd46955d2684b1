//! Two regions, us-east and eu-west, one etcd member each, with agents
//! mirroring each other over toxiproxy links delayed by [`D`] one way: the
//! deployment the agent tests (mirrors, leadership) and the lag tests share,
//! and what they read of it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use tern_api::pb;
use tern_local::{Layout, LocalDeployment};

/// One-way delay injected on every cross-region link, ms.
pub const D: u64 = 150;

/// The two regions, their agents running, links delayed by [`D`].
pub async fn start() -> LocalDeployment {
    start_with(1).await
}

/// The same, with `us_east_members` members in us-east's group.
pub async fn start_with(us_east_members: usize) -> LocalDeployment {
    crate::init_logs();
    LocalDeployment::start(Layout {
        regions: vec![("us-east".into(), us_east_members), ("eu-west".into(), 1)],
        directory_members: 1,
        rtt_ms: BTreeMap::from([(("us-east".into(), "eu-west".into()), 2 * D)]),
        agents: true,
        otlp_endpoint: None,
        tls: false,
    })
    .await
    .expect("deployment starts")
}

/// Polls `f` every 100 ms until it gives a value; panics after `limit`,
/// naming `what`.
pub async fn wait_for<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let until = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Account keys of eu-west's group, and of us-east's mirror of it:
/// key → (value, version).
pub async fn keyspaces(d: &LocalDeployment) -> (BTreeMap<String, (Vec<u8>, i64)>, BTreeMap<String, (Vec<u8>, i64)>) {
    let mut source = d.group_client("eu-west").await;
    let mut local = d.group_client("us-east").await;
    let src = source
        .get("/tern/a/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("source range");
    let mir = local
        .get("/tern/r/eu-west/tern/a/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("mirror range");
    let collect = |kvs: &[etcd_client::KeyValue], strip: &str| {
        kvs.iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).trim_start_matches(strip).to_string();
                (key, (kv.value().to_vec(), kv.version()))
            })
            .collect::<BTreeMap<_, _>>()
    };
    (collect(src.kvs(), ""), collect(mir.kvs(), "/tern/r/eu-west"))
}

/// Waits (20 s at most) until us-east's mirror of eu-west's account keys
/// equals its source, versions too when `check_versions`.
pub async fn caught_up(d: &LocalDeployment, check_versions: bool) {
    wait_for("the mirror to match its source", Duration::from_secs(20), async || {
        let (src, mir) = keyspaces(d).await;
        let same = if check_versions {
            src == mir
        } else {
            src.len() == mir.len() && src.iter().all(|(k, (v, _))| mir.get(k).is_some_and(|(m, _)| m == v))
        };
        same.then_some(())
    })
    .await;
}

/// Creates an account homed in eu-west, through eu-west's router.
pub async fn create_eu_account(d: &LocalDeployment, account: &str) {
    crate::create_account(d, "eu-west", account, "eu-west", &[])
        .await
        .expect("account");
}

/// Writes `n` values to an eu-west account from eu-west, `every` apart.
pub async fn write_stream(d: &LocalDeployment, account: &str, n: usize, every: Duration) {
    let mut c = d.client("eu-west").await;
    for i in 0..n {
        c.put(pb::PutRequest {
            account: account.into(),
            key: format!("k{}", i % 20),
            value: i.to_string().into_bytes(),
            idempotency_key: String::new(),
        })
        .await
        .expect("put");
        tokio::time::sleep(every).await;
    }
}
