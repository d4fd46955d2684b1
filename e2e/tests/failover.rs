//! Region failover (DESIGN.md "Failover") on a local deployment: real etcd
//! groups and directory, routers and agents as processes of this test,
//! toxiproxy between an agent and the directory.
//!
//! Fail closed first: a region cut off from the directory stops accepting
//! writes before its lease key can expire in the directory, so no successor
//! can ever take over accounts that the region still writes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_api::pb;
use tern_common::{RegionName, dir_lease_key};
use tern_local::toxiproxy::Stream;
use tern_local::{Layout, LocalDeployment};

/// Each test runs a deployment of its own; one at a time on two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The agents' lease TTL in these tests (tern-local's agents run with 2 s).
const TTL: Duration = Duration::from_secs(2);

async fn start() -> LocalDeployment {
    tern_e2e::init_logs();
    LocalDeployment::start(Layout {
        regions: vec![("us-east".into(), 1), ("eu-west".into(), 1)],
        directory_members: 1,
        rtt_ms: BTreeMap::from([(("us-east".into(), "eu-west".into()), 40)]),
        agents: true,
        otlp_endpoint: None,
        tls: false,
    })
    .await
    .expect("deployment starts")
}

async fn create(d: &LocalDeployment, account: &str, home: &str) {
    tern_e2e::create_account(d, home, account, home, &[])
        .await
        .expect("account created");
}

/// One write as the client saw it: when it was sent, when answered, and
/// whether it was acknowledged (else the status's code and whether it named
/// the region as not serving).
#[derive(Clone, Debug)]
struct Attempt {
    sent: Instant,
    answered: Instant,
    ok: bool,
    not_serving: Option<String>,
}

#[tokio::test]
async fn a_region_cut_off_from_the_directory_stops_writing_before_its_lease_can_expire() {
    let _serial = SERIAL.lock().await;
    let d = start().await;
    create(&d, "acct-cut", "us-east").await;
    let links = d.agent_directory_links["us-east"].clone();

    // A writer through us-east's router, back to back.
    let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let mut client = d.client("us-east").await;
        let (attempts, stop) = (attempts.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let sent = Instant::now();
                let r = client
                    .put(pb::PutRequest {
                        account: "acct-cut".into(),
                        key: "k".into(),
                        value: n.to_string().into_bytes(),
                        idempotency_key: String::new(),
                    })
                    .await;
                let answered = Instant::now();
                let not_serving = r.as_ref().err().and_then(|s| {
                    s.metadata()
                        .get("tern-region-not-serving")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                });
                attempts.lock().expect("attempts").push(Attempt {
                    sent,
                    answered,
                    ok: r.is_ok(),
                    not_serving,
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Cut the agent off from the directory: every byte either way is held.
    let cut = Instant::now();
    for link in &links {
        d.toxiproxy.blackhole(link, Stream::Upstream).await.expect("blackhole");
        d.toxiproxy
            .blackhole(link, Stream::Downstream)
            .await
            .expect("blackhole");
    }
    // Watch the lease key from outside: the last moment it was seen, and
    // the first moment it was gone.
    let mut dir = d.directory_client().await;
    let key = dir_lease_key(&RegionName::new("us-east").expect("valid"));
    let mut last_seen = cut;
    let gone = loop {
        let now = Instant::now();
        let found = dir.get(key.clone(), None).await.expect("directory answers");
        if found.kvs().is_empty() {
            break now;
        }
        last_seen = now;
        assert!(
            now < cut + 4 * TTL,
            "the lease key did not expire after the agent was cut off"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // A write that finds the lease unconfirmed waits a few seconds for it
    // (an agent taking over) before it is refused: wait for the refusals.
    let until = Instant::now() + Duration::from_secs(10);
    while !attempts
        .lock()
        .expect("attempts")
        .iter()
        .any(|a| a.not_serving.is_some())
    {
        assert!(Instant::now() < until, "no write was refused after the cut");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during: Vec<Attempt> = attempts.lock().expect("attempts").clone();

    // Every write acknowledged after the cut was *answered* while the key
    // was still there; writes sent after it were refused, naming the region.
    let acknowledged_after_cut: Vec<&Attempt> = during.iter().filter(|a| a.ok && a.sent >= cut).collect();
    let last_ack = acknowledged_after_cut.iter().map(|a| a.answered).max();
    if let Some(last) = last_ack {
        assert!(
            last < last_seen,
            "a write was acknowledged {:?} after the lease key was last seen",
            last - last_seen
        );
    }
    let refused: Vec<&Attempt> = during.iter().filter(|a| !a.ok && a.sent >= cut).collect();
    assert!(!refused.is_empty(), "no write was refused after the cut");
    assert!(
        refused.iter().all(|a| a.not_serving.as_deref() == Some("us-east")),
        "every refusal names the region as not serving: {refused:?}"
    );
    let first_refusal = refused.iter().map(|a| a.sent).min().expect("refusals");
    let stopped_before_expiry = last_seen.saturating_duration_since(first_refusal);
    eprintln!(
        "cut → first refusal {:?}; refusals began {:?} before the key was last seen ({:?} before it was seen gone)",
        first_refusal - cut,
        stopped_before_expiry,
        gone - first_refusal
    );
    assert!(
        first_refusal < last_seen,
        "writes were still accepted when the key expired"
    );

    // Heal: the agent claims the key again and writes resume.
    for link in &links {
        for stream in [Stream::Upstream, Stream::Downstream] {
            d.toxiproxy
                .remove_toxic(link, &format!("blackhole_{}", stream.as_str()))
                .await
                .expect("heal");
        }
    }
    let healed = Instant::now();
    loop {
        let after_heal = attempts
            .lock()
            .expect("attempts")
            .iter()
            .any(|a| a.ok && a.sent > healed);
        if after_heal {
            break;
        }
        assert!(
            healed.elapsed() < Duration::from_secs(20),
            "writes did not resume after the link healed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.expect("writer");
}

fn put(account: &str, key: &str, value: &str, idem: &str) -> pb::PutRequest {
    pb::PutRequest {
        account: account.into(),
        key: key.into(),
        value: value.as_bytes().to_vec(),
        idempotency_key: idem.into(),
    }
}

async fn get(d: &LocalDeployment, via: &str, account: &str, key: &str) -> Option<String> {
    let r = d
        .client(via)
        .await
        .get(pb::GetRequest {
            account: account.into(),
            key: key.into(),
            read: None,
        })
        .await
        .expect("strong read")
        .into_inner();
    r.found.then(|| String::from_utf8_lossy(&r.value).into_owned())
}

/// Waits until `region`'s mirror of `source` holds `value` at the account's
/// key `key`, and has measured its lag.
async fn mirrored(d: &LocalDeployment, region: &str, source: &str, account: &str, key: &str, value: &str) {
    let mut group = d.group_client(region).await;
    let mirrored_key = format!("/tern/r/{source}/tern/a/{account}/d/{key}");
    let agent = d.region(region).agent.as_ref().expect("agent");
    let lag = format!("tern_agent_mirror_lag_ms{{source=\"{source}\"}}");
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let found = group.get(mirrored_key.clone(), None).await.expect("group answers");
        let holds = found.kvs().first().is_some_and(|kv| kv.value() == value.as_bytes());
        if holds && agent.metric(&lag).await.is_some_and(|l| l < 1e12) {
            return;
        }
        assert!(Instant::now() < until, "{region}'s mirror of {source} never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes through `via` until one is acknowledged; returns when.
async fn first_acknowledged(d: &LocalDeployment, via: &str, request: pb::PutRequest, limit: Duration) -> Instant {
    let mut client = d.client(via).await;
    let until = Instant::now() + limit;
    loop {
        if client.put(request.clone()).await.is_ok() {
            return Instant::now();
        }
        assert!(
            Instant::now() < until,
            "no write through {via} was acknowledged within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `region`'s lease key is gone from the directory (its agent
/// killed, the key expires).
async fn lease_expired(d: &LocalDeployment, region: &str) {
    let mut dir = d.directory_client().await;
    let key = dir_lease_key(&RegionName::new(region).expect("valid"));
    let until = Instant::now() + 4 * TTL;
    while !dir.get(key.clone(), None).await.expect("directory").kvs().is_empty() {
        assert!(Instant::now() < until, "the lease key of {region} never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn region_record(d: &LocalDeployment, region: &str) -> tern_common::RegionRecord {
    let found = d
        .directory_client()
        .await
        .get(
            tern_common::dir_region_key(&RegionName::new(region).expect("valid")),
            None,
        )
        .await
        .expect("directory answers");
    serde_json::from_slice(found.kvs().first().expect("record").value()).expect("readable record")
}

#[tokio::test]
async fn a_lost_region_fails_over_automatically_and_its_successor_serves_its_accounts() {
    let _serial = SERIAL.lock().await;
    let mut d = start().await;
    d.restart_with_flags(
        "eu-west",
        &[],
        &[
            "--failover-mode=automatic".to_string(),
            "--failover-order=us-east=eu-west".to_string(),
        ],
    )
    .await
    .expect("eu-west restarts");
    let router = d.region("eu-west").router.as_ref().expect("router");
    router.wait_for_lease("eu-west").await.expect("eu-west serves");
    create(&d, "acct-lost", "us-east").await;
    let mut us = d.client("us-east").await;
    for i in 1..=20 {
        us.put(put("acct-lost", "k", &format!("v{i}"), &format!("w{i}")))
            .await
            .expect("written in us-east");
    }
    mirrored(&d, "eu-west", "us-east", "acct-lost", "k", "v20").await;

    // The whole region is lost at once.
    let killed = Instant::now();
    d.kill_region("us-east");
    let acknowledged = first_acknowledged(
        &d,
        "eu-west",
        put("acct-lost", "after", "served by eu-west", "after-1"),
        Duration::from_secs(30),
    )
    .await;
    eprintln!(
        "RTO (region killed → first write of one of its accounts acknowledged at the successor): {:?}",
        acknowledged - killed
    );

    // What us-east acknowledged and eu-west had mirrored is all there.
    assert_eq!(get(&d, "eu-west", "acct-lost", "k").await.as_deref(), Some("v20"));
    assert_eq!(
        get(&d, "eu-west", "acct-lost", "after").await.as_deref(),
        Some("served by eu-west")
    );
    // A keyed retry of a write acknowledged by us-east is a replay, not a
    // second write: its record was mirrored with it.
    let replay = d
        .client("eu-west")
        .await
        .put(put("acct-lost", "k", "v20", "w20"))
        .await
        .expect("replayed")
        .into_inner();
    assert!(
        replay.meta.as_ref().is_some_and(|m| m.replayed),
        "a retry of an acknowledged write is replayed: {replay:?}"
    );

    let record = region_record(&d, "us-east").await;
    assert_eq!(record.state, tern_common::RegionState::Failed);
    assert_eq!(record.successor.as_ref().map(|s| s.as_str()), Some("eu-west"));
    assert_eq!(record.region_epoch, 1);
    let marker = d
        .group_client("eu-west")
        .await
        .get("/tern/promoted/us-east", None)
        .await
        .expect("group answers");
    assert_eq!(marker.kvs().first().map(|kv| kv.value().to_vec()), Some(b"1".to_vec()));
    let agent = d.region("eu-west").agent.as_ref().expect("agent");
    assert_eq!(agent.metric("tern_agent_failovers_total").await, Some(1.0));

    // In the background, eu-west re-homes the account from its mirror area
    // into its own, at the next epoch; nothing is lost and retries still
    // replay.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let found = d
            .directory_client()
            .await
            .get("/tern/dir/accounts/acct-lost", None)
            .await
            .expect("directory answers");
        let p: tern_common::AccountRecord =
            serde_json::from_slice(found.kvs().first().expect("placement").value()).expect("readable");
        if p.home.as_str() == "eu-west" && p.state == tern_common::AccountState::Active {
            assert_eq!(p.epoch, tern_common::Epoch(2), "re-homed at the next epoch");
            break;
        }
        assert!(Instant::now() < until, "the account was never re-homed: {p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(&d, "eu-west", "acct-lost", "k").await.as_deref(), Some("v20"));
    assert_eq!(
        get(&d, "eu-west", "acct-lost", "after").await.as_deref(),
        Some("served by eu-west")
    );
    let replay = d
        .client("eu-west")
        .await
        .put(put("acct-lost", "k", "v20", "w20"))
        .await
        .expect("replayed")
        .into_inner();
    assert!(replay.meta.as_ref().is_some_and(|m| m.replayed), "{replay:?}");
    let fence = d
        .group_client("eu-west")
        .await
        .get("/tern/a/acct-lost/fence", None)
        .await
        .expect("group answers");
    assert_eq!(
        fence.kvs().first().map(|kv| kv.value().to_vec()),
        Some(b"2:active".to_vec())
    );
    let until = Instant::now() + Duration::from_secs(10);
    while region_record(&d, "us-east").await.drain.is_none_or(|p| p.homed != 0) {
        assert!(Instant::now() < until, "the re-homing's progress never reached 0");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Not before it is back and has reported what it lost.
    let directory = format!("--directory={}", d.directory.endpoints().join(","));
    let e = tern_cli::run_args(["tern", "rejoin", "us-east", directory.as_str()])
        .await
        .expect_err("not back yet")
        .to_string();
    assert!(e.contains("has not come back yet"), "{e}");

    // us-east comes back: its agent cannot claim the lease (the failover's
    // tombstone holds it), so its router never writes; what reaches it for
    // its former accounts goes to eu-west.
    d.region_mut("us-east").group.restart_all().expect("members restart");
    let agent = d.start_agent("us-east", &[]).await.expect("agent starts");
    d.region_mut("us-east").agent = Some(agent);
    d.start_router("us-east").await.expect("router starts");
    first_acknowledged(
        &d,
        "us-east",
        put("acct-lost", "back", "through us-east", "back-1"),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        get(&d, "eu-west", "acct-lost", "back").await.as_deref(),
        Some("through us-east")
    );
    tokio::time::sleep(TTL).await;
    let router = d.region("us-east").router.as_ref().expect("router");
    assert_eq!(
        router.metric("tern_router_region_lease_valid ").await,
        Some(0.0),
        "a failed-over region's router never holds a valid lease"
    );

    // Once its agent has retired its home area, it rejoins, empty: its
    // router writes again (a new account), eu-west mirrors it again, and
    // the account moves back with the migration protocol.
    let until = Instant::now() + Duration::from_secs(30);
    let rejoined = loop {
        match tern_cli::run_args(["tern", "rejoin", "us-east", directory.as_str()]).await {
            Ok(()) => break Instant::now(),
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("has not come back yet"), "{e}");
                assert!(Instant::now() < until, "us-east never became ready to rejoin: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let fence = d
        .group_client("us-east")
        .await
        .get("/tern/a/acct-lost/fence", None)
        .await
        .expect("group answers");
    assert_eq!(
        fence.kvs().first().map(|kv| kv.value().to_vec()),
        Some(b"1:moved:eu-west".to_vec()),
        "the returning region's fences say where its accounts went"
    );
    let router = d.region("us-east").router.as_ref().expect("router");
    router.wait_for_lease("us-east").await.expect("us-east serves again");
    eprintln!("rejoin → lease valid in us-east: {:?}", rejoined.elapsed());
    create(&d, "acct-new", "us-east").await;
    assert_eq!(
        region_record(&d, "us-east").await.state,
        tern_common::RegionState::Active
    );
    let agent = d.region("eu-west").agent.as_ref().expect("agent");
    let until = Instant::now() + Duration::from_secs(30);
    while agent
        .metric("tern_agent_mirror_lag_ms{source=\"us-east\"}")
        .await
        .is_none_or(|l| l >= 1e12)
        || region_record(&d, "eu-west")
            .await
            .mirrors
            .get("us-east")
            .map(|m| m.state)
            != Some(tern_common::MirrorState::Streaming)
    {
        assert!(Instant::now() < until, "eu-west never mirrored us-east again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let until = Instant::now() + Duration::from_secs(30);
    while region_record(&d, "us-east")
        .await
        .mirrors
        .get("eu-west")
        .map(|m| m.state)
        != Some(tern_common::MirrorState::Streaming)
    {
        assert!(Instant::now() < until, "us-east never mirrored eu-west again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tern_cli::run_args([
        "tern",
        "migrate",
        "acct-lost",
        "--to",
        "us-east",
        "--wait",
        directory.as_str(),
    ])
    .await
    .expect("moved back");
    assert_eq!(get(&d, "us-east", "acct-lost", "k").await.as_deref(), Some("v20"));
    assert_eq!(
        get(&d, "us-east", "acct-lost", "back").await.as_deref(),
        Some("through us-east")
    );
}

#[tokio::test]
async fn an_operator_fails_a_lost_region_over_and_is_refused_while_it_holds_its_lease() {
    let _serial = SERIAL.lock().await;
    let mut d = start().await;
    create(&d, "acct-manual", "us-east").await;
    d.client("us-east")
        .await
        .put(put("acct-manual", "k", "before", "m1"))
        .await
        .expect("written");
    mirrored(&d, "eu-west", "us-east", "acct-manual", "k", "before").await;
    let directory = format!("--directory={}", d.directory.endpoints().join(","));
    let failover = |extra: &[&str]| {
        let mut args = vec!["tern", "failover", "us-east", "--to", "eu-west", "--yes"];
        args.extend_from_slice(extra);
        args.push(directory.as_str());
        tern_cli::run_args(args.into_iter().map(str::to_string).collect::<Vec<_>>())
    };
    let e = failover(&[]).await.expect_err("us-east is alive").to_string();
    assert!(e.contains("still holds its lease"), "{e}");

    d.kill_region("us-east");
    // Manual mode: nobody acts until the operator does.
    lease_expired(&d, "us-east").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        region_record(&d, "us-east").await.state,
        tern_common::RegionState::Active,
        "manual mode: no failover without an operator"
    );
    failover(&[]).await.expect("failed over");
    let e = failover(&[]).await.expect_err("twice").to_string();
    assert!(e.contains("already failed over to eu-west"), "{e}");
    first_acknowledged(
        &d,
        "eu-west",
        put("acct-manual", "k2", "after", "m2"),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(get(&d, "eu-west", "acct-manual", "k").await.as_deref(), Some("before"));
}

#[tokio::test]
async fn writes_the_successor_never_had_are_quarantined_exactly_when_the_region_returns() {
    let _serial = SERIAL.lock().await;
    let mut d = start().await;
    create(&d, "acct-q", "us-east").await;
    let mut us = d.client("us-east").await;
    us.put(put("acct-q", "before", "mirrored", "q0"))
        .await
        .expect("written");
    mirrored(&d, "eu-west", "us-east", "acct-q", "before", "mirrored").await;

    // eu-west stops receiving us-east's writes; us-east goes on
    // acknowledging them, then is lost.
    d.set_mirror_link("eu-west", "us-east", false).await.expect("cut");
    let mut lost = Vec::new();
    for i in 1..=5 {
        let key = format!("q{i}");
        us.put(put("acct-q", &key, &format!("value {i}"), &format!("q{i}")))
            .await
            .expect("acknowledged by us-east");
        lost.push(key);
    }
    us.delete(pb::DeleteRequest {
        account: "acct-q".into(),
        key: "before".into(),
        idempotency_key: "q-del".into(),
    })
    .await
    .expect("acknowledged by us-east");
    d.kill_region("us-east");
    d.set_mirror_link("eu-west", "us-east", true).await.expect("heal");

    // The operator fails it over knowing what may be lost.
    let directory = format!("--directory={}", d.directory.endpoints().join(","));
    lease_expired(&d, "us-east").await;
    let mut dir = d.directory_client().await;
    tern_cli::run_args([
        "tern",
        "failover",
        "us-east",
        "--to",
        "eu-west",
        "--yes",
        "--force",
        directory.as_str(),
    ])
    .await
    .expect("failed over");
    first_acknowledged(
        &d,
        "eu-west",
        put("acct-q", "after", "x", "q-after"),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        get(&d, "eu-west", "acct-q", "before").await.as_deref(),
        Some("mirrored")
    );
    assert_eq!(get(&d, "eu-west", "acct-q", "q1").await, None, "never mirrored");

    // us-east returns: its agent quarantines exactly what eu-west lacks.
    d.region_mut("us-east").group.restart_all().expect("members restart");
    let agent = d.start_agent("us-east", &[]).await.expect("agent starts");
    d.region_mut("us-east").agent = Some(agent);
    let summary_key = tern_common::dir_quarantine_summary(&RegionName::new("us-east").expect("valid"), 1);
    let until = Instant::now() + Duration::from_secs(30);
    let summary: tern_common::QuarantineSummary = loop {
        let found = dir.get(summary_key.clone(), None).await.expect("directory");
        if let Some(kv) = found.kvs().first() {
            break serde_json::from_slice(kv.value()).expect("readable summary");
        }
        assert!(Instant::now() < until, "us-east's agent never wrote its quarantine");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (summary.writes, summary.accounts, summary.complete_history),
        (6, 1, true)
    );
    let found = dir
        .get(
            tern_common::dir_quarantine_prefix(&RegionName::new("us-east").expect("valid"), 1) + "w/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .expect("directory");
    let writes: Vec<tern_common::QuarantinedWrite> = found
        .kvs()
        .iter()
        .map(|kv| serde_json::from_slice(kv.value()).expect("readable write"))
        .collect();
    let puts: Vec<(String, Option<String>)> = writes
        .iter()
        .filter(|w| !w.deleted)
        .map(|w| (w.key.clone(), w.value.clone()))
        .collect();
    let expected: Vec<(String, Option<String>)> =
        (1..=5).map(|i| (format!("q{i}"), Some(format!("value {i}")))).collect();
    assert_eq!(
        puts, expected,
        "exactly the acknowledged writes eu-west never had, in order"
    );
    let deletes: Vec<&str> = writes.iter().filter(|w| w.deleted).map(|w| w.key.as_str()).collect();
    assert_eq!(deletes, ["before"]);
    assert!(
        writes
            .iter()
            .all(|w| w.account == "acct-q" && w.committed_after_ms.is_some())
    );
    // Nothing was applied: eu-west still has what it had.
    assert_eq!(get(&d, "eu-west", "acct-q", "q1").await, None);
    assert_eq!(
        get(&d, "eu-west", "acct-q", "before").await.as_deref(),
        Some("mirrored")
    );
    tern_cli::run_args(["tern", "quarantine", "list", "us-east", directory.as_str()])
        .await
        .expect("tern quarantine list");
}

#[tokio::test]
async fn the_geocluster_reports_a_failed_over_region_with_its_successor_an_event_and_a_column() {
    use kube::api::Api;
    use tern_common::{RegionLease, RegionRecord, RegionState, dir_region_key};
    use tern_local::etcd_cluster::{EtcdCluster, Tuning};
    let _serial = SERIAL.lock().await;
    tern_e2e::init_logs();
    let tmp = tempfile::tempdir().expect("temp dir");
    let directory = EtcdCluster::start(tmp.path(), "directory", 1, Tuning::default()).expect("directory");
    let mut dir = etcd_client::Client::connect(directory.endpoints(), None)
        .await
        .expect("directory client");
    let eu = RegionName::new("eu-west").expect("valid");
    let us = RegionName::new("us-east").expect("valid");
    let mut failed = RegionRecord::unwritten();
    failed.state = RegionState::Failed;
    failed.successor = Some(eu.clone());
    failed.region_epoch = 1;
    dir.put(dir_region_key(&us), failed.to_json(), None)
        .await
        .expect("record");
    dir.put(dir_lease_key(&us), RegionLease::failed_over(&eu, 1).to_json(), None)
        .await
        .expect("tombstone");
    dir.put(dir_region_key(&eu), RegionRecord::unwritten().to_json(), None)
        .await
        .expect("record");
    let holder = RegionLease {
        agent: "eu-west-agent-0".into(),
        leadership: 7,
        failed_over_to: None,
    };
    dir.put(dir_lease_key(&eu), holder.to_json(), None)
        .await
        .expect("lease");

    let cp = tern_e2e::controlplane::ControlPlane::start("regions")
        .await
        .expect("control plane starts");
    cp.install_crds().expect("CRDs install");
    cp.kubectl(&["apply", "-f", "examples/geocluster.yaml"])
        .expect("GeoCluster applied");
    let endpoints = format!("--directory-endpoints={}", directory.endpoints().join(","));
    let _operator = tern_e2e::operator::OperatorGuard::start(&cp, &[endpoints.as_str()])
        .await
        .expect("operator starts");
    let api: Api<tern_crds::GeoCluster> = Api::namespaced(cp.client().await.expect("client"), "default");
    let status = tern_e2e::operator::eventually("the failover in the status", Duration::from_secs(60), || async {
        let status = api.get("payments").await.ok()?.status?;
        let us = status.regions.iter().find(|r| r.name == "us-east")?;
        (us.serving.as_deref() == Some("Failed")).then_some(status)
    })
    .await;
    let us_status = status.regions.iter().find(|r| r.name == "us-east").expect("us-east");
    assert_eq!(
        (
            us_status.successor.as_deref(),
            us_status.region_epoch,
            us_status.lease_holder.as_deref()
        ),
        (Some("eu-west"), Some(1), None)
    );
    let eu_status = status.regions.iter().find(|r| r.name == "eu-west").expect("eu-west");
    assert_eq!(
        (eu_status.serving.as_deref(), eu_status.lease_holder.as_deref()),
        (Some("Active"), Some("eu-west-agent-0"))
    );
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "RegionsServing")
        .expect("the condition");
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "RegionFailedOver")
    );
    assert!(
        condition.message.contains("us-east failed over to eu-west"),
        "{}",
        condition.message
    );
    // The group reconciler's own conditions are still there.
    assert!(
        status.conditions.iter().any(|c| c.type_ == "Ready"),
        "{:?}",
        status.conditions
    );
    let table = cp.kubectl(&["get", "geocluster", "payments"]).expect("kubectl get");
    assert!(table.contains("FAILED") && table.contains("us-east"), "{table}");
    let events = tern_e2e::operator::eventually("the event", Duration::from_secs(30), || async {
        let events = cp
            .kubectl(&[
                "get",
                "events.events.k8s.io",
                "-n",
                "default",
                "-o",
                "custom-columns=REASON:.reason,NOTE:.note",
            ])
            .ok()?;
        events.contains("RegionFailedOver").then_some(events)
    })
    .await;
    assert!(events.contains("failed over to eu-west at region epoch 1"), "{events}");
}

/// Leaves a move of `account` from eu-west into us-east as us-east's agent
/// would if it died after fencing eu-west: the intent in `fencing`, the
/// placement `migrating`, eu-west's fence `1:fenced`.
async fn move_into_us_east_in_flight(d: &LocalDeployment, account: &str, id: &str) {
    use tern_common::{AccountId, AccountRecord, AccountState, Epoch, MigrationPhase, MigrationRecord};
    let mut dir = d.directory_client().await;
    let a = AccountId::new(account).expect("valid");
    let us = RegionName::new("us-east").expect("valid");
    let eu = RegionName::new("eu-west").expect("valid");
    let placement = AccountRecord {
        home: eu.clone(),
        epoch: Epoch(1),
        state: AccountState::Migrating { target: us.clone() },
        allowed_regions: vec![],
        moved_ms: None,
        pinned: false,
    };
    let mut intent = MigrationRecord::requested(a.clone(), us, Some(eu.clone()), "test".into(), tern_common::unix_ms());
    intent.phase = MigrationPhase::Fencing;
    intent.source = Some(eu);
    intent.source_epoch = Some(Epoch(1));
    intent.placement = Some(placement.clone());
    dir.put(tern_common::dir_account_key(&a), placement.to_json(), None)
        .await
        .expect("placement");
    dir.put(
        format!("/tern/dir/migrations/{id}"),
        serde_json::to_string(&intent).expect("json"),
        None,
    )
    .await
    .expect("intent");
    d.group_client("eu-west")
        .await
        .put(tern_common::fence_key(&a), "1:fenced", None)
        .await
        .expect("fence");
}

async fn migration_phase(d: &LocalDeployment, id: &str) -> String {
    let found = d
        .directory_client()
        .await
        .get(format!("/tern/dir/migrations/{id}"), None)
        .await
        .expect("directory answers");
    let v: serde_json::Value = serde_json::from_slice(found.kvs().first().expect("intent").value()).expect("json");
    v["phase"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn moves_into_a_lost_region_are_settled_by_its_successor_by_what_its_mirror_holds() {
    let _serial = SERIAL.lock().await;
    let mut d = start().await;
    d.restart_with_flags(
        "eu-west",
        &[],
        &[
            "--failover-mode=automatic".to_string(),
            "--failover-order=us-east=eu-west".to_string(),
        ],
    )
    .await
    .expect("eu-west restarts");
    d.region("eu-west")
        .router
        .as_ref()
        .expect("router")
        .wait_for_lease("eu-west")
        .await
        .expect("eu-west serves");
    create(&d, "acct-back", "eu-west").await;
    create(&d, "acct-fwd", "eu-west").await;
    let mut eu = d.client("eu-west").await;
    for account in ["acct-back", "acct-fwd"] {
        eu.put(put(account, "k", "before", &format!("{account}-1")))
            .await
            .expect("written");
    }
    // us-east had landed its copy of acct-fwd (fence 2:active and a write
    // made there after it), and eu-west's mirror has it; acct-back's copy
    // never reached the mirror.
    let mut us_group = d.group_client("us-east").await;
    us_group
        .txn(etcd_client::Txn::new().and_then([
            etcd_client::TxnOp::put("/tern/a/acct-fwd/d/k", "written in us-east", None),
            etcd_client::TxnOp::put("/tern/a/acct-fwd/fence", "2:active", None),
        ]))
        .await
        .expect("landing");
    mirrored(&d, "eu-west", "us-east", "acct-fwd", "k", "written in us-east").await;
    d.kill_region("us-east");
    move_into_us_east_in_flight(&d, "acct-back", "in-back").await;
    move_into_us_east_in_flight(&d, "acct-fwd", "in-fwd").await;

    // eu-west fails us-east over, then settles both moves.
    let until = Instant::now() + Duration::from_secs(30);
    while migration_phase(&d, "in-back").await != "rolled_back" || migration_phase(&d, "in-fwd").await != "completed" {
        assert!(
            Instant::now() < until,
            "the moves into the lost region were never settled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Rolled back: acct-back is writable in eu-west again, unfenced.
    first_acknowledged(
        &d,
        "eu-west",
        put("acct-back", "k", "after", "back-2"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(get(&d, "eu-west", "acct-back", "k").await.as_deref(), Some("after"));
    // Finished: acct-fwd is served by eu-west with what us-east wrote
    // after the landing, and eu-west's old copy is marked moved.
    assert_eq!(
        get(&d, "eu-west", "acct-fwd", "k").await.as_deref(),
        Some("written in us-east")
    );
    let fence = d
        .group_client("eu-west")
        .await
        .get("/tern/a/acct-fwd/fence", None)
        .await
        .expect("group answers");
    let fence = fence
        .kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
    // Re-homed into eu-west at epoch 3 by now, or still marked moved.
    assert!(
        matches!(fence.as_deref(), Some("1:moved:us-east") | Some("3:active")),
        "{fence:?}"
    );
    first_acknowledged(
        &d,
        "eu-west",
        put("acct-fwd", "k2", "after", "fwd-2"),
        Duration::from_secs(10),
    )
    .await;
}

#[tokio::test]
async fn an_account_the_successor_never_saw_is_rehomed_empty() {
    let _serial = SERIAL.lock().await;
    let mut d = start().await;
    create(&d, "acct-seen", "us-east").await;
    let mut us = d.client("us-east").await;
    us.put(put("acct-seen", "k", "mirrored", "s1")).await.expect("written");
    mirrored(&d, "eu-west", "us-east", "acct-seen", "k", "mirrored").await;
    // An account created (and written) in us-east that eu-west's mirror
    // never hears of.
    d.set_mirror_link("eu-west", "us-east", false).await.expect("cut");
    create(&d, "acct-late", "us-east").await;
    us.put(put("acct-late", "k", "lost", "l1")).await.expect("written");
    d.kill_region("us-east");
    d.set_mirror_link("eu-west", "us-east", true).await.expect("heal");
    lease_expired(&d, "us-east").await;
    let directory = format!("--directory={}", d.directory.endpoints().join(","));
    tern_cli::run_args([
        "tern",
        "failover",
        "us-east",
        "--to",
        "eu-west",
        "--yes",
        "--force",
        directory.as_str(),
    ])
    .await
    .expect("failed over");
    // Both accounts are re-homed into eu-west: the one it never saw empty,
    // so that it takes writes again (what it had is for the quarantine).
    let mut dir = d.directory_client().await;
    let until = Instant::now() + Duration::from_secs(30);
    for account in ["acct-seen", "acct-late"] {
        loop {
            let found = dir
                .get(format!("/tern/dir/accounts/{account}"), None)
                .await
                .expect("directory answers");
            let p: tern_common::AccountRecord =
                serde_json::from_slice(found.kvs().first().expect("placement").value()).expect("readable");
            if p.home.as_str() == "eu-west" && p.state == tern_common::AccountState::Active {
                assert_eq!(p.epoch, tern_common::Epoch(2), "{account}");
                break;
            }
            assert!(Instant::now() < until, "{account} was never re-homed: {p:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(get(&d, "eu-west", "acct-seen", "k").await.as_deref(), Some("mirrored"));
    assert_eq!(get(&d, "eu-west", "acct-late", "k").await, None);
    first_acknowledged(
        &d,
        "eu-west",
        put("acct-late", "k", "again", "l2"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(get(&d, "eu-west", "acct-late", "k").await.as_deref(), Some("again"));
}
