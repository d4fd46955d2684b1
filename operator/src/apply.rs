//! Server-side apply with the operator's one field manager, skipped when the
//! stored object is already as desired (so an idle reconcile writes
//! nothing), reporting whether the object was created, changed or already as
//! desired, so events are only sent for real changes.

use std::fmt::Debug;

use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::core::NamespaceResourceScope;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::KubeContext;
use crate::{Result, names};

/// What an apply did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Updated,
    Unchanged,
}

/// Applies `obj` in its namespace, unless the object already is as desired:
/// then nothing is written, so a reconcile that changes nothing makes no
/// write request at all (an unchanged server-side apply would still be one).
///
/// "As desired" means the stored object holds every field of `obj` with the
/// same value (the API server adds defaults, which are not differences) and
/// carries the hash of `obj` in [`names::ANNOTATION_APPLIED_HASH`]: a field
/// that `obj` no longer sets changes the hash, so it is applied and server-
/// side apply removes the field; a field someone else changed fails the
/// comparison, so it is put back.
pub async fn apply<K>(client: &Client, obj: &K) -> Result<Outcome>
where
    K: Resource<Scope = NamespaceResourceScope> + Serialize + DeserializeOwned + Clone + Debug,
    K::DynamicType: Default,
{
    let (api, obj, kind) = prepare(client, obj)?;
    let name = obj.name_any();
    let namespace = obj.namespace().unwrap_or_default();
    let existing = api
        .get_opt(&name)
        .await
        .context(|| format!("reading {kind} {namespace}/{name}"))?;
    let Some(existing) = existing else {
        api.patch(
            &name,
            &PatchParams::apply(names::FIELD_MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await
        .context(|| format!("applying {kind} {namespace}/{name}"))?;
        return Ok(Outcome::Created);
    };
    if as_desired(&existing, &obj, &kind)? {
        return Ok(Outcome::Unchanged);
    }
    let rv = existing.resource_version();
    let after = api
        .patch(
            &name,
            &PatchParams::apply(names::FIELD_MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await
        .context(|| format!("applying {kind} {namespace}/{name}"))?;
    Ok(if rv != after.resource_version() {
        Outcome::Updated
    } else {
        Outcome::Unchanged
    })
}

/// Like [`apply`], but only to an object that exists: `None`, and nothing
/// written, once it has gone. For an object whose absence the caller acts
/// on, such as a data group's StatefulSet: a reconcile that found it, and
/// applies it after someone deleted it, would otherwise make it again,
/// past the checks made only when it is absent (a restore's).
///
/// Each write names the object it was read as ([`apply_to`]), so a delete
/// between the read and the write cannot turn it into a create.
pub async fn apply_existing<K>(client: &Client, obj: &K) -> Result<Option<Outcome>>
where
    K: Resource<Scope = NamespaceResourceScope> + Serialize + DeserializeOwned + Clone + Debug,
    K::DynamicType: Default,
{
    // Another object of the same name made between a read and a write
    // (someone deleted and made it again) is read and written in turn.
    const ATTEMPTS: usize = 3;
    let (api, obj, kind) = prepare(client, obj)?;
    let name = obj.name_any();
    let namespace = obj.namespace().unwrap_or_default();
    let read = || async {
        api.get_opt(&name)
            .await
            .context(|| format!("reading {kind} {namespace}/{name}"))
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let Some(existing) = read().await? else {
            return Ok(None);
        };
        if as_desired(&existing, &obj, &kind)? {
            return Ok(Some(Outcome::Unchanged));
        }
        let uid = existing.uid().unwrap_or_default();
        match apply_to(&api, &obj, &uid).await {
            Ok(after) => {
                return Ok(Some(if after.resource_version() != existing.resource_version() {
                    Outcome::Updated
                } else {
                    Outcome::Unchanged
                }));
            }
            Err(e) => match read().await? {
                None => return Ok(None),
                Some(now) if now.uid().as_deref() != Some(uid.as_str()) && attempt < ATTEMPTS => {
                    tracing::debug!(%kind, %namespace, %name, "made again while applied; applying to the new one");
                }
                Some(_) => {
                    return Err(crate::Error::Kube {
                        action: format!("applying {kind} {namespace}/{name} (uid {uid})"),
                        source: e,
                    });
                }
            },
        }
    }
}

/// Server-side applies `obj` only to the stored object with this `uid`:
/// refused (409 Conflict) when no object of its name exists, rather than
/// made, and refused (422, uid immutable) when another object has taken
/// the name since.
pub async fn apply_to<K>(api: &Api<K>, obj: &K, uid: &str) -> kube::Result<K>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let mut obj = obj.clone();
    obj.meta_mut().uid = Some(uid.to_string());
    api.patch(
        &obj.name_any(),
        &PatchParams::apply(names::FIELD_MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await
}

/// The API for `obj`, `obj` with its applied hash, and its kind.
fn prepare<K>(client: &Client, obj: &K) -> Result<(Api<K>, K, String)>
where
    K: Resource<Scope = NamespaceResourceScope> + Serialize + Clone,
    K::DynamicType: Default,
{
    let namespace = obj.namespace().unwrap_or_default();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    Ok((
        Api::namespaced(client.clone(), &namespace),
        with_applied_hash(obj)?,
        kind,
    ))
}

/// Whether the stored object already holds every field of `want`.
fn as_desired<K: Resource + Serialize>(existing: &K, want: &K, kind: &str) -> Result<bool> {
    match first_difference(&to_json(existing)?, &to_json(want)?, "") {
        None => Ok(true),
        Some(path) => {
            tracing::debug!(%kind, name = %existing.meta().name.as_deref().unwrap_or_default(), %path, "differs from the desired object");
            Ok(false)
        }
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<Value> {
    serde_json::to_value(value).map_err(|e| crate::Error::Serialize(e.to_string()))
}

/// `obj` with the hash of itself (without that annotation) in
/// [`names::ANNOTATION_APPLIED_HASH`].
fn with_applied_hash<K: Resource + Serialize + Clone>(obj: &K) -> Result<K> {
    let mut obj = obj.clone();
    let meta = obj.meta_mut();
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(names::ANNOTATION_APPLIED_HASH);
        if a.is_empty() {
            meta.annotations = None;
        }
    }
    let bytes = serde_json::to_vec(&obj).map_err(|e| crate::Error::Serialize(e.to_string()))?;
    obj.meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(names::ANNOTATION_APPLIED_HASH.to_string(), crate::hash::hex(&bytes));
    Ok(obj)
}

/// The path of the first field of `want` that `have` lacks or holds with
/// another value; `None` when `have` holds all of `want`. An empty value
/// in `want` (null, "", [], {}) matches a missing field, because the API
/// server drops empty optional fields.
pub fn first_difference(have: &Value, want: &Value, path: &str) -> Option<String> {
    let empty = |v: &Value| match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    };
    match (have, want) {
        (_, w) if empty(w) && (have.is_null() || empty(have)) => None,
        (Value::Object(h), Value::Object(w)) => w.iter().find_map(|(k, wv)| {
            let here = format!("{path}.{k}");
            match h.get(k) {
                Some(hv) => first_difference(hv, wv, &here),
                None if empty(wv) => None,
                None => Some(here),
            }
        }),
        (Value::Array(h), Value::Array(w)) if h.len() == w.len() => h
            .iter()
            .zip(w)
            .enumerate()
            .find_map(|(i, (hv, wv))| first_difference(hv, wv, &format!("{path}[{i}]"))),
        (Value::Number(h), Value::Number(w)) => (h.as_f64() != w.as_f64()).then(|| path.to_string()),
        (h, w) => (h != w).then(|| path.to_string()),
    }
}

/// Deletes every `K` in `namespace` that matches `selector`; returns their
/// names.
pub async fn delete_matching<K>(client: &Client, namespace: &str, selector: &str) -> Result<Vec<String>>
where
    K: Resource<Scope = NamespaceResourceScope> + DeserializeOwned + Clone + Debug,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let list = api
        .list(&ListParams::default().labels(selector))
        .await
        .context(|| format!("listing {kind} in {namespace} with {selector}"))?;
    let mut deleted = Vec::new();
    for obj in list {
        let name = obj.name_any();
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => deleted.push(name),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                return Err(crate::Error::Kube {
                    action: format!("deleting {kind} {namespace}/{name}"),
                    source: e,
                });
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_added_by_the_server_are_no_difference() {
        let want = json!({"spec": {"replicas": 3, "args": ["a"], "env": [], "note": ""}});
        let have = json!({"spec": {"replicas": 3, "args": ["a"], "revisionHistoryLimit": 10}});
        assert_eq!(first_difference(&have, &want, ""), None);
    }

    #[test]
    fn a_changed_or_missing_field_is_named() {
        let want = json!({"spec": {"replicas": 3, "args": ["a", "b"]}});
        let changed = json!({"spec": {"replicas": 5, "args": ["a", "b"]}});
        assert_eq!(first_difference(&changed, &want, "").as_deref(), Some(".spec.replicas"));
        let shorter = json!({"spec": {"replicas": 3, "args": ["a"]}});
        assert_eq!(first_difference(&shorter, &want, "").as_deref(), Some(".spec.args"));
        let missing = json!({"spec": {"args": ["a", "b"]}});
        assert_eq!(first_difference(&missing, &want, "").as_deref(), Some(".spec.replicas"));
    }

    #[test]
    fn the_applied_hash_follows_the_object() {
        use k8s_openapi::api::core::v1::ConfigMap;
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some("x".into());
        let a = with_applied_hash(&cm).expect("serialises");
        assert_eq!(
            with_applied_hash(&a).expect("serialises").metadata,
            a.metadata,
            "stable"
        );
        cm.data = Some([("k".to_string(), "v".to_string())].into());
        let b = with_applied_hash(&cm).expect("serialises");
        assert_ne!(a.metadata.annotations, b.metadata.annotations);
    }
}
