//! Resolving region endpoints. Every `host:port` a router dials goes through
//! here: hickory-resolver does the lookups and caches answers for their TTL,
//! so moving a region's routers is a DNS change that routers pick up when the
//! old record expires.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};

use crate::error::{Result, RouterError};

/// How long an address literal (no DNS involved) is trusted.
const LITERAL_TTL: Duration = Duration::from_secs(3600);

/// The DNS client of a router.
pub struct Dns {
    resolver: TokioResolver,
}

impl Dns {
    /// The system's resolver (`/etc/resolv.conf`), or one name server when
    /// `server` is given (tests run a real DNS server on loopback).
    pub fn new(server: Option<SocketAddr>) -> Result<Self> {
        let builder = match server {
            Some(addr) => {
                let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut ns.connections {
                    c.port = addr.port();
                }
                Resolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => Resolver::builder_tokio().map_err(|e| RouterError::Dns {
                what: "reading the system's DNS configuration".into(),
                source: Box::new(e),
            })?,
        };
        let mut opts = ResolverOpts::default();
        // A region's endpoint must follow DNS changes within their TTL.
        opts.positive_max_ttl = Some(Duration::from_secs(300));
        opts.negative_max_ttl = Some(Duration::from_secs(5));
        let resolver = builder.with_options(opts).build().map_err(|e| RouterError::Dns {
            what: "building the DNS resolver".into(),
            source: Box::new(e),
        })?;
        Ok(Self { resolver })
    }

    /// `host:port` → one address and until when it may be used.
    pub async fn resolve(&self, endpoint: &str) -> Result<(SocketAddr, Instant)> {
        let (host, port) = split_endpoint(endpoint)?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok((SocketAddr::new(ip, port), Instant::now() + LITERAL_TTL));
        }
        let lookup = self.resolver.lookup_ip(host).await.map_err(|e| RouterError::Dns {
            what: format!("resolving {host}"),
            source: Box::new(e),
        })?;
        let ip = lookup.iter().next().ok_or_else(|| RouterError::Dns {
            what: format!("resolving {host}"),
            source: "the name has no addresses".into(),
        })?;
        Ok((SocketAddr::new(ip, port), lookup.valid_until()))
    }
}

/// Splits `host:port` (IPv6 as `[::1]:port`).
pub fn split_endpoint(endpoint: &str) -> Result<(&str, u16)> {
    let bad = || RouterError::BadRequest(format!("endpoint `{endpoint}` is not host:port"));
    let (host, port) = endpoint.rsplit_once(':').ok_or_else(bad)?;
    let port = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_split() {
        assert_eq!(
            split_endpoint("router.eu-west.example:7400").expect("valid"),
            ("router.eu-west.example", 7400)
        );
        assert_eq!(split_endpoint("[::1]:80").expect("valid"), ("::1", 80));
        assert!(split_endpoint("nohost").is_err());
        assert!(split_endpoint(":80").is_err());
        assert!(split_endpoint("h:port").is_err());
    }
}
