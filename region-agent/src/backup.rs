//! Scheduled backups: while it leads, the agent takes a backup of its
//! region's group every `--backup-every` into `--backup-dir` (and, with
//! `--backup-directory-group`, of the directory group too), keeping the
//! newest `--backup-keep`. The format is `tern backup now`'s
//! (`tern_common::backup`), so `tern backup list` and `tern restore` read
//! what the schedule wrote.
//!
//! The schedule is kept by the backups themselves: the next one is due
//! `--backup-every` after the newest one in the directory began. A new
//! leader (after a restart or a failover of the agent) does not take an
//! extra backup, and one that took over late takes the missed one at once.
//!
//! A backup of the region's group is also taken when one is asked for
//! through the group (`tern_common::backup_request`: the operator does,
//! before it rolls the members onto another etcd image), within
//! [`ASKED_POLL`]; every backup of the group is then recorded there, so
//! that whoever asked sees when it is answered. The same holds for the
//! directory, asked through the directory, when this agent backs it up.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tern_common::{backup, backup_request};

use crate::election::Leadership;
use crate::error::AgentError;
use crate::metrics::{BackupLabels, GroupLabels};
use crate::state::Shared;

/// A failed backup is tried again after this (or `every`, if shorter).
const RETRY: Duration = Duration::from_secs(60);
/// How often the group is read for a backup asked for.
pub const ASKED_POLL: Duration = Duration::from_secs(2);

/// What to back up, where and how often.
#[derive(Clone, Debug)]
pub struct Settings {
    pub dir: PathBuf,
    pub every: Duration,
    pub keep: usize,
    /// Group name and its members' client URLs; the region's own group
    /// first (the one backups are asked for through).
    pub groups: Vec<(String, Vec<String>)>,
    /// Dial the groups over TLS with this certificate.
    pub tls: Option<tern_common::tls::Tls>,
}

/// How long until `group`'s next backup is due, from the newest one in
/// the directory (due now when there is none), and when that one began.
fn due_in(settings: &Settings, group: &str) -> Result<(Duration, Option<u64>), tern_common::CommonError> {
    let newest = backup::list(&settings.dir, group)?.last().map(|m| m.taken_at_ms);
    let Some(newest) = newest else {
        return Ok((Duration::ZERO, None));
    };
    let due = newest.saturating_add(settings.every.as_millis() as u64);
    Ok((
        Duration::from_millis(due.saturating_sub(tern_common::unix_ms())),
        Some(newest),
    ))
}

/// Whether a backup of a group (the region's, or the directory) is asked
/// for and not yet taken: neither recorded in the group nor `unrecorded`
/// (taken, its record not yet written). A group that cannot be read asks
/// for nothing (the next round reads it again).
async fn asked(client: &mut Client, group: &str, unrecorded: Option<&backup_request::Taken>) -> bool {
    match backup_request::read(client).await {
        Ok((request, last)) => {
            let request = request.map(|(revision, _)| revision);
            backup_request::pending(request, last.as_ref()) && backup_request::pending(request, unrecorded)
        }
        Err(e) => {
            tracing::debug!(%group, error = %e, "cannot read the backup request");
            false
        }
    }
}

/// `clients[i]` reaches `settings.groups[i]` (the region's group, then
/// the directory when it is backed up here): the group a backup of it is
/// asked for and recorded through.
pub async fn run(
    settings: Settings,
    mut clients: Vec<Client>,
    leadership: Leadership,
    shared: Arc<Shared>,
) -> AgentError {
    let metrics = &shared.metrics;
    let mut retry_at: Vec<Option<tokio::time::Instant>> = vec![None; settings.groups.len()];
    // A group's last backup when its record could not be written: the
    // record is tried again, not the backup (another backup per round
    // would prune the older ones away).
    let mut unrecorded: Vec<Option<backup_request::Taken>> = vec![None; settings.groups.len()];
    // The region's own record is guarded by the agent's leadership there;
    // the directory's cannot be (see `backup_request::record`).
    let guard = |i: usize| (i == 0).then(|| leadership.guard());
    loop {
        for (i, client) in clients.iter_mut().enumerate() {
            let Some(taken) = &unrecorded[i] else { continue };
            match backup_request::record(client, taken, guard(i)).await {
                Ok(true) => unrecorded[i] = None,
                Ok(false) => return AgentError::NotLeader(shared.region.to_string()),
                Err(e) => tracing::debug!(backup = %taken.id, error = %e, "still cannot record the backup"),
            }
        }
        for (i, (group, endpoints)) in settings.groups.iter().enumerate() {
            // A failed backup waits for its retry even when asked for: a
            // volume that is full or a member that stalls is not tried
            // again every round.
            if retry_at[i].is_some_and(|t| tokio::time::Instant::now() < t) {
                continue;
            }
            let asked = match clients.get_mut(i) {
                Some(client) => asked(client, group, unrecorded[i].as_ref()).await,
                None => false,
            };
            let labels = |outcome: &str| BackupLabels {
                group: group.clone(),
                outcome: outcome.to_string(),
            };
            // A directory that cannot be read (a damaged manifest, a
            // manifest of a newer format) stops the schedule, loudly: backing
            // up "because none is there" would fill the disk.
            match due_in(&settings, group) {
                Ok((due, newest)) => {
                    if let Some(ms) = newest {
                        metrics
                            .last_backup_seconds
                            .get_or_create(&GroupLabels { group: group.clone() })
                            .set((ms / 1000) as i64);
                    }
                    if !due.is_zero() && !asked {
                        continue;
                    }
                }
                Err(e) => {
                    metrics.backups.get_or_create(&labels("failed")).inc();
                    retry_at[i] = Some(tokio::time::Instant::now() + RETRY);
                    tracing::warn!(group = %group, error = %e, "cannot read the backups; no backup until it can");
                    continue;
                }
            }
            match backup::take(endpoints, settings.tls.as_ref(), group, &settings.dir).await {
                Ok(m) => {
                    retry_at[i] = None;
                    metrics.backups.get_or_create(&labels("ok")).inc();
                    metrics
                        .last_backup_seconds
                        .get_or_create(&GroupLabels { group: group.clone() })
                        .set((m.taken_at_ms / 1000) as i64);
                    tracing::info!(
                        group = %group,
                        backup = %m.id,
                        bytes = m.size_bytes,
                        revision_min = m.revision_min,
                        revision_max = m.revision_max,
                        member = %m.member,
                        asked,
                        "backup taken"
                    );
                    if let Some(client) = clients.get_mut(i) {
                        let taken = backup_request::Taken {
                            id: m.id.clone(),
                            revision_min: m.revision_min,
                            revision_max: m.revision_max,
                            taken_at_ms: m.taken_at_ms,
                        };
                        match backup_request::record(client, &taken, guard(i)).await {
                            Ok(true) => {}
                            Ok(false) => return AgentError::NotLeader(shared.region.to_string()),
                            // Whoever asked waits until the record is
                            // written: tried again every round.
                            Err(e) => {
                                tracing::warn!(group = %group, error = %e, "cannot record the backup in the group");
                                unrecorded[i] = Some(taken);
                            }
                        }
                    }
                    match backup::prune(&settings.dir, group, settings.keep) {
                        Ok(gone) => {
                            for g in gone {
                                tracing::info!(group = %group, backup = %g.id, keep = settings.keep, "old backup deleted");
                            }
                        }
                        Err(e) => {
                            metrics.backups.get_or_create(&labels("prune_failed")).inc();
                            tracing::warn!(group = %group, error = %e, "deleting old backups failed")
                        }
                    }
                }
                Err(e) => {
                    metrics.backups.get_or_create(&labels("failed")).inc();
                    retry_at[i] = Some(tokio::time::Instant::now() + RETRY.min(settings.every));
                    tracing::warn!(group = %group, error = %e, "backup failed; trying again");
                }
            }
        }
        // Wake for the earliest due backup (a failed one: its retry), at
        // most a minute from now (a backup written by a previous leader may
        // move the schedule), or for a backup asked for.
        let now = tokio::time::Instant::now();
        let next = settings
            .groups
            .iter()
            .zip(&retry_at)
            .map(|((g, _), retry)| {
                let retry = retry.map(|t| t.saturating_duration_since(now)).unwrap_or_default();
                due_in(&settings, g).map(|(d, _)| d).unwrap_or(RETRY).max(retry)
            })
            .min()
            .unwrap_or(RETRY)
            .clamp(Duration::from_millis(100), RETRY);
        let wake_at = now + next;
        'sleep: loop {
            let step = wake_at
                .saturating_duration_since(tokio::time::Instant::now())
                .min(ASKED_POLL);
            if step.is_zero() {
                break;
            }
            tokio::time::sleep(step).await;
            if unrecorded.iter().any(Option::is_some) {
                break;
            }
            for (client, (group, _)) in clients.iter_mut().zip(&settings.groups) {
                if asked(client, group, None).await {
                    break 'sleep;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &std::path::Path) -> Settings {
        Settings {
            dir: dir.to_path_buf(),
            every: Duration::from_secs(3600),
            keep: 2,
            groups: Vec::new(),
            tls: None,
        }
    }

    #[test]
    fn no_backup_is_due_now_and_an_unreadable_directory_is_an_error_not_due() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = settings(dir.path());
        assert_eq!(
            due_in(&s, "eu-west").expect("empty is readable"),
            (Duration::ZERO, None)
        );
        // A manifest that cannot be read must not read as "no backup yet":
        // that would take one every round until the disk is full.
        let gdir = backup::group_dir(dir.path(), "eu-west");
        std::fs::create_dir_all(&gdir).expect("mkdir");
        std::fs::write(gdir.join("x.json"), b"{").expect("write");
        assert!(due_in(&s, "eu-west").is_err());
    }
}
