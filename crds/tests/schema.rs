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

/// The pattern a field has in the committed schema.
fn pattern_of(crd: &str, path: &[&str]) -> String {
    let crd = all_crds()
        .into_iter()
        .find(|c| c.spec.names.kind == crd)
        .expect("known kind");
    let mut schema = serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("a schema"),
    )
    .expect("serialises");
    for p in path {
        schema = match *p {
            "[]" => schema["items"].clone(),
            field => schema["properties"][field].clone(),
        };
    }
    schema["pattern"]
        .as_str()
        .unwrap_or_else(|| panic!("{path:?} has a pattern"))
        .to_string()
}

#[test]
fn schema_region_pattern_and_the_rust_rule_agree() {
    let table = [
        "us-east",
        "a",
        "1st",
        "eu-west-2",
        "x-1-y",
        "",
        "US",
        "us_east",
        "-x",
        "x-",
        "a.b",
        "ü",
        "us east",
        "a--b",
        "aaaaaaaaaaaaaaaaaaaa",
        "aaaaaaaaaaaaaaaaaaaaa",
        "a/b",
    ];
    let paths: [(&str, &[&str]); 5] = [
        ("GeoCluster", &["spec", "regions", "[]", "name"]),
        ("GeoCluster", &["spec", "directory", "members", "[]", "region"]),
        ("GeoCluster", &["spec", "failover", "successors", "[]", "order", "[]"]),
        ("RegionGroup", &["spec", "region"]),
        ("AccountMigration", &["spec", "targetRegion"]),
    ];
    for (kind, path) in paths {
        let re = regex::Regex::new(&pattern_of(kind, path)).expect("a valid regex");
        for name in table {
            // The schema adds the length limit as maxLength.
            let schema = re.is_match(name) && name.chars().count() <= tern_common::limits::MAX_REGION_NAME;
            assert_eq!(
                schema,
                tern_common::RegionName::new(name).is_ok(),
                "{kind} {path:?} and RegionName disagree on {name:?}"
            );
        }
    }
}

#[test]
fn schema_account_pattern_and_the_rust_rule_agree() {
    let re = regex::Regex::new(&pattern_of("AccountMigration", &["spec", "account"])).expect("regex");
    for id in [
        "acct-1",
        "a",
        "user@example.com",
        "org:42.x_y",
        "",
        "-a",
        "a b",
        "a/b",
        "a..b",
        "ä",
        "a\u{7}",
    ] {
        // The schema adds maxLength and a CEL rule against `..`.
        let schema = re.is_match(id) && id.len() <= tern_common::MAX_ACCOUNT_ID && !id.contains("..");
        assert_eq!(schema, tern_common::AccountId::new(id).is_ok(), "{id:?}");
    }
}

#[test]
fn schema_duration_pattern_and_the_parser_agree() {
    let paths: [&[&str]; 4] = [
        &["spec", "router", "idempotencyRetention"],
        &["spec", "followTheSun", "window"],
        &["spec", "followTheSun", "cooldown"],
        &["spec", "failover", "maxDataLossLag"],
    ];
    for path in paths {
        let re = regex::Regex::new(&pattern_of("GeoCluster", path)).expect("regex");
        for text in [
            "24h", "1h30m", "1.5s", "250ms", "2µs", "3us", "10ns", "1m1ms", "", "5", "ms", "5 s", "-1s", "+1s", ".5s",
            "1.s", "1e3s", "5sec", "1d",
        ] {
            // Zero passes the pattern; the CEL range rule refuses it.
            assert_eq!(
                re.is_match(text),
                tern_common::parse_duration(text).is_ok(),
                "{path:?} and parse_duration disagree on {text:?}"
            );
        }
    }
}

#[test]
fn duration_ranges_refuse_zero_and_out_of_range() {
    let mut gc = example();
    gc.spec.follow_the_sun.window = "0s".into();
    refused(&gc, "window must be a duration between 1m and 2160h");
    let mut gc = example();
    gc.spec.follow_the_sun.cooldown = "2161h".into();
    refused(&gc, "cooldown must be a duration between 1s and 2160h");
    let mut gc = example();
    gc.spec.failover.max_data_loss_lag = "2h".into();
    refused(&gc, "maxDataLossLag must be a duration between 1ms and 1h");
}

#[test]
fn the_directory_has_an_odd_number_of_members() {
    let mut gc = example();
    gc.spec.directory.members[0].replicas += 1;
    refused(&gc, "must be odd");
}

#[test]
fn cluster_names_are_rfc_1035_labels() {
    for bad in ["1payments", "pay.ments"] {
        let mut gc = example();
        gc.metadata.name = Some(bad.into());
        refused(&gc, "must start with a lower-case letter");
    }
}

#[test]
fn storage_size_and_resources_are_checked_quantities() {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let mut gc = example();
    gc.spec.etcd.storage.size = Quantity("lots".into());
    refused(&gc, "size must be a Kubernetes quantity greater than zero");
    let mut gc = example();
    gc.spec.etcd.storage.size = Quantity("0".into());
    refused(&gc, "size must be a Kubernetes quantity greater than zero");
    let mut gc = example();
    gc.spec.router.component.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
        requests: Some([("cpu".to_string(), Quantity("2".into()))].into()),
        limits: Some([("cpu".to_string(), Quantity("500m".into()))].into()),
        ..Default::default()
    });
    refused(&gc, "a request must not exceed its limit");
}

#[test]
fn a_region_cannot_take_another_regions_directory_name() {
    let mut gc = example();
    let other = gc.spec.regions[1].name.clone();
    gc.spec.regions[0].name = format!("dir-{other}");
    for m in gc.spec.directory.members.iter_mut() {
        m.region = m.region.replace(&gc.spec.regions[0].name, "");
    }
    let err = validate_cel(&gc).expect_err("refused");
    assert!(format!("{err:?}").contains("dir-<another region>"), "{err:?}");
}

#[test]
fn schema_otlp_endpoint_pattern_and_the_rust_rule_agree() {
    let re = regex::Regex::new(&pattern_of("GeoCluster", &["spec", "telemetry", "otlpEndpoint"])).expect("regex");
    for text in [
        "http://collector:4317",
        "https://otel.example.com",
        "http://[::1]:4317/v1",
        "http://otel_c",
        "collector:4317",
        "http://",
        "http://a b",
        "http://[::1",
        "http://c:port",
        "http://c:123456",
        "http://[]:1",
        "http://[::1]x",
        "ftp://c",
        "http://c/a b",
    ] {
        assert_eq!(
            re.is_match(text),
            tern_common::limits::is_otlp_endpoint(text),
            "{text:?}"
        );
    }
}
