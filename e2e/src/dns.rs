//! A real DNS server on loopback for tests (hickory-server in-process):
//! answers A queries from a table that a test changes while routers run, so
//! that re-resolution on TTL expiry is tested against the real protocol
//! rather than a faked resolver.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

use crate::{HarnessError, Result};

type Table = Arc<Mutex<HashMap<String, (Ipv4Addr, u32)>>>;

/// The server and its table of names.
pub struct TestDns {
    pub addr: SocketAddr,
    table: Table,
    server: Server<Answers>,
}

struct Answers {
    table: Table,
}

impl TestDns {
    /// Serves UDP on a free loopback port.
    pub async fn start() -> Result<Self> {
        Self::start_on("127.0.0.1:0".parse().expect("static address")).await
    }

    /// Serves UDP on `addr` (the node e2e's cluster DNS: port 53 on the
    /// nodes' gateway).
    pub async fn start_on(addr: SocketAddr) -> Result<Self> {
        let socket = tokio::net::UdpSocket::bind(addr)
            .await
            .map_err(|source| HarnessError::Spawn {
                what: "test DNS server".into(),
                source,
            })?;
        let addr = socket.local_addr().map_err(|source| HarnessError::Spawn {
            what: "test DNS server".into(),
            source,
        })?;
        let table = Table::default();
        let mut server = Server::new(Answers { table: table.clone() });
        server.register_socket(socket);
        Ok(Self { addr, table, server })
    }

    /// Sets `name` (without the trailing dot) to `ip` with `ttl` seconds.
    pub fn set(&self, name: &str, ip: Ipv4Addr, ttl: u32) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.insert(
            format!("{}.", name.trim_end_matches('.').to_ascii_lowercase()),
            (ip, ttl),
        );
    }

    /// A handle on the table that a background task can keep.
    pub fn clone_handle(&self) -> DnsTable {
        DnsTable(self.table.clone())
    }

    pub async fn stop(mut self) {
        let _ = self.server.shutdown_gracefully().await;
    }
}

/// The table of a [`TestDns`], shared.
#[derive(Clone)]
pub struct DnsTable(Table);

impl DnsTable {
    /// Replaces the whole table (names without the trailing dot).
    pub fn replace(&self, names: HashMap<String, Ipv4Addr>, ttl: u32) {
        let new: HashMap<_, _> = names
            .into_iter()
            .map(|(name, ip)| {
                (
                    format!("{}.", name.trim_end_matches('.').to_ascii_lowercase()),
                    (ip, ttl),
                )
            })
            .collect();
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = new;
    }
}

#[async_trait::async_trait]
impl RequestHandler for Answers {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let mut records = Vec::new();
        match request.request_info() {
            Ok(info) => {
                let name = info.query.name().to_string().to_ascii_lowercase();
                let answer = self.table.lock().unwrap_or_else(|e| e.into_inner()).get(&name).copied();
                match answer {
                    Some((ip, ttl)) if info.query.query_type() == RecordType::A => {
                        records.push(Record::from_rdata(
                            info.query.original().name().clone(),
                            ttl,
                            RData::A(A(ip)),
                        ));
                    }
                    Some(_) => {}
                    None => metadata.response_code = ResponseCode::NXDomain,
                }
            }
            Err(_) => metadata.response_code = ResponseCode::FormErr,
        }
        let message = MessageResponseBuilder::from_message_request(request).build(
            metadata,
            records.iter(),
            std::iter::empty(),
            std::iter::empty(),
            std::iter::empty(),
        );
        match response.send_response(message).await {
            Ok(info) => info,
            Err(_) => ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            }),
        }
    }
}
