//! The controllers: GeoCluster → RegionGroups (plus status and the
//! deletion finalizer), RegionGroup → the objects that run its members, and
//! AccountMigration → an intent record the target region's agent carries
//! out, its progress copied back into the object's status; and the audit
//! trail of automatic moves as AccountMigration objects.

pub mod audit;
pub mod geocluster;
pub mod migration;
pub mod regiongroup;
pub mod regions;

use std::future::Future;
use std::sync::Arc;

use kube::Resource;
use kube::runtime::controller::Action;
use opentelemetry::KeyValue;
use tern_common::telemetry::finish;

use crate::context::{Context, key};
use crate::{Error, Result};

/// Runs one reconcile of `obj` as an `operator.reconcile` span (when
/// exporting) that names the controller, the object and the outcome.
pub(crate) async fn traced<K: Resource<DynamicType = ()>>(
    controller: &'static str,
    obj: Arc<K>,
    ctx: Arc<Context>,
    reconcile: impl Future<Output = Result<Action>>,
) -> Result<Action> {
    let span = ctx.telemetry.root("operator.reconcile", || {
        vec![
            KeyValue::new("tern.controller", controller),
            KeyValue::new("tern.object", key(obj.as_ref())),
            KeyValue::new("tern.generation", obj.meta().generation.unwrap_or(0)),
        ]
    });
    let result = reconcile.await;
    let outcome = match &result {
        Ok(_) => "applied",
        Err(e) if e.is_permanent() => "invalid",
        Err(_) => "retry",
    };
    finish(
        span,
        vec![KeyValue::new("tern.outcome", outcome)],
        result.as_ref().map(|_| ()),
    );
    result
}

/// Shared error policy: a permanent error waits for the object to change, a
/// transient one is retried with per-object backoff.
pub(crate) fn error_policy<K: Resource<DynamicType = ()>>(
    controller: &'static str,
    obj: &K,
    error: &Error,
    ctx: &Context,
) -> Action {
    ctx.metrics.error(controller, error);
    let key = key(obj);
    if error.is_permanent() {
        tracing::info!(object = %key, error = %error, "waiting for the object to change");
        Action::await_change()
    } else {
        let delay = ctx.backoff(&key);
        tracing::warn!(object = %key, error = %error, retry_in = ?delay, "reconcile failed");
        Action::requeue(delay)
    }
}
