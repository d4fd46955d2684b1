//! GeoCluster → the per-region tern components: one router Deployment and
//! Service, and one agent Deployment (with its ServiceAccount and the Role to
//! write GeoCluster status), per managed region, wired to the region's group
//! (its client Service), to every directory member, and for the agent to
//! every other region's group.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, PersistentVolumeClaimVolumeSource, PodSpec,
    PodTemplateSpec, Probe, Secret, SecretKeySelector, SecurityContext, Service, ServiceAccount, ServicePort,
    ServiceSpec, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
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

/// Default router image when neither the spec nor `--router-image` names one:
/// the release's own (the tag is the workspace version, as in
/// operator/deploy/images/build.sh and the install bundle; operator/tests/
/// images.rs checks that they agree).
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/tern-dev/tern-router:", env!("CARGO_PKG_VERSION"));

/// Name of a region's router Deployment and Service.
pub fn router_name(cluster: &str, region: &str) -> String {
    format!("{cluster}-router-{region}")
}

/// A tern component that runs per region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Router,
    Agent,
}

impl Component {
    fn as_str(self) -> &'static str {
        match self {
            Self::Router => "router",
            Self::Agent => "agent",
        }
    }

    /// Name of a region's Deployment of this component.
    pub fn name(self, cluster: &str, region: &str) -> String {
        format!("{cluster}-{}-{region}", self.as_str())
    }
}

/// Default agent image when neither the spec nor `--agent-image` names one.
pub const DEFAULT_AGENT_IMAGE: &str = concat!("ghcr.io/tern-dev/tern-agent:", env!("CARGO_PKG_VERSION"));
/// The agent's ops port.
pub const AGENT_HTTP_PORT: i32 = 7402;

fn labels(gc: &GeoCluster, region: &str, component: Component) -> BTreeMap<String, String> {
    let cluster = gc.name_any();
    BTreeMap::from([
        (names::LABEL_NAME.to_string(), format!("tern-{}", component.as_str())),
        (names::LABEL_INSTANCE.to_string(), component.name(&cluster, region)),
        (names::LABEL_COMPONENT.to_string(), component.as_str().to_string()),
        (names::LABEL_PART_OF.to_string(), "tern".to_string()),
        (names::LABEL_MANAGED_BY.to_string(), names::MANAGER.to_string()),
        (names::LABEL_CLUSTER.to_string(), cluster),
        (names::LABEL_REGION.to_string(), region.to_string()),
    ])
}

/// The Secret with the routers' peer token, owned by the GeoCluster. Only
/// created, never applied over: a token set by hand (or the same token
/// copied to every cluster of a multi-cluster deployment) stays.
pub fn peer_token_secret(gc: &GeoCluster, token: String) -> Secret {
    let cluster = gc.name_any();
    Secret {
        metadata: ObjectMeta {
            name: Some(gc.peer_token_secret()),
            namespace: gc.namespace(),
            labels: Some(BTreeMap::from([
                (names::LABEL_PART_OF.to_string(), "tern".to_string()),
                (names::LABEL_MANAGED_BY.to_string(), names::MANAGER.to_string()),
                (names::LABEL_CLUSTER.to_string(), cluster),
            ])),
            owner_references: gc.controller_owner_ref(&()).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        string_data: Some(BTreeMap::from([(tern_crds::PEER_TOKEN_KEY.to_string(), token)])),
        ..Secret::default()
    }
}

/// A new random peer token: 32 random bytes in hex.
pub fn new_peer_token() -> String {
    rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn selector(gc: &GeoCluster, region: &str, component: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        (names::LABEL_NAME.to_string(), format!("tern-{}", component.as_str())),
        (
            names::LABEL_INSTANCE.to_string(),
            component.name(&gc.name_any(), region),
        ),
    ])
}

/// Client URL of a region's data group (its client Service).
fn group_url(gc: &GeoCluster, region: &RegionSpec) -> String {
    let namespace = gc.namespace().unwrap_or_default();
    let domain = region
        .cluster_domain
        .as_deref()
        .unwrap_or(names::DEFAULT_CLUSTER_DOMAIN);
    let group = names::group_name(&gc.name_any(), &region.name, GroupRole::Data);
    format!(
        "{}://{}.{namespace}.svc.{domain}:{}",
        names::scheme(gc.spec.tls.is_some()),
        names::client_service(&group),
        names::CLIENT_PORT
    )
}

/// The agent flags for `region`: its group, the directory, and every other
/// region's group as a mirror source.
pub fn agent_args(gc: &GeoCluster, region: &RegionSpec) -> Vec<String> {
    let mut args = vec![
        format!("--region={}", region.name),
        format!("--group-endpoints={}", group_url(gc, region)),
        format!("--directory-endpoints={}", directory_client_urls(gc).join(",")),
        format!("--http-addr=0.0.0.0:{AGENT_HTTP_PORT}"),
        // The agent writes its region's lag into this GeoCluster's status.
        format!("--geocluster={}", gc.name_any()),
        format!("--namespace={}", gc.namespace().unwrap_or_default()),
        "--log-format=json".to_string(),
    ];
    for other in gc.spec.regions.iter().filter(|r| r.name != region.name) {
        args.push(format!("--source={}={}", other.name, group_url(gc, other)));
    }
    // spec.followTheSun, as the agent's policy flags (region-agent/src/sun.rs).
    let sun = &gc.spec.follow_the_sun;
    if sun.enabled {
        args.push("--follow-the-sun".into());
    }
    if sun.dry_run {
        args.push("--follow-the-sun-dry-run".into());
    }
    args.extend([
        format!("--follow-the-sun-threshold={}", sun.threshold),
        format!("--follow-the-sun-window={}", sun.window),
        format!("--follow-the-sun-cooldown={}", sun.cooldown),
        format!("--follow-the-sun-max-per-minute={}", sun.max_migrations_per_minute),
    ]);
    // spec.failover, as the agent's failover flags (region-agent/src/failover.rs).
    let failover = &gc.spec.failover;
    args.push(format!(
        "--failover-mode={}",
        match failover.mode {
            tern_crds::FailoverMode::Automatic => "automatic",
            tern_crds::FailoverMode::Manual => "manual",
        }
    ));
    for s in &failover.successors {
        args.push(format!("--failover-order={}={}", s.region, s.order.join("|")));
    }
    args.push(format!("--max-data-loss-lag={}", failover.max_data_loss_lag));
    if gc.spec.tls.is_some() {
        args.push(format!("--tls-dir={}", names::TLS_MOUNT));
    }
    // spec.backup, as the agent's schedule (region-agent/src/backup.rs),
    // into the claim mounted at BACKUP_MOUNT.
    if let Some(b) = &gc.spec.backup {
        args.extend([
            format!("--backup-dir={BACKUP_MOUNT}"),
            format!("--backup-every={}", b.every),
            format!("--backup-keep={}", b.keep),
        ]);
        // One agent backs the directory up: the first region's.
        if gc.spec.regions.first().is_some_and(|r| r.name == region.name) {
            args.push("--backup-directory-group".into());
        }
    }
    args
}

/// Where an agent's pod mounts `spec.backup.claimName`.
pub const BACKUP_MOUNT: &str = "/var/lib/tern/backups";

/// The non-root user of tern's images (operator/deploy/images), and the
/// group that owns a mounted backup volume so that it may write there.
const TERN_UID: i64 = 65532;

/// The router flags for `region`.
pub fn router_args(gc: &GeoCluster, region: &RegionSpec) -> Vec<String> {
    let cluster = gc.name_any();
    let namespace = gc.namespace().unwrap_or_default();
    let domain = region
        .cluster_domain
        .as_deref()
        .unwrap_or(names::DEFAULT_CLUSTER_DOMAIN);
    let group_endpoint = group_url(gc, region);
    // Every directory member by its stable name: the directory is global, and
    // any member can serve (etcd forwards to the leader).
    let directory = directory_client_urls(gc).join(",");
    let router = &gc.spec.router;
    let mut args = vec![
        format!("--region={}", region.name),
        format!("--listen=0.0.0.0:{GRPC_PORT}"),
        format!("--http-addr=0.0.0.0:{HTTP_PORT}"),
        format!("--group-endpoints={group_endpoint}"),
        format!("--directory-endpoints={directory}"),
        format!(
            "--advertise={}.{namespace}.svc.{domain}:{GRPC_PORT}",
            router_name(&cluster, &region.name)
        ),
        format!("--idempotency-retention={}", router.idempotency_retention),
        format!("--write-batch-max={}", router.write_batch_max),
        format!("--write-batches-in-flight={}", router.write_batches_in_flight),
        format!("--group-leader-direct={}", router.group_leader_direct),
        // Counted over the window the agents' follow-the-sun policy judges.
        format!("--write-count-window={}", gc.spec.follow_the_sun.window),
        "--log-format=json".to_string(),
    ];
    if gc.spec.tls.is_some() {
        args.push(format!("--tls-dir={}", names::TLS_MOUNT));
    }
    args
}

/// What differs between the components' Deployments.
struct Workload<'a> {
    component: Component,
    image: String,
    args: Vec<String>,
    ports: Vec<(&'a str, i32)>,
    spec: &'a tern_crds::ComponentSpec,
    service_account: Option<String>,
}

/// A region's Deployment of a component.
fn deployment(gc: &GeoCluster, region: &RegionSpec, w: Workload<'_>) -> Deployment {
    let Workload {
        component,
        image,
        args,
        ports,
        spec,
        service_account,
    } = w;
    let name = component.name(&gc.name_any(), &region.name);
    let http_port = match component {
        Component::Router => HTTP_PORT,
        Component::Agent => AGENT_HTTP_PORT,
    };
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(http_port),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    };
    let mut env = vec![super::pod_name_env()];
    if component == Component::Agent {
        env.push(super::pod_ip_env());
    }
    if component == Component::Router {
        // The shared secret that makes forwarded calls trusted; from the
        // Secret, never in the Deployment itself.
        env.push(EnvVar {
            name: "TERN_PEER_TOKEN".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: gc.peer_token_secret(),
                    key: tern_crds::PEER_TOKEN_KEY.into(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        });
    }
    if let Some(t) = &gc.spec.telemetry {
        env.push(EnvVar {
            name: "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            value: Some(t.otlp_endpoint.clone()),
            ..EnvVar::default()
        });
        if let Some(ratio) = t.sampling_ratio {
            env.push(EnvVar {
                name: "TERN_TRACE_SAMPLING_RATIO".into(),
                value: Some(ratio.to_string()),
                ..EnvVar::default()
            });
        }
    }
    let container = Container {
        name: component.as_str().into(),
        image: Some(image),
        args: Some(args),
        env: Some(env),
        ports: Some(
            ports
                .into_iter()
                .map(|(name, port)| ContainerPort {
                    name: Some(name.into()),
                    container_port: port,
                    ..ContainerPort::default()
                })
                .collect(),
        ),
        liveness_probe: Some(probe("/healthz", 5)),
        // Every 2 s: a router that cannot serve leaves its Service within
        // 6 s, and a new one (a rollout) joins it within 2 s of being able
        // to serve; the probe is a local HTTP call.
        readiness_probe: Some(probe("/readyz", 2)),
        resources: spec.resources.clone(),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            ..super::locked_down()
        }),
        ..Container::default()
    };
    let mut pod = PodSpec {
        containers: vec![container],
        service_account_name: service_account,
        node_selector: Some(node_selector(region)),
        topology_spread_constraints: Some(vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "topology.kubernetes.io/zone".into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(LabelSelector {
                match_labels: Some(selector(gc, &region.name, component)),
                ..LabelSelector::default()
            }),
            ..TopologySpreadConstraint::default()
        }]),
        // In-flight work drains within the component's own timeout.
        termination_grace_period_seconds: Some(15),
        ..PodSpec::default()
    };
    if let Some(tls) = &gc.spec.tls {
        let secret = match component {
            Component::Router => tls.router_secret(&region.name),
            Component::Agent => tls.agent_secret(&region.name),
        };
        super::mount_tls(&mut pod, &secret);
    }
    Deployment {
        metadata: meta(gc, name, labels(gc, &region.name, component)),
        spec: DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector(gc, &region.name, component)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(gc, &region.name, component)),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    }
}

pub(crate) fn meta(gc: &GeoCluster, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: gc.namespace(),
        labels: Some(labels),
        owner_references: gc.controller_owner_ref(&()).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}

/// The Deployment and Service of `region`'s routers.
pub fn router_objects(gc: &GeoCluster, region: &RegionSpec, default_image: &str) -> (Deployment, Service) {
    let image = gc
        .spec
        .router
        .component
        .image
        .clone()
        .unwrap_or_else(|| default_image.to_string());
    let ports = vec![("grpc", GRPC_PORT), ("http", HTTP_PORT)];
    let deployment = deployment(
        gc,
        region,
        Workload {
            component: Component::Router,
            image,
            args: router_args(gc, region),
            ports,
            spec: &gc.spec.router.component,
            service_account: None,
        },
    );
    let name = router_name(&gc.name_any(), &region.name);
    let service = Service {
        metadata: meta(gc, name, labels(gc, &region.name, Component::Router)),
        spec: Some(ServiceSpec {
            selector: Some(selector(gc, &region.name, Component::Router)),
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

/// Name of the agents' ServiceAccount, Role and RoleBinding of a GeoCluster.
pub fn agent_account_name(cluster: &str) -> String {
    format!("{cluster}-agent")
}

/// What a GeoCluster's agents run as: a ServiceAccount bound to a Role that
/// lets them read their GeoCluster and write its status.
pub fn agent_identity(gc: &GeoCluster) -> (ServiceAccount, Role, RoleBinding) {
    let cluster = gc.name_any();
    let name = agent_account_name(&cluster);
    let mut common = BTreeMap::from([
        (names::LABEL_MANAGED_BY.to_string(), names::MANAGER.to_string()),
        (names::LABEL_PART_OF.to_string(), "tern".to_string()),
        (names::LABEL_COMPONENT.to_string(), "agent".to_string()),
        (names::LABEL_CLUSTER.to_string(), cluster.clone()),
    ]);
    common.insert(names::LABEL_NAME.to_string(), "tern-agent".to_string());
    let account = ServiceAccount {
        metadata: meta(gc, name.clone(), common.clone()),
        ..ServiceAccount::default()
    };
    let role = Role {
        metadata: meta(gc, name.clone(), common.clone()),
        rules: Some(vec![
            PolicyRule {
                api_groups: Some(vec![tern_crds::GROUP.into()]),
                resources: Some(vec!["geoclusters".into()]),
                resource_names: Some(vec![cluster.clone()]),
                verbs: vec!["get".into()],
                ..PolicyRule::default()
            },
            PolicyRule {
                api_groups: Some(vec![tern_crds::GROUP.into()]),
                resources: Some(vec!["geoclusters/status".into()]),
                resource_names: Some(vec![cluster]),
                verbs: vec!["patch".into()],
                ..PolicyRule::default()
            },
            // Events about the GeoCluster (a mirror resynchronising).
            PolicyRule {
                api_groups: Some(vec!["events.k8s.io".into()]),
                resources: Some(vec!["events".into()]),
                verbs: vec!["create".into(), "patch".into()],
                ..PolicyRule::default()
            },
        ]),
    };
    let binding = RoleBinding {
        metadata: meta(gc, name.clone(), common),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name,
            namespace: gc.namespace(),
            ..Subject::default()
        }]),
    };
    (account, role, binding)
}

/// The Deployment of `region`'s agents (one active, the others on standby).
pub fn agent_deployment(gc: &GeoCluster, region: &RegionSpec, default_image: &str) -> Deployment {
    let image = gc.spec.agent.image.clone().unwrap_or_else(|| default_image.to_string());
    let mut d = deployment(
        gc,
        region,
        Workload {
            component: Component::Agent,
            image,
            args: agent_args(gc, region),
            ports: vec![("http", AGENT_HTTP_PORT)],
            spec: &gc.spec.agent,
            service_account: Some(agent_account_name(&gc.name_any())),
        },
    );
    if let Some(b) = &gc.spec.backup
        && let Some(pod) = d.spec.template.spec.as_mut()
    {
        pod.volumes.get_or_insert_default().push(Volume {
            name: "backups".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: b.claim_name.clone(),
                read_only: Some(false),
            }),
            ..Volume::default()
        });
        let security = pod.security_context.get_or_insert_default();
        security.fs_group = Some(TERN_UID);
        // Ownership is fixed once, not walked on every pod start.
        security.fs_group_change_policy = Some("OnRootMismatch".into());
        for c in &mut pod.containers {
            c.volume_mounts.get_or_insert_default().push(VolumeMount {
                name: "backups".into(),
                mount_path: BACKUP_MOUNT.into(),
                ..VolumeMount::default()
            });
        }
    }
    d
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
        // The write-path defaults are spelled out in the pod spec.
        for flag in [
            "--idempotency-retention=24h",
            "--write-batch-max=32",
            "--write-batches-in-flight=1",
            "--group-leader-direct=true",
        ] {
            assert!(args.contains(flag), "{flag} in {args}");
        }
    }

    #[test]
    fn router_write_settings_reach_the_pod() {
        let mut gc = example();
        gc.spec.router.idempotency_retention = "72h".into();
        gc.spec.router.write_batch_max = 8;
        gc.spec.router.write_batches_in_flight = 2;
        gc.spec.router.group_leader_direct = false;
        let args = router_args(&gc, &gc.spec.regions[0]).join(" ");
        for flag in [
            "--idempotency-retention=72h",
            "--write-batch-max=8",
            "--write-batches-in-flight=2",
            "--group-leader-direct=false",
        ] {
            assert!(args.contains(flag), "{flag} in {args}");
        }
    }
}

#[cfg(test)]
mod agent_tests {
    use super::*;
    use crate::build::testing::example;

    #[test]
    fn the_failover_policy_reaches_the_agents() {
        let mut gc = example();
        gc.spec.failover.mode = tern_crds::FailoverMode::Automatic;
        gc.spec.failover.successors = vec![tern_crds::SuccessorOrder {
            region: "us-east".into(),
            order: vec!["eu-west".into(), "ap-south".into()],
        }];
        gc.spec.failover.max_data_loss_lag = "2s".into();
        let args = agent_args(&gc, &gc.spec.regions[0]);
        for flag in [
            "--failover-mode=automatic",
            "--failover-order=us-east=eu-west|ap-south",
            "--max-data-loss-lag=2s",
        ] {
            assert!(args.iter().any(|a| a == flag), "{flag} in {args:?}");
        }
        gc.spec.failover = Default::default();
        let args = agent_args(&gc, &gc.spec.regions[0]);
        assert!(args.iter().any(|a| a == "--failover-mode=manual"), "{args:?}");
    }

    #[test]
    fn follow_the_sun_settings_reach_agents_and_routers() {
        let mut gc = example();
        gc.spec.follow_the_sun.enabled = false;
        let args = agent_args(&gc, &gc.spec.regions[0]);
        assert!(!args.iter().any(|a| a == "--follow-the-sun"), "off: {args:?}");
        gc.spec.follow_the_sun.enabled = true;
        gc.spec.follow_the_sun.dry_run = true;
        gc.spec.follow_the_sun.threshold = 5;
        gc.spec.follow_the_sun.window = "12h".into();
        gc.spec.follow_the_sun.cooldown = "30m".into();
        gc.spec.follow_the_sun.max_migrations_per_minute = 2;
        let args = agent_args(&gc, &gc.spec.regions[0]);
        for flag in [
            "--follow-the-sun",
            "--follow-the-sun-dry-run",
            "--follow-the-sun-threshold=5",
            "--follow-the-sun-window=12h",
            "--follow-the-sun-cooldown=30m",
            "--follow-the-sun-max-per-minute=2",
        ] {
            assert!(args.iter().any(|a| a == flag), "{flag} in {args:?}");
        }
        let router = router_args(&gc, &gc.spec.regions[0]);
        assert!(router.iter().any(|a| a == "--write-count-window=12h"), "{router:?}");
    }

    #[test]
    fn agent_mirrors_every_other_region() {
        let gc = example();
        let d = agent_deployment(&gc, &gc.spec.regions[0], DEFAULT_AGENT_IMAGE);
        assert_eq!(d.metadata.name.as_deref(), Some("payments-agent-us-east"));
        let pod = d.spec.template.spec.expect("pod");
        assert_eq!(pod.service_account_name.as_deref(), Some("payments-agent"));
        let args = pod.containers[0].args.clone().expect("args").join(" ");
        assert!(
            args.contains("--source=eu-west=http://payments-eu-west-client.default.svc.cluster.local:2379"),
            "{args}"
        );
        assert!(args.contains("--source=ap-south="), "{args}");
        assert!(!args.contains("--source=us-east"), "{args}");
        let (_, role, binding) = agent_identity(&gc);
        assert_eq!(
            role.rules.expect("rules")[1].resources.clone().expect("resources"),
            ["geoclusters/status"]
        );
        assert_eq!(binding.subjects.expect("subjects")[0].name, "payments-agent");
    }

    #[test]
    fn backup_settings_reach_the_agents_and_the_first_region_backs_up_the_directory() {
        let mut gc = example();
        gc.spec.backup = Some(tern_crds::BackupSpec {
            claim_name: "tern-backups".into(),
            every: "30m".into(),
            keep: 48,
        });
        for (i, region) in gc.spec.regions.iter().enumerate() {
            let pod = agent_deployment(&gc, region, DEFAULT_AGENT_IMAGE)
                .spec
                .template
                .spec
                .expect("pod");
            let args = pod.containers[0].args.clone().expect("args");
            for want in [
                format!("--backup-dir={BACKUP_MOUNT}"),
                "--backup-every=30m".into(),
                "--backup-keep=48".into(),
            ] {
                assert!(args.contains(&want), "{want} in {args:?}");
            }
            assert_eq!(
                args.contains(&"--backup-directory-group".to_string()),
                i == 0,
                "{args:?}"
            );
            let volumes = pod.volumes.expect("volumes");
            assert_eq!(
                volumes[0]
                    .persistent_volume_claim
                    .as_ref()
                    .map(|c| c.claim_name.as_str()),
                Some("tern-backups")
            );
            let mounts = pod.containers[0].volume_mounts.clone().expect("mounts");
            assert_eq!(mounts[0].mount_path, BACKUP_MOUNT);
            // The non-root agent may write to the volume.
            assert_eq!(pod.security_context.and_then(|s| s.fs_group), Some(TERN_UID));
        }
        // Without spec.backup: no flags, no volume.
        gc.spec.backup = None;
        let pod = agent_deployment(&gc, &gc.spec.regions[0], DEFAULT_AGENT_IMAGE)
            .spec
            .template
            .spec
            .expect("pod");
        assert!(pod.volumes.is_none());
        assert!(
            !pod.containers[0]
                .args
                .clone()
                .expect("args")
                .iter()
                .any(|a| a.starts_with("--backup"))
        );
    }

    #[test]
    fn tls_mounts_each_components_secret_and_dials_etcd_over_https() {
        let mut gc = example();
        gc.spec.tls = Some(tern_crds::TlsSpec {
            secret_prefix: "payments-tls".into(),
        });
        let region = &gc.spec.regions[0];
        let (router, _) = router_objects(&gc, region, DEFAULT_IMAGE);
        let agent = agent_deployment(&gc, region, DEFAULT_AGENT_IMAGE);
        for (d, secret) in [
            (router, format!("payments-tls-router-{}", region.name)),
            (agent, format!("payments-tls-agent-{}", region.name)),
        ] {
            let pod = d.spec.template.spec.expect("pod");
            let volume = &pod.volumes.as_ref().expect("volumes")[0];
            assert_eq!(
                volume.secret.as_ref().and_then(|s| s.secret_name.as_deref()),
                Some(secret.as_str())
            );
            let c = &pod.containers[0];
            let mount = &c.volume_mounts.as_ref().expect("mounts")[0];
            assert_eq!(
                (mount.mount_path.as_str(), mount.read_only),
                (names::TLS_MOUNT, Some(true))
            );
            let args = c.args.clone().expect("args");
            assert!(args.contains(&format!("--tls-dir={}", names::TLS_MOUNT)), "{args:?}");
            let endpoints: Vec<&String> = args
                .iter()
                .filter(|a| a.starts_with("--group-endpoints=") || a.starts_with("--directory-endpoints="))
                .collect();
            assert_eq!(endpoints.len(), 2, "{args:?}");
            assert!(endpoints.iter().all(|a| a.contains("=https://")), "{endpoints:?}");
        }
    }

    #[test]
    fn telemetry_settings_reach_routers_and_agents() {
        let mut gc = example();
        gc.spec.telemetry = Some(tern_crds::TelemetrySpec {
            otlp_endpoint: "http://collector:4317".into(),
            sampling_ratio: Some(0.25),
        });
        let agent = agent_deployment(&gc, &gc.spec.regions[0], DEFAULT_AGENT_IMAGE);
        let (router, _) = router_objects(&gc, &gc.spec.regions[0], DEFAULT_IMAGE);
        for d in [agent, router] {
            let env = d.spec.template.spec.expect("pod").containers[0]
                .env
                .clone()
                .expect("env");
            let value = |name: &str| env.iter().find(|e| e.name == name).and_then(|e| e.value.clone());
            assert_eq!(
                value("OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
                Some("http://collector:4317")
            );
            assert_eq!(value("TERN_TRACE_SAMPLING_RATIO").as_deref(), Some("0.25"));
        }
    }
}
