//! The two controllers: GeoCluster → RegionGroups (plus status and the
//! deletion finalizer), and RegionGroup → the objects that run its members.

pub mod geocluster;
pub mod regiongroup;

use kube::Resource;
use kube::runtime::controller::Action;

use crate::Error;
use crate::context::{Context, key};

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
