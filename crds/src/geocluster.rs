//! `GeoCluster`: one geo-partitioned database, its regions, its directory group
//! and its policies. The operator turns it into one `RegionGroup` per region
//! (plus that region's share of the directory group).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use tern_common::limits;

use crate::common::{
    CLUSTER_NAME_PATTERN, ComponentSpec, DNS_SUBDOMAIN_PATTERN, DeletionPolicy, EtcdSpec, GroupPhase, MAX_CLUSTER_NAME,
    MAX_REGION_NAME, REGION_NAME_PATTERN, ZONE_PATTERN, duration_rule,
};

/// Desired state of a geo-partitioned database.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "tern.dev",
    version = "v1alpha1",
    kind = "GeoCluster",
    namespaced,
    status = "GeoClusterStatus",
    shortname = "geo",
    category = "tern",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Regions","type":"string","description":"Regions whose groups are ready, of those this operator manages","jsonPath":".status.readyRegions"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Failed","type":"string","description":"Regions failed over to a successor","jsonPath":".status.regions[?(@.serving==\"Failed\")].name"}"#,
    printcolumn = r#"{"name":"Draining","type":"string","description":"Regions draining (their accounts move out)","jsonPath":".status.regions[?(@.serving==\"Draining\")].name"}"#,
    printcolumn = r#"{"name":"Failover","type":"string","priority":1,"jsonPath":".spec.failover.mode"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new(format!("self.metadata.name.size() <= {MAX_CLUSTER_NAME}")).message(kube::core::Message::Message(format!("metadata.name must be at most {MAX_CLUSTER_NAME} characters: it is part of the names of every child object and DNS name"))).reason(Reason::FieldValueInvalid),
    validation = Rule::new(format!("self.metadata.name.matches('{CLUSTER_NAME_PATTERN}')")).message("metadata.name must start with a lower-case letter and contain only lower-case letters, digits and '-' (no dots), ending in a letter or digit: it starts the names of Services, which must be RFC 1035 labels").reason(Reason::FieldValueInvalid),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.directory.members.all(m, self.regions.exists(r, r.name == m.region))")
        .message("every directory member region must be one of spec.regions")
        .field_path(".directory.members"),
    validation = Rule::new("!has(self.failover) || self.failover.successors.all(s, self.regions.exists(r, r.name == s.region) && s.order.all(o, self.regions.exists(r, r.name == o)))")
        .message("every region and successor in failover.successors must be one of spec.regions")
        .field_path(".failover.successors"),
    validation = Rule::new("has(self.tls) == has(oldSelf.tls)")
        .message("tls cannot be turned on or off on a running GeoCluster: every member's peer and client URLs would change scheme at once, which etcd cannot do in place; build a new GeoCluster and restore a backup into it")
        .field_path(".tls"),
    validation = Rule::new("self.regions.all(r, !self.regions.exists(o, r.name == 'dir-' + o.name))")
        .message("no region may be named dir-<another region>: its data group would have the name of that region's directory group")
        .field_path(".regions"),
    validation = Rule::new("!has(self.telemetry) || !self.telemetry.otlpEndpoint.startsWith('https://') || has(self.tls)")
        .message("an https:// telemetry.otlpEndpoint needs spec.tls: the routers and agents present their certificates to the collector and check its certificate against spec.tls's CA")
        .field_path(".telemetry.otlpEndpoint"),
    validation = Rule::new("has(self.backup) || !self.regions.exists(r, has(r.restoreFrom))")
        .message("regions[].restoreFrom needs spec.backup: a restore reads the backup from spec.backup's claim")
        .field_path(".regions"),
    validation = Rule::new("has(self.backup) || !has(self.directory.restoreFrom)")
        .message("directory.restoreFrom needs spec.backup: a restore reads the backup from spec.backup's claim")
        .field_path(".directory.restoreFrom"),
)]
pub struct GeoClusterSpec {
    /// The regions of the database. Each gets its own Raft group (an etcd
    /// cluster with members spread over the region's zones) that holds the
    /// accounts homed there.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub regions: Vec<RegionSpec>,
    /// Placement of the global directory group, which stores account
    /// placements, region records, region leases and migration intents.
    pub directory: DirectorySpec,
    /// Moving an account's home to the region its writes come from.
    #[serde(default)]
    pub follow_the_sun: FollowTheSunSpec,
    /// What happens when a region is lost.
    #[serde(default)]
    pub failover: FailoverSpec,
    /// Settings of the etcd members of every region group.
    #[serde(default)]
    pub etcd: EtcdSpec,
    /// The geo-aware routers, one Deployment per region.
    #[serde(default)]
    pub router: RouterSpec,
    /// The region agents (mirrors, lag, migrations, failover), one Deployment
    /// per region with one active replica.
    #[serde(default)]
    pub agent: ComponentSpec,
    /// What deleting the GeoCluster does to the members' volumes: `Retain`
    /// (default) keeps every PersistentVolumeClaim, so data is deleted only
    /// when asked for; `Delete` removes them.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Where components send OpenTelemetry traces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<TelemetrySpec>,
    /// Scheduled backups of the region groups (and the directory's), taken
    /// by the region agents. Unset: none (`tern backup now` still works).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,
    /// Mutual TLS on every link: etcd clients and peers, routers and their
    /// clients, router to router, agents. Unset: plain TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// NetworkPolicies for this cluster's regions: the etcd members take
    /// client and peer connections only from tern's own pods, the
    /// operator and `peerCidrs`; the routers' API only from `clients`,
    /// tern's pods and `peerCidrs`. Ops ports (metrics, probes) stay open.
    /// Unset: no policies (every pod may connect to every port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicySpec>,
}

/// Who may reach a GeoCluster's pods, for the NetworkPolicies the operator
/// makes per managed region.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Who may call the routers' API (port 7400), besides tern's own pods.
    /// Empty: anyone that reaches the pods (with spec.tls, only holders of
    /// a client certificate get past the handshake).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub clients: Vec<NetworkPeer>,
    /// Address ranges that the other regions' clusters connect from: their
    /// pod networks, or their nodes' addresses where those clusters
    /// masquerade. Cross-region traffic comes from there: forwarded writes
    /// to the routers, mirrors and the directory to the etcd members.
    /// Needed whenever regions of this GeoCluster run in other clusters
    /// (the operator refuses the spec otherwise); empty for one cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message("every peerCidrs entry must be a CIDR, such as 10.245.0.0/16"))]
    pub peer_cidrs: Vec<String>,
}

/// One allowed source: pods by labels (in namespaces by labels, or in the
/// GeoCluster's namespace), or an address range.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.cidr) != (has(self.namespaceSelector) || has(self.podSelector))")
        .message("a client is either a cidr or selectors (namespaceSelector, podSelector): not both, not neither")
)]
pub struct NetworkPeer {
    /// Namespaces whose labels match all of these (`{}`: every namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<BTreeMap<String, String>>,
    /// Pods whose labels match all of these (`{}`: every pod); in the
    /// GeoCluster's namespace unless namespaceSelector is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<BTreeMap<String, String>>,
    /// An address range, such as 10.0.0.0/8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("cidr must be a CIDR, such as 10.0.0.0/8"))]
    pub cidr: Option<String>,
}

/// Where the certificates come from: Secrets in the GeoCluster's namespace,
/// each with `ca.crt`, `tls.crt` and `tls.key` (what a cert-manager
/// Certificate writes), named after one prefix:
/// `<prefix>-etcd` (every member of every group: serving and peer, with
/// the members' and client Services' names), `<prefix>-router-<region>`
/// (URI SAN `spiffe://tern/router/<region>`, DNS the router Service's
/// name), `<prefix>-agent-<region>`, and `<prefix>-operator` (what the
/// operator dials etcd with). Every certificate must chain to the same CA;
/// etcd then refuses every client without one. A renewed Secret is picked
/// up without restarts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// The Secrets' common prefix.
    #[schemars(length(min = 1, max = 180), regex(pattern = crate::common::DNS_SUBDOMAIN_PATTERN))]
    pub secret_prefix: String,
}

impl TlsSpec {
    /// The Secret of every etcd member.
    pub fn etcd_secret(&self) -> String {
        format!("{}-etcd", self.secret_prefix)
    }
    /// The Secret the operator dials etcd with.
    pub fn operator_secret(&self) -> String {
        format!("{}-operator", self.secret_prefix)
    }
    /// The Secret of `region`'s routers.
    pub fn router_secret(&self, region: &str) -> String {
        format!("{}-router-{region}", self.secret_prefix)
    }
    /// The Secret of `region`'s agents.
    pub fn agent_secret(&self, region: &str) -> String {
        format!("{}-agent-{region}", self.secret_prefix)
    }
}

/// One region and its Raft group.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.restoreFrom) || self.restoreFrom.matches('^' + self.name + '-[0-9]{8}T[0-9]{6}[.][0-9]{3}Z$')")
        .message("restoreFrom must be a backup of this region: the region's name, '-' and the time the backup began (tern backup list shows them)")
        .field_path(".restoreFrom")
)]
pub struct RegionSpec {
    /// Region name: a DNS label of at most 20 characters (`us-east`). It names
    /// the region's group, its objects and its etcd members.
    #[schemars(length(min = 1, max = MAX_REGION_NAME), regex(pattern = REGION_NAME_PATTERN))]
    pub name: String,
    /// Availability zones of the region (values of the nodes'
    /// `topology.kubernetes.io/zone` label). Members are spread evenly over them.
    #[schemars(
        length(min = 1, max = 8),
        inner(
            length(min = 1, max = 63),
            regex(pattern = ZONE_PATTERN)
        )
    )]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub zones: Vec<String>,
    /// Members of the region's Raft group: odd, 1 to 7, so that a majority
    /// survives the loss of a minority of zones. May change: the operator
    /// grows or shrinks the group one member at a time as a Raft
    /// membership change (the RegionGroup's status.membershipChange).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = limits::GROUP_REPLICAS.0, max = limits::GROUP_REPLICAS.1))]
    #[x_kube(
        validation = Rule::new("self % 2 == 1").message("replicas must be odd (1, 3, 5 or 7): an even count adds a member without tolerating one more failure")
    )]
    pub replicas: i32,
    /// Node labels that pin the region's pods to its nodes. Defaults to
    /// `topology.kubernetes.io/region: <name>`. Keys are label keys, values
    /// label values; at most 16 entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::common::node_selector_schema")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// DNS domain of the Kubernetes cluster that runs this region
    /// (`cluster.local` when unset). Peer URLs of directory members are built
    /// with it, so that pods of other clusters can reach this region's members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = DNS_SUBDOMAIN_PATTERN)
    )]
    pub cluster_domain: Option<String>,
    /// Planned switchover: move every account homed here to other regions
    /// with the migration protocol (nothing is lost), take no new accounts
    /// and no moves in. Setting it back to false undrains the region:
    /// moves under way finish, and accounts may come back (moved by hand or
    /// by follow the sun). Progress: `status.regions[].drain`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drain: bool,
    /// Start the region's group from this backup instead of empty: the id
    /// of a backup of this region in spec.backup's claim (`tern backup
    /// list`), e.g. `us-east-20261203T113457.236Z`. Read only when the
    /// group has no members: when it is created, or after its StatefulSet
    /// and volumes were deleted (a region group lost). A group is restored
    /// from a given backup once (the RegionGroup's status.restore). Writes
    /// the group acknowledged after the backup began are lost. Its accounts
    /// are reached through the directory: restore a lost group of a running
    /// GeoCluster, or a whole GeoCluster with directory.restoreFrom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 22, max = 80), regex(pattern = limits::BACKUP_ID_PATTERN))]
    pub restore_from: Option<String>,
}

fn default_replicas() -> i32 {
    3
}

/// Where the directory group's members live.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.electionTimeoutMs >= 10 * self.heartbeatIntervalMs")
        .message("electionTimeoutMs must be at least 10 times heartbeatIntervalMs across regions")
        .field_path(".electionTimeoutMs"),
    validation = Rule::new("self.members.map(m, m.replicas).sum() % 2 == 1")
        .message("the directory group's members (the sum of members[].replicas) must be odd, so that a majority survives the loss of a minority")
        .field_path(".members"),
    validation = Rule::new(format!("self.members.map(m, m.replicas).sum() <= {}", limits::MAX_GROUP_MEMBERS))
        .message(kube::core::Message::Message(format!("the directory group may have at most {} members in all", limits::MAX_GROUP_MEMBERS)))
        .field_path(".members"),
    validation = Rule::new("!has(self.restoreFrom) || self.restoreFrom.matches('^directory-[0-9]{8}T[0-9]{6}[.][0-9]{3}Z$')")
        .message("restoreFrom must name a backup of the directory group: 'directory-' and the time the backup began (tern backup list --to DIR directory)")
        .field_path(".restoreFrom"),
)]
pub struct DirectorySpec {
    /// Directory members per region, an odd number in all. Spread them over
    /// at least three regions so that the loss of one region keeps a
    /// majority.
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["region".into()]))]
    pub members: Vec<DirectoryMembers>,
    /// Raft heartbeat interval of the directory group in milliseconds. Its
    /// members are in different regions, so it should be about one
    /// cross-region round trip.
    #[serde(default = "default_directory_heartbeat_ms")]
    #[schemars(range(min = 10, max = 5000))]
    pub heartbeat_interval_ms: i32,
    /// Raft election timeout of the directory group in milliseconds: at least
    /// ten heartbeats across regions.
    #[serde(default = "default_directory_election_ms")]
    #[schemars(range(min = 100, max = 50000))]
    pub election_timeout_ms: i32,
    /// Start the directory from this backup instead of empty: the id of a
    /// directory backup in spec.backup's claim (`tern backup list`), e.g.
    /// `directory-20261203T113457.236Z`. For a GeoCluster restored whole,
    /// with its regions' restoreFrom: every region's operator restores its
    /// share of the directory's members from the same backup, so the same
    /// GeoCluster must be applied in every cluster. Read only while a
    /// share has no members, and refused by the operator while a region
    /// group of this cluster runs on data of its own: a directory put back
    /// in time under live regions would lose their placements since the
    /// backup. Writes the directory acknowledged after the backup began
    /// (accounts created, moves) are lost, and reported per region once
    /// the regions' fences are compared with it (docs/backup.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 22, max = 80), regex(pattern = limits::BACKUP_ID_PATTERN))]
    pub restore_from: Option<String>,
}

fn default_directory_heartbeat_ms() -> i32 {
    250
}
fn default_directory_election_ms() -> i32 {
    2500
}

/// The directory members that one region hosts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DirectoryMembers {
    /// A region of `spec.regions`.
    #[schemars(length(min = 1, max = MAX_REGION_NAME), regex(pattern = REGION_NAME_PATTERN))]
    pub region: String,
    /// Directory members in that region. Fixed once created: the directory
    /// is one Raft group across regions, and tern changes the membership
    /// only of a region's own data group.
    #[serde(default = "default_directory_replicas")]
    #[schemars(range(min = 1, max = 5))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("directory replicas cannot be changed: the directory is one Raft group across regions, and tern changes the membership only of a region's own data group (a new member would start as a new cluster and never join; a removed one would stay a voter); keep the size, or build a new GeoCluster with the directory you need"))]
    pub replicas: i32,
}

fn default_directory_replicas() -> i32 {
    1
}

/// The routers: their Deployment, and how they write to their region's group.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    #[serde(flatten)]
    pub component: ComponentSpec,
    /// How long an idempotency key is remembered, as a duration from 1s to
    /// 2160h (90 days). A retry with the same key within it returns the
    /// first result; after it the key is new again.
    #[serde(default = "default_idempotency_retention")]
    #[schemars(length(min = 2, max = 32), regex(pattern = limits::DURATION_PATTERN))]
    #[x_kube(validation = duration_rule("idempotencyRetention", limits::IDEMPOTENCY_RETENTION))]
    pub idempotency_retention: String,
    /// Most writes that share one etcd transaction (group commit; each keeps
    /// its own fence compare and outcome). 1 sends every write alone.
    #[serde(default = "default_write_batch_max")]
    #[schemars(range(min = limits::WRITE_BATCH_MAX.0, max = limits::WRITE_BATCH_MAX.1))]
    pub write_batch_max: i32,
    /// Group-commit transactions in flight at once per router. 1 makes the
    /// largest batches; raise it where commits wait on slow disks.
    #[serde(default = "default_write_batches_in_flight")]
    #[schemars(range(min = limits::WRITE_BATCHES_IN_FLIGHT.0, max = limits::WRITE_BATCHES_IN_FLIGHT.1))]
    pub write_batches_in_flight: i32,
    /// Send requests to the region group's Raft leader instead of through
    /// any member (which forwards writes to the leader).
    #[serde(default = "default_true")]
    pub group_leader_direct: bool,
    /// Name of the Secret (key `token`, 16 to 256 visible ASCII characters)
    /// whose token the routers share: only a call that carries it may claim
    /// to be forwarded by another region's router. Default
    /// `<geocluster>-router-peer-token`, created by the operator with a
    /// random token when missing (never overwritten). In a multi-cluster
    /// deployment create the same Secret in every cluster first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub peer_token_secret: Option<String>,
}

impl Default for RouterSpec {
    fn default() -> Self {
        Self {
            component: ComponentSpec::default(),
            idempotency_retention: default_idempotency_retention(),
            write_batch_max: default_write_batch_max(),
            write_batches_in_flight: default_write_batches_in_flight(),
            group_leader_direct: true,
            peer_token_secret: None,
        }
    }
}

/// The key of the peer token in its Secret.
pub const PEER_TOKEN_KEY: &str = "token";

impl crate::GeoCluster {
    /// The Secret that holds the routers' peer token.
    pub fn peer_token_secret(&self) -> String {
        self.spec
            .router
            .peer_token_secret
            .clone()
            .unwrap_or_else(|| format!("{}-router-peer-token", kube::ResourceExt::name_any(self)))
    }
}

fn default_idempotency_retention() -> String {
    "24h".into()
}
fn default_write_batch_max() -> i32 {
    32
}
fn default_write_batches_in_flight() -> i32 {
    1
}
fn default_true() -> bool {
    true
}

/// Follow-the-sun policy: an account moves to the region its writes come from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FollowTheSunSpec {
    /// Whether agents move accounts automatically.
    #[serde(default)]
    pub enabled: bool,
    /// Writes from one region within `window` needed before a move is
    /// considered.
    #[serde(default = "default_threshold")]
    #[schemars(range(min = 1, max = 1000000))]
    pub threshold: i32,
    /// Sliding window over which writes are counted, as a duration from 1m
    /// to 2160h (`24h`).
    #[serde(default = "default_window")]
    #[schemars(length(min = 2, max = 32), regex(pattern = limits::DURATION_PATTERN))]
    #[x_kube(validation = duration_rule("window", limits::FOLLOW_THE_SUN_WINDOW))]
    pub window: String,
    /// Minimum time between two moves of the same account, as a duration
    /// from 1s to 2160h.
    #[serde(default = "default_cooldown")]
    #[schemars(length(min = 2, max = 32), regex(pattern = limits::DURATION_PATTERN))]
    #[x_kube(validation = duration_rule("cooldown", limits::FOLLOW_THE_SUN_COOLDOWN))]
    pub cooldown: String,
    /// Only report the moves that would be made, as events and metrics.
    #[serde(default)]
    pub dry_run: bool,
    /// Most automatic migrations a region starts per minute.
    #[serde(default = "default_max_migrations")]
    #[schemars(range(min = 1, max = 600))]
    pub max_migrations_per_minute: i32,
}

impl Default for FollowTheSunSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            threshold: default_threshold(),
            window: default_window(),
            cooldown: default_cooldown(),
            dry_run: false,
            max_migrations_per_minute: default_max_migrations(),
        }
    }
}

fn default_threshold() -> i32 {
    3
}
fn default_window() -> String {
    "24h".into()
}
fn default_cooldown() -> String {
    "1h".into()
}
fn default_max_migrations() -> i32 {
    6
}

/// Failover policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FailoverSpec {
    /// `Manual` (default): a lost region's accounts move only when an operator
    /// says so. `Automatic`: the successor takes over when the lost region's
    /// lease expires, within the data-loss budget.
    #[serde(default)]
    pub mode: FailoverMode,
    /// Successor order per region: who takes a lost region's accounts over.
    #[serde(default)]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["region".into()]))]
    pub successors: Vec<SuccessorOrder>,
    /// Data-loss budget: automatic failover is refused while the last measured
    /// mirror lag of the lost region at its successor exceeds this duration
    /// (1ms to 1h).
    #[serde(default = "default_max_data_loss_lag")]
    #[schemars(length(min = 2, max = 32), regex(pattern = limits::DURATION_PATTERN))]
    #[x_kube(validation = duration_rule("maxDataLossLag", limits::MAX_DATA_LOSS_LAG))]
    pub max_data_loss_lag: String,
}

impl Default for FailoverSpec {
    fn default() -> Self {
        Self {
            mode: FailoverMode::default(),
            successors: Vec::new(),
            max_data_loss_lag: default_max_data_loss_lag(),
        }
    }
}

fn default_max_data_loss_lag() -> String {
    "5s".into()
}

/// Whether failover happens without a person.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailoverMode {
    /// The successor takes over when the lost region's lease expires.
    Automatic,
    /// Failover waits for an operator.
    #[default]
    Manual,
}

/// Successors of one region, most preferred first.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(self.region in self.order)")
        .message("a region cannot be its own successor")
        .field_path(".order")
)]
pub struct SuccessorOrder {
    /// The region that may be lost.
    #[schemars(length(min = 1, max = MAX_REGION_NAME), regex(pattern = REGION_NAME_PATTERN))]
    pub region: String,
    /// Regions that take its accounts over, in order of preference.
    #[schemars(
        length(min = 1, max = 15),
        inner(length(min = 1, max = MAX_REGION_NAME), regex(pattern = REGION_NAME_PATTERN))
    )]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub order: Vec<String>,
}

/// Trace export settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    /// OTLP/gRPC endpoint that components export traces to
    /// (`http://collector:4317`). `https://` needs spec.tls: routers and
    /// agents then export over mutual TLS, and the collector's certificate
    /// must chain to spec.tls's CA and name the endpoint's host.
    #[schemars(length(min = 1, max = 512), regex(pattern = limits::OTLP_ENDPOINT_PATTERN))]
    pub otlp_endpoint: String,
    /// Fraction of root traces sampled, 0 to 1; children follow their parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sampling_ratio: Option<f64>,
}

/// Scheduled backups: while it leads, each region's agent writes an etcd
/// snapshot of its group and a manifest into the volume, as `tern backup
/// now` does; the first region listed also backs up the directory group.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// A PersistentVolumeClaim in the GeoCluster's namespace, created by
    /// you, that every agent pod of this cluster mounts at
    /// `/var/lib/tern/backups`: one claim for all the regions this cluster
    /// runs, so it must be ReadWriteMany and reachable from each of them
    /// (agents have standbys, and a rollout starts a new pod before the old
    /// one goes). Keep it off the regions' own storage, so that losing a
    /// region does not lose its backups.
    #[schemars(length(min = 1, max = 253), regex(pattern = crate::common::DNS_SUBDOMAIN_PATTERN))]
    pub claim_name: String,
    /// Time between two backups of a group, as a duration from 1m to 720h.
    #[serde(default = "default_backup_every")]
    #[schemars(length(min = 2, max = 32), regex(pattern = limits::DURATION_PATTERN))]
    #[x_kube(validation = duration_rule("every", limits::BACKUP_EVERY))]
    pub every: String,
    /// Backups kept per group; older ones are deleted.
    #[serde(default = "default_backup_keep")]
    #[schemars(range(min = 1, max = limits::MAX_BACKUPS_KEPT))]
    pub keep: u32,
}

fn default_backup_every() -> String {
    "1h".into()
}

fn default_backup_keep() -> u32 {
    24
}

/// Observed state of a GeoCluster, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GeoClusterStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// `Ready`, `Progressing` or `Degraded`: the conditions in one word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ClusterPhase>,
    /// Ready regions out of the regions this operator manages (`2/3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_regions: Option<String>,
    /// Per-region state.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub regions: Vec<RegionStatus>,
}

/// A GeoCluster's state in one word, from its conditions.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterPhase {
    /// Every managed region's groups are ready.
    Ready,
    /// Groups are being created or rolled.
    Progressing,
    /// A group lacks members, or the spec cannot be acted on.
    Degraded,
}

impl ClusterPhase {
    /// The phase as it is written in status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::Progressing => "Progressing",
            Self::Degraded => "Degraded",
        }
    }

    /// The GeoCluster phase that a group phase (the worst of its regions)
    /// amounts to.
    pub fn of(group: GroupPhase) -> Self {
        match group {
            GroupPhase::Ready => Self::Ready,
            GroupPhase::Pending | GroupPhase::Provisioning => Self::Progressing,
            GroupPhase::Degraded | GroupPhase::Unavailable => Self::Degraded,
        }
    }
}

/// State of one region's groups.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RegionStatus {
    /// Region name.
    pub name: String,
    /// Phase of the region's data group (and its directory members).
    pub phase: GroupPhase,
    /// Members of the region's data group.
    pub members: i32,
    /// Ready members of the region's data group.
    pub ready_members: i32,
    /// Directory members hosted in the region.
    #[serde(default)]
    pub directory_members: i32,
    /// Ready directory members hosted in the region.
    #[serde(default)]
    pub directory_ready_members: i32,
    /// Written by the region's agent (field manager `tern-agent-<region>`):
    /// the active agent's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Written by the region's agent: how far this region's mirror of each
    /// other region is behind.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["source".into()]))]
    pub mirrors: Vec<MirrorLag>,
    /// Written by the region's agent: members of the region's group that are
    /// behind the leader's commit index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members_behind: Option<i32>,
    /// Written by the region's agent: the Raft leader of the region's group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_leader: Option<String>,
    /// Written by the operator from the directory (field manager
    /// `tern-operator-regions`): `Active`, `Draining` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<String>,
    /// Failed: the region that serves its accounts now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successor: Option<String>,
    /// Failed: the failover's region epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_epoch: Option<i64>,
    /// The agent holding the region's lease in the directory (its routers
    /// accept writes while it renews it), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_holder: Option<String>,
    /// Draining: how far the drain got, as the region's agent counts it.
    /// Failed: how far its successor got re-homing its accounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainStatus>,
}

/// A drain's progress (the region's agent counts, the operator copies).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DrainStatus {
    /// Accounts still homed in the region (moves under way included); the
    /// drain is done at 0.
    pub homed: i64,
    /// Moves out under way.
    pub moving: i64,
    /// Moves out completed by this drain.
    pub moved: i64,
    /// Accounts that cannot leave now (nowhere allowed to go, or their move
    /// was refused); tried again.
    pub blocked: i64,
    /// Why the first blocked account is blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl RegionStatus {
    /// Carries over the fields the region's agent owns, and those the
    /// operator's directory watcher owns, so that the group reconciler
    /// compares (and writes) only its own.
    pub fn keep_agent_fields(&mut self, from: &RegionStatus) {
        self.agent = from.agent.clone();
        self.mirrors = from.mirrors.clone();
        self.members_behind = from.members_behind;
        self.group_leader = from.group_leader.clone();
        self.serving = from.serving.clone();
        self.successor = from.successor.clone();
        self.region_epoch = from.region_epoch;
        self.lease_holder = from.lease_holder.clone();
        self.drain = from.drain.clone();
    }
}

/// Replication lag of one mirror, as the receiving region's agent measured it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MirrorLag {
    /// The mirrored (source) region.
    pub source: String,
    /// `streaming`, `resyncing`, `disconnected`, `starting` or `promoted`
    /// (a failover made this region the source's successor).
    pub state: String,
    /// How stale the mirror is, ms (never negative).
    pub lag_ms: i64,
    /// Error bound of `lagMs` and `skewMs`, ms: the truth is within
    /// `lagMs ± lagErrorMs`.
    #[serde(default)]
    pub lag_error_ms: i64,
    /// Source revisions not yet applied.
    pub lag_revisions: i64,
    /// Clock offset of the source's agent, measured from timestamped round
    /// trips, ms (positive: ahead).
    pub skew_ms: i64,
}
