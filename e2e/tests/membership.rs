//! Raft membership changes against real etcd: a region's group grows from
//! three members to five and shrinks back to three, one member at a time,
//! while clients keep reading and writing; the history checker judges what
//! they saw against what etcd applied.
//!
//! The operator's own planner and executor (`tern_operator::membership`)
//! take the steps; the test plays the StatefulSet, starting a member's
//! process when the plan says its pod starts and stopping it (data and
//! all) when the plan says its pod goes. Every step is taken by a fresh
//! "operator" that knows only what etcd reports, which is what an operator
//! killed in the middle of a change, or its standby taking over, sees.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tern_e2e::etcd::register_client;
use tern_local::etcd_cluster::{EtcdCluster, Tuning};
use tern_operator::membership::{self, Progress, Step};
use tern_verify::{History, Outcome, Request};

const GROUP: &str = "members";
const KEYS: [&str; 8] = ["/m/k0", "/m/k1", "/m/k2", "/m/k3", "/m/k4", "/m/k5", "/m/k6", "/m/k7"];

/// What the "StatefulSet" runs: members `0..pods`.
struct Pods {
    etcd: EtcdCluster,
    pods: i32,
}

impl Pods {
    fn peer_url(&self) -> impl Fn(i32) -> String + '_ {
        |o| {
            self.etcd
                .members
                .get(o as usize)
                .map(|m| m.peer_url.clone())
                .unwrap_or_default()
        }
    }

    fn endpoints(&self) -> Vec<String> {
        self.etcd.endpoints()[..self.pods as usize].to_vec()
    }
}

/// Takes steps until the group is steady at `desired` members, retrying
/// what fails as the operator's next reconcile would; returns the steps
/// (a promote that had to wait shows once).
async fn resize(p: &mut Pods, desired: i32) -> Vec<Step> {
    resize_at_most(p, desired, usize::MAX).await
}

/// Like `resize`, but stops after `limit` steps have been carried out, as
/// an operator killed there would.
async fn resize_at_most(p: &mut Pods, desired: i32, limit: usize) -> Vec<Step> {
    let mut taken = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(120);
    let mut done = 0;
    // What the operator would retry (its next reconcile, 2 s later): a
    // member slow to answer on a busy machine, a refusal etcd lifts.
    let mut retried = Vec::new();
    while done < limit {
        assert!(
            Instant::now() < give_up,
            "no steady group after {taken:?}; errors retried: {retried:#?}"
        );
        let observed = match membership::observe(&p.endpoints(), None).await {
            Ok(m) => m,
            Err(e) => {
                retried.push(format!("observing: {e}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let step = membership::plan(&observed, p.pods, desired, p.peer_url()).expect("a plan");
        if taken.last() != Some(&step) {
            taken.push(step.clone());
        }
        match &step {
            Step::Steady => return taken,
            Step::StartPod { replicas } => {
                let members = membership::initial_cluster(&observed, |o| format!("{GROUP}-{o}"), p.peer_url());
                let i = (*replicas - 1) as usize;
                tokio::task::block_in_place(|| p.etcd.join(i, &members)).expect("the new member starts");
                p.pods = *replicas;
                done += 1;
            }
            Step::StopPod { replicas } => {
                for i in *replicas..p.pods {
                    p.etcd.retire(i as usize);
                }
                p.pods = *replicas;
                done += 1;
            }
            _ => match membership::execute(&step, &observed, None).await {
                Ok(Progress::Done) => done += 1,
                Ok(Progress::Waiting(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) => {
                    eprintln!("membership: {step:?} failed, retried: {e}");
                    retried.push(format!("{step:?}: {e}"));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            },
        }
    }
    taken
}

/// Judges the clients' history against what etcd applied (no violation,
/// nothing left unknown), and checks that the checker is not blind to it:
/// one acknowledged write missing from what etcd applied is reported.
/// Returns the acknowledged writes and the keys judged.
async fn judged(history: &History, endpoints: &[String]) -> (usize, usize) {
    let acknowledged = history
        .records
        .iter()
        .filter(|r| r.request.writes() && matches!(r.outcome, Outcome::Ok { .. }))
        .count();
    assert!(
        acknowledged > 50,
        "too few acknowledged writes to judge: {acknowledged}"
    );
    let applied = tern_e2e::etcd::applied(endpoints, "/m/").await;
    let report = tern_verify::judge(history, Some(&applied), Duration::from_secs(20));
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert!(
        report.unknown.is_empty(),
        "the checker ran out of time on {:?}",
        report.unknown
    );
    // The checker is not blind to this history: one acknowledged write
    // missing from what etcd applied is reported.
    let acked = history
        .records
        .iter()
        .find_map(|r| match (&r.request, &r.outcome) {
            (Request::Put { value }, Outcome::Ok { .. }) => Some((r.key.clone(), value.clone())),
            _ => None,
        })
        .expect("an acknowledged put");
    let mut lost = applied.clone();
    lost.get_mut(&acked.0).expect("its key").retain(|v| *v != acked.1);
    let blind = tern_verify::judge(history, Some(&lost), Duration::from_secs(20));
    assert!(
        blind.violations.iter().any(|v| v.key == acked.0),
        "a lost write went unnoticed: {:#?}",
        blind.violations
    );
    (acknowledged, report.keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_grows_to_five_and_shrinks_to_three_without_losing_a_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut etcd = EtcdCluster::start(dir.path(), GROUP, 3, Tuning::default()).expect("etcd starts");
    // The two members a grow adds: their addresses, nothing started yet.
    etcd.reserve_member();
    etcd.reserve_member();
    let mut p = Pods { etcd, pods: 3 };

    // Clients use the three members that stay throughout.
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|id| tokio::spawn(register_client(id, p.endpoints(), &KEYS, start, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // An operator killed right after adding a learner, and the spec taken
    // back to three meanwhile: the next one removes the learner, whose pod
    // never started.
    let interrupted = resize_at_most(&mut p, 5, 1).await;
    assert!(
        matches!(interrupted[..], [Step::AddLearner { ordinal: 3, .. }]),
        "{interrupted:?}"
    );
    let back = resize(&mut p, 3).await;
    assert!(
        matches!(back[..], [Step::Remove { ordinal: 3, .. }, Step::Steady]),
        "{back:?}"
    );

    let grow = resize(&mut p, 5).await;
    let started = |o| Step::StartPod { replicas: o + 1 };
    let adds: Vec<_> = grow
        .iter()
        .filter(|s| {
            matches!(
                s,
                Step::AddLearner { .. } | Step::StartPod { .. } | Step::Promote { .. }
            )
        })
        .cloned()
        .collect();
    assert_eq!(adds.len(), 6, "add, start, promote twice: {grow:?}");
    assert!(matches!(adds[0], Step::AddLearner { ordinal: 3, .. }), "{grow:?}");
    assert_eq!(adds[1], started(3));
    assert!(matches!(adds[2], Step::Promote { ordinal: 3, .. }), "{grow:?}");
    assert!(matches!(adds[3], Step::AddLearner { ordinal: 4, .. }), "{grow:?}");
    assert_eq!(adds[4], started(4));
    let five = membership::observe(&p.endpoints(), None).await.expect("observe");
    assert_eq!(five.members.len(), 5);
    assert!(five.members.iter().all(|m| !m.learner), "{five:?}");

    // The member to be removed first leads: the shrink hands leadership
    // away before it removes it.
    p.etcd.move_leader(4).await.expect("leadership moves to member 4");
    let shrink = resize(&mut p, 3).await;
    assert!(matches!(shrink[0], Step::MoveLeader { .. }), "{shrink:?}");
    let removes: Vec<_> = shrink
        .iter()
        .filter(|s| matches!(s, Step::Remove { .. } | Step::StopPod { .. }))
        .cloned()
        .collect();
    assert!(matches!(removes[0], Step::Remove { ordinal: 4, .. }), "{shrink:?}");
    assert_eq!(removes[1], Step::StopPod { replicas: 4 });
    assert!(matches!(removes[2], Step::Remove { ordinal: 3, .. }), "{shrink:?}");
    assert_eq!(removes[3], Step::StopPod { replicas: 3 });
    let three = membership::observe(&p.endpoints(), None).await.expect("observe");
    assert_eq!(three.members.len(), 3, "{three:?}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut history = History::default();
    for c in clients {
        history.records.extend(c.await.expect("client task"));
    }
    let (acknowledged, keys) = judged(&history, &p.endpoints()).await;
    eprintln!(
        "membership: grow {grow:?}\n shrink {shrink:?}\n {} operations, {acknowledged} acknowledged writes, {} keys linearizable",
        history.records.len(),
        keys
    );
}

/// A member whose volume is lost (its process killed, its data deleted)
/// cannot come back on an empty volume while etcd counts it. The
/// operator's replacement steps (`membership::plan_replacement`) remove it
/// from Raft, clear its volume (it started on it as the old member), add
/// it back at its address as a learner, restart it to join, and promote it
/// once caught up, while clients keep writing through the
/// two members that stay; the checker judges their history against what
/// the replaced member serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_volume_is_lost_is_replaced_without_losing_a_write() {
    replace_lost_member(Ordinals::Group).await;
}

/// The same for a member of a directory share: the share's own member
/// (ordinal 0) is lost, and the directory's other members, run by other
/// regions' operators, are known by the ordinals from `OTHERS_FROM` that
/// `replace::step` gives them. They count for the quorum, are never
/// restarted, and the membership the replaced member joins names them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_members_lost_volume_is_replaced_without_losing_a_write() {
    replace_lost_member(Ordinals::DirectoryShare).await;
}

/// How the planner's ordinals map to the test's members (their index).
#[derive(Clone, Copy)]
enum Ordinals {
    /// A data group: ordinal i is member i; member 1 is lost.
    Group,
    /// A directory share running member 1 as its ordinal 0, the other
    /// shares' members 0 and 2 at `OTHERS_FROM` and `OTHERS_FROM + 1`.
    DirectoryShare,
}

impl Ordinals {
    fn member(self, o: i32) -> Option<usize> {
        match self {
            Self::Group => (0..3).contains(&o).then_some(o as usize),
            Self::DirectoryShare => match o {
                0 => Some(1),
                _ if o == membership::OTHERS_FROM => Some(0),
                _ if o == membership::OTHERS_FROM + 1 => Some(2),
                _ => None,
            },
        }
    }

    /// The ordinal of the lost member (member 1).
    fn lost(self) -> i32 {
        match self {
            Self::Group => 1,
            Self::DirectoryShare => 0,
        }
    }
}

async fn replace_lost_member(ordinals: Ordinals) {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = EtcdCluster::start(dir.path(), GROUP, 3, Tuning::default()).expect("etcd starts");
    let p = Pods { etcd, pods: 3 };
    let peer_url = |p: &Pods| {
        let urls: Vec<String> = p.etcd.members.iter().map(|m| m.peer_url.clone()).collect();
        move |o: i32| ordinals.member(o).map(|i| urls[i].clone()).unwrap_or_default()
    };
    let name_of = |o: i32| ordinals.member(o).map(|i| format!("{GROUP}-{i}")).unwrap_or_default();
    let lost = ordinals.lost();
    let stay: Vec<String> = [0, 2].iter().map(|i| p.etcd.endpoints()[*i].clone()).collect();
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|id| tokio::spawn(register_client(id, stay.clone(), &KEYS, start, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = membership::observe(&stay, None).await.expect("observe");
    let old_id = before
        .members
        .iter()
        .find(|m| m.name == format!("{GROUP}-1"))
        .expect("member 1")
        .id;

    // Member 1, the leader, and its volume are lost: the replacement
    // waits for the others to elect another. Its pod starts again on the
    // empty volume before the operator acts, told `existing`: etcd takes
    // the old id with an empty log and writes it to the volume (then the
    // leader's next append makes it give up, or it catches up: either way
    // it is removed, and its volume cleared before it is added back).
    let mut p = p;
    p.etcd.move_leader(1).await.expect("leadership moves to member 1");
    p.etcd.retire(1);
    let members = membership::initial_cluster(&before, name_of, peer_url(&p));
    let early = tokio::task::block_in_place(|| p.etcd.join(1, &members));
    eprintln!("membership: member 1 started on its empty volume as the old member: {early:?}");
    let mut removed: Option<u64> = None;
    let mut cleared = false;
    let mut restarted = false;
    let mut taken: Vec<Step> = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < give_up, "not replaced after {taken:?}");
        let observed = match membership::observe(&stay, None).await {
            Ok(m) => m,
            Err(e) => {
                eprintln!("membership: observing: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let step = match membership::plan_replacement(&observed, lost, removed, cleared, restarted, peer_url(&p)) {
            Ok(step) => step,
            // The others still name the lost member their leader.
            Err(e) => {
                eprintln!("membership: replacement waits: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if taken.last() != Some(&step) {
            taken.push(step.clone());
        }
        match &step {
            Step::Steady => break,
            Step::ClearVolume { ordinal } => {
                let i = ordinals.member(*ordinal).expect("a member");
                p.etcd.retire(i);
                // A pod that starts on the new volume before the member is
                // added back, told the membership with itself, writes
                // nothing: etcd stops at the unequal membership.
                let early = tokio::task::block_in_place(|| p.etcd.join(i, &members));
                assert!(early.is_err(), "a removed member started: {early:?}");
                assert!(
                    !p.etcd.data_dir(i).join("member").join("wal").exists(),
                    "a removed member's start wrote a log to its new volume"
                );
                p.etcd.retire(i);
                cleared = true;
            }
            Step::RestartPod { ordinal } => {
                let members = membership::initial_cluster(&observed, name_of, peer_url(&p));
                assert_eq!(members.len(), 3, "the membership names every member: {members:?}");
                let i = ordinals.member(*ordinal).expect("a member");
                tokio::task::block_in_place(|| p.etcd.join(i, &members)).expect("the replaced member starts");
                restarted = true;
            }
            _ => {
                // What the operator records before it changes etcd.
                match &step {
                    Step::Remove { id, .. } => removed = Some(*id),
                    Step::AddLearner { .. } => _ = removed.get_or_insert(0),
                    _ => {}
                }
                match membership::execute_replacement(&step, &observed, None).await {
                    Ok(Progress::Done) => {}
                    Ok(Progress::Waiting(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
                    Err(e) => {
                        eprintln!("membership: {step:?} failed, retried: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }
    let kinds: Vec<&str> = taken
        .iter()
        .map(|s| match s {
            Step::Remove { .. } => "remove",
            Step::ClearVolume { .. } => "clear",
            Step::AddLearner { .. } => "add",
            Step::RestartPod { .. } => "restart",
            Step::Promote { .. } => "promote",
            Step::Steady => "steady",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        ["remove", "clear", "add", "restart", "promote", "steady"],
        "{taken:?}"
    );
    let after = membership::observe(&p.etcd.endpoints(), None).await.expect("observe");
    let replaced = after
        .members
        .iter()
        .find(|m| m.name == format!("{GROUP}-1"))
        .expect("member 1 is back");
    assert!(!replaced.learner && replaced.id != old_id, "{after:?}");
    assert_eq!(after.members.iter().filter(|m| !m.learner).count(), 3, "{after:?}");
    // The operator keeps a member whose claim is new if it serves, caught
    // up, as itself: the replaced member does, as its new id only.
    let url = p.etcd.endpoints()[1].clone();
    assert!(membership::serves(&url, replaced.id, &stay, None).await);
    assert!(!membership::serves(&url, old_id, &stay, None).await);

    // Writes on the group of three again, enough to judge.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut history = History::default();
    for c in clients {
        history.records.extend(c.await.expect("client task"));
    }
    // Judged through the replaced member too: it holds what was applied.
    let (acknowledged, keys) = judged(&history, &p.etcd.endpoints()[1..2]).await;
    eprintln!(
        "membership: replaced member 1 by {taken:?}; {} operations, {acknowledged} acknowledged writes, {keys} keys linearizable",
        history.records.len()
    );
}

/// A group of one whose volume is lost: once the operator has recorded
/// the group's membership, the ConfigMap tells a member that starts empty
/// to join the cluster it had (`existing`). etcd then refuses to start it
/// (no other member to fetch the cluster from), so the group fails closed
/// rather than bootstrapping a second, empty cluster under its name and
/// serving it; `replace::too_small` holds the region meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_one_that_loses_its_volume_does_not_start_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = EtcdCluster::start(dir.path(), GROUP, 1, Tuning::default()).expect("etcd starts");
    let mut p = Pods { etcd, pods: 1 };
    let mut c = p.etcd.connect().await.expect("client");
    c.put("/m/k0", "acknowledged", None).await.expect("put");
    let observed = membership::observe(&p.endpoints(), None).await.expect("observe");
    let members = membership::initial_cluster(&observed, |o| format!("{GROUP}-{o}"), p.peer_url());
    assert_eq!(members.len(), 1, "{members:?}");

    p.etcd.retire(0);
    let started = tokio::task::block_in_place(|| p.etcd.join(0, &members));
    let why = format!(
        "{:?}",
        started.expect_err("an empty member told `existing` must not start")
    );
    assert!(
        why.contains("could not retrieve cluster information") || why.contains("cannot fetch cluster info"),
        "etcd refused for another reason: {why}"
    );
    // Nothing answers under the group's name.
    let answered = tokio::time::timeout(Duration::from_secs(3), async {
        let mut c = p.etcd.connect().await.ok()?;
        c.get("/m/k0", None).await.ok()
    })
    .await
    .ok()
    .flatten();
    assert!(answered.is_none(), "an empty group answered: {answered:?}");
}
