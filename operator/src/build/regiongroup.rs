//! RegionGroup → StatefulSet (the etcd members), a headless peer Service, a
//! client Service, a PodDisruptionBudget that keeps quorum, and a ConfigMap
//! with the member configuration.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, ConfigMap, ConfigMapKeySelector, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSpec, PodTemplateSpec, Probe, Service, ServicePort, ServiceSpec,
    TopologySpreadConstraint, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use tern_crds::{ClusterMember, DeletionPolicy, RegionGroup};

use crate::etcd_flags::{ClusterState, MemberConfig, member_args};
use crate::names;

/// Everything a RegionGroup is made of.
#[derive(Clone, Debug)]
pub struct GroupObjects {
    pub stateful_set: StatefulSet,
    pub peer_service: Service,
    pub client_service: Service,
    pub pdb: PodDisruptionBudget,
    pub config_map: ConfigMap,
}

/// Members that must stay up for the group to commit: a majority.
pub fn quorum(replicas: i32) -> i32 {
    replicas / 2 + 1
}

/// Where a member's volume is mounted; etcd's data directory is
/// [`member_data_dir`] inside it.
pub(crate) const DATA_DIR: &str = "/var/lib/etcd";

/// A member's etcd data directory: a directory in the volume, not its
/// root, which may hold a filesystem's own entries (`lost+found`).
pub(crate) fn member_data_dir() -> String {
    format!("{DATA_DIR}/data")
}

/// The name of the volume claim template, and so the first part of every
/// member's claim (`data-<member>`).
const CLAIM_TEMPLATE: &str = "data";

/// The claim of member `member` (its pod name), as the StatefulSet names it.
pub(crate) fn member_claim_name(member: &str) -> String {
    format!("{CLAIM_TEMPLATE}-{member}")
}

/// What every member's volume claim asks for.
pub(crate) fn data_claim_spec(rg: &RegionGroup) -> PersistentVolumeClaimSpec {
    PersistentVolumeClaimSpec {
        access_modes: Some(vec!["ReadWriteOnce".into()]),
        storage_class_name: rg.spec.etcd.storage.storage_class_name.clone(),
        resources: Some(VolumeResourceRequirements {
            requests: Some(BTreeMap::from([(
                "storage".to_string(),
                rg.spec.etcd.storage.size.clone(),
            )])),
            ..VolumeResourceRequirements::default()
        }),
        ..PersistentVolumeClaimSpec::default()
    }
}

/// Who the group's members are now, for the objects that depend on it
/// (see `crate::membership`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Members {
    /// Pods the StatefulSet runs.
    pub pods: i32,
    /// What a member that starts without data is told: the Raft membership
    /// it joins (`Existing`), or, until the group's membership has changed,
    /// the bootstrap list (`New`). Members with data ignore both.
    pub initial_cluster: Vec<ClusterMember>,
    pub state: ClusterState,
}

impl Members {
    /// A group as the GeoCluster created it: `spec.replicas` members that
    /// bootstrap together.
    pub fn bootstrap(rg: &RegionGroup) -> Self {
        Self {
            pods: rg.spec.replicas,
            initial_cluster: rg.spec.initial_cluster.clone(),
            state: ClusterState::New,
        }
    }
}

/// The objects of a group that has never changed its membership.
pub fn group_objects(rg: &RegionGroup) -> GroupObjects {
    group_objects_with(rg, &Members::bootstrap(rg))
}

/// The objects of one group with `members`.
pub fn group_objects_with(rg: &RegionGroup, members: &Members) -> GroupObjects {
    let config_map = config_map(rg, members);
    GroupObjects {
        stateful_set: stateful_set(rg, members.pods, &config_hash(&config_map)),
        peer_service: peer_service(rg),
        client_service: client_service(rg),
        pdb: pdb(rg, members.pods),
        config_map,
    }
}

/// The ConfigMap keys a member reads when its container starts (through
/// `ENV_INITIAL_CLUSTER*`), and only then: a membership change rewrites
/// them without rolling the members that already run.
const KEY_INITIAL_CLUSTER: &str = "initial-cluster";
const KEY_INITIAL_CLUSTER_STATE: &str = "initial-cluster-state";
/// The members' client URLs, for people and tools (nothing in a member
/// reads it).
const KEY_CLIENT_ENDPOINTS: &str = "client-endpoints";
const ENV_INITIAL_CLUSTER: &str = "TERN_INITIAL_CLUSTER";
const ENV_INITIAL_CLUSTER_STATE: &str = "TERN_INITIAL_CLUSTER_STATE";

pub(crate) fn meta(rg: &RegionGroup, name: String) -> ObjectMeta {
    let group = rg.name_any();
    ObjectMeta {
        name: Some(name),
        namespace: rg.namespace(),
        labels: Some(names::group_labels(
            &rg.spec.geo_cluster,
            &rg.spec.region,
            rg.spec.role,
            &group,
        )),
        owner_references: rg.controller_owner_ref(&()).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}

/// The host every member advertises, as a template that Kubernetes expands
/// with the pod's own name.
fn own_host(rg: &RegionGroup) -> String {
    names::member_host(
        &rg.name_any(),
        "$(POD_NAME)",
        &rg.namespace().unwrap_or_default(),
        &rg.spec.cluster_domain,
    )
}

/// The etcd arguments of every member of the group. The initial cluster
/// and its state come from the environment, which the ConfigMap fills when
/// a container starts: a member that joins a grown group needs today's
/// membership, and a template change would restart every member instead.
pub fn container_args(rg: &RegionGroup) -> Vec<String> {
    let host = own_host(rg);
    let scheme = names::scheme(rg.spec.tls.is_some());
    let advertise_client = format!("{scheme}://{host}:{}", names::CLIENT_PORT);
    let advertise_peer = format!("{scheme}://{host}:{}", names::PEER_PORT);
    let listen_client = format!("{scheme}://0.0.0.0:{}", names::CLIENT_PORT);
    let listen_peer = format!("{scheme}://0.0.0.0:{}", names::PEER_PORT);
    // Metrics and probes stay plain HTTP on their own port: the kubelet
    // has no client certificate.
    let listen_metrics = format!("http://0.0.0.0:{}", names::METRICS_PORT);
    let data_dir = member_data_dir();
    member_args(&MemberConfig {
        name: "$(POD_NAME)",
        data_dir: &data_dir,
        listen_client_urls: &listen_client,
        listen_peer_urls: &listen_peer,
        listen_metrics_urls: Some(&listen_metrics),
        advertise_client_urls: &advertise_client,
        advertise_peer_urls: &advertise_peer,
        initial_cluster: &[],
        cluster_token: &rg.spec.cluster_token,
        state: ClusterState::New,
        heartbeat_interval_ms: rg.spec.etcd.heartbeat_interval_ms,
        election_timeout_ms: rg.spec.etcd.election_timeout_ms,
        unsafe_no_fsync: false,
        tls_dir: rg.spec.tls.as_ref().map(|_| names::TLS_MOUNT),
    })
    .into_iter()
    .map(|arg| {
        if arg.starts_with("--initial-cluster=") {
            format!("--initial-cluster=$({ENV_INITIAL_CLUSTER})")
        } else if arg.starts_with("--initial-cluster-state=") {
            format!("--initial-cluster-state=$({ENV_INITIAL_CLUSTER_STATE})")
        } else {
            arg
        }
    })
    .collect()
}

/// `NAME` from key `key` of the group's ConfigMap.
fn config_env(rg: &RegionGroup, name: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            config_map_key_ref: Some(ConfigMapKeySelector {
                name: names::config_map(&rg.name_any()),
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn stateful_set(rg: &RegionGroup, pods: i32, config_hash: &str) -> StatefulSet {
    let group = rg.name_any();
    let selector = names::selector_labels(&group);
    let labels = names::group_labels(&rg.spec.geo_cluster, &rg.spec.region, rg.spec.role, &group);
    let retention = match rg.spec.deletion_policy {
        DeletionPolicy::Retain => "Retain",
        DeletionPolicy::Delete => "Delete",
    };
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(names::METRICS_PORT),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(5),
        ..Probe::default()
    };
    let container = Container {
        name: "etcd".into(),
        image: Some(rg.spec.etcd.image.clone()),
        command: Some(vec!["etcd".into()]),
        args: Some(container_args(rg)),
        env: Some(vec![
            super::pod_name_env(),
            config_env(rg, ENV_INITIAL_CLUSTER, KEY_INITIAL_CLUSTER),
            config_env(rg, ENV_INITIAL_CLUSTER_STATE, KEY_INITIAL_CLUSTER_STATE),
        ]),
        ports: Some(vec![
            port("client", names::CLIENT_PORT),
            port("peer", names::PEER_PORT),
            port("metrics", names::METRICS_PORT),
        ]),
        // Ready means the member has joined a cluster with a leader: the
        // client Service only sends traffic to members that can serve it.
        // Every 2 s, and the startup probe every second: each member of
        // a roll, a resize or a replacement waits for the one before it to
        // be ready, and the kubelet runs the first readiness probe up to
        // a period after the startup probe passed: with 5 s periods a
        // member restart waited up to 10 s on its probes.
        readiness_probe: Some(probe("/readyz", 2, 3)),
        liveness_probe: Some(probe("/livez", 10, 6)),
        // A member that replays a long WAL must not be killed while
        // starting: 300 s.
        startup_probe: Some(probe("/livez", 1, 300)),
        resources: rg.spec.etcd.resources.clone(),
        volume_mounts: Some(vec![VolumeMount {
            name: CLAIM_TEMPLATE.into(),
            mount_path: DATA_DIR.into(),
            ..VolumeMount::default()
        }]),
        security_context: Some(super::locked_down()),
        ..Container::default()
    };
    let spread = |key: &str, when: &str| TopologySpreadConstraint {
        max_skew: 1,
        topology_key: key.into(),
        when_unsatisfiable: when.into(),
        label_selector: Some(LabelSelector {
            match_labels: Some(selector.clone()),
            ..LabelSelector::default()
        }),
        ..TopologySpreadConstraint::default()
    };
    let mut sts = StatefulSet {
        metadata: meta(rg, group.clone()),
        spec: StatefulSetSpec {
            // Not `spec.replicas`: pods start and stop one membership
            // step at a time (`crate::membership`).
            replicas: Some(pods),
            service_name: Some(names::peer_service(&group)),
            // Members must all start to elect a leader; OrderedReady would wait
            // for member 0 to be ready, which needs a quorum first.
            pod_management_policy: Some("Parallel".into()),
            // Members are restarted by the operator, one at a time and the
            // leader last (`crate::upgrade`); a directory share's, one
            // directory member at a time across clusters
            // (`controller/regiongroup/directory_roll.rs`).
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                ..StatefulSetUpdateStrategy::default()
            }),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            persistent_volume_claim_retention_policy: Some(StatefulSetPersistentVolumeClaimRetentionPolicy {
                when_deleted: Some(retention.into()),
                // Kept on a scale-down: a scale-down by anyone but the
                // operator must not destroy a voter's data. The operator
                // deletes a removed member's volume itself, once the
                // member has left Raft (`controller::regiongroup`).
                when_scaled: Some("Retain".into()),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels.clone()),
                    annotations: Some(BTreeMap::from([(
                        names::ANNOTATION_CONFIG_HASH.to_string(),
                        config_hash.to_string(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    node_selector: Some(rg.spec.node_selector.clone()),
                    affinity: Some(zone_affinity(&rg.spec.zones)),
                    topology_spread_constraints: Some(vec![
                        // One member per zone, so losing a zone loses a minority.
                        spread("topology.kubernetes.io/zone", "DoNotSchedule"),
                        spread("kubernetes.io/hostname", "ScheduleAnyway"),
                    ]),
                    termination_grace_period_seconds: Some(30),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(CLAIM_TEMPLATE.into()),
                    labels: Some(labels),
                    ..ObjectMeta::default()
                },
                spec: Some(data_claim_spec(rg)),
                ..PersistentVolumeClaim::default()
            }]),
            ..StatefulSetSpec::default()
        },
        status: None,
    };
    if let Some(tls) = &rg.spec.tls
        && let Some(pod) = sts.spec.template.spec.as_mut()
    {
        super::mount_tls(pod, &tls.member_secret);
    }
    sts
}

pub(crate) fn zone_affinity(zones: &[String]) -> Affinity {
    Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: "topology.kubernetes.io/zone".into(),
                        operator: "In".into(),
                        values: Some(zones.to_vec()),
                    }]),
                    ..NodeSelectorTerm::default()
                }],
            }),
            ..NodeAffinity::default()
        }),
        ..Affinity::default()
    }
}

fn port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

fn peer_service(rg: &RegionGroup) -> Service {
    let group = rg.name_any();
    Service {
        metadata: meta(rg, names::peer_service(&group)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            // Members must resolve each other before any is ready: readiness
            // needs a quorum, and a quorum needs the peers' DNS names.
            publish_not_ready_addresses: Some(true),
            selector: Some(names::selector_labels(&group)),
            ports: Some(vec![
                service_port("peer", names::PEER_PORT),
                service_port("client", names::CLIENT_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn client_service(rg: &RegionGroup) -> Service {
    let group = rg.name_any();
    Service {
        metadata: meta(rg, names::client_service(&group)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(names::selector_labels(&group)),
            ports: Some(vec![service_port("client", names::CLIENT_PORT)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn pdb(rg: &RegionGroup, pods: i32) -> PodDisruptionBudget {
    let group = rg.name_any();
    PodDisruptionBudget {
        metadata: meta(rg, group.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            // A drain may take members down only while a majority stays up.
            // During a grow, of the members that run, not of the size to be.
            min_available: Some(IntOrString::Int(quorum(pods))),
            selector: Some(LabelSelector {
                match_labels: Some(names::selector_labels(&group)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

fn config_map(rg: &RegionGroup, members: &Members) -> ConfigMap {
    let group = rg.name_any();
    let namespace = rg.namespace().unwrap_or_default();
    let client_endpoints = (0..members.pods)
        .map(|i| {
            let member = names::member_name(&group, i);
            format!(
                "{}://{}:{}",
                names::scheme(rg.spec.tls.is_some()),
                names::member_host(&group, &member, &namespace, &rg.spec.cluster_domain),
                names::CLIENT_PORT
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let initial_cluster = members
        .initial_cluster
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer_url))
        .collect::<Vec<_>>()
        .join(",");
    ConfigMap {
        metadata: meta(rg, names::config_map(&group)),
        data: Some(BTreeMap::from([
            ("role".to_string(), names::role_label(rg.spec.role).to_string()),
            ("region".to_string(), rg.spec.region.clone()),
            (KEY_INITIAL_CLUSTER.to_string(), initial_cluster),
            (
                KEY_INITIAL_CLUSTER_STATE.to_string(),
                match members.state {
                    ClusterState::New => "new",
                    ClusterState::Existing => "existing",
                }
                .to_string(),
            ),
            ("initial-cluster-token".to_string(), rg.spec.cluster_token.clone()),
            (
                "heartbeat-interval-ms".to_string(),
                rg.spec.etcd.heartbeat_interval_ms.to_string(),
            ),
            (
                "election-timeout-ms".to_string(),
                rg.spec.etcd.election_timeout_ms.to_string(),
            ),
            (KEY_CLIENT_ENDPOINTS.to_string(), client_endpoints),
            ("etcd-args".to_string(), container_args(rg).join("\n")),
        ])),
        ..ConfigMap::default()
    }
}

/// A stable hash of the member configuration (see `crate::hash`), without
/// what changes with the membership (what only a starting member reads,
/// and the list of members for people): changing the membership must not
/// restart the members.
fn config_hash(cm: &ConfigMap) -> String {
    let mut data = cm.data.clone().unwrap_or_default();
    data.remove(KEY_INITIAL_CLUSTER);
    data.remove(KEY_INITIAL_CLUSTER_STATE);
    data.remove(KEY_CLIENT_ENDPOINTS);
    let mut h = crate::hash::Fnv::default();
    data.hash(&mut h);
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::geocluster::region_groups;
    use crate::build::testing::example;
    use crate::regions::RegionFilter;

    fn first_group() -> RegionGroup {
        let mut rg = region_groups(&example(), &RegionFilter::all()).remove(0);
        rg.metadata.uid = Some("rg-uid".into());
        rg
    }

    #[test]
    fn tls_members_speak_https_require_certificates_and_mount_the_secret() {
        let mut gc = example();
        gc.spec.tls = Some(tern_crds::TlsSpec {
            secret_prefix: "payments-tls".into(),
        });
        let mut rg = region_groups(&gc, &RegionFilter::all()).remove(0);
        rg.metadata.uid = Some("rg-uid".into());
        let tls = rg.spec.tls.clone().expect("the group inherits spec.tls");
        assert_eq!(
            (tls.member_secret.as_str(), tls.client_secret.as_str()),
            ("payments-tls-etcd", "payments-tls-operator")
        );
        assert!(
            rg.spec
                .initial_cluster
                .iter()
                .all(|m| m.peer_url.starts_with("https://"))
        );
        let o = group_objects(&rg);
        let pod = o.stateful_set.spec.template.spec.expect("pod");
        let args = pod.containers[0].args.clone().expect("args");
        for want in [
            "--client-cert-auth".to_string(),
            "--peer-client-cert-auth".to_string(),
            format!("--trusted-ca-file={}/ca.crt", names::TLS_MOUNT),
            format!("--cert-file={}/tls.crt", names::TLS_MOUNT),
        ] {
            assert!(args.contains(&want), "{want} in {args:?}");
        }
        for prefix in [
            "--listen-client-urls=",
            "--listen-peer-urls=",
            "--advertise-client-urls=",
        ] {
            let a = args.iter().find(|a| a.starts_with(prefix)).expect(prefix);
            assert!(a.contains("=https://"), "{a}");
        }
        // Probes and metrics stay on plain HTTP: the kubelet has no
        // client certificate.
        assert!(args.iter().any(|a| a.starts_with("--listen-metrics-urls=http://")));
        assert_eq!(
            pod.volumes.as_ref().expect("volumes")[0]
                .secret
                .as_ref()
                .and_then(|s| s.secret_name.as_deref()),
            Some("payments-tls-etcd")
        );
        let endpoints = o.config_map.data.expect("data");
        assert!(endpoints.values().any(|v| v.contains("https://")), "{endpoints:?}");
    }

    #[test]
    fn quorum_is_a_majority() {
        assert_eq!([1, 3, 5, 7].map(quorum), [1, 2, 3, 4]);
    }

    #[test]
    fn statefulset_runs_the_members() {
        let rg = first_group();
        let o = group_objects(&rg);
        let spec = &o.stateful_set.spec;
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(spec.service_name.as_deref(), Some("payments-us-east-peer"));
        let retention = spec.persistent_volume_claim_retention_policy.as_ref().expect("policy");
        assert_eq!(retention.when_deleted.as_deref(), Some("Retain"));
        let pod = spec.template.spec.as_ref().expect("pod");
        let zones = pod
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .expect("zone affinity");
        let term = &zones
            .required_during_scheduling_ignored_during_execution
            .as_ref()
            .expect("required")
            .node_selector_terms[0];
        assert_eq!(
            term.match_expressions.as_ref().expect("expr")[0]
                .values
                .as_ref()
                .expect("zones")
                .len(),
            3
        );
        let args = pod.containers[0].args.as_ref().expect("args");
        assert!(args.contains(&"--name=$(POD_NAME)".to_string()));
        assert!(
            args.contains(
                &"--advertise-client-urls=http://$(POD_NAME).payments-us-east-peer.default.svc.cluster.local:2379"
                    .to_string()
            )
        );
        let owner = &o.stateful_set.metadata.owner_references.as_ref().expect("owned")[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("RegionGroup", "rg-uid"));
    }

    #[test]
    fn budget_keeps_quorum_and_services_expose_members() {
        let mut rg = first_group();
        rg.spec.replicas = 5;
        let o = group_objects(&rg);
        assert_eq!(
            o.pdb.spec.as_ref().and_then(|s| s.min_available.clone()),
            Some(IntOrString::Int(3))
        );
        let peer = o.peer_service.spec.as_ref().expect("spec");
        assert_eq!(peer.cluster_ip.as_deref(), Some("None"));
        assert_eq!(peer.publish_not_ready_addresses, Some(true));
        let client = o.client_service.spec.as_ref().expect("spec");
        assert_eq!(client.ports.as_ref().expect("ports")[0].port, 2379);
        let data = o.config_map.data.as_ref().expect("data");
        assert_eq!(data["client-endpoints"].split(',').count(), 5);
    }

    #[test]
    fn a_config_change_rolls_the_members() {
        let rg = first_group();
        let hash = |rg: &RegionGroup| {
            group_objects(rg)
                .stateful_set
                .spec
                .template
                .metadata
                .as_ref()
                .expect("meta")
                .annotations
                .as_ref()
                .expect("annotations")[names::ANNOTATION_CONFIG_HASH]
                .clone()
        };
        let mut changed = rg.clone();
        changed.spec.etcd.heartbeat_interval_ms = 150;
        assert_eq!(hash(&rg), hash(&rg.clone()), "the hash is stable");
        assert_ne!(hash(&rg), hash(&changed));
    }

    #[test]
    fn a_membership_change_rewrites_what_joining_members_read_without_rolling_the_others() {
        let rg = first_group();
        let boot = group_objects(&rg);
        let data = boot.config_map.data.as_ref().expect("data");
        assert_eq!(data[KEY_INITIAL_CLUSTER_STATE], "new");
        assert_eq!(data[KEY_INITIAL_CLUSTER].split(',').count(), 3);

        let mut joining = Members::bootstrap(&rg);
        joining.pods = 4;
        joining.state = ClusterState::Existing;
        joining.initial_cluster.push(ClusterMember {
            name: "payments-us-east-3".into(),
            peer_url: "http://payments-us-east-3.payments-us-east-peer.tern.svc.cluster.local:2380".into(),
        });
        let grown = group_objects_with(&rg, &joining);
        assert_eq!(grown.stateful_set.spec.replicas, Some(4));
        let data = grown.config_map.data.as_ref().expect("data");
        assert_eq!(data[KEY_INITIAL_CLUSTER_STATE], "existing");
        assert!(data[KEY_INITIAL_CLUSTER].ends_with(
            ",payments-us-east-3=http://payments-us-east-3.payments-us-east-peer.tern.svc.cluster.local:2380"
        ));
        // Same template, same config hash: the running members stay up.
        assert_eq!(boot.stateful_set.spec.template, grown.stateful_set.spec.template);
        let pod = grown.stateful_set.spec.template.spec.as_ref().expect("pod");
        let args = pod.containers[0].args.as_ref().expect("args");
        assert!(
            args.contains(&"--initial-cluster=$(TERN_INITIAL_CLUSTER)".to_string()),
            "{args:?}"
        );
        assert!(args.contains(&"--initial-cluster-state=$(TERN_INITIAL_CLUSTER_STATE)".to_string()));
        let env = pod.containers[0].env.as_ref().expect("env");
        assert!(env.iter().any(|e| e.name == ENV_INITIAL_CLUSTER));
        // The budget follows the members that run.
        assert_eq!(
            grown.pdb.spec.as_ref().and_then(|s| s.min_available.clone()),
            Some(IntOrString::Int(3))
        );
        let retention = grown
            .stateful_set
            .spec
            .persistent_volume_claim_retention_policy
            .expect("policy");
        assert_eq!(retention.when_scaled.as_deref(), Some("Retain"));
        assert_eq!(data[KEY_CLIENT_ENDPOINTS].split(',').count(), 4);

        // A new size in the spec alone changes nothing the members run.
        let mut resized = rg.clone();
        resized.spec.replicas = 5;
        let resized = group_objects_with(&resized, &Members::bootstrap(&rg));
        assert_eq!(boot.stateful_set.spec, resized.stateful_set.spec);
    }

    #[test]
    fn delete_policy_reaches_the_statefulset() {
        let mut rg = first_group();
        rg.spec.deletion_policy = DeletionPolicy::Delete;
        let o = group_objects(&rg);
        let retention = o
            .stateful_set
            .spec
            .persistent_volume_claim_retention_policy
            .expect("policy");
        assert_eq!(retention.when_deleted.as_deref(), Some("Delete"));
    }
}
