//! Mirroring one source region into this region's group: a watch on the
//! source's account keys and heartbeats from the last applied revision, each
//! source revision applied as one transaction together with the
//! applied-revision record (guarded by leadership and by the previous applied
//! revision, so no revision is applied twice and none is skipped). After a
//! restart the watch resumes from the record; when the source has compacted
//! past it, the mirror is resynchronised from a snapshot.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, WatchOptions};
use opentelemetry::KeyValue;
use tern_common::telemetry::finish;
use tern_common::{
    MIRRORED_END, MIRRORED_START, MirrorState, RegionName, Revision, SourceRevision, heartbeat_key, is_mirrored,
    mirror_applied_key, mirror_closed_key, mirror_data_prefix, mirror_key,
};
use tokio::time::Instant;

use crate::election::Leadership;
use crate::error::{AgentError, EtcdContext, Result};
use crate::heartbeat::Heartbeat;
use crate::state::Shared;

/// Operations per destination transaction when copying a snapshot (etcd's
/// limit is --max-txn-ops; tern runs with 1024).
const SNAPSHOT_CHUNK: usize = 500;

/// Mirrors `source` until leadership is lost; reconnects and resyncs as
/// needed.
pub async fn run(
    local: Client,
    source_client: Client,
    source: RegionName,
    leadership: Leadership,
    shared: Arc<Shared>,
) -> AgentError {
    let prober = tokio::spawn(probe_source_revision(
        source_client.clone(),
        source.clone(),
        shared.clone(),
    ));
    let outcome = loop {
        match mirror(&local, &source_client, &source, &leadership, &shared).await {
            Err(AgentError::NotLeader(why)) => break AgentError::NotLeader(why),
            Err(AgentError::Compacted {
                source_region,
                revision,
            }) => {
                tracing::warn!(source = %source_region, revision, "the source compacted past the mirror: resynchronising from a snapshot");
                let span = shared.telemetry.root("agent.mirror.resync", || {
                    vec![
                        KeyValue::new("tern.region", shared.region.to_string()),
                        KeyValue::new("tern.source_region", source.to_string()),
                        KeyValue::new("tern.compacted_revision", revision),
                    ]
                });
                let outcome = resync(&local, &source_client, &source, &leadership, &shared).await;
                let attributes = match &outcome {
                    Ok(r) => vec![
                        KeyValue::new("tern.source_revision", r.revision.0),
                        KeyValue::new("tern.keys", r.keys as i64),
                    ],
                    Err(_) => vec![],
                };
                finish(span, attributes, outcome.as_ref().map(|_| ()));
                if let Err(e) = outcome {
                    if matches!(e, AgentError::NotLeader(_)) {
                        break e;
                    }
                    tracing::warn!(source = %source, error = %e, "resync failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            Err(e) => {
                shared.with_mirror(&source, |m| m.state = MirrorState::Disconnected);
                tracing::warn!(source = %source, error = %e, "mirror stream broke; resuming from the applied record");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(()) => {}
        }
    };
    prober.abort();
    outcome
}

/// Reads the applied record: None when the mirror was never synchronised or a
/// resync did not finish.
async fn applied(local: &Client, source: &RegionName) -> Result<Option<SourceRevision>> {
    let resp = local
        .clone()
        .get(mirror_applied_key(source), None)
        .await
        .during(|| format!("reading the applied record of {source}"))?;
    Ok(resp
        .kvs()
        .first()
        .and_then(|kv| std::str::from_utf8(kv.value()).ok()?.parse::<i64>().ok())
        .map(SourceRevision))
}

async fn mirror(
    local: &Client,
    source_client: &Client,
    source: &RegionName,
    leadership: &Leadership,
    shared: &Arc<Shared>,
) -> Result<()> {
    let Some(mut applied) = applied(local, source).await? else {
        return Err(AgentError::Compacted {
            source_region: source.to_string(),
            revision: 0,
        });
    };
    shared.with_mirror(source, |m| {
        m.applied = applied;
        m.state = MirrorState::Streaming;
    });
    let mut sc = source_client.clone();
    let mut stream = sc
        .watch(
            MIRRORED_START,
            Some(
                WatchOptions::new()
                    .with_range(MIRRORED_END)
                    .with_start_revision(applied.next().0)
                    .with_progress_notify(),
            ),
        )
        .await
        .during(|| format!("watching {source}"))?;
    let mut progress = tokio::time::interval(Duration::from_millis(500));
    loop {
        let resp = tokio::select! {
            m = stream.message() => m.during(|| format!("watching {source}"))?,
            _ = progress.tick() => {
                // Ask for a progress notice: it proves that nothing more is
                // pending below the header revision, even when idle.
                stream.request_progress().await.during(|| format!("watching {source}"))?;
                continue;
            }
        };
        let Some(resp) = resp else {
            return Err(AgentError::WatchEnded {
                source_region: source.to_string(),
                reason: "the stream closed".into(),
            });
        };
        // etcd sets the compact revision on a watch canceled by compaction.
        if resp.compact_revision() > 0 {
            return Err(AgentError::Compacted {
                source_region: source.to_string(),
                revision: resp.compact_revision(),
            });
        }
        if resp.canceled() {
            return Err(AgentError::WatchEnded {
                source_region: source.to_string(),
                reason: format!("canceled by etcd: {}", resp.cancel_reason()),
            });
        }
        let header = SourceRevision(resp.header().map(|h| h.revision()).unwrap_or(0));
        if resp.events().is_empty() {
            shared.with_mirror(source, |m| {
                m.source_revision = m.source_revision.max(header);
                if header > m.confirmed && header >= applied {
                    m.confirmed = header;
                }
            });
            continue;
        }
        // Events of one source revision are one transaction's effects.
        let mut by_revision: BTreeMap<SourceRevision, Vec<&etcd_client::Event>> = BTreeMap::new();
        for event in resp.events() {
            if let Some(kv) = event.kv() {
                by_revision
                    .entry(SourceRevision(kv.mod_revision()))
                    .or_default()
                    .push(event);
            }
        }
        for (revision, events) in by_revision {
            let span = shared.telemetry.root("agent.mirror", || {
                vec![
                    KeyValue::new("tern.region", shared.region.to_string()),
                    KeyValue::new("tern.source_region", source.to_string()),
                    KeyValue::new("tern.source_revision", revision.0),
                    KeyValue::new("tern.events", events.len() as i64),
                ]
            });
            let outcome = apply(local, source, leadership, applied, revision, &events, shared).await;
            let attributes = match &outcome {
                Ok(applied) => vec![
                    KeyValue::new("tern.revision", applied.revision.0),
                    KeyValue::new("tern.guard", "held"),
                ],
                Err(AgentError::NotLeader(_)) => vec![KeyValue::new("tern.guard", "refused")],
                Err(_) => vec![],
            };
            finish(span, attributes, outcome.as_ref().map(|_| ()));
            let beat = match outcome {
                Err(AgentError::NotLeader(why)) => {
                    // A write this agent attempted was refused: it no longer leads.
                    shared.metrics.refused_writes.inc();
                    return Err(AgentError::NotLeader(why));
                }
                other => other?.heartbeat,
            };
            applied = revision;
            shared
                .metrics
                .applied_revisions
                .get_or_create(&crate::metrics::Metrics::source(source.as_str()))
                .inc();
            let now = Instant::now();
            let wall = shared.wall_ms();
            shared.with_mirror(source, |m| {
                m.applied = revision;
                m.source_revision = m.source_revision.max(header);
                if let Some(b) = &beat {
                    m.lag.heartbeat(now, wall, b, &shared.region);
                }
            });
        }
    }
}

/// One source revision, applied.
struct Applied {
    /// The source heartbeat it carried.
    heartbeat: Option<Heartbeat>,
    /// The local revision of the mirror transaction.
    revision: Revision,
}

/// Applies one source revision; one that carries a source heartbeat also
/// moves the mirror's closed time (`mirror_closed_key`), in the same
/// transaction, when the clock offset to the source is measured.
async fn apply(
    local: &Client,
    source: &RegionName,
    leadership: &Leadership,
    previous: SourceRevision,
    revision: SourceRevision,
    events: &[&etcd_client::Event],
    shared: &Shared,
) -> Result<Applied> {
    let hb_key = heartbeat_key(source);
    let mut beat = None;
    let mut ops = Vec::new();
    for event in events {
        let Some(kv) = event.kv() else { continue };
        if !is_mirrored(kv.key()) {
            continue;
        }
        let key = mirror_key(source, kv.key());
        match event.event_type() {
            EventType::Put => {
                if kv.key() == hb_key.as_bytes() {
                    beat = serde_json::from_slice::<Heartbeat>(kv.value()).ok();
                }
                ops.push(TxnOp::put(key, kv.value(), None));
            }
            EventType::Delete => ops.push(TxnOp::delete(key, None)),
        }
    }
    if let Some(b) = &beat
        && let Some(closed) = shared.with_mirror(source, |m| m.lag.closed_ms(Instant::now(), b.wall_ms))
    {
        ops.push(TxnOp::put(mirror_closed_key(source), closed.to_string(), None));
    }
    let applied_key = mirror_applied_key(source);
    ops.push(TxnOp::put(applied_key.clone(), revision.to_string(), None));
    let txn = Txn::new()
        .when([
            leadership.guard(),
            Compare::value(applied_key, CompareOp::Equal, previous.to_string()),
        ])
        .and_then(ops);
    let resp = local
        .clone()
        .txn(txn)
        .await
        .during(|| format!("applying revision {revision} of {source}"))?;
    if !resp.succeeded() {
        return Err(lost_or_raced(local, leadership, source).await);
    }
    Ok(Applied {
        heartbeat: beat,
        revision: Revision(resp.header().map(|h| h.revision()).unwrap_or(0)),
    })
}

/// Why a guarded mirror write failed: leadership lost, or another writer
/// moved the applied record (then the stream restarts from the record).
async fn lost_or_raced(local: &Client, leadership: &Leadership, source: &RegionName) -> AgentError {
    let still = local
        .clone()
        .get(leadership.key.clone(), None)
        .await
        .ok()
        .and_then(|r| r.kvs().first().map(|kv| kv.create_revision() == leadership.rev))
        .unwrap_or(false);
    if still {
        AgentError::AppliedRecordMoved {
            source_region: source.to_string(),
        }
    } else {
        AgentError::NotLeader(format!("a mirror write for {source} was refused"))
    }
}

/// Copies the source's keys as of one revision into the mirror: clear the
/// mirror and mark it incomplete, copy in chunks, then record the revision.
/// Until the last step the mirror has no applied revision, so nothing reads
/// it as current. Returns the snapshot's revision and key count.
async fn resync(
    local: &Client,
    source_client: &Client,
    source: &RegionName,
    leadership: &Leadership,
    shared: &Arc<Shared>,
) -> Result<Resynced> {
    shared
        .metrics
        .resyncs
        .get_or_create(&crate::metrics::Metrics::source(source.as_str()))
        .inc();
    if let Some(events) = &shared.events {
        let note = format!(
            "region {}: the mirror of {source} is resynchronising from a snapshot (it had no applied revision, or {source} compacted past it)",
            shared.region
        );
        events.warn("MirrorResync", note).await;
    }
    shared.with_mirror(source, |m| m.state = MirrorState::Resyncing);
    let snapshot = source_client
        .clone()
        .get(MIRRORED_START, Some(GetOptions::new().with_range(MIRRORED_END)))
        .await
        .during(|| format!("reading a snapshot of {source}"))?;
    let revision = SourceRevision(snapshot.header().map(|h| h.revision()).unwrap_or(0));
    let prefix = mirror_data_prefix(source);
    let applied_key = mirror_applied_key(source);
    let guarded = |ops: Vec<TxnOp>| Txn::new().when([leadership.guard()]).and_then(ops);
    let mut c = local.clone();
    let clear = guarded(vec![
        TxnOp::delete(applied_key.clone(), None),
        TxnOp::delete(mirror_closed_key(source), None),
        TxnOp::delete(prefix.clone(), Some(etcd_client::DeleteOptions::new().with_prefix())),
    ]);
    if !c
        .txn(clear)
        .await
        .during(|| format!("clearing the mirror of {source}"))?
        .succeeded()
    {
        return Err(AgentError::NotLeader(format!("resync of {source} refused")));
    }
    let kvs: Vec<_> = snapshot.kvs().iter().filter(|kv| is_mirrored(kv.key())).collect();
    for chunk in kvs.chunks(SNAPSHOT_CHUNK) {
        let ops = chunk
            .iter()
            .map(|kv| TxnOp::put(mirror_key(source, kv.key()), kv.value(), None))
            .collect();
        if !c
            .txn(guarded(ops))
            .await
            .during(|| format!("copying a snapshot of {source}"))?
            .succeeded()
        {
            return Err(AgentError::NotLeader(format!("resync of {source} refused")));
        }
    }
    let done = guarded(vec![TxnOp::put(applied_key, revision.to_string(), None)]);
    if !c
        .txn(done)
        .await
        .during(|| format!("finishing the resync of {source}"))?
        .succeeded()
    {
        return Err(AgentError::NotLeader(format!("resync of {source} refused")));
    }
    tracing::info!(source = %source, %revision, keys = kvs.len(), "mirror resynchronised");
    shared.with_mirror(source, |m| {
        m.applied = revision;
        m.state = MirrorState::Streaming;
    });
    Ok(Resynced {
        revision,
        keys: kvs.len(),
    })
}

/// What a resync copied.
struct Resynced {
    revision: SourceRevision,
    keys: usize,
}

/// Reads the source's current revision every 500 ms (the header of a small
/// read), for the lag in revisions.
async fn probe_source_revision(client: Client, source: RegionName, shared: Arc<Shared>) {
    let key = heartbeat_key(&source);
    let mut c = client;
    loop {
        if let Ok(resp) = c
            .get(
                key.clone(),
                Some(GetOptions::new().with_serializable().with_keys_only()),
            )
            .await
        {
            let revision = SourceRevision(resp.header().map(|h| h.revision()).unwrap_or(0));
            shared.with_mirror(&source, |m| {
                m.source_revision = m.source_revision.max(revision);
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
