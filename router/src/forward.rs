//! Forwarding to the home region's router: one pooled HTTP/2 channel per
//! region (gRPC multiplexes every request on it), dialled at the address DNS
//! gives for the region's endpoint and re-dialled when that address changes.
//! The request carries the remaining deadline, the trace context, the origin
//! region and the peer token that makes the home router trust those headers.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tern_common::RegionName;
use tokio::sync::Mutex;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::dns::Dns;
use crate::error::{BoxError, Delivery, Result, RouterError, SERVED_BY, classify};
use crate::pb::{self, router_client::RouterClient};
use crate::peer::{Hint, PeerToken, mark_forwarded};
use crate::placement::Directory;
use tern_common::tls::Tls;

/// Set by a router that is not the account's home (any more): the caller
/// should route again, to the hint it carries (`Hint::to_header`) or, with
/// none (`-`), after refreshing the placement.
pub const MOVED: &str = "tern-moved";

struct Link {
    endpoint: String,
    addr: SocketAddr,
    valid_until: Instant,
    client: RouterClient<Channel>,
}

/// How a forward failed.
#[derive(Debug)]
pub enum ForwardFailure {
    /// The home router answered with an error: pass it on.
    Answer(Status),
    /// The home router says the account is not homed there: route again,
    /// to the hint if it gave one.
    Moved(Option<Hint>),
    /// The request never left (no connection could be made): safe to send
    /// again.
    NotSent(BoxError),
    /// The link failed after the request may have left: it may have been
    /// applied.
    Unknown(BoxError),
    /// The deadline passed while waiting for the home region's answer.
    Deadline,
}

impl ForwardFailure {
    /// The metric label of this kind of failure.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Answer(_) => "answer",
            Self::Moved(_) => "moved",
            Self::NotSent(_) => "not_sent",
            Self::Unknown(_) => "unknown",
            Self::Deadline => "deadline",
        }
    }

    /// A line for a span's error status.
    pub fn describe(&self) -> String {
        match self {
            Self::Answer(s) => format!("{:?}: {}", s.code(), s.message()),
            Self::Moved(None) => "the account moved".into(),
            Self::Moved(Some(h)) => format!("the account moved to {}", h.to_header()),
            Self::NotSent(e) => format!("not sent: {e}"),
            Self::Unknown(e) => format!("link failed after sending: {e}"),
            Self::Deadline => "deadline exceeded".into(),
        }
    }

    /// Reads a status that came back instead of an answer.
    fn from_status(status: Status) -> Self {
        if let Some(moved) = status.metadata().get(MOVED) {
            // A hint that does not parse costs a directory read, no more.
            let hint = moved.to_str().ok().and_then(|h| Hint::from_header(h).ok());
            return Self::Moved(hint);
        }
        if status.metadata().get(SERVED_BY).is_some() {
            // A router produced it: its answer, whatever the code.
            return Self::Answer(status);
        }
        if matches!(status.code(), tonic::Code::Cancelled | tonic::Code::DeadlineExceeded) {
            return Self::Deadline;
        }
        // No router produced this status: the link failed.
        match classify(&status) {
            Delivery::NotSent => Self::NotSent(Box::new(status)),
            Delivery::Refused | Delivery::Unknown => Self::Unknown(Box::new(status)),
        }
    }
}

pub struct Forwarder {
    origin: RegionName,
    token: Option<PeerToken>,
    dns: Dns,
    overrides: HashMap<RegionName, String>,
    directory: Directory,
    /// Dial other routers over TLS with this certificate.
    tls: Option<Tls>,
    links: Mutex<HashMap<RegionName, Link>>,
}

impl Forwarder {
    pub fn new(
        origin: RegionName,
        token: Option<PeerToken>,
        dns: Dns,
        overrides: HashMap<RegionName, String>,
        directory: Directory,
        tls: Option<Tls>,
    ) -> Self {
        Self {
            origin,
            token,
            dns,
            overrides,
            directory,
            tls,
            links: Mutex::default(),
        }
    }

    /// Whether this router knows how to reach `region`.
    pub async fn knows(&self, region: &RegionName) -> bool {
        self.overrides.contains_key(region) || self.directory.region(region).await.is_some()
    }

    async fn endpoint(&self, region: &RegionName) -> Result<String> {
        if let Some(e) = self.overrides.get(region) {
            return Ok(e.clone());
        }
        match self.directory.region(region).await {
            Some(r) if !r.router_endpoint.is_empty() => Ok(r.router_endpoint),
            _ => Err(RouterError::RegionUnreachable {
                region: region.clone(),
                source: "no router endpoint is registered for it".into(),
            }),
        }
    }

    async fn client(&self, region: &RegionName) -> Result<RouterClient<Channel>> {
        let endpoint = self.endpoint(region).await?;
        let mut links = self.links.lock().await;
        if let Some(link) = links.get(region)
            && link.endpoint == endpoint
            && Instant::now() < link.valid_until
        {
            return Ok(link.client.clone());
        }
        let (addr, valid_until) = self.dns.resolve(&endpoint).await?;
        if let Some(link) = links.get_mut(region)
            && link.endpoint == endpoint
            && link.addr == addr
        {
            // Same answer: keep the warm connection.
            link.valid_until = valid_until;
            return Ok(link.client.clone());
        }
        let unreachable = |e: Box<dyn std::error::Error + Send + Sync>| RouterError::RegionUnreachable {
            region: region.clone(),
            source: e,
        };
        let channel = match &self.tls {
            // The certificate is checked for the endpoint's host name, the
            // name its region record (or --peer) gives, not the address
            // it resolved to.
            Some(tls) => {
                let host = crate::dns::split_endpoint(&endpoint)
                    .map_err(|e| unreachable(Box::new(e)))?
                    .0;
                // And it must be that region's router: it will be sent
                // this region's clients' writes.
                let expect = tern_common::tls::identity(tern_common::tls::Role::Router, region.as_str());
                tls.channel_to_identity(&addr.to_string(), host, &expect)
                    .map_err(|e| unreachable(Box::new(e)))?
            }
            None => Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| unreachable(Box::new(e)))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true)
                .connect_lazy(),
        };
        tracing::info!(%region, %endpoint, %addr, "dialling region");
        let client = RouterClient::new(channel);
        links.insert(
            region.clone(),
            Link {
                endpoint,
                addr,
                valid_until,
                client: client.clone(),
            },
        );
        Ok(client)
    }

    /// Sends `message` to `region`'s router as `R`'s call, within
    /// `deadline`, with the home `hint` a fence gave, if any.
    pub async fn send<R: Forwardable>(
        &self,
        region: &RegionName,
        deadline: tokio::time::Instant,
        message: R,
        trace: &opentelemetry::Context,
        hint: Option<&Hint>,
    ) -> std::result::Result<R::Response, ForwardFailure> {
        let client = self
            .client(region)
            .await
            .map_err(|e| ForwardFailure::NotSent(Box::new(e)))?;
        let mut request = Request::new(message);
        request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let md = request.metadata_mut();
        crate::telemetry::inject(trace, md);
        mark_forwarded(md, &self.origin, self.token.as_ref(), hint);
        R::send(client, request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(ForwardFailure::from_status)
    }
}

type Sent<T> = Pin<Box<dyn Future<Output = std::result::Result<Response<T>, Status>> + Send>>;

/// A call one router can send to another.
pub trait Forwardable: Clone + Send + Sync + 'static {
    type Response: Send + 'static;
    /// Sends it with `client`.
    fn send(client: RouterClient<Channel>, request: Request<Self>) -> Sent<Self::Response>;
    /// Marks an answer as served by another region.
    fn mark_forwarded(_response: &mut Self::Response) {}
}

macro_rules! forwardable {
    ($req:ty, $resp:ty, $method:ident, $meta:ident) => {
        impl Forwardable for $req {
            type Response = $resp;
            fn send(mut client: RouterClient<Channel>, request: Request<Self>) -> Sent<$resp> {
                Box::pin(async move { client.$method(request).await })
            }
            fn mark_forwarded(response: &mut $resp) {
                if let Some(m) = response.$meta.as_mut() {
                    m.forwarded = true;
                }
            }
        }
    };
}

forwardable!(pb::PutRequest, pb::PutResponse, put, meta);
forwardable!(pb::DeleteRequest, pb::DeleteResponse, delete, meta);
forwardable!(pb::GetRequest, pb::GetResponse, get, meta);
forwardable!(pb::ListRequest, pb::ListResponse, list, meta);
forwardable!(pb::TxnRequest, pb::TxnResponse, txn, meta);

impl Forwardable for pb::CreateAccountRequest {
    type Response = pb::CreateAccountResponse;
    fn send(mut client: RouterClient<Channel>, request: Request<Self>) -> Sent<pb::CreateAccountResponse> {
        Box::pin(async move { client.create_account(request).await })
    }
}
