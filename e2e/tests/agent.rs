//! Region agents against real etcd groups with toxiproxy on the mirror
//! links: mirrors that end identical to their source after cuts, kills,
//! compaction, huge transactions and backlogs; one active agent per region,
//! a deposed one refused, leadership kept through a rolling restart of its
//! own group. The lag the agents measure is tested in tests/lag.rs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use tern_e2e::mirrors::{caught_up, create_eu_account, start, start_with, wait_for, write_stream};
use tern_local::{Layout, LocalDeployment};

/// Keys, versions and value lengths of eu-west's account keys and of
/// us-east's mirror of them, read without values (a range of a large region
/// would pass gRPC's 4 MiB message limit): equal when the mirror matches.
async fn key_versions(d: &LocalDeployment) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
    let mut source = d.group_client("eu-west").await;
    let mut local = d.group_client("us-east").await;
    let keys_only = || Some(GetOptions::new().with_prefix().with_keys_only());
    let src = source.get("/tern/a/", keys_only()).await.expect("source keys");
    let mir = local
        .get("/tern/r/eu-west/tern/a/", keys_only())
        .await
        .expect("mirror keys");
    let collect = |kvs: &[etcd_client::KeyValue], strip: &str| {
        kvs.iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).trim_start_matches(strip).to_string();
                (key, kv.version())
            })
            .collect::<BTreeMap<_, _>>()
    };
    (collect(src.kvs(), ""), collect(mir.kvs(), "/tern/r/eu-west"))
}

/// The creation revision of us-east's election key: one per leadership term.
async fn election_term(d: &LocalDeployment) -> Option<i64> {
    let mut c = d.group_client("us-east").await;
    let keys = c
        .get("/tern/agent/us-east/leader", Some(GetOptions::new().with_prefix()))
        .await
        .ok()?;
    keys.kvs().first().map(|kv| kv.create_revision())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_resumes_without_gaps_or_duplicates() {
    let mut d = start().await;
    create_eu_account(&d, "acct-1").await;
    // The first agent has synchronised: the restart below resumes from its
    // applied record rather than copying a snapshot.
    caught_up(&d, true).await;
    let agent = d.region_mut("us-east").agent.take().expect("agent");
    let killer = async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        agent.kill();
    };
    // The stream goes on while the agent is dead.
    tokio::join!(write_stream(&d, "acct-1", 100, Duration::from_millis(15)), killer);
    let restarted = d
        .start_agent("us-east", &["--identity=us-east-agent-b".to_string()])
        .await
        .expect("restart");
    d.region_mut("us-east").agent = Some(restarted);
    // Versions equal too: a revision applied twice would bump a mirrored
    // key's version past its source's.
    caught_up(&d, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_down_is_resynchronised() {
    let mut d = start().await;
    create_eu_account(&d, "acct-1").await;
    write_stream(&d, "acct-1", 10, Duration::from_millis(5)).await;
    caught_up(&d, true).await;
    d.region_mut("us-east").agent.take().expect("agent").stop().await;
    write_stream(&d, "acct-1", 60, Duration::ZERO).await;
    let mut source = d.group_client("eu-west").await;
    let revision = source
        .get("/", None)
        .await
        .expect("header")
        .header()
        .expect("header")
        .revision();
    source.compact(revision, None).await.expect("compact the source");
    let agent = d
        .start_agent("us-east", &["--identity=us-east-agent-b".to_string()])
        .await
        .expect("restart");
    caught_up(&d, false).await;
    let resyncs = agent
        .metric("tern_agent_mirror_resyncs_total{source=\"eu-west\"}")
        .await;
    assert_eq!(resyncs, Some(1.0), "the resync is reported");
    d.region_mut("us-east").agent = Some(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_acts_and_a_paused_leader_is_refused() {
    let d = start().await;
    let a = d.region("us-east").agent.as_ref().expect("agent a");
    let b = d
        .start_agent("us-east", &["--identity=us-east-agent-b".to_string()])
        .await
        .expect("agent b");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(a.metric("tern_agent_is_leader").await, Some(1.0));
    assert_eq!(
        b.metric("tern_agent_is_leader").await,
        Some(0.0),
        "the standby must not act"
    );
    assert_eq!(b.metric("tern_agent_heartbeats_total").await.unwrap_or(0.0), 0.0);

    // Pause the leader like SIGSTOP: its lease expires and b takes over
    // within the election TTL (2 s here).
    a.freeze(true);
    let paused_at = Instant::now();
    wait_for("b to lead", Duration::from_secs(8), async || {
        (b.metric("tern_agent_is_leader").await? == 1.0).then_some(())
    })
    .await;
    let takeover = paused_at.elapsed();
    assert!(takeover < Duration::from_secs(6), "takeover took {takeover:?}");

    // The old leader wakes up and tries to go on: refused.
    a.freeze(false);
    wait_for("a's stale write to be refused", Duration::from_secs(5), async || {
        (a.metric("tern_agent_refused_writes_total").await? >= 1.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut group = d.group_client("us-east").await;
    let hb = group.get("/tern/hb/us-east", None).await.expect("heartbeat");
    let value = String::from_utf8_lossy(hb.kvs()[0].value()).to_string();
    assert!(value.contains("us-east-agent-b"), "the heartbeat is b's: {value}");
    let dir = d.directory_client().await;
    wait_for(
        "b to hold the region's directory lease",
        Duration::from_secs(5),
        async || {
            let lease = dir.clone().get("/tern/dir/leases/us-east", None).await.ok()?;
            let holder = String::from_utf8_lossy(lease.kvs().first()?.value()).to_string();
            holder.contains("us-east-agent-b").then_some(())
        },
    )
    .await;
    b.stop().await;
}

/// The directory's record of a region is written only by the agent that
/// holds the region's lease key: a newer leader takes the key over at once
/// (while the deposed one's lease still lives), the deposed one's writes
/// are refused, an older leadership never takes the key back, and a key
/// whose lease lapsed is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_agents_directory_writes_are_refused() {
    use tern_agent::AgentError;
    use tern_agent::publish::{claim, write_record};

    tern_e2e::init_logs();
    let d = LocalDeployment::start(Layout::one_region("us-east"))
        .await
        .expect("deployment starts");
    let mut dir = d.directory_client().await;
    let region = tern_common::RegionName::new("us-east").expect("region name");
    let endpoint = async |dir: &mut etcd_client::Client| {
        let got = dir
            .get(tern_common::dir_region_key(&region), None)
            .await
            .expect("read the record");
        let record: tern_common::RegionRecord = serde_json::from_slice(got.kvs()[0].value()).expect("a region record");
        record.router_endpoint
    };
    let lease = async |dir: &mut etcd_client::Client| dir.lease_grant(30, None).await.expect("lease").id();

    let a_lease = lease(&mut dir).await;
    let a = claim(&mut dir, &region, "agent-a", 10, a_lease)
        .await
        .expect("a claims the free key");
    write_record(&mut dir, &region, &a, |r| r.router_endpoint = "a".into())
        .await
        .expect("a writes");

    let b_lease = lease(&mut dir).await;
    let b = claim(&mut dir, &region, "agent-b", 20, b_lease)
        .await
        .expect("b, a newer leader, takes the key over while a's lease lives");
    let refused = write_record(&mut dir, &region, &a, |r| r.router_endpoint = "stale".into())
        .await
        .expect_err("a is deposed");
    assert!(
        matches!(&refused, AgentError::DirectoryLeaseLost { holder: Some(h), leadership: 20, .. } if h == "agent-b"),
        "{refused}"
    );
    assert_eq!(endpoint(&mut dir).await, "a", "the refused write left the record alone");
    write_record(&mut dir, &region, &b, |r| r.router_endpoint = "b".into())
        .await
        .expect("b writes");
    let older = claim(&mut dir, &region, "agent-a", 10, a_lease)
        .await
        .expect_err("an older leadership never takes the key back");
    assert!(matches!(older, AgentError::DirectoryLeaseLost { .. }), "{older}");
    assert_eq!(endpoint(&mut dir).await, "b");

    // b's lease lapses (revoked here): its writes are refused with nobody
    // holding the key, and any leadership may claim it (a region group
    // recreated with its revisions starting again).
    dir.lease_revoke(b_lease).await.expect("revoke");
    let lapsed = write_record(&mut dir, &region, &b, |r| r.router_endpoint = "late".into())
        .await
        .expect_err("b's key is gone");
    assert!(
        matches!(lapsed, AgentError::DirectoryLeaseLost { holder: None, .. }),
        "{lapsed}"
    );
    let c_lease = lease(&mut dir).await;
    claim(&mut dir, &region, "agent-c", 5, c_lease)
        .await
        .expect("a free key is claimed whatever the revision");
    assert_eq!(endpoint(&mut dir).await, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_larger_than_a_transaction_do_not_wedge_the_mirror() {
    // etcd runs with --max-txn-ops=1024. A source transaction of 1,024 puts
    // is legal there, and a lease expiring takes 5,000 records in one
    // revision; a mirror that applied each source revision in one local
    // transaction (plus its applied record) could apply neither, ever.
    let d = start().await;
    create_eu_account(&d, "acct-1").await;
    caught_up(&d, true).await;
    let mut source = d.group_client("eu-west").await;
    let puts: Vec<etcd_client::TxnOp> = (0..1024)
        .map(|i| etcd_client::TxnOp::put(format!("/tern/a/acct-1/d/wide-{i:04}"), format!("v{i}"), None))
        .collect();
    source
        .txn(etcd_client::Txn::new().and_then(puts))
        .await
        .expect("a 1,024-put transaction");
    // A transaction near etcd's 1.5 MiB request limit: with the mirror's own
    // keys and applied record it would not fit in one local transaction.
    let heavy: Vec<etcd_client::TxnOp> = (0..2)
        .map(|i| etcd_client::TxnOp::put(format!("/tern/a/acct-1/d/heavy-{i}"), vec![b'h'; 700 * 1024], None))
        .collect();
    source
        .txn(etcd_client::Txn::new().and_then(heavy))
        .await
        .expect("a 1.4 MiB transaction");
    let lease = source.lease_grant(600, None).await.expect("lease").id();
    for chunk in 0..10 {
        let ops: Vec<etcd_client::TxnOp> = (0..500)
            .map(|i| {
                etcd_client::TxnOp::put(
                    format!("/tern/a/acct-1/i/record-{chunk}-{i:03}"),
                    "{}",
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )
            })
            .collect();
        source
            .txn(etcd_client::Txn::new().and_then(ops))
            .await
            .expect("records on a lease");
    }
    caught_up(&d, true).await;
    source
        .lease_revoke(lease)
        .await
        .expect("5,000 records go in one revision");
    write_stream(&d, "acct-1", 5, Duration::ZERO).await;
    caught_up(&d, true).await;
}

/// A backlog of thousands of source revisions is caught up by a relay of
/// watches (one etcd watch catches up at most 1,000 revisions per 100 ms),
/// and the mirror still ends identical to its source, versions included: no
/// revision applied twice, none skipped, also when the agent dies while the
/// relay runs and resumes from its applied record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_backlog_is_caught_up_by_a_relay_of_watches_exactly() {
    let mut d = start().await;
    create_eu_account(&d, "acct-1").await;
    caught_up(&d, true).await;
    let relays = async |d: &LocalDeployment| {
        d.region("us-east")
            .agent
            .as_ref()?
            .metric("tern_agent_mirror_relayed_catchups_total{source=\"eu-west\"}")
            .await
    };
    let mut source = d.group_client("eu-west").await;
    let backlog = async |source: &mut etcd_client::Client, round: usize| {
        for i in 0..3_000 {
            let key = format!("/tern/a/acct-1/d/k{}", i % 50);
            if i % 17 == 0 {
                source.delete(key, None).await.expect("delete");
            } else {
                source.put(key, format!("{round}-{i}"), None).await.expect("put");
            }
        }
    };
    d.set_mirror_link("us-east", "eu-west", false).await.expect("cut");
    backlog(&mut source, 1).await;
    d.set_mirror_link("us-east", "eu-west", true).await.expect("heal");
    caught_up(&d, true).await;
    assert!(relays(&d).await >= Some(1.0), "a relay caught the backlog up");

    // Again, and the agent dies as soon as the relay starts.
    d.set_mirror_link("us-east", "eu-west", false).await.expect("cut");
    backlog(&mut source, 2).await;
    let before = relays(&d).await.unwrap_or(0.0);
    d.set_mirror_link("us-east", "eu-west", true).await.expect("heal");
    wait_for("a second relay", Duration::from_secs(20), async || {
        (relays(&d).await? > before).then_some(())
    })
    .await;
    d.region_mut("us-east").agent.take().expect("agent").kill();
    let agent = d
        .start_agent("us-east", &["--identity=us-east-agent-b".to_string()])
        .await
        .expect("restart");
    d.region_mut("us-east").agent = Some(agent);
    caught_up(&d, true).await;
}

/// A region of 50 MiB, far past gRPC's 4 MiB message limit: with its mirror
/// link cut for 20 s under writes, the backlog (etcd sends a catch-up of up
/// to 1,000 revisions in one watch response) is applied once the link heals;
/// compacted while the agent is down, it is resynchronised from a paged
/// snapshot. Neither needs an operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_of_50_mib_catches_up_and_resyncs_without_operator_action() {
    const VALUE: usize = 100 * 1024;
    let mut d = start().await;
    create_eu_account(&d, "acct-1").await;
    caught_up(&d, true).await;
    let mut source = d.group_client("eu-west").await;
    let same = async |d: &LocalDeployment, at_least: usize| {
        let (src, mir) = key_versions(d).await;
        (src.len() >= at_least && src == mir).then_some(())
    };
    // 30 MiB while the mirror follows.
    for i in 0..300 {
        source
            .put(format!("/tern/a/acct-1/d/base-{i:03}"), vec![b'b'; VALUE], None)
            .await
            .expect("a 100 KiB value");
    }
    // 10 MiB more over 20 s with the link cut.
    d.set_mirror_link("us-east", "eu-west", false).await.expect("cut");
    for i in 0..100 {
        source
            .put(format!("/tern/a/acct-1/d/cut-{i:03}"), vec![b'c'; VALUE], None)
            .await
            .expect("a 100 KiB value");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    d.set_mirror_link("us-east", "eu-west", true).await.expect("heal");
    wait_for(
        "the mirror to apply a backlog of 10 MiB",
        Duration::from_secs(60),
        async || same(&d, 400).await,
    )
    .await;

    // 10 MiB more with the agent down, then the source compacts past it.
    d.region_mut("us-east").agent.take().expect("agent").stop().await;
    for i in 0..100 {
        source
            .put(format!("/tern/a/acct-1/d/down-{i:03}"), vec![b'd'; VALUE], None)
            .await
            .expect("a 100 KiB value");
    }
    let revision = source
        .get("/", None)
        .await
        .expect("header")
        .header()
        .expect("header")
        .revision();
    source.compact(revision, None).await.expect("compact the source");
    let agent = d
        .start_agent("us-east", &["--identity=us-east-agent-b".to_string()])
        .await
        .expect("restart");
    d.region_mut("us-east").agent = Some(agent);
    wait_for("the mirror to resync 50 MiB", Duration::from_secs(90), async || {
        same(&d, 500).await
    })
    .await;
    let resyncs = d
        .region("us-east")
        .agent
        .as_ref()
        .expect("agent")
        .metric("tern_agent_mirror_resyncs_total{source=\"eu-west\"}")
        .await;
    assert_eq!(resyncs, Some(1.0), "compaction past the agent is one resync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_its_own_group_keeps_the_agent_leading() {
    // Each member of us-east's three-member group is killed and restarted in
    // turn, the Raft leader among them. The agent rides over the errors of
    // its group for as long as its lease can be valid: same leadership term
    // (its election key's creation revision) at the end, heartbeats going on,
    // the mirror current.
    let mut d = start_with(3).await;
    // A TTL longer than the group can take to answer again after a member
    // restart: a Raft election is up to 2 s here, but one CI run saw the
    // group answer nothing for over 5 s (two elections in a row), and the
    // agent rightly gave up a lease it could not have renewed. What this
    // test is about is that errors within the TTL do not end leadership
    // (the agent before did at the first error).
    d.region_mut("us-east").agent.take().expect("agent").stop().await;
    let agent = d
        .start_agent("us-east", &["--election-ttl=10".to_string()])
        .await
        .expect("agent");
    d.region_mut("us-east").agent = Some(agent);
    create_eu_account(&d, "acct-1").await;
    caught_up(&d, true).await;
    let before = wait_for("a leader", Duration::from_secs(15), async || election_term(&d).await).await;
    let agent = d.region("us-east").agent.as_ref().expect("agent");
    let mut last = agent.metric("tern_agent_heartbeats_total").await.unwrap_or(0.0);
    for i in 0..3 {
        let group = &mut d.region_mut("us-east").group;
        group.kill(i);
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::block_in_place(|| group.restart(i)).expect("member restarts");
        // Writes wait while the group elects a leader (when the member was
        // it); then heartbeats go on, from the same agent.
        let agent = d.region("us-east").agent.as_ref().expect("agent");
        last = wait_for(
            &format!("heartbeats after member {i} restarted"),
            Duration::from_secs(10),
            async || {
                let now = agent.metric("tern_agent_heartbeats_total").await?;
                (now > last).then_some(now)
            },
        )
        .await;
        assert_eq!(agent.metric("tern_agent_is_leader").await, Some(1.0), "still leading");
    }
    let after = wait_for("a leader", Duration::from_secs(15), async || election_term(&d).await).await;
    assert_eq!(before, after, "the same leadership term after the rolling restart");
    write_stream(&d, "acct-1", 5, Duration::ZERO).await;
    caught_up(&d, true).await;
}
