//! Backups and restores against real etcd: three clients read and write a
//! region's group while `tern backup now` streams a snapshot; the group
//! then loses every member and its data, each member is rebuilt with
//! `tern restore`, and the restore checker compares the restored group with
//! what the clients were told and what the lost group applied: exactly its
//! state at the backup's revision, every write acknowledged before the
//! backup began, and the later ones listed as the loss.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions, WatchOptions};
use tern_e2e::etcd::{put_history_at, register_client};
use tern_local::etcd_cluster::{EtcdCluster, Tuning};
use tern_verify::History;
use tern_verify::restore::AppliedWrite;

const GROUP: &str = "eu-west";
const KEYS: [&str; 8] = ["/b/k0", "/b/k1", "/b/k2", "/b/k3", "/b/k4", "/b/k5", "/b/k6", "/b/k7"];
const BUMP: i64 = 1_000_000_000;

async fn tern(args: &[&str]) -> Result<(), String> {
    tern_cli::run_args(std::iter::once("tern").chain(args.iter().copied()))
        .await
        .map_err(|e| e.to_string())
}

async fn revision(c: &mut Client) -> i64 {
    c.get("/b/", None)
        .await
        .expect("read")
        .header()
        .map(|h| h.revision())
        .expect("a header")
}

/// One region with its agent, restarted to back up into `dir` with these
/// schedule flags.
async fn backing_up(dir: &std::path::Path, flags: &[&str]) -> tern_local::LocalDeployment {
    use tern_local::{Layout, LocalDeployment};
    tern_e2e::init_logs();
    let mut d = LocalDeployment::start(Layout {
        agents: true,
        ..Layout::one_region("us-east")
    })
    .await
    .expect("deployment starts");
    let mut agent_flags = vec![format!("--backup-dir={}", dir.display())];
    agent_flags.extend(flags.iter().map(|f| f.to_string()));
    d.restart_with_flags("us-east", &[], &agent_flags)
        .await
        .expect("the agent restarts with a backup schedule");
    d
}

/// What three clients did to a group at `endpoints` around a backup, and
/// what the group applied (its put history under /b/).
struct Written {
    history: History,
    applied: Vec<AppliedWrite>,
    /// When `backup` began, on the history's clock.
    began_us: u64,
}

/// Three clients read, write and compare-and-set the group until its
/// revision passes 40; `backup` runs; they go on for 20 revisions more
/// (what the restore loses), `after` runs, and they stop. Counted in
/// revisions (each write is one), not in time, so a slow machine makes the
/// test slower, not weaker.
async fn written_around_a_backup(
    endpoints: &[String],
    backup: impl AsyncFnOnce(),
    after: impl AsyncFnOnce(),
) -> Written {
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|id| tokio::spawn(register_client(id, endpoints.to_vec(), &KEYS, start, stop.clone())))
        .collect();
    let mut probe = Client::connect(endpoints, None).await.expect("connect");
    let at_least = async |c: &mut Client, n: i64| {
        let until = Instant::now() + Duration::from_secs(60);
        while revision(c).await < n {
            assert!(Instant::now() < until, "the clients did not reach revision {n} in 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    at_least(&mut probe, 40).await;
    let began_us = start.elapsed().as_micros() as u64;
    backup().await;
    let after_backup = revision(&mut probe).await;
    at_least(&mut probe, after_backup + 20).await;
    after().await;
    drop(probe);
    stop.store(true, Ordering::Relaxed);
    let mut history = History::default();
    for c in clients {
        history.records.extend(c.await.expect("client task"));
    }
    let mut c = Client::connect(endpoints, None).await.expect("connect");
    let applied = put_history_at(&mut c, "/b/")
        .await
        .into_iter()
        .map(|(key, value, revision)| AppliedWrite { key, value, revision })
        .collect();
    Written {
        history,
        applied,
        began_us,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_restored_from_a_backup_holds_everything_acknowledged_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backups = dir.path().join("backups");
    let backups_arg = backups.display().to_string();
    let mut etcd = EtcdCluster::start(dir.path(), GROUP, 3, Tuning::default()).expect("etcd starts");
    let endpoints = etcd.endpoints();
    let group_arg = endpoints.join(",");

    let Written {
        history,
        applied,
        began_us,
    } = written_around_a_backup(
        &endpoints,
        async || {
            tern(&["backup", "now", GROUP, "--group", &group_arg, "--to", &backups_arg])
                .await
                .expect("tern backup now")
        },
        async || {},
    )
    .await;
    let mut c = Client::connect(&endpoints, None).await.expect("connect");
    // The run itself was sound before anything was lost.
    let mut by_key = tern_verify::applied::Applied::new();
    for w in &applied {
        by_key.entry(w.key.clone()).or_default().push(w.value.clone());
    }
    let judged = tern_verify::judge(&history, Some(&by_key), Duration::from_secs(20));
    assert!(judged.violations.is_empty(), "{:#?}", judged.violations);
    let lost_group_revision = revision(&mut c).await;
    drop(c);

    let backup = tern_common::backup::list(&backups, GROUP)
        .expect("list")
        .pop()
        .expect("the backup is listed");
    assert!(backup.revision_min <= backup.revision_max, "{backup:?}");

    // Every member and its volume lost.
    for i in 0..3 {
        etcd.kill(i);
        std::fs::remove_dir_all(etcd.data_dir(i)).expect("data removed");
    }
    let initial = etcd
        .members
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer_url))
        .collect::<Vec<_>>()
        .join(",");

    // Refusals first: a name not in the cluster, an unknown backup, a data
    // directory in use.
    let data0 = etcd.data_dir(0).display().to_string();
    let restore = async |name: &str, data: &str, backup: Option<&str>| {
        let mut args = vec![
            "restore",
            GROUP,
            "--from",
            &backups_arg,
            "--name",
            name,
            "--data-dir",
            data,
            "--initial-cluster",
            &initial,
        ];
        if let Some(id) = backup {
            args.extend(["--backup", id]);
        }
        tern(&args).await
    };
    let e = restore("stranger", &data0, None)
        .await
        .expect_err("a stranger is refused");
    assert!(e.contains("--name stranger") && e.contains("not a member"), "{e}");
    let e = restore("eu-west-0", &data0, Some("eu-west-nope"))
        .await
        .expect_err("an unknown backup is refused");
    assert!(e.contains("eu-west-nope") && e.contains(&backup.id), "{e}");
    std::fs::create_dir_all(etcd.data_dir(0)).expect("mkdir");
    std::fs::write(etcd.data_dir(0).join("stray"), b"x").expect("a stray file");
    let e = restore("eu-west-0", &data0, None)
        .await
        .expect_err("a used data directory is refused");
    assert!(e.contains("--data-dir") && e.contains("not empty"), "{e}");
    std::fs::remove_dir_all(etcd.data_dir(0)).expect("cleared");

    for i in 0..3 {
        let name = etcd.members[i].name.clone();
        let data = etcd.data_dir(i).display().to_string();
        restore(&name, &data, Some(&backup.id)).await.expect("tern restore");
    }
    etcd.restart_all().expect("the restored members start");

    let mut c = Client::connect(&endpoints, None).await.expect("connect");
    let now = revision(&mut c).await;
    assert!(
        now > lost_group_revision + BUMP / 2,
        "revisions restart above the lost group's {lost_group_revision}: {now}"
    );
    let restored_revision = now - BUMP;
    assert!(
        (backup.revision_min..=backup.revision_max).contains(&restored_revision),
        "the snapshot's revision {restored_revision} is within the manifest's bounds {backup:?}"
    );
    let restored: BTreeMap<String, String> = c
        .get("/b/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("read the restored keys")
        .kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
            )
        })
        .collect();
    let report = tern_verify::restore::check(&history, &applied, restored_revision, began_us, &restored);
    assert!(report.violations.is_empty(), "{:#?}", report.violations);
    assert!(
        report.kept > 20,
        "too few writes before the backup to judge: {}",
        report.kept
    );
    assert!(
        !report.lost.is_empty(),
        "the clients wrote for a second after the backup: those writes are the loss"
    );

    // A watcher of the lost group (a mirror in another region) resumes
    // after the last revision it saw and is told the history is gone,
    // rather than waiting for revisions the restored group reuses.
    let mut stream = c
        .watch(
            "/b/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(lost_group_revision + 1),
            ),
        )
        .await
        .expect("watch");
    // The first answer confirms the watch; the next one cancels it.
    let told = loop {
        let m = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the watch answers")
            .expect("watch")
            .expect("a message");
        if !(m.created() && m.events().is_empty() && !m.canceled() && m.compact_revision() == 0) {
            break m;
        }
    };
    assert!(
        told.compact_revision() > 0 && told.events().is_empty(),
        "a watch from the lost group's revision {} is told it was compacted: {told:?}",
        lost_group_revision + 1
    );

    // The restored group takes writes.
    c.put("/b/after", "restored", None)
        .await
        .expect("a write after the restore");

    // The checker is not blind: one key missing from the restore is
    // reported.
    let mut short = restored.clone();
    let gone = short.keys().next().cloned().expect("a restored key");
    short.remove(&gone);
    let blind = tern_verify::restore::check(&history, &applied, restored_revision, began_us, &short);
    assert!(
        blind.violations.iter().any(|v| v.key == gone),
        "a key lost in the restore went unnoticed: {:#?}",
        blind.violations
    );
    eprintln!(
        "backup: {} operations; backup {} ({} bytes) at revision {restored_revision}; {} acknowledged writes kept, {} lost after it (reported)",
        history.records.len(),
        backup.id,
        backup.size_bytes,
        report.kept,
        report.lost.len()
    );
}

/// The region agent's schedule: while it leads, a backup of its group (and
/// of the directory's, when asked) every `--backup-every`, the newest
/// `--backup-keep` kept, in the format `tern backup list` and `tern
/// restore` read.
/// A directory restored whole, the way the operator restores it: each
/// region's share of its members from the same backup, separately (in
/// Kubernetes, by each cluster's operator), with the arguments of the
/// operator's restore Jobs (`build::restore::etcdutl_args`). The shares
/// restored first serve as soon as they are a majority; a share restored
/// from another backup of the same directory is refused by them (the
/// token names the backup), rather than joining with other data at the
/// same Raft index; restored again from the right backup, it joins. The
/// restore checker then compares what every member serves with the
/// clients' history and the lost directory's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_shares_restored_separately_from_one_backup_form_one_directory() {
    use tern_crds::{ClusterMember, GroupRole};
    use tern_operator::build::restore::{etcdutl_args, restore_token};
    const DIRECTORY: &str = "directory";
    const TOKEN: &str = "tern-default-whole-directory";
    let dir = tempfile::tempdir().expect("tempdir");
    let backups = dir.path().join("backups");
    let backups_arg = backups.display().to_string();
    let mut etcd = EtcdCluster::start(dir.path(), DIRECTORY, 3, Tuning::default()).expect("etcd starts");
    let endpoints = etcd.endpoints();
    let directory_arg = endpoints.join(",");

    let backup_now = async || {
        tern(&[
            "backup",
            "now",
            DIRECTORY,
            "--directory",
            &directory_arg,
            "--to",
            &backups_arg,
        ])
        .await
        .expect("tern backup now directory")
    };
    let Written {
        history,
        applied,
        began_us,
    } = written_around_a_backup(&endpoints, backup_now, async || {
        // A later backup of the same directory: the wrong one for a share.
        tokio::time::sleep(Duration::from_millis(5)).await;
        backup_now().await;
    })
    .await;
    let listed = tern_common::backup::list(&backups, DIRECTORY).expect("list");
    assert_eq!(listed.len(), 2, "{listed:?}");
    let (chosen, later) = (&listed[0], &listed[1]);
    assert!(chosen.id < later.id, "oldest first: {listed:?}");

    // Every member and its volume lost.
    for i in 0..3 {
        etcd.kill(i);
        std::fs::remove_dir_all(etcd.data_dir(i)).expect("data removed");
    }
    let cluster: Vec<ClusterMember> = etcd
        .members
        .iter()
        .map(|m| ClusterMember {
            name: m.name.clone(),
            peer_url: m.peer_url.clone(),
        })
        .collect();
    let etcdutl = tern_local::assets::binary("etcdutl").expect("the pinned etcdutl");
    let data_dirs: Vec<std::path::PathBuf> = (0..3).map(|i| etcd.data_dir(i)).collect();
    let restore = |i: usize, backup: &tern_common::backup::BackupManifest| {
        let snapshot = backup.snapshot_path(&tern_common::backup::group_dir(&backups, DIRECTORY));
        let args = etcdutl_args(
            &snapshot.display().to_string(),
            &cluster[i],
            &cluster,
            &restore_token(GroupRole::Directory, TOKEN, &backup.id),
            &data_dirs[i].display().to_string(),
        );
        let out = std::process::Command::new(&etcdutl)
            .args(&args)
            .output()
            .expect("etcdutl runs");
        assert!(
            out.status.success(),
            "etcdutl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // Two shares from the chosen backup, one from the later backup.
    restore(0, chosen);
    restore(1, chosen);
    restore(2, later);
    etcd.start_without_waiting(2).expect("member 2 starts");
    etcd.restart_all()
        .expect("the two members restored from the chosen backup serve");
    let read_alone = async |i: usize| {
        let mut c = Client::connect([endpoints[i].as_str()], None).await.ok()?;
        tokio::time::timeout(
            Duration::from_secs(3),
            c.get("/b/", Some(GetOptions::new().with_prefix())),
        )
        .await
        .ok()?
        .ok()
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        read_alone(2).await.is_none(),
        "a member restored from another backup does not serve with the others"
    );
    let mut c = Client::connect(&endpoints[..2], None).await.expect("connect");
    let members = c.member_list().await.expect("member list");
    assert_eq!(members.members().len(), 3, "the directory has its three members");

    // The wrong share restored again, from the chosen backup: it joins.
    etcd.kill(2);
    std::fs::remove_dir_all(etcd.data_dir(2)).expect("data removed");
    restore(2, chosen);
    etcd.restart(2).expect("member 2 joins");
    // What each member serves, alone, is the chosen backup's directory.
    let restored_revision = revision(&mut c).await - BUMP;
    assert!(
        (chosen.revision_min..=chosen.revision_max).contains(&restored_revision),
        "the snapshot's revision {restored_revision} is within the manifest's bounds {chosen:?}"
    );
    for i in 0..3 {
        let got = read_alone(i).await.unwrap_or_else(|| panic!("member {i} serves"));
        let restored: BTreeMap<String, String> = got
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect();
        let report = tern_verify::restore::check(&history, &applied, restored_revision, began_us, &restored);
        assert!(report.violations.is_empty(), "member {i}: {:#?}", report.violations);
        assert!(report.kept > 20, "too few writes before the backup: {}", report.kept);
        assert!(!report.lost.is_empty(), "writes after the backup are the loss");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_backs_up_on_schedule_and_keeps_the_newest() {
    let backups = tempfile::tempdir().expect("tempdir");
    let mut d = backing_up(
        backups.path(),
        &["--backup-every=1s", "--backup-keep=2", "--backup-directory-group"],
    )
    .await;
    let list = |group: &str| tern_common::backup::list(backups.path(), group).expect("list");
    let until = Instant::now() + Duration::from_secs(60);
    let first = loop {
        if let Some(m) = list("us-east").first() {
            break m.id.clone();
        }
        assert!(Instant::now() < until, "no backup of us-east within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let agent = d.region("us-east").agent.as_ref().expect("an agent").http_addr;
    let taken = async || {
        tern_local::http::metric(agent, "tern_agent_backups_total{group=\"us-east\",outcome=\"ok\"}")
            .await
            .unwrap_or(0.0)
    };
    // Backups keep coming, and the oldest go.
    loop {
        let ids: Vec<String> = list("us-east").into_iter().map(|m| m.id).collect();
        if taken().await >= 4.0 && !ids.contains(&first) {
            // Between a backup and its pruning there may be one more.
            assert!(ids.len() == 2 || ids.len() == 3, "{ids:?}");
            break;
        }
        assert!(
            Instant::now() < until,
            "within 60 s: {} backups taken, {ids:?} kept (the first was {first})",
            taken().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        tern_local::http::metric(agent, "tern_agent_last_backup_timestamp_seconds{group=\"us-east\"}")
            .await
            .is_some_and(|s| s > 1.7e9),
        "the newest backup's time is exported"
    );
    // Stopped, so that nothing is pruned while the kept backups are read.
    if let Some(a) = d.region_mut("us-east").agent.take() {
        a.stop().await;
    }
    let directory = list("directory");
    assert!(!directory.is_empty(), "the directory group is backed up too");
    for m in list("us-east").iter().chain(&directory) {
        tern_common::backup::verify(backups.path(), m).expect("every kept backup is whole");
    }
    tern(&["backup", "list", "--to", &backups.path().display().to_string()])
        .await
        .expect("tern backup list reads what the schedule wrote");
}

/// The operator's pre-upgrade backup, against a real agent and its group:
/// a backup asked for through the group (`tern_common::backup_request`) is
/// taken at once although the schedule has none due, it read after the
/// request (so it holds every write acknowledged before), it is recorded
/// in the group for whoever asked, and a request answered is not answered
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_takes_a_backup_asked_for_through_its_group() {
    use tern_common::backup_request::{self, Request};
    let backups = tempfile::tempdir().expect("tempdir");
    // Only the first backup is due on schedule during the test.
    let d = backing_up(backups.path(), &["--backup-every=1h", "--backup-keep=5"]).await;
    let list = || tern_common::backup::list(backups.path(), "us-east").expect("list");
    let mut group = d.region("us-east").group.connect().await.expect("the group");

    // The scheduled backup is recorded in the group too.
    let until = Instant::now() + Duration::from_secs(60);
    let first = loop {
        if let Ok((_, Some(last))) = backup_request::read(&mut group).await {
            break last;
        }
        assert!(Instant::now() < until, "no backup recorded within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        list().iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
        vec![first.id.clone()]
    );
    assert_eq!(
        backup_request::answer(&mut group, first.revision_min + 1)
            .await
            .expect("read"),
        None,
        "a backup read before a request does not answer it"
    );

    let written = group
        .put("/b/before-the-request", "acknowledged", None)
        .await
        .expect("a write")
        .header()
        .map(|h| h.revision())
        .expect("a header");
    let asked = backup_request::ask(
        &mut group,
        &Request {
            by: "the test".into(),
            reason: "an upgrade".into(),
            tag: "v2".into(),
        },
    )
    .await
    .expect("asked");
    assert!(asked > written);
    // Whoever asked finds its request again by its tag.
    let (request, _) = backup_request::read(&mut group).await.expect("read");
    assert_eq!(request.map(|(r, q)| (r, q.tag)), Some((asked, "v2".to_string())));
    let until = Instant::now() + Duration::from_secs(30);
    let taken = loop {
        if let Some(t) = backup_request::answer(&mut group, asked).await.expect("read") {
            break t;
        }
        assert!(
            Instant::now() < until,
            "the backup asked at revision {asked} was not taken within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ne!(taken.id, first.id);
    assert!(
        taken.revision_min >= asked,
        "the answer read after the request: {taken:?}, asked at {asked}"
    );
    let kept = list();
    let m = kept
        .iter()
        .find(|m| m.id == taken.id)
        .unwrap_or_else(|| panic!("the backup recorded is in the directory: {kept:?}"));
    assert_eq!(
        (m.revision_min, m.revision_max),
        (taken.revision_min, taken.revision_max)
    );
    tern_common::backup::verify(backups.path(), m).expect("the backup asked for is whole");

    // Answered: no more backups until the schedule's next (an hour away).
    tokio::time::sleep(tern_agent::backup::ASKED_POLL * 3).await;
    assert_eq!(
        list().len(),
        2,
        "one backup on schedule and one asked for: {:?}",
        list()
    );
}

/// The directory's pre-upgrade backup, against a real agent: asked for
/// through the directory itself, taken by the agent that backs the
/// directory up (`--backup-directory-group`) at once although its schedule
/// has none due, read after the request, and recorded in the directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_takes_a_directory_backup_asked_for_through_the_directory() {
    use tern_common::backup_request::{self, Request};
    let backups = tempfile::tempdir().expect("tempdir");
    let d = backing_up(
        backups.path(),
        &["--backup-every=1h", "--backup-keep=5", "--backup-directory-group"],
    )
    .await;
    let list = || tern_common::backup::list(backups.path(), "directory").expect("list");
    let mut directory = d.directory_client().await;
    // The scheduled backup of the directory is recorded in the directory.
    let until = Instant::now() + Duration::from_secs(60);
    let first = loop {
        if let Ok((_, Some(last))) = backup_request::read(&mut directory).await {
            break last;
        }
        assert!(Instant::now() < until, "no directory backup recorded within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(list().iter().any(|m| m.id == first.id), "{:?}", list());

    let asked = backup_request::ask(
        &mut directory,
        &Request {
            by: "the test".into(),
            reason: "an upgrade of the directory".into(),
            tag: "v2".into(),
        },
    )
    .await
    .expect("asked");
    let until = Instant::now() + Duration::from_secs(30);
    let taken = loop {
        if let Some(t) = backup_request::answer(&mut directory, asked).await.expect("read") {
            break t;
        }
        assert!(
            Instant::now() < until,
            "the directory backup asked at revision {asked} was not taken within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ne!(taken.id, first.id);
    assert!(taken.revision_min >= asked, "{taken:?}, asked at {asked}");
    let kept = list();
    let m = kept
        .iter()
        .find(|m| m.id == taken.id)
        .unwrap_or_else(|| panic!("the directory backup recorded is kept: {kept:?}"));
    tern_common::backup::verify(backups.path(), m).expect("the backup asked for is whole");
}

/// After a restore under a live directory, the operator makes the restored
/// group's fences agree with the directory (`tern_operator::fences`),
/// against real etcd: an account created since the backup is made writable
/// again, one that moved away since is fenced as moved (a router with the
/// old placement can no longer commit there), one whose fence predates its
/// latest stay is left for a person, one in a migration is left to it;
/// a second pass finds nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_groups_fences_are_made_to_agree_with_the_directory() {
    use tern_common::{AccountId, AccountRecord, AccountState, Epoch, Fence, RegionName, dir_account_key, fence_key};
    tern_e2e::init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    // Both in one directory: the harness names each member's files by its
    // group.
    let directory = EtcdCluster::start(dir.path(), "directory", 1, Tuning::default()).expect("etcd starts");
    let group = EtcdCluster::start(dir.path(), GROUP, 1, Tuning::default()).expect("etcd starts");
    let mut d = Client::connect(directory.endpoints(), None).await.expect("connect");
    let mut g = Client::connect(group.endpoints(), None).await.expect("connect");
    let region = |s: &str| RegionName::new(s).expect("region");
    let account = |s: &str| AccountId::new(s).expect("account");
    let home = |r: &str, epoch: u64, state: AccountState| AccountRecord {
        home: region(r),
        epoch: Epoch(epoch),
        state,
        allowed_regions: vec![],
        moved_ms: None,
        pinned: false,
    };
    // The directory now, and the group as the backup left it.
    let accounts = [
        (
            "kept",
            home(GROUP, 1, AccountState::Active),
            Some(Fence::active(Epoch(1))),
        ),
        ("created-since", home(GROUP, 1, AccountState::Active), None),
        (
            "left-since",
            home("us-east", 2, AccountState::Active),
            Some(Fence::active(Epoch(1))),
        ),
        (
            "here-since",
            home(GROUP, 3, AccountState::Active),
            Some(Fence::moved(Epoch(2), region("us-east"))),
        ),
        (
            "moving",
            home(
                GROUP,
                1,
                AccountState::Migrating {
                    target: region("us-east"),
                },
            ),
            Some(Fence::fenced(Epoch(1))),
        ),
    ];
    for (name, record, fence) in &accounts {
        let a = account(name);
        d.put(dir_account_key(&a), serde_json::to_vec(record).expect("json"), None)
            .await
            .expect("directory put");
        if let Some(f) = fence {
            g.put(fence_key(&a), f.to_string(), None).await.expect("group put");
        }
    }
    let plan = tern_operator::fences::reconcile(&region(GROUP), &mut d, &mut g)
        .await
        .expect("reconcile");
    let fence = async |g: &mut Client, name: &str| -> Option<String> {
        let r = g.get(fence_key(&account(name)), None).await.expect("read");
        r.kvs().first().map(|kv| kv.value_str().expect("utf-8").to_string())
    };
    assert_eq!(fence(&mut g, "kept").await.as_deref(), Some("1:active"));
    assert_eq!(fence(&mut g, "created-since").await.as_deref(), Some("1:active"));
    assert_eq!(fence(&mut g, "left-since").await.as_deref(), Some("1:moved:us-east"));
    assert_eq!(fence(&mut g, "here-since").await.as_deref(), Some("2:moved:us-east"));
    assert_eq!(fence(&mut g, "moving").await.as_deref(), Some("1:fenced"));
    let text = tern_operator::fences::describe(&plan);
    for name in ["created-since", "left-since", "here-since", "moving"] {
        assert!(text.contains(name), "{name} in {text}");
    }
    assert!(!text.contains("kept"), "{text}");
    // A router that still places left-since here at epoch 1 cannot commit:
    // its transaction compares the fence with "1:active".
    let stale = etcd_client::Txn::new()
        .when(vec![etcd_client::Compare::value(
            fence_key(&account("left-since")),
            etcd_client::CompareOp::Equal,
            "1:active",
        )])
        .and_then(vec![etcd_client::TxnOp::put("/tern/a/left-since/d/k", "stale", None)]);
    assert!(!g.txn(stale).await.expect("txn").succeeded());
    // Nothing left to do.
    let again = tern_operator::fences::reconcile(&region(GROUP), &mut d, &mut g)
        .await
        .expect("reconcile");
    assert!(again.repairs.is_empty(), "{again:?}");
}

/// A held region (`/tern/dir/holds/{region}`: the operator holds a region
/// restored from a backup until its fences agree with the directory)
/// commits nothing: a new leader of its agents claims no lease, so its
/// router refuses every write as retryable. Once the hold is lifted, the
/// agent claims the lease and writes commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_region_commits_nothing_until_the_hold_is_lifted() {
    use tern_api::pb;
    use tern_local::{Layout, LocalDeployment};
    tern_e2e::init_logs();
    let mut d = LocalDeployment::start(Layout {
        agents: true,
        ..Layout::one_region("us-east")
    })
    .await
    .expect("deployment starts");
    let mut c = d.client("us-east").await;
    c.create_account(pb::CreateAccountRequest {
        account: "held".into(),
        home_region: "us-east".into(),
        allowed_regions: vec![],
    })
    .await
    .expect("account");
    let put = |v: &str| pb::PutRequest {
        account: "held".into(),
        key: "k".into(),
        value: v.as_bytes().to_vec(),
        idempotency_key: String::new(),
    };
    c.put(put("before")).await.expect("a write before the hold");

    // The hold, then a new leader of the region's agents, as after a
    // restore (the old one's lease ran out with its group).
    let mut dir = d.directory_client().await;
    let hold = tern_common::RegionHold {
        by: "the test".into(),
        reason: "restoring".into(),
        since_ms: tern_common::unix_ms(),
    };
    dir.put(
        "/tern/dir/holds/us-east",
        serde_json::to_vec(&hold).expect("json"),
        None,
    )
    .await
    .expect("hold");
    d.region_mut("us-east").agent.take().expect("agent").stop().await;
    let agent = d
        .start_agent("us-east", &["--identity=us-east-agent-held".to_string()])
        .await
        .expect("agent");
    d.region_mut("us-east").agent = Some(agent);
    // The old leader's lease runs out; from then on nothing commits.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c.put(put("while-held")).await {
            Err(s) if s.code() == tonic::Code::Unavailable => break,
            other => assert!(
                Instant::now() < deadline,
                "writes still commit in a held region: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        match c.put(put("while-held")).await {
            Ok(_) => panic!("a write committed in a held region after its lease ran out"),
            Err(s) => assert_eq!(s.code(), tonic::Code::Unavailable, "{s}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    dir.delete("/tern/dir/holds/us-east", None)
        .await
        .expect("lift the hold");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.put(put("after")).await {
            Ok(_) => break,
            Err(s) => assert!(
                Instant::now() < deadline,
                "no write commits after the hold is lifted: {s}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
