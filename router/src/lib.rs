//! tern-router: the geo-aware router. A request for an account homed in this
//! region runs as one fenced etcd transaction on the region's group; any
//! other is forwarded to the home region's router over a pooled HTTP/2
//! channel, one cross-region round trip.
//!
//! The request path, in the order a call meets it: `service` (the gRPC
//! adapter) → `ops` (the request validated into an operation) → `execute`
//! (deadline, spans, metrics, and the one loop every operation takes) →
//! `placement` (the watch-fed directory cache) → `store` (the fenced
//! transaction, idempotency; `batch` lets concurrent writes share one
//! commit, `leader` sends them to the group's Raft leader, `retention` ends
//! idempotency records) or `forward` (the pooled channel to another region,
//! resolved through `dns`, trusted by the peer through `peer`). `error`
//! says what each failure means for the client, and decides whether a
//! failed request may have taken effect. `counts` records where writes come
//! from; `metrics` and `server` make it an operable process.
#![forbid(unsafe_code)]

pub mod batch;
pub mod config;
pub mod counts;
pub mod dns;
pub mod error;
pub mod execute;
pub mod forward;
pub mod leader;
pub mod lease;
pub mod metrics;
pub mod ops;
pub mod peer;
pub mod placement;
pub mod retention;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;

/// The generated gRPC types of the API (router/api/proto/tern/v1/router.proto),
/// from tern-api, so that `crate::pb` names them as before.
pub use tern_api::pb;

pub use config::Config;
pub use error::{Result, RouterError};
