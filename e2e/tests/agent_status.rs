//! An agent writes its region's lag into the GeoCluster status with its own
//! field manager and the identity the operator gives it, and the operator's
//! own status writes leave those fields alone.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::Api;
use tern_crds::GeoCluster;
use tern_e2e::ControlPlane;
use tern_e2e::operator::{OperatorGuard, eventually};
use tern_local::{Layout, LocalDeployment};

const GEOCLUSTER: &str = "apiVersion: tern.dev/v1alpha1
kind: GeoCluster
metadata: {name: payments, namespace: default}
spec:
  regions:
  - {name: us-east, zones: [a], replicas: 1}
  - {name: eu-west, zones: [a], replicas: 1}
  directory:
    members: [{region: us-east}]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_lag_lands_in_the_geocluster_status() {
    tern_e2e::init_logs();
    let cp = ControlPlane::start("agent-status").await.expect("control plane");
    cp.install_crds().expect("CRDs");
    let _operator = OperatorGuard::start(&cp, &[]).await.expect("operator");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("gc.yaml");
    std::fs::write(&path, GEOCLUSTER).expect("write");
    cp.kubectl(&["apply", "-f", path.to_str().expect("utf-8")])
        .expect("apply");
    let client = cp.client().await.expect("client");
    let api: Api<GeoCluster> = Api::namespaced(client.clone(), "default");
    eventually("the operator's region entries", Duration::from_secs(30), || async {
        (api.get("payments").await.ok()?.status?.regions.len() == 2).then_some(())
    })
    .await;
    // The agent's identity, as the operator created it.
    cp.kubectl(&["get", "role,rolebinding,serviceaccount", "payments-agent"])
        .expect("agent identity exists");
    let kubeconfig = cp
        .user_kubeconfig(
            "system:serviceaccount:default:payments-agent",
            &["system:serviceaccounts"],
        )
        .expect("agent kubeconfig");

    let mut d = LocalDeployment::start(Layout {
        regions: vec![("us-east".into(), 1), ("eu-west".into(), 1)],
        directory_members: 1,
        rtt_ms: BTreeMap::from([(("us-east".into(), "eu-west".into()), 60)]),
        agents: true,
        otlp_endpoint: None,
        tls: false,
    })
    .await
    .expect("deployment");
    d.region_mut("us-east").agent.take().expect("agent").stop().await;
    // Forget the mirror's applied revision: the next agent must resync, and
    // says so with an event on the GeoCluster.
    d.group_client("us-east")
        .await
        .delete("/tern/r/eu-west/applied", None)
        .await
        .expect("delete");
    let agent = d
        .start_agent(
            "us-east",
            &[
                "--geocluster=payments".to_string(),
                "--namespace=default".to_string(),
                format!("--kubeconfig={}", kubeconfig.display()),
            ],
        )
        .await
        .expect("agent with Kubernetes publishing");
    d.region_mut("us-east").agent = Some(agent);

    let lag_of = |gc: &GeoCluster| {
        let region = gc
            .status
            .as_ref()?
            .regions
            .iter()
            .find(|r| r.name == "us-east")?
            .clone();
        let mirror = region.mirrors.iter().find(|m| m.source == "eu-west")?.clone();
        Some((region, mirror))
    };
    let (region, mirror) = eventually("lag in the GeoCluster status", Duration::from_secs(30), || async {
        let gc = api.get("payments").await.ok()?;
        let (region, mirror) = lag_of(&gc)?;
        (mirror.state == "streaming" && mirror.lag_ms < 1000 && region.group_leader.is_some())
            .then_some((region, mirror))
    })
    .await;
    assert_eq!(region.agent.as_deref(), Some("us-east-agent-a"));
    assert!(
        region
            .group_leader
            .as_deref()
            .is_some_and(|l| l.starts_with("http://127.0.0.1:")),
        "{region:?}"
    );
    assert!(mirror.lag_ms >= 0 && mirror.lag_revisions >= 0, "{mirror:?}");

    // The operator reconciles (an annotation is a change) and writes its
    // status; the agent's fields stay, owned by the agent's field manager.
    cp.kubectl(&["annotate", "geocluster", "payments", "touched=1"])
        .expect("annotate");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gc = api.get("payments").await.expect("geocluster");
    assert!(lag_of(&gc).is_some(), "the operator removed the agent's fields");
    let events = cp
        .kubectl(&[
            "get",
            "events.events.k8s.io",
            "-o",
            "custom-columns=REASON:.reason,NOTE:.note",
        ])
        .expect("events");
    assert!(
        events.contains("MirrorResync") && events.contains("eu-west"),
        "{events}"
    );
    let managers = cp
        .kubectl(&[
            "get",
            "geocluster",
            "payments",
            "--show-managed-fields",
            "-o",
            "jsonpath={.metadata.managedFields[*].manager}",
        ])
        .expect("managed fields");
    assert!(
        managers.contains("tern-agent-us-east") && managers.contains("tern-operator"),
        "{managers}"
    );
}
