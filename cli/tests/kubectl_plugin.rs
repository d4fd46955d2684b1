//! `kubectl tern status NAME`: kubectl finds `kubectl-tern` on PATH and it
//! prints the GeoCluster's status per region.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tern_e2e::ControlPlane;
use tern_e2e::operator::{OperatorGuard, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_tern_status() {
    let cp = ControlPlane::start("plugin").await.expect("control plane");
    cp.install_crds().expect("CRDs");
    let _operator = OperatorGuard::start(&cp, &[]).await.expect("operator");
    cp.kubectl(&["apply", "-f", "examples/geocluster.yaml"]).expect("apply");
    let client = cp.client().await.expect("client");
    let api: kube::Api<tern_crds::GeoCluster> = kube::Api::namespaced(client, "default");
    eventually("status", Duration::from_secs(30), || async {
        (api.get("payments").await.ok()?.status?.regions.len() == 3).then_some(())
    })
    .await;

    let plugin_dir = Path::new(env!("CARGO_BIN_EXE_kubectl-tern"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let path = format!("{}:{}", plugin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new(tern_e2e::assets::binary("kubectl").expect("pinned kubectl"))
        .args(["tern", "status", "payments"])
        .env("PATH", path)
        .env("KUBECONFIG", cp.kubeconfig())
        .output()
        .expect("kubectl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl tern status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "GeoCluster payments",
        "Region us-east",
        "Region eu-west",
        "Region ap-south",
        "Ready",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
}
