//! `AccountMigration`: a requested or automatic move of one account's home.
//! This resource defines the request and its audit trail; the region agent
//! carries the move out with the migration protocol of DESIGN.md.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{
    ACCOUNT_ID_PATTERN, CLUSTER_NAME_PATTERN, MAX_ACCOUNT_ID, MAX_CLUSTER_NAME, MAX_REGION_NAME, REGION_NAME_PATTERN,
};

/// A request to move one account's home region.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tern.dev",
    version = "v1alpha1",
    kind = "AccountMigration",
    namespaced,
    status = "AccountMigrationStatus",
    shortname = "amig",
    category = "tern",
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.geoCluster"}"#,
    printcolumn = r#"{"name":"Account","type":"string","jsonPath":".spec.account"}"#,
    printcolumn = r#"{"name":"From","type":"string","jsonPath":".status.sourceRegion"}"#,
    printcolumn = r#"{"name":"To","type":"string","jsonPath":".spec.targetRegion"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Unavailable-ms","type":"integer","priority":1,"jsonPath":".status.unavailableMs"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".spec.reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.expectedSourceRegion) || self.expectedSourceRegion != self.targetRegion")
        .message("expectedSourceRegion and targetRegion must differ: the account would not move")
        .field_path(".targetRegion")
)]
pub struct AccountMigrationSpec {
    /// The GeoCluster the account belongs to.
    #[schemars(length(min = 1, max = MAX_CLUSTER_NAME), regex(pattern = CLUSTER_NAME_PATTERN))]
    pub geo_cluster: String,
    /// The account to move: letters, digits and `._:@-`, at most 128
    /// characters, no `..`. Immutable.
    #[schemars(length(min = 1, max = MAX_ACCOUNT_ID), regex(pattern = ACCOUNT_ID_PATTERN))]
    #[x_kube(
        validation = Rule::new("self == oldSelf").message("account is immutable: create a new AccountMigration"),
        validation = Rule::new("!self.contains('..')").message("account must not contain '..'")
    )]
    pub account: String,
    /// The region the account moves to. Immutable.
    #[schemars(length(min = 1, max = MAX_REGION_NAME), regex(pattern = REGION_NAME_PATTERN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("targetRegion is immutable: create a new AccountMigration"))]
    pub target_region: String,
    /// Compare-and-swap guard: the move is refused unless the account is homed
    /// in this region when it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_REGION_NAME), regex(pattern = REGION_NAME_PATTERN))]
    pub expected_source_region: Option<String>,
    /// Why the account moves, for the audit trail (`follow-the-sun`,
    /// `maintenance`, a ticket number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub reason: Option<String>,
    /// The directory intent this object records instead of asking for a
    /// move: the operator sets it on the objects it creates for the moves
    /// the agents decided themselves (follow the sun), the audit trail of
    /// automatic moves; such an object is never carried out, only reported.
    /// Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = ACCOUNT_ID_PATTERN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("recordsIntent is immutable"))]
    pub records_intent: Option<String>,
}

/// Progress and outcome of a migration.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AccountMigrationStatus {
    /// Step of the migration protocol reached.
    #[serde(default)]
    pub phase: MigrationPhase,
    /// `Succeeded`: True once completed, False once refused or rolled back
    /// (reason `Refused` or `RolledBack`), Unknown while in flight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The intent record in the directory (`/tern/dir/migrations/{id}`)
    /// this object was carried out as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_id: Option<String>,
    /// Where the account was homed when the migration started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_region: Option<String>,
    /// The account's epoch in the source region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_epoch: Option<i64>,
    /// The account's epoch in the target region (source epoch + 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_epoch: Option<i64>,
    /// Revision of the source group at which the account was fenced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_revision: Option<i64>,
    /// When the migration started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it completed or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Measured write unavailability of the account (fence to switch), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable_ms: Option<i64>,
    /// Human-readable detail of the last transition or the failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Steps of the migration protocol.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MigrationPhase {
    /// Accepted, not started.
    #[default]
    Pending,
    /// Directory marked the account as migrating; the source is being fenced.
    Fencing,
    /// Waiting for the target's mirror to apply the fence revision.
    CatchingUp,
    /// Copying the account's keys into the target's home area.
    Copying,
    /// Switching the directory record to the target.
    Switching,
    /// Done: the account is homed in the target region.
    Completed,
    /// Undoing a move that could not finish: the source is unfenced and
    /// the directory names it again.
    RollingBack,
    /// Refused or rolled back; see `message` and the `Succeeded` condition.
    Failed,
}
