//! Desired objects as pure functions of a spec: no client, no clock. The
//! controllers apply what these return, and most of the operator's tests are
//! plain unit tests of them.

pub mod components;
pub mod geocluster;
pub mod network;
pub mod regiongroup;
pub mod restore;

/// What every container tern runs may not do: gain privileges, or write
/// anywhere but its volumes.
pub(crate) fn locked_down() -> k8s_openapi::api::core::v1::SecurityContext {
    k8s_openapi::api::core::v1::SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        ..Default::default()
    }
}

/// `POD_NAME` from the downward API: every tern container names itself
/// with it (election identity, trace instance, event reporter).
pub(crate) fn pod_name_env() -> k8s_openapi::api::core::v1::EnvVar {
    downward_env("POD_NAME", "metadata.name")
}

/// `POD_IP` from the downward API: the agent advertises its HTTP endpoint
/// at it, for its routers to ask about the region's lease.
pub(crate) fn pod_ip_env() -> k8s_openapi::api::core::v1::EnvVar {
    downward_env("POD_IP", "status.podIP")
}

fn downward_env(name: &str, field_path: &str) -> k8s_openapi::api::core::v1::EnvVar {
    use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector};
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// Mounts certificate Secret `secret` (ca.crt, tls.crt, tls.key) read-only
/// at [`crate::names::TLS_MOUNT`] in every container of `pod`. The kubelet
/// refreshes a mounted Secret in place when cert-manager renews it, and
/// tern's processes (and etcd) read the files again: no restart.
pub(crate) fn mount_tls(pod: &mut k8s_openapi::api::core::v1::PodSpec, secret: &str) {
    use k8s_openapi::api::core::v1::{SecretVolumeSource, Volume, VolumeMount};
    pod.volumes.get_or_insert_default().push(Volume {
        name: "tls".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_string()),
            optional: Some(false),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    });
    for c in &mut pod.containers {
        c.volume_mounts.get_or_insert_default().push(VolumeMount {
            name: "tls".into(),
            mount_path: crate::names::TLS_MOUNT.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use tern_crds::GeoCluster;

    /// examples/geocluster.yaml with the uid and namespace the API server
    /// would give it.
    pub fn example() -> GeoCluster {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/geocluster.yaml");
        let text = std::fs::read_to_string(path).expect("the example exists");
        let mut gc: GeoCluster = serde_yaml::from_str(&text).expect("the example parses");
        gc.metadata.uid = Some("0000-uid".into());
        gc
    }

    /// `gc` with spec.backup: the claim `tern-backups`, hourly, 24 kept.
    pub fn with_backups(gc: &mut GeoCluster) {
        gc.spec.backup = Some(tern_crds::BackupSpec {
            claim_name: "tern-backups".into(),
            every: "1h".into(),
            keep: 24,
        });
    }
}
