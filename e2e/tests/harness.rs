//! The harness itself: a control plane starts, serves kubectl and the CRDs,
//! and leaves no process behind.

use tern_e2e::ControlPlane;

#[tokio::test]
async fn control_plane_serves_crds_and_cleans_up() {
    let cp = ControlPlane::start("harness").await.expect("control plane starts");
    cp.install_crds().expect("CRDs install");
    let out = cp.kubectl(&["get", "crd", "-o", "name"]).expect("kubectl works");
    assert!(out.contains("geoclusters.tern.dev"), "{out}");
    assert!(out.contains("regiongroups.tern.dev"), "{out}");
    assert!(out.contains("accountmigrations.tern.dev"), "{out}");
    let url = cp.url.clone();
    drop(cp);
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port in url");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "API server still listening after drop"
    );
}
