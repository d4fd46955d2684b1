//! The restore of a group's members from a backup (spec.restore), taken one
//! reconcile at a time while the group has no StatefulSet: the members'
//! claims, a Job per member (`build::restore`), and, once every Job has
//! succeeded, the restored Raft membership in status. Progress and failures
//! go to status.restore and to events.
//!
//! A restore never writes over a member's data: it runs only when no
//! member's claim exists but the ones it made itself (labelled with the
//! backup), and etcdutl refuses a data directory that is not empty.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use tern_crds::{GroupRole, RegionGroup, RegionGroupStatus, RestoreStatus};

use crate::Result;
use crate::build::regiongroup::member_claim_name;
use crate::build::restore::{
    BUMP_REVISION, LABEL_RESTORE, job_name, member_claim, restore_job, restored_members, snapshot_path,
};
use crate::context::Context;
use crate::error::KubeContext;
use crate::names;
use serde_json::json;
use tern_common::dir_hold_key;

/// What the reconcile does after a restore step.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to restore (or refused): make the StatefulSet.
    Proceed,
    /// Jobs are running or failed: no StatefulSet yet.
    Wait,
    /// Every member's volume holds the backup; status has the membership.
    Restored,
}

/// One step of the restore of a group that has no StatefulSet.
pub async fn step(rg: &RegionGroup, ctx: &Context, st: &mut RegionGroupStatus) -> Result<Step> {
    let namespace = rg.namespace().unwrap_or_default();
    let group = rg.name_any();
    let claims = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &namespace);
    let jobs = Api::<Job>::namespaced(ctx.client.clone(), &namespace);
    let done = |st: &RegionGroupStatus, backup: &str| st.restore.as_ref().is_some_and(|r| r.backup == backup && r.done);

    let all = claims
        .list(&ListParams::default().labels(&format!("{}={group}", names::LABEL_INSTANCE)))
        .await
        .context(|| format!("listing the volumes of {namespace}/{group}"))?
        .items;
    // Claims being deleted (a lost group's, deleted with its StatefulSet):
    // a StatefulSet made now would start its members on them, or on new
    // empty ones once they have gone. Wait until they have, whether or not
    // the group is to be restored: its spec may not say so yet (the
    // GeoCluster's restoreFrom reaches it a moment later).
    let going: Vec<String> = all
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_some())
        .map(|c| c.name_any())
        .collect();
    if !going.is_empty() {
        let why = format!(
            "waiting for volumes {} to be deleted before the members start",
            going.join(", ")
        );
        tracing::info!(%group, %why, "no StatefulSet yet");
        if let Some(r) = &rg.spec.restore
            && !done(st, &r.backup)
        {
            st.restore = Some(under_way(r.backup.clone(), why, None));
        }
        return Ok(Step::Wait);
    }
    // Claims made by a restore of this group, of any backup. Until that
    // restore is done they hold partial data: no member may start on them.
    let labelled: Vec<&PersistentVolumeClaim> = all.iter().filter(|c| c.labels().contains_key(LABEL_RESTORE)).collect();
    let unfinished: Vec<(String, String)> = labelled
        .iter()
        .filter_map(|c| {
            let b = c.labels().get(LABEL_RESTORE)?;
            (!done(st, b)).then(|| (c.name_any(), b.clone()))
        })
        .filter(|(_, b)| rg.spec.restore.as_ref().is_none_or(|r| &r.backup != b))
        .collect();
    if let Some((_, other)) = unfinished.first() {
        let names: Vec<&str> = unfinished.iter().map(|(n, _)| n.as_str()).collect();
        let now = match &rg.spec.restore {
            Some(r) => format!("restoreFrom now names backup {}", r.backup),
            None => "restoreFrom no longer names it".to_string(),
        };
        st.restore = Some(under_way(
            other.clone(),
            format!(
                "waiting: volumes {} hold an unfinished restore from backup {other}, and {now}; no member starts on them. Set restoreFrom back to {other}, or delete these claims and the restore Jobs of {group} (kubectl delete job -l {}={group}) to go on",
                names.join(", "),
                names::LABEL_INSTANCE
            ),
            None,
        ));
        return Ok(Step::Wait);
    }
    // A group that has run (its Raft membership is recorded) with no claim
    // left, and no restore to run: its data is gone.
    let restoring = rg.spec.restore.as_ref().is_some_and(|r| !done(st, &r.backup));
    if all.is_empty() && !st.raft_members.is_empty() && !restoring && rg.spec.role == GroupRole::Data {
        lost(rg, ctx, st).await;
        return Ok(Step::Wait);
    }
    if let Some(was) = st.data_lost.take()
        && was.held
        && !restoring
    {
        // Claims back without a restore (bound again by hand to the
        // volumes that held the data): the members start on them, and the
        // hold put for the loss goes. A restore lifts it itself, once the
        // fences agree.
        if let Err(e) = lift_hold(rg, ctx, &lost_reason(&group)).await {
            tracing::warn!(%group, error = %e, "cannot lift the hold put when the volumes were lost");
            st.data_lost = Some(was);
            return Ok(Step::Wait);
        }
        tracing::info!(%group, "claims are back: the hold put when the volumes were lost is lifted");
    }
    let Some(restore) = &rg.spec.restore else {
        return Ok(Step::Proceed);
    };
    let backup = &restore.backup;
    if done(st, backup) {
        // Restored from this backup once already: a StatefulSet deleted
        // since comes back on the volumes it left. Their label goes, so
        // that they are never taken for a restore's own again (a status
        // lost with its RegionGroup, a GeoCluster applied again).
        for c in labelled {
            let unlabel = json!({"metadata": {"labels": {LABEL_RESTORE: null}}});
            claims
                .patch(&c.name_any(), &PatchParams::default(), &Patch::Merge(&unlabel))
                .await
                .context(|| format!("unlabelling restored volume {namespace}/{}", c.name_any()))?;
        }
        return Ok(Step::Proceed);
    }
    // The members as the restore began: a change of replicas during it
    // comes after it, as a membership change.
    let count = st
        .restore
        .as_ref()
        .filter(|r| &r.backup == backup)
        .and_then(|r| r.members)
        .unwrap_or(rg.spec.replicas);
    let members = restored_members(rg, &namespace, count);

    // The members' claims: made here, or a refusal if any holds data the
    // restore did not put there.
    let mut foreign = Vec::new();
    let mut missing = Vec::new();
    let mut going = Vec::new();
    for m in &members {
        let name = member_claim_name(&m.name);
        let found = claims
            .list(&ListParams::default().fields(&format!("metadata.name={name}")))
            .await
            .context(|| format!("looking for volume {namespace}/{name}"))?
            .items
            .into_iter()
            .next();
        match found {
            None => missing.push(m),
            // A lost member's claim deleted with the StatefulSet: it goes
            // once its pod has gone, and the restore waits for it.
            Some(c) if c.metadata.deletion_timestamp.is_some() => going.push(name),
            Some(c) if c.labels().get(LABEL_RESTORE) == Some(backup) => {}
            Some(_) => foreign.push(name),
        }
    }
    if !foreign.is_empty() {
        let message = format!(
            "not restored from backup {backup}: the group has member volumes already ({}), and a restore never writes over a member's data; the members start on them. To restore, delete the StatefulSet {group} and these claims",
            foreign.join(", ")
        );
        if st.restore.as_ref().map(|r| &r.message) != Some(&message) {
            tracing::warn!(%group, %backup, "restore refused: member volumes exist");
            ctx.event(rg, EventType::Warning, "RestoreRefused", "Restore", message.clone())
                .await;
        }
        st.restore = Some(under_way(backup.clone(), message, None));
        return Ok(Step::Proceed);
    }
    if !going.is_empty() {
        st.restore = Some(under_way(
            backup.clone(),
            format!(
                "restoring from backup {backup}: waiting for volumes {} to be deleted",
                going.join(", ")
            ),
            Some(count),
        ));
        return Ok(Step::Wait);
    }
    // Checked before the restore's first claim is made: once begun, it
    // goes on (a lagging share of a whole restore, whose regions meanwhile
    // started on their restored data, is not stopped midway).
    let begun = missing.len() < members.len();
    if rg.spec.role == GroupRole::Directory
        && !begun
        && let Some(why) = live_regions(rg, ctx).await?
    {
        let message = format!(
            "not restored from backup {backup}: {why}. A directory put back to the backup's time under them would lose their placements since (accounts created, moved, failed over); restoring the directory under live regions is not built (docs/backup.md). Nothing of this share starts while directory.restoreFrom names a backup"
        );
        if st.restore.as_ref().map(|r| &r.message) != Some(&message) {
            tracing::warn!(%group, %backup, "directory restore refused: regions run on data of their own");
            ctx.event(rg, EventType::Warning, "RestoreRefused", "Restore", message.clone())
                .await;
        }
        st.restore = Some(under_way(backup.clone(), message, None));
        return Ok(Step::Wait);
    }
    for m in missing {
        let mut claim = member_claim(rg, &m.name);
        claim.labels_mut().insert(LABEL_RESTORE.into(), backup.clone());
        create(&claims, &claim, &namespace).await?;
    }

    let mut restored = 0;
    let mut failed = Vec::new();
    let mut running = Vec::new();
    for (o, m) in members.iter().enumerate() {
        let name = job_name(&m.name);
        let found = jobs
            .get_opt(&name)
            .await
            .context(|| format!("reading Job {namespace}/{name}"))?;
        let Some(job) = found else {
            create(&jobs, &restore_job(rg, restore, o, &members), &namespace).await?;
            if o == 0 {
                let note = format!(
                    "restoring {} members from backup {backup} ({} in claim {})",
                    members.len(),
                    snapshot_path(backup),
                    restore.claim_name
                );
                ctx.event(rg, EventType::Normal, "RestoreStarted", "Restore", note)
                    .await;
            }
            continue;
        };
        if job.labels().get(LABEL_RESTORE) != Some(backup) {
            // Left by a restore from another backup that never finished.
            jobs.delete(&name, &DeleteParams::background())
                .await
                .context(|| format!("deleting Job {namespace}/{name} of another backup"))?;
            continue;
        }
        if job.metadata.deletion_timestamp.is_some() {
            // Deleted to be tried again: made anew once it has gone.
            continue;
        }
        let status = job.status.unwrap_or_default();
        let finished_as = |kind: &str| {
            status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == kind && c.status == "True")
        };
        if status.succeeded.unwrap_or(0) >= 1 || finished_as("Complete") {
            restored += 1;
        } else if status.failed.unwrap_or(0) >= 1 || finished_as("Failed") {
            failed.push((name, member_claim_name(&m.name)));
        } else {
            running.push(name);
        }
    }

    if restored == members.len() {
        let message = match rg.spec.role {
            // No hold: the hold lives in the directory. Each restored data
            // group holds its region until its fences agree with this
            // directory, and a region's group that starts empty refuses the
            // accounts the directory homes there (their fences are missing).
            GroupRole::Directory => format!(
                "restored {} members of the directory from backup {backup}: the directory serves once a majority of its members, in every share, is restored (each cluster's operator restores its own share from the same backup) and started; it holds what it had when the backup was taken, and what it acknowledged after the backup began (accounts created, moves) is lost and named per region by the regions' fences; revisions now start {BUMP_REVISION} higher",
                members.len()
            ),
            GroupRole::Data => {
                // The region is held before any member starts: until the
                // fences agree with the directory (`agree_fences`), its
                // agent claims no lease and its routers commit nothing.
                let reason = format!(
                    "{group} restored from backup {backup}; its fences are made to agree with the directory first"
                );
                if let Err(why) = hold(rg, ctx, reason).await {
                    st.restore = Some(under_way(
                        backup.clone(),
                        format!(
                            "every member's volume holds backup {backup}; waiting to hold region {} in the directory before the members start: {why}",
                            rg.spec.region
                        ),
                        Some(count),
                    ));
                    return Ok(Step::Wait);
                }
                format!(
                    "restored {} members from backup {backup}: the group holds what it had when the backup was taken (tern backup list shows its revisions); writes it acknowledged after the backup began are lost; revisions now start {BUMP_REVISION} higher",
                    members.len()
                )
            }
        };
        tracing::info!(%group, %backup, "members restored");
        ctx.event(rg, EventType::Normal, "Restored", "Restore", message.clone())
            .await;
        st.restore = Some(RestoreStatus {
            done: true,
            ..under_way(backup.clone(), message, Some(count))
        });
        // The restored group is a new cluster of these members, whatever
        // the lost one had. A directory share's members bootstrap from its
        // list: what a replacement recorded of the lost directory goes.
        st.raft_members = match rg.spec.role {
            GroupRole::Data => members,
            GroupRole::Directory => Vec::new(),
        };
        st.membership_change = None;
        // Every claim is new, and no member lost anything: the volumes of
        // the lost group are forgotten, and the restored ones recorded once
        // the members are ready.
        st.member_volumes.clear();
        st.member_replacement = None;
        st.data_lost = None;
        return Ok(Step::Restored);
    }
    let message = if failed.is_empty() {
        format!(
            "restoring from backup {backup}: {restored} of {} members' volumes restored; running: {} (kubectl describe job says why one waits)",
            members.len(),
            if running.is_empty() {
                "none yet".to_string()
            } else {
                running.join(", ")
            }
        )
    } else {
        let (job, claim) = &failed[0];
        format!(
            "restore from backup {backup} failed: Job {job} did not succeed (kubectl logs job/{job} says why: a backup missing from claim {} at {}, or a volume that is not empty). To try again, delete the Job and claim {claim}",
            restore.claim_name,
            snapshot_path(backup)
        )
    };
    if !failed.is_empty() && st.restore.as_ref().map(|r| &r.message) != Some(&message) {
        tracing::warn!(%group, %backup, "restore failed");
        ctx.event(rg, EventType::Warning, "RestoreFailed", "Restore", message.clone())
            .await;
    }
    st.restore = Some(under_way(backup.clone(), message, Some(count)));
    Ok(Step::Wait)
}

/// Why the directory may not be restored under this cluster's regions:
/// the data groups of the share's GeoCluster that run on data of their own
/// (their Raft membership is recorded, or a member is ready) and are not
/// being restored themselves. A whole GeoCluster's restore has every
/// region's group restored with the directory, or new (checked as the
/// GeoCluster is applied, before a new group's members are ready). Other
/// clusters' regions are their operators' to see.
async fn live_regions(rg: &RegionGroup, ctx: &Context) -> Result<Option<String>> {
    let namespace = rg.namespace().unwrap_or_default();
    let groups = Api::<RegionGroup>::namespaced(ctx.client.clone(), &namespace)
        .list(&ListParams::default())
        .await
        .context(|| format!("listing the RegionGroups of {namespace}"))?;
    let live: Vec<String> = groups
        .items
        .iter()
        .filter(|g| g.spec.geo_cluster == rg.spec.geo_cluster && g.spec.role == GroupRole::Data)
        .filter(|g| {
            let Some(s) = &g.status else { return false };
            // Restored with the directory: its restore under way, or done
            // and its fences not yet agreed with a directory. A group
            // restored long ago (restoreFrom stays in the spec) has run on
            // its own since, and a group whose data is lost runs nothing.
            let restoring = g.spec.restore.as_ref().is_some_and(|want| {
                s.restore
                    .as_ref()
                    .is_none_or(|r| r.backup != want.backup || !r.done || r.fences.is_none())
            });
            // Running: its membership recorded (every member was ready
            // once), or a member ready now.
            let ran = !s.raft_members.is_empty() || s.ready_members > 0;
            ran && !restoring && s.data_lost.is_none()
        })
        .map(|g| g.name_any())
        .collect();
    Ok((!live.is_empty()).then(|| {
        format!(
            "region groups {} run on data of their own and are not restored from a backup",
            live.join(", ")
        )
    }))
}

/// A restore under way from `backup`: `message` says where it is.
fn under_way(backup: String, message: String, members: Option<i32>) -> RestoreStatus {
    RestoreStatus {
        backup,
        done: false,
        message,
        members,
        ..RestoreStatus::default()
    }
}

/// The hold put on the region of a group that lost every volume.
fn lost_reason(group: &str) -> String {
    format!(
        "every member's volume of {group} is gone, and with them the group's data: restore it from a backup (docs/backup.md)"
    )
}

/// A group that has run lost every member's volume (a StatefulSet deleted
/// with its claims, every node lost with its disks) and no restore is
/// asked for. Its members are not started: on empty volumes, told to join
/// the cluster they had, they cannot, and a new cluster under the group's
/// name would serve an empty region. The region is held in the directory,
/// so that nothing of it commits a write even if a person starts one.
///
/// Without restoreFrom, the last restore is forgotten, so that setting
/// restoreFrom to its backup restores it again. A restoreFrom that still
/// names the backup restored last is not taken as asking for it again: the
/// loss may come long after, with newer backups, and which one to restore
/// is a person's choice.
async fn lost(rg: &RegionGroup, ctx: &Context, st: &mut RegionGroupStatus) {
    let group = rg.name_any();
    let region = &rg.spec.region;
    let mut held = st.data_lost.as_ref().is_some_and(|d| d.held);
    let mut why_not = String::new();
    if !held {
        match hold(rg, ctx, lost_reason(&group)).await {
            Ok(()) => held = true,
            Err(e) => why_not = format!(" (not held yet: {e})"),
        }
    }
    let restore = match &rg.spec.restore {
        None => {
            st.restore = None;
            "Restore the group from a backup (restoreFrom, docs/backup.md)".to_string()
        }
        Some(r) => format!(
            "restoreFrom still names backup {}, restored before: set it to the backup to restore (to restore {} again, remove restoreFrom, wait until status.restore is gone, then set it back)",
            r.backup, r.backup
        ),
    };
    let message = format!(
        "every member's volume of {group} is gone (no claim left) and the group has run ({} Raft members recorded): its data is gone. No member is started: on empty volumes they cannot join the cluster they had, and a new one would serve an empty region. Region {region} is held in the directory{why_not}. {restore}. To start it empty instead, remove restoreFrom if set, delete this RegionGroup (the GeoCluster makes it again, new) and lift the hold by hand (etcdctl del /tern/dir/holds/{region})",
        st.raft_members.len()
    );
    if st.data_lost.as_ref().is_none_or(|d| d.held != held) {
        tracing::warn!(%group, held, "every member's volume is gone");
        ctx.event(rg, EventType::Warning, "GroupDataLost", "Restore", message.clone())
            .await;
    }
    st.data_lost = Some(tern_crds::DataLost { message, held });
}

/// Once a restored group's members are all ready: its accounts' fences made
/// to agree with the directory (`crate::fences`), once, recorded in
/// status.restore.fences with an event. Until it is done the reconcile
/// comes back as often as during a membership change.
pub async fn agree_fences(
    rg: &RegionGroup,
    ctx: &Context,
    tls: Option<&tern_common::tls::Tls>,
    endpoints: &[String],
    st: &mut RegionGroupStatus,
) -> Pending {
    if rg.spec.role == GroupRole::Directory {
        return describe_directory(rg, ctx, st).await;
    }
    let Some(restore) = st.restore.as_mut().filter(|r| r.done && r.fences.is_none()) else {
        return Pending::No;
    };
    let group = rg.name_any();
    let region = match tern_common::RegionName::new(&rg.spec.region) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%group, error = %e, "a region name the schema should have refused");
            return Pending::No;
        }
    };
    let mut directory = match directory_of(rg, ctx).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(%group, error = %e, "cannot reach the directory; fences wait");
            return Pending::Yes;
        }
    };
    let mut client =
        match tern_common::etcd::connect_tls(endpoints, tls, "group", std::time::Duration::from_secs(10)).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%group, error = %e, "cannot reach the restored group; fences wait");
                return Pending::Yes;
            }
        };
    let agreed = match crate::fences::reconcile(&region, &mut directory, &mut client).await {
        // Then the hold goes, and the agent may claim the region's lease.
        Ok(plan) => directory.delete(dir_hold_key(&region), None).await.map(|_| plan),
        Err(e) => Err(e),
    };
    match agreed {
        Ok(plan) => {
            let note = format!("{}; the region's hold is lifted", crate::fences::describe(&plan));
            tracing::info!(%group, fences = %note, "restored group's fences agree with the directory");
            ctx.event(rg, EventType::Normal, "RestoreFences", "Restore", note.clone())
                .await;
            restore.fences = Some(note);
            Pending::No
        }
        Err(e) => {
            tracing::warn!(%group, error = %e, "cannot make the restored group's fences agree; retrying");
            Pending::Yes
        }
    }
}

/// Once a restored directory serves: what it holds, once, in
/// status.restore.directory and a `DirectoryRestored` event. It is what
/// the regions' fences are compared with; the holds and migrations it
/// brings back from the backup's time are named, for a person to look at.
async fn describe_directory(rg: &RegionGroup, ctx: &Context, st: &mut RegionGroupStatus) -> Pending {
    let Some(restore) = st.restore.as_mut().filter(|r| r.done && r.directory.is_none()) else {
        return Pending::No;
    };
    let group = rg.name_any();
    // The backup's time, as the id has it (`directory-<UTC stamp>`).
    let taken = restore
        .backup
        .rsplit_once('-')
        .map(|(_, t)| t.to_string())
        .unwrap_or_default();
    let described = match directory_of(rg, ctx).await {
        Ok(mut d) => directory_contents(&mut d, &taken).await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    match described {
        Ok(note) => {
            tracing::info!(%group, directory = %note, "restored directory serves");
            ctx.event(rg, EventType::Normal, "DirectoryRestored", "Restore", note.clone())
                .await;
            restore.directory = Some(note);
            Pending::No
        }
        Err(e) => {
            tracing::info!(%group, error = %e, "the restored directory does not serve yet");
            Pending::Yes
        }
    }
}

/// The restored directory's accounts per home region, the ones moving, its
/// holds and migration intents, in a sentence. `taken` is the backup's
/// UTC stamp: a hold put before it came back with the backup, one put
/// since is a restored region's own (lifted once its fences agree).
async fn directory_contents(
    d: &mut etcd_client::Client,
    taken: &str,
) -> std::result::Result<String, etcd_client::Error> {
    use std::collections::BTreeMap;
    use tern_common::etcd::Pages;
    let mut homes: BTreeMap<String, usize> = BTreeMap::new();
    let mut moving = 0;
    let mut pages = Pages::prefix(tern_common::DIR_ACCOUNTS, 5_000);
    while let Some(page) = pages.next(d).await? {
        for kv in page.kvs() {
            if let Ok(record) = serde_json::from_slice::<tern_common::AccountRecord>(kv.value()) {
                *homes.entry(record.home.to_string()).or_default() += 1;
                if matches!(record.state, tern_common::AccountState::Migrating { .. }) {
                    moving += 1;
                }
            }
        }
    }
    let holds = d
        .get(
            tern_common::DIR_HOLDS,
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
    let (mut restored, mut since) = (Vec::new(), Vec::new());
    for kv in holds.kvs() {
        let region = kv
            .key_str()
            .unwrap_or_default()
            .trim_start_matches(tern_common::DIR_HOLDS);
        match serde_json::from_slice::<tern_common::RegionHold>(kv.value()) {
            Ok(h) if tern_common::backup::utc_stamp(h.since_ms).as_str() >= taken => {
                since.push(format!("{region} (by {})", h.by));
            }
            Ok(h) => restored.push(format!("{region} (by {}: {})", h.by, h.reason)),
            Err(_) => restored.push(region.to_string()),
        }
    }
    let intents = d
        .get(
            tern_common::DIR_MIGRATIONS,
            Some(etcd_client::GetOptions::new().with_prefix().with_count_only()),
        )
        .await?
        .count();
    let total: usize = homes.values().sum();
    let per_home = homes
        .iter()
        .map(|(r, n)| format!("{r} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut holds = if restored.is_empty() {
        "no hold from the backup's time".to_string()
    } else {
        format!(
            "holds from the backup's time: {} (a person lifts one once its reason is gone and the region's fences agree: etcdctl del /tern/dir/holds/REGION)",
            restored.join("; ")
        )
    };
    if !since.is_empty() {
        holds += &format!(
            "; held since the restore: {} (restored regions, lifted by their operators once their fences agree)",
            since.join(", ")
        );
    }
    Ok(format!(
        "the restored directory serves: {total} accounts placed ({}), {moving} of them moving; {} migration intents; {holds}. Each restored region's fences are made to agree with it (its RegionGroup's status.restore.fences names what differs)",
        if per_home.is_empty() {
            "none".to_string()
        } else {
            per_home
        },
        intents,
    ))
}

/// The directory of the group's GeoCluster.
async fn directory_of(rg: &RegionGroup, ctx: &Context) -> std::result::Result<etcd_client::Client, String> {
    let namespace = rg.namespace().unwrap_or_default();
    let gc = Api::<tern_crds::GeoCluster>::namespaced(ctx.client.clone(), &namespace)
        .get(&rg.spec.geo_cluster)
        .await
        .map_err(|e| format!("reading GeoCluster {namespace}/{}: {e}", rg.spec.geo_cluster))?;
    crate::controller::migration::geocluster_directory(ctx, &gc)
        .await
        .map_err(|e| e.to_string())
}

/// The directory of the group's GeoCluster, and the key of its region's
/// hold there.
async fn hold_of(rg: &RegionGroup, ctx: &Context) -> std::result::Result<(etcd_client::Client, String), String> {
    let region = tern_common::RegionName::new(&rg.spec.region).map_err(|e| e.to_string())?;
    Ok((directory_of(rg, ctx).await?, dir_hold_key(&region)))
}

/// Holds the group's region in the directory (`/tern/dir/holds/{region}`)
/// for `reason`, unless it is held already (the first reason stays).
pub(super) async fn hold(rg: &RegionGroup, ctx: &Context, reason: String) -> std::result::Result<(), String> {
    let (mut directory, key) = hold_of(rg, ctx).await?;
    let record = tern_common::RegionHold {
        by: "tern-operator".into(),
        reason,
        since_ms: tern_common::unix_ms(),
    };
    let value = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
    directory
        .txn(
            etcd_client::Txn::new()
                .when([etcd_client::Compare::create_revision(
                    key.clone(),
                    etcd_client::CompareOp::Equal,
                    0,
                )])
                .and_then([etcd_client::TxnOp::put(key.clone(), value, None)]),
        )
        .await
        .map_err(|e| format!("putting {key}: {e}"))?;
    Ok(())
}

/// Lifts the hold of the group's region if it is the operator's own for
/// `reason`; a hold put for anything else (by a person, for a restore)
/// stays. True if it was lifted.
pub(super) async fn lift_hold(rg: &RegionGroup, ctx: &Context, reason: &str) -> std::result::Result<bool, String> {
    let (mut directory, key) = hold_of(rg, ctx).await?;
    let found = directory
        .get(key.clone(), None)
        .await
        .map_err(|e| format!("reading {key}: {e}"))?;
    let Some(kv) = found.kvs().first() else {
        return Ok(false);
    };
    let ours = serde_json::from_slice::<tern_common::RegionHold>(kv.value())
        .is_ok_and(|h| h.by == "tern-operator" && h.reason == reason);
    if ours {
        // Only the hold read: one put again since stays.
        directory
            .txn(
                etcd_client::Txn::new()
                    .when([etcd_client::Compare::mod_revision(
                        key.clone(),
                        etcd_client::CompareOp::Equal,
                        kv.mod_revision(),
                    )])
                    .and_then([etcd_client::TxnOp::delete(key.clone(), None)]),
            )
            .await
            .map_err(|e| format!("deleting {key}: {e}"))
            .map(|t| t.succeeded())
    } else {
        Ok(false)
    }
}

/// Whether work of the restore remains for a later reconcile.
#[derive(Debug, PartialEq, Eq)]
pub enum Pending {
    Yes,
    No,
}

/// Creates `object`; one that exists already (another reconcile made it)
/// is fine.
async fn create<K>(api: &Api<K>, object: &K, namespace: &str) -> Result<()>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e).context(|| format!("creating {} {namespace}/{}", K::kind(&()), object.name_any())),
    }
}
