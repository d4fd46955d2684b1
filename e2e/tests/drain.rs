//! Planned switchover (DESIGN.md "Failover", last points) on a local
//! deployment of three regions: real etcd groups and directory, routers and
//! agents as processes of this test, toxiproxy links between regions.
//!
//! Draining a region moves every account out with the migration protocol
//! while writes flow, losing none (RPO 0), respects residency, refuses new
//! accounts and moves into the region, shows its progress, and undrains;
//! moving a region group's Raft leader for etcd maintenance keeps writes
//! flowing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tern_api::pb;
use tern_common::{AccountRecord, RegionName, RegionRecord, RegionState, dir_account_key, dir_region_key};
use tern_local::{Layout, LocalDeployment};

/// Each test runs a deployment of its own; one at a time on two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start(regions: Vec<(String, usize)>) -> LocalDeployment {
    tern_e2e::init_logs();
    let mut rtt_ms = BTreeMap::new();
    for (i, (a, _)) in regions.iter().enumerate() {
        for (b, _) in &regions[i + 1..] {
            rtt_ms.insert((a.clone(), b.clone()), 30);
        }
    }
    LocalDeployment::start(Layout {
        regions,
        directory_members: 1,
        rtt_ms,
        agents: true,
        otlp_endpoint: None,
        tls: false,
    })
    .await
    .expect("deployment starts")
}

async fn create(d: &LocalDeployment, account: &str, home: &str, allowed: &[&str]) -> Result<(), tonic::Status> {
    tern_e2e::create_account(d, home, account, home, allowed).await
}

async fn record(d: &LocalDeployment, region: &str) -> RegionRecord {
    let found = d
        .directory_client()
        .await
        .get(dir_region_key(&RegionName::new(region).expect("valid")), None)
        .await
        .expect("directory answers");
    serde_json::from_slice(found.kvs().first().expect("record").value()).expect("readable record")
}

async fn placement(d: &LocalDeployment, account: &str) -> AccountRecord {
    let id = tern_common::AccountId::new(account).expect("valid");
    let found = d
        .directory_client()
        .await
        .get(dir_account_key(&id), None)
        .await
        .expect("directory answers");
    serde_json::from_slice(found.kvs().first().expect("placement").value()).expect("readable placement")
}

/// Waits until every region's agent measures the lag of its mirror of
/// `source` (a move refuses to start before).
async fn mirrors_measured(d: &LocalDeployment, source: &str) {
    for r in &d.regions {
        if r.name == source {
            continue;
        }
        let agent = r.agent.as_ref().expect("agent");
        let metric = format!("tern_agent_mirror_lag_ms{{source=\"{source}\"}}");
        let until = Instant::now() + Duration::from_secs(30);
        while !agent.metric(&metric).await.is_some_and(|l| l < 1e12) {
            assert!(
                Instant::now() < until,
                "{}'s mirror of {source} never measured its lag",
                r.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One writer per account through `via`, each writing increasing numbers
/// to key `n` with idempotency keys; returns the last acknowledged number
/// per account and the errors.
struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Written>>,
}

/// One writer's account, its last acknowledged number and its errors.
type Written = (String, Option<u64>, Vec<String>);

impl Writers {
    async fn start(d: &LocalDeployment, via: &str, accounts: &[String]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for account in accounts {
            let mut client = d.client(via).await;
            let (stop, account) = (stop.clone(), account.clone());
            tasks.push(tokio::spawn(async move {
                let (mut last, mut errors) = (None, Vec::new());
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let put = pb::PutRequest {
                        account: account.clone(),
                        key: "n".into(),
                        value: n.to_string().into_bytes(),
                        idempotency_key: format!("{account}-{n}"),
                    };
                    match client.put(put).await {
                        Ok(_) => last = Some(n),
                        Err(e) => errors.push(format!("{account} {n}: {e}")),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (account, last, errors)
            }));
        }
        Self { stop, tasks }
    }

    async fn stop(self) -> (BTreeMap<String, u64>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut last, mut errors) = (BTreeMap::new(), Vec::new());
        for t in self.tasks {
            let (account, n, e) = t.await.expect("writer");
            if let Some(n) = n {
                last.insert(account, n);
            }
            errors.extend(e);
        }
        (last, errors)
    }
}

async fn read_n(d: &LocalDeployment, via: &str, account: &str) -> u64 {
    let r = d
        .client(via)
        .await
        .get(pb::GetRequest {
            account: account.into(),
            key: "n".into(),
            read: None,
        })
        .await
        .expect("strong read")
        .into_inner();
    assert!(r.found, "{account}: its key is gone");
    String::from_utf8_lossy(&r.value).parse().expect("a number")
}

#[tokio::test]
async fn a_drained_region_moves_every_account_out_under_writes_and_loses_none() {
    let _serial = SERIAL.lock().await;
    let d = start(vec![
        ("us-east".into(), 1),
        ("eu-west".into(), 1),
        ("ap-south".into(), 1),
    ])
    .await;
    let directory = format!("--directory={}", d.directory.endpoints().join(","));
    let mut accounts: Vec<String> = (0..10).map(|i| format!("acct-d{i}")).collect();
    for a in &accounts {
        create(&d, a, "us-east", &[]).await.expect("created");
    }
    // Residency: this one may live only in us-east or ap-south.
    create(&d, "acct-ap", "us-east", &["us-east", "ap-south"])
        .await
        .expect("created");
    accounts.push("acct-ap".into());
    // An account elsewhere is not touched.
    create(&d, "acct-eu", "eu-west", &[]).await.expect("created");
    mirrors_measured(&d, "us-east").await;

    let writers = Writers::start(&d, "eu-west", &accounts).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let began = Instant::now();
    tern_cli::run_args([
        "tern",
        "drain",
        "us-east",
        "--wait",
        "--timeout=90s",
        directory.as_str(),
    ])
    .await
    .expect("drained");
    let took = began.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (last, errors) = writers.stop().await;
    eprintln!(
        "drained {} accounts in {took:?} under writes; {} writes refused or failed: {errors:?}",
        accounts.len(),
        errors.len()
    );

    // Every account left, residency respected, the other region's stays.
    for a in &accounts {
        let p = placement(&d, a).await;
        assert_ne!(p.home.as_str(), "us-east", "{a} is still homed in us-east");
        assert_eq!(p.state, tern_common::AccountState::Active, "{a}");
    }
    assert_eq!(placement(&d, "acct-ap").await.home.as_str(), "ap-south");
    assert_eq!(placement(&d, "acct-eu").await.home.as_str(), "eu-west");
    // RPO 0: every account holds at least its last acknowledged write
    // (a write whose answer was lost may have landed after it).
    assert_eq!(last.len(), accounts.len(), "every account acknowledged writes");
    for (a, n) in &last {
        let read = read_n(&d, "eu-west", a).await;
        assert!(read >= *n, "{a}: read {read}, but {n} was acknowledged");
    }
    let r = record(&d, "us-east").await;
    assert_eq!(r.state, RegionState::Draining);
    let p = r.drain.expect("progress");
    assert_eq!((p.homed, p.moving, p.blocked), (0, 0, 0), "{p:?}");
    assert!(p.moved >= accounts.len() as u64, "{p:?}");

    // A draining region takes no new accounts, and no moves in.
    let e = create(&d, "acct-new", "us-east", &[]).await.expect_err("draining");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("us-east is draining") && e.message().contains("ap-south, eu-west"),
        "{}",
        e.message()
    );
    let e = tern_cli::run_args([
        "tern",
        "migrate",
        "acct-eu",
        "--to",
        "us-east",
        "--wait",
        directory.as_str(),
    ])
    .await
    .expect_err("refused")
    .to_string();
    assert!(e.contains("refused") && e.contains("us-east is draining"), "{e}");

    // Undrained: accounts may come back, and new ones be created.
    tern_cli::run_args(["tern", "undrain", "us-east", directory.as_str()])
        .await
        .expect("undrained");
    assert_eq!(record(&d, "us-east").await.state, RegionState::Active);
    create(&d, "acct-stuck", "us-east", &["us-east"])
        .await
        .expect("created");
    tern_cli::run_args([
        "tern",
        "migrate",
        "acct-d0",
        "--to",
        "us-east",
        "--wait",
        directory.as_str(),
    ])
    .await
    .expect("moved back");
    let until = Instant::now() + Duration::from_secs(10);
    while record(&d, "us-east").await.drain.is_some() {
        assert!(
            Instant::now() < until,
            "the undrained region's progress was never cleared"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Draining again: the account that may live only here is blocked, and
    // the progress says why; the drain never finishes while it is.
    tern_cli::run_args(["tern", "drain", "us-east", directory.as_str()])
        .await
        .expect("draining");
    let until = Instant::now() + Duration::from_secs(30);
    let blocked = loop {
        let p = record(&d, "us-east").await.drain;
        if let Some(p) = p.filter(|p| p.homed == 1 && p.moving == 0 && p.blocked == 1) {
            break p;
        }
        assert!(
            Instant::now() < until,
            "the drain never settled with one account blocked"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let why = blocked.message.expect("a reason");
    assert!(
        why.contains("acct-stuck") && why.contains("allowed regions [us-east]"),
        "{why}"
    );
    assert_ne!(placement(&d, "acct-d0").await.home.as_str(), "us-east");
    let e = tern_cli::run_args(["tern", "drain", "us-east", "--wait", "--timeout=2s", directory.as_str()])
        .await
        .expect_err("cannot finish")
        .to_string();
    assert!(e.contains("not drained within"), "{e}");
    tern_cli::run_args(["tern", "undrain", "us-east", directory.as_str()])
        .await
        .expect("undrained");
}

#[tokio::test]
async fn moving_a_region_groups_leader_keeps_writes_flowing() {
    let _serial = SERIAL.lock().await;
    let d = start(vec![("us-east".into(), 3), ("eu-west".into(), 1)]).await;
    let accounts: Vec<String> = (0..3).map(|i| format!("acct-l{i}")).collect();
    for a in &accounts {
        create(&d, a, "us-east", &[]).await.expect("created");
    }
    let group = format!("--group={}", d.region("us-east").group.endpoints().join(","));
    let writers = Writers::start(&d, "us-east", &accounts).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Three hand-overs, so the lead visits more than one member.
    for _ in 0..3 {
        tern_cli::run_args(["tern", "move-leader", "us-east", group.as_str()])
            .await
            .expect("leader moved");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (last, errors) = writers.stop().await;
    assert!(errors.is_empty(), "writes failed while the leader moved: {errors:?}");
    assert_eq!(last.len(), accounts.len(), "every account acknowledged writes");
    for (a, n) in &last {
        assert_eq!(read_n(&d, "us-east", a).await, *n, "{a}");
    }
    let e = tern_cli::run_args([
        "tern",
        "move-leader",
        "us-east",
        group.as_str(),
        "--to=http://127.0.0.1:1",
    ])
    .await
    .expect_err("no such member")
    .to_string();
    assert!(e.contains("not an answering follower"), "{e}");
}

#[tokio::test]
async fn a_geocluster_drains_a_region_through_its_spec_and_shows_the_progress() {
    use kube::api::Api;
    use tern_local::etcd_cluster::{EtcdCluster, Tuning};
    let _serial = SERIAL.lock().await;
    tern_e2e::init_logs();
    let tmp = tempfile::tempdir().expect("temp dir");
    let directory = EtcdCluster::start(tmp.path(), "directory", 1, Tuning::default()).expect("directory");
    let mut dir = etcd_client::Client::connect(directory.endpoints(), None)
        .await
        .expect("directory client");
    for region in ["us-east", "eu-west", "ap-south"] {
        let name = RegionName::new(region).expect("valid");
        dir.put(dir_region_key(&name), RegionRecord::unwritten().to_json(), None)
            .await
            .expect("record");
    }
    let cp = tern_e2e::controlplane::ControlPlane::start("drain")
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
    tern_e2e::operator::eventually("the regions in the status", Duration::from_secs(60), || async {
        let status = api.get("payments").await.ok()?.status?;
        status
            .regions
            .iter()
            .any(|r| r.serving.as_deref() == Some("Active"))
            .then_some(())
    })
    .await;

    // `kubectl tern drain --cluster` sets the spec; the operator carries it
    // into the directory.
    let kubeconfig = cp.kubeconfig().display().to_string();
    let drain = |verb: &'static str| {
        tern_cli::run_args([
            "tern",
            verb,
            "eu-west",
            "--cluster",
            "payments",
            "--kubeconfig",
            kubeconfig.as_str(),
        ])
    };
    drain("drain").await.expect("drain --cluster");
    let gc = api.get("payments").await.expect("GeoCluster");
    assert!(
        gc.spec.regions.iter().any(|r| r.name == "eu-west" && r.drain),
        "{:?}",
        gc.spec.regions
    );
    tern_e2e::operator::eventually("eu-west draining in the directory", Duration::from_secs(30), || async {
        let found = etcd_client::Client::connect(directory.endpoints(), None)
            .await
            .ok()?
            .get(dir_region_key(&RegionName::new("eu-west").ok()?), None)
            .await
            .ok()?;
        let r: RegionRecord = serde_json::from_slice(found.kvs().first()?.value()).ok()?;
        (r.state == RegionState::Draining).then_some(())
    })
    .await;
    // The agent's progress (written here as the agent would) reaches the
    // status, with the printer column.
    let eu = RegionName::new("eu-west").expect("valid");
    let found = dir.get(dir_region_key(&eu), None).await.expect("record");
    let mut record: RegionRecord = serde_json::from_slice(found.kvs().first().expect("record").value()).expect("json");
    record.drain = Some(tern_common::DrainProgress {
        homed: 3,
        moving: 2,
        moved: 5,
        ..Default::default()
    });
    dir.put(dir_region_key(&eu), record.to_json(), None)
        .await
        .expect("progress");
    let shown = tern_e2e::operator::eventually("the progress in the status", Duration::from_secs(30), || async {
        let status = api.get("payments").await.ok()?.status?;
        let r = status.regions.iter().find(|r| r.name == "eu-west")?;
        (r.serving.as_deref() == Some("Draining")).then_some(r.drain.clone()?)
    })
    .await;
    assert_eq!((shown.homed, shown.moving, shown.moved), (3, 2, 5));
    let table = cp.kubectl(&["get", "geocluster", "payments"]).expect("kubectl get");
    assert!(table.contains("DRAINING") && table.contains("eu-west"), "{table}");
    // A region the spec does not name is refused by the command.
    let e = tern_cli::run_args([
        "tern",
        "drain",
        "mars",
        "--cluster",
        "payments",
        "--kubeconfig",
        kubeconfig.as_str(),
    ])
    .await
    .expect_err("no such region")
    .to_string();
    assert!(e.contains("has no region mars"), "{e}");

    drain("undrain").await.expect("undrain --cluster");
    tern_e2e::operator::eventually("eu-west active again", Duration::from_secs(30), || async {
        let status = api.get("payments").await.ok()?.status?;
        let r = status.regions.iter().find(|r| r.name == "eu-west")?;
        (r.serving.as_deref() == Some("Active") && r.drain.is_none()).then_some(())
    })
    .await;
}
