//! The router's one error type and how each error becomes a gRPC status that
//! tells the client what to do: fix the request, retry, or look elsewhere.

use tern_common::{InvalidInput, RegionName};
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// Fix the request.
    #[error("invalid request: {0}")]
    Invalid(#[from] InvalidInput),
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("account {0} does not exist")]
    UnknownAccount(String),
    #[error("account {account} already exists, homed in {home}")]
    AccountExists { account: String, home: RegionName },
    #[error("compare failed: {0}")]
    CompareFailed(String),
    /// Retry, with the same idempotency key for writes.
    #[error("region {region} is unreachable: {detail}; retry")]
    RegionUnreachable { region: RegionName, detail: String },
    #[error("{0}; retry")]
    Unavailable(String),
    /// The write may or may not have been applied.
    #[error(
        "the outcome of this write is unknown ({0}): it may or may not have been applied; read it back, or retry with an idempotency key"
    )]
    OutcomeUnknown(String),
    #[error("deadline exceeded {0}")]
    Deadline(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// This router is not the account's home (a forwarded call met a stale
    /// placement); the caller routes again.
    #[error("the account is homed in {0}, not here; route again")]
    NotHome(RegionName),
    /// The home region's router answered with this status; passed on as is.
    #[error("{}", .0.message())]
    Remote(Status),
}

pub type Result<T, E = RouterError> = std::result::Result<T, E>;

impl RouterError {
    pub fn code(&self) -> Code {
        match self {
            Self::Invalid(_) | Self::BadRequest(_) => Code::InvalidArgument,
            Self::UnknownAccount(_) => Code::NotFound,
            Self::AccountExists { .. } => Code::AlreadyExists,
            Self::CompareFailed(_) => Code::FailedPrecondition,
            Self::RegionUnreachable { .. } | Self::Unavailable(_) => Code::Unavailable,
            Self::OutcomeUnknown(_) => Code::Unknown,
            Self::Deadline(_) => Code::DeadlineExceeded,
            Self::Internal(_) => Code::Internal,
            Self::NotHome(_) => Code::Unavailable,
            Self::Remote(s) => s.code(),
        }
    }
}

/// Marks statuses produced by a tern router, so that a forwarding router can
/// tell the home router's answer from a failure of the link to it.
pub const SERVED_BY: &str = "tern-served-by";

impl RouterError {
    pub fn into_status(self, region: &RegionName) -> Status {
        let mut status = Status::new(self.code(), self.to_string());
        if let Ok(v) = region.as_str().parse() {
            status.metadata_mut().insert(SERVED_BY, v);
        }
        if matches!(self, Self::RegionUnreachable { .. } | Self::Unavailable(_))
            && let Ok(v) = "100".parse()
        {
            // A hint for clients that honour it: retry after this many ms.
            status.metadata_mut().insert("retry-after-ms", v);
        }
        status
    }
}

impl From<etcd_client::Error> for RouterError {
    fn from(e: etcd_client::Error) -> Self {
        Self::Unavailable(format!("etcd: {e}"))
    }
}

/// What a failed request tells about whether it took effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// It never left: the connection could not be established, or the
    /// server refused the stream before reading it. Safe to send again.
    NotSent,
    /// The server answered that it applied nothing and will refuse the same
    /// request again (too large, a duplicate key, an unknown lease).
    Refused,
    /// It may have been applied: the link failed or the answer was lost
    /// after it left.
    Unknown,
}

/// Decides from the error's type chain (never from its text) whether the
/// request may have taken effect. Only a failure to establish the
/// connection proves that nothing was sent: a reset, a closed stream or a
/// timeout after the request left may have lost the answer to a committed
/// write.
pub fn classify(err: &(dyn std::error::Error + 'static)) -> Delivery {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.is::<tonic::ConnectError>() {
            return Delivery::NotSent;
        }
        // The server promises it did not process a refused stream (HTTP/2
        // REFUSED_STREAM, sent for streams above a GOAWAY's last id).
        if let Some(h2) = e.downcast_ref::<h2::Error>()
            && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return Delivery::NotSent;
        }
        next = e.source();
    }
    Delivery::Unknown
}

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
            let from_server = std::error::Error::source(s).is_none();
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
