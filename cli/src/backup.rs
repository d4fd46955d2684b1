//! `tern backup now|list` and `tern restore`: etcd snapshots of a region's
//! group (or the directory's) kept in a directory, and a group's members
//! rebuilt from one.
//!
//! A backup holds every write the group acknowledged before it began
//! (`tern_common::backup::take`). A restore brings the group back to the
//! backup's revision: writes acknowledged after it are lost, and the
//! restore says from when. etcd keeps no log to replay past a snapshot, so
//! there is no point-in-time recovery between backups; the other regions'
//! mirrors of the group are the copy that is seconds old (`tern failover`).
//!
//! Revisions restart far above the lost group's (`--bump-revision`) with
//! the history before marked compacted: every watch and mirror of the group
//! resumes at a revision it has seen, is told it was compacted, and
//! resynchronises from a full read instead of silently skipping the
//! revisions the restored group hands out again.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::{Args, Subcommand};
use tern_common::backup::{self, BackupManifest};

use crate::CliError;

#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(subcommand)]
    command: BackupCommand,
}

#[derive(Subcommand, Debug)]
enum BackupCommand {
    /// Take a backup now: an etcd snapshot streamed from the group's most
    /// caught-up follower (the leader if none answers) into DIR/GROUP/,
    /// with a manifest; it holds every write acknowledged before it began.
    Now(NowArgs),
    /// The backups in a directory, oldest first, with the revisions they
    /// cover.
    List(ListArgs),
}

#[derive(Args, Debug)]
struct NowArgs {
    /// A region name, or `directory` for the directory group.
    group: String,
    /// Directory of the backups (one subdirectory per group).
    #[arg(long, value_name = "DIR", env = "TERN_BACKUP_DIR")]
    to: PathBuf,
    /// Keep this many of the group's newest backups and delete older ones
    /// (at least 1); default: delete none.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    keep: Option<u32>,
    /// Client URLs of the group; default: as its agent published them in
    /// the directory.
    #[arg(long = "group", value_name = "URLS", value_delimiter = ',')]
    members: Vec<String>,
    /// Client URLs of the directory group (printed by `tern demo --keep`).
    #[arg(long, env = "TERN_DIRECTORY_ENDPOINTS", value_delimiter = ',')]
    directory: Vec<String>,
}

#[derive(Args, Debug)]
struct ListArgs {
    /// Only this group's backups.
    group: Option<String>,
    /// Directory of the backups.
    #[arg(long, value_name = "DIR", env = "TERN_BACKUP_DIR")]
    to: PathBuf,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The group the backup is of: a region name, or `directory`.
    group: String,
    /// Directory of the backups.
    #[arg(long, value_name = "DIR", env = "TERN_BACKUP_DIR")]
    from: PathBuf,
    /// The backup's id (`tern backup list`); default: the group's newest.
    #[arg(long, value_name = "ID")]
    backup: Option<String>,
    /// This member's name; it must be in --initial-cluster.
    #[arg(long, value_name = "NAME")]
    name: String,
    /// Where this member's data goes; must not exist or be empty.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Every member of the restored group, as etcd's --initial-cluster:
    /// NAME=PEER_URL,... (restore each member from the same backup, then
    /// start them all).
    #[arg(long, value_name = "NAME=URL,...")]
    initial_cluster: String,
    /// How far the restored group's revisions start above the backup's. It
    /// must exceed the writes the lost group applied after the backup, so
    /// that no revision means two things; etcd's advice when unknown is a
    /// billion.
    #[arg(long, value_name = "N", default_value_t = 1_000_000_000)]
    bump_revision: u64,
    /// The etcdutl binary; default: the pinned one beside etcd (see
    /// --assets of `tern demo`), else etcdutl on PATH.
    #[arg(long, value_name = "PATH")]
    etcdutl: Option<PathBuf>,
}

pub async fn run(args: BackupArgs) -> Result<(), CliError> {
    match args.command {
        BackupCommand::Now(a) => now(a).await,
        BackupCommand::List(a) => list(a),
    }
}

fn group_name(group: &str) -> Result<(), CliError> {
    if group == "directory" {
        return Ok(());
    }
    tern_common::RegionName::new(group)
        .map(|_| ())
        .map_err(|e| CliError::Usage(format!("GROUP: {e} (or `directory`)")))
}

async fn now(a: NowArgs) -> Result<(), CliError> {
    group_name(&a.group)?;
    let endpoints = crate::group_endpoints(&a.group, &a.members, &a.directory).await?;
    let m = backup::take(&endpoints, crate::tls(), &a.group, &a.to).await?;
    println!(
        "backup {} of the {} group: {} bytes from {}, revisions {}..={} (every write acknowledged before it began is in it)",
        m.id, m.group, m.size_bytes, m.member, m.revision_min, m.revision_max
    );
    if let Some(keep) = a.keep {
        for gone in backup::prune(&a.to, &a.group, keep as usize)? {
            println!("deleted backup {} (keeping the newest {keep})", gone.id);
        }
    }
    Ok(())
}

fn list(a: ListArgs) -> Result<(), CliError> {
    let groups = match &a.group {
        Some(g) => {
            group_name(g)?;
            vec![g.clone()]
        }
        None => backup::groups(&a.to)?,
    };
    println!(
        "{:<40} {:<24} {:>12} {:>12} {:>12}  MEMBER",
        "BACKUP", "TAKEN (UTC)", "REVISION>=", "REVISION<=", "BYTES"
    );
    for g in groups {
        for m in backup::list(&a.to, &g)? {
            println!(
                "{:<40} {:<24} {:>12} {:>12} {:>12}  {}",
                m.id,
                backup::utc_stamp(m.taken_at_ms),
                m.revision_min,
                m.revision_max,
                m.size_bytes,
                m.member
            );
        }
    }
    Ok(())
}

/// The etcdutl to run: the flag's, the pinned one, else PATH's.
fn etcdutl(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| tern_local::assets::binary("etcdutl").ok())
        .unwrap_or_else(|| PathBuf::from("etcdutl"))
}

/// Runs etcdutl, or says what it printed.
fn run_etcdutl(bin: &Path, args: &[String], what: &str) -> Result<String, CliError> {
    let out = Command::new(bin).args(args).output().map_err(|source| CliError::Io {
        path: format!("{} (etcdutl, for {what}; --etcdutl names it)", bin.display()),
        source,
    })?;
    if !out.status.success() {
        return Err(CliError::Setup(format!(
            "etcdutl {what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The backup to restore: the named one, or the newest.
fn chosen(dir: &Path, group: &str, id: Option<&str>) -> Result<BackupManifest, CliError> {
    let all = backup::list(dir, group)?;
    let known = || {
        let ids: Vec<&str> = all.iter().map(|m| m.id.as_str()).collect();
        if ids.is_empty() {
            "none".to_string()
        } else {
            ids.join(", ")
        }
    };
    match id {
        Some(id) => all.iter().find(|m| m.id == id).cloned().ok_or_else(|| {
            CliError::Usage(format!(
                "--backup {id}: no such backup of {group} in {} (there are: {})",
                dir.display(),
                known()
            ))
        }),
        None => all
            .last()
            .cloned()
            .ok_or_else(|| CliError::Usage(format!("--from {}: no backup of {group} there", dir.display()))),
    }
}

/// What a restored member's data holds.
#[derive(Debug, serde::Deserialize)]
struct SnapshotStatus {
    revision: i64,
    #[serde(rename = "totalKey")]
    total_key: u64,
}

pub async fn restore(a: RestoreArgs) -> Result<(), CliError> {
    group_name(&a.group)?;
    let peer_url = a
        .initial_cluster
        .split(',')
        .filter_map(|m| m.split_once('='))
        .find(|(name, _)| *name == a.name)
        .map(|(_, url)| url.to_string())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "--name {}: not a member of --initial-cluster {}",
                a.name, a.initial_cluster
            ))
        })?;
    if a.bump_revision == 0 {
        return Err(CliError::Usage(
            "--bump-revision 0: the restored group would hand out revisions the lost one used, and its watchers would skip them".into(),
        ));
    }
    if std::fs::read_dir(&a.data_dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(CliError::Usage(format!(
            "--data-dir {}: not empty; a restore never writes over a member's data",
            a.data_dir.display()
        )));
    }
    let m = chosen(&a.from, &a.group, a.backup.as_deref())?;
    if m.group != a.group {
        return Err(CliError::Usage(format!(
            "--backup {}: a backup of the {} group, found under {}'s backups; restore it as {}",
            m.id, m.group, a.group, m.group
        )));
    }
    backup::verify(&a.from, &m)?;
    // The file verify just checked.
    let file = m.snapshot_path(&backup::group_dir(&a.from, &m.group));
    let bin = etcdutl(a.etcdutl);
    let status: SnapshotStatus = serde_json::from_str(&run_etcdutl(
        &bin,
        &[
            "snapshot".into(),
            "status".into(),
            file.display().to_string(),
            "-w".into(),
            "json".into(),
        ],
        "snapshot status",
    )?)
    .map_err(|e| CliError::Setup(format!("etcdutl snapshot status of {}: {e}", file.display())))?;
    run_etcdutl(
        &bin,
        &[
            "snapshot".into(),
            "restore".into(),
            file.display().to_string(),
            "--name".into(),
            a.name.clone(),
            "--data-dir".into(),
            a.data_dir.display().to_string(),
            "--initial-cluster".into(),
            a.initial_cluster.clone(),
            // Every member restored from this backup agrees on it, and a
            // member of the lost group (another token) cannot join.
            "--initial-cluster-token".into(),
            format!("tern-{}", m.id),
            "--initial-advertise-peer-urls".into(),
            peer_url,
            "--bump-revision".into(),
            a.bump_revision.to_string(),
            "--mark-compacted".into(),
        ],
        "snapshot restore",
    )?;
    println!(
        "restored member {} of the {} group into {} from backup {}: revision {} ({} keys), taken {} from {}",
        a.name,
        a.group,
        a.data_dir.display(),
        m.id,
        status.revision,
        status.total_key,
        backup::utc_stamp(m.taken_at_ms),
        m.member
    );
    println!(
        "  lost: every write the group applied after revision {} (acknowledged after the backup began at {}); the other regions' mirrors of {} may hold some of them",
        status.revision,
        backup::utc_stamp(m.taken_at_ms),
        a.group
    );
    println!(
        "  revisions now start above {}, history before is compacted: every watch and mirror of the group resynchronises",
        status.revision as u64 + a.bump_revision
    );
    Ok(())
}
