//! The router's one error type, how each error becomes a gRPC status that
//! tells the client what to do (fix the request, retry, or look elsewhere),
//! and `classify`: the one place that decides, from an error's type chain,
//! whether a failed request may have taken effect.

use std::error::Error as StdError;

use tern_common::{AccountId, InvalidInput, RegionName};
use tonic::{Code, Status};

/// A boxed error kept as the source of a router error.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;
/// An etcd client error, shared: one failed group commit answers every
/// write in it.
pub type EtcdError = std::sync::Arc<etcd_client::Error>;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// Fix the request: an identifier, key or value broke its rule.
    #[error("invalid request: {0}")]
    Invalid(#[from] InvalidInput),
    /// Fix the request: a field of it broke a rule (the message names both).
    #[error("invalid request: {0}")]
    BadRequest(String),
    /// Fix the request: it is larger than the region group accepts.
    #[error("invalid request: {what} is {size} bytes; the limit is {limit} bytes ({rule})")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
        rule: &'static str,
    },
    /// Fix the request: the idempotency key belongs to another request.
    #[error("invalid request: idempotency_key was already used for a different request: use a new key for a new write")]
    KeyReused,
    #[error("account {0} does not exist")]
    UnknownAccount(AccountId),
    #[error("account {account} already exists, homed in {home}")]
    AccountExists { account: AccountId, home: RegionName },
    /// A Txn compare did not hold; nothing was applied.
    #[error("compare failed: {0}")]
    CompareFailed(String),
    /// etcd refused the request for good (nothing was applied): retrying
    /// it unchanged fails again.
    #[error("the region group refused the request, nothing was applied: {0}")]
    Refused(#[source] EtcdError),
    /// Retry, with the same idempotency key for writes.
    #[error("region {region} is unreachable: {source}; retry")]
    RegionUnreachable {
        region: RegionName,
        #[source]
        source: BoxError,
    },
    /// Retry: the region's own etcd group did not answer (nothing was sent,
    /// or the request was a read).
    #[error("the region group is unavailable ({what}): {source}; retry")]
    GroupUnavailable {
        what: &'static str,
        #[source]
        source: EtcdError,
    },
    /// Retry: the directory group did not answer.
    #[error("the directory is unavailable: {0}; retry")]
    DirectoryUnavailable(#[source] etcd_client::Error),
    /// Retry: a name could not be resolved (nothing was sent).
    #[error("DNS failed {what}: {source}; retry")]
    Dns {
        what: String,
        #[source]
        source: BoxError,
    },
    /// Retry: a transient state (a migration settling, a fence missing).
    #[error("{0}; retry")]
    Unavailable(String),
    /// The write may or may not have been applied.
    #[error(
        "the outcome of this write is unknown ({detail}): it may or may not have been applied; read it back, or retry with the same idempotency key"
    )]
    OutcomeUnknown {
        detail: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The deadline passed with nothing in flight: not applied.
    #[error("deadline exceeded {0}")]
    Deadline(String),
    /// A stored record or answer that this router cannot read.
    #[error("internal error: {0}")]
    Internal(String),
    /// This router is not the account's home (a forwarded call met a stale
    /// placement); the caller routes again.
    /// `hint`: where a fence here said it went, ahead of the directory.
    #[error("the account is homed in {home}, not here; route again")]
    NotHome {
        home: RegionName,
        hint: Option<crate::peer::Hint>,
    },
    /// The home region's router answered with this status; passed on as is.
    #[error("{}", .0.message())]
    Remote(Status),
    /// Start-up: an etcd group or the trace exporter could not be set up.
    #[error("cannot start: {0}")]
    Startup(#[from] tern_common::CommonError),
    /// Start-up: a listening socket could not be opened.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed while serving.
    #[error("the gRPC server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
    /// Go elsewhere: this region may not write (its lease is not confirmed
    /// valid), so another region's router, or this one later, must serve.
    #[error(
        "region {region} is not serving writes or strong reads: {why}; use another region's router, or retry later"
    )]
    NotServing { region: RegionName, why: String },
    /// Fix the request: the account's requested home takes no accounts
    /// (it drains or failed over); name one of `active`.
    #[error(
        "home_region {region} is {state} and takes no new accounts: set home_region to an active region ({})",
        if active.is_empty() { "none is active".to_string() } else { active.join(", ") }
    )]
    HomeNotAccepting {
        region: RegionName,
        state: &'static str,
        active: Vec<String>,
    },
    /// The router is stopping; another one serves.
    #[error("the router is shutting down; retry")]
    ShuttingDown,
}

pub type Result<T, E = RouterError> = std::result::Result<T, E>;

impl RouterError {
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid(_) | Self::BadRequest(_) | Self::TooLarge { .. } | Self::KeyReused => Code::InvalidArgument,
            Self::UnknownAccount(_) => Code::NotFound,
            Self::AccountExists { .. } => Code::AlreadyExists,
            Self::CompareFailed(_) | Self::HomeNotAccepting { .. } => Code::FailedPrecondition,
            Self::Refused(e) => match &**e {
                etcd_client::Error::GRpcStatus(s) => s.code(),
                _ => Code::InvalidArgument,
            },
            Self::RegionUnreachable { .. }
            | Self::GroupUnavailable { .. }
            | Self::DirectoryUnavailable(_)
            | Self::Unavailable(_)
            | Self::NotHome { .. }
            | Self::ShuttingDown
            | Self::NotServing { .. }
            | Self::Dns { .. }
            | Self::Startup(_) => Code::Unavailable,
            Self::Listen { .. } | Self::Serve(_) => Code::Internal,
            Self::OutcomeUnknown { .. } => Code::Unknown,
            Self::Deadline(_) => Code::DeadlineExceeded,
            Self::Internal(_) => Code::Internal,
            Self::Remote(s) => s.code(),
        }
    }

    /// The region group did not answer `what`.
    pub fn group(what: &'static str, source: etcd_client::Error) -> Self {
        Self::GroupUnavailable {
            what,
            source: std::sync::Arc::new(source),
        }
    }

    /// An outcome-unknown error for a write whose link or commit failed
    /// after it may have left.
    pub fn unknown(detail: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::OutcomeUnknown {
            detail: detail.into(),
            source: Some(source.into()),
        }
    }
}

/// Marks statuses produced by a tern router, so that a forwarding router can
/// tell the home router's answer from a failure of the link to it.
pub const SERVED_BY: &str = "tern-served-by";

/// Names the region that refused a request because it may not write now:
/// the client should go to another region's router.
pub const NOT_SERVING: &str = "tern-region-not-serving";

impl RouterError {
    pub fn into_status(self, region: &RegionName) -> Status {
        if let Self::Remote(status) = self {
            return status;
        }
        let mut status = Status::new(self.code(), self.to_string());
        if let Ok(v) = region.as_str().parse() {
            status.metadata_mut().insert(SERVED_BY, v);
        }
        if let Self::NotServing { region, .. } = &self
            && let Ok(v) = region.as_str().parse()
        {
            status.metadata_mut().insert(NOT_SERVING, v);
        }
        if self.code() == Code::Unavailable
            && let Ok(v) = "100".parse()
        {
            // A hint for clients that honour it: retry after this many ms.
            status.metadata_mut().insert("retry-after-ms", v);
        }
        status
    }
}

// The rule is the client's as much as the router's (a client of tern
// decides the same way whether to retry), so it lives in tern-api.
pub use tern_api::delivery::{Delivery, classify};

/// `classify` for etcd's client errors: a status etcd itself sent with a
/// code that means "refused, nothing applied" is a refusal; a request the
/// client library rejected before sending was never sent.
pub fn classify_etcd(err: &etcd_client::Error) -> Delivery {
    match err {
        etcd_client::Error::GRpcStatus(s) => {
            if classify(s) == Delivery::NotSent {
                return Delivery::NotSent;
            }
            // No source: the status came from etcd, not from the link.
            let from_server = StdError::source(s).is_none();
            match s.code() {
                Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::NotFound
                | Code::OutOfRange
                | Code::AlreadyExists
                | Code::PermissionDenied
                | Code::Unauthenticated
                    if from_server =>
                {
                    Delivery::Refused
                }
                _ => Delivery::Unknown,
            }
        }
        etcd_client::Error::InvalidArgs(_)
        | etcd_client::Error::InvalidUri(_)
        | etcd_client::Error::EndpointError(_)
        | etcd_client::Error::InvalidMetadataValue(_)
        | etcd_client::Error::EndpointsNotManaged => Delivery::NotSent,
        other => classify(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_refusals_are_definite_only_when_etcd_sent_them() {
        let too_large = etcd_client::Error::GRpcStatus(Status::invalid_argument("etcdserver: request is too large"));
        assert_eq!(classify_etcd(&too_large), Delivery::Refused);
        let lost = etcd_client::Error::GRpcStatus(Status::unavailable("etcdserver: leader changed"));
        assert_eq!(classify_etcd(&lost), Delivery::Unknown);
        let local = etcd_client::Error::InvalidArgs("bad".into());
        assert_eq!(classify_etcd(&local), Delivery::NotSent);
    }
}
