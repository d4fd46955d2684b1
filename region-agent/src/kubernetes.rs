//! Publishing lag into the GeoCluster's status when running in Kubernetes:
//! server-side apply with this agent's own field manager
//! (`tern-agent-<region>`) and only its own fields of its region's entry
//! (agent, mirrors, membersBehind), so the operator's fields are untouched.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde_json::json;
use tern_crds::GeoCluster;

use crate::error::{AgentError, Result};
use crate::state::Shared;

/// A client from `kubeconfig`, or the in-cluster / $KUBECONFIG configuration.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let what = || format!("--kubeconfig {}", path.display());
            let text = std::fs::read_to_string(path).map_err(|e| AgentError::Kubernetes {
                what: what(),
                source: Box::new(e),
            })?;
            let kc = Kubeconfig::from_yaml(&text).map_err(|e| AgentError::Kubernetes {
                what: what(),
                source: Box::new(e),
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| AgentError::Kubernetes {
                    what: what(),
                    source: Box::new(e),
                })?
        }
        None => Config::infer().await.map_err(|e| AgentError::Kubernetes {
            what: "no in-cluster or $KUBECONFIG configuration".into(),
            source: Box::new(e),
        })?,
    };
    Client::try_from(config).map_err(|e| AgentError::Kubernetes {
        what: "building the client".into(),
        source: Box::new(e),
    })
}

/// Writes this region's lag into the GeoCluster's status every `interval`.
pub async fn run(client: Client, namespace: String, geocluster: String, shared: Arc<Shared>, interval: Duration) {
    let api: Api<GeoCluster> = Api::namespaced(client, &namespace);
    let manager = format!("tern-agent-{}", shared.region);
    loop {
        tokio::time::sleep(interval).await;
        let mirrors: Vec<serde_json::Value> = shared
            .mirror_statuses()
            .iter()
            .map(|(source, m)| {
                json!({
                    "source": source,
                    "state": m.state,
                    "lagMs": i64::try_from(m.lag_ms).unwrap_or(i64::MAX),
                    "lagErrorMs": i64::try_from(m.lag_error_ms).unwrap_or(i64::MAX),
                    "lagRevisions": m.lag_revisions,
                    "skewMs": m.skew_ms,
                })
            })
            .collect();
        let (behind, leader) = {
            let members = shared.members.lock().unwrap_or_else(|e| e.into_inner());
            let behind = members.iter().filter(|m| m.behind > 0).count();
            let leader = members.iter().find(|m| m.is_leader).map(|m| m.endpoint.clone());
            (behind, leader)
        };
        let patch = json!({
            "apiVersion": "tern.dev/v1alpha1",
            "kind": "GeoCluster",
            "status": {"regions": [{
                "name": shared.region.as_str(),
                "agent": shared.identity,
                "mirrors": mirrors,
                "membersBehind": behind,
                "groupLeader": leader,
            }]}
        });
        if let Err(e) = api
            .patch_status(
                &geocluster,
                &PatchParams::apply(&manager).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            // Before the operator has written this region's entry the status
            // is incomplete and the API server refuses it; it comes next time.
            tracing::debug!(error = %e, "could not publish lag into the GeoCluster status");
        }
    }
}
