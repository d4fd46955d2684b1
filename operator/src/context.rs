//! What the reconcilers share: injected dependencies only (client, event
//! recorder, metrics, the managed regions), plus per-object retry backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};

use crate::metrics::Metrics;
use crate::regions::RegionFilter;

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub managed: RegionFilter,
    /// Longest time between two reconciles of an object.
    pub resync: Duration,
    /// Router and agent images when a GeoCluster names none.
    pub router_image: String,
    pub agent_image: String,
    /// One `operator.reconcile` span per reconcile, when exporting.
    pub telemetry: tern_common::telemetry::Telemetry,
    /// `--directory-endpoints`: where AccountMigrations go instead of the
    /// GeoCluster's directory Services.
    pub directory_endpoints: Vec<String>,
    /// Automatic moves recorded as AccountMigration objects per GeoCluster
    /// (0: none).
    pub automatic_history: usize,
    /// The namespace the operator's pods run in (`POD_NAMESPACE`): the
    /// NetworkPolicies let them reach the etcd members.
    pub operator_namespace: String,
    /// Directory clients by endpoints, connected once.
    /// Directory clients by endpoints, with the serial of the certificate
    /// each was made with (none: plain).
    pub directories: tokio::sync::Mutex<HashMap<String, (Option<String>, etcd_client::Client)>>,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        identity: &str,
        metrics: Arc<Metrics>,
        managed: RegionFilter,
        resync: Duration,
        router_image: String,
        agent_image: String,
    ) -> Self {
        let reporter = Reporter {
            controller: "tern-operator".into(),
            instance: Some(identity.to_string()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            managed,
            resync,
            router_image,
            agent_image,
            telemetry: tern_common::telemetry::Telemetry::disabled(),
            directory_endpoints: Vec::new(),
            directories: Default::default(),
            automatic_history: 100,
            operator_namespace: "tern-system".into(),
            failures: Mutex::default(),
        }
    }

    /// Publishes an event on `obj`. A failure to publish is logged, not
    /// returned: events are for people, and must not block a reconcile.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not publish event");
        }
    }

    /// Delay before retrying `key` after a transient failure: 1 s doubling up
    /// to 5 min.
    pub fn backoff(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        Duration::from_secs(1u64 << (*n - 1).min(8)).min(Duration::from_secs(300))
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

/// A key for an object in logs and backoff: `kind/namespace/name`.
pub fn key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.meta().name.as_deref().unwrap_or_default()
    )
}
