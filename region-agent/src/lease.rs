//! The region's lease as its routers see it (DESIGN.md write path step 4,
//! "Failover"): routers refuse writes once the region's lease key in the
//! directory might have expired, and only the elected agent knows when its
//! lease was last renewed. So the agent
//!
//! - says where it can be reached: `/tern/leader/{region}` in the region's
//!   own group, on its election lease (gone with its leadership), guarded by
//!   its election;
//! - answers `GET /lease` with how long from now the key is certain to
//!   exist, less the margin: the renewal's *send* time plus the TTL (the
//!   directory extended the lease after the send), on its monotonic clock.
//!
//! A router adds that remaining time to the instant it sent its request (so
//! its bound can only be earlier than the agent's) and never compares
//! clocks with anyone.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use etcd_client::{Client, PutOptions, Txn, TxnOp};
use tern_common::{AgentEndpoint, LeaseAnswer, agent_endpoint_key};

use crate::election::Leadership;
use crate::error::{AgentError, EtcdContext};
use crate::state::Shared;

/// How often the announcement is checked (and written again if another
/// value replaced it, as after a restore of the group).
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Keeps `/tern/leader/{region}` saying that this leadership answers at
/// `http`. Returns only when the election no longer holds.
pub async fn announce(group: Client, leadership: Leadership, shared: Arc<Shared>, http: String) -> AgentError {
    let key = agent_endpoint_key(&shared.region);
    let value = serde_json::to_string(&AgentEndpoint {
        agent: shared.identity.clone(),
        http,
        leadership: leadership.rev,
    })
    .expect("records always serialise");
    let mut c = group;
    loop {
        let current = c.get(key.clone(), None).await.during(|| format!("reading {key}"));
        let stale = match &current {
            Ok(r) => r.kvs().first().is_none_or(|kv| kv.value() != value.as_bytes()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the agent's announcement; retrying");
                true
            }
        };
        if stale {
            let put = TxnOp::put(
                key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(leadership.lease)),
            );
            let txn = Txn::new().when([leadership.guard()]).and_then([put]);
            match c.txn(txn).await.during(|| format!("writing {key}")) {
                Ok(r) if r.succeeded() => tracing::info!(%key, "routers ask this agent about the region's lease"),
                Ok(_) => return AgentError::NotLeader("the election key changed; not announcing".into()),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot announce this agent to the routers; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        tokio::time::sleep(CHECK_EVERY).await;
    }
}

#[derive(Clone)]
struct LeaseState {
    shared: Arc<Shared>,
    ttl: Duration,
    margin: Duration,
}

/// `GET /lease`: a [`LeaseAnswer`] while this agent holds the region's
/// lease, else 503 with the reason.
pub fn routes(shared: Arc<Shared>, ttl: Duration, margin: Duration) -> axum::Router {
    axum::Router::new()
        .route("/lease", axum::routing::get(answer))
        .with_state(LeaseState { shared, ttl, margin })
}

async fn answer(State(s): State<LeaseState>) -> Response {
    match s.shared.lease_remaining(s.ttl, s.margin) {
        Ok((claim, remaining)) => {
            let body = serde_json::to_string(&LeaseAnswer {
                region: s.shared.region.to_string(),
                agent: s.shared.identity.clone(),
                leadership: claim.leadership,
                remaining_ms: remaining.as_millis() as u64,
                ttl_ms: s.ttl.as_millis() as u64,
            })
            .expect("records always serialise");
            ([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}
