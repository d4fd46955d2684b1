//! tern-api: the router's gRPC API as one small crate, so that the router
//! (server side), the `tern` command and the tests (client side) share the
//! protocol without the client pulling in the router itself.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

pub mod delivery;

use tonic::transport::{Channel, Endpoint};

/// The generated gRPC types of proto/tern/v1/router.proto.
pub mod pb {
    #![allow(clippy::all)]
    tonic::include_proto!("tern.v1");
}

/// The client type of a router.
pub type RouterClient = pb::router_client::RouterClient<Channel>;

/// A client of the router at `addr`. The channel connects on first use, so
/// a router that is still starting is not an error here; TCP_NODELAY keeps
/// small requests from waiting for a delayed ACK (Nagle's algorithm).
pub async fn connect(addr: SocketAddr) -> RouterClient {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("a socket address is a valid URI")
        .tcp_nodelay(true)
        .connect_lazy();
    pb::router_client::RouterClient::new(channel)
}
