//! The committed CRD manifests match the types, and the schema's patterns
//! agree with the Rust rules they stand for. The CEL rules are evaluated
//! by a real API server: e2e/tests/validation.rs.

use tern_crds::{all_crds, manifest_file_name, manifest_yaml};

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
