//! The one request path every data operation takes: parse the request into
//! a validated `Op`, then `execute` it: a BOUNDED read may be served from
//! this region's mirror; otherwise route (placement cache) → run it in this
//! region's group (one fenced transaction) or forward it to the home
//! region's router → after a fence miss or a moved account, refresh the
//! placement and go again within the deadline. During a move the fences
//! lead the directory: a source fenced for a move, or marked moved, sends
//! the call on to the target at the next epoch (a home hint), where it waits
//! for the copy to land, so a move costs writes about one round trip to
//! the source and the mirror's delay, not the directory's switch too. `serve` wraps it with the
//! call's deadline, its `router.request` span and its metrics, so every
//! operation gets the same spans, metrics and retry rules by construction.
//!
//! What each retry decision may assume is decided by `decide`, a pure
//! function tested without etcd: a write that may have left is never sent
//! again unless it carries an idempotency key, and a write that may have
//! been applied is never answered with a status that says it was not.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanKind, TraceContextExt};
use tern_common::{AccountId, AccountRecord, AccountState, Epoch, FenceState, RegionName, RegionState, user_key_of};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::counts::WriteCounts;
use crate::error::{Result, RouterError};
use crate::forward::{ForwardFailure, Forwardable, Forwarder, MOVED};
use crate::metrics::{Metrics, Route};
use crate::ops::{self, Op};
use crate::pb;
use crate::peer::{Caller, Hint, PeerToken};
use crate::placement::{Directory, Placement, REFRESH_GAP};
use crate::store::{Guarded, HomeStore, Item, Output, Record};

/// Longest deadline a client may ask for.
const MAX_DEADLINE: Duration = Duration::from_secs(60);
/// Pause before sending again over a link that failed.
const LINK_RETRY: Duration = Duration::from_millis(50);
/// How long a call waits for its region's lease to be confirmed again (an
/// agent taking over) before it is refused as not serving.
const LEASE_WAIT: Duration = Duration::from_secs(3);
/// How often it looks meanwhile.
const LEASE_LOOK: Duration = Duration::from_millis(50);
/// The pause before a keyed write whose outcome was unknown is sent again.
const KEYED_RETRY: Duration = Duration::from_millis(20);

/// A data operation: a request on one account's keys.
pub trait Rpc: Forwardable {
    /// Its name in metrics and spans.
    const NAME: &'static str;
    /// Validates the request.
    fn parse(&self) -> Result<Op>;
    /// The answer to `op`, committed, replayed or read from a mirror.
    fn answer(&self, op: &Op, answer: Answer) -> Result<Self::Response>;
}

/// What the answer to a client says about where and how it was served.
#[derive(Clone, Debug)]
pub struct Served {
    pub by: RegionName,
    pub home: RegionName,
    pub epoch: Epoch,
    pub revision: i64,
    /// From this region's mirror of the home, at most this stale (ms).
    pub mirror_staleness_ms: Option<u64>,
}

/// The outcome of an operation that succeeded.
#[derive(Clone, Debug)]
pub enum Answer {
    Done {
        output: Output,
        served: Served,
    },
    /// A retry of an idempotent write: the first attempt's record.
    Replayed {
        record: Record,
        served: Served,
    },
}

impl Served {
    fn write_meta(&self, replayed: bool) -> pb::WriteMeta {
        pb::WriteMeta {
            home_region: self.home.to_string(),
            epoch: self.epoch.0,
            revision: self.revision,
            replayed,
            forwarded: false,
        }
    }

    fn read_meta(&self) -> pb::ReadMeta {
        pb::ReadMeta {
            served_by_region: self.by.to_string(),
            home_region: self.home.to_string(),
            epoch: self.epoch.0,
            revision: self.revision,
            forwarded: false,
            from_mirror: self.mirror_staleness_ms.is_some(),
            staleness_ms: self
                .mirror_staleness_ms
                .map_or(0, |s| u32::try_from(s).unwrap_or(u32::MAX)),
        }
    }
}

/// Per-call facts: from the request's metadata, and what happened so far.
pub struct Incoming {
    op: &'static str,
    started: Instant,
    deadline: Instant,
    /// Region whose client sent the request (this one unless forwarded).
    origin: RegionName,
    forwarded: bool,
    /// Where the forwarding router believes the account is homed (its
    /// placement, or a fence's word during a move).
    hint: Option<Hint>,
    /// The caller's trace context (empty when it sent none).
    parent: opentelemetry::Context,
    /// This call's context: its `router.request` span when tracing, else the
    /// caller's context, which forwarding passes on.
    cx: opentelemetry::Context,
    /// What the request span records once known.
    info: std::sync::Mutex<SpanInfo>,
    attempts: AtomicU32,
    /// Fence misses so far: the pause before the next retry grows with them.
    fence_misses: AtomicU32,
    /// A write attempt is under way (sent or queued): if the deadline ends
    /// the call now, the write may still be applied.
    in_flight: AtomicBool,
    /// An earlier attempt of this write may have been applied.
    maybe_applied: AtomicBool,
}

#[derive(Default)]
struct SpanInfo {
    account: String,
    home: String,
    epoch: u64,
}

impl Incoming {
    fn note(&self, account: &AccountId, p: &Placement) {
        let mut info = self.info.lock().unwrap_or_else(|e| e.into_inner());
        info.account = account.to_string();
        info.home = p.home.to_string();
        info.epoch = p.epoch.0;
    }

    fn route(&self) -> Route {
        if self.forwarded { Route::ProxiedIn } else { Route::Local }
    }

    /// Runs one attempt of a write (or a read, `writes` false), noting
    /// while it is in flight.
    async fn attempt<T>(&self, writes: bool, f: impl Future<Output = T>) -> T {
        self.in_flight.store(writes, Ordering::Relaxed);
        let out = f.await;
        self.in_flight.store(false, Ordering::Relaxed);
        out
    }

    /// The answer when the deadline ends the call.
    fn at_deadline(&self, region: &RegionName) -> RouterError {
        let waited = self.started.elapsed();
        if self.in_flight.load(Ordering::Relaxed) || self.maybe_applied.load(Ordering::Relaxed) {
            RouterError::OutcomeUnknown {
                detail: format!("the deadline passed after {waited:?} while the write was in flight in {region}"),
                source: None,
            }
        } else {
            RouterError::Deadline(format!(
                "after {waited:?} ({} in {region}); nothing was applied",
                self.op
            ))
        }
    }
}

/// What to do after an attempt failed.
#[derive(Debug)]
pub enum Next {
    /// Route again now (the placement changed): to the hint if there is
    /// one, else after refreshing the placement.
    Reroute(Option<Hint>),
    /// Send again after this pause.
    RetryAfter(Duration),
    /// Give the client this answer.
    Fail(RouterError),
}

/// The pause before the retry that follows fence miss number `misses`
/// (from 0) of one call: 5 ms doubling up to 250 ms, of which a random half
/// (`jitter` in [0, 1)) is taken off so that the calls waiting on one
/// account do not retry in step.
pub fn fence_miss_pause(misses: u32, jitter: f64) -> Duration {
    let full = Duration::from_millis(5)
        .saturating_mul(1u32 << misses.min(16))
        .min(REFRESH_GAP);
    full.mul_f64(1.0 - jitter.clamp(0.0, 1.0) / 2.0)
}

/// The pause before looking again for a move's copy to land in this
/// region (miss number `misses` of one call): 2 ms doubling up to 16 ms,
/// jittered like [`fence_miss_pause`]. Short, because the copy lands about
/// one round trip after the source was fenced and every millisecond of it
/// is the move's unavailability; each look is one local transaction.
pub fn landing_pause(misses: u32, jitter: f64) -> Duration {
    let full = Duration::from_millis(2)
        .saturating_mul(1u32 << misses.min(8))
        .min(Duration::from_millis(16));
    full.mul_f64(1.0 - jitter.clamp(0.0, 1.0) / 2.0)
}

/// Where a fence miss in `here`'s group says to go: to the target of a
/// move, at the next epoch. A `moved` fence says it for certain, unless it
/// is older than the attempt's epoch (left from an earlier life of the
/// account here, before it moved back); a `fenced` one when the placement
/// of the attempt says the account is migrating from here.
pub fn hint_from_fence(here: &RegionName, p: &Placement, found: Option<&tern_common::Fence>) -> Option<Hint> {
    let found = found?;
    match &found.state {
        FenceState::Moved(to) if to != here && found.epoch >= p.epoch => Some(Hint {
            home: to.clone(),
            epoch: found.epoch.next(),
            settled: true,
        }),
        FenceState::Fenced if found.epoch == p.epoch && p.home == *here => match &p.state {
            AccountState::Migrating { target } if target != here => Some(Hint {
                home: target.clone(),
                epoch: found.epoch.next(),
                settled: false,
            }),
            _ => None,
        },
        _ => None,
    }
}

/// The decision after a forward to `home` failed. `unkeyed_write`: sending
/// it again could apply it twice; `writes`: it changes data.
pub fn decide(
    failure: ForwardFailure,
    home: &RegionName,
    writes: bool,
    unkeyed_write: bool,
    time_left: Duration,
) -> Next {
    match failure {
        ForwardFailure::Answer(s) => Next::Fail(RouterError::Remote(s)),
        ForwardFailure::Moved(hint) => Next::Reroute(hint),
        ForwardFailure::Unknown(source) if unkeyed_write => Next::Fail(RouterError::OutcomeUnknown {
            detail: format!("the link to {home} failed after the write was sent"),
            source: Some(source),
        }),
        ForwardFailure::Deadline if writes => Next::Fail(RouterError::OutcomeUnknown {
            detail: format!("the deadline passed waiting for {home}"),
            source: None,
        }),
        ForwardFailure::Deadline => Next::Fail(RouterError::Deadline(format!("waiting for {home}"))),
        ForwardFailure::Unknown(source) if time_left <= LINK_RETRY => Next::Fail(if writes {
            RouterError::OutcomeUnknown {
                detail: format!("the link to {home} failed after the write was sent, and no time is left to retry"),
                source: Some(source),
            }
        } else {
            RouterError::RegionUnreachable {
                region: home.clone(),
                source,
            }
        }),
        ForwardFailure::NotSent(source) if time_left <= LINK_RETRY => Next::Fail(RouterError::RegionUnreachable {
            region: home.clone(),
            source,
        }),
        // Safe to send again: never sent, a read, or a write whose
        // idempotency key makes a second delivery a replay.
        ForwardFailure::NotSent(_) | ForwardFailure::Unknown(_) => Next::RetryAfter(LINK_RETRY),
    }
}

/// Everything a call needs; shared by every call.
pub struct Executor {
    pub region: RegionName,
    pub directory: Directory,
    pub store: HomeStore,
    pub forwarder: Forwarder,
    pub counts: Arc<WriteCounts>,
    pub metrics: Arc<Metrics>,
    pub default_deadline: Duration,
    pub telemetry: crate::telemetry::Telemetry,
    /// Trusts forwarding headers only from routers that show it.
    pub peer_token: Option<PeerToken>,
    /// Added to the wall clock (a test hook; see `Config::clock_offset_ms`).
    pub clock_offset_ms: i64,
}

impl Executor {
    /// Reads the call's deadline, origin and trace context.
    fn incoming<T>(&self, op: &'static str, request: &Request<T>) -> Result<Incoming> {
        let md = request.metadata();
        let timeout = match md.get("grpc-timeout").and_then(|v| v.to_str().ok()) {
            Some(t) => parse_grpc_timeout(t)
                .ok_or_else(|| RouterError::BadRequest(format!("grpc-timeout `{t}` is malformed")))?,
            None => self.default_deadline,
        };
        let peer = request.extensions().get::<tern_common::tls::PeerInfo>();
        let caller = crate::peer::caller(md, self.peer_token.as_ref(), peer).map_err(RouterError::BadRequest)?;
        let (origin, forwarded, hint) = match caller {
            Caller::Peer { origin, hint } => (origin, true, hint),
            Caller::Client { forged } => {
                if forged {
                    self.metrics.untrusted_forward_headers.inc();
                }
                (self.region.clone(), false, None)
            }
        };
        let now = Instant::now();
        // Answer a little before the client gives up, so that it hears
        // the outcome rather than cancelling blind.
        let timeout = timeout.min(MAX_DEADLINE);
        let margin = (timeout / 20).min(Duration::from_millis(50));
        Ok(Incoming {
            op,
            started: now,
            deadline: now + timeout - margin,
            origin,
            forwarded,
            hint,
            parent: crate::telemetry::extract(md),
            cx: opentelemetry::Context::new(),
            info: std::sync::Mutex::default(),
            attempts: AtomicU32::new(0),
            fence_misses: AtomicU32::new(0),
            in_flight: AtomicBool::new(false),
            maybe_applied: AtomicBool::new(false),
        })
    }

    /// Serves one data operation.
    pub async fn serve<R: Rpc>(&self, request: Request<R>) -> Result<Response<R::Response>, Status> {
        let call = self.incoming(R::NAME, &request);
        let wire = request.into_inner();
        self.serve_with(call, async |call| self.execute(call, wire).await).await
    }

    /// Runs `work` within the call's deadline as a `router.request` span,
    /// and records its outcome.
    pub async fn serve_with<T>(
        &self,
        call: Result<Incoming>,
        work: impl AsyncFnOnce(&Incoming) -> Result<(T, Route)>,
    ) -> Result<Response<T>, Status> {
        let mut call = call.map_err(|e| e.into_status(&self.region))?;
        let span = self
            .telemetry
            .span("router.request", SpanKind::Server, &call.parent, || {
                vec![
                    KeyValue::new("tern.operation", call.op),
                    KeyValue::new("tern.origin_region", call.origin.to_string()),
                    KeyValue::new("tern.region", self.region.to_string()),
                ]
            });
        let traced = span.is_some();
        call.cx = span.unwrap_or_else(|| call.parent.clone());
        let outcome = match tokio::time::timeout_at(call.deadline, work(&call)).await {
            Ok(r) => r,
            Err(_) => Err(call.at_deadline(&self.region)),
        };
        let elapsed = call.started.elapsed().as_secs_f64();
        if traced {
            let span = call.cx.span();
            let info = call.info.lock().unwrap_or_else(|e| e.into_inner());
            span.set_attribute(KeyValue::new("tern.account", info.account.clone()));
            span.set_attribute(KeyValue::new("tern.home_region", info.home.clone()));
            span.set_attribute(KeyValue::new("tern.epoch", info.epoch as i64));
            match &outcome {
                Ok(_) => span.set_attribute(KeyValue::new("tern.outcome", "OK")),
                Err(e) => {
                    let code = e.code();
                    span.set_attribute(KeyValue::new("tern.outcome", format!("{code:?}")));
                    span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
                    span.set_status(opentelemetry::trace::Status::error(e.to_string()));
                }
            }
            span.end();
        }
        match outcome {
            Ok((value, route)) => {
                self.metrics.observe(call.op, route, tonic::Code::Ok, elapsed);
                Ok(Response::new(value))
            }
            Err(e) => {
                let moved = match &e {
                    RouterError::NotHome { hint, .. } => {
                        Some(hint.as_ref().map_or_else(|| "-".into(), Hint::to_header))
                    }
                    _ => None,
                };
                let mut status = e.into_status(&self.region);
                if let Some(moved) = moved
                    && let Ok(v) = moved.parse()
                {
                    status.metadata_mut().insert(MOVED, v);
                }
                self.metrics.observe(call.op, call.route(), status.code(), elapsed);
                Err(status)
            }
        }
    }

    /// The request path of a data operation.
    async fn execute<R: Rpc>(&self, call: &Incoming, wire: R) -> Result<(R::Response, Route)> {
        let op = wire.parse()?;
        if let Some(max) = op.bounded_ms
            && !call.forwarded
            && let Some(answer) = self.read_mirror(call, &op, max).await?
        {
            return Ok((wire.answer(&op, answer)?, Route::Local));
        }
        // Whatever ends the loop, an answer that says "not applied" must
        // not follow an attempt that may have been.
        self.attempts(call, &op, wire).await.map_err(|e| self.truthful(call, e))
    }

    /// Route, run or forward, and go again after a fence miss or a moved
    /// account, until an answer or the deadline.
    async fn attempts<R: Rpc>(&self, call: &Incoming, op: &Op, wire: R) -> Result<(R::Response, Route)> {
        let writes = op.work.writes();
        // Where a fence said the account went, ahead of the directory.
        let mut hint = call.hint.clone();
        // Since when this region has refused this call for want of a
        // confirmed lease.
        let mut not_serving_since: Option<Instant> = None;
        loop {
            let followed = match &hint {
                Some(h) => self.follow(&op.account, h).await?,
                None => None,
            };
            let p = match followed {
                Some(p) => {
                    call.note(&op.account, &p);
                    p
                }
                None => {
                    hint = None;
                    self.route(call, &op.account).await?
                }
            };
            if p.home != self.region {
                // The home router learns what this one believes: with a
                // newer placement it answers where to go instead of reading
                // the directory.
                let believed = hint.clone().unwrap_or_else(|| Hint {
                    home: p.home.clone(),
                    epoch: p.epoch,
                    settled: p.state == AccountState::Active,
                });
                let sent = call
                    .attempt(writes, self.forward(call, &p.home, wire.clone(), Some(&believed)))
                    .await;
                let failure = match sent {
                    Ok(mut resp) => {
                        R::mark_forwarded(&mut resp);
                        return Ok((resp, Route::ProxiedOut));
                    }
                    Err(f) => f,
                };
                if writes && matches!(failure, ForwardFailure::Unknown(_) | ForwardFailure::Deadline) {
                    call.maybe_applied.store(true, Ordering::Relaxed);
                }
                let time_left = call.deadline.saturating_duration_since(Instant::now());
                match decide(failure, &p.home, writes, op.unkeyed_write(), time_left) {
                    Next::Reroute(Some(next)) => hint = Some(next),
                    Next::Reroute(None) => {
                        hint = None;
                        self.metrics.placement_refreshes.inc();
                        // Not found any more is the next attempt's answer.
                        let _ = self.directory.refresh(&op.account).await;
                    }
                    Next::RetryAfter(pause) => tokio::time::sleep(pause).await,
                    Next::Fail(e) => return Err(e),
                }
                continue;
            }
            let outcome = call.attempt(writes, self.run_home(call, op, &p)).await;
            let served = |revision| Served {
                by: self.region.clone(),
                home: p.home.clone(),
                epoch: p.epoch,
                revision,
                mirror_staleness_ms: None,
            };
            let outcome = match outcome {
                // The region's lease is not confirmed: nothing was sent.
                // A new agent leader confirms it within seconds, so wait
                // that long (within the deadline) before telling the
                // client; a region cut off for longer refuses.
                Err(RouterError::NotServing { .. })
                    if not_serving_since.get_or_insert_with(Instant::now).elapsed() < LEASE_WAIT
                        && call.deadline.saturating_duration_since(Instant::now()) > LEASE_LOOK =>
                {
                    tokio::time::sleep(LEASE_LOOK).await;
                    continue;
                }
                // A keyed write whose commit answer was lost (the group's
                // leader changed under it, a connection reset): sending it
                // again is safe, since its idempotency record makes a second
                // commit a replay, so it is retried within the deadline
                // instead of leaving the client an unknown outcome (a
                // planned leader hand-over keeps keyed writes flowing).
                Err(RouterError::OutcomeUnknown { .. })
                    if writes
                        && op.idempotency.is_some()
                        && call.deadline.saturating_duration_since(Instant::now()) > KEYED_RETRY =>
                {
                    call.maybe_applied.store(true, Ordering::Relaxed);
                    self.metrics.retries.inc();
                    tokio::time::sleep(KEYED_RETRY).await;
                    continue;
                }
                other => other,
            };
            match outcome? {
                Guarded::Done { revision, output } => {
                    if writes {
                        self.count_write(&op.account, call);
                    }
                    let answer = Answer::Done {
                        output,
                        served: served(revision),
                    };
                    return Ok((wire.answer(op, answer)?, call.route()));
                }
                Guarded::Replayed { record, revision } => {
                    op.check_replay(&record)?;
                    let answer = Answer::Replayed {
                        record,
                        served: served(revision),
                    };
                    return Ok((wire.answer(op, answer)?, call.route()));
                }
                Guarded::CompareFailed => {
                    return Err(RouterError::CompareFailed(
                        "a compare did not hold; nothing was applied".into(),
                    ));
                }
                Guarded::NotPromoted => {
                    // This region succeeded the account's failed home, and
                    // its agent has not promoted the mirror yet (or a newer
                    // failover is on its way here): wait within the
                    // deadline. Nothing was applied.
                    self.metrics.retries.inc();
                    let misses = call.fence_misses.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(fence_miss_pause(misses, rand::random())).await;
                    hint = None;
                }
                Guarded::Fence(found) => {
                    let landing = hint.as_ref().is_some_and(|h| !h.settled);
                    if landing && found.as_ref().is_none_or(|f| f.epoch < p.epoch) {
                        // Here is the target of a move and its copy has
                        // not landed (no fence, or one of an earlier life
                        // here): wait here while the hint stays believable.
                        self.metrics.retries.inc();
                        let misses = call.fence_misses.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(landing_pause(misses, rand::random())).await;
                        continue;
                    }
                    if let Some(next) = hint_from_fence(&self.region, &p, found.as_ref()) {
                        // Fenced or moved for a move: on to the target, now.
                        self.metrics.retries.inc();
                        if call.forwarded {
                            return Err(RouterError::NotHome {
                                home: next.home.clone(),
                                hint: Some(next),
                            });
                        }
                        hint = Some(next);
                        continue;
                    }
                    hint = None;
                    self.after_fence_miss(call, &op.account, &p, found).await?
                }
            }
        }
    }

    /// The placement a hint stands for while it is believable: the
    /// directory (as cached here) is not past it, and a tentative hint
    /// needs the placement to say the account is migrating to the hinted
    /// home (read again once, throttled, if the cache does not say so yet).
    /// None: route by the directory instead.
    async fn follow(&self, account: &AccountId, h: &Hint) -> Result<Option<Placement>> {
        let believable = |p: &Placement| {
            h.settled
                || p.epoch.next() == h.epoch
                    && matches!(&p.state, AccountState::Migrating { target } if *target == h.home)
        };
        let mut p = self.directory.lookup(account).await?;
        if p.epoch == h.epoch && p.home == h.home {
            return Ok(Some(p));
        }
        if p.epoch >= h.epoch {
            return Ok(None);
        }
        if !believable(&p) {
            p = self.directory.refresh_throttled(account).await?;
            if p.epoch == h.epoch && p.home == h.home {
                return Ok(Some(p));
            }
            if p.epoch >= h.epoch || !believable(&p) {
                return Ok(None);
            }
        }
        Ok(Some(Placement {
            home: h.home.clone(),
            epoch: h.epoch,
            state: AccountState::Active,
            ..p
        }))
    }

    /// An error that says "not applied" or "retry" becomes "outcome
    /// unknown" once an earlier attempt of this write may have been applied,
    /// also when the home router said it: it only knows about the attempt
    /// it served (a later attempt can meet a moved fence after an earlier
    /// one committed).
    fn truthful(&self, call: &Incoming, e: RouterError) -> RouterError {
        let silent = matches!(
            e.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Internal
        );
        if silent && call.maybe_applied.load(Ordering::Relaxed) {
            return RouterError::OutcomeUnknown {
                detail: format!("an earlier attempt may have been applied, and the last one failed: {e}"),
                source: Some(Box::new(e)),
            };
        }
        e
    }

    /// Where the account is served: here, or the home region's router. A
    /// forwarded call is never forwarded again: if this router is not the
    /// home, the caller routes again.
    async fn route(&self, call: &Incoming, account: &AccountId) -> Result<Placement> {
        let p = self.directory.lookup(account).await?;
        call.note(account, &p);
        if p.home == self.region || !call.forwarded {
            return Ok(p);
        }
        if let Some(h) = &call.hint
            && p.epoch > h.epoch
            && p.state == AccountState::Active
        {
            // This router's placement is newer than the caller's: where
            // to go, without a directory read on either side.
            return Err(RouterError::NotHome {
                home: p.home.clone(),
                hint: Some(Hint {
                    home: p.home,
                    epoch: p.epoch,
                    settled: true,
                }),
            });
        }
        self.metrics.placement_refreshes.inc();
        let p = self.directory.refresh(account).await?;
        if p.home == self.region {
            Ok(p)
        } else {
            Err(RouterError::NotHome {
                home: p.home,
                hint: None,
            })
        }
    }

    /// After a fence miss: pause (jittered, growing with each miss of this
    /// call), then refresh the placement, at most every [`REFRESH_GAP`] per
    /// account. The caller retries within its deadline, so a migration is
    /// latency to the client, and a long one costs the directory a few
    /// reads a second, not one per retry.
    async fn after_fence_miss(
        &self,
        call: &Incoming,
        account: &AccountId,
        p: &Placement,
        found: Option<tern_common::Fence>,
    ) -> Result<()> {
        self.metrics.retries.inc();
        self.metrics.placement_refreshes.inc();
        if found.is_none() {
            // No fence where the placement points: only a linearizable read
            // can say whether the placement moved or the fence is missing.
            let fresh = self.directory.refresh(account).await?;
            if fresh.home == p.home && fresh.epoch == p.epoch {
                return Err(RouterError::Unavailable(format!(
                    "account {account} is homed in {} at epoch {} but its fence is missing there",
                    p.home, p.epoch
                )));
            }
            return Ok(());
        }
        let misses = call.fence_misses.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(fence_miss_pause(misses, rand::random())).await;
        self.directory.refresh_throttled(account).await?;
        Ok(())
    }

    /// Forwards `wire` to `home` as a `router.forward` span.
    async fn forward<R: Forwardable>(
        &self,
        call: &Incoming,
        home: &RegionName,
        wire: R,
        hint: Option<&Hint>,
    ) -> std::result::Result<R::Response, ForwardFailure> {
        let attempt = call.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        let span_cx = self.telemetry.span("router.forward", SpanKind::Client, &call.cx, || {
            vec![
                KeyValue::new("tern.target_region", home.to_string()),
                KeyValue::new("tern.attempt", i64::from(attempt)),
            ]
        });
        let forward_cx = span_cx.as_ref().unwrap_or(&call.cx);
        let result = self.forwarder.send(home, call.deadline, wire, forward_cx, hint).await;
        if let Some(cx) = &span_cx {
            let span = cx.span();
            if let Err(failure) = &result {
                span.set_status(opentelemetry::trace::Status::error(failure.describe()));
            }
            span.end();
        }
        if let Err(failure) = &result
            && !matches!(failure, ForwardFailure::Answer(_))
        {
            self.metrics
                .forward_failures
                .get_or_create(&crate::metrics::ForwardLabels {
                    region: home.to_string(),
                    kind: failure.kind(),
                })
                .inc();
            self.metrics.retries.inc();
        }
        result
    }

    /// Runs `op` in this region's group under the fence, as a `store.txn`
    /// span.
    async fn run_home(&self, call: &Incoming, op: &Op, p: &Placement) -> Result<Guarded> {
        let cx = self.telemetry.span("store.txn", SpanKind::Client, &call.cx, || {
            vec![
                KeyValue::new("tern.group", self.region.to_string()),
                KeyValue::new("tern.epoch", p.epoch.0 as i64),
            ]
        });
        let idempotency = op.idempotency.as_ref().map(|k| (k, op.record.clone()));
        let area = self.directory.area(&op.account, &self.region, p.epoch).await;
        let result = self.store.run(&op.account, p.epoch, &area, idempotency, &op.work).await;
        if let Some(cx) = cx {
            let span = cx.span();
            match &result {
                Ok(Guarded::Done { revision, .. }) => {
                    span.set_attribute(KeyValue::new("tern.revision", *revision));
                    span.set_attribute(KeyValue::new("tern.guard", "held"));
                }
                Ok(Guarded::Replayed { revision, .. }) => {
                    span.set_attribute(KeyValue::new("tern.revision", *revision));
                    span.set_attribute(KeyValue::new("tern.guard", "replayed"));
                }
                Ok(Guarded::Fence(_)) => span.set_attribute(KeyValue::new("tern.guard", "fence_failed")),
                Ok(Guarded::CompareFailed) => span.set_attribute(KeyValue::new("tern.guard", "compare_failed")),
                Ok(Guarded::NotPromoted) => span.set_attribute(KeyValue::new("tern.guard", "not_promoted")),
                Err(e) => span.set_status(opentelemetry::trace::Status::error(e.to_string())),
            }
            span.end();
        }
        result
    }

    /// A BOUNDED read served from this region's mirror of the account's
    /// home, when the mirror holds the account at its current epoch and is
    /// fresh enough. How stale it may be is read with the value, from the
    /// same snapshot of this region's own group: now minus the mirror's
    /// closed time, which its agent moves with every applied source
    /// heartbeat (corrected by the measured clock offset and its error
    /// bound), so it is never below the truth and needs no directory record
    /// whose age would have to be added. Routers and agents of one region
    /// are assumed to share a synchronised clock. None: serve it from the
    /// home.
    async fn read_mirror(&self, call: &Incoming, op: &Op, max_staleness_ms: u64) -> Result<Option<Answer>> {
        let p = self.directory.lookup(&op.account).await?;
        call.note(&op.account, &p);
        if p.home == self.region {
            return Ok(None);
        }
        // Homed in a failed region: its successor writes the account now,
        // in an area no other region mirrors, while the failed region's
        // heartbeats may still make this region's mirror of it look fresh
        // (`tern verify` seed 205 read values 7 s old within a 1 s bound).
        if self
            .directory
            .cached(&op.account)
            .await
            .is_some_and(|raw| raw.home != p.home)
        {
            return Ok(None);
        }
        let Some(read) = self.store.read_mirror(&op.account, &p.home, p.epoch, &op.work).await? else {
            return Ok(None);
        };
        let Some(closed_ms) = read.closed_ms else {
            return Ok(None);
        };
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
            + self.clock_offset_ms;
        let staleness = (now_ms - closed_ms).max(0) as u64;
        if staleness > max_staleness_ms {
            return Ok(None);
        }
        Ok(Some(Answer::Done {
            output: read.output,
            served: Served {
                by: self.region.clone(),
                home: p.home,
                epoch: p.epoch,
                revision: 0,
                mirror_staleness_ms: Some(staleness),
            },
        }))
    }

    fn count_write(&self, account: &AccountId, call: &Incoming) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.counts.record(account, &call.origin, now);
    }

    /// CreateAccount: not a data operation (it is routed by the requested
    /// home, not by a placement), but it is served, forwarded and measured
    /// the same way.
    pub async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::CreateAccountResponse>, Status> {
        let call = self.incoming("create_account", &request);
        let r = request.into_inner();
        self.serve_with(call, async |call| self.create(call, r).await).await
    }

    async fn create(&self, call: &Incoming, r: pb::CreateAccountRequest) -> Result<(pb::CreateAccountResponse, Route)> {
        let account = AccountId::new(&r.account)?;
        let home = if r.home_region.is_empty() {
            self.region.clone()
        } else {
            RegionName::new(&r.home_region)?
        };
        let allowed = r
            .allowed_regions
            .iter()
            .map(|a| RegionName::new(a.as_str()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if !allowed.is_empty() && !allowed.contains(&home) {
            return Err(RouterError::BadRequest(format!(
                "home_region {home} is not in allowed_regions"
            )));
        }
        if home != self.region {
            if call.forwarded {
                return Err(RouterError::BadRequest(format!(
                    "a forwarded CreateAccount must be homed in {}",
                    self.region
                )));
            }
            if !self.forwarder.knows(&home).await {
                return Err(RouterError::BadRequest(format!(
                    "home_region {home} is not a region of this cluster"
                )));
            }
            let mut message = r.clone();
            message.home_region = home.to_string();
            loop {
                let failure = match self.forward(call, &home, message.clone(), None).await {
                    Ok(resp) => return Ok((resp, Route::ProxiedOut)),
                    Err(f) => f,
                };
                // Creating is idempotent (a second create answers
                // "created: false"), so it is sent again like a read.
                let time_left = call.deadline.saturating_duration_since(Instant::now());
                match decide(failure, &home, false, false, time_left) {
                    Next::Reroute(_) => {}
                    Next::RetryAfter(pause) => tokio::time::sleep(pause).await,
                    Next::Fail(e) => return Err(e),
                }
            }
        }
        if let Ok(existing) = self.directory.refresh(&account).await {
            return if existing.home == home {
                Ok((
                    pb::CreateAccountResponse {
                        account: account.to_string(),
                        home_region: home.to_string(),
                        epoch: existing.epoch.0,
                        created: false,
                    },
                    call.route(),
                ))
            } else {
                Err(RouterError::AccountExists {
                    account,
                    home: existing.home,
                })
            };
        }
        // A region that drains or failed over takes no new accounts (an
        // existing one was answered above: creating is idempotent).
        if let Some(record) = self.directory.region(&home).await
            && record.state != RegionState::Active
        {
            let active = self
                .directory
                .active_regions()
                .await
                .into_iter()
                .filter(|r| allowed.is_empty() || allowed.contains(r))
                .map(|r| r.to_string())
                .collect();
            return Err(RouterError::HomeNotAccepting {
                region: home,
                state: if record.state == RegionState::Failed {
                    "failed over"
                } else {
                    "draining"
                },
                active,
            });
        }
        // The fence first: the account is reachable only once the
        // directory names this region, and then its fence must exist.
        let fence = self.store.create_fence(&account, Epoch(1)).await?;
        let epoch = match fence.state {
            FenceState::Active => fence.epoch,
            _ => {
                return Err(RouterError::Unavailable(format!(
                    "account {account} has fence `{fence}` in {}; it is being moved",
                    self.region
                )));
            }
        };
        let record = AccountRecord {
            home: home.clone(),
            epoch,
            state: AccountState::Active,
            allowed_regions: allowed,
            moved_ms: None,
            pinned: false,
        };
        let (stored, created) = self.directory.create(&account, &record).await?;
        if stored.home != home {
            self.store.remove_unused_fence(&account).await?;
            return Err(RouterError::AccountExists {
                account,
                home: stored.home,
            });
        }
        Ok((
            pb::CreateAccountResponse {
                account: account.to_string(),
                home_region: home.to_string(),
                epoch: stored.epoch.0,
                created,
            },
            call.route(),
        ))
    }
}

/// Parses gRPC's `grpc-timeout` header: digits and a unit (H M S m u n).
pub fn parse_grpc_timeout(text: &str) -> Option<Duration> {
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn found(item: Option<Item>) -> (bool, Vec<u8>, i64) {
    match item {
        Some(i) => (true, i.value, i.mod_revision),
        None => (false, Vec::new(), 0),
    }
}

/// An answer of the wrong shape: a bug, not a client error.
fn mismatch(op: &'static str, output: &Output) -> RouterError {
    RouterError::Internal(format!("{op} got the answer of another operation: {output:?}"))
}

impl Rpc for pb::PutRequest {
    const NAME: &'static str = "put";
    fn parse(&self) -> Result<Op> {
        ops::put(self)
    }
    fn answer(&self, _: &Op, answer: Answer) -> Result<pb::PutResponse> {
        let meta = match answer {
            Answer::Done {
                output: Output::Put,
                served,
            } => served.write_meta(false),
            Answer::Replayed { served, .. } => served.write_meta(true),
            Answer::Done { output, .. } => return Err(mismatch(Self::NAME, &output)),
        };
        Ok(pb::PutResponse { meta: Some(meta) })
    }
}

impl Rpc for pb::DeleteRequest {
    const NAME: &'static str = "delete";
    fn parse(&self) -> Result<Op> {
        ops::delete(self)
    }
    fn answer(&self, _: &Op, answer: Answer) -> Result<pb::DeleteResponse> {
        let (meta, existed) = match answer {
            Answer::Done {
                output: Output::Delete { existed },
                served,
            } => (served.write_meta(false), existed),
            Answer::Replayed { record, served } => (served.write_meta(true), record.existed.unwrap_or(false)),
            Answer::Done { output, .. } => return Err(mismatch(Self::NAME, &output)),
        };
        Ok(pb::DeleteResponse {
            meta: Some(meta),
            existed,
        })
    }
}

impl Rpc for pb::GetRequest {
    const NAME: &'static str = "get";
    fn parse(&self) -> Result<Op> {
        ops::get(self)
    }
    fn answer(&self, _: &Op, answer: Answer) -> Result<pb::GetResponse> {
        match answer {
            Answer::Done {
                output: Output::Get(item),
                served,
            } => {
                let (found, value, mod_revision) = found(item);
                Ok(pb::GetResponse {
                    found,
                    value,
                    mod_revision,
                    meta: Some(served.read_meta()),
                })
            }
            Answer::Done { output, .. } => Err(mismatch(Self::NAME, &output)),
            Answer::Replayed { .. } => Err(RouterError::Internal("a read has no idempotency record".into())),
        }
    }
}

impl Rpc for pb::ListRequest {
    const NAME: &'static str = "list";
    fn parse(&self) -> Result<Op> {
        ops::list(self)
    }
    fn answer(&self, op: &Op, answer: Answer) -> Result<pb::ListResponse> {
        let (items, served) = match answer {
            Answer::Done {
                output: Output::List(items),
                served,
            } => (items, served),
            Answer::Done { output, .. } => return Err(mismatch(Self::NAME, &output)),
            Answer::Replayed { .. } => return Err(RouterError::Internal("a read has no idempotency record".into())),
        };
        let limit = ops::page_limit(self.limit)? as usize;
        let mut items: Vec<pb::KeyValue> = items
            .into_iter()
            .filter_map(|kv| {
                Some(pb::KeyValue {
                    key: user_key_of(&op.account, &kv.key)?,
                    value: kv.value,
                    mod_revision: kv.mod_revision,
                    version: kv.version,
                })
            })
            .collect();
        // One more than asked was read: it tells whether another page exists.
        let next_page_token = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|kv| kv.key.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListResponse {
            items,
            next_page_token,
            meta: Some(served.read_meta()),
        })
    }
}

impl Rpc for pb::TxnRequest {
    const NAME: &'static str = "txn";
    fn parse(&self) -> Result<Op> {
        ops::txn(self)
    }
    fn answer(&self, _: &Op, answer: Answer) -> Result<pb::TxnResponse> {
        match answer {
            Answer::Done {
                output: Output::Txn { gets },
                served,
            } => Ok(pb::TxnResponse {
                meta: Some(served.write_meta(false)),
                gets: gets
                    .into_iter()
                    .map(|item| {
                        let (found, value, mod_revision) = found(item);
                        pb::GetResponse {
                            found,
                            value,
                            mod_revision,
                            meta: None,
                        }
                    })
                    .collect(),
                reads_not_replayed: false,
            }),
            // The first attempt's reads are not stored with its record:
            // say so instead of answering them empty.
            Answer::Replayed { served, .. } => Ok(pb::TxnResponse {
                meta: Some(served.write_meta(true)),
                gets: vec![],
                reads_not_replayed: self.ops.iter().any(|o| matches!(o.op, Some(pb::operation::Op::Get(_)))),
            }),
            Answer::Done { output, .. } => Err(mismatch(Self::NAME, &output)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(name: &str) -> RegionName {
        RegionName::new(name).expect("valid")
    }

    fn link_error() -> crate::error::BoxError {
        "connection reset".into()
    }

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout("12q"), None);
    }

    #[test]
    fn a_write_without_a_key_is_never_sent_twice_after_the_link_failed_late() {
        let home = region("us-east");
        let plenty = Duration::from_secs(5);
        let next = decide(ForwardFailure::Unknown(link_error()), &home, true, true, plenty);
        assert!(
            matches!(&next, Next::Fail(e) if e.code() == tonic::Code::Unknown),
            "{next:?}"
        );
        // With a key a second delivery is a replay; a read is harmless.
        assert!(matches!(
            decide(ForwardFailure::Unknown(link_error()), &home, true, false, plenty),
            Next::RetryAfter(_)
        ));
        assert!(matches!(
            decide(ForwardFailure::Unknown(link_error()), &home, false, false, plenty),
            Next::RetryAfter(_)
        ));
        // Never sent: always safe.
        assert!(matches!(
            decide(ForwardFailure::NotSent(link_error()), &home, true, true, plenty),
            Next::RetryAfter(_)
        ));
    }

    #[test]
    fn out_of_time_a_write_that_may_have_left_is_unknown_not_retry() {
        let home = region("us-east");
        let none = Duration::from_millis(10);
        let next = decide(ForwardFailure::Unknown(link_error()), &home, true, false, none);
        assert!(
            matches!(&next, Next::Fail(e) if e.code() == tonic::Code::Unknown),
            "{next:?}"
        );
        let next = decide(ForwardFailure::NotSent(link_error()), &home, true, false, none);
        assert!(
            matches!(&next, Next::Fail(e) if e.code() == tonic::Code::Unavailable),
            "{next:?}"
        );
        let next = decide(ForwardFailure::Deadline, &home, true, false, none);
        assert!(
            matches!(&next, Next::Fail(e) if e.code() == tonic::Code::Unknown),
            "{next:?}"
        );
        let next = decide(ForwardFailure::Deadline, &home, false, false, none);
        assert!(
            matches!(&next, Next::Fail(e) if e.code() == tonic::Code::DeadlineExceeded),
            "{next:?}"
        );
        assert!(matches!(
            decide(ForwardFailure::Moved(None), &home, true, true, none),
            Next::Reroute(None)
        ));
    }

    #[test]
    fn a_fence_of_a_move_sends_the_call_on_to_the_target() {
        use tern_common::Fence;
        let (us, eu) = (region("us-east"), region("eu-west"));
        let migrating = Placement {
            home: us.clone(),
            epoch: Epoch(4),
            state: AccountState::Migrating { target: eu.clone() },
            allowed_regions: vec![],
            moved_ms: None,
            pinned: false,
        };
        let active = Placement {
            state: AccountState::Active,
            ..migrating.clone()
        };
        let to_eu = |settled| {
            Some(Hint {
                home: eu.clone(),
                epoch: Epoch(5),
                settled,
            })
        };
        // Moved: for certain, whatever the placement says.
        assert_eq!(
            hint_from_fence(&us, &active, Some(&Fence::moved(Epoch(4), eu.clone()))),
            to_eu(true)
        );
        // …but not one left from before the account came back here.
        assert_eq!(
            hint_from_fence(&us, &active, Some(&Fence::moved(Epoch(2), eu.clone()))),
            None
        );
        // Fenced: only for the move the placement names.
        assert_eq!(
            hint_from_fence(&us, &migrating, Some(&Fence::fenced(Epoch(4)))),
            to_eu(false)
        );
        assert_eq!(hint_from_fence(&us, &active, Some(&Fence::fenced(Epoch(4)))), None);
        assert_eq!(hint_from_fence(&us, &migrating, Some(&Fence::fenced(Epoch(3)))), None);
        // No fence, an active one of another epoch: the directory decides.
        assert_eq!(hint_from_fence(&us, &migrating, None), None);
        assert_eq!(hint_from_fence(&us, &migrating, Some(&Fence::active(Epoch(6)))), None);
    }

    #[test]
    fn landing_pauses_are_short_and_capped() {
        assert_eq!(landing_pause(0, 0.0), Duration::from_millis(2));
        assert_eq!(landing_pause(2, 0.0), Duration::from_millis(8));
        assert_eq!(landing_pause(30, 0.0), Duration::from_millis(16));
        assert_eq!(
            landing_pause(30, 0.999),
            Duration::from_millis(16).mul_f64(1.0 - 0.999 / 2.0)
        );
    }

    fn incoming() -> Incoming {
        let now = Instant::now();
        Incoming {
            op: "put",
            started: now,
            deadline: now + Duration::from_millis(50),
            origin: region("eu-west"),
            forwarded: false,
            hint: None,
            parent: opentelemetry::Context::new(),
            cx: opentelemetry::Context::new(),
            info: std::sync::Mutex::default(),
            attempts: AtomicU32::new(0),
            fence_misses: AtomicU32::new(0),
            in_flight: AtomicBool::new(false),
            maybe_applied: AtomicBool::new(false),
        }
    }

    #[tokio::test]
    async fn the_deadline_says_unknown_only_while_a_write_is_in_flight() {
        let here = region("us-east");
        // Between attempts (a fence miss waiting for a migration): nothing
        // is in flight, so nothing was applied.
        let call = incoming();
        let waiting = tokio::time::timeout_at(call.deadline, tokio::time::sleep(Duration::from_secs(2))).await;
        assert!(waiting.is_err());
        assert_eq!(call.at_deadline(&here).code(), tonic::Code::DeadlineExceeded);

        // Sent and unanswered when the deadline passes: it may commit later.
        let call = incoming();
        let sent = tokio::time::timeout_at(
            call.deadline,
            call.attempt(true, tokio::time::sleep(Duration::from_secs(2))),
        )
        .await;
        assert!(sent.is_err());
        assert_eq!(call.at_deadline(&here).code(), tonic::Code::Unknown);

        // A read in flight is just late.
        let call = incoming();
        let read = tokio::time::timeout_at(
            call.deadline,
            call.attempt(false, tokio::time::sleep(Duration::from_secs(2))),
        )
        .await;
        assert!(read.is_err());
        assert_eq!(call.at_deadline(&here).code(), tonic::Code::DeadlineExceeded);
    }

    #[test]
    fn fence_miss_pauses_grow_are_jittered_and_capped() {
        assert_eq!(fence_miss_pause(0, 0.0), Duration::from_millis(5));
        assert_eq!(fence_miss_pause(0, 0.999_999).as_micros(), 2500);
        assert_eq!(fence_miss_pause(3, 0.0), Duration::from_millis(40));
        assert_eq!(fence_miss_pause(6, 0.0), REFRESH_GAP, "capped");
        assert_eq!(fence_miss_pause(u32::MAX, 0.0), REFRESH_GAP, "no overflow");
        assert!(fence_miss_pause(30, 0.5) < REFRESH_GAP && fence_miss_pause(30, 0.5) >= REFRESH_GAP / 2);
    }
}
