//! Backups of an etcd group (a region's or the directory's): a snapshot
//! streamed from one member into a directory, with a manifest beside it.
//! `tern backup` writes and lists them, `tern restore` reads them; the
//! format lives here so that every tern binary that takes one (a schedule,
//! a command) writes the same thing.
//!
//! Layout: `DIR/<group>/<id>.db` is etcd's snapshot with the SHA-256 etcd
//! appends (which `etcdutl snapshot restore` checks), `DIR/<group>/<id>.json`
//! its manifest. The manifest is written last, after the snapshot is on
//! disk: a backup without one is incomplete and is never listed or
//! restored.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Client, GetOptions};

use crate::etcd;
use crate::tls::Tls;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::CommonError;

/// The manifest format this code writes and reads.
pub const FORMAT: u32 = 1;

/// What a backup is: where it came from, what it covers, how to check it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupManifest {
    pub format: u32,
    /// `<group>-<UTC time>`, also the files' stem.
    pub id: String,
    /// A region name, or `directory`.
    pub group: String,
    /// The snapshot's file name, beside the manifest.
    pub file: String,
    /// When the snapshot started (Unix ms).
    pub taken_at_ms: u64,
    /// Client URL of the member it was streamed from.
    pub member: String,
    pub member_id: String,
    pub cluster_id: String,
    /// The member's revision after a linearizable read just before the
    /// snapshot: every write the group acknowledged before the backup began
    /// is at or below it, so in the backup.
    pub revision_min: i64,
    /// The member's revision just after the snapshot: nothing above it is
    /// in the backup. `etcdutl snapshot status` gives the exact revision.
    pub revision_max: i64,
    /// etcd's storage version of the member (the oldest etcd that can
    /// restore it).
    pub storage_version: String,
    pub size_bytes: u64,
    /// SHA-256 of the whole file as written, checksum included.
    pub sha256: String,
}

impl BackupManifest {
    /// Path of the snapshot file, given the group's backup directory.
    pub fn snapshot_path(&self, group_dir: &Path) -> PathBuf {
        group_dir.join(&self.file)
    }
}

/// The directory of one group's backups under `dir`.
pub fn group_dir(dir: &Path, group: &str) -> PathBuf {
    dir.join(group)
}

fn io_error(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> CommonError {
    let path = path.display().to_string();
    let what = what.to_string();
    move |source| CommonError::BackupIo { what, path, source }
}

/// What a failed etcd call of a backup of `group` from `member` becomes.
fn etcd_error(group: &str, member: &str, what: &str) -> impl FnOnce(etcd_client::Error) -> CommonError + use<> {
    let (group, member, what) = (group.to_string(), member.to_string(), what.to_string());
    move |source| CommonError::BackupEtcd {
        group,
        member,
        what,
        source,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `20261202T162512.345Z` for Unix ms `ms`: sortable, and readable in a
/// file name.
pub fn utc_stamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

/// One member as its status says.
struct Candidate {
    endpoint: String,
    leader: bool,
    applied: u64,
}

/// How long a member may take to answer the read before the snapshot, or
/// to send the snapshot's next chunk: a member cut off mid-stream fails
/// the backup instead of holding it (and a schedule) forever.
const STALL: Duration = Duration::from_secs(30);

/// The members to stream from, best first: the followers, most caught up
/// first, so that the leader's disk and network keep serving writes; the
/// leader last. Members are found in the group's member list, so that a
/// Service address in `endpoints` still names each member. Learners (they
/// refuse linearizable reads) and members that know no leader (cut off:
/// their read would wait) are left out.
async fn candidates(endpoints: &[String], tls: Option<&Tls>) -> Vec<Candidate> {
    let mut urls = Vec::new();
    if let Ok(mut c) = etcd::client(endpoints, tls, None).await
        && let Ok(Ok(list)) = tokio::time::timeout(Duration::from_secs(2), c.member_list()).await
    {
        for m in list.members().iter().filter(|m| !m.is_learner()) {
            if let Some(url) = m.client_urls().first() {
                urls.push(url.clone());
            }
        }
    }
    if urls.is_empty() {
        urls = endpoints.to_vec();
    }
    let mut seen = Vec::new();
    for url in urls {
        let Ok(mut c) = etcd::client(&[url.as_str()], tls, None).await else {
            continue;
        };
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), c.status()).await
            && s.leader() != 0
        {
            let id = s.header().map(|h| h.member_id()).unwrap_or(0);
            seen.push(Candidate {
                endpoint: url,
                leader: s.leader() == id,
                applied: s.raft_applied_index(),
            });
        }
    }
    seen.sort_by_key(|c| (c.leader, std::cmp::Reverse(c.applied)));
    seen
}

/// Streams a snapshot of `group` (members at `endpoints`) into
/// `DIR/<group>/` and writes its manifest. Everything the group
/// acknowledged before this was called is in it.
pub async fn take(
    endpoints: &[String],
    tls: Option<&Tls>,
    group: &str,
    dir: &Path,
) -> Result<BackupManifest, CommonError> {
    let found = candidates(endpoints, tls).await;
    if found.is_empty() {
        return Err(CommonError::Backup(format!(
            "no voting member of the {group} group with a leader answers at {}",
            endpoints.join(", ")
        )));
    }
    let etcd = |member: &str, what: &str| etcd_error(group, member, what);
    // A linearizable read served by a member returns only once it has
    // applied everything the leader had committed when the read began: the
    // snapshot after it, from the same member, holds every write
    // acknowledged before now. A member that cannot serve it is passed over.
    let mut last_error = None;
    let mut chosen = None;
    for candidate in &found {
        let read = async {
            let mut c = etcd::client(&[candidate.endpoint.as_str()], tls, None).await?;
            let before = c.get("\0tern-backup", None).await?;
            Ok::<_, etcd_client::Error>((c, before))
        };
        match tokio::time::timeout(STALL, read).await {
            Ok(Ok(done)) => {
                chosen = Some((candidate, done));
                break;
            }
            Ok(Err(e)) => last_error = Some(format!("{}: {e}", candidate.endpoint)),
            Err(_) => last_error = Some(format!("{}: no answer within {STALL:?}", candidate.endpoint)),
        }
    }
    let Some((member, (mut c, before))) = chosen else {
        return Err(CommonError::Backup(format!(
            "no member of the {group} group served a linearizable read before the snapshot (last: {})",
            last_error.unwrap_or_default()
        )));
    };
    let taken_at_ms = crate::unix_ms();
    let header = before.header();
    let revision_min = header.map(|h| h.revision()).unwrap_or(0);
    let member_id = header.map(|h| h.member_id()).unwrap_or(0);
    let cluster_id = format!("{:016x}", header.map(|h| h.cluster_id()).unwrap_or(0));

    let gdir = group_dir(dir, group);
    tokio::fs::create_dir_all(&gdir)
        .await
        .map_err(io_error(&gdir, "creating the backup directory"))?;
    let id = format!("{group}-{}", utc_stamp(taken_at_ms));
    let file = format!("{id}.db");
    let path = gdir.join(&file);
    let partial = gdir.join(format!("{file}.partial"));
    let streamed = stream_snapshot(&mut c, &partial, group, &member.endpoint).await;
    let streamed = match streamed {
        Ok(s) => {
            // The same member must have served the read, the snapshot and
            // this read: one that answered after a reconnection elsewhere
            // would void the claim above.
            match c
                .get("\0tern-backup", Some(GetOptions::new().with_serializable()))
                .await
                .map_err(etcd(&member.endpoint, "reading its revision after the snapshot"))
            {
                Ok(after) if after.header().map(|h| h.member_id()) == Some(member_id) => {
                    Ok((s, after.header().map(|h| h.revision()).unwrap_or(revision_min)))
                }
                Ok(after) => Err(CommonError::Backup(format!(
                    "the {group} group's snapshot from {} was served by another member ({:016x}, not {member_id:016x}) after a reconnection: not kept",
                    member.endpoint,
                    after.header().map(|h| h.member_id()).unwrap_or(0)
                ))),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    let ((size_bytes, sha256, storage_version), revision_max) = match streamed {
        Ok(s) => s,
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
    };
    tokio::fs::rename(&partial, &path)
        .await
        .map_err(io_error(&path, "renaming the finished snapshot"))?;
    let manifest = BackupManifest {
        format: FORMAT,
        id,
        group: group.to_string(),
        file,
        taken_at_ms,
        member: member.endpoint.clone(),
        member_id: format!("{member_id:016x}"),
        cluster_id,
        revision_min,
        revision_max,
        storage_version,
        size_bytes,
        sha256,
    };
    write_manifest(&gdir, &manifest).await?;
    Ok(manifest)
}

/// Writes the snapshot stream to `path` (fsynced), checking the checksum
/// etcd sends last; returns the size, the file's SHA-256 and the storage
/// version.
async fn stream_snapshot(
    c: &mut Client,
    path: &Path,
    group: &str,
    member: &str,
) -> Result<(u64, String, String), CommonError> {
    let etcd = |what: &str| etcd_error(group, member, what);
    // create_new: two backups of one group in the same millisecond must not
    // write into one file.
    let mut out = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .await
        .map_err(io_error(path, "creating the snapshot file"))?;
    let mut stream = c.snapshot().await.map_err(etcd("starting the snapshot"))?;
    let mut data = ring::digest::Context::new(&ring::digest::SHA256);
    let mut whole = ring::digest::Context::new(&ring::digest::SHA256);
    let mut size = 0u64;
    let mut version = String::new();
    // etcd's last message is the SHA-256 of the database before it; every
    // message is written, the last one checked first.
    let mut pending: Option<Vec<u8>> = None;
    loop {
        let next = tokio::time::timeout(STALL, stream.message()).await.map_err(|_| {
            CommonError::Backup(format!(
                "the snapshot of the {group} group from {member} stalled: no data for {STALL:?} ({size} bytes received)"
            ))
        })?;
        let Some(msg) = next.map_err(etcd("streaming the snapshot"))? else {
            break;
        };
        if version.is_empty() {
            version = msg.version().to_string();
        }
        if let Some(chunk) = pending.replace(msg.blob().to_vec()) {
            data.update(&chunk);
            whole.update(&chunk);
            size += chunk.len() as u64;
            out.write_all(&chunk)
                .await
                .map_err(io_error(path, "writing the snapshot"))?;
        }
    }
    let checksum = pending.unwrap_or_default();
    if checksum.as_slice() != data.finish().as_ref() {
        return Err(CommonError::Backup(format!(
            "the snapshot of the {group} group from {member} does not match the checksum etcd sent ({} bytes received): not kept",
            size + checksum.len() as u64
        )));
    }
    whole.update(&checksum);
    size += checksum.len() as u64;
    out.write_all(&checksum)
        .await
        .map_err(io_error(path, "writing the snapshot"))?;
    out.sync_all().await.map_err(io_error(path, "syncing the snapshot"))?;
    Ok((size, hex(whole.finish().as_ref()), version))
}

async fn write_manifest(gdir: &Path, m: &BackupManifest) -> Result<(), CommonError> {
    let path = gdir.join(format!("{}.json", m.id));
    let tmp = gdir.join(format!("{}.json.partial", m.id));
    let body = serde_json::to_vec_pretty(m).expect("a manifest serialises");
    let mut f = tokio::fs::File::create(&tmp)
        .await
        .map_err(io_error(&tmp, "writing the manifest"))?;
    f.write_all(&body)
        .await
        .map_err(io_error(&tmp, "writing the manifest"))?;
    f.sync_all().await.map_err(io_error(&tmp, "syncing the manifest"))?;
    tokio::fs::rename(&tmp, &path)
        .await
        .map_err(io_error(&path, "renaming the manifest"))?;
    // The renames are durable once the directory is.
    if let Ok(d) = tokio::fs::File::open(gdir).await {
        let _ = d.sync_all().await;
    }
    Ok(())
}

/// The complete backups of `group` under `dir`, oldest first. A manifest
/// that cannot be read is an error naming it: a backup that is silently
/// skipped is one an operator believes they have.
pub fn list(dir: &Path, group: &str) -> Result<Vec<BackupManifest>, CommonError> {
    let gdir = group_dir(dir, group);
    let entries = match std::fs::read_dir(&gdir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(&gdir, "listing backups")(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(io_error(&gdir, "listing backups"))?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let body = match std::fs::read(&path) {
            Ok(b) => b,
            // Deleted since the directory was read (a prune): not a backup.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(&path, "reading the manifest")(e)),
        };
        let m: BackupManifest = serde_json::from_slice(&body)
            .map_err(|e| CommonError::Backup(format!("{}: not a tern backup manifest: {e}", path.display())))?;
        if m.format != FORMAT {
            return Err(CommonError::Backup(format!(
                "{}: manifest format {} (this tern reads format {FORMAT})",
                path.display(),
                m.format
            )));
        }
        out.push(m);
    }
    out.sort_by(|a, b| (a.taken_at_ms, &a.id).cmp(&(b.taken_at_ms, &b.id)));
    Ok(out)
}

/// Groups with a backup directory under `dir`.
pub fn groups(dir: &Path) -> Result<Vec<String>, CommonError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir, "listing backups"))? {
        let entry = entry.map_err(io_error(dir, "listing backups"))?;
        if entry.path().is_dir() {
            out.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes the oldest backups of `group` until `keep` remain (the manifest
/// first, so a half-deleted backup is never listed), and the files an
/// interrupted backup left more than an hour ago; returns those deleted.
pub fn prune(dir: &Path, group: &str, keep: usize) -> Result<Vec<BackupManifest>, CommonError> {
    let gdir = group_dir(dir, group);
    let all = list(dir, group)?;
    let excess = all.len().saturating_sub(keep.max(1));
    let mut gone = Vec::new();
    for m in all.into_iter().take(excess) {
        // Another pruner (an agent that led a moment ago) may have been
        // first: what is gone already is not an error.
        for path in [gdir.join(format!("{}.json", m.id)), m.snapshot_path(&gdir)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path, "deleting an old backup")(e)),
            }
        }
        gone.push(m);
    }
    // Left by an interrupted backup, more than an hour ago: a `.partial`
    // snapshot, or a snapshot whose manifest was never written.
    let listed: std::collections::BTreeSet<String> = list(dir, group)?.into_iter().map(|m| m.file).collect();
    if let Ok(entries) = std::fs::read_dir(&gdir) {
        for entry in entries.flatten() {
            let stale = entry
                .metadata()
                .and_then(|md| md.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() > 3600);
            let name = entry.file_name().to_string_lossy().into_owned();
            if stale && (name.ends_with(".partial") || (name.ends_with(".db") && !listed.contains(&name))) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(gone)
}

/// Checks a backup's snapshot against its manifest (size and SHA-256) and
/// against the checksum etcd appended, before anything is restored from it.
pub fn verify(dir: &Path, m: &BackupManifest) -> Result<(), CommonError> {
    use std::io::Read;
    let path = m.snapshot_path(&group_dir(dir, &m.group));
    let damaged = |why: String| CommonError::Backup(format!("{}: {why}: the backup is damaged", path.display()));
    let mut f = std::fs::File::open(&path).map_err(io_error(&path, "reading the snapshot"))?;
    let len = f.metadata().map_err(io_error(&path, "reading the snapshot"))?.len();
    if len != m.size_bytes || len < 32 {
        return Err(damaged(format!("{len} bytes, the manifest says {}", m.size_bytes)));
    }
    // Streamed, not read whole: a snapshot can be gigabytes.
    let db_len = len - 32;
    let mut whole = ring::digest::Context::new(&ring::digest::SHA256);
    let mut data = ring::digest::Context::new(&ring::digest::SHA256);
    let mut appended = Vec::with_capacity(32);
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_error(&path, "reading the snapshot"))?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        whole.update(chunk);
        let in_db = (db_len.saturating_sub(read)).min(n as u64) as usize;
        data.update(&chunk[..in_db]);
        appended.extend_from_slice(&chunk[in_db..]);
        read += n as u64;
    }
    let sha = hex(whole.finish().as_ref());
    if sha != m.sha256 {
        return Err(damaged(format!("SHA-256 {sha}, the manifest says {}", m.sha256)));
    }
    if data.finish().as_ref() != appended.as_slice() {
        return Err(damaged("the database does not match the checksum etcd appended".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc_civil_times() {
        assert_eq!(utc_stamp(0), "19700101T000000.000Z");
        // 2026-12-02 16:25:12.345 UTC
        assert_eq!(utc_stamp(1_796_228_712_345), "20261202T162512.345Z");
        // A leap day.
        assert_eq!(utc_stamp(951_782_400_000), "20000229T000000.000Z");
    }

    fn manifest(id: &str, at: u64) -> BackupManifest {
        BackupManifest {
            format: FORMAT,
            id: id.into(),
            group: "eu-west".into(),
            file: format!("{id}.db"),
            taken_at_ms: at,
            member: "http://m".into(),
            member_id: "1".into(),
            cluster_id: "2".into(),
            revision_min: 1,
            revision_max: 2,
            storage_version: "3.6.0".into(),
            size_bytes: 0,
            sha256: String::new(),
        }
    }

    #[test]
    fn prune_keeps_the_newest_and_never_lists_a_backup_without_its_manifest() {
        let dir = tempfile::tempdir().expect("test fixture");
        let gdir = group_dir(dir.path(), "eu-west");
        std::fs::create_dir_all(&gdir).expect("test fixture");
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            let m = manifest(id, 1000 + i as u64);
            std::fs::write(gdir.join(&m.file), b"db").expect("test fixture");
            std::fs::write(
                gdir.join(format!("{id}.json")),
                serde_json::to_vec(&m).expect("test fixture"),
            )
            .expect("test fixture");
        }
        // An interrupted backup: its snapshot only.
        std::fs::write(gdir.join("d.db"), b"db").expect("test fixture");
        let ids = |v: Vec<BackupManifest>| v.into_iter().map(|m| m.id).collect::<Vec<_>>();
        assert_eq!(ids(list(dir.path(), "eu-west").expect("test fixture")), ["a", "b", "c"]);
        assert_eq!(ids(prune(dir.path(), "eu-west", 2).expect("test fixture")), ["a"]);
        assert!(!gdir.join("a.db").exists());
        assert_eq!(ids(list(dir.path(), "eu-west").expect("test fixture")), ["b", "c"]);
        // Never below one.
        assert_eq!(ids(prune(dir.path(), "eu-west", 0).expect("test fixture")), ["b"]);
        assert!(list(dir.path(), "nowhere").expect("test fixture").is_empty());
    }

    #[test]
    fn a_damaged_manifest_or_snapshot_is_named() {
        let dir = tempfile::tempdir().expect("test fixture");
        let gdir = group_dir(dir.path(), "eu-west");
        std::fs::create_dir_all(&gdir).expect("test fixture");
        std::fs::write(gdir.join("x.json"), b"{").expect("test fixture");
        let e = list(dir.path(), "eu-west").expect_err("refused").to_string();
        assert!(e.contains("x.json") && e.contains("not a tern backup manifest"), "{e}");
        std::fs::remove_file(gdir.join("x.json")).expect("test fixture");

        let db = b"database".to_vec();
        let mut body = db.clone();
        body.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, &db).as_ref());
        std::fs::write(gdir.join("y.db"), &body).expect("test fixture");
        let mut m = manifest("y", 1);
        m.size_bytes = body.len() as u64;
        m.sha256 = hex(ring::digest::digest(&ring::digest::SHA256, &body).as_ref());
        verify(dir.path(), &m).expect("test fixture");
        // One flipped byte.
        body[0] ^= 1;
        std::fs::write(gdir.join("y.db"), &body).expect("test fixture");
        let e = verify(dir.path(), &m).expect_err("refused").to_string();
        assert!(e.contains("y.db") && e.contains("damaged"), "{e}");
    }
}
