//! `tern migrate ACCOUNT --to REGION`: asks the target region's agent to
//! move an account there and, with `--wait`, follows it to the end. Given a
//! directory (`--directory`, a local deployment), it writes the intent
//! record itself (DESIGN.md "Migration protocol"); given a GeoCluster in
//! Kubernetes (`--cluster`, as `kubectl tern migrate`), it creates an
//! AccountMigration object, which the operator carries out and whose status
//! it follows.

use std::time::Duration;

use clap::Args;
use tern_common::{AccountId, MigrationId, MigrationPhase, MigrationRecord, RegionName};
use tern_local::migrations;

use crate::CliError;

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The account to move.
    account: String,
    /// The region to move it to (its agent carries the move out).
    #[arg(long)]
    to: String,
    /// Compare-and-swap: refuse unless the account is homed here when the
    /// move starts.
    #[arg(long)]
    expect_from: Option<String>,
    /// Why, for the audit trail (kept in the intent record).
    #[arg(long, default_value = "manual")]
    reason: String,
    /// The migration's id; asking twice with one id moves the account once.
    /// Default: `cli-ACCOUNT-UNIXMS`.
    #[arg(long)]
    id: Option<String>,
    /// Follow the move until it completes, is refused or rolled back; the
    /// exit status says which.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, e.g. 60s.
    #[arg(long, default_value = "60s", value_parser = tern_common::parse_duration)]
    timeout: Duration,
    /// Client URLs of the directory group (printed by `tern demo --keep`).
    #[arg(long, env = "TERN_DIRECTORY_ENDPOINTS", value_delimiter = ',')]
    directory: Vec<String>,
    /// Or: the GeoCluster in Kubernetes; the move becomes an
    /// AccountMigration object (named by --id, default
    /// `migrate-ACCOUNT-UNIXMS` in lower case) in --namespace. Takes
    /// precedence over --directory (and TERN_DIRECTORY_ENDPOINTS).
    #[arg(long)]
    cluster: Option<String>,
    /// Namespace of the GeoCluster.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Kubeconfig; default: $KUBECONFIG or ~/.kube/config.
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
}

pub async fn run(args: MigrateArgs) -> Result<(), CliError> {
    let account = AccountId::new(&args.account).map_err(|e| CliError::Usage(format!("ACCOUNT: {e}")))?;
    let to = RegionName::new(&args.to).map_err(|e| CliError::Usage(format!("--to: {e}")))?;
    let expect_from = args
        .expect_from
        .as_deref()
        .map(RegionName::new)
        .transpose()
        .map_err(|e| CliError::Usage(format!("--expect-from: {e}")))?;
    if expect_from.as_ref() == Some(&to) {
        return Err(CliError::Usage(format!(
            "--expect-from and --to are both {to}: the account would not move"
        )));
    }
    if let Some(cluster) = &args.cluster {
        return kubernetes(&args, cluster, &account, &to, expect_from.as_ref()).await;
    }
    if args.directory.is_empty() {
        return Err(CliError::Usage(
            "name a directory (--directory URLS, a local deployment) or a GeoCluster in Kubernetes (--cluster NAME)"
                .into(),
        ));
    }
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("cli-{account}-{}", tern_common::unix_ms()));
    let id = MigrationId::new(id).map_err(|e| CliError::Usage(format!("--id: {e}")))?;
    reserved(&id)?;
    let directory = crate::etcd(&args.directory, "directory", Duration::from_secs(10)).await?;
    let created = migrations::request(&directory, &id, &account, &to, expect_from, &args.reason).await?;
    if created {
        println!("migration {id}: {account} to {to} requested");
    } else {
        println!("migration {id} exists already; following it");
    }
    if !args.wait {
        return Ok(());
    }
    let done = migrations::wait(&directory, &id, args.timeout, |r| println!("  {}", describe(r))).await?;
    match done.phase {
        MigrationPhase::Completed => Ok(()),
        _ => Err(CliError::Setup(format!(
            "migration {id} {}: {}",
            phase_name(done.phase),
            done.message.as_deref().unwrap_or("no reason given")
        ))),
    }
}

/// The move as an AccountMigration object, followed through its status.
async fn kubernetes(
    args: &MigrateArgs,
    cluster: &str,
    account: &AccountId,
    to: &RegionName,
    expect_from: Option<&RegionName>,
) -> Result<(), CliError> {
    use kube::api::{Api, PostParams};
    use tern_crds::{AccountMigration, AccountMigrationSpec, MigrationPhase as Phase};
    let name = match &args.id {
        Some(id) => id.clone(),
        None => {
            let mut base: String = account
                .as_str()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_lowercase()
                    } else {
                        '-'
                    }
                })
                .collect();
            base.truncate(200);
            format!("migrate-{}-{}", base.trim_matches('-'), tern_common::unix_ms())
        }
    };
    let client = crate::kubernetes::client(args.kubeconfig.as_deref()).await?;
    let api: Api<AccountMigration> = Api::namespaced(client, &args.namespace);
    let object = AccountMigration::new(
        &name,
        AccountMigrationSpec {
            geo_cluster: cluster.to_string(),
            account: account.to_string(),
            target_region: to.to_string(),
            expected_source_region: expect_from.map(ToString::to_string),
            reason: Some(args.reason.clone()),
            records_intent: None,
        },
    );
    let ns = &args.namespace;
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => println!("AccountMigration {ns}/{name}: {account} to {to} requested"),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            println!("AccountMigration {ns}/{name} exists already; following it")
        }
        // The API server's schema names the field and the rule.
        Err(e) => {
            return Err(CliError::Kubernetes {
                what: format!("creating AccountMigration {ns}/{name}"),
                source: Box::new(e),
            });
        }
    }
    if !args.wait {
        return Ok(());
    }
    let until = std::time::Instant::now() + args.timeout;
    let mut last = None;
    loop {
        let m = api.get(&name).await.map_err(|e| CliError::Kubernetes {
            what: format!("reading AccountMigration {ns}/{name}"),
            source: Box::new(e),
        })?;
        if let Some(s) = m.status {
            let shown = (s.phase, s.message.clone());
            if last.as_ref() != Some(&shown) {
                let waited = s
                    .unavailable_ms
                    .map(|ms| format!(", writes waited at most {ms} ms"))
                    .unwrap_or_default();
                println!(
                    "  {:<12}{waited} {}",
                    format!("{:?}", s.phase),
                    s.message.as_deref().map(|m| format!("({m})")).unwrap_or_default()
                );
                last = Some(shown);
            }
            match s.phase {
                Phase::Completed => return Ok(()),
                Phase::Failed => {
                    return Err(CliError::Setup(format!(
                        "AccountMigration {ns}/{name} failed: {}",
                        s.message.as_deref().unwrap_or("no reason given")
                    )));
                }
                _ => {}
            }
        }
        if std::time::Instant::now() > until {
            return Err(CliError::Setup(format!(
                "AccountMigration {ns}/{name} did not finish within {:?}",
                args.timeout
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Ids the agents give their own moves (their limits differ): refused
/// for moves asked for by hand.
fn reserved(id: &MigrationId) -> Result<(), CliError> {
    for prefix in [
        tern_common::AUTOMATIC_MIGRATION_PREFIX,
        tern_common::DRAIN_MIGRATION_PREFIX,
        tern_common::REHOME_MIGRATION_PREFIX,
    ] {
        if id.as_str().starts_with(prefix) {
            return Err(CliError::Usage(format!(
                "--id {id}: ids starting with `{prefix}` are the agents' own (follow the sun, drains, re-homing); choose another"
            )));
        }
    }
    Ok(())
}

fn phase_name(p: MigrationPhase) -> &'static str {
    match p {
        MigrationPhase::Requested => "requested",
        MigrationPhase::Fencing => "fencing",
        MigrationPhase::Switching => "switching",
        MigrationPhase::Completed => "completed",
        MigrationPhase::RollingBack => "rolling back",
        MigrationPhase::RolledBack => "rolled back",
        MigrationPhase::Refused => "refused",
    }
}

/// One line per phase reached.
pub fn describe(r: &MigrationRecord) -> String {
    let mut line = format!("{:<12}", phase_name(r.phase));
    if let Some(s) = &r.source {
        line.push_str(&format!(" {} → {}", s, r.target));
    }
    if let Some(ms) = r.unavailable_ms {
        line.push_str(&format!(", writes waited at most {ms} ms"));
    }
    if let Some(m) = &r.message {
        line.push_str(&format!(" ({m})"));
    }
    line
}
