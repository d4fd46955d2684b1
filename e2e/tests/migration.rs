//! Moving accounts between regions (DESIGN.md "Migration protocol") on a
//! local two-region deployment: real etcd groups, routers, agents, toxiproxy
//! links. Writers keep writing through both regions' routers while the
//! account moves; every acknowledged write must be in the target afterwards,
//! the writers see latency and no errors, one fence is active, and a crash
//! of the agent at any step converges.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use tern_api::{RouterClient, pb};
use tern_common::{AccountId, MigrationId, MigrationPhase, MigrationRecord, RegionName};
use tern_local::{Layout, LocalDeployment, migrations};

/// One-way delay between the regions, ms.
const D: u64 = 40;

/// Each test runs a deployment of its own; one at a time on two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start() -> LocalDeployment {
    tern_e2e::init_logs();
    LocalDeployment::start(Layout {
        regions: vec![("us-east".into(), 1), ("eu-west".into(), 1)],
        directory_members: 1,
        rtt_ms: BTreeMap::from([(("us-east".into(), "eu-west".into()), 2 * D)]),
        agents: true,
        otlp_endpoint: None,
        tls: false,
    })
    .await
    .expect("deployment starts")
}

fn id(s: &str) -> MigrationId {
    MigrationId::new(s).expect("valid id")
}

fn region(s: &str) -> RegionName {
    RegionName::new(s).expect("valid region")
}

async fn create(d: &LocalDeployment, account: &str, home: &str) {
    tern_e2e::create_account(d, home, account, home, &[])
        .await
        .expect("account created");
}

fn put(account: &str, key: &str, value: &str, idem: &str) -> pb::PutRequest {
    pb::PutRequest {
        account: account.into(),
        key: key.into(),
        value: value.as_bytes().to_vec(),
        idempotency_key: idem.into(),
    }
}

/// Waits until `region`'s agent measures the lag of its mirror of `source`
/// (a move refuses to start before).
async fn mirror_measured(d: &LocalDeployment, region: &str, source: &str) {
    let agent = d.region(region).agent.as_ref().expect("agent");
    let metric = format!("tern_agent_mirror_lag_ms{{source=\"{source}\"}}");
    let until = Instant::now() + Duration::from_secs(30);
    while !agent.metric(&metric).await.is_some_and(|l| l < 1e12) {
        assert!(
            Instant::now() < until,
            "{region}'s mirror of {source} never measured its lag"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writers through both regions' routers, each writing its own keys in
/// sequence, until stopped. Returns the keys acknowledged and the errors.
struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(Vec<String>, Vec<String>)>>,
}

impl Writers {
    async fn start(d: &LocalDeployment, account: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for via in ["us-east", "eu-west"] {
            let mut client = d.client(via).await;
            let (stop, account) = (stop.clone(), account.to_string());
            tasks.push(tokio::spawn(async move {
                let (mut acked, mut errors) = (Vec::new(), Vec::new());
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("{via}-{n}");
                    match client.put(put(&account, &key, &n.to_string(), "")).await {
                        Ok(_) => acked.push(key),
                        Err(e) => errors.push(format!("{key}: {e}")),
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (acked, errors)
            }));
        }
        Self { stop, tasks }
    }

    async fn stop(self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut acked, mut errors) = (Vec::new(), Vec::new());
        for t in self.tasks {
            let (a, e) = t.await.expect("writer");
            acked.extend(a);
            errors.extend(e);
        }
        (acked, errors)
    }
}

/// The account's fence in `region`'s group, if any.
async fn fence(d: &LocalDeployment, region: &str, account: &str) -> Option<String> {
    let mut c = d.group_client(region).await;
    let r = c
        .get(format!("/tern/a/{account}/fence"), None)
        .await
        .expect("read fence");
    r.kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

async fn placement(dir: &Client, account: &str) -> serde_json::Value {
    let r = dir
        .clone()
        .get(format!("/tern/dir/accounts/{account}"), None)
        .await
        .expect("read placement");
    serde_json::from_slice(r.kvs()[0].value()).expect("placement json")
}

/// Every acknowledged key reads back, STRONG, through `via`.
async fn all_readable(d: &LocalDeployment, via: &str, account: &str, keys: &[String]) {
    let mut c = d.client(via).await;
    let mut missing = Vec::new();
    for key in keys {
        let r = c
            .get(pb::GetRequest {
                account: account.into(),
                key: key.clone(),
                read: None,
            })
            .await
            .expect("strong read")
            .into_inner();
        if !r.found {
            missing.push(key.clone());
        }
    }
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
}

async fn migrate(dir: &Client, mid: &str, account: &str, to: &str, from: Option<&str>) -> MigrationRecord {
    let account = AccountId::new(account).expect("valid account");
    assert!(
        migrations::request(dir, &id(mid), &account, &region(to), from.map(region), "test")
            .await
            .expect("intent written")
    );
    migrations::wait(
        dir,
        &id(mid),
        Duration::from_secs(60),
        |r| tracing::info!(phase = ?r.phase, message = ?r.message, "migration {mid}"),
    )
    .await
    .expect("migration finishes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_moves_under_writes_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let d = start().await;
    let dir = d.directory_client().await;
    create(&d, "acct-m", "us-east").await;
    let mut us = d.client("us-east").await;
    let first = us
        .put(put("acct-m", "paid", "1", "pay-1"))
        .await
        .expect("keyed put")
        .into_inner();
    assert!(!first.meta.expect("meta").replayed);
    mirror_measured(&d, "eu-west", "us-east").await;

    let writers = Writers::start(&d, "acct-m").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let done = migrate(&dir, "m-1", "acct-m", "eu-west", Some("us-east")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (acked, errors) = writers.stop().await;

    assert_eq!(done.phase, MigrationPhase::Completed, "{:?}", done.message);
    let unavailable = done.unavailable_ms.expect("unavailability measured");
    eprintln!(
        "moved under {} acknowledged writes; writes waited at most {unavailable} ms (RTT {} ms)",
        acked.len(),
        2 * D
    );
    assert!(errors.is_empty(), "writers saw errors, not latency: {errors:?}");
    let p = placement(&dir, "acct-m").await;
    assert_eq!(
        (p["home"].as_str(), p["epoch"].as_u64()),
        (Some("eu-west"), Some(2)),
        "{p}"
    );
    assert_eq!(p["state"]["kind"], "active");
    // One active fence: the target's; the source says where the account went.
    assert_eq!(fence(&d, "eu-west", "acct-m").await.as_deref(), Some("2:active"));
    assert_eq!(fence(&d, "us-east", "acct-m").await.as_deref(), Some("1:moved:eu-west"));
    all_readable(&d, "eu-west", "acct-m", &acked).await;
    all_readable(&d, "us-east", "acct-m", &acked).await;

    // The idempotency record moved with its retention: a retry across the
    // move is answered from it, not applied again.
    let retry = us
        .put(put("acct-m", "paid", "1", "pay-1"))
        .await
        .expect("retry")
        .into_inner()
        .meta
        .expect("meta");
    assert!(retry.replayed, "a retry across the move was applied again");
    assert_eq!(retry.home_region, "eu-west");
    let mut eu = d.group_client("eu-west").await;
    let record = eu.get("/tern/a/acct-m/idem/pay-1", None).await.expect("record");
    let lease = record.kvs()[0].lease();
    assert_ne!(lease, 0, "the copied record has no lease: it would live for ever");
    let ttl = eu.lease_time_to_live(lease, None).await.expect("ttl").ttl();
    assert!(
        (23 * 3600..=24 * 3600 + 120).contains(&ttl),
        "the copied record keeps what is left of 24 h, not {ttl} s"
    );

    // A second move with a stale expectation is refused and changes nothing.
    let refused = migrate(&dir, "m-2", "acct-m", "us-east", Some("ap-south")).await;
    assert_eq!(refused.phase, MigrationPhase::Refused);
    assert!(
        refused.message.as_deref().unwrap_or("").contains("not in ap-south"),
        "{:?}",
        refused.message
    );
    // Moving back works, at epoch 3.
    let back = migrate(&dir, "m-3", "acct-m", "us-east", Some("eu-west")).await;
    assert_eq!(back.phase, MigrationPhase::Completed, "{:?}", back.message);
    assert_eq!(fence(&d, "us-east", "acct-m").await.as_deref(), Some("3:active"));
    all_readable(&d, "us-east", "acct-m", &acked).await;
}

/// The source's fence is not what the directory says (changed behind the
/// protocol's back): the move is rolled back, the directory names the
/// source again and nothing stays in the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_that_finds_an_unexpected_fence_is_rolled_back() {
    let _serial = SERIAL.lock().await;
    let d = start().await;
    let dir = d.directory_client().await;
    create(&d, "acct-r", "us-east").await;
    mirror_measured(&d, "eu-west", "us-east").await;
    let mut us = d.group_client("us-east").await;
    us.put("/tern/a/acct-r/fence", "7:active", None)
        .await
        .expect("fence changed");
    let done = migrate(&dir, "r-1", "acct-r", "eu-west", None).await;
    assert_eq!(done.phase, MigrationPhase::RolledBack, "{:?}", done.message);
    assert!(
        done.message
            .as_deref()
            .unwrap_or("")
            .contains("is 7:active, not 1:active"),
        "{:?}",
        done.message
    );
    let p = placement(&dir, "acct-r").await;
    assert_eq!(
        (p["home"].as_str(), p["epoch"].as_u64()),
        (Some("us-east"), Some(1)),
        "{p}"
    );
    assert_eq!(p["state"]["kind"], "active");
    assert_eq!(
        fence(&d, "us-east", "acct-r").await.as_deref(),
        Some("7:active"),
        "left as found"
    );
    assert_eq!(
        fence(&d, "eu-west", "acct-r").await,
        None,
        "nothing stays in the target"
    );
}

/// The agent stops leading (as a crash would) at each named step once; the
/// next leadership must finish the move, with one active fence and every
/// acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_every_step_of_a_move_converges() {
    let _serial = SERIAL.lock().await;
    let mut d = start().await;
    let dir = d.directory_client().await;
    let steps = [
        "migrate.after-directory",
        "migrate.after-fence",
        "migrate.after-catch-up",
        "migrate.mid-copy",
        "migrate.after-copy",
        "migrate.after-switch",
        "migrate.after-moved",
    ];
    for (n, step) in steps.iter().enumerate() {
        let account = format!("acct-c{n}");
        create(&d, &account, "us-east").await;
        if *step == "migrate.mid-copy" {
            // More keys than one copy transaction holds.
            let mut us = d.group_client("us-east").await;
            for chunk in 0..3 {
                let ops: Vec<etcd_client::TxnOp> = (0..600)
                    .map(|i| etcd_client::TxnOp::put(format!("/tern/a/{account}/d/bulk-{chunk}-{i}"), "x", None))
                    .collect();
                us.txn(etcd_client::Txn::new().and_then(ops)).await.expect("bulk keys");
            }
        }
        let agent = d.region_mut("eu-west").agent.take().expect("agent");
        agent.stop().await;
        let agent = d
            .start_agent("eu-west", &[format!("--failpoint={step}")])
            .await
            .expect("agent restarts with a failpoint");
        d.region_mut("eu-west").agent = Some(agent);
        mirror_measured(&d, "eu-west", "us-east").await;
        let writers = Writers::start(&d, &account).await;
        let done = migrate(&dir, &format!("c-{n}"), &account, "eu-west", None).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (acked, errors) = writers.stop().await;
        assert_eq!(done.phase, MigrationPhase::Completed, "{step}: {:?}", done.message);
        assert!(errors.is_empty(), "{step}: writers saw errors: {errors:?}");
        assert_eq!(
            fence(&d, "eu-west", &account).await.as_deref(),
            Some("2:active"),
            "{step}"
        );
        assert_eq!(
            fence(&d, "us-east", &account).await.as_deref(),
            Some("1:moved:eu-west"),
            "{step}"
        );
        all_readable(&d, "eu-west", &account, &acked).await;
        if *step == "migrate.mid-copy" {
            let mut eu = d.group_client("eu-west").await;
            let bulk = eu
                .get(
                    format!("/tern/a/{account}/d/bulk-"),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
                .expect("count");
            assert_eq!(bulk.count(), 1800, "{step}: the copy is not whole");
        }
        eprintln!(
            "{step}: converged, {} acknowledged writes, unavailable {:?} ms",
            acked.len(),
            done.unavailable_ms
        );
    }
}

/// Routers that publish their write counts every 300 ms and agents whose
/// follow-the-sun policy looks every 300 ms (`extra` added to the agents).
async fn sunny(d: &mut LocalDeployment, agent_extra: &[&str]) {
    for region in ["us-east", "eu-west"] {
        if let Some(r) = d.region_mut(region).router.take() {
            r.stop().await;
        }
        d.start_router_with(region, &["--write-count-publish-interval=300ms".into()])
            .await
            .expect("router restarts");
        let agent = d.region_mut(region).agent.take().expect("agent");
        agent.stop().await;
        let mut extra = vec!["--follow-the-sun".to_string(), "--follow-the-sun-interval=300ms".into()];
        extra.extend(agent_extra.iter().map(|s| s.to_string()));
        let agent = d.start_agent(region, &extra).await.expect("agent restarts");
        d.region_mut(region).agent = Some(agent);
    }
    mirror_measured(d, "eu-west", "us-east").await;
    mirror_measured(d, "us-east", "eu-west").await;
}

/// Every intent about `account`, oldest first.
async fn intents_of(dir: &Client, account: &str) -> Vec<MigrationRecord> {
    let r = dir
        .clone()
        .get("/tern/dir/migrations/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("intents");
    let mut all: Vec<MigrationRecord> = r
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice::<MigrationRecord>(kv.value()).ok())
        .filter(|m| m.account.as_str() == account)
        .collect();
    all.sort_by_key(|m| m.requested_ms);
    all
}

async fn writes(d: &LocalDeployment, via: &str, account: &str, n: usize) {
    let mut c = d.client(via).await;
    for i in 0..n {
        c.put(put(account, &format!("{via}-{i}"), "v", ""))
            .await
            .expect("write");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_follow_their_writers_with_reasons_and_do_not_ping_pong() {
    let _serial = SERIAL.lock().await;
    let mut d = start().await;
    let dir = d.directory_client().await;
    sunny(&mut d, &["--follow-the-sun-cooldown=1h"]).await;
    create(&d, "acct-sun", "us-east").await;
    create(&d, "acct-even", "us-east").await;
    tern_e2e::create_account(&d, "us-east", "acct-stay", "us-east", &["us-east"])
        .await
        .expect("account created");
    create(&d, "acct-pinned", "us-east").await;
    let directory = d.directory.endpoints().join(",");
    tern_cli::run_args(["tern", "pin", "acct-pinned", "--directory", directory.as_str()])
        .await
        .expect("tern pin");
    assert_eq!(placement(&dir, "acct-pinned").await["pinned"], true);
    let missing = tern_cli::run_args(["tern", "pin", "acct-none", "--directory", directory.as_str()])
        .await
        .expect_err("no such account");
    assert!(missing.to_string().contains("does not exist"), "{missing}");

    // acct-sun: written only from eu-west. acct-even: from both regions
    // alike. acct-stay: from eu-west, but may live only in us-east.
    // acct-pinned: from eu-west, but pinned.
    writes(&d, "eu-west", "acct-sun", 4).await;
    writes(&d, "eu-west", "acct-stay", 4).await;
    writes(&d, "eu-west", "acct-pinned", 4).await;
    for _ in 0..4 {
        writes(&d, "us-east", "acct-even", 1).await;
        writes(&d, "eu-west", "acct-even", 1).await;
    }
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let p = placement(&dir, "acct-sun").await;
        if p["home"] == "eu-west" {
            break;
        }
        assert!(Instant::now() < until, "acct-sun never followed its writes: {p}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let moved = intents_of(&dir, "acct-sun").await;
    assert_eq!(moved.len(), 1, "{moved:?}");
    // The policy may act once the threshold (3) is published, before the
    // fourth write is.
    assert!(
        [3, 4].iter().any(|n| moved[0].reason
            == format!("acct-sun: {n} writes from eu-west in 24h, 0 from home us-east → moving to eu-west")),
        "{}",
        moved[0].reason
    );
    // Now written only from us-east: the cooldown holds it in eu-west.
    writes(&d, "us-east", "acct-sun", 6).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        placement(&dir, "acct-sun").await["home"],
        "eu-west",
        "moved back within the cooldown"
    );
    assert_eq!(intents_of(&dir, "acct-sun").await.len(), 1);
    // Even traffic and residency: nothing moves.
    assert_eq!(placement(&dir, "acct-even").await["home"], "us-east");
    assert!(intents_of(&dir, "acct-even").await.is_empty());
    assert_eq!(placement(&dir, "acct-stay").await["home"], "us-east");
    assert!(intents_of(&dir, "acct-stay").await.is_empty());
    assert_eq!(placement(&dir, "acct-pinned").await["home"], "us-east");
    assert!(intents_of(&dir, "acct-pinned").await.is_empty());
    let skipped = |region: &'static str| {
        let d = &d;
        async move {
            d.region(region)
                .agent
                .as_ref()
                .expect("agent")
                .metric("tern_agent_follow_the_sun_decisions_total{outcome=\"skipped\"}")
                .await
                .unwrap_or(0.0)
        }
    };
    // us-east explained acct-even, acct-stay and acct-pinned; eu-west the
    // cooldown.
    assert!(skipped("us-east").await >= 3.0, "skips not explained");
    assert!(skipped("eu-west").await >= 1.0, "the cooldown not explained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_moves_nothing_and_says_what_it_would_do() {
    let _serial = SERIAL.lock().await;
    let mut d = start().await;
    let dir = d.directory_client().await;
    sunny(&mut d, &["--follow-the-sun-dry-run"]).await;
    create(&d, "acct-dry", "us-east").await;
    writes(&d, "eu-west", "acct-dry", 5).await;
    let agent = d.region("us-east").agent.as_ref().expect("agent");
    let until = Instant::now() + Duration::from_secs(20);
    while agent
        .metric("tern_agent_follow_the_sun_decisions_total{outcome=\"would_move\"}")
        .await
        .unwrap_or(0.0)
        < 1.0
    {
        assert!(Instant::now() < until, "the dry run never said what it would do");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(placement(&dir, "acct-dry").await["home"], "us-east");
    assert!(intents_of(&dir, "acct-dry").await.is_empty());
}

/// An AccountMigration applied with kubectl is carried out once, through
/// the directory, by the target region's agent; its status fills in (the
/// printer columns From and Phase), and a second object asking for the
/// same move with a stale expectation fails with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_migration_object_is_carried_out_once_and_reports_its_progress() {
    use kube::api::{Api, PostParams};
    use tern_crds::{AccountMigration, AccountMigrationSpec, MigrationPhase as Phase};
    let _serial = SERIAL.lock().await;
    let d = start().await;
    let dir = d.directory_client().await;
    create(&d, "acct-k8s", "us-east").await;
    mirror_measured(&d, "eu-west", "us-east").await;
    let cp = tern_e2e::controlplane::ControlPlane::start("migrations")
        .await
        .expect("control plane starts");
    cp.install_crds().expect("CRDs install");
    let endpoints = format!("--directory-endpoints={}", d.directory.endpoints().join(","));
    let operator = tern_e2e::operator::OperatorGuard::start(&cp, &[endpoints.as_str()])
        .await
        .expect("operator starts");
    let client = cp.client().await.expect("client");
    let api: Api<AccountMigration> = Api::namespaced(client, "default");
    let object = |name: &str, expect: &str| {
        AccountMigration::new(
            name,
            AccountMigrationSpec {
                geo_cluster: "payments".into(),
                account: "acct-k8s".into(),
                target_region: "eu-west".into(),
                expected_source_region: Some(expect.into()),
                reason: Some("ticket-42".into()),
                records_intent: None,
            },
        )
    };
    api.create(&PostParams::default(), &object("move-1", "us-east"))
        .await
        .expect("created");
    let done = tern_e2e::operator::eventually("the migration completes", Duration::from_secs(60), || async {
        let m = api.get("move-1").await.ok()?;
        let s = m.status?;
        (s.phase == Phase::Completed || s.phase == Phase::Failed).then_some(s)
    })
    .await;
    assert_eq!(done.phase, Phase::Completed, "{:?}", done.message);
    assert_eq!(done.source_region.as_deref(), Some("us-east"));
    assert_eq!((done.source_epoch, done.target_epoch), (Some(1), Some(2)));
    assert!(done.unavailable_ms.is_some() && done.finished_at.is_some());
    let succeeded = done
        .conditions
        .iter()
        .find(|c| c.type_ == "Succeeded")
        .expect("condition");
    assert_eq!(succeeded.status, "True");
    assert_eq!(placement(&dir, "acct-k8s").await["home"], "eu-west");
    let intents = intents_of(&dir, "acct-k8s").await;
    assert_eq!(intents.len(), 1, "carried out once: {intents:?}");
    assert_eq!(intents[0].reason, "ticket-42");
    let table = cp
        .kubectl(&["get", "accountmigrations", "move-1", "-n", "default"])
        .expect("kubectl get");
    assert!(table.contains("us-east") && table.contains("Completed"), "{table}");

    // `kubectl tern migrate --cluster`: an object of its own, followed.
    let kubeconfig = cp.kubeconfig().display().to_string();
    tern_cli::run_args([
        "tern",
        "migrate",
        "acct-k8s",
        "--to",
        "us-east",
        "--expect-from",
        "eu-west",
        "--cluster",
        "payments",
        "--kubeconfig",
        kubeconfig.as_str(),
        "--id",
        "back-home",
        "--wait",
        "--reason",
        "ticket-43",
    ])
    .await
    .expect("tern migrate --cluster --wait");
    let back = api.get("back-home").await.expect("object").status.expect("status");
    assert_eq!(back.phase, Phase::Completed);
    assert_eq!(placement(&dir, "acct-k8s").await["home"], "us-east");
    // A bad region is refused before anything is sent, naming the flag.
    let bad = tern_cli::run_args([
        "tern",
        "migrate",
        "acct-k8s",
        "--to",
        "EU WEST",
        "--cluster",
        "payments",
        "--kubeconfig",
        kubeconfig.as_str(),
    ])
    .await
    .expect_err("bad region");
    assert!(bad.to_string().contains("--to"), "{bad}");
    tern_cli::run_args([
        "tern",
        "migrate",
        "acct-k8s",
        "--to",
        "eu-west",
        "--cluster",
        "payments",
        "--kubeconfig",
        kubeconfig.as_str(),
        "--id",
        "again",
        "--wait",
    ])
    .await
    .expect("moved again");

    api.create(&PostParams::default(), &object("move-2", "us-east"))
        .await
        .expect("created");
    let failed = tern_e2e::operator::eventually("the stale move fails", Duration::from_secs(60), || async {
        let s = api.get("move-2").await.ok()?.status?;
        (s.phase == Phase::Failed).then_some(s)
    })
    .await;
    assert!(
        failed
            .message
            .as_deref()
            .unwrap_or("")
            .contains("already homed in eu-west"),
        "{:?}",
        failed.message
    );
    let reason = &failed
        .conditions
        .iter()
        .find(|c| c.type_ == "Succeeded")
        .expect("condition")
        .reason;
    assert_eq!(reason, "Refused");
    operator.stop().await;
}

/// After a move, the source's copy of the account's data and idempotency
/// records is deleted (here at once: `--moved-cleanup-delay=1ms`); the
/// `moved` fence stays and the account still reads and writes from
/// anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_accounts_old_copy_is_cleaned_up_and_its_fence_stays() {
    let _serial = SERIAL.lock().await;
    let mut d = start().await;
    let dir = d.directory_client().await;
    let agent = d.region_mut("us-east").agent.take().expect("agent");
    agent.stop().await;
    let agent = d
        .start_agent("us-east", &["--moved-cleanup-delay=1ms".into()])
        .await
        .expect("agent restarts");
    d.region_mut("us-east").agent = Some(agent);
    create(&d, "acct-old", "us-east").await;
    let mut us = d.client("us-east").await;
    for i in 0..5 {
        us.put(put("acct-old", &format!("k{i}"), "v", &format!("idem-{i}")))
            .await
            .expect("write");
    }
    mirror_measured(&d, "eu-west", "us-east").await;
    let done = migrate(&dir, "old-1", "acct-old", "eu-west", None).await;
    assert_eq!(done.phase, MigrationPhase::Completed, "{:?}", done.message);
    let mut group = d.group_client("us-east").await;
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let left = group
            .get("/tern/a/acct-old/", Some(GetOptions::new().with_prefix()))
            .await
            .expect("read")
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect::<Vec<_>>();
        if left == vec!["/tern/a/acct-old/fence".to_string()] {
            break;
        }
        assert!(Instant::now() < until, "the old copy stays: {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        fence(&d, "us-east", "acct-old").await.as_deref(),
        Some("1:moved:eu-west")
    );
    let keys: Vec<String> = (0..5).map(|i| format!("k{i}")).collect();
    all_readable(&d, "us-east", "acct-old", &keys).await;
    us.put(put("acct-old", "after", "v", "")).await.expect("writes go on");
}

/// Sets the account's placement in the directory to `state` (JSON), as a
/// move would, keeping the rest.
async fn set_state(dir: &Client, account: &str, state: serde_json::Value) {
    let mut p = placement(dir, account).await;
    p["state"] = state;
    dir.clone()
        .put(format!("/tern/dir/accounts/{account}"), p.to_string(), None)
        .await
        .expect("placement written");
}

/// Copies the account from eu-west's mirror of us-east into eu-west's home
/// area with the fence `2:active`, as a move's copy does.
async fn land_in_eu_west(d: &LocalDeployment, account: &str) {
    let mut eu = d.group_client("eu-west").await;
    let source = region("us-east");
    let prefix = tern_common::mirror_key(&source, format!("/tern/a/{account}/").as_bytes());
    let strip = tern_common::mirror_key(&source, b"").len();
    let mirrored = eu
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .expect("mirrored keys");
    for kv in mirrored.kvs() {
        let key = String::from_utf8_lossy(&kv.key()[strip..]).into_owned();
        if !key.ends_with("/fence") {
            eu.put(key, kv.value(), None).await.expect("copied");
        }
    }
    eu.put(format!("/tern/a/{account}/fence"), "2:active", None)
        .await
        .expect("fence");
}

/// A move of `account` from us-east to eu-west played by hand up to the
/// fence: the directory says migrating, us-east's fence `1:fenced`.
async fn fence_for_move(dir: &Client, us_group: &mut Client, account: &str) {
    set_state(
        dir,
        account,
        serde_json::json!({"kind": "migrating", "target": "eu-west"}),
    )
    .await;
    us_group
        .put(format!("/tern/a/{account}/fence"), "1:fenced", None)
        .await
        .expect("fenced");
    tokio::time::sleep(Duration::from_millis(300)).await;
}

type Waiting = tokio::task::JoinHandle<Result<tonic::Response<pb::PutResponse>, tonic::Status>>;

/// One write to `account` through each of `clients`, started now; checks
/// that none has finished 500 ms later.
async fn writes_that_wait(clients: [(&'static str, &RouterClient); 2], account: &str) -> Vec<(&'static str, Waiting)> {
    let mut waiting = Vec::new();
    for (via, c) in clients {
        let (mut c, account) = (c.clone(), account.to_string());
        waiting.push((
            via,
            tokio::spawn(async move { c.put(put(&account, &format!("from-{via}"), "1", "")).await }),
        ));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        waiting.iter().all(|(_, w)| !w.is_finished()),
        "a write committed while the account was fenced and not copied"
    );
    waiting
}

/// Each waiting write commits, in `home` at `epoch`.
async fn committed_in(waiting: Vec<(&'static str, Waiting)>, home: &str, epoch: u64) {
    for (via, w) in waiting {
        let meta = w
            .await
            .expect("writer")
            .unwrap_or_else(|e| panic!("a write through {via} failed instead of waiting: {e}"))
            .into_inner()
            .meta
            .expect("meta");
        assert_eq!((meta.home_region.as_str(), meta.epoch), (home, epoch), "through {via}");
    }
}

/// The routers alone, with a move's steps played by hand (no intent, so no
/// agent acts): a write that meets the source fenced for a move goes on to
/// the target and waits there for the copy, so it commits as soon as the
/// copy lands, before the directory says anything; a router whose placement
/// is stale follows a `moved` fence; and a move rolled back before its copy
/// landed sends the waiting writes back to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_the_fences_of_a_move_ahead_of_the_directory() {
    let _serial = SERIAL.lock().await;
    let d = start().await;
    let dir = d.directory_client().await;
    let mut us_group = d.group_client("us-east").await;
    create(&d, "acct-h", "us-east").await;
    let mut us = d.client("us-east").await;
    let mut eu = d.client("eu-west").await;
    us.put(put("acct-h", "paid", "1", "pay-h")).await.expect("keyed put");
    mirror_measured(&d, "eu-west", "us-east").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Migrating, the source fenced, nothing copied yet: writes wait.
    fence_for_move(&dir, &mut us_group, "acct-h").await;
    let started = Instant::now();
    let waiting = writes_that_wait([("us-east", &us), ("eu-west", &eu)], "acct-h").await;
    land_in_eu_west(&d, "acct-h").await;
    committed_in(waiting, "eu-west", 2).await;
    eprintln!("writes waited {:?} for the copy", started.elapsed());
    assert_eq!(
        placement(&dir, "acct-h").await["state"]["kind"],
        "migrating",
        "the directory has not switched: the writes followed the fences"
    );
    // The idempotency record came with the copy: a retry is replayed.
    let retry = us
        .put(put("acct-h", "paid", "1", "pay-h"))
        .await
        .expect("retry")
        .into_inner()
        .meta
        .expect("meta");
    assert!(retry.replayed && retry.home_region == "eu-west", "{retry:?}");

    // The source says moved while the directory (as if stale) still names
    // it active: the routers believe the fence.
    us_group
        .put("/tern/a/acct-h/fence", "1:moved:eu-west", None)
        .await
        .expect("moved");
    set_state(&dir, "acct-h", serde_json::json!({"kind": "active"})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (via, c) in [("us-east", &mut us), ("eu-west", &mut eu)] {
        let meta = c
            .put(put("acct-h", &format!("after-moved-{via}"), "1", ""))
            .await
            .unwrap_or_else(|e| panic!("through {via}: {e}"))
            .into_inner()
            .meta
            .expect("meta");
        assert_eq!((meta.home_region.as_str(), meta.epoch), ("eu-west", 2), "through {via}");
    }
    all_readable(
        &d,
        "eu-west",
        "acct-h",
        &["from-us-east".into(), "from-eu-west".into(), "paid".into()],
    )
    .await;

    // A move rolled back before its copy landed: the waiting writes commit
    // in the source again.
    create(&d, "acct-b", "us-east").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    fence_for_move(&dir, &mut us_group, "acct-b").await;
    let waiting = writes_that_wait([("us-east", &us), ("eu-west", &eu)], "acct-b").await;
    us_group
        .put("/tern/a/acct-b/fence", "1:active", None)
        .await
        .expect("unfenced");
    set_state(&dir, "acct-b", serde_json::json!({"kind": "active"})).await;
    committed_in(waiting, "us-east", 1).await;
}

/// Moves the agents decide are recorded as AccountMigration objects that
/// report their intent and are never carried out again; the newest
/// `--automatic-migration-history` are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_moves_are_recorded_as_account_migrations_and_trimmed() {
    use kube::api::{Api, ListParams};
    use tern_crds::{AccountMigration, MigrationPhase as Phase};
    let _serial = SERIAL.lock().await;
    let d = start().await;
    let dir = d.directory_client().await;
    let cp = tern_e2e::controlplane::ControlPlane::start("audit")
        .await
        .expect("control plane starts");
    cp.install_crds().expect("CRDs install");
    // followTheSun is enabled in the example.
    cp.kubectl(&["apply", "-f", "examples/geocluster.yaml"])
        .expect("GeoCluster applied");
    // Three automatic moves as agents leave them (two finished, one
    // refused), and one into a region the GeoCluster does not have.
    for (n, (account, to, phase)) in [
        ("acct-a", "eu-west", MigrationPhase::Completed),
        ("acct-b", "eu-west", MigrationPhase::Completed),
        ("Acct_C", "us-east", MigrationPhase::Refused),
        ("acct-d", "mars", MigrationPhase::Completed),
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = MigrationRecord::requested(
            AccountId::new(account).expect("account"),
            region(to),
            Some(region("ap-south")),
            format!("{account}: 4 writes from {to} in 24h, 0 from home ap-south → moving to {to}"),
            1_800_000_000_000 + n as u64,
        );
        r.phase = phase;
        r.source = Some(region("ap-south"));
        r.unavailable_ms = Some(100 + n as u64);
        dir.clone()
            .put(
                format!("/tern/dir/migrations/sun-{account}-{}", r.requested_ms),
                serde_json::to_string(&r).expect("json"),
                None,
            )
            .await
            .expect("intent");
    }
    let endpoints = format!("--directory-endpoints={}", d.directory.endpoints().join(","));
    let operator =
        tern_e2e::operator::OperatorGuard::start(&cp, &[endpoints.as_str(), "--automatic-migration-history=2"])
            .await
            .expect("operator starts");
    let api: Api<AccountMigration> = Api::namespaced(cp.client().await.expect("client"), "default");
    let recorded = tern_e2e::operator::eventually(
        "the newest two are recorded and reported",
        Duration::from_secs(60),
        || async {
            let list = api
                .list(&ListParams::default().labels("tern.dev/trigger=follow-the-sun"))
                .await
                .ok()?;
            let done = list.items.len() == 2
                && list.items.iter().all(|m| {
                    m.status
                        .as_ref()
                        .is_some_and(|s| s.phase == Phase::Completed || s.phase == Phase::Failed)
                });
            done.then_some(list.items)
        },
    )
    .await;
    let mut by_account: Vec<(String, Phase, Option<i64>, String)> = recorded
        .iter()
        .map(|m| {
            let s = m.status.clone().expect("status");
            (
                m.spec.account.clone(),
                s.phase,
                s.unavailable_ms,
                m.spec.reason.clone().unwrap_or_default(),
            )
        })
        .collect();
    by_account.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        by_account
            .iter()
            .map(|(a, p, ms, _)| (a.as_str(), *p, *ms))
            .collect::<Vec<_>>(),
        vec![
            ("Acct_C", Phase::Failed, Some(102)),
            ("acct-b", Phase::Completed, Some(101))
        ],
        "{recorded:#?}"
    );
    assert!(by_account[1].3.contains("moving to eu-west"), "{:?}", by_account[1].3);
    for m in &recorded {
        assert!(
            m.metadata
                .owner_references
                .as_ref()
                .is_some_and(|o| o.iter().any(|o| o.kind == "GeoCluster" && o.name == "payments")),
            "owned by its GeoCluster: {:?}",
            m.metadata.owner_references
        );
    }
    // Reported, never carried out again: the directory holds the four
    // intents and no more.
    let all = migrations::list(&dir).await.expect("intents");
    assert_eq!(all.len(), 4, "{all:?}");
    let table = cp
        .kubectl(&["get", "amig", "-n", "default", "-o", "wide"])
        .expect("kubectl get");
    assert!(
        table.contains("Acct_C") && table.contains("moving to eu-west"),
        "{table}"
    );

    // A newer move: the oldest record goes.
    let mut r = MigrationRecord::requested(
        AccountId::new("acct-e").expect("account"),
        region("eu-west"),
        None,
        "newer".into(),
        1_800_000_001_000,
    );
    r.phase = MigrationPhase::Completed;
    dir.clone()
        .put(
            "/tern/dir/migrations/sun-acct-e-1800000001000",
            serde_json::to_string(&r).expect("json"),
            None,
        )
        .await
        .expect("intent");
    tern_e2e::operator::eventually("the oldest record is deleted", Duration::from_secs(60), || async {
        let list = api
            .list(&ListParams::default().labels("tern.dev/trigger=follow-the-sun"))
            .await
            .ok()?;
        let mut accounts: Vec<String> = list.items.iter().map(|m| m.spec.account.clone()).collect();
        accounts.sort();
        (accounts == ["Acct_C", "acct-e"]).then_some(())
    })
    .await;
    operator.stop().await;
}

/// A deposed agent's fence, set after its successor rolled the move back,
/// is undone by the source's agent; a fence of a move still open is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stray_fence_after_a_rollback_is_repaired() {
    let _serial = SERIAL.lock().await;
    let d = start().await;
    let dir = d.directory_client().await;
    create(&d, "acct-stray", "us-east").await;
    create(&d, "acct-open", "us-east").await;
    let mut us_group = d.group_client("us-east").await;
    let intent = |account: &str, phase, to: &str| {
        let mut r = MigrationRecord::requested(
            AccountId::new(account).expect("account"),
            region(to),
            None,
            "test".into(),
            tern_common::unix_ms(),
        );
        r.phase = phase;
        r.source = Some(region("us-east"));
        r.source_epoch = Some(tern_common::Epoch(1));
        r.finished_ms = Some(tern_common::unix_ms());
        serde_json::to_string(&r).expect("json")
    };
    // acct-stray: rolled back, then fenced by the deposed agent.
    // acct-open: an earlier move rolled back, and a new one in flight (to
    // a region without an agent here, so it stays in flight).
    for (id, account, phase, to) in [
        ("stray-1", "acct-stray", MigrationPhase::RolledBack, "eu-west"),
        ("open-1", "acct-open", MigrationPhase::RolledBack, "eu-west"),
        ("open-2", "acct-open", MigrationPhase::Fencing, "ap-south"),
    ] {
        dir.clone()
            .put(format!("/tern/dir/migrations/{id}"), intent(account, phase, to), None)
            .await
            .expect("intent");
    }
    for account in ["acct-stray", "acct-open"] {
        us_group
            .put(format!("/tern/a/{account}/fence"), "1:fenced", None)
            .await
            .expect("fenced");
    }
    let until = Instant::now() + Duration::from_secs(30);
    while fence(&d, "us-east", "acct-stray").await.as_deref() != Some("1:active") {
        assert!(Instant::now() < until, "the stray fence was never repaired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    d.client("us-east")
        .await
        .put(put("acct-stray", "k", "v", ""))
        .await
        .expect("the account takes writes again");
    assert_eq!(
        fence(&d, "us-east", "acct-open").await.as_deref(),
        Some("1:fenced"),
        "a fence with a move in flight is the move's"
    );
}
