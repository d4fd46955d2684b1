//! `RegionGroup`: one Raft group (an etcd cluster) as the operator deploys it.
//! It is either a region's data group or that region's share of the directory
//! group. The GeoCluster reconcile writes these; people read them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use tern_common::limits;

use crate::common::{
    CLUSTER_NAME_PATTERN, DNS_SUBDOMAIN_PATTERN, DeletionPolicy, EtcdSpec, GroupPhase, MAX_CLUSTER_NAME,
    MAX_REGION_NAME, REGION_NAME_PATTERN, ZONE_PATTERN,
};

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
#[x_kube(
    validation = Rule::new("self.initialCluster.size() >= self.replicas")
        .message("initialCluster must list at least this group's replicas")
        .field_path(".initialCluster"),
    validation = Rule::new("!has(self.restore) || (self.role == 'Data' && self.restore.backup.matches('^' + self.region + '-[0-9]{8}T[0-9]{6}[.][0-9]{3}Z$')) || (self.role == 'Directory' && self.restore.backup.matches('^directory-[0-9]{8}T[0-9]{6}[.][0-9]{3}Z$'))")
        .message("restore must name a backup of this group: for a data group the region's name, for a directory share 'directory', then '-' and the time the backup began")
        .field_path(".restore"),
    validation = Rule::new("self.role == 'Data' || self.replicas == oldSelf.replicas")
        .message("a directory group's replicas cannot be changed: its members span regions, and tern changes the membership only of a region's own data group")
        .field_path(".replicas")
)]
pub struct RegionGroupSpec {
    /// The GeoCluster this group belongs to.
    #[schemars(length(min = 1, max = MAX_CLUSTER_NAME), regex(pattern = CLUSTER_NAME_PATTERN))]
    pub geo_cluster: String,
    /// The region whose nodes run these members.
    #[schemars(length(min = 1, max = MAX_REGION_NAME), regex(pattern = REGION_NAME_PATTERN))]
    pub region: String,
    /// `Data` (the region's own group) or `Directory` (the region's members of
    /// the global directory group).
    pub role: GroupRole,
    /// Zones the members are spread over.
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 63), regex(pattern = ZONE_PATTERN)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub zones: Vec<String>,
    /// Members of this group in this region. A data group's size may
    /// change: the operator adds or removes one member at a time as a Raft
    /// membership change (status.membershipChange shows the step). A
    /// directory group's members span regions and are fixed.
    #[schemars(range(min = limits::GROUP_REPLICAS.0, max = limits::GROUP_REPLICAS.1))]
    pub replicas: i32,
    /// Node labels that pin the members to the region.
    #[serde(default)]
    #[schemars(schema_with = "crate::common::node_selector_schema")]
    pub node_selector: BTreeMap<String, String>,
    /// DNS domain of this region's Kubernetes cluster.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub cluster_domain: String,
    /// Every member of the Raft group, including those in other regions (for
    /// the directory group): etcd's initial cluster.
    #[schemars(length(min = 1, max = limits::MAX_GROUP_MEMBERS))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub initial_cluster: Vec<ClusterMember>,
    /// Token that keeps members of different groups from joining each other.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9][-A-Za-z0-9_.]*$"))]
    pub cluster_token: String,
    /// etcd image, resources, storage and Raft tuning.
    pub etcd: EtcdSpec,
    /// Whether deleting the group deletes the members' volumes.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// TLS for clients and peers (from the GeoCluster's spec.tls). Unset:
    /// plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<GroupTlsSpec>,
    /// Before the members roll onto another etcd image, the operator asks
    /// the region's agent for a backup of the group and waits until it is
    /// taken (status.preUpgradeBackup). Set from the GeoCluster's
    /// spec.backup: the agent is what holds the backup volume.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pre_upgrade_backup: bool,
    /// The backup the members start from when the group has no members
    /// (from the GeoCluster's regions[].restoreFrom, or for a directory
    /// share its directory.restoreFrom).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<GroupRestore>,
}

/// Where a group's members are restored from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GroupRestore {
    /// The PersistentVolumeClaim that holds the backups (the GeoCluster's
    /// spec.backup.claimName).
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub claim_name: String,
    /// The backup's id; it starts with the name of the group it is of.
    #[schemars(length(min = 22, max = 80), regex(pattern = limits::BACKUP_ID_PATTERN))]
    pub backup: String,
}

/// A group's certificates: Secrets with `ca.crt`, `tls.crt`, `tls.key`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GroupTlsSpec {
    /// Mounted into every member: its serving and peer certificate.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub member_secret: String,
    /// What the operator dials the members with (read through the API).
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub client_secret: String,
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
    /// Member name (the pod name, a DNS label).
    #[schemars(length(min = 1, max = 63), regex(pattern = limits::DNS_LABEL_PATTERN))]
    pub name: String,
    /// URL the other members reach it on (`http://host:port`).
    #[serde(rename = "peerURL")]
    #[schemars(length(min = 8, max = 512), regex(pattern = r"^https?://[^\s,/]+$"))]
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
    /// The group's Raft members as the operator last read them from etcd:
    /// what a member that starts without data is told to join. Read the
    /// first time every member of a data group is ready, and at each change
    /// of its members; empty before (its members then bootstrap).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub raft_members: Vec<ClusterMember>,
    /// The membership change in progress: the step it is at, or why it
    /// waits. Absent when the group has the members its spec asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership_change: Option<String>,
    /// Why the members still run their etcd image rather than the one the
    /// spec names: an upgrade etcd's version-skew rule forbids, or one
    /// waiting for its pre-upgrade backup. Absent when the spec's image is
    /// the one deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_refused: Option<String>,
    /// The rolling update in progress (members restarted one at a time on
    /// a new template, the leader last): the step, or why it waits. Absent
    /// when every member runs the current template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling_update: Option<String>,
    /// The backup taken before the members last rolled onto another etcd
    /// image (spec.preUpgradeBackup), or the one asked for and awaited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_upgrade_backup: Option<PreUpgradeBackup>,
    /// The restore of the members from spec.restore's backup: under way,
    /// failed, or done (then the group is not restored from that backup
    /// again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreStatus>,
    /// Each member's volume: the uid of its claim, by member name,
    /// recorded the first time every member is ready and changed only by
    /// the member's replacement. A member whose claim has another uid lost
    /// its data, and is replaced (memberReplacement).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub member_volumes: BTreeMap<String, String>,
    /// The replacement of a member whose volume was lost: removed from the
    /// Raft group, added back as a learner that starts empty and catches
    /// up, then promoted. Absent when no member is being replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_replacement: Option<MemberReplacement>,
    /// Every member's volume of a group that has run is gone, and no
    /// restore is asked for: no member is started, and the region is held.
    /// Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_lost: Option<DataLost>,
}

/// Why a group's members are not started: its data is gone.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DataLost {
    /// What was found, and the ways out.
    pub message: String,
    /// The group's region is held in the directory because of it.
    #[serde(default)]
    pub held: bool,
}

/// A member being replaced because its volume was lost.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MemberReplacement {
    /// The member (its pod's name).
    pub member: String,
    /// The uid of the claim found when its volume was lost; once the
    /// member is out of Raft, of the claim deleted to clear its volume (a
    /// pod may have started on it as the old member).
    pub claim_uid: String,
    /// Its volume has been cleared since it left Raft: a claim other than
    /// `claimUid` is new and empty, and it is added back on that.
    #[serde(default)]
    pub cleared: bool,
    /// The Raft member id (hex) it had, once its removal is under way: a
    /// member at its address with another id is its replacement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_id: Option<String>,
    /// Its pod has been restarted since it was added back, so that it
    /// starts with the group's current membership.
    #[serde(default)]
    pub restarted: bool,
    /// The group's region is held in the directory because of this loss
    /// (a group of one member: its data is gone with the volume).
    #[serde(default)]
    pub held: bool,
    /// The step under way, or why it waits.
    pub message: String,
}

/// How a group's restore from a backup went.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RestoreStatus {
    /// The backup's id.
    pub backup: String,
    /// Every member's volume holds the backup; the members run from it.
    pub done: bool,
    /// The step under way, what failed and where to look, or (once done)
    /// what the group holds and lost.
    pub message: String,
    /// The members the group is restored with, fixed when the restore
    /// begins: a change of replicas meanwhile is carried out after it, as a
    /// membership change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<i32>,
    /// Once the restored members serve: how the accounts' fences in the
    /// group were made to agree with the directory, which has moved on
    /// since the backup (accounts created or moved since; docs/backup.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fences: Option<String>,
    /// A directory share's, once the restored directory serves: what it
    /// holds (accounts per home region, holds, migrations in flight), to
    /// compare with the regions' fences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
}

/// A backup asked of the region's agent before an etcd image roll.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PreUpgradeBackup {
    /// The image the members roll onto.
    pub image: String,
    /// The group's revision when the backup was asked for: the backup holds
    /// every write acknowledged before it.
    pub requested_revision: i64,
    /// The backup's id (`tern backup list`, `tern restore --backup`), once
    /// taken. The roll restarts no member before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
}
