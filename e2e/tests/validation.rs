//! The API server enforces the CRD schemas: every file in examples/invalid/ is
//! refused with a message that names the field it gets wrong, the valid
//! examples are accepted, and the immutable fields of an AccountMigration
//! cannot be changed.

use tern_e2e::{ControlPlane, repo_root};

#[tokio::test]
async fn schema_refuses_invalid_examples_and_accepts_valid_ones() {
    let cp = ControlPlane::start("validation").await.expect("control plane starts");
    cp.install_crds().expect("CRDs install");

    // Every manifest we ship passes a server-side dry run.
    for valid in [
        "examples/geocluster.yaml",
        "examples/multicluster.yaml",
        "examples/geocluster-tls.yaml",
        "e2e/kind/manifests/geocluster.yaml",
    ] {
        cp.kubectl(&["apply", "--dry-run=server", "-f", valid])
            .unwrap_or_else(|e| panic!("{valid} must be accepted: {e}"));
    }
    // rbac.yaml creates the namespace its other objects live in, so it is
    // applied for real; the Deployment then goes into that namespace.
    cp.kubectl(&["apply", "-f", "operator/deploy/base/rbac.yaml"])
        .expect("rbac applies");
    cp.kubectl(&[
        "apply",
        "--dry-run=server",
        "-f",
        "operator/deploy/base/deployment.yaml",
    ])
    .expect("deployment is accepted");
    // The install bundle: every overlay renders with kubectl's kustomize and
    // every object it renders is accepted.
    let overlays = repo_root().join("operator/deploy/overlays");
    for dir in [
        "single-cluster",
        "namespaced",
        "multicluster/us-east",
        "multicluster/eu-west",
        "multicluster/ap-south",
    ] {
        let path = overlays.join(dir);
        assert!(
            path.join("kustomization.yaml").is_file(),
            "{} is missing",
            path.display()
        );
        cp.kubectl(&["apply", "--dry-run=server", "-k", &path.display().to_string()])
            .unwrap_or_else(|e| panic!("overlay {dir} must be accepted: {e}"));
    }
    // The multi-cluster overlays differ in the region their operator runs.
    let us_east = cp
        .kubectl(&[
            "kustomize",
            &overlays.join("multicluster/us-east").display().to_string(),
        ])
        .expect("renders");
    assert!(
        us_east.contains("name: TERN_OPERATOR_REGIONS\n          value: us-east"),
        "the us-east overlay must set the operator's region:\n{us_east}"
    );
    // The kind e2e's Jaeger and backup claim too (its GeoCluster is among
    // the examples).
    for manifest in ["e2e/kind/manifests/jaeger.yaml", "e2e/kind/manifests/backups.yaml"] {
        cp.kubectl(&["apply", "--dry-run=server", "-f", manifest])
            .unwrap_or_else(|e| panic!("{manifest} must be accepted: {e}"));
    }

    let dir = repo_root().join("examples/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("examples/invalid exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 12,
        "examples/invalid/ needs at least twelve files, has {}",
        files.len()
    );

    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable example");
        let field = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks an `# expect: <field>` line", file.display()))
            .trim();
        let rule = text.lines().next().unwrap_or_default();
        let path = file.to_str().expect("utf-8 path");
        match cp.kubectl(&["apply", "-f", path]) {
            Ok(out) => failures.push(format!("{}: accepted ({rule}): {out}", file.display())),
            Err(e) => {
                let message = e.to_string();
                if !message.contains(field) {
                    failures.push(format!(
                        "{}: refused, but the message does not name `{field}`: {message}",
                        file.display()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // TLS is chosen when a GeoCluster is made: turning it on (or off) in
    // place is refused, naming the field.
    cp.kubectl(&["apply", "-f", "examples/geocluster.yaml"])
        .expect("the example applies");
    let err = cp
        .kubectl(&[
            "patch",
            "geocluster",
            "payments",
            "-n",
            "default",
            "--type=merge",
            "-p",
            r#"{"spec":{"tls":{"secretPrefix":"payments-tls"}}}"#,
        ])
        .expect_err("turning TLS on in place is refused");
    assert!(
        err.to_string().contains("spec.tls") && err.to_string().contains("cannot be turned on or off"),
        "{err}"
    );
}

#[tokio::test]
async fn migration_account_and_target_are_immutable() {
    let cp = ControlPlane::start("immutable").await.expect("control plane starts");
    cp.install_crds().expect("CRDs install");
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, account: &str, target: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "apiVersion: tern.dev/v1alpha1\nkind: AccountMigration\nmetadata:\n  name: move-1\n  namespace: default\nspec:\n  geoCluster: payments\n  account: {account}\n  targetRegion: {target}\n"
            ),
        )
        .expect("write manifest");
        path.to_str().expect("utf-8").to_string()
    };
    cp.kubectl(&["apply", "-f", &write("a.yaml", "acct-1", "eu-west")])
        .expect("valid migration is accepted");
    let err = cp
        .kubectl(&["apply", "-f", &write("b.yaml", "acct-2", "eu-west")])
        .expect_err("changing the account is refused");
    assert!(
        err.to_string().contains("spec.account") && err.to_string().contains("immutable"),
        "{err}"
    );
    let err = cp
        .kubectl(&["apply", "-f", &write("c.yaml", "acct-1", "ap-south")])
        .expect_err("changing the target is refused");
    assert!(
        err.to_string().contains("spec.targetRegion") && err.to_string().contains("immutable"),
        "{err}"
    );
}

/// What the operator puts on a router's and an agent's command line is
/// accepted by the binaries' own flag parsers, defaults and every router
/// setting of the schema's extremes alike.
#[test]
fn operator_built_command_lines_parse_in_the_binaries() {
    use clap::Parser;
    use tern_operator::build::components::{agent_args, router_args};
    let text = std::fs::read_to_string(repo_root().join("examples/geocluster.yaml")).expect("the example exists");
    let mut gc: tern_crds::GeoCluster = serde_yaml::from_str(&text).expect("the example parses");
    gc.metadata.namespace = Some("default".into());
    let parse_router = |gc: &tern_crds::GeoCluster| {
        for region in &gc.spec.regions {
            let args = std::iter::once("tern-router".to_string()).chain(router_args(gc, region));
            tern_router::Config::try_parse_from(args)
                .unwrap_or_else(|e| panic!("router flags of {}: {e}", region.name));
        }
    };
    parse_router(&gc);
    for region in &gc.spec.regions {
        let args = std::iter::once("tern-agent".to_string()).chain(agent_args(&gc, region));
        tern_agent::Config::try_parse_from(args).unwrap_or_else(|e| panic!("agent flags of {}: {e}", region.name));
    }
    // Follow the sun switched on, at the schema's extremes.
    let mut sunny = gc.clone();
    sunny.spec.follow_the_sun.enabled = true;
    sunny.spec.follow_the_sun.dry_run = true;
    for (window, cooldown, threshold, per_minute) in [("1m", "1s", 1, 1), ("2160h", "2160h", 1_000_000, 600)] {
        sunny.spec.follow_the_sun.window = window.into();
        sunny.spec.follow_the_sun.cooldown = cooldown.into();
        sunny.spec.follow_the_sun.threshold = threshold;
        sunny.spec.follow_the_sun.max_migrations_per_minute = per_minute;
        let region = &sunny.spec.regions[0];
        let args = std::iter::once("tern-agent".to_string()).chain(agent_args(&sunny, region));
        let config = tern_agent::Config::try_parse_from(args).unwrap_or_else(|e| panic!("agent flags, {window}: {e}"));
        assert!(config.follow_the_sun && config.follow_the_sun_dry_run);
        assert_eq!(config.follow_the_sun_threshold, threshold as u64);
        parse_router(&sunny);
    }
    // The schema's extremes come from the same constants as the schema
    // (tern_common::limits), so this checks the binaries accept all of it.
    use tern_common::limits::{IDEMPOTENCY_RETENTION, WRITE_BATCH_MAX, WRITE_BATCHES_IN_FLIGHT};
    for (retention, batch, in_flight, direct) in [
        (
            IDEMPOTENCY_RETENTION.min,
            WRITE_BATCH_MAX.0,
            WRITE_BATCHES_IN_FLIGHT.0,
            false,
        ),
        (
            IDEMPOTENCY_RETENTION.max,
            WRITE_BATCH_MAX.1,
            WRITE_BATCHES_IN_FLIGHT.1,
            true,
        ),
        ("1h30m", 32, 1, true),
    ] {
        gc.spec.router.idempotency_retention = retention.into();
        gc.spec.router.write_batch_max = batch;
        gc.spec.router.write_batches_in_flight = in_flight;
        gc.spec.router.group_leader_direct = direct;
        parse_router(&gc);
    }
}

/// The kind e2e's cluster configs fit its GeoCluster (kind itself cannot run
/// here: no Docker engine): every region has a cluster whose domain is the
/// region's clusterDomain and whose node carries the region's label and one
/// of its zones, and no two clusters share a pod or service range (they are
/// routed to each other).
#[test]
fn kind_clusters_fit_the_scenarios_geocluster() {
    let read = |path: &str| -> serde_yaml::Value {
        serde_yaml::from_str(&std::fs::read_to_string(repo_root().join(path)).expect("readable")).expect("YAML")
    };
    let gc = read("e2e/kind/manifests/geocluster.yaml");
    let mut ranges = Vec::new();
    let regions = gc["spec"]["regions"].as_sequence().expect("regions");
    assert_eq!(regions.len(), 3, "the scenarios use three regions");
    for region in regions {
        let name = region["name"].as_str().expect("name");
        let cluster = read(&format!("e2e/kind/cluster-{name}.yaml"));
        assert_eq!(cluster["name"].as_str(), Some(format!("tern-{name}").as_str()));
        let node = &cluster["nodes"][0];
        assert_eq!(node["labels"]["topology.kubernetes.io/region"].as_str(), Some(name));
        let zone = node["labels"]["topology.kubernetes.io/zone"]
            .as_str()
            .expect("zone label");
        let zones: Vec<&str> = region["zones"]
            .as_sequence()
            .expect("zones")
            .iter()
            .filter_map(|z| z.as_str())
            .collect();
        assert!(
            zones.contains(&zone),
            "{name}: node zone {zone} is not one of {zones:?}"
        );
        let domain = region["clusterDomain"].as_str().expect("clusterDomain");
        let patches: Vec<&str> = cluster["kubeadmConfigPatches"]
            .as_sequence()
            .expect("patches")
            .iter()
            .filter_map(|p| p.as_str())
            .collect();
        assert!(
            patches.iter().any(|p| p.contains(&format!("dnsDomain: {domain}")))
                && patches.iter().any(|p| p.contains(&format!("clusterDomain: {domain}"))),
            "{name}: the kind cluster's domain must be {domain}"
        );
        for key in ["podSubnet", "serviceSubnet"] {
            let range = cluster["networking"][key].as_str().expect("range").to_string();
            assert!(!ranges.contains(&range), "{name}: {key} {range} is used twice");
            ranges.push(range);
        }
    }
}

/// Every CEL rule of the schemas, evaluated by the API server itself
/// (server-side dry runs): each refuses the object it is about with its
/// own message, and the shipped example passes them all. (These ran
/// client-side with kube's CEL interpreter once; that interpreter, a
/// dev-dependency only, gave the workspace's tests other features of
/// kube and chrono than the binaries', and every crate above them was
/// compiled twice in a run.)
#[tokio::test]
async fn every_cel_rule_refuses_with_its_own_message() {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use kube::api::{Api, PostParams};
    use tern_crds::{AccountMigration, GeoCluster};

    let cp = ControlPlane::start("cel").await.expect("control plane starts");
    cp.install_crds().expect("CRDs install");
    let client = cp.client().await.expect("client");
    let geoclusters: Api<GeoCluster> = Api::namespaced(client.clone(), "default");
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let example = || -> GeoCluster {
        let text = std::fs::read_to_string(repo_root().join("examples/geocluster.yaml")).expect("example exists");
        let mut gc: GeoCluster = serde_yaml::from_str(&text).expect("example parses as a GeoCluster");
        gc.metadata.namespace = Some("default".into());
        gc
    };
    geoclusters
        .create(&dry_run, &example())
        .await
        .expect("examples/geocluster.yaml passes every rule");

    let mut cases: Vec<(GeoCluster, &str)> = Vec::new();
    let mut add = |change: &dyn Fn(&mut GeoCluster), message: &'static str| {
        let mut gc = example();
        change(&mut gc);
        cases.push((gc, message));
    };
    add(&|gc| gc.spec.regions[0].replicas = 4, "replicas must be odd");
    add(
        &|gc| gc.spec.failover.successors[0].order = vec!["mars-1".into()],
        "must be one of spec.regions",
    );
    add(
        &|gc| {
            let own = gc.spec.failover.successors[0].region.clone();
            gc.spec.failover.successors[0].order.push(own);
        },
        "cannot be its own successor",
    );
    add(
        &|gc| gc.spec.directory.members[0].region = "mars-1".into(),
        "every directory member region",
    );
    add(
        &|gc| gc.spec.etcd.election_timeout_ms = 2 * gc.spec.etcd.heartbeat_interval_ms,
        "at least 5 times",
    );
    add(
        &|gc| gc.spec.directory.election_timeout_ms = 5 * gc.spec.directory.heartbeat_interval_ms,
        "at least 10 times",
    );
    add(&|gc| gc.metadata.name = Some("x".repeat(25)), "at most 24 characters");
    add(
        &|gc| gc.spec.follow_the_sun.window = "0s".into(),
        "window must be a duration between 1m and 2160h",
    );
    add(
        &|gc| gc.spec.follow_the_sun.cooldown = "2161h".into(),
        "cooldown must be a duration between 1s and 2160h",
    );
    add(
        &|gc| gc.spec.failover.max_data_loss_lag = "2h".into(),
        "maxDataLossLag must be a duration between 1ms and 1h",
    );
    add(&|gc| gc.spec.directory.members[0].replicas += 1, "must be odd");
    for bad in ["1payments", "pay.ments"] {
        add(
            &move |gc| gc.metadata.name = Some(bad.into()),
            "must start with a lower-case letter",
        );
    }
    for size in ["lots", "0"] {
        add(
            &move |gc| gc.spec.etcd.storage.size = Quantity(size.into()),
            "size must be a Kubernetes quantity greater than zero",
        );
    }
    add(
        &|gc| {
            gc.spec.router.component.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
                requests: Some([("cpu".to_string(), Quantity("2".into()))].into()),
                limits: Some([("cpu".to_string(), Quantity("500m".into()))].into()),
                ..Default::default()
            })
        },
        "a request must not exceed its limit",
    );
    add(
        &|gc| {
            let other = gc.spec.regions[1].name.clone();
            gc.spec.regions[0].name = format!("dir-{other}");
            let renamed = gc.spec.regions[0].name.clone();
            for m in gc.spec.directory.members.iter_mut() {
                m.region = m.region.replace(&renamed, "");
            }
        },
        "dir-<another region>",
    );
    for (gc, message) in &cases {
        let e = geoclusters.create(&dry_run, gc).await.expect_err(message).to_string();
        assert!(e.contains(message), "expected `{message}` in: {e}");
    }

    // An AccountMigration's source, when named, differs from its target
    // (its immutable fields: `migration_account_and_target_are_immutable`).
    let migrations: Api<AccountMigration> = Api::namespaced(client, "default");
    let text = "apiVersion: tern.dev/v1alpha1\nkind: AccountMigration\nmetadata: {name: m, namespace: default}\nspec: {geoCluster: payments, account: acct-1, targetRegion: eu-west, expectedSourceRegion: eu-west}\n";
    let same: AccountMigration = serde_yaml::from_str(text).expect("parses");
    let e = migrations
        .create(&dry_run, &same)
        .await
        .expect_err("source equals target")
        .to_string();
    assert!(e.contains("must differ"), "{e}");
}
