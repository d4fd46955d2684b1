//! The region's etcd group as the router's home store sees it: requests go
//! straight to the group's Raft leader while it is known, and to any member
//! while it is not.
//!
//! Why: a member that is not the leader forwards each proposal to the
//! leader and answers only once it has applied the entry itself. That costs
//! the group CPU and the write latency; on the 2-core benchmark, writes sent
//! to the leader alone ran ~20% faster than writes spread over all members.
//! Correctness does not depend on it: a request that reaches a former
//! leader is forwarded by it like any follower's, and the fence guards every
//! write either way.
//!
//! The leader is found with a Status call and the member list (its
//! advertised client URL, as etcd's own clients sync endpoints), and looked
//! for again when a response carries a newer Raft term, when a request
//! fails, and every few seconds.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::{Client, KvClient, ResponseHeader};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tern_common::tls::Tls;
use tokio::sync::Notify;

/// How often a known leader is confirmed.
const CONFIRM_EVERY: Duration = Duration::from_secs(5);
/// How soon to look again while no leader is known (an election).
const RETRY_EVERY: Duration = Duration::from_millis(200);
/// Deadline of each Status, MemberList and connect call.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct Leader {
    id: u64,
    term: u64,
    url: String,
    client: Client,
}

/// What the metrics show about the leader.
#[derive(Clone, Default)]
pub struct LeaderMetrics {
    /// 1 while requests go straight to the leader.
    pub direct: Gauge,
    /// Leaders switched to.
    pub changes: Counter,
}

/// The region group; cheap to clone.
#[derive(Clone)]
pub struct Group {
    /// Every configured member: for look-ups, and for requests while no
    /// leader is known.
    any: Client,
    leader: Arc<RwLock<Option<Leader>>>,
    wake: Arc<Notify>,
}

impl Group {
    /// Requests spread over every member of `any`, never to a leader alone
    /// (`--group-leader-direct=false`).
    pub fn spread(any: Client) -> Self {
        Self {
            any,
            leader: Arc::default(),
            wake: Arc::default(),
        }
    }

    /// Starts following the leader of the group behind `any` on the current
    /// runtime. The task ends when every clone of the group is dropped.
    pub fn follow_leader(any: Client, tls: Option<Tls>, metrics: LeaderMetrics) -> Self {
        let group = Self::spread(any);
        let weak = Arc::downgrade(&group.leader);
        let (any, wake) = (group.any.clone(), group.wake.clone());
        tokio::spawn(async move {
            let mut unreachable_wait = RETRY_EVERY;
            loop {
                let Some(leader) = weak.upgrade() else { return };
                let current = leader.read().expect("leader lock").clone();
                let found = find(&any, tls.as_ref(), current.as_ref()).await;
                let wait = match &found {
                    Ok(_) => CONFIRM_EVERY,
                    Err(Lookup::Election) => RETRY_EVERY,
                    // A leader that was just lost (members still name it), or
                    // advertised URLs that do not reach the members from here:
                    // back off to one connect attempt per CONFIRM_EVERY.
                    Err(Lookup::Unreachable) => {
                        unreachable_wait = (unreachable_wait * 2).min(CONFIRM_EVERY);
                        unreachable_wait
                    }
                };
                if found.is_ok() {
                    unreachable_wait = RETRY_EVERY;
                }
                let found = found.ok();
                metrics.direct.set(i64::from(found.is_some()));
                match (&current, found) {
                    (Some(c), Some(f)) if c.id == f.id => {
                        // Same leader, maybe a newer term: keep the connection.
                        if let Some(l) = leader.write().expect("leader lock").as_mut() {
                            l.term = l.term.max(f.term);
                        }
                    }
                    (_, found) => {
                        match &found {
                            Some(f) => {
                                tracing::info!(member = %format_args!("{:x}", f.id), url = %f.url, term = f.term,
                                    "region group leader found: requests go to it");
                                metrics.changes.inc();
                            }
                            None if current.is_some() => {
                                tracing::info!("region group leader unknown: requests go to any member");
                            }
                            None => {}
                        }
                        *leader.write().expect("leader lock") = found;
                    }
                }
                drop(leader);
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        });
        group
    }

    /// Where the next request goes: the leader if known, else any member.
    pub fn kv(&self) -> KvClient {
        match &*self.leader.read().expect("leader lock") {
            Some(l) => l.client.kv_client(),
            None => self.any.kv_client(),
        }
    }

    /// Every configured member (reads that any member may serve).
    pub fn any(&self) -> Client {
        self.any.clone()
    }

    /// Notes the header of a response: a newer Raft term than the leader was
    /// found in means an election happened since; look again.
    pub fn saw(&self, header: Option<&ResponseHeader>) {
        let Some(term) = header.map(|h| h.raft_term()) else {
            return;
        };
        let newer = self
            .leader
            .read()
            .expect("leader lock")
            .as_ref()
            .is_some_and(|l| term > l.term);
        if newer {
            self.wake.notify_one();
        }
    }

    /// Notes a request that was given up before an answer came (its
    /// callers' deadlines passed): the leader may hang. Confirm it now
    /// rather than at the next periodic check; it stays in use meanwhile,
    /// since a short client deadline is no evidence against it.
    pub fn suspect(&self) {
        if self.leader.read().expect("leader lock").is_some() {
            self.wake.notify_one();
        }
    }

    /// Notes a failed request: until the leader is found again, requests
    /// go to any member, which route around a dead one.
    pub fn failed(&self) {
        let had = self.leader.write().expect("leader lock").take().is_some();
        if had {
            self.wake.notify_one();
        }
    }

    /// Runs `txn` where requests go now, and notes what the answer (or its
    /// absence) says about the leader.
    pub async fn txn(&self, txn: etcd_client::Txn) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
        /// Tells the group when the request is dropped unanswered.
        struct Unanswered<'a>(Option<&'a Group>);
        impl Drop for Unanswered<'_> {
            fn drop(&mut self) {
                if let Some(group) = self.0 {
                    group.suspect();
                }
            }
        }
        let mut unanswered = Unanswered(Some(self));
        let answer = self.kv().txn(txn).await;
        unanswered.0 = None;
        match answer {
            Ok(resp) => {
                self.saw(resp.header());
                Ok(resp)
            }
            Err(e) => {
                // The member may be gone or no longer lead; a refused
                // request (too large, bad compare) says nothing about the
                // leader.
                let lost = match &e {
                    etcd_client::Error::GRpcStatus(s) => matches!(
                        s.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
                    ),
                    etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
                    _ => false,
                };
                if lost {
                    self.failed();
                }
                Err(e)
            }
        }
    }
}

/// Why no leader was found.
enum Lookup {
    /// No member answered, or none knows a leader: an election, or the
    /// group is down. Look again soon.
    Election,
    /// The leader's advertised client URL does not reach it from here.
    Unreachable,
}

/// The leader now, confirmed on its own connection; `current` is reused
/// when it still leads.
async fn find(any: &Client, tls: Option<&Tls>, current: Option<&Leader>) -> Result<Leader, Lookup> {
    async fn status(client: &Client) -> Option<(u64, u64, u64)> {
        let s = tokio::time::timeout(CALL_TIMEOUT, client.clone().status())
            .await
            .ok()?
            .ok()?;
        let answered_by = s.header().map(|h| h.member_id())?;
        Some((answered_by, s.leader(), s.raft_term()))
    }
    if let Some(c) = current
        && let Some((by, leader, term)) = status(&c.client).await
        && by == c.id
        && leader == c.id
    {
        return Ok(Leader { term, ..c.clone() });
    }
    let (_, id, _) = status(any).await.ok_or(Lookup::Election)?;
    if id == 0 {
        return Err(Lookup::Election);
    }
    let members = tokio::time::timeout(CALL_TIMEOUT, any.clone().member_list())
        .await
        .ok()
        .and_then(|r| r.ok())
        .ok_or(Lookup::Election)?;
    let url = members
        .members()
        .iter()
        .find(|m| m.id() == id)
        .and_then(|m| m.client_urls().first())
        .ok_or(Lookup::Unreachable)?
        .clone();
    let client = tern_common::etcd::connect_tls(std::slice::from_ref(&url), tls, "region group leader", CALL_TIMEOUT)
        .await
        .map_err(|e| {
            tracing::warn!(%url, error = %e, "cannot reach the region group's leader at its advertised URL");
            Lookup::Unreachable
        })?;
    // Confirm on the new connection that this member still leads; if not,
    // an election is under way.
    match status(&client).await {
        Some((by, leader, term)) if by == id && leader == id => Ok(Leader { id, term, url, client }),
        Some(_) => Err(Lookup::Election),
        None => Err(Lookup::Unreachable),
    }
}
