//! The headers a router sets on a call it forwards (origin region, "already
//! forwarded") and the shared peer token that makes the home router trust
//! them. A client that sets those headers itself could make a router skip
//! its own routing (serve a call as if it came from another region, bypass
//! the BOUNDED-read mirror rule, or record its writes against another
//! region); so they count only from a peer that shows the GeoCluster's
//! token, and are otherwise ignored and counted.
//!
//! A forwarded call also carries a home hint: where the caller believes
//! the account is homed and at which epoch, from its placement or, during
//! a migration, from a fence that told it ahead of the directory. A hint
//! only says where to try: the fence of that region's group still decides
//! whether the write commits there.

use std::fmt;
use std::sync::Arc;

use tern_common::tls::{PeerInfo, Role, identity};
use tern_common::{Epoch, RegionName};
use tonic::metadata::{MetadataMap, MetadataValue};

/// Metadata keys of a forwarded call.
pub const ORIGIN_REGION: &str = "tern-origin-region";
pub const FORWARDED: &str = "tern-forwarded";
pub const PEER_TOKEN: &str = "tern-peer-token";
pub const HOME_HINT: &str = "tern-home-hint";

/// Where a caller believes an account is homed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hint {
    pub home: RegionName,
    pub epoch: Epoch,
    /// The home's fence is active at that epoch: the hint comes from a
    /// `moved` fence, or from a placement the directory names active.
    /// Otherwise it comes from a placement that says `migrating`, or from a
    /// `fenced` source during a move to `home`: the copy may not have
    /// landed yet.
    pub settled: bool,
}

impl Hint {
    /// `home@epoch`, with `!` when settled: the text of the header.
    pub fn to_header(&self) -> String {
        format!("{}@{}{}", self.home, self.epoch.0, if self.settled { "!" } else { "" })
    }

    pub fn from_header(text: &str) -> Result<Self, String> {
        let (rest, settled) = match text.strip_suffix('!') {
            Some(r) => (r, true),
            None => (text, false),
        };
        let (home, epoch) = rest
            .split_once('@')
            .ok_or_else(|| format!("header {HOME_HINT} `{text}` is not REGION@EPOCH"))?;
        let home = RegionName::new(home).map_err(|e| format!("header {HOME_HINT}: {e}"))?;
        let epoch = epoch
            .parse::<u64>()
            .map_err(|_| format!("header {HOME_HINT}: epoch `{epoch}` is not a number"))?;
        Ok(Self {
            home,
            epoch: Epoch(epoch),
            settled,
        })
    }
}

/// Shortest and longest token accepted.
const MIN_TOKEN: usize = 16;
const MAX_TOKEN: usize = 256;

/// The secret the routers of one GeoCluster share. Never printed.
#[derive(Clone)]
pub struct PeerToken(Arc<str>);

impl PeerToken {
    /// A token of 16 to 256 visible ASCII characters (it travels as a gRPC
    /// metadata value).
    pub fn new(token: &str) -> Result<Self, String> {
        if token.len() < MIN_TOKEN || token.len() > MAX_TOKEN {
            return Err(format!(
                "the peer token is {} characters; it must have {MIN_TOKEN} to {MAX_TOKEN}",
                token.len()
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the peer token must be visible ASCII characters only (no spaces)".into());
        }
        Ok(Self(token.into()))
    }

    /// Compares in time independent of where the first difference is, so
    /// the token cannot be guessed byte by byte from response times.
    fn matches(&self, offered: &[u8]) -> bool {
        let ours = self.0.as_bytes();
        if ours.len() != offered.len() {
            return false;
        }
        ours.iter().zip(offered).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl fmt::Debug for PeerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PeerToken(<redacted>)")
    }
}

/// Who sent a call, as far as its headers can be trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A client (or a caller whose forwarding headers were not trusted).
    Client {
        /// It set forwarding headers without the peer token: they were
        /// ignored.
        forged: bool,
    },
    /// Another region's router, forwarding for a client of `origin`, with
    /// the home a fence told it about, if any.
    Peer { origin: RegionName, hint: Option<Hint> },
}

/// Reads the forwarding headers of an incoming call. They are trusted when
/// the caller shows this router's peer `token`, or when it connected with
/// a verified client certificate that names a router of the origin region
/// it claims (`peer`, from the TLS handshake): a router of one region
/// cannot speak for another's clients.
pub fn caller(md: &MetadataMap, token: Option<&PeerToken>, peer: Option<&PeerInfo>) -> Result<Caller, String> {
    let claims = md.get(FORWARDED).is_some() || md.get(ORIGIN_REGION).is_some();
    if !claims {
        return Ok(Caller::Client { forged: false });
    }
    let by_token = match (token, md.get(PEER_TOKEN)) {
        (Some(ours), Some(offered)) => ours.matches(offered.as_bytes()),
        _ => false,
    };
    let by_certificate = match (peer, md.get(ORIGIN_REGION).and_then(|o| o.to_str().ok())) {
        (Some(peer), Some(origin)) => peer.is(&identity(Role::Router, origin)),
        _ => false,
    };
    if !(by_token || by_certificate) {
        return Ok(Caller::Client { forged: true });
    }
    let origin = md
        .get(ORIGIN_REGION)
        .ok_or_else(|| format!("a forwarded call lacks the {ORIGIN_REGION} header"))?;
    let origin = origin
        .to_str()
        .map_err(|_| format!("header {ORIGIN_REGION} is not text"))
        .and_then(|o| RegionName::new(o).map_err(|e| format!("header {ORIGIN_REGION}: {e}")))?;
    let hint = match md.get(HOME_HINT) {
        Some(h) => Some(
            h.to_str()
                .map_err(|_| format!("header {HOME_HINT} is not text"))
                .and_then(Hint::from_header)?,
        ),
        None => None,
    };
    Ok(Caller::Peer { origin, hint })
}

/// Sets the headers of a call this router forwards for a client of `origin`.
pub fn mark_forwarded(md: &mut MetadataMap, origin: &RegionName, token: Option<&PeerToken>, hint: Option<&Hint>) {
    if let Ok(v) = origin.as_str().parse() {
        md.insert(ORIGIN_REGION, v);
    }
    if let Some(h) = hint
        && let Ok(v) = h.to_header().parse()
    {
        md.insert(HOME_HINT, v);
    }
    md.insert(FORWARDED, MetadataValue::from_static("1"));
    if let Some(t) = token
        && let Ok(v) = t.0.parse()
    {
        md.insert(PEER_TOKEN, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> PeerToken {
        PeerToken::new("0123456789abcdef-peer").expect("valid")
    }

    fn forwarded(with: Option<&PeerToken>) -> MetadataMap {
        let mut md = MetadataMap::new();
        mark_forwarded(&mut md, &RegionName::new("eu-west").expect("valid"), with, None);
        md
    }

    #[test]
    fn forwarding_headers_count_only_with_the_peer_token() {
        let ours = token();
        assert_eq!(
            caller(&forwarded(Some(&ours)), Some(&ours), None),
            Ok(Caller::Peer {
                origin: RegionName::new("eu-west").expect("valid"),
                hint: None,
            })
        );
        // Set by a client: no token, a wrong one, or a router with none.
        assert_eq!(
            caller(&forwarded(None), Some(&ours), None),
            Ok(Caller::Client { forged: true })
        );
        let other = PeerToken::new("another-token-of-ours").expect("valid");
        assert_eq!(
            caller(&forwarded(Some(&other)), Some(&ours), None),
            Ok(Caller::Client { forged: true })
        );
        assert_eq!(
            caller(&forwarded(Some(&ours)), None, None),
            Ok(Caller::Client { forged: true })
        );
        assert_eq!(
            caller(&MetadataMap::new(), Some(&ours), None),
            Ok(Caller::Client { forged: false })
        );
    }

    #[test]
    fn a_router_certificate_vouches_only_for_its_own_region() {
        let peer = |identities: &[&str]| PeerInfo {
            remote: "127.0.0.1:1".parse().expect("valid"),
            identities: identities.iter().map(|i| i.to_string()).collect::<Vec<_>>().into(),
        };
        let eu_router = peer(&["spiffe://tern/router/eu-west"]);
        let us_router = peer(&["spiffe://tern/router/us-east"]);
        let eu_agent = peer(&["spiffe://tern/agent/eu-west"]);
        assert!(matches!(
            caller(&forwarded(None), None, Some(&eu_router)),
            Ok(Caller::Peer { .. })
        ));
        for other in [&us_router, &eu_agent, &peer(&[])] {
            assert_eq!(
                caller(&forwarded(None), None, Some(other)),
                Ok(Caller::Client { forged: true }),
                "{other:?}"
            );
        }
    }

    #[test]
    fn a_home_hint_travels_as_a_header_and_bad_ones_are_named() {
        let hint = Hint {
            home: RegionName::new("ap-south").expect("valid"),
            epoch: Epoch(7),
            settled: true,
        };
        let ours = token();
        let mut md = MetadataMap::new();
        mark_forwarded(
            &mut md,
            &RegionName::new("eu-west").expect("valid"),
            Some(&ours),
            Some(&hint),
        );
        assert_eq!(md.get(HOME_HINT).and_then(|v| v.to_str().ok()), Some("ap-south@7!"));
        match caller(&md, Some(&ours), None) {
            Ok(Caller::Peer { hint: Some(h), .. }) => assert_eq!(h, hint),
            other => panic!("{other:?}"),
        }
        let tentative = Hint::from_header("eu-west@2").expect("valid");
        assert!(!tentative.settled);
        for bad in ["eu-west", "eu-west@x", "EU/west@2", "@2"] {
            let e = Hint::from_header(bad).expect_err(bad);
            assert!(e.contains(HOME_HINT), "{bad}: {e}");
        }
    }

    #[test]
    fn tokens_are_long_visible_and_never_printed() {
        assert!(PeerToken::new("short").is_err());
        assert!(PeerToken::new("has a space in it ok").is_err());
        assert_eq!(format!("{:?}", token()), "PeerToken(<redacted>)");
    }
}
