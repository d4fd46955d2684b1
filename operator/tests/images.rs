//! The image names are the same everywhere: the operator's defaults for the
//! router and agent, the operator's own Deployment in the install bundle,
//! the names operator/deploy/images/build.sh builds, and the etcd image the
//! CRDs default to (which the node e2e rebuilds under that name).

use std::path::Path;
use std::process::Command;

use tern_operator::build::components::{DEFAULT_AGENT_IMAGE, DEFAULT_IMAGE};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("operator/ is in the repository")
}

#[test]
fn every_place_names_the_same_images() {
    let out = Command::new(repo().join("operator/deploy/images/build.sh"))
        .arg("--print-names")
        .output()
        .expect("build.sh runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let version = env!("CARGO_PKG_VERSION");
    let operator = format!("ghcr.io/tern-dev/tern-operator:{version}");
    assert_eq!(
        names,
        vec![
            operator.clone(),
            DEFAULT_IMAGE.to_string(),
            DEFAULT_AGENT_IMAGE.to_string(),
            tern_crds::DEFAULT_ETCD_IMAGE.to_string(),
        ],
        "build.sh --print-names"
    );

    let deployment = std::fs::read_to_string(repo().join("operator/deploy/base/deployment.yaml")).expect("readable");
    assert!(
        deployment.contains(&format!("image: {operator}")),
        "operator/deploy/base/deployment.yaml must run {operator}"
    );
    let kustomization: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("operator/deploy/base/kustomization.yaml")).expect("readable"),
    )
    .expect("YAML");
    let image = &kustomization["images"][0];
    assert_eq!(image["name"].as_str(), Some("ghcr.io/tern-dev/tern-operator"));
    assert_eq!(image["newTag"].as_str(), Some(version), "the bundle's operator tag");
}
