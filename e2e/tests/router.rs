//! The data plane against real etcd groups, in-process routers and toxiproxy
//! links: local and cross-region writes, stale placements, idempotency, bad
//! input, and faults.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use tern_api::pb;
use tern_local::toxiproxy::Stream;
use tern_local::{Layout, LocalDeployment};
use tonic::Code;

const RTT_MS: u64 = 80;

fn layout(us_east_members: usize) -> Layout {
    Layout {
        regions: vec![("us-east".into(), us_east_members), ("eu-west".into(), 1)],
        directory_members: 1,
        rtt_ms: BTreeMap::from([(("us-east".into(), "eu-west".into()), RTT_MS)]),
        agents: false,
        otlp_endpoint: None,
        tls: false,
    }
}

async fn start(us_east_members: usize) -> LocalDeployment {
    tern_e2e::init_logs();
    LocalDeployment::start(layout(us_east_members))
        .await
        .expect("deployment starts")
}

async fn create(d: &LocalDeployment, via: &str, account: &str, home: &str) {
    let resp = d
        .client(via)
        .await
        .create_account(pb::CreateAccountRequest {
            account: account.into(),
            home_region: home.into(),
            allowed_regions: vec![],
        })
        .await
        .expect("account created")
        .into_inner();
    assert_eq!((resp.home_region.as_str(), resp.epoch), (home, 1));
}

fn put(account: &str, key: &str, value: &str, idem: &str) -> pb::PutRequest {
    pb::PutRequest {
        account: account.into(),
        key: key.into(),
        value: value.as_bytes().to_vec(),
        idempotency_key: idem.into(),
    }
}

/// Every key under /tern/a/ in a group, with its value and version.
async fn account_keys(d: &LocalDeployment, region: &str) -> BTreeMap<String, (Vec<u8>, i64)> {
    let mut c = d.group_client(region).await;
    // Tests move the group's leader: a read during the election is retried.
    let mut tries = 0;
    let resp = loop {
        match c.get("/tern/a/", Some(GetOptions::new().with_prefix())).await {
            Ok(resp) => break resp,
            Err(etcd_client::Error::GRpcStatus(s)) if s.code() == Code::Unavailable && tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("range read: {e}"),
        }
    };
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                (kv.value().to_vec(), kv.version()),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_cross_region_writes() {
    let d = start(1).await;
    create(&d, "us-east", "acct-1", "us-east").await;
    // Created through the other region: forwarded to the home, which writes
    // the fence in its own group.
    create(&d, "eu-west", "acct-2", "us-east").await;

    // Local write: committed in the home group, visible to a strong read.
    let mut us = d.client("us-east").await;
    let resp = us
        .put(put("acct-1", "balance", "100", ""))
        .await
        .expect("local put")
        .into_inner();
    let meta = resp.meta.expect("meta");
    assert_eq!(
        (meta.home_region.as_str(), meta.forwarded, meta.replayed),
        ("us-east", false, false)
    );
    let got = us
        .get(pb::GetRequest {
            account: "acct-1".into(),
            key: "balance".into(),
            read: None,
        })
        .await
        .expect("get")
        .into_inner();
    assert!(got.found);
    assert_eq!(got.value, b"100");
    assert!(got.mod_revision >= meta.revision);
    let keys = account_keys(&d, "us-east").await;
    assert_eq!(keys["/tern/a/acct-1/d/balance"].0, b"100");
    assert_eq!(keys["/tern/a/acct-1/fence"].0, b"1:active");
    assert!(
        account_keys(&d, "eu-west").await.is_empty(),
        "nothing lands outside the home group"
    );

    // Cross-region write: from eu-west, forwarded once, at least one RTT.
    let mut eu = d.client("eu-west").await;
    eu.put(put("acct-1", "warmup", "x", ""))
        .await
        .expect("warm the pooled channel");
    let started = Instant::now();
    let resp = eu
        .put(put("acct-1", "balance", "90", ""))
        .await
        .expect("proxied put")
        .into_inner();
    let elapsed = started.elapsed();
    assert!(resp.meta.expect("meta").forwarded);
    assert!(
        elapsed >= Duration::from_millis(RTT_MS),
        "a proxied write took {elapsed:?}, less than the injected {RTT_MS} ms"
    );
    assert!(
        elapsed < Duration::from_millis(3 * RTT_MS),
        "a proxied write took {elapsed:?}: more than one round trip"
    );
    assert_eq!(account_keys(&d, "us-east").await["/tern/a/acct-1/d/balance"].0, b"90");
    assert!(account_keys(&d, "eu-west").await.is_empty());

    // List pages through an account's keys by prefix, from either region.
    for i in 0..5 {
        us.put(put("acct-2", &format!("item:{i}"), "v", "")).await.expect("put");
    }
    let page = eu
        .list(pb::ListRequest {
            account: "acct-2".into(),
            prefix: "item:".into(),
            limit: 3,
            page_token: String::new(),
            read: None,
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        page.items.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
        ["item:0", "item:1", "item:2"]
    );
    let rest = eu
        .list(pb::ListRequest {
            account: "acct-2".into(),
            prefix: "item:".into(),
            limit: 3,
            page_token: page.next_page_token,
            read: None,
        })
        .await
        .expect("second page")
        .into_inner();
    assert_eq!(rest.items.len(), 2);
    assert!(rest.next_page_token.is_empty());

    // Txn: compares hold → applied; a failed compare → FAILED_PRECONDITION.
    let txn = |expected: &str| pb::TxnRequest {
        account: "acct-1".into(),
        compares: vec![pb::Compare {
            key: "balance".into(),
            target: pb::compare::Target::Value as i32,
            op: pb::compare::Op::Equal as i32,
            value: expected.as_bytes().to_vec(),
            number: 0,
        }],
        ops: vec![
            pb::Operation {
                op: Some(pb::operation::Op::Put(pb::PutOp {
                    key: "balance".into(),
                    value: b"80".to_vec(),
                })),
            },
            pb::Operation {
                op: Some(pb::operation::Op::Get(pb::GetOp { key: "balance".into() })),
            },
        ],
        idempotency_key: String::new(),
    };
    let ok = eu.txn(txn("90")).await.expect("txn applies").into_inner();
    assert_eq!(ok.gets[0].value, b"80");
    let err = eu.txn(txn("90")).await.expect_err("stale compare");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");

    // Delete reports whether the key existed.
    let del = eu
        .delete(pb::DeleteRequest {
            account: "acct-1".into(),
            key: "balance".into(),
            idempotency_key: "del-1".into(),
        })
        .await
        .expect("delete")
        .into_inner();
    assert!(del.existed);
    let again = eu
        .delete(pb::DeleteRequest {
            account: "acct-1".into(),
            key: "balance".into(),
            idempotency_key: "del-1".into(),
        })
        .await
        .expect("replayed delete")
        .into_inner();
    assert!(
        again.existed && again.meta.expect("meta").replayed,
        "a replay answers as the first call did"
    );

    // Unknown accounts are NOT_FOUND; creating an account homed elsewhere is refused.
    let err = eu.put(put("nobody", "k", "v", "")).await.expect_err("unknown account");
    assert_eq!(err.code(), Code::NotFound);
    let err = us
        .create_account(pb::CreateAccountRequest {
            account: "acct-1".into(),
            home_region: "eu-west".into(),
            allowed_regions: vec![],
        })
        .await
        .expect_err("exists elsewhere");
    assert_eq!(err.code(), Code::AlreadyExists);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_placement_is_refused_by_the_fence() {
    let d = start(1).await;
    create(&d, "eu-west", "acct-1", "us-east").await;
    let mut eu = d.client("eu-west").await;
    eu.put(put("acct-1", "k", "before", "")).await.expect("put at epoch 1");

    // The account's fence moves on (as a migration would) while every
    // router's placement still says epoch 1.
    let mut group = d.group_client("us-east").await;
    group
        .put("/tern/a/acct-1/fence", "2:active", None)
        .await
        .expect("fence to epoch 2");
    let mut request = tonic::Request::new(put("acct-1", "k", "stale", ""));
    request.set_timeout(Duration::from_millis(500));
    let err = eu.put(request).await.expect_err("a write under the old epoch fails");
    // The origin router cannot know how the home's last attempt ended when
    // its deadline passes: "outcome unknown", or "deadline exceeded" when
    // nothing was in flight. Either way the fence refused it.
    assert!(matches!(err.code(), Code::DeadlineExceeded | Code::Unknown), "{err}");
    assert_eq!(
        account_keys(&d, "us-east").await["/tern/a/acct-1/d/k"].0,
        b"before",
        "never applied under the old epoch"
    );

    // Once the directory says epoch 2, the router refreshes and the write goes through.
    let mut dir = d.directory_client().await;
    dir.put(
        "/tern/dir/accounts/acct-1",
        r#"{"home":"us-east","epoch":2,"state":{"kind":"active"}}"#,
        None,
    )
    .await
    .expect("directory at epoch 2");
    let resp = eu
        .put(put("acct-1", "k", "after", ""))
        .await
        .expect("write at epoch 2")
        .into_inner();
    assert_eq!(resp.meta.expect("meta").epoch, 2);
    assert_eq!(account_keys(&d, "us-east").await["/tern/a/acct-1/d/k"].0, b"after");
}

/// Writes that meet a fenced account (a migration under way) wait within
/// their deadline, backing off: all the calls waiting on the account cost
/// the directory a few reads a second, not one per retry. Once the fence is
/// active again the next write goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_fence_miss_backs_off_instead_of_polling_the_directory() {
    let d = start(1).await;
    create(&d, "us-east", "acct-f", "us-east").await;
    let router = d.region("us-east").router.as_ref().expect("router running");
    let mut group = d.group_client("us-east").await;
    group
        .put("/tern/a/acct-f/fence", "1:fenced", None)
        .await
        .expect("fence the account");
    let reads = async || router.metric("tern_router_directory_reads_total").await.unwrap_or(0.0);
    let before = reads().await;
    let waited = Duration::from_secs(2);
    let calls = (0..4).map(|i| {
        let d = &d;
        async move {
            let mut request = tonic::Request::new(put("acct-f", "k", &format!("v{i}"), ""));
            request.set_timeout(waited);
            d.client("us-east").await.put(request).await
        }
    });
    for result in futures::future::join_all(calls).await {
        let err = result.expect_err("a fenced account takes no write");
        assert!(matches!(err.code(), Code::DeadlineExceeded | Code::Unknown), "{err}");
    }
    let sent = reads().await - before;
    // At most 4 reads a second for the account (every 250 ms), plus one per
    // call at the first miss; retrying every few ms would be hundreds.
    assert!(
        sent <= 4.0 * waited.as_secs_f64() + 6.0,
        "{sent} directory reads in {waited:?}"
    );
    assert!(
        !account_keys(&d, "us-east").await.contains_key("/tern/a/acct-f/d/k"),
        "nothing written while fenced"
    );

    group
        .put("/tern/a/acct-f/fence", "1:active", None)
        .await
        .expect("unfence");
    d.client("us-east")
        .await
        .put(put("acct-f", "k", "after", ""))
        .await
        .expect("the write goes through once the fence is active");
}

/// A router loads the directory in pages at one revision and watches from
/// there: placements written, changed and deleted while the pages come in
/// all end up in its cache exactly as the directory holds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paginated_directory_load_misses_no_change_made_during_it() {
    use tern_router::placement::Directory;

    let d = start(1).await;
    let mut dir = d.directory_client().await;
    let record = |home: &str, epoch: u64| format!(r#"{{"home":"{home}","epoch":{epoch},"state":{{"kind":"active"}}}}"#);
    for chunk in (0..3000).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<_> = chunk
            .iter()
            .map(|i| etcd_client::TxnOp::put(format!("/tern/dir/accounts/acct-{i}"), record("us-east", 1), None))
            .collect();
        dir.txn(etcd_client::Txn::new().and_then(ops)).await.expect("preload");
    }

    // Pages from 100 keys (100, 200, 400, …); a writer moves, adds and
    // deletes accounts meanwhile.
    let cache = Directory::new(d.directory_client().await).with_page_size(100);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let mut dir = d.directory_client().await;
        let stop = stop.clone();
        let cache = cache.clone();
        tokio::spawn(async move {
            let (mut during_load, mut i) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n = (i * 7919) % 3000;
                match i % 3 {
                    0 => dir
                        .put(format!("/tern/dir/accounts/acct-{n}"), record("eu-west", 2 + i), None)
                        .await
                        .map(|_| ()),
                    1 => dir
                        .put(format!("/tern/dir/accounts/new-{i}"), record("eu-west", 1), None)
                        .await
                        .map(|_| ()),
                    _ => dir
                        .delete(format!("/tern/dir/accounts/acct-{n}"), None)
                        .await
                        .map(|_| ()),
                }
                .map(|_| ())
                .expect("directory write");
                if !cache.synced() {
                    during_load += 1;
                }
                i += 1;
            }
            during_load
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let watch = cache.spawn_watch();
    let synced_at = Instant::now();
    while !cache.synced() {
        assert!(synced_at.elapsed() < Duration::from_secs(20), "the load never finished");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let during_load = writer.await.expect("writer");
    assert!(during_load > 0, "the writer must overlap the load");

    // The watch catches up with the last write; then cache = directory.
    let all = dir
        .get("/tern/dir/accounts/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("directory");
    let want: BTreeMap<String, tern_common::AccountRecord> = all
        .kvs()
        .iter()
        .map(|kv| {
            let key = String::from_utf8_lossy(kv.key())
                .trim_start_matches("/tern/dir/accounts/")
                .to_string();
            (key, serde_json::from_slice(kv.value()).expect("record"))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut wrong = Vec::new();
        for (account, record) in &want {
            let id = tern_common::AccountId::new(account.clone()).expect("account id");
            if cache.cached(&id).await.as_ref() != Some(record) {
                wrong.push(account.clone());
            }
        }
        let extra = cache.cached_accounts().await != want.len();
        if wrong.is_empty() && !extra {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cache differs from the directory: {} accounts wrong (e.g. {:?}), {} cached for {} in the directory",
            wrong.len(),
            wrong.first(),
            cache.cached_accounts().await,
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watch.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_writes_apply_once_even_when_the_answer_is_lost() {
    let d = start(1).await;
    create(&d, "us-east", "acct-1", "us-east").await;
    let mut eu = d.client("eu-west").await;

    let first = eu
        .put(put("acct-1", "k", "v1", "op-1"))
        .await
        .expect("first")
        .into_inner()
        .meta
        .expect("meta");
    let second = eu
        .put(put("acct-1", "k", "v1", "op-1"))
        .await
        .expect("retry")
        .into_inner()
        .meta
        .expect("meta");
    assert!(!first.replayed && second.replayed);
    assert_eq!(
        first.revision, second.revision,
        "the replay answers with the first result"
    );
    assert_eq!(
        account_keys(&d, "us-east").await["/tern/a/acct-1/d/k"].1,
        1,
        "applied once"
    );

    // The same key for a different write is refused, not answered wrongly.
    let err = eu
        .put(put("acct-1", "k", "other", "op-1"))
        .await
        .expect_err("reused key");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    // Lose the answer: the home applies the write, the link drops what it sends back.
    let link = &d.links[&("eu-west".to_string(), "us-east".to_string())];
    d.toxiproxy
        .blackhole(link, Stream::Downstream)
        .await
        .expect("cut the answers");
    let mut request = tonic::Request::new(put("acct-1", "k", "v2", "op-2"));
    request.set_timeout(Duration::from_millis(800));
    let err = eu.put(request).await.expect_err("no answer comes back");
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Unavailable | Code::Unknown),
        "{err}"
    );
    d.toxiproxy
        .remove_toxic(link, "blackhole_downstream")
        .await
        .expect("heal");
    d.toxiproxy
        .set_enabled(link, false)
        .await
        .expect("drop the stuck connection");
    d.toxiproxy.set_enabled(link, true).await.expect("reopen");
    let retry = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eu.put(put("acct-1", "k", "v2", "op-2")).await {
                Ok(r) => break r.into_inner().meta.expect("meta"),
                Err(e)
                    if matches!(
                        e.code(),
                        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
                    ) =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("retry failed: {e}"),
            }
        }
    })
    .await
    .expect("the retry goes through once the link heals");
    assert!(
        retry.replayed,
        "the first attempt had been applied; the retry must not apply it again"
    );
    let keys = account_keys(&d, "us-east").await;
    assert_eq!(
        keys["/tern/a/acct-1/d/k"],
        (b"v2".to_vec(), 2),
        "v2 applied exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_writes_nothing() {
    let d = start(1).await;
    create(&d, "us-east", "acct-1", "us-east").await;
    let before_us = account_keys(&d, "us-east").await;
    let before_eu = account_keys(&d, "eu-west").await;
    let mut eu = d.client("eu-west").await;
    let big = "x".repeat(1024 * 1024 + 1);
    let long_key = "k".repeat(513);
    let cases: Vec<(pb::PutRequest, &str)> = vec![
        (put("", "k", "v", ""), "account is empty"),
        (put("acct-1/../acct-2", "k", "v", ""), "account contains '/'"),
        (put("acct..1", "k", "v", ""), "'..'"),
        (put("acct\u{0}1", "k", "v", ""), "control character"),
        (put("acct 1", "k", "v", ""), "letters, digits"),
        (put(&"a".repeat(129), "k", "v", ""), "limit is 128"),
        (put("acct-1", "", "v", ""), "key is empty"),
        (put("acct-1", "../fence", "v", ""), "'/'"),
        (put("acct-1", "a/b", "v", ""), "'/'"),
        (put("acct-1", "..", "v", ""), "'..'"),
        (put("acct-1", "k\n", "v", ""), "control character"),
        (put("acct-1", &long_key, "v", ""), "limit is 512"),
        (put("acct-1", "k", &big, ""), "value is"),
        (put("acct-1", "k", "v", "bad/idem"), "idempotency_key"),
    ];
    for (request, needle) in cases {
        let label = format!(
            "{:?}/{:?}",
            request.account.chars().take(20).collect::<String>(),
            request.key.chars().take(20).collect::<String>()
        );
        let err = eu.put(request).await.expect_err(&label);
        assert_eq!(err.code(), Code::InvalidArgument, "{label}: {err}");
        assert!(
            err.message().contains(needle),
            "{label}: `{}` does not say `{needle}`",
            err.message()
        );
    }
    let err = eu
        .create_account(pb::CreateAccountRequest {
            account: "acct-9".into(),
            home_region: "Mars".into(),
            allowed_regions: vec![],
        })
        .await
        .expect_err("bad region");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("region"), "{}", err.message());
    assert_eq!(
        before_us,
        account_keys(&d, "us-east").await,
        "no write in the home group"
    );
    assert_eq!(
        before_eu,
        account_keys(&d, "eu-west").await,
        "no write in the other group"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_leader_kill_and_a_router_restart() {
    let mut d = start(3).await;
    create(&d, "us-east", "acct-1", "us-east").await;
    let mut us = d.client("us-east").await;
    let mut acknowledged = Vec::new();
    let mut killed = None;
    for i in 0..60 {
        if i == 20 {
            let leader = d.region("us-east").group.leader().await.expect("a leader");
            d.region_mut("us-east").group.kill(leader);
            killed = Some(leader);
        }
        // A client that retries with the same idempotency key until the
        // write is acknowledged, as a payments client would.
        let key = format!("tx-{i}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut request = tonic::Request::new(put("acct-1", &key, &i.to_string(), &key));
            request.set_timeout(Duration::from_secs(2));
            match us.put(request).await {
                Ok(_) => {
                    acknowledged.push(key.clone());
                    break;
                }
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.code(),
                            Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
                        ) =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("write {key} failed for good: {e}"),
            }
        }
    }
    assert_eq!(acknowledged.len(), 60, "writes resume after re-election");
    d.region_mut("us-east")
        .group
        .restart(killed.expect("killed one"))
        .expect("the member rejoins");
    d.restart_router("us-east").await.expect("router restarts");
    let mut us = d.client("us-east").await;
    for key in &acknowledged {
        let got = us
            .get(pb::GetRequest {
                account: "acct-1".into(),
                key: key.clone(),
                read: None,
            })
            .await
            .expect("read after restart")
            .into_inner();
        assert!(got.found, "acknowledged write {key} is lost");
    }
    let keys = account_keys(&d, "us-east").await;
    for key in &acknowledged {
        assert_eq!(
            keys[&format!("/tern/a/acct-1/d/{key}")].1,
            1,
            "{key} applied more than once"
        );
    }
}

/// Region endpoints are DNS names, re-resolved when their TTL expires: moving
/// a region's routers is a DNS change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_a_region_is_a_dns_change() {
    use tern_e2e::dns::TestDns;
    use tern_local::etcd_cluster::{EtcdCluster, Tuning};
    use tern_local::local::RouterGuard;

    tern_e2e::init_logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let directory = EtcdCluster::start(dir.path(), "directory", 1, Tuning::default()).expect("directory");
    let us_group = EtcdCluster::start(dir.path(), "us-east", 1, Tuning::default()).expect("us-east group");
    let eu_group = EtcdCluster::start(dir.path(), "eu-west", 1, Tuning::default()).expect("eu-west group");
    let dns = TestDns::start().await.expect("dns");
    let name = "router.eu-west.tern.test";
    dns.set(name, "127.0.0.1".parse().expect("ip"), 1);

    let port = tern_e2e::assets::free_port();
    let router_args = |region: &str, listen: &str, group: &EtcdCluster, extra: &[String]| {
        let mut args = vec![
            format!("--region={region}"),
            format!("--listen={listen}"),
            "--http-addr=127.0.0.1:0".to_string(),
            format!("--group-endpoints={}", group.endpoints().join(",")),
            format!("--directory-endpoints={}", directory.endpoints().join(",")),
            "--peer-token=dns-test-peer-token".to_string(),
            "--log-format=text".to_string(),
            // No agents here.
            "--region-lease=false".to_string(),
        ];
        args.extend_from_slice(extra);
        args
    };
    let eu_a = RouterGuard::start(&router_args("eu-west", &format!("127.0.0.1:{port}"), &eu_group, &[]))
        .await
        .expect("eu-west router on 127.0.0.1");
    let us = RouterGuard::start(&router_args(
        "us-east",
        "127.0.0.1:0",
        &us_group,
        &[
            format!("--dns-server={}", dns.addr),
            format!("--peer=eu-west={name}:{port}"),
        ],
    ))
    .await
    .expect("us-east router");

    let mut client = us.client().await;
    client
        .create_account(pb::CreateAccountRequest {
            account: "acct-1".into(),
            home_region: "eu-west".into(),
            allowed_regions: vec![],
        })
        .await
        .expect("created through DNS");
    client
        .put(put("acct-1", "k", "1", ""))
        .await
        .expect("forwarded through DNS");

    // The region's routers move to another address; DNS follows.
    let eu_b = RouterGuard::start(&router_args("eu-west", &format!("127.0.0.2:{port}"), &eu_group, &[]))
        .await
        .expect("eu-west router on 127.0.0.2");
    eu_a.stop().await;
    dns.set(name, "127.0.0.2".parse().expect("ip"), 1);
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut request = tonic::Request::new(put("acct-1", "k", "2", "after-move"));
        request.set_timeout(Duration::from_secs(2));
        match client.put(request).await {
            Ok(r) => {
                assert!(r.into_inner().meta.expect("meta").forwarded);
                break;
            }
            Err(e) if started.elapsed() < Duration::from_secs(10) => {
                tracing::info!(attempt, error = %e, "waiting for the DNS change");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("writes did not follow the DNS change: {e}"),
        }
    }
    let metrics = tern_e2e::operator::http_get(eu_b.http_addr, "/metrics")
        .await
        .unwrap_or_default();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tern_router_requests_total{op=\"put\",route=\"proxied_in\",code=\"Ok\"}")),
        "the moved router served the forwarded write:\n{metrics}"
    );
    us.stop().await;
    eu_b.stop().await;
    dns.stop().await;
}

/// Concurrent writes share etcd transactions (group commit), yet each keeps
/// its own outcome: a write whose fence fails fails alone, writes to one key
/// are all applied in some order, and idempotent writes record their keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_transactions_and_keep_their_own_outcomes() {
    let d = start(1).await;
    create(&d, "us-east", "acct-a", "us-east").await;
    create(&d, "us-east", "acct-b", "us-east").await;
    // acct-b's fence moves on behind the routers' backs: its writes must fail.
    let mut group = d.group_client("us-east").await;
    group
        .put("/tern/a/acct-b/fence", "2:active", None)
        .await
        .expect("fence to epoch 2");
    let router = d.region("us-east").router.as_ref().expect("router");
    let batched = async || {
        let metrics = tern_e2e::operator::http_get(router.http_addr, "/metrics")
            .await
            .unwrap_or_default();
        let value = |name: &str| {
            metrics
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // More writes than transactions: some shared one.
        value("tern_router_write_batch_size_sum") > value("tern_router_write_batch_size_count")
    };

    let mut rounds = 0;
    while rounds < 5 && (rounds == 0 || !batched().await) {
        rounds += 1;
        let mut tasks = Vec::new();
        for i in 0..40 {
            let mut c = d.client("us-east").await;
            tasks.push(tokio::spawn(async move {
                let (account, key, idem) = match i % 4 {
                    0 => ("acct-b", format!("k{i}"), String::new()),
                    1 => ("acct-a", "same".to_string(), String::new()),
                    2 => ("acct-a", format!("k{i}"), format!("op-{rounds}-{i}")),
                    _ => ("acct-a", format!("k{i}"), String::new()),
                };
                let mut request = tonic::Request::new(put(account, &key, &format!("v{i}"), &idem));
                request.set_timeout(Duration::from_millis(1500));
                (i, c.put(request).await)
            }));
        }
        for t in tasks {
            let (i, result) = t.await.expect("task");
            match (i % 4, result) {
                // Refused by the fence until the deadline; the last attempt
                // may be in flight then, so "outcome unknown" is the truth
                // the router can tell. The client's own timer fires at the
                // same deadline, and on a busy machine before the router's
                // answer arrives (CANCELLED, "Timeout expired"). The keys
                // below show none applied.
                (0, Err(e)) => assert!(
                    matches!(e.code(), Code::DeadlineExceeded | Code::Unknown | Code::Cancelled),
                    "write {i}: {e}"
                ),
                (0, Ok(_)) => panic!("write {i} under a moved fence was applied"),
                (_, Ok(resp)) => {
                    let meta = resp.into_inner().meta.expect("meta");
                    assert!(meta.revision > 0 && !meta.replayed, "write {i}: {meta:?}");
                }
                (_, Err(e)) => panic!("write {i} failed: {e}"),
            }
        }
    }
    assert!(
        batched().await,
        "no two writes ever shared a transaction in {rounds} rounds"
    );

    let keys = account_keys(&d, "us-east").await;
    assert!(
        !keys.keys().any(|k| k.starts_with("/tern/a/acct-b/d/")),
        "nothing written under the moved fence"
    );
    for i in (0..40).filter(|i| i % 4 >= 2) {
        assert_eq!(keys[&format!("/tern/a/acct-a/d/k{i}")].0, format!("v{i}").as_bytes());
    }
    let same = String::from_utf8_lossy(&keys["/tern/a/acct-a/d/same"].0).into_owned();
    assert!(
        (0..40).filter(|i| i % 4 == 1).any(|i| same == format!("v{i}")),
        "{same}"
    );
    assert_eq!(
        keys["/tern/a/acct-a/d/same"].1,
        10 * rounds as i64,
        "every write to one key applied"
    );
    let records = keys.keys().filter(|k| k.starts_with("/tern/a/acct-a/idem/")).count();
    assert_eq!(records, 10 * rounds, "one idempotency record per idempotent write");
}

/// Writes `n` keys `{prefix}-{i}` one by one; returns how many transactions
/// each member of `group` served meanwhile.
async fn txns_per_member(
    group: &tern_e2e::etcd_cluster::EtcdCluster,
    n: usize,
    router: &mut pb::router_client::RouterClient<tonic::transport::Channel>,
    prefix: &str,
) -> Vec<u64> {
    let mut before = Vec::new();
    for m in 0..3 {
        before.push(group.txns_served(m).await);
    }
    for i in 0..n {
        router
            .put(put("acct-1", &format!("{prefix}-{i}"), "v", ""))
            .await
            .expect("write");
    }
    let mut served = Vec::new();
    for (m, b) in before.iter().enumerate() {
        served.push((group.txns_served(m).await - b) as u64);
    }
    served
}

/// `n` transactions on `member` of three, none on the others.
fn one_member(member: usize, n: u64) -> Vec<u64> {
    let mut v = vec![0; 3];
    v[member] = n;
    v
}

/// The router sends its transactions to the region group's Raft leader, not
/// through a follower that would forward them, follows leadership when it
/// moves (writes keep succeeding meanwhile), and leaves a leader that hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_to_the_group_leader_and_follow_it() {
    let d = start(3).await;
    create(&d, "us-east", "acct-1", "us-east").await;
    let router = d.region("us-east").router.as_ref().expect("router running");
    tern_e2e::operator::eventually("the router to find the leader", Duration::from_secs(20), || async {
        (router.metric("tern_router_group_leader_direct").await == Some(1.0)).then_some(())
    })
    .await;
    let mut us = d.client("us-east").await;
    let group = &d.region("us-east").group;

    // Sequential writes: one transaction each, every one on the leader.
    let leader = group.leader().await.expect("a leader");
    assert_eq!(
        txns_per_member(group, 20, &mut us, "a").await,
        one_member(leader, 20),
        "transactions per member, leader {leader}"
    );

    // Hand leadership to another member. Writes still succeed (the old
    // leader forwards them), and the first answer with the new Raft term
    // sends the router to the new leader.
    let next = (leader + 1) % 3;
    group.move_leader(next).await.expect("leadership moves");
    let mut n = 0;
    tern_e2e::operator::eventually("the router to follow the new leader", Duration::from_secs(20), || {
        n += 1;
        let mut us = us.clone();
        async move {
            us.put(put("acct-1", &format!("b-{n}"), "v", ""))
                .await
                .expect("writes succeed while leadership moves");
            (router.metric("tern_router_group_leader_changes").await >= Some(2.0)).then_some(())
        }
    })
    .await;
    assert_eq!(group.leader().await, Some(next));
    assert_eq!(
        txns_per_member(group, 20, &mut us, "c").await,
        one_member(next, 20),
        "transactions per member after the move to {next}"
    );

    // The leader hangs (SIGSTOP: its connections stay open, nothing
    // answers). Writes that time out make the router look for the leader
    // again; once the others have elected one, writes succeed while the old
    // leader is still frozen.
    group.pause(next);
    let mut attempts = 0;
    tern_e2e::operator::eventually("a write while the old leader hangs", Duration::from_secs(30), || {
        attempts += 1;
        let mut us = us.clone();
        async move {
            let mut request = tonic::Request::new(put("acct-1", "during-hang", "v", "during-hang"));
            request.set_timeout(Duration::from_secs(1));
            us.put(request).await.ok().map(|_| ())
        }
    })
    .await;
    tern_e2e::operator::eventually(
        "the router to leave the hung leader",
        Duration::from_secs(20),
        || async { (router.metric("tern_router_group_leader_changes").await >= Some(3.0)).then_some(()) },
    )
    .await;
    group.resume(next);
    let keys = account_keys(&d, "us-east").await;
    assert_eq!(
        keys["/tern/a/acct-1/d/during-hang"].1, 1,
        "applied once over {attempts} attempts"
    );
}

/// Idempotency records are attached to an etcd lease and deleted once the
/// retention has passed: the key is remembered within it, new after it, and
/// the group does not keep every record ever written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_records_expire_after_the_retention() {
    let mut d = start(1).await;
    d.region_mut("us-east")
        .router_args
        .push("--idempotency-retention=2s".into());
    d.restart_router("us-east").await.expect("router restarts");
    create(&d, "us-east", "acct-1", "us-east").await;
    let mut us = d.client("us-east").await;
    let write = |value: &str| put("acct-1", "k", value, "op-1");

    let first = us.put(write("v1")).await.expect("write").into_inner();
    let again = us.put(write("v1")).await.expect("retry").into_inner();
    assert!(!first.meta.expect("meta").replayed && again.meta.expect("meta").replayed);
    // A delete with a key writes its record in a nested transaction: also
    // under a lease.
    us.delete(pb::DeleteRequest {
        account: "acct-1".into(),
        key: "gone".into(),
        idempotency_key: "op-2".into(),
    })
    .await
    .expect("delete");

    let mut etcd = d.group_client("us-east").await;
    for record in ["/tern/a/acct-1/idem/op-1", "/tern/a/acct-1/idem/op-2"] {
        let kv = etcd.get(record, None).await.expect("read").kvs()[0].clone();
        assert_ne!(kv.lease(), 0, "{record} is attached to a lease");
        let ttl = etcd
            .lease_time_to_live(kv.lease(), None)
            .await
            .expect("lease TTL")
            .granted_ttl();
        // Retention 2 s plus a slice of 1 s (etcd may raise a TTL to its minimum).
        assert!(ttl >= 3, "granted TTL {ttl} s covers the retention");
    }

    tern_e2e::operator::eventually("etcd to delete the records", Duration::from_secs(30), || {
        let mut etcd = etcd.clone();
        async move {
            let left = etcd
                .get(
                    "/tern/a/acct-1/idem/",
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
                .ok()?
                .count();
            (left == 0).then_some(())
        }
    })
    .await;
    let after = us
        .put(write("v2"))
        .await
        .expect("write after the retention")
        .into_inner();
    assert!(
        !after.meta.expect("meta").replayed,
        "after the retention the key is new"
    );
    assert_eq!(
        account_keys(&d, "us-east").await["/tern/a/acct-1/d/k"],
        (b"v2".to_vec(), 2)
    );
}

/// What a client was told about one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Told {
    /// Acknowledged: applied exactly once.
    Applied,
    /// Refused for good (a compare failed) or refused as "retry"
    /// (UNAVAILABLE): not applied.
    NotApplied,
    /// Outcome unknown (UNKNOWN, DEADLINE_EXCEEDED): applied at most once.
    Unknown,
}

/// The outcome as tern-verify records it.
fn recorded(code: Code) -> tern_verify::Outcome {
    match code {
        Code::Ok => tern_verify::Outcome::Ok {
            value: None,
            swapped: Some(true),
            staleness_ms: None,
        },
        // The compare was evaluated and did not hold: nothing changed.
        Code::FailedPrecondition => tern_verify::Outcome::Ok {
            value: None,
            swapped: Some(false),
            staleness_ms: None,
        },
        Code::Unavailable => tern_verify::Outcome::Failed {
            reason: format!("{code:?}"),
        },
        _ => tern_verify::Outcome::Indeterminate {
            reason: format!("{code:?}"),
        },
    }
}

fn told(code: Code) -> Told {
    match code {
        Code::Ok => Told::Applied,
        Code::FailedPrecondition | Code::Unavailable => Told::NotApplied,
        Code::Unknown | Code::DeadlineExceeded | Code::Cancelled => Told::Unknown,
        other => panic!("unexpected answer {other:?} to a write"),
    }
}

/// Every value ever put under `prefix` in `region`'s group, in commit order.
async fn put_history(d: &LocalDeployment, region: &str, prefix: &str) -> Vec<(String, String)> {
    tern_e2e::etcd::put_history(&mut d.group_client(region).await, prefix).await
}

/// Writes without an idempotency key go through a cross-region link that
/// resets connections (toxiproxy `reset_peer`) and cuts them after a few
/// bytes of answers (`limit_data`), so links fail after the home router
/// committed. The origin router may retry only what it knows was never
/// sent: no write is applied twice, nothing told "retry" or "compare
/// failed" was applied, and every acknowledged write is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_fails_after_sending_never_applies_a_write_twice() {
    let d = start(1).await;
    create(&d, "us-east", "acct-r", "us-east").await;
    let link = d.links[&("eu-west".to_string(), "us-east".to_string())].clone();

    let started = Instant::now();
    let stop_at = started + Duration::from_secs(12);
    let us = move || started.elapsed().as_micros() as u64;
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut c = d.client("eu-west").await;
        writers.push(tokio::spawn(async move {
            let key = format!("k{w}");
            // The value this writer last saw acknowledged: what its
            // compare-and-set expects.
            let mut last: Option<String> = None;
            let mut log: Vec<(String, bool, Told)> = Vec::new();
            // The same operations as a history for tern-verify's checkers.
            let mut records: Vec<tern_verify::Record> = Vec::new();
            let mut i = 0;
            while Instant::now() < stop_at {
                let value = format!("w{w}-{i}");
                let is_txn = i % 2 == 1;
                let request = match (&last, is_txn) {
                    (Some(expect), true) => tern_verify::Request::Cas {
                        expect: Some(expect.clone()),
                        new: Some(value.clone()),
                    },
                    _ => tern_verify::Request::Put { value: value.clone() },
                };
                let invoke_us = us();
                let answer = if is_txn {
                    let compares = match &last {
                        Some(v) => vec![pb::Compare {
                            key: key.clone(),
                            target: pb::compare::Target::Value as i32,
                            op: pb::compare::Op::Equal as i32,
                            value: v.as_bytes().to_vec(),
                            number: 0,
                        }],
                        None => vec![],
                    };
                    let mut request = tonic::Request::new(pb::TxnRequest {
                        account: "acct-r".into(),
                        compares,
                        ops: vec![pb::Operation {
                            op: Some(pb::operation::Op::Put(pb::PutOp {
                                key: key.clone(),
                                value: value.as_bytes().to_vec(),
                            })),
                        }],
                        idempotency_key: String::new(),
                    });
                    request.set_timeout(Duration::from_secs(3));
                    c.txn(request).await.map(|_| ())
                } else {
                    let mut request = tonic::Request::new(put("acct-r", &key, &value, ""));
                    request.set_timeout(Duration::from_secs(3));
                    c.put(request).await.map(|_| ())
                };
                let code = answer.as_ref().err().map(|e| e.code()).unwrap_or(Code::Ok);
                let outcome = told(code);
                records.push(tern_verify::Record {
                    client: w,
                    key: key.clone(),
                    invoke_us,
                    complete_us: us(),
                    request,
                    outcome: recorded(code),
                    idempotency_key: None,
                });
                match outcome {
                    Told::Applied => last = Some(value.clone()),
                    // What the key holds now is unknown: ask before the next
                    // compare-and-set (a read is safe to retry).
                    Told::Unknown | Told::NotApplied => {
                        for _ in 0..50 {
                            let mut request = tonic::Request::new(pb::GetRequest {
                                account: "acct-r".into(),
                                key: key.clone(),
                                read: None,
                            });
                            request.set_timeout(Duration::from_secs(3));
                            let invoke_us = us();
                            if let Ok(r) = c.get(request).await {
                                let r = r.into_inner();
                                last = r.found.then(|| String::from_utf8_lossy(&r.value).into_owned());
                                records.push(tern_verify::Record {
                                    client: w,
                                    key: key.clone(),
                                    invoke_us,
                                    complete_us: us(),
                                    request: tern_verify::Request::Get,
                                    outcome: tern_verify::Outcome::Ok {
                                        value: last.clone(),
                                        swapped: None,
                                        staleness_ms: None,
                                    },
                                    idempotency_key: None,
                                });
                                break;
                            }
                        }
                    }
                }
                log.push((value, is_txn, outcome));
                i += 1;
            }
            (key, log, records)
        }));
    }

    // Re-arm the faults every 400 ms: a reset 100 ms into half of the
    // connections, and a cut after 2 KiB of answers on the others.
    let mut round = 0;
    while Instant::now() < stop_at {
        let (name, kind, attributes) = if round % 2 == 0 {
            ("reset", "reset_peer", serde_json::json!({"timeout": 100}))
        } else {
            ("limit", "limit_data", serde_json::json!({"bytes": 2048}))
        };
        d.toxiproxy
            .toxic(&link, name, kind, Stream::Downstream, 0.5, attributes)
            .await
            .expect("arm the fault");
        tokio::time::sleep(Duration::from_millis(400)).await;
        d.toxiproxy.remove_toxic(&link, name).await.expect("disarm");
        round += 1;
    }

    let mut logs = Vec::new();
    let mut recorded_history = tern_verify::History::default();
    for w in writers {
        let (key, log, records) = w.await.expect("writer");
        recorded_history.records.extend(records);
        logs.push((key, log));
    }
    let history = put_history(&d, "us-east", "/tern/a/acct-r/d/").await;
    // The checkers of tern-verify on the same run: linearizability per key
    // and what etcd applied against what clients were told.
    let mut applied = tern_verify::applied::Applied::new();
    for (k, v) in &history {
        let key = k.trim_start_matches("/tern/a/acct-r/d/").to_string();
        applied.entry(key).or_default().push(v.clone());
    }
    let report = tern_verify::linearizable::check(&recorded_history, Duration::from_secs(20));
    let mut verdicts = report.violations.clone();
    verdicts.extend(tern_verify::applied::check(&recorded_history, &applied));
    if !verdicts.is_empty() || !report.unknown.is_empty() {
        let path = std::env::temp_dir().join(format!("tern-reset-link-{}.jsonl", std::process::id()));
        recorded_history.save(&path).expect("save the history");
        panic!(
            "tern-verify: {verdicts:#?}; keys unknown: {:?}; history in {}",
            report.unknown,
            path.display()
        );
    }
    let keys = account_keys(&d, "us-east").await;
    let mut totals = BTreeMap::<Told, usize>::new();
    let mut failures = Vec::new();
    for (key, log) in &logs {
        let full = format!("/tern/a/acct-r/d/{key}");
        let applied = |value: &str| history.iter().filter(|(k, v)| *k == full && v == value).count();
        let (mut acked, mut unknown) = (0, 0);
        for (value, is_txn, outcome) in log {
            *totals.entry(*outcome).or_default() += 1;
            let n = applied(value);
            let op = if *is_txn { "txn" } else { "put" };
            match outcome {
                Told::Applied if n != 1 => failures.push(format!("{op} {value} acknowledged, applied {n} times")),
                Told::NotApplied if n != 0 => failures.push(format!(
                    "{op} {value} refused (compare failed or retry), applied {n} times"
                )),
                Told::Unknown if n > 1 => failures.push(format!("{op} {value} outcome unknown, applied {n} times")),
                _ => {}
            }
            match outcome {
                Told::Applied => acked += 1,
                Told::Unknown => unknown += 1,
                Told::NotApplied => {}
            }
        }
        let version = keys.get(&full).map(|(_, v)| *v).unwrap_or(0);
        if version < acked || version > acked + unknown {
            failures.push(format!(
                "{key}: etcd version {version}, but {acked} writes acknowledged and {unknown} unknown"
            ));
        }
    }
    eprintln!("outcomes: {totals:?}; {} puts in the history", history.len());
    assert!(
        failures.is_empty(),
        "{} violations:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        totals.get(&Told::Applied).copied().unwrap_or(0) > 20,
        "writes get through between faults: {totals:?}"
    );
    assert!(
        totals.get(&Told::Unknown).copied().unwrap_or(0) + totals.get(&Told::NotApplied).copied().unwrap_or(0) > 0,
        "the faults hit some writes: {totals:?}"
    );
}

fn txn_put(key: &str, value: Vec<u8>) -> pb::Operation {
    pb::Operation {
        op: Some(pb::operation::Op::Put(pb::PutOp { key: key.into(), value })),
    }
}

/// Requests that etcd would refuse whole are refused by the router first,
/// with INVALID_ARGUMENT naming the limit (not "may have been applied");
/// a replayed Txn says that its reads are not replayed; and a client cannot
/// pass its call off as forwarded by another router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_limits_replayed_reads_and_forged_forwarding_headers() {
    let d = start(1).await;
    create(&d, "us-east", "acct-1", "us-east").await;
    create(&d, "us-east", "acct-eu", "eu-west").await;
    let before = account_keys(&d, "us-east").await;

    // Two values of 1 MiB each: each within the value limit, together over
    // etcd's request limit. Local and forwarded alike.
    for via in ["us-east", "eu-west"] {
        let mut c = d.client(via).await;
        let err = c
            .txn(pb::TxnRequest {
                account: "acct-1".into(),
                compares: vec![],
                ops: vec![txn_put("a", vec![b'x'; 1 << 20]), txn_put("b", vec![b'y'; 1 << 20])],
                idempotency_key: String::new(),
            })
            .await
            .expect_err("over etcd's request limit");
        assert_eq!(err.code(), Code::InvalidArgument, "via {via}: {err}");
        assert!(
            err.message().contains("limit is") && err.message().contains("1.5 MiB"),
            "via {via}: {}",
            err.message()
        );
        let err = c
            .txn(pb::TxnRequest {
                account: "acct-1".into(),
                compares: vec![],
                ops: vec![txn_put("a", b"1".to_vec()), txn_put("a", b"2".to_vec())],
                idempotency_key: String::new(),
            })
            .await
            .expect_err("a key written twice");
        assert_eq!(err.code(), Code::InvalidArgument, "via {via}: {err}");
        assert!(
            err.message().contains("ops[1]") && err.message().contains("ops[0]"),
            "via {via}: {}",
            err.message()
        );
    }
    assert_eq!(before, account_keys(&d, "us-east").await, "nothing applied");

    // A keyed Txn with a read: the replay commits nothing and says it has
    // no reads to give back.
    let mut eu = d.client("eu-west").await;
    let request = pb::TxnRequest {
        account: "acct-1".into(),
        compares: vec![],
        ops: vec![
            txn_put("c", b"1".to_vec()),
            pb::Operation {
                op: Some(pb::operation::Op::Get(pb::GetOp { key: "c".into() })),
            },
        ],
        idempotency_key: "txn-1".into(),
    };
    let first = eu.txn(request.clone()).await.expect("first").into_inner();
    assert!(!first.reads_not_replayed && first.gets.len() == 1 && first.gets[0].found);
    let again = eu.txn(request).await.expect("replay").into_inner();
    assert!(again.meta.as_ref().expect("meta").replayed);
    assert!(again.reads_not_replayed && again.gets.is_empty(), "{again:?}");

    // A client sets the forwarding headers itself, without the peer token:
    // us-east ignores them, counts them, and routes the call as its own
    // client's (a trusted forwarded call for an account homed elsewhere
    // would have been answered "route again").
    let mut us = d.client("us-east").await;
    let mut request = tonic::Request::new(put("acct-eu", "k", "v", ""));
    request
        .metadata_mut()
        .insert("tern-forwarded", "1".parse().expect("ascii"));
    request
        .metadata_mut()
        .insert("tern-origin-region", "ap-south".parse().expect("ascii"));
    let resp = us.put(request).await.expect("served as a client call").into_inner();
    assert!(resp.meta.expect("meta").forwarded, "us-east forwarded it to eu-west");
    let router = d.region("us-east").router.as_ref().expect("router");
    assert_eq!(
        router.metric("tern_router_untrusted_forward_headers_total").await,
        Some(1.0)
    );
}
