//! Pieces shared by several resources: name patterns, the etcd member settings
//! and the workload settings of routers and agents.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// A region or zone name: an RFC 1123 DNS label, because it becomes part of
/// object names, DNS names and etcd member names.
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A Go-style duration such as `90s`, `15m` or `24h` (what `time.ParseDuration`
/// and `metav1.Duration` accept, without a sign).
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// An account id: letters, digits and `._:@-`, starting with a letter or digit.
/// No `/` (it would escape the account's key prefix) and no control characters.
pub const ACCOUNT_ID_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$";

/// Longest region name. Region names end up inside object names such as
/// `<cluster>-dir-<region>-peer`, which must stay within 63 characters.
pub const MAX_REGION_NAME: usize = 20;

/// Longest GeoCluster name, for the same reason as [`MAX_REGION_NAME`].
pub const MAX_CLUSTER_NAME: usize = 24;

/// Longest account id, in bytes.
pub const MAX_ACCOUNT_ID: usize = 128;

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
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// CPU and memory for each etcd member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    /// Size of each member's volume, as a Kubernetes quantity (for example `10Gi`).
    #[serde(default = "default_storage_size")]
    pub size: Quantity,
    /// StorageClass of the volumes; the cluster's default class when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
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
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Replicas per region. Routers are stateless and all serve; agents elect
    /// one active replica and keep the others on standby.
    #[serde(default = "default_component_replicas")]
    #[schemars(range(min = 1, max = 20))]
    pub replicas: i32,
    /// CPU and memory for each replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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

/// Parses a Go-style duration (`1h30m`, `250ms`) as the schema's
/// [`DURATION_PATTERN`] admits it.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    text.parse::<kube::core::Duration>()
        .ok()
        .filter(|d| !d.is_negative())
        .map(Into::into)
}
