//! `RegionGroup`: one Raft group (an etcd cluster) as the operator deploys it.
//! It is either a region's data group or that region's share of the directory
//! group. The GeoCluster reconcile writes these; people read them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::EtcdSpec;

/// Desired state of one Raft group's members in one region.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tern.dev",
    version = "v1alpha1",
    kind = "RegionGroup",
    namespaced,
    status = "RegionGroupStatus",
    shortname = "rg",
    category = "tern",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.geoCluster"}"#,
    printcolumn = r#"{"name":"Region","type":"string","jsonPath":".spec.region"}"#,
    printcolumn = r#"{"name":"Role","type":"string","jsonPath":".spec.role"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyMembers"}"#,
    printcolumn = r#"{"name":"Members","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RegionGroupSpec {
    /// The GeoCluster this group belongs to.
    #[schemars(length(min = 1, max = 24))]
    pub geo_cluster: String,
    /// The region whose nodes run these members.
    #[schemars(length(min = 1, max = 20), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub region: String,
    /// `Data` (the region's own group) or `Directory` (the region's members of
    /// the global directory group).
    pub role: GroupRole,
    /// Zones the members are spread over.
    #[schemars(length(min = 1, max = 8))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub zones: Vec<String>,
    /// Members of this group in this region.
    #[schemars(range(min = 1, max = 7))]
    pub replicas: i32,
    /// Node labels that pin the members to the region.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// DNS domain of this region's Kubernetes cluster.
    pub cluster_domain: String,
    /// Every member of the Raft group, including those in other regions (for
    /// the directory group): etcd's initial cluster.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub initial_cluster: Vec<ClusterMember>,
    /// Token that keeps members of different groups from joining each other.
    pub cluster_token: String,
    /// etcd image, resources, storage and Raft tuning.
    pub etcd: EtcdSpec,
    /// Whether deleting the group deletes the members' volumes.
    #[serde(default)]
    pub deletion_policy: crate::geocluster::DeletionPolicy,
}

/// The role of a group.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupRole {
    /// A region's data group: accounts homed there and mirrors of the others.
    Data,
    /// The region's members of the directory group.
    Directory,
}

/// One etcd member of a group.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterMember {
    /// Member name (the pod name).
    pub name: String,
    /// URL the other members reach it on.
    #[serde(rename = "peerURL")]
    pub peer_url: String,
}

/// Observed state of a group, computed from its StatefulSet.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RegionGroupStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Pending`, `Provisioning`, `Ready` or `Degraded`.
    #[serde(default)]
    pub phase: GroupPhase,
    /// Members whose pods are ready.
    #[serde(default)]
    pub ready_members: i32,
    /// Members running the current revision of the member template.
    #[serde(default)]
    pub updated_members: i32,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Where a group stands.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GroupPhase {
    /// Nothing is running yet.
    #[default]
    Pending,
    /// Members are starting or rolling to a new revision; a majority may not be
    /// up yet.
    Provisioning,
    /// Every member is ready and current.
    Ready,
    /// A majority is up, but some members are not ready.
    Degraded,
    /// Fewer than a majority of members are ready: the group cannot commit.
    Unavailable,
}

impl GroupPhase {
    /// The phase as it is written in status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Provisioning => "Provisioning",
            Self::Ready => "Ready",
            Self::Degraded => "Degraded",
            Self::Unavailable => "Unavailable",
        }
    }
}
