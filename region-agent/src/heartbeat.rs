//! The heartbeat loop: a sequence number and a timestamp into the region's
//! own group every interval. Mirrors carry heartbeats to every other region,
//! so a mirror's lag is measurable even with no user traffic; each heartbeat
//! also echoes the newest heartbeat of every mirrored region, which makes
//! two regions' heartbeats a timestamped round trip that measures their
//! clock offset (`lag.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{Client, Txn, TxnOp};
use opentelemetry::KeyValue;
use serde::{Deserialize, Serialize};
use tern_common::heartbeat_key;
use tern_common::telemetry::finish;

use crate::election::Leadership;
use crate::error::{AgentError, EtcdContext};
use crate::state::Shared;

/// How long one heartbeat write may take before the next tick replaces it.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);

/// The value of `/tern/hb/{region}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Heartbeat {
    pub seq: u64,
    /// The writing agent's wall clock, Unix ms.
    pub wall_ms: i64,
    pub agent: String,
    /// The writing agent's start (`Shared::boot`): offsets measured against
    /// an earlier start say nothing about this one's clock.
    #[serde(default)]
    pub boot: u64,
    /// Per mirrored region: its newest heartbeat this agent applied.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub echoes: BTreeMap<String, Echo>,
}

/// A source heartbeat as the mirroring agent saw it: its time on the
/// source's clock and when it was applied on the mirroring agent's clock.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Echo {
    pub sent_ms: i64,
    pub received_ms: i64,
}

/// Writes heartbeats until leadership is lost (a write refused by the
/// leadership guard); errors of the group are retried.
pub async fn run(client: Client, leadership: Leadership, shared: Arc<Shared>, interval: Duration) -> AgentError {
    let key = heartbeat_key(&shared.region);
    let mut c = client;
    let mut seq = match c.get(key.clone(), None).await {
        Ok(resp) => resp
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<Heartbeat>(kv.value()).ok())
            .map(|h| h.seq)
            .unwrap_or(0),
        Err(source) => {
            return AgentError::Etcd {
                what: "reading the last heartbeat".into(),
                source,
            };
        }
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        while shared.paused.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seq += 1;
        let echoes = shared.echoes();
        let beat = Heartbeat {
            seq,
            wall_ms: shared.wall_ms(),
            agent: shared.identity.clone(),
            boot: shared.boot,
            echoes,
        };
        let value = serde_json::to_string(&beat).expect("a heartbeat serialises");
        let span = shared.telemetry.root("agent.heartbeat", || {
            vec![
                KeyValue::new("tern.region", shared.region.to_string()),
                KeyValue::new("tern.heartbeat.seq", seq as i64),
            ]
        });
        let txn = Txn::new()
            .when([leadership.guard()])
            .and_then([TxnOp::put(key.clone(), value, None)]);
        // A write stuck behind a Raft election gives up after a second and
        // the next tick tries again, rather than holding heartbeats back.
        let outcome = match tokio::time::timeout(HEARTBEAT_TIMEOUT, c.txn(txn)).await {
            Ok(r) => r.during(|| "writing a heartbeat".into()),
            Err(_) => Err(AgentError::HeartbeatTimedOut(HEARTBEAT_TIMEOUT)),
        };
        let revision = |r: &etcd_client::TxnResponse| r.header().map(|h| h.revision()).unwrap_or(0);
        match outcome {
            Ok(resp) if resp.succeeded() => {
                shared.metrics.heartbeats.inc();
                finish(
                    span,
                    vec![
                        KeyValue::new("tern.revision", revision(&resp)),
                        KeyValue::new("tern.guard", "held"),
                    ],
                    Ok::<(), String>(()),
                );
            }
            Ok(resp) => {
                shared.metrics.refused_writes.inc();
                let e = AgentError::NotLeader(format!(
                    "heartbeat {seq} refused: another agent leads {}",
                    shared.region
                ));
                finish(
                    span,
                    vec![
                        KeyValue::new("tern.revision", revision(&resp)),
                        KeyValue::new("tern.guard", "refused"),
                    ],
                    Err(&e),
                );
                return e;
            }
            Err(e) => {
                // A transient error of the group (a leader change, a member
                // restarting) does not end leadership: the lease does. The
                // next tick tries again.
                finish(span, vec![], Err(&e));
                tracing::warn!(error = %e, seq, "heartbeat failed; retrying");
            }
        };
    }
}
