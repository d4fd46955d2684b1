//! The gRPC service: a thin adapter from tonic's `Router` trait to the
//! request path in `execute`. Each data call is parsed, routed, run or
//! forwarded, and measured there, the same way for every operation.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::execute::Executor;
use crate::pb;
use crate::pb::router_server::Router;

/// The router's gRPC service.
#[derive(Clone)]
pub struct RouterService(pub Arc<Executor>);

#[tonic::async_trait]
impl Router for RouterService {
    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::CreateAccountResponse>, Status> {
        self.0.create_account(request).await
    }

    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        self.0.serve(request).await
    }

    async fn delete(&self, request: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        self.0.serve(request).await
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        self.0.serve(request).await
    }

    async fn list(&self, request: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        self.0.serve(request).await
    }

    async fn txn(&self, request: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        self.0.serve(request).await
    }
}
