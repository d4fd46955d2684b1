//! GeoCluster `spec.networkPolicy` → three NetworkPolicies per managed
//! region, one for each kind of pod tern runs there:
//!
//! - the etcd members of the region's data group and directory share: the
//!   client and peer ports from the GeoCluster's own pods, the operator's
//!   pods and `peerCidrs` (other clusters' agents, routers and directory
//!   members);
//! - the routers: the API port from `clients` (anyone when empty), the
//!   GeoCluster's own pods (a forwarded write from another region's router
//!   in this cluster) and `peerCidrs` (from another cluster's);
//! - the agents: nothing but their ops port.
//!
//! Ops ports (`/metrics`, probes, an agent's `/lease`) are open to all:
//! Prometheus and the kubelet have no tern identity, and nothing secret is
//! served there (docs/security.md). Only ingress is restricted: what tern's
//! pods dial is what the spec tells them to.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use tern_crds::{GeoCluster, NetworkPeer};

use crate::build::components::{self, AGENT_HTTP_PORT, Component, GRPC_PORT, HTTP_PORT};
use crate::names;

/// The label the operator's pods carry (operator/deploy/base/deployment.yaml).
const OPERATOR_POD_LABEL: (&str, &str) = (names::LABEL_NAME, "tern-operator");
/// What a NetworkPolicy of a GeoCluster is labelled with, besides its
/// cluster and region: how the prune finds them.
pub const COMPONENT: &str = "network-policy";

/// Name of a region's NetworkPolicy for its etcd members.
pub fn etcd_policy_name(cluster: &str, region: &str) -> String {
    format!("{cluster}-etcd-{region}")
}

/// The NetworkPolicies of `region`, when the spec asks for them.
/// `operator_namespace` is where the operator's pods run (they dial the
/// members for membership changes, upgrades and migrations).
pub fn policies(gc: &GeoCluster, region: &str, operator_namespace: &str) -> Vec<NetworkPolicy> {
    let Some(spec) = &gc.spec.network_policy else {
        return Vec::new();
    };
    let cluster = gc.name_any();
    let ours = pods(BTreeMap::from([(names::LABEL_CLUSTER.to_string(), cluster.clone())]));
    let operator = NetworkPolicyPeer {
        namespace_selector: Some(labels_selector(BTreeMap::from([(
            "kubernetes.io/metadata.name".to_string(),
            operator_namespace.to_string(),
        )]))),
        pod_selector: Some(labels_selector(BTreeMap::from([(
            OPERATOR_POD_LABEL.0.to_string(),
            OPERATOR_POD_LABEL.1.to_string(),
        )]))),
        ..NetworkPolicyPeer::default()
    };
    let peers: Vec<NetworkPolicyPeer> = spec.peer_cidrs.iter().map(|c| cidr(c)).collect();

    let mut etcd_from = vec![ours.clone(), operator];
    etcd_from.extend(peers.iter().cloned());
    let etcd = policy(
        gc,
        etcd_policy_name(&cluster, region),
        region,
        BTreeMap::from([
            (names::LABEL_NAME.to_string(), "etcd".to_string()),
            (names::LABEL_CLUSTER.to_string(), cluster.clone()),
            (names::LABEL_REGION.to_string(), region.to_string()),
        ]),
        vec![
            rule(&[names::CLIENT_PORT, names::PEER_PORT], Some(etcd_from)),
            rule(&[names::METRICS_PORT], None),
        ],
    );

    // Empty `clients`: the API is open, like the ops port.
    let api_from = (!spec.clients.is_empty()).then(|| {
        let mut from: Vec<NetworkPolicyPeer> = spec.clients.iter().map(client).collect();
        from.push(ours);
        from.extend(peers);
        from
    });
    let router = policy(
        gc,
        components::router_name(&cluster, region),
        region,
        components::selector(gc, region, Component::Router),
        vec![rule(&[GRPC_PORT], api_from), rule(&[HTTP_PORT], None)],
    );
    let agent = policy(
        gc,
        Component::Agent.name(&cluster, region),
        region,
        components::selector(gc, region, Component::Agent),
        vec![rule(&[AGENT_HTTP_PORT], None)],
    );
    vec![etcd, router, agent]
}

fn policy(
    gc: &GeoCluster,
    name: String,
    region: &str,
    selected: BTreeMap<String, String>,
    ingress: Vec<NetworkPolicyIngressRule>,
) -> NetworkPolicy {
    let labels = BTreeMap::from([
        (names::LABEL_MANAGED_BY.to_string(), names::MANAGER.to_string()),
        (names::LABEL_PART_OF.to_string(), "tern".to_string()),
        (names::LABEL_COMPONENT.to_string(), COMPONENT.to_string()),
        (names::LABEL_CLUSTER.to_string(), gc.name_any()),
        (names::LABEL_REGION.to_string(), region.to_string()),
    ]);
    NetworkPolicy {
        metadata: components::meta(gc, name, labels),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(labels_selector(selected)),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// `ports` over TCP from `from` (`None`: from anywhere).
fn rule(ports: &[i32], from: Option<Vec<NetworkPolicyPeer>>) -> NetworkPolicyIngressRule {
    NetworkPolicyIngressRule {
        ports: Some(
            ports
                .iter()
                .map(|p| NetworkPolicyPort {
                    port: Some(IntOrString::Int(*p)),
                    protocol: Some("TCP".into()),
                    ..NetworkPolicyPort::default()
                })
                .collect(),
        ),
        from,
    }
}

fn labels_selector(labels: BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels),
        ..LabelSelector::default()
    }
}

fn pods(labels: BTreeMap<String, String>) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        pod_selector: Some(labels_selector(labels)),
        ..NetworkPolicyPeer::default()
    }
}

fn cidr(c: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        ip_block: Some(IPBlock {
            cidr: c.to_string(),
            except: None,
        }),
        ..NetworkPolicyPeer::default()
    }
}

fn client(c: &NetworkPeer) -> NetworkPolicyPeer {
    match &c.cidr {
        Some(range) => cidr(range),
        None => NetworkPolicyPeer {
            namespace_selector: c.namespace_selector.clone().map(labels_selector),
            pod_selector: c.pod_selector.clone().map(labels_selector),
            ..NetworkPolicyPeer::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::testing::example;

    fn ingress(p: &NetworkPolicy) -> Vec<NetworkPolicyIngressRule> {
        p.spec.clone().and_then(|s| s.ingress).unwrap_or_default()
    }

    fn ports(r: &NetworkPolicyIngressRule) -> Vec<i32> {
        r.ports
            .iter()
            .flatten()
            .filter_map(|p| match p.port {
                Some(IntOrString::Int(n)) => Some(n),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn none_without_the_spec() {
        assert!(policies(&example(), "eu-west", "tern-system").is_empty());
    }

    #[test]
    fn etcd_takes_clients_and_peers_from_tern_the_operator_and_the_peer_ranges() {
        let mut gc = example();
        gc.spec.network_policy = Some(tern_crds::NetworkPolicySpec {
            clients: Vec::new(),
            peer_cidrs: vec!["10.245.0.0/16".into(), "10.246.0.0/16".into()],
        });
        let ps = policies(&gc, "eu-west", "ops");
        let names: Vec<_> = ps.iter().map(|p| p.name_any()).collect();
        assert_eq!(
            names,
            [
                "payments-etcd-eu-west",
                "payments-router-eu-west",
                "payments-agent-eu-west"
            ]
        );
        let etcd = &ps[0];
        let selected = etcd
            .spec
            .as_ref()
            .and_then(|s| s.pod_selector.clone())
            .and_then(|s| s.match_labels)
            .expect("selector");
        // Both of the region's groups (data and directory), nothing else.
        assert_eq!(selected[names::LABEL_NAME], "etcd");
        assert_eq!(selected[names::LABEL_REGION], "eu-west");
        assert!(!selected.contains_key(names::LABEL_INSTANCE));
        let rules = ingress(etcd);
        assert_eq!(ports(&rules[0]), [names::CLIENT_PORT, names::PEER_PORT]);
        let from = rules[0].from.clone().expect("restricted");
        assert_eq!(
            from[0].pod_selector.clone().and_then(|s| s.match_labels),
            Some(BTreeMap::from([(
                names::LABEL_CLUSTER.to_string(),
                "payments".to_string()
            )]))
        );
        assert!(from[0].namespace_selector.is_none(), "the GeoCluster's namespace only");
        assert_eq!(
            from[1]
                .namespace_selector
                .clone()
                .and_then(|s| s.match_labels)
                .map(|l| l["kubernetes.io/metadata.name"].clone()),
            Some("ops".to_string())
        );
        let ranges: Vec<_> = from.iter().filter_map(|p| p.ip_block.clone()).map(|b| b.cidr).collect();
        assert_eq!(ranges, ["10.245.0.0/16", "10.246.0.0/16"]);
        // Metrics from anyone.
        assert_eq!(ports(&rules[1]), [names::METRICS_PORT]);
        assert!(rules[1].from.is_none());
        // Every policy restricts ingress only.
        for p in &ps {
            let types = p.spec.as_ref().and_then(|s| s.policy_types.clone());
            assert_eq!(types, Some(vec!["Ingress".to_string()]), "{}", p.name_any());
        }
    }

    #[test]
    fn the_router_api_is_open_without_clients_and_restricted_with_them() {
        let mut gc = example();
        gc.spec.network_policy = Some(tern_crds::NetworkPolicySpec::default());
        let router = &policies(&gc, "us-east", "tern-system")[1];
        let rules = ingress(router);
        assert_eq!(ports(&rules[0]), [GRPC_PORT]);
        assert!(rules[0].from.is_none(), "no clients named: open");
        assert_eq!(ports(&rules[1]), [HTTP_PORT]);

        gc.spec.network_policy = Some(tern_crds::NetworkPolicySpec {
            clients: vec![
                tern_crds::NetworkPeer {
                    namespace_selector: Some(BTreeMap::from([("team".into(), "payments".into())])),
                    pod_selector: Some(BTreeMap::new()),
                    cidr: None,
                },
                tern_crds::NetworkPeer {
                    cidr: Some("192.0.2.0/24".into()),
                    ..Default::default()
                },
            ],
            peer_cidrs: vec!["10.245.0.0/16".into()],
        });
        let ps = policies(&gc, "us-east", "tern-system");
        let from = ingress(&ps[1])[0].from.clone().expect("restricted");
        assert_eq!(from.len(), 4, "two clients, tern's pods, one peer range: {from:?}");
        assert!(from[0].namespace_selector.is_some() && from[0].pod_selector.is_some());
        assert_eq!(from[1].ip_block.as_ref().map(|b| b.cidr.as_str()), Some("192.0.2.0/24"));
        assert_eq!(
            from[3].ip_block.as_ref().map(|b| b.cidr.as_str()),
            Some("10.245.0.0/16")
        );
        // The agent: its ops port only.
        let agent = ingress(&ps[2]);
        assert_eq!(agent.len(), 1);
        assert_eq!(ports(&agent[0]), [AGENT_HTTP_PORT]);
        assert!(agent[0].from.is_none());
    }
}
