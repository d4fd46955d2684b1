//! Server-side apply with the operator's one field manager, reporting whether
//! the object was created, changed or already as desired (an unchanged apply
//! does not move the resourceVersion), so events are only sent for real
//! changes.

use std::fmt::Debug;

use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::core::NamespaceResourceScope;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::KubeContext;
use crate::{Result, names};

/// What an apply did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Updated,
    Unchanged,
}

/// Applies `obj` in its namespace.
pub async fn apply<K>(client: &Client, obj: &K) -> Result<Outcome>
where
    K: Resource<Scope = NamespaceResourceScope> + Serialize + DeserializeOwned + Clone + Debug,
    K::DynamicType: Default,
{
    let namespace = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let api: Api<K> = Api::namespaced(client.clone(), &namespace);
    let before = api
        .get_opt(&name)
        .await
        .context(|| format!("reading {kind} {namespace}/{name}"))?
        .and_then(|o| o.resource_version());
    let after = api
        .patch(
            &name,
            &PatchParams::apply(names::FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await
        .context(|| format!("applying {kind} {namespace}/{name}"))?;
    Ok(match before {
        None => Outcome::Created,
        Some(rv) if Some(rv.as_str()) != after.resource_version().as_deref() => Outcome::Updated,
        Some(_) => Outcome::Unchanged,
    })
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
