//! GeoCluster → RegionGroups: one data group per managed region, plus that
//! region's share of the directory group.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use tern_crds::{ClusterMember, GeoCluster, GroupRole, RegionGroup, RegionGroupSpec, RegionSpec};

use crate::build::{components, network};
use crate::names;
use crate::regions::RegionFilter;

/// Everything a GeoCluster reconcile applies, for the regions this operator
/// manages: a pure function of the spec and the operator's flags.
#[derive(Clone, Debug)]
pub struct Desired {
    /// The managed regions of the spec, in spec order.
    pub regions: Vec<String>,
    /// Data groups and directory shares, in region order.
    pub groups: Vec<RegionGroup>,
    /// The agents' ServiceAccount, Role and RoleBinding; none when no
    /// region of the spec is managed here.
    pub agent_identity: Option<(ServiceAccount, Role, RoleBinding)>,
    /// Per managed region: router Service, router and agent Deployments.
    pub components: Vec<RegionComponents>,
    /// Per managed region, its NetworkPolicies (spec.networkPolicy).
    pub network_policies: Vec<NetworkPolicy>,
}

/// The tern components of one region.
#[derive(Clone, Debug)]
pub struct RegionComponents {
    pub region: String,
    pub router_service: Service,
    pub router: Deployment,
    pub agent: Deployment,
}

impl Desired {
    /// What `gc` asks of an operator managing `managed`, with these default
    /// images for components whose spec names none; the operator's pods run
    /// in `operator_namespace`.
    pub fn of(
        gc: &GeoCluster,
        managed: &RegionFilter,
        router_image: &str,
        agent_image: &str,
        operator_namespace: &str,
    ) -> Self {
        let here: Vec<&RegionSpec> = gc.spec.regions.iter().filter(|r| managed.contains(&r.name)).collect();
        let components = here
            .iter()
            .map(|region| {
                let (router, router_service) = components::router_objects(gc, region, router_image);
                RegionComponents {
                    region: region.name.clone(),
                    router_service,
                    router,
                    agent: components::agent_deployment(gc, region, agent_image),
                }
            })
            .collect();
        Self {
            regions: here.iter().map(|r| r.name.clone()).collect(),
            groups: region_groups(gc, managed),
            agent_identity: (!here.is_empty()).then(|| components::agent_identity(gc)),
            components,
            network_policies: here
                .iter()
                .flat_map(|r| network::policies(gc, &r.name, operator_namespace))
                .collect(),
        }
    }

    /// Whether a managed region's components are wanted.
    pub fn has_region(&self, region: &str) -> bool {
        self.regions.iter().any(|r| r == region)
    }
}

/// The RegionGroups this operator should run for `gc`, in region order.
pub fn region_groups(gc: &GeoCluster, managed: &RegionFilter) -> Vec<RegionGroup> {
    let directory_peers = directory_members(gc);
    let mut groups = Vec::new();
    for region in gc.spec.regions.iter().filter(|r| managed.contains(&r.name)) {
        groups.push(group(
            gc,
            region,
            GroupRole::Data,
            region.replicas,
            data_members(gc, region),
        ));
        if let Some(count) = directory_count(gc, &region.name) {
            groups.push(group(gc, region, GroupRole::Directory, count, directory_peers.clone()));
        }
    }
    groups
}

/// Directory members hosted in `region`, if any.
pub fn directory_count(gc: &GeoCluster, region: &str) -> Option<i32> {
    gc.spec
        .directory
        .members
        .iter()
        .find(|m| m.region == region)
        .map(|m| m.replicas)
}

fn group(
    gc: &GeoCluster,
    region: &RegionSpec,
    role: GroupRole,
    replicas: i32,
    initial_cluster: Vec<ClusterMember>,
) -> RegionGroup {
    let cluster = gc.name_any();
    let name = names::group_name(&cluster, &region.name, role);
    let mut etcd = gc.spec.etcd.clone();
    if role == GroupRole::Directory {
        // The directory's members are regions apart: its Raft timing follows
        // the cross-region round trip, not the zone-to-zone one.
        etcd.heartbeat_interval_ms = gc.spec.directory.heartbeat_interval_ms;
        etcd.election_timeout_ms = gc.spec.directory.election_timeout_ms;
    }
    RegionGroup {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: gc.namespace(),
            labels: Some(names::group_labels(&cluster, &region.name, role, &name)),
            owner_references: gc.controller_owner_ref(&()).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        spec: RegionGroupSpec {
            geo_cluster: cluster.clone(),
            region: region.name.clone(),
            role,
            zones: region.zones.clone(),
            replicas,
            node_selector: node_selector(region),
            cluster_domain: cluster_domain(region).to_string(),
            initial_cluster,
            cluster_token: cluster_token(gc, region, role),
            etcd,
            deletion_policy: gc.spec.deletion_policy,
            tls: gc.spec.tls.as_ref().map(|t| tern_crds::GroupTlsSpec {
                member_secret: t.etcd_secret(),
                client_secret: t.operator_secret(),
            }),
            // The directory is backed up by the first region's agent
            // (`components::agent_args`), asked through the directory.
            pre_upgrade_backup: gc.spec.backup.is_some()
                && gc
                    .annotations()
                    .get(names::ANNOTATION_SKIP_PRE_UPGRADE_BACKUP)
                    .map(String::as_str)
                    != Some("true"),
            // A directory share is restored from the directory's backup:
            // every share, in every cluster, from the same one.
            restore: match role {
                GroupRole::Data => region.restore_from.as_ref(),
                GroupRole::Directory => gc.spec.directory.restore_from.as_ref(),
            }
            .zip(gc.spec.backup.as_ref())
            .map(|(backup, b)| tern_crds::GroupRestore {
                claim_name: b.claim_name.clone(),
                backup: backup.clone(),
            }),
        },
        status: None,
    }
}

/// The node labels that pin a region's pods: the spec's, or the well-known
/// region label.
pub fn node_selector(region: &RegionSpec) -> BTreeMap<String, String> {
    region
        .node_selector
        .clone()
        .unwrap_or_else(|| BTreeMap::from([("topology.kubernetes.io/region".to_string(), region.name.clone())]))
}

fn cluster_domain(region: &RegionSpec) -> &str {
    region
        .cluster_domain
        .as_deref()
        .unwrap_or(names::DEFAULT_CLUSTER_DOMAIN)
}

/// The same token in every cluster that applies this GeoCluster, so that the
/// directory members of different clusters form one group; different for
/// every group, so that members of two groups never join each other.
fn cluster_token(gc: &GeoCluster, region: &RegionSpec, role: GroupRole) -> String {
    let namespace = gc.namespace().unwrap_or_default();
    match role {
        GroupRole::Data => format!("tern-{namespace}-{}-{}", gc.name_any(), region.name),
        GroupRole::Directory => format!("tern-{namespace}-{}-directory", gc.name_any()),
    }
}

/// (member name, stable DNS name) of every member of a group.
fn member_hosts(gc: &GeoCluster, region: &RegionSpec, role: GroupRole, count: i32) -> Vec<(String, String)> {
    let namespace = gc.namespace().unwrap_or_default();
    let group = names::group_name(&gc.name_any(), &region.name, role);
    (0..count)
        .map(|i| {
            let member = names::member_name(&group, i);
            let host = names::member_host(&group, &member, &namespace, cluster_domain(region));
            (member, host)
        })
        .collect()
}

fn peers(gc: &GeoCluster, region: &RegionSpec, role: GroupRole, count: i32) -> Vec<ClusterMember> {
    member_hosts(gc, region, role, count)
        .into_iter()
        .map(|(name, host)| ClusterMember {
            peer_url: format!("{}://{host}:{}", names::scheme(gc.spec.tls.is_some()), names::PEER_PORT),
            name,
        })
        .collect()
}

/// Client URLs of every directory member, in every region.
pub fn directory_client_urls(gc: &GeoCluster) -> Vec<String> {
    directory_regions(gc)
        .flat_map(|(region, count)| member_hosts(gc, region, GroupRole::Directory, count))
        .map(|(_, host)| {
            format!(
                "{}://{host}:{}",
                names::scheme(gc.spec.tls.is_some()),
                names::CLIENT_PORT
            )
        })
        .collect()
}

/// The regions that host directory members, with their member counts.
fn directory_regions(gc: &GeoCluster) -> impl Iterator<Item = (&RegionSpec, i32)> {
    gc.spec
        .directory
        .members
        .iter()
        .filter_map(|m| Some((gc.spec.regions.iter().find(|r| r.name == m.region)?, m.replicas)))
}

fn data_members(gc: &GeoCluster, region: &RegionSpec) -> Vec<ClusterMember> {
    peers(gc, region, GroupRole::Data, region.replicas)
}

/// Every directory member in every region, with peer URLs in each region's
/// cluster domain.
pub fn directory_members(gc: &GeoCluster) -> Vec<ClusterMember> {
    directory_regions(gc)
        .flat_map(|(region, count)| peers(gc, region, GroupRole::Directory, count))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::testing::{example, with_backups};

    #[test]
    fn desired_covers_only_the_managed_regions() {
        let gc = example();
        let d = Desired::of(
            &gc,
            &RegionFilter::only(["eu-west"]),
            "router:1",
            "agent:1",
            "tern-system",
        );
        assert_eq!(d.regions, vec!["eu-west".to_string()]);
        assert!(d.groups.iter().all(|g| g.spec.region == "eu-west"));
        assert_eq!(d.components.len(), 1);
        assert_eq!(
            d.components[0].router.metadata.name.as_deref(),
            Some("payments-router-eu-west")
        );
        assert!(d.agent_identity.is_some());
        assert!(d.has_region("eu-west") && !d.has_region("us-east"));
        let none = Desired::of(
            &gc,
            &RegionFilter::only(["mars-1"]),
            "router:1",
            "agent:1",
            "tern-system",
        );
        assert!(none.groups.is_empty() && none.components.is_empty() && none.agent_identity.is_none());
    }

    #[test]
    fn one_data_group_and_one_directory_share_per_region() {
        let groups = region_groups(&example(), &RegionFilter::all());
        let names: Vec<String> = groups
            .iter()
            .map(|g| g.metadata.name.clone().unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "payments-us-east",
                "payments-dir-us-east",
                "payments-eu-west",
                "payments-dir-eu-west",
                "payments-ap-south",
                "payments-dir-ap-south"
            ]
        );
        for g in &groups {
            let owner = &g.metadata.owner_references.as_ref().expect("owned")[0];
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str(), owner.controller),
                ("GeoCluster", "payments", Some(true))
            );
        }
    }

    #[test]
    fn every_group_asks_for_a_pre_upgrade_backup_when_the_cluster_backs_up() {
        let mut gc = example();
        let asks = |gc: &GeoCluster| -> Vec<(GroupRole, bool)> {
            region_groups(gc, &RegionFilter::all())
                .iter()
                .map(|g| (g.spec.role, g.spec.pre_upgrade_backup))
                .collect()
        };
        assert!(asks(&gc).iter().all(|(_, ask)| !ask), "no backup volume, nobody to ask");
        with_backups(&mut gc);
        // The directory's shares too: the first region's agent backs the
        // directory up, asked through the directory.
        assert!(asks(&gc).iter().all(|(_, ask)| *ask));
        assert!(asks(&gc).iter().any(|(role, _)| *role == GroupRole::Directory));
        // The way past a backup that cannot be taken.
        gc.annotations_mut()
            .insert(names::ANNOTATION_SKIP_PRE_UPGRADE_BACKUP.into(), "true".into());
        assert!(asks(&gc).iter().all(|(_, ask)| !ask));
    }

    #[test]
    fn only_the_named_regions_data_group_is_restored() {
        let mut gc = example();
        with_backups(&mut gc);
        gc.spec.regions[0].restore_from = Some(format!("{}-20261203T113457.236Z", gc.spec.regions[0].name));
        let restored: Vec<_> = region_groups(&gc, &RegionFilter::all())
            .into_iter()
            .filter_map(|g| g.spec.restore.map(|r| (g.spec.region, g.spec.role, r)))
            .collect();
        assert_eq!(restored.len(), 1, "{restored:?}");
        let (region, role, restore) = &restored[0];
        assert_eq!((region, *role), (&gc.spec.regions[0].name, GroupRole::Data));
        assert_eq!(restore.claim_name, "tern-backups");
        assert_eq!(
            restore.backup,
            gc.spec.regions[0].restore_from.clone().expect("set above")
        );
    }

    #[test]
    fn every_directory_share_is_restored_from_the_directorys_backup() {
        let mut gc = example();
        with_backups(&mut gc);
        let backup = "directory-20261203T113457.236Z".to_string();
        gc.spec.directory.restore_from = Some(backup.clone());
        let groups = region_groups(&gc, &RegionFilter::all());
        let shares: Vec<&RegionGroup> = groups.iter().filter(|g| g.spec.role == GroupRole::Directory).collect();
        assert_eq!(shares.len(), gc.spec.directory.members.len());
        for share in &shares {
            let restore = share.spec.restore.as_ref().expect("a share restored");
            assert_eq!(restore.backup, backup);
            // Every share knows every member of the directory.
            assert_eq!(share.spec.initial_cluster, shares[0].spec.initial_cluster);
        }
        assert!(
            groups
                .iter()
                .filter(|g| g.spec.role == GroupRole::Data)
                .all(|g| g.spec.restore.is_none()),
            "data groups follow their own restoreFrom"
        );
    }

    #[test]
    fn region_filter_limits_the_groups() {
        let groups = region_groups(&example(), &RegionFilter::only(["eu-west"]));
        assert_eq!(groups.len(), 2);
        assert!(groups.iter().all(|g| g.spec.region == "eu-west"));
    }

    #[test]
    fn directory_spans_regions_with_their_cluster_domains_and_one_token() {
        let mut gc = example();
        gc.spec.regions[1].cluster_domain = Some("eu.example".into());
        let groups = region_groups(&gc, &RegionFilter::all());
        let dirs: Vec<_> = groups.iter().filter(|g| g.spec.role == GroupRole::Directory).collect();
        assert_eq!(dirs.len(), 3);
        let peers = &dirs[0].spec.initial_cluster;
        assert_eq!(peers.len(), 3);
        assert_eq!(
            peers[1].peer_url,
            "http://payments-dir-eu-west-0.payments-dir-eu-west-peer.default.svc.eu.example:2380"
        );
        assert!(
            dirs.iter()
                .all(|d| d.spec.initial_cluster == *peers && d.spec.cluster_token == dirs[0].spec.cluster_token)
        );
        assert_eq!(
            dirs[0].spec.etcd.heartbeat_interval_ms,
            gc.spec.directory.heartbeat_interval_ms
        );
        let data: Vec<_> = groups.iter().filter(|g| g.spec.role == GroupRole::Data).collect();
        assert_ne!(data[0].spec.cluster_token, data[1].spec.cluster_token);
        assert_eq!(data[0].spec.initial_cluster.len(), 3);
        assert_eq!(data[0].spec.node_selector["topology.kubernetes.io/region"], "us-east");
    }
}
