//! Whether a failed call may have taken effect: the rule every client of
//! tern needs before it retries a write, and the one the router applies to
//! the calls it forwards to a peer. It reads the error's type chain, never
//! its text.

use std::error::Error as StdError;

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
pub fn classify(err: &(dyn StdError + 'static)) -> Delivery {
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

#[cfg(test)]
mod tests {
    use super::*;

    type BoxError = Box<dyn StdError + Send + Sync>;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapper")]
    struct Wrapper(#[source] BoxError);

    #[test]
    fn only_a_failed_connect_is_not_sent() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let connect = Wrapper(Box::new(tonic::ConnectError(Box::new(refused))));
        assert_eq!(classify(&connect), Delivery::NotSent);

        // A reset after the request left says "connection" in its text but
        // is no connect failure.
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "Connect reset by peer");
        assert_eq!(classify(&Wrapper(Box::new(reset))), Delivery::Unknown);
        let text_only = tonic::Status::unavailable("tcp connect error: Connection refused");
        assert_eq!(classify(&text_only), Delivery::Unknown);
    }

    #[test]
    fn refused_streams_were_not_processed() {
        let refused: h2::Error = h2::Reason::REFUSED_STREAM.into();
        assert_eq!(classify(&Wrapper(Box::new(refused))), Delivery::NotSent);
        let cancel: h2::Error = h2::Reason::CANCEL.into();
        assert_eq!(classify(&Wrapper(Box::new(cancel))), Delivery::Unknown);
    }
}
