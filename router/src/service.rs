//! The gRPC service. Each call: validate the input (INVALID_ARGUMENT names
//! the field and rule), find the account's placement in the cache, then
//! either run one fenced transaction on this region's group or forward the
//! call to the home region's router, retrying within the deadline when the
//! placement turns out stale or a migration is under way.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{Compare as EtcdCompare, CompareOp, TxnOp, TxnOpResponse};
use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanKind, TraceContextExt};
use serde_json::json;
use tern_common::{
    AccountId, AccountRecord, AccountState, Epoch, FenceState, IdempotencyKey, RegionName, UserKey, check_value,
    data_key, data_prefix, user_key_of,
};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::batch::Batchable;
use crate::counts::WriteCounts;
use crate::error::{Result, RouterError};
use crate::forward::{FORWARDED, ForwardFailure, Forwarder, MOVED, ORIGIN_REGION};
use crate::metrics::{Metrics, Route};
use crate::pb::router_server::Router;
use crate::pb::{self, operation};
use crate::placement::{Directory, Placement};
use crate::store::{Guard, Guarded, HomeStore};

/// Bytes a batched write adds to its transaction besides key and value
/// (compares, the idempotency record, framing), for the batch size limit.
const BATCH_OVERHEAD: usize = 256;

/// Longest deadline a client may ask for.
const MAX_DEADLINE: Duration = Duration::from_secs(60);
/// Default and largest page of List.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;
/// Most compares and operations in one Txn (etcd allows 128 operations by
/// default; the fence and idempotency record take three).
const MAX_TXN_PARTS: usize = 100;

pub struct RouterService {
    pub region: RegionName,
    pub directory: Directory,
    pub store: HomeStore,
    pub forwarder: Forwarder,
    pub counts: Arc<WriteCounts>,
    pub metrics: Arc<Metrics>,
    pub default_deadline: Duration,
    pub telemetry: crate::telemetry::Telemetry,
}

/// Per-call facts taken from the request metadata.
struct Call {
    op: &'static str,
    started: Instant,
    deadline: Instant,
    /// Region whose client sent the request (this one unless forwarded).
    origin: RegionName,
    forwarded: bool,
    /// The caller's trace context (empty when it sent none).
    parent: opentelemetry::Context,
    /// This call's context: its `router.request` span when tracing, else the
    /// caller's context, which forwarding passes on.
    cx: opentelemetry::Context,
    /// What the request span records once known.
    info: std::sync::Mutex<SpanInfo>,
    attempts: std::sync::atomic::AtomicU32,
}

#[derive(Default)]
struct SpanInfo {
    account: String,
    home: String,
    epoch: u64,
}

impl Call {
    fn note(&self, account: &AccountId, p: &Placement) {
        let mut info = self.info.lock().unwrap_or_else(|e| e.into_inner());
        info.account = account.to_string();
        info.home = p.home.to_string();
        info.epoch = p.epoch.0;
    }
}

impl RouterService {
    fn call<T>(&self, op: &'static str, request: &Request<T>) -> Result<Call> {
        let md = request.metadata();
        let timeout = match md.get("grpc-timeout").and_then(|v| v.to_str().ok()) {
            Some(t) => parse_grpc_timeout(t)
                .ok_or_else(|| RouterError::BadRequest(format!("grpc-timeout `{t}` is malformed")))?,
            None => self.default_deadline,
        };
        let forwarded = md.get(FORWARDED).is_some();
        let origin = match md.get(ORIGIN_REGION).and_then(|v| v.to_str().ok()) {
            Some(r) if forwarded => RegionName::new(r)?,
            _ => self.region.clone(),
        };
        let now = Instant::now();
        // Answer a little before the client gives up, so that it hears
        // DEADLINE_EXCEEDED (or the result) rather than cancelling blind.
        let timeout = timeout.min(MAX_DEADLINE);
        let margin = (timeout / 20).min(Duration::from_millis(50));
        Ok(Call {
            op,
            started: now,
            deadline: now + timeout - margin,
            origin,
            forwarded,
            parent: crate::telemetry::extract(md),
            cx: opentelemetry::Context::new(),
            info: std::sync::Mutex::default(),
            attempts: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// Runs `work` within the call's deadline and records its outcome.
    async fn finish<T>(
        &self,
        call: Result<Call>,
        work: impl AsyncFnOnce(&Call) -> Result<(T, Route)>,
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
        let route_guess = if call.forwarded { Route::ProxiedIn } else { Route::Local };
        let outcome = match tokio::time::timeout_at(call.deadline, work(&call)).await {
            Ok(r) => r,
            Err(_) => Err(RouterError::Deadline(format!(
                "after {:?} ({} in {})",
                call.started.elapsed(),
                call.op,
                self.region
            ))),
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
                    let code = match e {
                        RouterError::Remote(s) => s.code(),
                        e => e.code(),
                    };
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
                let status = match e {
                    RouterError::Remote(status) => status,
                    e => {
                        let moved = matches!(e, RouterError::NotHome(_));
                        let mut status = e.into_status(&self.region);
                        if moved {
                            status
                                .metadata_mut()
                                .insert(MOVED, tonic::metadata::MetadataValue::from_static("1"));
                        }
                        status
                    }
                };
                self.metrics.observe(call.op, route_guess, status.code(), elapsed);
                Err(status)
            }
        }
    }

    /// Where the account is served: here, or the home region's router. A
    /// forwarded call is never forwarded again: if this router is not the
    /// home, the caller routes again.
    async fn route(&self, call: &Call, account: &AccountId) -> Result<Placement> {
        let p = self.directory.lookup(account).await?;
        call.note(account, &p);
        if p.home == self.region || !call.forwarded {
            return Ok(p);
        }
        self.metrics.placement_refreshes.inc();
        let p = self.directory.refresh(account).await?;
        if p.home == self.region {
            Ok(p)
        } else {
            Err(RouterError::NotHome(p.home))
        }
    }

    /// After a fence miss: refresh the placement and, during a migration,
    /// give it a moment. The caller retries within its deadline.
    async fn after_fence_miss(
        &self,
        account: &AccountId,
        p: &Placement,
        found: Option<tern_common::Fence>,
    ) -> Result<()> {
        self.metrics.retries.inc();
        self.metrics.placement_refreshes.inc();
        match &found {
            Some(f) if f.state == FenceState::Fenced => tokio::time::sleep(Duration::from_millis(10)).await,
            None => {
                let fresh = self.directory.refresh(account).await?;
                if fresh.home == p.home && fresh.epoch == p.epoch {
                    return Err(RouterError::Unavailable(format!(
                        "account {account} is homed in {} at epoch {} but its fence is missing there",
                        p.home, p.epoch
                    )));
                }
                return Ok(());
            }
            _ => {}
        }
        let fresh = self.directory.refresh(account).await?;
        if fresh == *p && !matches!(found.as_ref().map(|f| &f.state), Some(FenceState::Fenced)) {
            // The directory has not caught up with the fence yet.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Forwards and classifies the outcome. `Ok(None)`: route again.
    async fn forward<Req, Resp, F, Fut>(
        &self,
        call: &Call,
        account: &AccountId,
        home: &RegionName,
        message: Req,
        write_without_key: bool,
        f: F,
    ) -> Result<Option<Resp>>
    where
        F: FnOnce(crate::pb::router_client::RouterClient<tonic::transport::Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Response<Resp>, Status>>,
        Resp: MarkForwarded,
    {
        let attempt = call.attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let span_cx = self.telemetry.span("router.forward", SpanKind::Client, &call.cx, || {
            vec![
                KeyValue::new("tern.target_region", home.to_string()),
                KeyValue::new("tern.attempt", i64::from(attempt)),
            ]
        });
        let forward_cx = span_cx.as_ref().unwrap_or(&call.cx);
        let result = self.forwarder.call(home, call.deadline, message, forward_cx, f).await;
        if let Some(cx) = &span_cx {
            let span = cx.span();
            if let Err(failure) = &result {
                span.set_status(opentelemetry::trace::Status::error(failure.describe()));
            }
            span.end();
        }
        let failure = match result {
            Ok(mut resp) => {
                resp.mark_forwarded();
                return Ok(Some(resp));
            }
            Err(failure) => failure,
        };
        let kind = match &failure {
            ForwardFailure::Answer(_) => {
                return Err(RouterError::Remote(match failure {
                    ForwardFailure::Answer(s) => s,
                    _ => unreachable!("matched above"),
                }));
            }
            ForwardFailure::Moved => "moved",
            ForwardFailure::Deadline => "deadline",
            ForwardFailure::NotSent(_) => "not_sent",
            ForwardFailure::Unknown(_) => "unknown",
        };
        self.metrics
            .forward_failures
            .get_or_create(&crate::metrics::ForwardLabels {
                region: home.to_string(),
                kind,
            })
            .inc();
        self.metrics.retries.inc();
        match failure {
            ForwardFailure::Moved => {
                self.metrics.placement_refreshes.inc();
                // Not found any more is the caller's next answer, not ours.
                let _ = self.directory.refresh(account).await;
                Ok(None)
            }
            ForwardFailure::Unknown(detail) if write_without_key => Err(RouterError::OutcomeUnknown(format!(
                "the link to {home} failed after the write was sent: {detail}"
            ))),
            ForwardFailure::NotSent(detail) | ForwardFailure::Unknown(detail) => {
                if Instant::now() + Duration::from_millis(50) >= call.deadline {
                    return Err(RouterError::RegionUnreachable {
                        region: home.clone(),
                        detail,
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(None)
            }
            ForwardFailure::Deadline => Err(RouterError::Deadline(format!(
                "waiting for {home}{}",
                if write_without_key {
                    "; the write may or may not have been applied"
                } else {
                    ""
                }
            ))),
            ForwardFailure::Answer(_) => unreachable!("returned above"),
        }
    }

    /// One fenced transaction on this region's group, as a `store.txn` span.
    async fn run_guarded<T>(
        &self,
        call: &Call,
        guard: Guard<'_>,
        extract: impl FnOnce(&[TxnOpResponse]) -> T,
    ) -> Result<Guarded<T>> {
        let epoch = guard.epoch.0 as i64;
        let cx = self.telemetry.span("store.txn", SpanKind::Client, &call.cx, || {
            vec![
                KeyValue::new("tern.group", self.region.to_string()),
                KeyValue::new("tern.epoch", epoch),
            ]
        });
        let result = self.store.run(guard, extract).await;
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
                Err(e) => span.set_status(opentelemetry::trace::Status::error(e.to_string())),
            }
            span.end();
        }
        result
    }

    fn count_write(&self, account: &AccountId, call: &Call) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.counts.record(account, &call.origin, now);
    }

    fn write_meta(&self, p: &Placement, revision: i64, replayed: bool) -> pb::WriteMeta {
        pb::WriteMeta {
            home_region: p.home.to_string(),
            epoch: p.epoch.0,
            revision,
            replayed,
            forwarded: false,
        }
    }

    fn read_meta(&self, p: &Placement, revision: i64) -> pb::ReadMeta {
        pb::ReadMeta {
            served_by_region: self.region.to_string(),
            home_region: p.home.to_string(),
            epoch: p.epoch.0,
            revision,
            forwarded: false,
            from_mirror: false,
            staleness_ms: 0,
        }
    }
}

fn idempotency(key: &str) -> Result<Option<IdempotencyKey>> {
    if key.is_empty() {
        Ok(None)
    } else {
        Ok(Some(IdempotencyKey::new(key)?))
    }
}

/// A response that says whether it was forwarded.
trait MarkForwarded {
    fn mark_forwarded(&mut self);
}

macro_rules! mark_forwarded {
    ($($t:ty),*) => {$(
        impl MarkForwarded for $t {
            fn mark_forwarded(&mut self) {
                if let Some(m) = self.meta.as_mut() {
                    m.forwarded = true;
                }
            }
        }
    )*};
}

mark_forwarded!(
    pb::PutResponse,
    pb::DeleteResponse,
    pb::GetResponse,
    pb::ListResponse,
    pb::TxnResponse
);

impl MarkForwarded for pb::CreateAccountResponse {
    fn mark_forwarded(&mut self) {}
}

/// Whether a read asks for bounded staleness, and its bound in ms.
fn bounded(read: &Option<pb::ReadOptions>) -> Option<u64> {
    match read {
        Some(r) if r.consistency == pb::Consistency::Bounded as i32 => Some(u64::from(r.max_staleness_ms)),
        _ => None,
    }
}

impl RouterService {
    /// A BOUNDED read served from this region's mirror of the account's home,
    /// when the mirror's measured lag is within the bound and the mirror holds
    /// the account at its current epoch. None: serve it from the home.
    async fn read_mirror<T>(
        &self,
        account: &AccountId,
        max_staleness_ms: u64,
        ops: impl FnOnce(&RegionName) -> Vec<TxnOp>,
        extract: impl FnOnce(&[TxnOpResponse]) -> T,
    ) -> Result<Option<(T, pb::ReadMeta)>> {
        let p = self.directory.lookup(account).await?;
        if p.home == self.region {
            return Ok(None);
        }
        let Some(staleness) = self.directory.mirror_staleness_ms(&self.region, &p.home).await else {
            return Ok(None);
        };
        if staleness > max_staleness_ms {
            return Ok(None);
        }
        let fence = tern_common::mirror_key(&p.home, tern_common::fence_key(account).as_bytes());
        let txn = etcd_client::Txn::new()
            .when([EtcdCompare::value(
                fence,
                CompareOp::Equal,
                tern_common::Fence::active(p.epoch).to_string(),
            )])
            .and_then(ops(&p.home));
        let resp = self.store.any_member().txn(txn).await?;
        if !resp.succeeded() {
            // The mirror does not hold the account at this epoch (new, or moving).
            return Ok(None);
        }
        let meta = pb::ReadMeta {
            served_by_region: self.region.to_string(),
            home_region: p.home.to_string(),
            epoch: p.epoch.0,
            revision: 0,
            forwarded: false,
            from_mirror: true,
            staleness_ms: u32::try_from(staleness).unwrap_or(u32::MAX),
        };
        Ok(Some((extract(&resp.op_responses()), meta)))
    }
}

/// A fingerprint of a write, stored with its idempotency record so that a
/// key reused for a different write is refused instead of answered wrongly.
fn fingerprint(parts: &[&[u8]]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(&[0xff]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn check_replay(record: &serde_json::Value, fp: &str) -> Result<()> {
    if record.get("fp").and_then(|v| v.as_str()) == Some(fp) {
        Ok(())
    } else {
        Err(RouterError::BadRequest(
            "idempotency_key was already used for a different request: use a new key for a new write".into(),
        ))
    }
}

fn user_key(account: &AccountId, key: &str) -> Result<String> {
    Ok(data_key(account, &UserKey::new(key)?))
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

fn get_response(r: Option<&TxnOpResponse>) -> (bool, Vec<u8>, i64) {
    match r {
        Some(TxnOpResponse::Get(g)) => match g.kvs().first() {
            Some(kv) => (true, kv.value().to_vec(), kv.mod_revision()),
            None => (false, Vec::new(), 0),
        },
        _ => (false, Vec::new(), 0),
    }
}

#[tonic::async_trait]
impl Router for RouterService {
    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::CreateAccountResponse>, Status> {
        let call = self.call("create_account", &request);
        let r = request.into_inner();
        self.finish(call, async |call| {
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
                    let out = self
                        .forward(call, &account, &home, message.clone(), false, async |mut c, req| {
                            c.create_account(req).await
                        })
                        .await?;
                    if let Some(resp) = out {
                        return Ok((resp, Route::ProxiedOut));
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
                        Route::Local,
                    ))
                } else {
                    Err(RouterError::AccountExists {
                        account: account.to_string(),
                        home: existing.home,
                    })
                };
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
            };
            let (stored, created) = self.directory.create(&account, &record).await?;
            if stored.home != home {
                self.store.remove_unused_fence(&account).await?;
                return Err(RouterError::AccountExists {
                    account: account.to_string(),
                    home: stored.home,
                });
            }
            let route = if call.forwarded { Route::ProxiedIn } else { Route::Local };
            Ok((
                pb::CreateAccountResponse {
                    account: account.to_string(),
                    home_region: home.to_string(),
                    epoch: stored.epoch.0,
                    created,
                },
                route,
            ))
        })
        .await
    }

    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let call = self.call("put", &request);
        let r = request.into_inner();
        self.finish(call, async |call| {
            let account = AccountId::new(&r.account)?;
            let key = user_key(&account, &r.key)?;
            check_value(&r.value)?;
            let idem = idempotency(&r.idempotency_key)?;
            let fp = fingerprint(&[b"put", key.as_bytes(), &r.value]);
            loop {
                let p = self.route(call, &account).await?;
                if p.home != self.region {
                    let out = self
                        .forward(
                            call,
                            &account,
                            &p.home,
                            r.clone(),
                            idem.is_none(),
                            async |mut c, req| c.put(req).await,
                        )
                        .await?;
                    match out {
                        Some(resp) => return Ok((resp, Route::ProxiedOut)),
                        None => continue,
                    }
                }
                let guard = Guard {
                    account: &account,
                    epoch: p.epoch,
                    idempotency: idem.as_ref().map(|k| (k, Some(json!({"op": "put", "fp": fp})))),
                    compares: vec![],
                    ops: vec![TxnOp::put(key.clone(), r.value.clone(), None)],
                    batch: Some(Batchable {
                        keys: vec![key.clone()],
                        bytes: key.len() + r.value.len() + BATCH_OVERHEAD,
                    }),
                };
                match self.run_guarded(call, guard, |_| ()).await? {
                    Guarded::Done { revision, .. } => {
                        self.count_write(&account, call);
                        let route = if call.forwarded { Route::ProxiedIn } else { Route::Local };
                        return Ok((
                            pb::PutResponse {
                                meta: Some(self.write_meta(&p, revision, false)),
                            },
                            route,
                        ));
                    }
                    Guarded::Replayed { record, revision } => {
                        check_replay(&record, &fp)?;
                        let route = if call.forwarded { Route::ProxiedIn } else { Route::Local };
                        return Ok((
                            pb::PutResponse {
                                meta: Some(self.write_meta(&p, revision, true)),
                            },
                            route,
                        ));
                    }
                    Guarded::CompareFailed => {
                        return Err(RouterError::Internal("a put has no compares".into()));
                    }
                    Guarded::Fence(found) => {
                        self.after_fence_miss(&account, &p, found).await?;
                    }
                }
            }
        })
        .await
    }

    async fn delete(&self, request: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let call = self.call("delete", &request);
        let r = request.into_inner();
        self.finish(call, async |call| {
            let account = AccountId::new(&r.account)?;
            let key = user_key(&account, &r.key)?;
            let idem = idempotency(&r.idempotency_key)?;
            let fp = fingerprint(&[b"delete", key.as_bytes()]);
            loop {
                let p = self.route(call, &account).await?;
                if p.home != self.region {
                    let out = self
                        .forward(
                            call,
                            &account,
                            &p.home,
                            r.clone(),
                            idem.is_none(),
                            async |mut c, req| c.delete(req).await,
                        )
                        .await?;
                    match out {
                        Some(resp) => return Ok((resp, Route::ProxiedOut)),
                        None => continue,
                    }
                }
                // Whether the key existed is decided inside the transaction,
                // so that a replay can answer it too.
                let (ops, record) = match &idem {
                    Some(k) => {
                        let idem_key = tern_common::idempotency_key(&account, k);
                        let options = self.store.record_options().await?;
                        let existed = json!({"op": "delete", "fp": fp, "existed": true});
                        let absent = json!({"op": "delete", "fp": fp, "existed": false});
                        let nested = etcd_client::Txn::new()
                            .when([EtcdCompare::version(key.clone(), CompareOp::Greater, 0)])
                            .and_then([
                                TxnOp::delete(key.clone(), None),
                                TxnOp::put(idem_key.clone(), existed.to_string(), Some(options.clone())),
                            ])
                            .or_else([TxnOp::put(idem_key, absent.to_string(), Some(options))]);
                        (vec![TxnOp::txn(nested)], None)
                    }
                    None => (vec![TxnOp::delete(key.clone(), None)], None::<serde_json::Value>),
                };
                let guard = Guard {
                    account: &account,
                    epoch: p.epoch,
                    // With a key, the nested transaction writes the record;
                    // the guard only checks that the key is unused.
                    idempotency: idem.as_ref().map(|k| (k, record)),
                    compares: vec![],
                    ops,
                    batch: Some(Batchable {
                        keys: vec![key.clone()],
                        bytes: key.len() + BATCH_OVERHEAD,
                    }),
                };
                let outcome = self
                    .store
                    .run(guard, |responses| match responses.first() {
                        Some(TxnOpResponse::Delete(d)) => d.deleted() > 0,
                        Some(TxnOpResponse::Txn(t)) => t.succeeded(),
                        _ => false,
                    })
                    .await?;
                let route = if call.forwarded { Route::ProxiedIn } else { Route::Local };
                match outcome {
                    Guarded::Done { revision, value } => {
                        self.count_write(&account, call);
                        return Ok((
                            pb::DeleteResponse {
                                meta: Some(self.write_meta(&p, revision, false)),
                                existed: value,
                            },
                            route,
                        ));
                    }
                    Guarded::Replayed { record, revision } => {
                        check_replay(&record, &fp)?;
                        let existed = record.get("existed").and_then(|v| v.as_bool()).unwrap_or(false);
                        return Ok((
                            pb::DeleteResponse {
                                meta: Some(self.write_meta(&p, revision, true)),
                                existed,
                            },
                            route,
                        ));
                    }
                    Guarded::CompareFailed => {
                        return Err(RouterError::Internal("a delete has no compares".into()));
                    }
                    Guarded::Fence(found) => {
                        self.after_fence_miss(&account, &p, found).await?;
                    }
                }
            }
        })
        .await
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let call = self.call("get", &request);
        let r = request.into_inner();
        self.finish(call, async |call| {
            let account = AccountId::new(&r.account)?;
            let key = user_key(&account, &r.key)?;
            if let Some(max) = bounded(&r.read)
                && !call.forwarded
            {
                let mirrored =
                    |home: &RegionName| vec![TxnOp::get(tern_common::mirror_key(home, key.as_bytes()), None)];
                if let Some(((found, value, mod_revision), meta)) = self
                    .read_mirror(&account, max, mirrored, |rs| get_response(rs.first()))
                    .await?
                {
                    let resp = pb::GetResponse {
                        found,
                        value,
                        mod_revision,
                        meta: Some(meta),
                    };
                    return Ok((resp, Route::Local));
                }
            }
            loop {
                let p = self.route(call, &account).await?;
                if p.home != self.region {
                    let out = self
                        .forward(call, &account, &p.home, r.clone(), false, async |mut c, req| {
                            c.get(req).await
                        })
                        .await?;
                    match out {
                        Some(resp) => return Ok((resp, Route::ProxiedOut)),
                        None => continue,
                    }
                }
                let guard = Guard {
                    account: &account,
                    epoch: p.epoch,
                    idempotency: None,
                    compares: vec![],
                    ops: vec![TxnOp::get(key.clone(), None)],
                    batch: None,
                };
                match self
                    .store
                    .run(guard, |responses| get_response(responses.first()))
                    .await?
                {
                    Guarded::Done {
                        revision,
                        value: (found, value, mod_revision),
                    } => {
                        let route = if call.forwarded { Route::ProxiedIn } else { Route::Local };
                        return Ok((
                            pb::GetResponse {
                                found,
                                value,
                                mod_revision,
                                meta: Some(self.read_meta(&p, revision)),
                            },
                            route,
                        ));
                    }
                    Guarded::Fence(found) => {
                        self.after_fence_miss(&account, &p, found).await?;
                    }
                    Guarded::Replayed { .. } | Guarded::CompareFailed => {
                        return Err(RouterError::Internal("a read has no guard but the fence".into()));
                    }
                }
            }
        })
        .await
    }

    async fn list(&self, request: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        let call = self.call("list", &request);
        let r = request.into_inner();
        self.finish(call, async |call| {
            let account = AccountId::new(&r.account)?;
            let prefix = UserKey::prefix(&r.prefix)?;
            let limit = match r.limit {
                0 => DEFAULT_PAGE,
                n if n > MAX_PAGE => {
                    return Err(RouterError::BadRequest(format!(
                        "limit {n} is over the maximum of {MAX_PAGE}"
                    )));
                }
                n => n,
            };
            let base = data_prefix(&account);
            let start = if r.page_token.is_empty() {
                format!("{base}{prefix}")
            } else {
                let after = UserKey::new(r.page_token.as_str())
                    .map_err(|_| RouterError::BadRequest("page_token is malformed".into()))?;
                if !after.as_str().starts_with(prefix.as_str()) {
                    return Err(RouterError::BadRequest(
                        "page_token does not belong to this prefix".into(),
                    ));
                }
                // The smallest key after the last one returned.
                format!("{base}{after}\u{0}")
            };
            let end = prefix_end(&format!("{base}{prefix}"));
            if let Some(max) = bounded(&r.read)
                && !call.forwarded
            {
                let mirrored = |home: &RegionName| {
                    let mirror_start = tern_common::mirror_key(home, start.as_bytes());
                    let mirror_end = tern_common::mirror_key(home, &end);
                    vec![TxnOp::get(
                        mirror_start,
                        Some(
                            etcd_client::GetOptions::new()
                                .with_range(mirror_end)
                                .with_limit(i64::from(limit) + 1),
                        ),
                    )]
                };
                let extract = |responses: &[TxnOpResponse]| match responses.first() {
                    Some(TxnOpResponse::Get(g)) => g
                        .kvs()
                        .iter()
                        .filter_map(|kv| {
                            // /tern/r/{home}/tern/a/... → /tern/a/...
                            let at = kv.key().windows(8).position(|w| w == b"/tern/a/")?;
                            Some(pb::KeyValue {
                                key: user_key_of(&account, &kv.key()[at..])?,
                                value: kv.value().to_vec(),
                                mod_revision: kv.mod_revision(),
                                version: kv.version(),
                            })
                        })
                        .collect::<Vec<_>>(),
                    _ => Vec::new(),
                };
                if let Some((items, meta)) = self.read_mirror(&account, max, mirrored, extract).await? {
                    let (items, next_page_token) = page(items, limit);
                    return Ok((
                        pb::ListResponse {
                            items,
                            next_page_token,
                            meta: Some(meta),
                        },
                        Route::Local,
                    ));
                }
            }
            loop {
                let p = self.route(call, &account).await?;
                if p.home != self.region {
                    let out = self
                        .forward(call, &account, &p.home, r.clone(), false, async |mut c, req| {
                            c.list(req).await
                        })
                        .await?;
                    match out {
                        Some(resp) => return Ok((resp, Route::ProxiedOut)),
                        None => continue,
                    }
                }
                let guard = Guard {
                    account: &account,
                    epoch: p.epoch,
                    idempotency: None,
                    compares: vec![],
                    // One more than asked: tells whether another page exists.
                    ops: vec![HomeStore::range_op(&start, &end, i64::from(limit) + 1)],
                    batch: None,
                };
                let extract = |responses: &[TxnOpResponse]| match responses.first() {
                    Some(TxnOpResponse::Get(g)) => g
                        .kvs()
                        .iter()
                        .filter_map(|kv| {
                            Some(pb::KeyValue {
                                key: user_key_of(&account, kv.key())?,
                                value: kv.value().to_vec(),
                                mod_revision: kv.mod_revision(),
                                version: kv.version(),
                            })
                        })
                        .collect::<Vec<_>>(),
                    _ => Vec::new(),
                };
                match self.run_guarded(call, guard, extract).await? {
                    Guarded::Done { revision, value: items } => {
                        let (items, next_page_token) = page(items, limit);
                        let route = if call.forwarded { Route::ProxiedIn } else { Route::Local };
                        return Ok((
                            pb::ListResponse {
                                items,
                                next_page_token,
                                meta: Some(self.read_meta(&p, revision)),
                            },
                            route,
                        ));
                    }
                    Guarded::Fence(found) => {
                        self.after_fence_miss(&account, &p, found).await?;
                    }
                    Guarded::Replayed { .. } | Guarded::CompareFailed => {
                        return Err(RouterError::Internal("a read has no guard but the fence".into()));
                    }
                }
            }
        })
        .await
    }

    async fn txn(&self, request: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let call = self.call("txn", &request);
        let r = request.into_inner();
        self.finish(call, async |call| {
            let account = AccountId::new(&r.account)?;
            if r.compares.len() + r.ops.len() > MAX_TXN_PARTS {
                return Err(RouterError::BadRequest(format!(
                    "a txn has at most {MAX_TXN_PARTS} compares and operations"
                )));
            }
            if r.ops.is_empty() {
                return Err(RouterError::BadRequest("ops is empty".into()));
            }
            let idem = idempotency(&r.idempotency_key)?;
            let mut compares = Vec::new();
            let mut fp_parts: Vec<Vec<u8>> = vec![b"txn".to_vec()];
            for (i, c) in r.compares.iter().enumerate() {
                let key =
                    user_key(&account, &c.key).map_err(|e| RouterError::BadRequest(format!("compares[{i}]: {e}")))?;
                let op = match pb::compare::Op::try_from(c.op) {
                    Ok(pb::compare::Op::Equal) => CompareOp::Equal,
                    Ok(pb::compare::Op::NotEqual) => CompareOp::NotEqual,
                    Ok(pb::compare::Op::Greater) => CompareOp::Greater,
                    Ok(pb::compare::Op::Less) => CompareOp::Less,
                    Err(_) => {
                        return Err(RouterError::BadRequest(format!("compares[{i}].op {} is unknown", c.op)));
                    }
                };
                let compare = match pb::compare::Target::try_from(c.target) {
                    Ok(pb::compare::Target::Value) => EtcdCompare::value(key.clone(), op, c.value.clone()),
                    Ok(pb::compare::Target::Version) => EtcdCompare::version(key.clone(), op, c.number),
                    Ok(pb::compare::Target::ModRevision) => EtcdCompare::mod_revision(key.clone(), op, c.number),
                    Err(_) => {
                        return Err(RouterError::BadRequest(format!(
                            "compares[{i}].target {} is unknown",
                            c.target
                        )));
                    }
                };
                fp_parts.push(format!("{i}:{}:{}:{}:{}", key, c.target, c.op, c.number).into_bytes());
                fp_parts.push(c.value.clone());
                compares.push(compare);
            }
            let mut ops = Vec::new();
            let mut get_positions = Vec::new();
            for (i, o) in r.ops.iter().enumerate() {
                match &o.op {
                    Some(operation::Op::Put(put)) => {
                        check_value(&put.value)?;
                        let key = user_key(&account, &put.key)
                            .map_err(|e| RouterError::BadRequest(format!("ops[{i}]: {e}")))?;
                        fp_parts.push(format!("put:{key}").into_bytes());
                        fp_parts.push(put.value.clone());
                        ops.push(TxnOp::put(key, put.value.clone(), None));
                    }
                    Some(operation::Op::Delete(d)) => {
                        let key = user_key(&account, &d.key)
                            .map_err(|e| RouterError::BadRequest(format!("ops[{i}]: {e}")))?;
                        fp_parts.push(format!("delete:{key}").into_bytes());
                        ops.push(TxnOp::delete(key, None));
                    }
                    Some(operation::Op::Get(g)) => {
                        let key = user_key(&account, &g.key)
                            .map_err(|e| RouterError::BadRequest(format!("ops[{i}]: {e}")))?;
                        fp_parts.push(format!("get:{key}").into_bytes());
                        get_positions.push(ops.len());
                        ops.push(TxnOp::get(key, None));
                    }
                    None => {
                        return Err(RouterError::BadRequest(format!("ops[{i}] names no operation")));
                    }
                }
            }
            let fp = fingerprint(&fp_parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
            loop {
                let p = self.route(call, &account).await?;
                if p.home != self.region {
                    let out = self
                        .forward(
                            call,
                            &account,
                            &p.home,
                            r.clone(),
                            idem.is_none(),
                            async |mut c, req| c.txn(req).await,
                        )
                        .await?;
                    match out {
                        Some(resp) => return Ok((resp, Route::ProxiedOut)),
                        None => continue,
                    }
                }
                let guard = Guard {
                    account: &account,
                    epoch: p.epoch,
                    idempotency: idem.as_ref().map(|k| (k, Some(json!({"op": "txn", "fp": fp})))),
                    compares: compares.clone(),
                    ops: ops.clone(),
                    batch: None,
                };
                let positions = get_positions.clone();
                let extract = move |responses: &[TxnOpResponse]| {
                    positions
                        .iter()
                        .map(|i| {
                            let (found, value, mod_revision) = get_response(responses.get(*i));
                            pb::GetResponse {
                                found,
                                value,
                                mod_revision,
                                meta: None,
                            }
                        })
                        .collect::<Vec<_>>()
                };
                let route = if call.forwarded { Route::ProxiedIn } else { Route::Local };
                match self.run_guarded(call, guard, extract).await? {
                    Guarded::Done { revision, value: gets } => {
                        self.count_write(&account, call);
                        return Ok((
                            pb::TxnResponse {
                                meta: Some(self.write_meta(&p, revision, false)),
                                gets,
                            },
                            route,
                        ));
                    }
                    Guarded::Replayed { record, revision } => {
                        check_replay(&record, &fp)?;
                        // The reads of the first attempt are not recorded.
                        return Ok((
                            pb::TxnResponse {
                                meta: Some(self.write_meta(&p, revision, true)),
                                gets: vec![],
                            },
                            route,
                        ));
                    }
                    Guarded::CompareFailed => {
                        return Err(RouterError::CompareFailed(format!(
                            "one of the {} compares did not hold; nothing was applied",
                            r.compares.len()
                        )));
                    }
                    Guarded::Fence(found) => {
                        self.after_fence_miss(&account, &p, found).await?;
                    }
                }
            }
        })
        .await
    }
}

/// Cuts a page read with one extra item to `limit`; the token names the last
/// key returned when another page exists.
fn page(mut items: Vec<pb::KeyValue>, limit: u32) -> (Vec<pb::KeyValue>, String) {
    if items.len() > limit as usize {
        items.truncate(limit as usize);
        let token = items.last().map(|kv| kv.key.clone()).unwrap_or_default();
        (items, token)
    } else {
        (items, String::new())
    }
}

/// The first key after every key with `prefix` (etcd's range end).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout("12q"), None);
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end("/tern/a/x/d/"), b"/tern/a/x/d0".to_vec());
    }

    #[test]
    fn fingerprints_differ_by_content() {
        assert_ne!(fingerprint(&[b"put", b"k", b"v1"]), fingerprint(&[b"put", b"k", b"v2"]));
        assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"a", b"bc"]));
    }
}
