//! Mirroring one source region into this region's group: a watch on the
//! source's account keys and heartbeats from the last applied revision, each
//! source revision applied as one transaction together with the
//! applied-revision record (guarded by leadership and by the previous applied
//! revision, so no revision is applied twice and none is skipped). After a
//! restart the watch resumes from the record; when the source has compacted
//! past it, the mirror is resynchronised from a snapshot.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, WatchOptions};
use opentelemetry::KeyValue;
use tern_common::etcd::Pages;
use tern_common::telemetry::finish;
use tern_common::{
    MIRRORED_END, MIRRORED_START, MirrorState, RegionName, Revision, SourceRevision, heartbeat_key, is_mirrored,
    mirror_applied_key, mirror_closed_key, mirror_data_prefix, mirror_key, promotion_key,
};
use tokio::time::Instant;

use crate::election::Leadership;
use crate::error::{AgentError, EtcdContext, Result};
use crate::heartbeat::Heartbeat;
use crate::plan::{Batch, Change, Limits, Mark, plan};
use crate::relay::Relay;
use crate::state::Shared;

/// Most events taken from the watch at once (responses already received).
const DRAIN_EVENTS: usize = 20_000;

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
        match promoted(&local, &source).await {
            Ok(Some(epoch)) => {
                // This region took the source's accounts over: the mirror
                // area is theirs now, and nothing of the source may land in
                // it again. Mirroring stops until the source rejoins and
                // the marker is deleted (`failover::unpromote`, which also
                // deletes the applied record: the area is resynchronised).
                shared.with_mirror(&source, |m| m.state = MirrorState::Promoted);
                tracing::warn!(source = %source, epoch, "the mirror was promoted by a failover: no longer mirroring");
                while matches!(promoted(&local, &source).await, Ok(Some(_)) | Err(_)) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                tracing::info!(source = %source, "the source rejoined: mirroring it again");
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(source = %source, error = %e, "cannot read the promotion marker; mirroring on"),
        }
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

/// The region epoch of the failover that promoted this region's mirror of
/// `source`, if one did.
pub async fn promoted(local: &Client, source: &RegionName) -> Result<Option<u64>> {
    let key = promotion_key(source);
    let found = local
        .clone()
        .get(key.clone(), None)
        .await
        .during(|| format!("reading {key}"))?;
    Ok(found
        .kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).parse().unwrap_or(0)))
}

/// The compare every write into the mirror area of `source` carries: no
/// failover has promoted it (after that, the area holds the source's
/// accounts as served here, and a late source revision must not land).
fn not_promoted(source: &RegionName) -> Compare {
    Compare::version(promotion_key(source), CompareOp::Equal, 0)
}

/// Reads the applied record: None when the mirror was never synchronised or a
/// resync did not finish.
async fn applied(local: &Client, source: &RegionName) -> Result<Option<Mark>> {
    let resp = local
        .clone()
        .get(mirror_applied_key(source), None)
        .await
        .during(|| format!("reading the applied record of {source}"))?;
    Ok(resp
        .kvs()
        .first()
        .and_then(|kv| Mark::parse(std::str::from_utf8(kv.value()).ok()?)))
}

async fn mirror(
    local: &Client,
    source_client: &Client,
    source: &RegionName,
    leadership: &Leadership,
    shared: &Arc<Shared>,
) -> Result<()> {
    let Some(mut mark) = applied(local, source).await? else {
        return Err(AgentError::Compacted {
            source_region: source.to_string(),
            revision: 0,
        });
    };
    shared.with_mirror(source, |m| {
        m.applied = mark.complete();
        m.state = MirrorState::Streaming;
    });
    let hb_key = heartbeat_key(source);
    let limits = Limits::for_prefix(mirror_key(source, b"").len());
    // The source's newest revision sizes the relay: a large backlog is
    // caught up by several watches at once (`relay.rs`).
    let newest = source_client
        .clone()
        .get(MIRRORED_START, Some(GetOptions::new().with_count_only()))
        .await
        .during(|| format!("reading {source}'s revision"))?
        .header()
        .map_or(0, |h| h.revision());
    let mut stream = Relay::open(
        source_client,
        MIRRORED_START.as_bytes(),
        WatchOptions::new().with_range(MIRRORED_END).with_progress_notify(),
        mark.resume().0,
        newest,
    )
    .await
    .during(|| format!("watching {source}"))?;
    if stream.legs() > 1 {
        tracing::info!(source = %source, from = %mark.resume(), newest, legs = stream.legs(), "catching up with a relay of watches");
        shared
            .metrics
            .relayed_catchups
            .get_or_create(&crate::metrics::Metrics::source(source.as_str()))
            .inc();
    }
    // The newest source revision whose events were taken: a relay's leg
    // that hands over may already have delivered some of its successor's
    // revisions, which are dropped when they come again.
    let mut taken = mark.complete();
    let mut progress = tokio::time::interval(Duration::from_millis(500));
    // A response read while draining that is not plain events: handled
    // first on the next turn, after the events before it are applied.
    let mut pending: Option<etcd_client::WatchResponse> = None;
    loop {
        let resp = match pending.take() {
            Some(r) => Some(r),
            None => tokio::select! {
                m = stream.message() => m.during(|| format!("watching {source}"))?,
                _ = progress.tick() => {
                    // Ask for a progress notice: it proves that nothing more is
                    // pending below the header revision, even when idle.
                    stream.request_progress().await.during(|| format!("watching {source}"))?;
                    continue;
                }
            },
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
        if resp.created() {
            // The answer to creating the watch is event-less too, but its
            // header is the source's newest revision while the backlog from
            // `applied + 1` is still to come: it confirms nothing (taking it
            // for a progress notice showed 0 revisions of lag right after a
            // restart, whatever the backlog).
            shared.with_mirror(source, |m| m.source_revision = m.source_revision.max(header));
            continue;
        }
        if resp.events().is_empty() {
            shared.with_mirror(source, |m| {
                m.source_revision = m.source_revision.max(header);
                if header > m.confirmed && header >= mark.complete() {
                    m.confirmed = header;
                }
            });
            continue;
        }
        // Events of one source revision are one transaction's effects;
        // whole revisions share local transactions (`plan.rs`). etcd sends a
        // caught-up watch one response per revision, so the responses that
        // are already here are taken too (without waiting): a mirror that
        // fell behind then applies many revisions per local commit.
        let mut responses = vec![resp];
        let mut events = responses[0].events().len();
        while events < DRAIN_EVENTS {
            let Ok(next) = tokio::time::timeout(Duration::ZERO, stream.message()).await else {
                break;
            };
            let Some(next) = next.during(|| format!("watching {source}"))? else {
                break;
            };
            if next.created() || next.canceled() || next.compact_revision() > 0 || next.events().is_empty() {
                pending = Some(next);
                break;
            }
            events += next.events().len();
            responses.push(next);
        }
        let header = responses
            .iter()
            .filter_map(|r| r.header().map(|h| SourceRevision(h.revision())))
            .max()
            .unwrap_or(header);
        let mut revisions: Vec<(SourceRevision, Vec<Change>)> = Vec::new();
        for r in &responses {
            // Each response holds whole revisions in order.
            let floor = taken;
            for event in r.events() {
                let Some(kv) = event.kv() else { continue };
                let revision = SourceRevision(kv.mod_revision());
                if revision <= floor {
                    continue;
                }
                taken = taken.max(revision);
                let change = Change {
                    key: kv.key().to_vec(),
                    value: (event.event_type() == EventType::Put).then(|| kv.value().to_vec()),
                    mirrored: is_mirrored(kv.key()),
                };
                match revisions.last_mut() {
                    Some((r, changes)) if *r == revision => changes.push(change),
                    _ => revisions.push((revision, vec![change])),
                }
            }
        }
        for batch in plan(&revisions, &mark, hb_key.as_bytes(), &limits) {
            let Some(next) = batch.mark else { continue };
            let span = shared.telemetry.root("agent.mirror", || {
                vec![
                    KeyValue::new("tern.region", shared.region.to_string()),
                    KeyValue::new("tern.source_region", source.to_string()),
                    KeyValue::new("tern.source_revision", next.revision.0),
                    KeyValue::new("tern.source_revisions", batch.revisions.len() as i64),
                    KeyValue::new("tern.events", batch.changes.len() as i64),
                ]
            });
            let started = Instant::now();
            let outcome = apply(local, source, leadership, &mark, &batch, shared).await;
            tracing::debug!(
                source = %source,
                revision = next.revision.0,
                revisions = batch.revisions.len(),
                events = batch.changes.len(),
                apply_ms = started.elapsed().as_millis() as u64,
                "mirror: applied a batch"
            );
            let attributes = match &outcome {
                Ok(revision) => vec![
                    KeyValue::new("tern.revision", revision.0),
                    KeyValue::new("tern.guard", "held"),
                ],
                Err(AgentError::NotLeader(_)) => vec![KeyValue::new("tern.guard", "refused")],
                Err(_) => vec![],
            };
            finish(span, attributes, outcome.as_ref().map(|_| ()));
            if let Err(e) = outcome {
                if matches!(e, AgentError::NotLeader(_)) {
                    // A write this agent attempted was refused: it no longer leads.
                    shared.metrics.refused_writes.inc();
                }
                return Err(e);
            }
            mark = next;
            shared
                .metrics
                .applied_revisions
                .get_or_create(&crate::metrics::Metrics::source(source.as_str()))
                .inc_by(batch.revisions.len() as u64);
            let now = Instant::now();
            let wall = shared.wall_ms();
            let beats: Vec<Heartbeat> = batch
                .heartbeats
                .iter()
                .filter_map(|v| serde_json::from_slice(v).ok())
                .collect();
            shared.with_mirror(source, |m| {
                m.applied = mark.complete();
                m.source_revision = m.source_revision.max(header);
                if let Some(b) = beats.last() {
                    m.lag.applied(now, wall, b);
                }
            });
        }
    }
}

/// Applies one batch, guarded by leadership and by the applied record still
/// being `previous` (no revision twice, none skipped). A batch that carries
/// a source heartbeat also moves the mirror's closed time
/// (`mirror_closed_key`), in the same transaction, when the clock offset to
/// the source is measured. Returns the local revision it committed at.
async fn apply(
    local: &Client,
    source: &RegionName,
    leadership: &Leadership,
    previous: &Mark,
    batch: &Batch,
    shared: &Shared,
) -> Result<Revision> {
    let mut ops: Vec<TxnOp> = batch
        .changes
        .iter()
        .map(|c| {
            let key = mirror_key(source, &c.key);
            match &c.value {
                Some(v) => TxnOp::put(key, v.clone(), None),
                None => TxnOp::delete(key, None),
            }
        })
        .collect();
    let beats: Vec<Heartbeat> = batch
        .heartbeats
        .iter()
        .filter_map(|v| serde_json::from_slice(v).ok())
        .collect();
    let (now, wall) = (Instant::now(), shared.wall_ms());
    let closed = shared.with_mirror(source, |m| {
        for b in &beats {
            m.lag.sample(now, wall, b, &shared.region);
        }
        beats.last().and_then(|b| m.lag.closed_ms(now, b.wall_ms))
    });
    if let Some(closed) = closed {
        ops.push(TxnOp::put(mirror_closed_key(source), closed.to_string(), None));
    }
    let next = batch.mark.unwrap_or(*previous);
    let applied_key = mirror_applied_key(source);
    ops.push(TxnOp::put(applied_key.clone(), next.to_string(), None));
    let txn = Txn::new()
        .when([
            leadership.guard(),
            not_promoted(source),
            Compare::value(applied_key, CompareOp::Equal, previous.to_string()),
        ])
        .and_then(ops);
    let resp = local
        .clone()
        .txn(txn)
        .await
        .during(|| format!("applying revisions up to {next} of {source}"))?;
    if !resp.succeeded() {
        return Err(lost_or_raced(local, leadership, source).await);
    }
    Ok(Revision(resp.header().map(|h| h.revision()).unwrap_or(0)))
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
    let prefix = mirror_data_prefix(source);
    let applied_key = mirror_applied_key(source);
    let guarded = |ops: Vec<TxnOp>| {
        Txn::new()
            .when([leadership.guard(), not_promoted(source)])
            .and_then(ops)
    };
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
    // The snapshot is read in pages, all at the revision of the first: one
    // range of a large region would pass gRPC's 4 MiB message limit.
    let limits = Limits::for_prefix(mirror_key(source, b"").len());
    let mut pages = Pages::range(MIRRORED_START, MIRRORED_END, 256);
    let mut keys = 0usize;
    while let Some(page) = pages
        .next(&mut source_client.clone())
        .await
        .during(|| format!("reading a snapshot of {source}"))?
    {
        let revision = pages.revision().unwrap_or(0);
        let changes: Vec<Change> = page
            .kvs()
            .iter()
            .filter(|kv| is_mirrored(kv.key()))
            .map(|kv| Change {
                key: kv.key().to_vec(),
                value: Some(kv.value().to_vec()),
                mirrored: true,
            })
            .collect();
        keys += changes.len();
        // Cut into transactions within etcd's limits, as the stream is.
        let batches = plan(
            &[(SourceRevision(revision), changes)],
            &Mark::whole(SourceRevision(revision - 1)),
            b"",
            &limits,
        );
        for batch in batches {
            let ops = batch
                .changes
                .iter()
                .map(|ch| TxnOp::put(mirror_key(source, &ch.key), ch.value.clone().unwrap_or_default(), None))
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
    }
    let revision = SourceRevision(pages.revision().unwrap_or(0));
    let done = guarded(vec![TxnOp::put(applied_key, revision.to_string(), None)]);
    if !c
        .txn(done)
        .await
        .during(|| format!("finishing the resync of {source}"))?
        .succeeded()
    {
        return Err(AgentError::NotLeader(format!("resync of {source} refused")));
    }
    tracing::info!(source = %source, %revision, keys, "mirror resynchronised");
    shared.with_mirror(source, |m| {
        m.applied = revision;
        m.state = MirrorState::Streaming;
    });
    Ok(Resynced { revision, keys })
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
