//! A rolling restart of a group onto a new etcd build, against real etcd,
//! as the operator's upgrade planner (`tern_operator::upgrade`) orders it:
//! one member at a time, followers first, the leader last after handing its
//! leadership to an upgraded follower, each restart only once every member
//! answers and has caught up. Three clients read and write throughout, and
//! the history checker judges what they saw against what etcd applied.
//!
//! The test plays the StatefulSet: a "restart on the new image" kills the
//! member's process (kill -9, harsher than a pod deletion) and starts the
//! pinned etcd again on its data. The highest ordinal leads at the start,
//! so the planner must hold it back and hand its leadership over.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::Client;
use tern_e2e::etcd::register_client;
use tern_local::etcd_cluster::{EtcdCluster, Tuning};
use tern_operator::upgrade::{self, PodState, Step, Version};
use tern_verify::History;

const KEYS: [&str; 8] = ["/u/k0", "/u/k1", "/u/k2", "/u/k3", "/u/k4", "/u/k5", "/u/k6", "/u/k7"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_restarts_followers_first_and_the_leader_last_without_losing_a_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut etcd = EtcdCluster::start(dir.path(), "upgrade", 3, Tuning::default()).expect("etcd starts");
    let endpoints = etcd.endpoints();
    let members: Vec<(i32, String)> = endpoints
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, e)| (i as i32, e))
        .collect();
    // The highest ordinal leads: the planner would restart it first if it
    // did not hold leadership back.
    etcd.move_leader(2).await.expect("member 2 leads");

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|id| tokio::spawn(register_client(id, endpoints.clone(), &KEYS, start, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The skew check on what the members report.
    let before = upgrade::observe(&members, None, |_| (false, PodState::READY)).await;
    let running: Vec<Version> = before
        .iter()
        .map(|m| Version::parse(&m.version).expect("etcd reports its version"))
        .collect();
    upgrade::check_skew(&running, running[0]).expect("the same version is a valid target");
    let skipped = Version {
        minor: running[0].minor + 2,
        ..running[0]
    };
    assert!(upgrade::check_skew(&running, skipped).is_err());

    let mut upgraded: BTreeSet<i32> = BTreeSet::new();
    let mut steps = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < give_up, "no steady state within 120 s: {steps:?}");
        let states = upgrade::observe(&members, None, |o| (upgraded.contains(&o), PodState::READY)).await;
        let step = upgrade::plan(&states);
        match &step {
            Step::Steady => break,
            Step::Wait { .. } => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Step::Restart { ordinal } => {
                // Asked of etcd itself, not of the planner's input.
                assert_ne!(
                    etcd.leader().await,
                    Some(*ordinal as usize),
                    "the leader is never restarted while it leads: {steps:?}"
                );
                etcd.kill(*ordinal as usize);
                etcd.restart(*ordinal as usize)
                    .expect("the member restarts on its data");
                upgraded.insert(*ordinal);
            }
            Step::MoveLeader { from, to } => {
                let leader = states.iter().find(|m| m.id == *from).expect("the leader");
                let mut c = Client::connect([members[leader.ordinal as usize].1.as_str()], None)
                    .await
                    .expect("connect to the leader");
                // A refusal (not caught up yet) is retried after the next
                // observation, as the operator's next reconcile would.
                let _ = c.move_leader(*to).await;
            }
        }
        steps.push(step);
    }
    let taken: Vec<&Step> = steps.iter().filter(|s| !matches!(s, Step::Wait { .. })).collect();
    let restarts: Vec<i32> = taken
        .iter()
        .filter_map(|s| match s {
            Step::Restart { ordinal } => Some(*ordinal),
            _ => None,
        })
        .collect();
    assert_eq!(
        restarts,
        [1, 0, 2],
        "followers highest first, the first leader last: {steps:?}"
    );
    assert!(
        matches!(taken[2], Step::MoveLeader { .. }),
        "leadership is handed over before the leader restarts: {steps:?}"
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut history = History::default();
    for c in clients {
        history.records.extend(c.await.expect("client task"));
    }
    let applied = tern_e2e::etcd::applied(&endpoints, "/u/").await;
    let report = tern_verify::judge(&history, Some(&applied), Duration::from_secs(20));
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert!(
        report.unknown.is_empty(),
        "the checker ran out of time on {:?}",
        report.unknown
    );
    let acknowledged = history
        .records
        .iter()
        .filter(|r| r.request.writes() && matches!(r.outcome, tern_verify::Outcome::Ok { .. }))
        .count();
    assert!(
        acknowledged > 30,
        "too few acknowledged writes to judge: {acknowledged}"
    );
    eprintln!(
        "upgrade: {:?}; {} operations, {acknowledged} acknowledged writes, {} keys linearizable, {:.1} s",
        taken,
        history.records.len(),
        report.keys,
        start.elapsed().as_secs_f64()
    );
}

/// The directory's roll lock against real etcd: one region's operator
/// holds it while its member restarts, another region's is refused and
/// told who restarts, the holder may take it again for its next member,
/// and once given back the other region takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_directory_roll_lock_lets_one_region_restart_at_a_time() {
    use tern_operator::controller::regiongroup::directory_roll::{lock, unlock};
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = EtcdCluster::start(dir.path(), "directory", 1, Tuning::default()).expect("etcd starts");
    let mut c = Client::connect(etcd.endpoints(), None).await.expect("connect");
    lock(&mut c, "us-east", "payments-dir-us-east")
        .await
        .expect("us-east takes the lock");
    let refused = lock(&mut c, "eu-west", "payments-dir-eu-west")
        .await
        .expect_err("eu-west must wait");
    assert!(
        refused.contains("payments-dir-us-east of region us-east rolls"),
        "{refused}"
    );
    lock(&mut c, "us-east", "payments-dir-us-east")
        .await
        .expect("the holder renews it");
    unlock(&mut c, "eu-west").await.expect("not eu-west's: nothing happens");
    assert!(lock(&mut c, "eu-west", "payments-dir-eu-west").await.is_err());
    unlock(&mut c, "us-east").await.expect("given back");
    lock(&mut c, "eu-west", "payments-dir-eu-west")
        .await
        .expect("eu-west takes it once us-east gave it back");
    let held = c.get(tern_common::DIR_ROLL_LOCK, None).await.expect("read");
    let kv = held.kvs().first().expect("held");
    assert!(kv.lease() != 0, "on a lease, so that it lapses with a stopped operator");
}
