//! Kubernetes events on the agent's GeoCluster, for what people must hear
//! of (a mirror resynchronised from a snapshot). Its own module so that the
//! shared state can hold a recorder without depending on the status
//! publisher (`kubernetes`), which reads that state.

use kube::Client;

/// Events about the GeoCluster, for what people must hear of (a resync).
#[derive(Clone)]
pub struct Events {
    recorder: kube::runtime::events::Recorder,
    object: k8s_openapi::api::core::v1::ObjectReference,
}

impl Events {
    pub fn new(client: Client, namespace: &str, geocluster: &str, identity: &str) -> Self {
        let reporter = kube::runtime::events::Reporter {
            controller: "tern-agent".into(),
            instance: Some(identity.to_string()),
        };
        Self {
            recorder: kube::runtime::events::Recorder::new(client, reporter),
            object: k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("tern.dev/v1alpha1".into()),
                kind: Some("GeoCluster".into()),
                name: Some(geocluster.to_string()),
                namespace: Some(namespace.to_string()),
                ..Default::default()
            },
        }
    }

    /// Publishes a Warning about a mirror; failures are logged, never
    /// returned.
    pub async fn warn(&self, reason: &str, note: String) {
        self.warning(reason, "Mirror", note).await;
    }

    /// Publishes a Warning about `action`.
    pub async fn warning(&self, reason: &str, action: &str, note: String) {
        self.publish(kube::runtime::events::EventType::Warning, reason, action, note)
            .await;
    }

    /// Publishes a Normal event (a decision people may want to read).
    pub async fn normal(&self, reason: &str, action: &str, note: String) {
        self.publish(kube::runtime::events::EventType::Normal, reason, action, note)
            .await;
    }

    async fn publish(&self, type_: kube::runtime::events::EventType, reason: &str, action: &str, note: String) {
        let event = kube::runtime::events::Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &self.object).await {
            tracing::warn!(error = %e, "could not publish an event");
        }
    }
}
