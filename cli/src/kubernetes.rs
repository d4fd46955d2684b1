//! The Kubernetes client of `tern status NAME` and `tern migrate --cluster`
//! (also `kubectl tern …`): from `--kubeconfig`, else $KUBECONFIG,
//! ~/.kube/config or the in-cluster service account, as kubectl finds it.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::CliError;

pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, CliError> {
    let config = match kubeconfig {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| CliError::Io {
                path: path.display().to_string(),
                source,
            })?;
            let kc = Kubeconfig::from_yaml(&text).map_err(|e| CliError::Kubernetes {
                what: "reading the kubeconfig".into(),
                source: Box::new(e),
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| CliError::Kubernetes {
                    what: "reading the kubeconfig".into(),
                    source: Box::new(e),
                })?
        }
        None => kube::Config::infer().await.map_err(|e| CliError::Kubernetes {
            what: "no in-cluster or $KUBECONFIG configuration".into(),
            source: Box::new(e),
        })?,
    };
    kube::Client::try_from(config).map_err(|e| CliError::Kubernetes {
        what: "building the client".into(),
        source: Box::new(e),
    })
}
