//! Pieces shared by several resources: the name and duration rules (built
//! from `tern_common::limits`, the one place binaries and schema share), the
//! etcd member settings, the workload settings of routers and agents, and the
//! enums both GeoCluster and RegionGroup use. `geocluster` and `regiongroup`
//! import from here and never from each other.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::KubeSchema;
use kube::core::{Reason, Rule};
use serde::{Deserialize, Serialize};
use tern_common::limits::DurationRange;

pub use tern_common::limits::{
    ACCOUNT_ID_PATTERN, CLUSTER_NAME_PATTERN, DURATION_PATTERN, MAX_ACCOUNT_ID, MAX_CLUSTER_NAME, MAX_REGION_NAME,
    REGION_NAME_PATTERN,
};

/// A zone: a label value (zones are values of the nodes'
/// `topology.kubernetes.io/zone` label).
pub const ZONE_PATTERN: &str = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$";

/// A DNS subdomain (RFC 1123): cluster domains and StorageClass names.
pub const DNS_SUBDOMAIN_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// A container image reference: Kubernetes refuses empty ones and ones with
/// whitespace.
pub const IMAGE_PATTERN: &str = r"^\S+$";

/// A label value (at most 63 characters, may be empty).
pub const LABEL_VALUE_PATTERN: &str = r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$";

/// Most entries in a node selector.
pub const MAX_NODE_SELECTOR: usize = 16;

/// Schema of a node selector: at most [`MAX_NODE_SELECTOR`] entries whose
/// values are label values. Its keys cannot be checked by the schema (map
/// keys have no length limit, so a CEL rule over them exceeds the API
/// server's cost budget); the operator checks them (`validate`) and names
/// the field.
pub fn node_selector_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "nullable": true,
        "maxProperties": MAX_NODE_SELECTOR,
        "additionalProperties": {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN}
    })
}

/// CEL rule: a duration string within `range` (and so never zero).
pub fn duration_rule(field: &str, range: DurationRange) -> Rule {
    Rule::new(format!(
        "duration(self) >= duration('{}') && duration(self) <= duration('{}')",
        range.min, range.max
    ))
    .message(kube::core::Message::Message(format!(
        "{field} must be a duration between {} and {}",
        range.min, range.max
    )))
    .reason(Reason::FieldValueInvalid)
}

/// CEL rule for a `Quantity` field: a Kubernetes quantity greater than zero.
/// The built-in schema of a quantity is only "int or string".
pub fn positive_quantity_rule(field: &str) -> Rule {
    Rule::new("isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('0'))")
        .message(kube::core::Message::Message(format!(
            "{field} must be a Kubernetes quantity greater than zero, such as 10Gi"
        )))
        .reason(Reason::FieldValueInvalid)
}

/// A Kubernetes quantity (`500m`, `1Gi`, `1e3`), the pattern Kubernetes'
/// own CRD generator puts on quantities.
pub const QUANTITY_PATTERN: &str = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

/// Schema of a container's `resources`: requests and limits as maps of
/// quantities with the quantity pattern (the built-in schema of a quantity is
/// only "int or string", so `cpu: fast` would pass and the workload would be
/// refused when the operator applies it), and no request above its limit
/// (the same: Kubernetes refuses such a pod template).
pub fn resources_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let quantities = |what: &str| {
        serde_json::json!({
            "description": format!("{what}, by resource name (cpu, memory, ...), as Kubernetes quantities."),
            "type": "object",
            "maxProperties": 16,
            "additionalProperties": {
                "anyOf": [{"type": "integer"}, {"type": "string"}],
                "pattern": QUANTITY_PATTERN,
                "maxLength": 64,
                "x-kubernetes-int-or-string": true
            }
        })
    };
    schemars::json_schema!({
        "description": "CPU and memory: requests and limits as Kubernetes quantities.",
        "type": "object",
        "nullable": true,
        "x-kubernetes-validations": [{
            "rule": "!has(self.requests) || !has(self.limits) || self.requests.all(k, !(k in self.limits) || !isQuantity(string(self.requests[k])) || !isQuantity(string(self.limits[k])) || quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) <= 0)",
            "message": "resources: a request must not exceed its limit",
            "reason": "FieldValueInvalid"
        }],
        "properties": {
            "requests": quantities("Minimum resources"),
            "limits": quantities("Maximum resources")
        }
    })
}

/// Default etcd image: the release pinned in e2e/controlplane/etcd/go.mod.
pub const DEFAULT_ETCD_IMAGE: &str = "gcr.io/etcd-development/etcd:v3.6.16";

/// Settings of the etcd members that form every Raft group.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = kube::core::Rule::new("self.electionTimeoutMs >= 5 * self.heartbeatIntervalMs")
        .message("electionTimeoutMs must be at least 5 times heartbeatIntervalMs, or members elect a new leader on every slow heartbeat")
        .field_path(".electionTimeoutMs")
)]
pub struct EtcdSpec {
    /// Container image of the etcd members.
    #[serde(default = "default_etcd_image")]
    #[schemars(length(min = 1, max = 512), regex(pattern = IMAGE_PATTERN))]
    pub image: String,
    /// CPU and memory for each etcd member (quantities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "resources_schema")]
    pub resources: Option<ResourceRequirements>,
    /// Persistent storage of each member.
    #[serde(default)]
    pub storage: StorageSpec,
    /// Raft heartbeat interval inside a region, in milliseconds. Zones of one
    /// region are about 1 ms apart, so etcd's default of 100 ms fits.
    #[serde(default = "default_heartbeat_ms")]
    #[schemars(range(min = 10, max = 5000))]
    pub heartbeat_interval_ms: i32,
    /// Raft election timeout inside a region, in milliseconds; at least five
    /// heartbeats.
    #[serde(default = "default_election_ms")]
    #[schemars(range(min = 50, max = 50000))]
    pub election_timeout_ms: i32,
}

/// Persistent volume of an etcd member.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each member's volume, as a Kubernetes quantity greater than
    /// zero (for example `10Gi`).
    #[serde(default = "default_storage_size")]
    #[x_kube(validation = positive_quantity_rule("size"))]
    pub size: Quantity,
    /// StorageClass of the volumes (a DNS subdomain); the cluster's default
    /// class when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN_PATTERN))]
    pub storage_class_name: Option<String>,
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

/// Image, replica count and resources of a tern component (router or agent).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ComponentSpec {
    /// Container image; unset means the image of the same tern release as the
    /// operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512), regex(pattern = IMAGE_PATTERN))]
    pub image: Option<String>,
    /// Replicas per region. Routers are stateless and all serve; agents elect
    /// one active replica and keep the others on standby.
    #[serde(default = "default_component_replicas")]
    #[schemars(range(min = 1, max = 20))]
    pub replicas: i32,
    /// CPU and memory for each replica (quantities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "resources_schema")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for ComponentSpec {
    fn default() -> Self {
        Self {
            image: None,
            replicas: default_component_replicas(),
            resources: None,
        }
    }
}

fn default_etcd_image() -> String {
    DEFAULT_ETCD_IMAGE.to_string()
}
fn default_heartbeat_ms() -> i32 {
    100
}
fn default_election_ms() -> i32 {
    1000
}
fn default_storage_size() -> Quantity {
    Quantity("10Gi".to_string())
}
fn default_component_replicas() -> i32 {
    2
}

impl Default for EtcdSpec {
    fn default() -> Self {
        Self {
            image: default_etcd_image(),
            resources: None,
            storage: StorageSpec::default(),
            heartbeat_interval_ms: default_heartbeat_ms(),
            election_timeout_ms: default_election_ms(),
        }
    }
}

/// What deleting a GeoCluster does to the volumes.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeletionPolicy {
    /// Keep every PersistentVolumeClaim.
    #[default]
    Retain,
    /// Delete the PersistentVolumeClaims with the workloads.
    Delete,
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
