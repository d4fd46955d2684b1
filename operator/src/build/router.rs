//! GeoCluster → one router Deployment and Service per managed region, wired
//! to the region's group (its client Service) and to every directory member.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSpec, PodTemplateSpec,
    Probe, SecurityContext, Service, ServicePort, ServiceSpec, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use tern_crds::{GeoCluster, GroupRole, RegionSpec};

use crate::build::geocluster::{directory_client_urls, node_selector};
use crate::names;

/// gRPC and ops ports of a router.
pub const GRPC_PORT: i32 = 7400;
pub const HTTP_PORT: i32 = 7401;

/// Default router image when neither the spec nor `--router-image` names one.
pub const DEFAULT_IMAGE: &str = "ghcr.io/tern-dev/tern-router:0.1.0";

/// Name of a region's router Deployment and Service.
pub fn router_name(cluster: &str, region: &str) -> String {
    format!("{cluster}-router-{region}")
}

fn labels(gc: &GeoCluster, region: &str) -> BTreeMap<String, String> {
    let cluster = gc.name_any();
    BTreeMap::from([
        (names::LABEL_NAME.to_string(), "tern-router".to_string()),
        (names::LABEL_INSTANCE.to_string(), router_name(&cluster, region)),
        (names::LABEL_COMPONENT.to_string(), "router".to_string()),
        (names::LABEL_PART_OF.to_string(), "tern".to_string()),
        (names::LABEL_MANAGED_BY.to_string(), names::MANAGER.to_string()),
        (names::LABEL_CLUSTER.to_string(), cluster),
        (names::LABEL_REGION.to_string(), region.to_string()),
    ])
}

fn selector(gc: &GeoCluster, region: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (names::LABEL_NAME.to_string(), "tern-router".to_string()),
        (names::LABEL_INSTANCE.to_string(), router_name(&gc.name_any(), region)),
    ])
}

/// The router flags for `region`.
pub fn router_args(gc: &GeoCluster, region: &RegionSpec) -> Vec<String> {
    let cluster = gc.name_any();
    let namespace = gc.namespace().unwrap_or_default();
    let domain = region
        .cluster_domain
        .as_deref()
        .unwrap_or(names::DEFAULT_CLUSTER_DOMAIN);
    let group = names::group_name(&cluster, &region.name, GroupRole::Data);
    let group_endpoint = format!(
        "http://{}.{namespace}.svc.{domain}:{}",
        names::client_service(&group),
        names::CLIENT_PORT
    );
    // Every directory member by its stable name: the directory is global, and
    // any member can serve (etcd forwards to the leader).
    let directory = directory_client_urls(gc).join(",");
    vec![
        format!("--region={}", region.name),
        format!("--listen=0.0.0.0:{GRPC_PORT}"),
        format!("--http-addr=0.0.0.0:{HTTP_PORT}"),
        format!("--group-endpoints={group_endpoint}"),
        format!("--directory-endpoints={directory}"),
        format!(
            "--advertise={}.{namespace}.svc.{domain}:{GRPC_PORT}",
            router_name(&cluster, &region.name)
        ),
        "--log-format=json".to_string(),
    ]
}

/// The Deployment and Service of `region`'s routers.
pub fn router_objects(gc: &GeoCluster, region: &RegionSpec, default_image: &str) -> (Deployment, Service) {
    let cluster = gc.name_any();
    let name = router_name(&cluster, &region.name);
    let meta = ObjectMeta {
        name: Some(name.clone()),
        namespace: gc.namespace(),
        labels: Some(labels(gc, &region.name)),
        owner_references: gc.controller_owner_ref(&()).map(|r| vec![r]),
        ..ObjectMeta::default()
    };
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(5),
        ..Probe::default()
    };
    let mut env = vec![EnvVar {
        name: "POD_NAME".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }];
    if let Some(t) = &gc.spec.telemetry {
        env.push(EnvVar {
            name: "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            value: Some(t.otlp_endpoint.clone()),
            ..EnvVar::default()
        });
    }
    let container = Container {
        name: "router".into(),
        image: Some(
            gc.spec
                .router
                .image
                .clone()
                .unwrap_or_else(|| default_image.to_string()),
        ),
        args: Some(router_args(gc, region)),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some("grpc".into()),
                container_port: GRPC_PORT,
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("http".into()),
                container_port: HTTP_PORT,
                ..ContainerPort::default()
            },
        ]),
        liveness_probe: Some(probe("/healthz")),
        readiness_probe: Some(probe("/readyz")),
        resources: gc.spec.router.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let deployment = Deployment {
        metadata: meta.clone(),
        spec: DeploymentSpec {
            replicas: Some(gc.spec.router.replicas),
            selector: LabelSelector {
                match_labels: Some(selector(gc, &region.name)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(gc, &region.name)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    node_selector: Some(node_selector(region)),
                    topology_spread_constraints: Some(vec![TopologySpreadConstraint {
                        max_skew: 1,
                        topology_key: "topology.kubernetes.io/zone".into(),
                        when_unsatisfiable: "ScheduleAnyway".into(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(selector(gc, &region.name)),
                            ..LabelSelector::default()
                        }),
                        ..TopologySpreadConstraint::default()
                    }]),
                    // In-flight calls drain within the router's --drain-timeout.
                    termination_grace_period_seconds: Some(15),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    };
    let service = Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            selector: Some(selector(gc, &region.name)),
            ports: Some(vec![ServicePort {
                name: Some("grpc".into()),
                port: GRPC_PORT,
                target_port: Some(IntOrString::String("grpc".into())),
                app_protocol: Some("kubernetes.io/h2c".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    (deployment, service)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::testing::example;

    #[test]
    fn router_is_wired_to_its_group_and_the_directory() {
        let gc = example();
        let (deployment, service) = router_objects(&gc, &gc.spec.regions[1], DEFAULT_IMAGE);
        assert_eq!(deployment.metadata.name.as_deref(), Some("payments-router-eu-west"));
        let spec = deployment.spec;
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.expect("pod");
        let args = pod.containers[0].args.clone().expect("args").join(" ");
        assert!(args.contains("--region=eu-west"), "{args}");
        assert!(
            args.contains("--group-endpoints=http://payments-eu-west-client.default.svc.cluster.local:2379"),
            "{args}"
        );
        assert!(
            args.contains("http://payments-dir-ap-south-0.payments-dir-ap-south-peer.default.svc.cluster.local:2379"),
            "{args}"
        );
        assert!(
            args.contains("--advertise=payments-router-eu-west.default.svc.cluster.local:7400"),
            "{args}"
        );
        assert_eq!(
            pod.node_selector.expect("selector")["topology.kubernetes.io/region"],
            "eu-west"
        );
        assert_eq!(service.spec.expect("spec").ports.expect("ports")[0].port, 7400);
    }
}
