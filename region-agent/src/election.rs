//! One active agent per region, elected through the region's own etcd group.
//! The winner's election key lives on a lease it keeps alive; every write the
//! agent makes carries a compare on that key's creation revision, so an agent
//! that was paused past its lease (and replaced) cannot write any more.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp};
use tern_common::agent_election;

use crate::error::{AgentError, EtcdContext, Result};
use crate::state::Shared;

/// A spawned task that ends when its handle is dropped.
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Proof of leadership: the election key and its creation revision.
#[derive(Clone, Debug)]
pub struct Leadership {
    pub key: Vec<u8>,
    pub rev: i64,
    pub lease: i64,
}

impl Leadership {
    /// The compare that every write of the active agent carries.
    pub fn guard(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.rev)
    }
}

/// Waits until this agent leads its region.
pub async fn campaign(client: &Client, shared: &Arc<Shared>, ttl: i64) -> Result<Leadership> {
    let mut c = client.clone();
    let lease = c
        .lease_grant(ttl, None)
        .await
        .during(|| "granting the election lease".into())?
        .id();
    // Keep the lease alive while campaigning too: a standby can wait long.
    // Dropped with the campaign: an agent stopped while campaigning must
    // not keep its lease, and its election key, alive for ever (a successor
    // with the same identity waited on it).
    let keeper = AbortOnDrop(tokio::spawn(keep_alive(client.clone(), lease, ttl, shared.clone())));
    let won = c
        .campaign(agent_election(&shared.region), shared.identity.as_bytes(), lease)
        .await;
    drop(keeper);
    let resp = won.during(|| "campaigning".into())?;
    let leader = resp
        .leader()
        .ok_or_else(|| AgentError::NotLeader("the campaign answered without a leader key".into()))?;
    tracing::info!(region = %shared.region, identity = %shared.identity, "leading the region");
    Ok(Leadership {
        key: leader.key().to_vec(),
        rev: leader.rev(),
        lease,
    })
}

/// Keeps the lease alive; returns when it cannot, which ends leadership.
/// A failed renewal (an etcd leader change, a member restarting under the
/// agent's connection) is retried on a fresh keep-alive stream for as long
/// as the lease can still be valid: leadership ends only when the lease has
/// expired, or may have (no renewal confirmed for a whole TTL), never on a
/// transient error. While the agent is paused (a test hook standing in for
/// a stopped process) it sends nothing, so the lease expires as it would
/// for a frozen process.
pub async fn keep_alive(client: Client, lease: i64, ttl: i64, shared: Arc<Shared>) -> AgentError {
    keep_alive_every(client, lease, ttl, 3, shared).await
}

/// [`keep_alive`], renewing `per_ttl` times per TTL. The region's
/// directory lease is renewed more often than the election's: routers may
/// write until its last renewal's send time plus the TTL less the margin,
/// so the time between renewals (plus their round trip to a distant
/// directory) is validity the routers never get.
pub async fn keep_alive_every(client: Client, lease: i64, ttl: i64, per_ttl: u64, shared: Arc<Shared>) -> AgentError {
    let period = Duration::from_millis((ttl as u64 * 1000) / per_ttl.max(2));
    let ttl = Duration::from_secs(ttl as u64);
    let mut c = client;
    let mut renewed = tokio::time::Instant::now();
    let mut channel = None;
    // The first renewal goes at once: a grant or claim that took long has
    // used part of the lease already.
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            tokio::time::sleep(period).await;
        }
        if shared.paused.load(Ordering::Relaxed) {
            continue;
        }
        if renewed.elapsed() >= ttl {
            return AgentError::NotLeader(format!("lease {lease:x} not renewed for a whole TTL"));
        }
        if channel.is_none() {
            match c.lease_keep_alive(lease).await {
                Ok(pair) => channel = Some(pair),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the lease keep-alive; retrying while the lease lasts");
                    continue;
                }
            }
        }
        let Some((keeper, stream)) = channel.as_mut() else {
            continue;
        };
        let sent = tokio::time::Instant::now();
        if let Err(e) = keeper.keep_alive().await {
            tracing::warn!(error = %e, "lease renewal failed; retrying while the lease lasts");
            channel = None;
            continue;
        }
        // An answer may take longer than the cadence (a distant directory):
        // waiting a third of the TTL keeps slow renewals from timing out one
        // after another while the lease runs down.
        match tokio::time::timeout(period.max(ttl / 3), stream.message()).await {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                renewed = tokio::time::Instant::now();
                shared.renewed(lease, sent);
            }
            // etcd answers TTL 0 for a lease it no longer has.
            Ok(Ok(Some(_))) => return AgentError::NotLeader(format!("lease {lease:x} expired")),
            other => {
                tracing::warn!(answer = ?other.map(|r| r.map(|m| m.is_some())), "no lease renewal; retrying while the lease lasts");
                channel = None;
            }
        }
    }
}
