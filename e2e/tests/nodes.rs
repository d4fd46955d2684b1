//! The node e2e: the multi-cluster scenarios of the kind e2e
//! (tern_e2e::scenarios) on real Kubernetes nodes started here, one cluster
//! per region (tern_e2e::node): the operator installed from the bundle runs
//! as a pod, the etcd members it describes form their groups across the
//! cluster DNS, routers and agents pass their probes under their security
//! contexts, and a region's node is stopped to fail it over.
//!
//! It needs root (network namespaces, cgroups, mounts), the node binaries
//! (`e2e/build-tools.sh node`) and the tern binaries built
//! (`cargo build -p tern-router -p tern-agent -p tern-operator`);
//! `e2e/test.sh` does both when TERN_NODE_E2E=1. Otherwise it is skipped,
//! saying why.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use tern_e2e::assets;
use tern_e2e::node::{ClusterDns, ClusterSpec, NodeCluster, NodeNetwork, PAUSE_IMAGE};
use tern_e2e::scenarios::{RegionCluster, Scenarios};

/// The directory of this test's binary's profile (target/debug), where
/// cargo put tern-router, tern-agent and tern-operator.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

fn skip_reason() -> Option<String> {
    if std::env::var("TERN_NODE_E2E").map(|v| v != "1").unwrap_or(true) {
        return Some("TERN_NODE_E2E=1 is not set (e2e/test.sh sets it with --nodes)".into());
    }
    if !nix_is_root() {
        return Some("needs root: network namespaces, cgroups and mounts".into());
    }
    for bin in ["kubelet", "containerd", "runc", "kube-proxy", "pause", "cni/bridge"] {
        if assets::binary(bin).is_err() {
            return Some(format!("{bin} is not built: run e2e/build-tools.sh node"));
        }
    }
    for bin in ["tern-router", "tern-agent", "tern-operator"] {
        if !profile_dir().join(bin).is_file() {
            return Some(format!(
                "{} is missing: cargo build -p tern-router -p tern-agent -p tern-operator",
                profile_dir().join(bin).display()
            ));
        }
    }
    None
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// The images the pods run, as OCI archives: tern's three from the
/// binaries cargo built, etcd under the name the CRDs default to and under
/// the name the rolling update moves to, the pause image, and Jaeger.
fn build_images(dir: &std::path::Path) {
    let asset = |name: &str| assets::binary(name).expect("built").display().to_string();
    let status = Command::new(tern_e2e::repo_root().join("operator/deploy/images/build.sh"))
        .arg("--oci-archives")
        .arg(dir)
        .arg("--bin-dir")
        .arg(profile_dir())
        .args(["--etcd", &asset("etcd")])
        .args(["--add-image", &format!("{PAUSE_IMAGE}={}", asset("pause"))])
        .args([
            "--add-image",
            &format!(
                "{}={},{}",
                tern_e2e::scenarios::retagged_etcd_image(),
                asset("etcd"),
                asset("etcdutl")
            ),
        ])
        .args([
            "--add-image",
            &format!("docker.io/jaegertracing/jaeger:2.13.0={}", asset("jaeger")),
        ])
        .status()
        .expect("build.sh runs");
    assert!(status.success(), "operator/deploy/images/build.sh failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenarios_run_on_real_nodes_one_cluster_per_region() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: node e2e: {why}");
        return;
    }
    tern_e2e::init_logs();
    let started = Instant::now();
    let images = tempfile::Builder::new()
        .prefix("tern-images-")
        .tempdir()
        .expect("temp dir");
    build_images(images.path());

    let mut net = NodeNetwork::create().expect("node network");
    let mut clusters = Vec::new();
    for (i, region) in ["us-east", "eu-west", "ap-south"].into_iter().enumerate() {
        let spec = ClusterSpec {
            name: region.to_string(),
            zone: format!("{region}-1a"),
            domain: format!("{region}.tern.example"),
        };
        let index = u8::try_from(i).expect("three clusters");
        clusters.push(
            NodeCluster::start(&mut net, index, spec, images.path())
                .await
                .expect("cluster starts"),
        );
    }
    let mut dns_clusters = Vec::new();
    for c in &clusters {
        dns_clusters.push((c.cp.client().await.expect("client"), c.spec.domain.clone()));
    }
    let _dns = ClusterDns::start(dns_clusters).await.expect("cluster DNS");
    let nodes_up = started.elapsed();
    eprintln!(
        "node e2e: three clusters with a node each up in {:.1} s",
        nodes_up.as_secs_f64()
    );

    let regions = clusters
        .iter()
        .map(|c| RegionCluster {
            region: c.spec.name.clone(),
            kubeconfig: c.cp.kubeconfig().to_path_buf(),
        })
        .collect();
    let mut scenarios = Scenarios::new(regions, assets::binary("kubectl").expect("kubectl"));
    // Stopping a region's node kills every process on it at once, as a
    // power cut would; its API server stays up and sees the node go.
    let result = scenarios
        .run_all(|region| {
            if let Some(c) = clusters.iter_mut().find(|c| c.spec.name == region) {
                c.stop_node();
            }
            Ok(())
        })
        .await;
    eprint!("{}", scenarios.report());
    if let Err(e) = result {
        for c in &clusters {
            if let Ok(pods) = c.cp.kubectl(&["get", "pods,pvc", "-A", "-o", "wide"]) {
                eprintln!("--- pods in {}\n{pods}", c.spec.name);
            }
            if let Ok(events) = c.cp.kubectl(&["get", "events", "-A", "--sort-by=.lastTimestamp"]) {
                let tail: Vec<&str> = events.lines().rev().take(40).collect();
                eprintln!(
                    "--- events in {}\n{}",
                    c.spec.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            if c.node.is_some() {
                for component in ["agent", "router"] {
                    let what = format!("deployment/payments-{component}-{}", c.spec.name);
                    if let Ok(logs) = c.cp.kubectl(&["logs", &what, "--tail=80"]) {
                        eprintln!("--- {what}\n{logs}");
                    }
                }
            }
            eprintln!("{}", c.logs());
        }
        // TERN_NODE_E2E_HOLD=SECS keeps everything up that long for a look
        // (kubeconfigs under /tmp/tern-cp-*/admin.kubeconfig).
        if let Some(secs) = std::env::var("TERN_NODE_E2E_HOLD").ok().and_then(|s| s.parse().ok()) {
            eprintln!("node e2e failed: {e}; holding for {secs} s");
            tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
        }
        panic!("node e2e: {e}");
    }
    eprintln!("node e2e: passed in {:.1} s", started.elapsed().as_secs_f64());
}
