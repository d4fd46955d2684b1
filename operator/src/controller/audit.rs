//! The audit trail of automatic moves. For every move the agents decided
//! themselves (follow the sun: intents `sun-…` in the directory) into a
//! region this operator manages, it creates an AccountMigration that
//! records it: `spec.recordsIntent` names the intent, so the migration
//! controller only reports its progress and never carries it out again.
//! The objects belong to their GeoCluster (deleted with it) and are
//! labelled `tern.dev/trigger=follow-the-sun`; the newest
//! `--automatic-migration-history` are kept per GeoCluster, older ones
//! deleted. In a multi-cluster deployment each move is recorded once, in
//! the cluster whose operator manages its target region.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::GetOptions;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Resource, ResourceExt};
use tern_common::{DIR_MIGRATIONS, MigrationRecord};
use tern_crds::{AccountMigration, AccountMigrationSpec, GeoCluster};

use crate::context::Context;
use crate::error::KubeContext;
use crate::{Error, Result, names};

/// Label of the objects this module makes, and its value.
pub const LABEL_TRIGGER: &str = "tern.dev/trigger";
pub const TRIGGER: &str = "follow-the-sun";
/// Annotation with the intent's request time (Unix ms), for trimming.
pub const ANNOTATION_REQUESTED: &str = "tern.dev/requested-ms";
/// How often the directory is looked at.
const EVERY: Duration = Duration::from_secs(2);

/// Records automatic moves until the operator stops.
pub async fn run(client: kube::Client, namespace: String, ctx: Arc<Context>) {
    if ctx.automatic_history == 0 {
        return;
    }
    loop {
        if let Err(e) = round(&client, &namespace, &ctx).await {
            tracing::warn!(error = %e, "recording automatic migrations failed; trying again");
        }
        tokio::time::sleep(EVERY).await;
    }
}

async fn round(client: &kube::Client, namespace: &str, ctx: &Context) -> Result<()> {
    for gc in super::migration::list_geoclusters(client, namespace).await? {
        if !gc.spec.follow_the_sun.enabled || gc.meta().deletion_timestamp.is_some() {
            continue;
        }
        if let Err(e) = record(client, &gc, ctx).await {
            tracing::warn!(geocluster = %gc.name_any(), error = %e, "recording automatic migrations failed");
        }
    }
    Ok(())
}

/// The object name of intent `id`: DNS-safe, and distinct for distinct ids
/// (a hash of the exact id ends it).
pub fn object_name(id: &str) -> String {
    let mut base: String = id
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() { c } else { '-' }
        })
        .collect();
    base.truncate(200);
    let base = base.trim_matches('-');
    format!("{base}-{}", &crate::hash::hex(id.as_bytes())[..8])
}

async fn record(client: &kube::Client, gc: &GeoCluster, ctx: &Context) -> Result<()> {
    let namespace = gc.namespace().unwrap_or_default();
    let cluster = gc.name_any();
    let dir = super::migration::geocluster_directory(ctx, gc).await?;
    let prefix = format!("{DIR_MIGRATIONS}{}", tern_common::AUTOMATIC_MIGRATION_PREFIX);
    let resp = dir
        .clone()
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| Error::Directory {
            what: "reading the automatic migrations".into(),
            reason: e.to_string(),
        })?;
    let regions: HashSet<&str> = gc.spec.regions.iter().map(|r| r.name.as_str()).collect();
    let mut intents: Vec<(String, MigrationRecord)> = resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let id = tern_common::migration_of_dir_key(kv.key())?.to_string();
            let r: MigrationRecord = serde_json::from_slice(kv.value()).ok()?;
            (regions.contains(r.target.as_str()) && ctx.managed.contains(r.target.as_str())).then_some((id, r))
        })
        .collect();
    intents.sort_by_key(|(_, r)| std::cmp::Reverse(r.requested_ms));
    let api: Api<AccountMigration> = Api::namespaced(client.clone(), &namespace);
    let selector = format!("{LABEL_TRIGGER}={TRIGGER},{}={cluster}", names::LABEL_CLUSTER);
    let existing = api
        .list(&ListParams::default().labels(&selector))
        .await
        .context(|| format!("listing the automatic migrations of {cluster}"))?;
    // The records to keep: the newest among what is recorded and what could
    // be (an intent trimmed from the directory keeps its record while it
    // is among them). Decided over both, so a round never deletes what the
    // next would create again.
    let mut universe: BTreeMap<String, u64> = BTreeMap::new();
    let mut objects: BTreeMap<String, String> = BTreeMap::new();
    for m in &existing.items {
        let Some(id) = m.spec.records_intent.clone() else {
            continue;
        };
        let at = m
            .annotations()
            .get(ANNOTATION_REQUESTED)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        universe.insert(id.clone(), at);
        objects.insert(id, m.name_any());
    }
    for (id, r) in &intents {
        universe.entry(id.clone()).or_insert(r.requested_ms);
    }
    let mut ranked: Vec<(u64, String)> = universe.into_iter().map(|(id, at)| (at, id)).collect();
    ranked.sort_by(|a, b| b.cmp(a));
    let keep: HashSet<String> = ranked
        .into_iter()
        .take(ctx.automatic_history)
        .map(|(_, id)| id)
        .collect();
    let owner = gc.controller_owner_ref(&());
    for (id, r) in intents
        .iter()
        .filter(|(id, _)| keep.contains(id) && !objects.contains_key(id))
    {
        let mut reason = r.reason.clone();
        if reason.len() > 256 {
            let mut cut = 253;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
            reason.push('…');
        }
        let object = AccountMigration {
            metadata: ObjectMeta {
                name: Some(object_name(id)),
                namespace: Some(namespace.clone()),
                labels: Some(BTreeMap::from([
                    (LABEL_TRIGGER.to_string(), TRIGGER.to_string()),
                    (names::LABEL_CLUSTER.to_string(), cluster.clone()),
                    (names::LABEL_MANAGED_BY.to_string(), names::MANAGER.to_string()),
                ])),
                annotations: Some(BTreeMap::from([(
                    ANNOTATION_REQUESTED.to_string(),
                    r.requested_ms.to_string(),
                )])),
                owner_references: owner.clone().map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            spec: AccountMigrationSpec {
                geo_cluster: cluster.clone(),
                account: r.account.to_string(),
                target_region: r.target.to_string(),
                expected_source_region: r.expected_source.as_ref().map(ToString::to_string),
                reason: Some(reason),
                records_intent: Some(id.clone()),
            },
            status: None,
        };
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => {
                tracing::info!(migration = %id, account = %r.account, to = %r.target, "recorded an automatic migration")
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => {
                return Err(e).context(|| format!("recording automatic migration {id}"));
            }
        }
    }
    for (id, name) in objects.iter().filter(|(id, _)| !keep.contains(*id)) {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(migration = %id, object = %name, "deleted an old record of an automatic migration"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e).context(|| format!("deleting old automatic migration {name}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::object_name;

    #[test]
    fn object_names_are_dns_safe_and_distinct() {
        let a = object_name("sun-Acct_1:x@y-1800000000000");
        assert!(a.starts_with("sun-acct-1-x-y-1800000000000-"), "{a}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{a}"
        );
        assert_ne!(
            object_name("sun-A-1"),
            object_name("sun-a-1"),
            "case kept apart by the hash"
        );
        let long = object_name(&format!("sun-{}-1", "x".repeat(250)));
        assert!(long.len() <= 253, "{}", long.len());
    }
}
