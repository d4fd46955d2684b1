//! The committed CRD manifests match the types, and the CEL rules in them
//! accept the examples and refuse what they should (evaluated client-side;
//! e2e/tests/validation.rs checks the same against a real API server).

use kube::core::cel::{validate_cel, validate_cel_update};
use tern_crds::{AccountMigration, GeoCluster, all_crds, manifest_file_name, manifest_yaml};

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crds/ is in the repo")
        .to_path_buf()
}

#[test]
fn committed_manifests_match_the_types() {
    for crd in all_crds() {
        let path = repo().join("crds/manifests").join(manifest_file_name(&crd));
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == manifest_yaml(&crd),
            "{} differs from the types: run `cargo run -p tern-crds --bin crdgen -- crds/manifests` and commit",
            path.display()
        );
    }
}

fn example() -> GeoCluster {
    let text = std::fs::read_to_string(repo().join("examples/geocluster.yaml")).expect("example exists");
    serde_yaml::from_str(&text).expect("example parses as a GeoCluster")
}

fn refused(gc: &GeoCluster, needle: &str) {
    let err = validate_cel(gc).expect_err("the rule refuses it");
    assert!(format!("{err:?}").contains(needle), "expected `{needle}` in {err:?}");
}

#[test]
fn the_example_passes_every_rule() {
    validate_cel(&example()).expect("examples/geocluster.yaml is valid");
}

#[test]
fn replicas_must_be_odd() {
    let mut gc = example();
    gc.spec.regions[0].replicas = 4;
    refused(&gc, "replicas must be odd");
}

#[test]
fn successors_are_declared_regions_and_never_the_region_itself() {
    let mut gc = example();
    gc.spec.failover.successors[0].order = vec!["mars-1".into()];
    refused(&gc, "must be one of spec.regions");
    let mut gc = example();
    let own = gc.spec.failover.successors[0].region.clone();
    gc.spec.failover.successors[0].order.push(own);
    refused(&gc, "cannot be its own successor");
}

#[test]
fn directory_members_live_in_declared_regions() {
    let mut gc = example();
    gc.spec.directory.members[0].region = "mars-1".into();
    refused(&gc, "every directory member region");
}

#[test]
fn election_timeouts_cover_enough_heartbeats() {
    let mut gc = example();
    gc.spec.etcd.election_timeout_ms = 2 * gc.spec.etcd.heartbeat_interval_ms;
    refused(&gc, "at least 5 times");
    let mut gc = example();
    gc.spec.directory.election_timeout_ms = 5 * gc.spec.directory.heartbeat_interval_ms;
    refused(&gc, "at least 10 times");
}

#[test]
fn cluster_names_are_short_enough_for_child_names() {
    let mut gc = example();
    gc.metadata.name = Some("x".repeat(25));
    refused(&gc, "at most 24 characters");
}

#[test]
fn migration_account_and_target_are_immutable() {
    let text = "apiVersion: tern.dev/v1alpha1\nkind: AccountMigration\nmetadata: {name: m, namespace: default}\nspec: {geoCluster: payments, account: acct-1, targetRegion: eu-west}\n";
    let old: AccountMigration = serde_yaml::from_str(text).expect("parses");
    validate_cel_update(&old, &old).expect("unchanged is fine");
    let mut new = old.clone();
    new.spec.account = "acct-2".into();
    let err = validate_cel_update(&new, &old).expect_err("account change refused");
    assert!(format!("{err:?}").contains("account is immutable"), "{err:?}");
    let mut new = old.clone();
    new.spec.target_region = "ap-south".into();
    let err = validate_cel_update(&new, &old).expect_err("target change refused");
    assert!(format!("{err:?}").contains("targetRegion is immutable"), "{err:?}");
    let mut same = old.clone();
    same.spec.expected_source_region = Some("eu-west".into());
    let err = validate_cel(&same).expect_err("source equals target refused");
    assert!(format!("{err:?}").contains("must differ"), "{err:?}");
}
