//! The certificate the operator dials a group's etcd with when the
//! GeoCluster runs TLS: a Secret in the group's namespace (`ca.crt`,
//! `tls.crt`, `tls.key`, as cert-manager writes it), read through the API
//! at every reconcile, so a renewed Secret is used from the next one on
//! without the operator mounting anything per cluster.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use tern_common::tls::{CA_FILE, CERT_FILE, ClientAuth, KEY_FILE, Tls};

use crate::{Error, Result};

/// The client certificate in Secret `namespace/name`.
pub async fn client_tls(client: &kube::Client, namespace: &str, name: &str) -> Result<Tls> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|source| Error::Kube {
            action: format!("reading Secret {namespace}/{name}"),
            source,
        })?
        .ok_or_else(|| Error::Tls {
            secret: format!("{namespace}/{name}"),
            reason: "it does not exist (spec.tls names it: create it, e.g. with a cert-manager Certificate)".into(),
        })?;
    let data = secret.data.unwrap_or_default();
    let field = |key: &str| {
        data.get(key).map(|v| v.0.clone()).ok_or_else(|| Error::Tls {
            secret: format!("{namespace}/{name}"),
            reason: format!("it has no `{key}`"),
        })
    };
    let (ca, cert, key) = (field(CA_FILE)?, field(CERT_FILE)?, field(KEY_FILE)?);
    Tls::from_pem(
        &format!("Secret {namespace}/{name}"),
        &ca,
        &cert,
        &key,
        ClientAuth::Required,
    )
    .map_err(|e| Error::Tls {
        secret: format!("{namespace}/{name}"),
        reason: e.to_string(),
    })
}
