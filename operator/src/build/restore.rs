//! A group restored from a backup (RegionGroup spec.restore): before its
//! StatefulSet exists, each member's volume claim is made under the name
//! the StatefulSet will look for, and a Job per member runs `etcdutl
//! snapshot restore` into it. The StatefulSet's pods then start with data,
//! and etcd ignores its bootstrap flags.
//!
//! Why a Job before the StatefulSet and not an init container: an init
//! container runs on every start and cannot tell a group being restored
//! from a formed group that lost one member's volume (that member must
//! rejoin empty, not from an old snapshot that has forgotten its Raft term
//! and vote). The Jobs run once, when the group has no members.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Volume, VolumeMount,
};
use kube::api::ObjectMeta;
use tern_crds::{ClusterMember, GroupRestore, GroupRole, RegionGroup};

use super::components::BACKUP_MOUNT;
use super::regiongroup::{DATA_DIR, data_claim_spec, member_claim_name, member_data_dir, meta, zone_affinity};
use crate::names;

/// Revisions of a restored group start this far above the backup's, as
/// `tern restore` does (docs/backup.md, "Why revisions are bumped"): the
/// other regions' mirrors resume from revisions of the lost group, which
/// must not be handed out again to other writes.
pub const BUMP_REVISION: u64 = 1_000_000_000;

/// How long a restore Job may take, from its start.
pub const RESTORE_DEADLINE_SECS: i64 = 3600;

/// Label on a restore Job: the backup it restores.
pub const LABEL_RESTORE: &str = "tern.dev/restore-backup";

/// The Job that restores member `member` (ordinal `ordinal`).
pub fn job_name(member: &str) -> String {
    format!("{member}-restore")
}

/// The backup's snapshot file in the claim: `<group>/<id>.db`, where the
/// group is the id without its time (`eu-west-20261202T162810.805Z`).
pub fn snapshot_path(backup: &str) -> String {
    let group = backup.rsplit_once('-').map(|(g, _)| g).unwrap_or(backup);
    format!("{BACKUP_MOUNT}/{group}/{backup}.db")
}

/// The claim of member `ordinal`, as the StatefulSet's template would make
/// it; the StatefulSet adopts it by its name.
pub fn member_claim(rg: &RegionGroup, member: &str) -> PersistentVolumeClaim {
    let mut metadata = meta(rg, member_claim_name(member));
    // Owned by the StatefulSet (its retention policy), not the group: a
    // claim owned by the RegionGroup would go with it even under the
    // Retain deletion policy.
    metadata.owner_references = None;
    PersistentVolumeClaim {
        metadata,
        spec: Some(data_claim_spec(rg)),
        ..PersistentVolumeClaim::default()
    }
}

/// The Raft members a restored group starts with, every share's for a
/// directory share (`members` are this group's own).
pub fn restored_cluster(rg: &RegionGroup, members: &[ClusterMember]) -> Vec<ClusterMember> {
    match rg.spec.role {
        GroupRole::Data => members.to_vec(),
        GroupRole::Directory => rg.spec.initial_cluster.clone(),
    }
}

/// The cluster token a group is restored with. A directory share's names
/// the backup: etcd derives the member and cluster ids from the token, so
/// shares restored (in different clusters, by different operators) from
/// different backups get different ids and refuse each other's
/// connections, rather than forming one cluster whose members hold
/// different data at the same Raft index. A data group's members are all
/// restored by one operator from one spec: its token stays.
pub fn restore_token(role: GroupRole, cluster_token: &str, backup: &str) -> String {
    match role {
        GroupRole::Data => cluster_token.to_string(),
        GroupRole::Directory => format!("{cluster_token}-{backup}"),
    }
}

/// `etcdutl snapshot restore`'s arguments that make `member` of `cluster`
/// from `snapshot` (the Job's, and the ones the tests run against real
/// etcd).
pub fn etcdutl_args(
    snapshot: &str,
    member: &ClusterMember,
    cluster: &[ClusterMember],
    token: &str,
    data_dir: &str,
) -> Vec<String> {
    let initial_cluster = cluster
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer_url))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        "snapshot".to_string(),
        "restore".to_string(),
        snapshot.to_string(),
        format!("--name={}", member.name),
        format!("--initial-cluster={initial_cluster}"),
        format!("--initial-cluster-token={token}"),
        format!("--initial-advertise-peer-urls={}", member.peer_url),
        format!("--data-dir={data_dir}"),
        format!("--bump-revision={BUMP_REVISION}"),
        // Every watch from an old revision is told the history was
        // compacted: the mirrors resynchronise instead of skipping.
        "--mark-compacted".to_string(),
    ]
}

/// The Job that restores member `ordinal` of the group's `members` (its
/// own: for a directory share, the share's). It runs the group's own etcd
/// image (etcd's images carry `etcdutl`), in the zone the member's spread
/// puts it, so that a volume bound where the Job ran is where the member
/// may run.
pub fn restore_job(rg: &RegionGroup, restore: &GroupRestore, ordinal: usize, members: &[ClusterMember]) -> Job {
    let member = &members[ordinal];
    let mut metadata = meta(rg, job_name(&member.name));
    metadata
        .labels
        .get_or_insert_default()
        .insert(LABEL_RESTORE.into(), restore.backup.clone());
    let zone = rg.spec.zones[ordinal % rg.spec.zones.len()].clone();
    let args = etcdutl_args(
        &snapshot_path(&restore.backup),
        member,
        &restored_cluster(rg, members),
        &restore_token(rg.spec.role, &rg.spec.cluster_token, &restore.backup),
        &member_data_dir(),
    );
    let container = Container {
        name: "restore".into(),
        image: Some(rg.spec.etcd.image.clone()),
        command: Some(vec!["etcdutl".into()]),
        args: Some(args),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "data".into(),
                mount_path: DATA_DIR.into(),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "backups".into(),
                mount_path: BACKUP_MOUNT.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        security_context: Some(super::locked_down()),
        ..Container::default()
    };
    let claim = |name: &str, read_only: bool| PersistentVolumeClaimVolumeSource {
        claim_name: name.into(),
        read_only: Some(read_only),
    };
    Job {
        metadata,
        spec: Some(JobSpec {
            // One try: etcdutl refuses a data directory that is not empty,
            // so a second try after a partial restore would only fail again
            // with a less useful message. status.restore says what to do.
            backoff_limit: Some(0),
            // A Job that cannot start (no room in its zone, a volume bound
            // elsewhere, the backups' claim attached elsewhere) fails after
            // an hour rather than waiting unseen; etcdutl restores
            // gigabytes in minutes.
            active_deadline_seconds: Some(RESTORE_DEADLINE_SECS),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(BTreeMap::from([(LABEL_RESTORE.to_string(), restore.backup.clone())])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    restart_policy: Some("Never".into()),
                    node_selector: Some(rg.spec.node_selector.clone()),
                    affinity: Some(zone_affinity(&[zone])),
                    volumes: Some(vec![
                        Volume {
                            name: "data".into(),
                            persistent_volume_claim: Some(claim(&member_claim_name(&member.name), false)),
                            ..Volume::default()
                        },
                        Volume {
                            name: "backups".into(),
                            persistent_volume_claim: Some(claim(&restore.claim_name, true)),
                            ..Volume::default()
                        },
                    ]),
                    ..PodSpec::default()
                }),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

/// The Raft members of a restored group: `count` members with the group's
/// own peer URLs. A restore starts a new cluster, whatever the members of
/// the group that was lost.
pub fn restored_members(rg: &RegionGroup, namespace: &str, count: i32) -> Vec<ClusterMember> {
    let group = kube::ResourceExt::name_any(rg);
    let scheme = names::scheme(rg.spec.tls.is_some());
    (0..count)
        .map(|o| {
            let name = names::member_name(&group, o);
            let host = names::member_host(&group, &name, namespace, &rg.spec.cluster_domain);
            ClusterMember {
                peer_url: format!("{scheme}://{host}:{}", names::PEER_PORT),
                name,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::geocluster::region_groups;
    use crate::build::testing::{example, with_backups};
    use crate::regions::RegionFilter;

    fn restored_group() -> (RegionGroup, GroupRestore) {
        let mut gc = example();
        with_backups(&mut gc);
        let region = gc.spec.regions[0].name.clone();
        gc.spec.regions[0].restore_from = Some(format!("{region}-20261203T113457.236Z"));
        let rg = region_groups(&gc, &RegionFilter::all())
            .into_iter()
            .find(|g| g.spec.restore.is_some())
            .expect("a restored group");
        let restore = rg.spec.restore.clone().expect("restore");
        (rg, restore)
    }

    #[test]
    fn the_snapshot_is_found_under_its_groups_directory() {
        assert_eq!(
            snapshot_path("eu-west-20261202T162810.805Z"),
            "/var/lib/tern/backups/eu-west/eu-west-20261202T162810.805Z.db"
        );
        assert_eq!(
            snapshot_path("ap-south-1-20261202T162810.805Z"),
            "/var/lib/tern/backups/ap-south-1/ap-south-1-20261202T162810.805Z.db"
        );
    }

    #[test]
    fn each_member_is_restored_into_the_claim_its_pod_will_mount() {
        let (rg, restore) = restored_group();
        let namespace = rg.metadata.namespace.clone().unwrap_or_default();
        let members = restored_members(&rg, &namespace, rg.spec.replicas);
        assert_eq!(members.len(), rg.spec.replicas as usize);
        let sts = crate::build::regiongroup::group_objects(&rg).stateful_set;
        let template = &sts.spec.volume_claim_templates.as_ref().expect("claims")[0];
        for (o, m) in members.iter().enumerate() {
            let job = restore_job(&rg, &restore, o, &members);
            let pod = job.spec.as_ref().expect("spec").template.spec.as_ref().expect("pod");
            let claim = pod.volumes.as_ref().expect("volumes")[0]
                .persistent_volume_claim
                .as_ref()
                .expect("claim");
            // The StatefulSet's name for ordinal o's claim.
            let want = format!(
                "{}-{}",
                template.metadata.name.as_deref().expect("name"),
                names::member_name(&kube::ResourceExt::name_any(&rg), o as i32)
            );
            assert_eq!(claim.claim_name, want);
            assert_eq!(member_claim(&rg, &m.name).metadata.name.as_deref(), Some(want.as_str()));
            assert_eq!(member_claim(&rg, &m.name).spec, template.spec);
            let args = pod.containers[0].args.clone().expect("args");
            assert!(args.contains(&format!("--name={}", m.name)), "{args:?}");
            assert!(args.contains(&format!("--initial-advertise-peer-urls={}", m.peer_url)));
            assert!(args.contains(&"--data-dir=/var/lib/etcd/data".to_string()));
            assert!(args.contains(&"--mark-compacted".to_string()));
            assert!(args.contains(&format!("--bump-revision={BUMP_REVISION}")));
            let cluster = args
                .iter()
                .find_map(|a| a.strip_prefix("--initial-cluster="))
                .expect("initial cluster");
            assert_eq!(cluster.split(',').count(), members.len());
            // The member's own peer URL is the one the StatefulSet's pod
            // advertises.
            assert!(m.peer_url.contains(&format!("{}.", m.name)), "{}", m.peer_url);
            assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
            assert_eq!(job.spec.as_ref().and_then(|s| s.backoff_limit), Some(0));
        }
    }

    #[test]
    fn every_directory_share_restores_its_members_into_one_cluster_bound_to_the_backup() {
        let mut gc = example();
        with_backups(&mut gc);
        let backup = "directory-20261203T113457.236Z";
        gc.spec.directory.restore_from = Some(backup.into());
        let shares: Vec<RegionGroup> = region_groups(&gc, &RegionFilter::all())
            .into_iter()
            .filter(|g| g.spec.role == GroupRole::Directory)
            .collect();
        let arg = |args: &[String], flag: &str| {
            args.iter()
                .find_map(|a| a.strip_prefix(flag).map(str::to_string))
                .unwrap_or_else(|| panic!("{flag} in {args:?}"))
        };
        let mut restored = Vec::new();
        let mut clusters = Vec::new();
        for share in &shares {
            let restore = share.spec.restore.clone().expect("restore");
            let members = restored_members(share, "default", share.spec.replicas);
            for (o, m) in members.iter().enumerate() {
                assert!(share.spec.initial_cluster.contains(m), "{m:?} is a directory member");
                let job = restore_job(share, &restore, o, &members);
                let args = job.spec.expect("spec").template.spec.expect("pod").containers[0]
                    .args
                    .clone()
                    .expect("args");
                assert_eq!(arg(&args, "--name="), m.name);
                assert_eq!(
                    args[2],
                    format!("/var/lib/tern/backups/directory/{backup}.db"),
                    "the directory's snapshot"
                );
                let token = arg(&args, "--initial-cluster-token=");
                assert!(token.ends_with(backup), "{token}");
                clusters.push((arg(&args, "--initial-cluster="), token));
                restored.push(m.name.clone());
            }
        }
        // Every member of the directory is restored once, by its share,
        // and all agree on the cluster and the token.
        let all: Vec<String> = shares[0].spec.initial_cluster.iter().map(|m| m.name.clone()).collect();
        restored.sort();
        let mut want = all.clone();
        want.sort();
        assert_eq!(restored, want);
        clusters.dedup();
        assert_eq!(clusters.len(), 1, "{clusters:?}");
        assert_eq!(clusters[0].0.split(',').count(), all.len());
        // A data group keeps its token.
        let (rg, _) = restored_group();
        assert_eq!(
            restore_token(rg.spec.role, &rg.spec.cluster_token, "x"),
            rg.spec.cluster_token
        );
    }

    #[test]
    fn restore_jobs_spread_over_the_zones_like_the_members() {
        let (rg, restore) = restored_group();
        let members = restored_members(&rg, "default", rg.spec.replicas);
        let zones: Vec<String> = (0..members.len())
            .map(|o| {
                let job = restore_job(&rg, &restore, o, &members);
                let pod = job.spec.expect("spec").template.spec.expect("pod");
                let terms = pod
                    .affinity
                    .and_then(|a| a.node_affinity)
                    .and_then(|n| n.required_during_scheduling_ignored_during_execution)
                    .expect("required affinity")
                    .node_selector_terms;
                let values = terms[0].match_expressions.as_ref().expect("expressions")[0]
                    .values
                    .clone()
                    .expect("values");
                assert_eq!(values.len(), 1);
                values[0].clone()
            })
            .collect();
        let mut distinct = zones.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            members.len().min(rg.spec.zones.len()),
            "one member per zone, as the StatefulSet's spread wants: {zones:?}"
        );
    }
}
