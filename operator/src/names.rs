//! Names and labels of everything the operator creates, in one place, so that
//! the builders, the controllers, the finalizer and the tests agree.

use std::collections::BTreeMap;

use tern_crds::GroupRole;

/// Field manager for every server-side apply of the operator (children and
/// status). The region agent uses its own manager for the fields it owns.
pub const FIELD_MANAGER: &str = "tern-operator";

/// Finalizer that orders a GeoCluster's deletion.
pub const FINALIZER: &str = "tern.dev/cleanup";

pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_CLUSTER: &str = "tern.dev/geocluster";
pub const LABEL_REGION: &str = "tern.dev/region";
pub const LABEL_ROLE: &str = "tern.dev/role";

/// Value of `app.kubernetes.io/managed-by` on every child.
pub const MANAGER: &str = "tern-operator";

/// Annotation with a hash of the member configuration, so that a change to it
/// rolls the members.
pub const ANNOTATION_CONFIG_HASH: &str = "tern.dev/config-hash";
/// On a GeoCluster, `"true"`: its groups roll onto another etcd image
/// without waiting for a backup (spec.backup set, but no backup can be
/// taken: a group without quorum, whose new image is its fix).
pub const ANNOTATION_SKIP_PRE_UPGRADE_BACKUP: &str = "tern.dev/skip-pre-upgrade-backup";

/// Annotation with a hash of what the operator last applied to an object:
/// an apply is skipped only while it matches (see `apply::apply`).
pub const ANNOTATION_APPLIED_HASH: &str = "tern.dev/applied-hash";

/// etcd ports inside a pod.
pub const CLIENT_PORT: i32 = 2379;
pub const PEER_PORT: i32 = 2380;
pub const METRICS_PORT: i32 = 2381;

/// The scheme of etcd URLs: TLS or not.
pub fn scheme(tls: bool) -> &'static str {
    if tls { "https" } else { "http" }
}

/// Where a component's pod mounts its certificate Secret.
pub const TLS_MOUNT: &str = "/etc/tern/tls";

/// Default DNS domain of a Kubernetes cluster.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// Role as written in labels.
pub fn role_label(role: GroupRole) -> &'static str {
    match role {
        GroupRole::Data => "data",
        GroupRole::Directory => "directory",
    }
}

/// Name of a RegionGroup (and of its StatefulSet and PDB).
pub fn group_name(cluster: &str, region: &str, role: GroupRole) -> String {
    match role {
        GroupRole::Data => format!("{cluster}-{region}"),
        GroupRole::Directory => format!("{cluster}-dir-{region}"),
    }
}

/// Headless Service that gives members stable DNS names.
pub fn peer_service(group: &str) -> String {
    format!("{group}-peer")
}

/// Service that clients (routers, agents) use.
pub fn client_service(group: &str) -> String {
    format!("{group}-client")
}

/// ConfigMap with the member configuration.
pub fn config_map(group: &str) -> String {
    format!("{group}-config")
}

/// Name of member `ordinal` of a group (its pod name).
pub fn member_name(group: &str, ordinal: i32) -> String {
    format!("{group}-{ordinal}")
}

/// Stable DNS name of a member, reachable from any cluster that resolves
/// `domain`.
pub fn member_host(group: &str, member: &str, namespace: &str, domain: &str) -> String {
    format!("{member}.{}.{namespace}.svc.{domain}", peer_service(group))
}

/// Labels that select the pods of a group.
pub fn selector_labels(group: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_NAME.to_string(), "etcd".to_string()),
        (LABEL_INSTANCE.to_string(), group.to_string()),
    ])
}

/// Labels of every object belonging to a group.
pub fn group_labels(cluster: &str, region: &str, role: GroupRole, group: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(group);
    labels.extend([
        (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
        (LABEL_PART_OF.to_string(), "tern".to_string()),
        (LABEL_COMPONENT.to_string(), format!("{}-group", role_label(role))),
        (LABEL_CLUSTER.to_string(), cluster.to_string()),
        (LABEL_REGION.to_string(), region.to_string()),
        (LABEL_ROLE.to_string(), role_label(role).to_string()),
    ]);
    labels
}

/// Label selector of everything a GeoCluster owns, directly or not.
pub fn cluster_selector(cluster: &str) -> String {
    format!("{LABEL_MANAGED_BY}={MANAGER},{LABEL_CLUSTER}={cluster}")
}
