//! Forwarding to the home region's router: one pooled HTTP/2 channel per
//! region (gRPC multiplexes every request on it), dialled at the address DNS
//! gives for the region's endpoint and re-dialled when that address changes.
//! The call carries the remaining deadline and the origin region.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tern_common::RegionName;
use tokio::sync::Mutex;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::dns::Dns;
use crate::error::{Result, RouterError, SERVED_BY};
use crate::pb::router_client::RouterClient;
use crate::placement::Directory;

/// Metadata keys of a forwarded call.
pub const ORIGIN_REGION: &str = "tern-origin-region";
pub const FORWARDED: &str = "tern-forwarded";
/// Set by a router that is not the account's home (any more): the caller
/// should refresh the placement and route again.
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
    /// The home router says the account is not homed there: route again.
    Moved,
    /// The link failed before the request was sent: safe to retry.
    NotSent(String),
    /// The link failed and the request may have been applied.
    Unknown(String),
    /// The deadline passed while waiting for the home region's answer.
    Deadline,
}

impl ForwardFailure {
    /// A line for a span's error status.
    pub fn describe(&self) -> String {
        match self {
            Self::Answer(s) => format!("{:?}: {}", s.code(), s.message()),
            Self::Moved => "the account moved".into(),
            Self::NotSent(d) => format!("not sent: {d}"),
            Self::Unknown(d) => format!("link failed after sending: {d}"),
            Self::Deadline => "deadline exceeded".into(),
        }
    }
}

pub struct Forwarder {
    origin: RegionName,
    dns: Dns,
    overrides: HashMap<RegionName, String>,
    directory: Directory,
    links: Mutex<HashMap<RegionName, Link>>,
}

impl Forwarder {
    pub fn new(origin: RegionName, dns: Dns, overrides: HashMap<RegionName, String>, directory: Directory) -> Self {
        Self {
            origin,
            dns,
            overrides,
            directory,
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
                detail: "no router endpoint is registered for it".into(),
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
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| RouterError::Internal(format!("endpoint {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_lazy();
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

    /// Sends `message` to `region`'s router with `call`, within `deadline`.
    pub async fn call<Req, Resp, F, Fut>(
        &self,
        region: &RegionName,
        deadline: tokio::time::Instant,
        message: Req,
        trace: &opentelemetry::Context,
        call: F,
    ) -> std::result::Result<Resp, ForwardFailure>
    where
        F: FnOnce(RouterClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<Resp>, Status>>,
    {
        let client = self
            .client(region)
            .await
            .map_err(|e| ForwardFailure::NotSent(e.to_string()))?;
        let mut request = Request::new(message);
        request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let md = request.metadata_mut();
        crate::telemetry::inject(trace, md);
        if let Ok(v) = self.origin.as_str().parse() {
            md.insert(ORIGIN_REGION, v);
        }
        md.insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
        match call(client, request).await {
            Ok(resp) => Ok(resp.into_inner()),
            Err(status) if status.metadata().get(MOVED).is_some() => Err(ForwardFailure::Moved),
            Err(status) if status.metadata().get(SERVED_BY).is_some() => Err(ForwardFailure::Answer(status)),
            Err(status)
                if status.code() == tonic::Code::Cancelled || status.code() == tonic::Code::DeadlineExceeded =>
            {
                Err(ForwardFailure::Deadline)
            }
            Err(status) => {
                // No router produced this status: the link failed. Only a
                // failure to connect proves the request was never sent.
                let text = format!("{status}");
                match crate::error::classify(&status) {
                    crate::error::Delivery::NotSent => Err(ForwardFailure::NotSent(text)),
                    _ => Err(ForwardFailure::Unknown(text)),
                }
            }
        }
    }
}
