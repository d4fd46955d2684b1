//! Prometheus metrics of a router: requests and their latency per route
//! (served locally, proxied out to the home region, proxied in from another
//! region), forwarding failures and placement refreshes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Route {
    Local,
    ProxiedOut,
    ProxiedIn,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::ProxiedOut => "proxied_out",
            Self::ProxiedIn => "proxied_in",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub op: &'static str,
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub op: &'static str,
    pub route: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardLabels {
    pub region: String,
    pub kind: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<OutcomeLabels, Counter>,
    pub latency: Family<RequestLabels, Histogram>,
    pub forward_failures: Family<ForwardLabels, Counter>,
    pub placement_refreshes: Counter,
    /// Linearizable reads sent to the directory group.
    pub directory_reads: Counter,
    pub retries: Counter,
    /// Calls that carried forwarding headers without the peer token.
    pub untrusted_forward_headers: Counter,
    /// Writes per etcd transaction (group commit).
    pub write_batch_size: Histogram,
    /// Whether requests go straight to the region group's leader.
    pub group_leader: crate::leader::LeaderMetrics,
    /// The region's lease as the router knows it.
    pub lease: crate::lease::LeaseMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tern_router");
        let requests = Family::<OutcomeLabels, Counter>::default();
        // 50 µs to ~3 s: in-region commits and cross-continent round trips.
        let latency = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.00005, 2.0, 17))
        });
        let forward_failures = Family::<ForwardLabels, Counter>::default();
        let placement_refreshes = Counter::default();
        let directory_reads = Counter::default();
        let retries = Counter::default();
        let untrusted_forward_headers = Counter::default();
        let write_batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        registry.register(
            "write_batch_size",
            "Writes per etcd transaction on the region's group (group commit)",
            write_batch_size.clone(),
        );
        let group_leader = crate::leader::LeaderMetrics::default();
        registry.register(
            "group_leader_direct",
            "1 while requests to the region's group go straight to its Raft leader, 0 while they go to any member",
            group_leader.direct.clone(),
        );
        registry.register(
            "group_leader_changes",
            "Times requests to the region's group were switched to a newly found Raft leader (after a move, a failure or a hang)",
            group_leader.changes.clone(),
        );
        let lease = crate::lease::LeaseMetrics::default();
        registry.register(
            "region_lease_valid",
            "1 while the region's agent has confirmed the region's lease and the router accepts writes",
            lease.valid.clone(),
        );
        registry.register(
            "region_lease_remaining_ms",
            "Validity of the region's lease left at the agent's last answer, in ms",
            lease.remaining_ms.clone(),
        );
        registry.register(
            "region_lease_refusals",
            "Writes and strong reads refused because the region's lease was not confirmed valid",
            lease.refused.clone(),
        );
        registry.register(
            "requests",
            "Requests by operation, route and gRPC code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Request latency by operation and route",
            latency.clone(),
        );
        registry.register(
            "forward_failures",
            "Forwards to another region that failed, by kind",
            forward_failures.clone(),
        );
        registry.register(
            "placement_refreshes",
            "Linearizable directory reads after a cache miss or a stale entry",
            placement_refreshes.clone(),
        );
        registry.register(
            "directory_reads",
            "Linearizable reads of a placement sent to the directory group (refreshes within 250 ms of the last one for an account use the watch-fed cache)",
            directory_reads.clone(),
        );
        registry.register(
            "retries",
            "Attempts repeated within a request's deadline (stale placement, migration, lost link)",
            retries.clone(),
        );
        registry.register(
            "untrusted_forward_headers",
            "Calls whose forwarding headers (tern-forwarded, tern-origin-region) came without the peer token and were ignored",
            untrusted_forward_headers.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            forward_failures,
            placement_refreshes,
            directory_reads,
            retries,
            untrusted_forward_headers,
            write_batch_size,
            group_leader,
            lease,
        }
    }
}

/// gRPC code names without allocating on every request.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

impl Metrics {
    pub fn observe(&self, op: &'static str, route: Route, code: tonic::Code, seconds: f64) {
        let route = route.as_str();
        self.requests
            .get_or_create(&OutcomeLabels {
                op,
                route,
                code: code_name(code),
            })
            .inc();
        self.latency
            .get_or_create(&RequestLabels { op, route })
            .observe(seconds);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
