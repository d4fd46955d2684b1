//! tern-operator against a real API server, running as its service account
//! bound only to operator/deploy/base/rbac.yaml: provisioning, status, rolling an
//! edit, no-op reconciles, no writes under status churn (counted in the API
//! server's audit log), invalid specs, deletion with Retain, leader
//! election, and the multi-cluster layout.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tern_crds::{GeoCluster, RegionGroup};
use tern_e2e::ControlPlane;
use tern_e2e::operator::{OperatorGuard, eventually};

const NS: &str = "default";
const WAIT: Duration = Duration::from_secs(30);

async fn setup(name: &str) -> (ControlPlane, Client) {
    tern_e2e::init_logs();
    let cp = ControlPlane::start(name).await.expect("control plane starts");
    cp.install_crds().expect("CRDs install");
    let client = cp.client().await.expect("admin client");
    (cp, client)
}

/// Plays the kubelet and the StatefulSet controller: every member of every
/// StatefulSet is created, current and ready.
async fn mark_statefulsets_ready(client: &Client) {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    for sts in api.list(&ListParams::default()).await.expect("list statefulsets") {
        let n = sts.spec.replicas.unwrap_or(1);
        let status = json!({"status": {
            "replicas": n, "readyReplicas": n, "updatedReplicas": n, "currentReplicas": n,
            "availableReplicas": n, "observedGeneration": sts.metadata.generation,
        }});
        api.patch_status(&sts.name_any(), &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("patch statefulset status");
    }
}

async fn geocluster_phase(client: &Client, name: &str) -> Option<String> {
    let gc = Api::<GeoCluster>::namespaced(client.clone(), NS)
        .get_opt(name)
        .await
        .ok()??;
    gc.status?.phase.map(|p| p.as_str().to_string())
}

fn condition(gc: &GeoCluster, type_: &str) -> Option<(String, String)> {
    gc.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// resourceVersion of every object the operator touches for a GeoCluster.
async fn versions(client: &Client) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    macro_rules! collect {
        ($t:ty) => {
            for o in Api::<$t>::namespaced(client.clone(), NS)
                .list(&ListParams::default())
                .await
                .expect("list")
            {
                out.insert(
                    format!("{}/{}", stringify!($t), o.name_any()),
                    o.resource_version().unwrap_or_default(),
                );
            }
        };
    }
    collect!(GeoCluster);
    collect!(RegionGroup);
    collect!(StatefulSet);
    collect!(Deployment);
    collect!(Service);
    collect!(PodDisruptionBudget);
    collect!(ConfigMap);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geocluster_lifecycle() {
    let (cp, client) = setup("lifecycle").await;
    let operator = OperatorGuard::start(&cp, &[]).await.expect("operator starts");
    cp.kubectl(&["apply", "-f", "examples/geocluster.yaml"])
        .expect("apply example");

    // Provisioning: one data group and one directory share per region.
    let groups: Api<RegionGroup> = Api::namespaced(client.clone(), NS);
    eventually("six RegionGroups", WAIT, || async {
        let n = groups.list(&ListParams::default()).await.ok()?.items.len();
        (n == 6).then_some(())
    })
    .await;
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    eventually("six StatefulSets", WAIT, || async {
        (sts_api.list(&ListParams::default()).await.ok()?.items.len() == 6).then_some(())
    })
    .await;
    let gc = Api::<GeoCluster>::namespaced(client.clone(), NS)
        .get("payments")
        .await
        .expect("geocluster");
    for region in ["us-east", "eu-west", "ap-south"] {
        let rg = groups.get(&format!("payments-{region}")).await.expect("data group");
        let owner = &rg.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("GeoCluster", gc.uid().expect("uid").as_str(), Some(true))
        );
        assert_eq!(rg.spec.replicas, 3);

        let sts = sts_api.get(&format!("payments-{region}")).await.expect("statefulset");
        assert_eq!(sts.owner_references()[0].uid, rg.uid().expect("uid"));
        assert_eq!(sts.spec.replicas, Some(3));
        assert_eq!(sts.spec.pod_management_policy.as_deref(), Some("Parallel"));
        let pod = sts.spec.template.spec.as_ref().expect("pod spec");
        assert_eq!(
            pod.node_selector.as_ref().expect("node selector")["topology.kubernetes.io/region"],
            region
        );
        let spread = pod.topology_spread_constraints.as_ref().expect("spread");
        assert!(
            spread
                .iter()
                .any(|c| c.topology_key == "topology.kubernetes.io/zone" && c.when_unsatisfiable == "DoNotSchedule")
        );
        let args = pod.containers[0].args.clone().unwrap_or_default().join(" ");
        // The initial cluster comes from the ConfigMap when a member
        // starts (a membership change rewrites it without a roll).
        assert!(args.contains("--initial-cluster=$(TERN_INITIAL_CLUSTER)"), "{args}");
        let config = Api::<ConfigMap>::namespaced(client.clone(), NS)
            .get(&format!("payments-{region}-config"))
            .await
            .expect("config map");
        let data = config.data.expect("data");
        assert!(
            data["initial-cluster"].starts_with(&format!(
                "payments-{region}-0=http://payments-{region}-0.payments-{region}-peer.default.svc.cluster.local:2380"
            )),
            "{data:?}"
        );
        assert_eq!(data["initial-cluster-state"], "new");
        assert!(
            args.contains("--heartbeat-interval=100") && args.contains("--election-timeout=1000"),
            "{args}"
        );

        let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), NS)
            .get(&format!("payments-{region}"))
            .await
            .expect("pdb");
        assert_eq!(pdb.spec.and_then(|s| s.min_available), Some(IntOrString::Int(2)));
        let peer = Api::<Service>::namespaced(client.clone(), NS)
            .get(&format!("payments-{region}-peer"))
            .await
            .expect("peer service");
        let peer = peer.spec.expect("spec");
        assert_eq!(
            (peer.cluster_ip.as_deref(), peer.publish_not_ready_addresses),
            (Some("None"), Some(true))
        );
        Api::<Service>::namespaced(client.clone(), NS)
            .get(&format!("payments-{region}-client"))
            .await
            .expect("client service");

        // The directory share: its initial cluster spans all three regions,
        // with cross-region Raft timing.
        let dir = Api::<ConfigMap>::namespaced(client.clone(), NS)
            .get(&format!("payments-dir-{region}-config"))
            .await
            .expect("directory config");
        let initial = &dir.data.as_ref().expect("data")["initial-cluster"];
        for other in ["us-east", "eu-west", "ap-south"] {
            assert!(
                initial.contains(&format!(
                    "payments-dir-{other}-0=http://payments-dir-{other}-0.payments-dir-{other}-peer"
                )),
                "{initial}"
            );
        }
        assert_eq!(dir.data.as_ref().expect("data")["heartbeat-interval-ms"], "250");
    }

    // One router Deployment and Service per region, wired to the region's
    // group and to every directory member.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let routers = eventually("three router Deployments", WAIT, || async {
        let list = deployments
            .list(&ListParams::default().labels("app.kubernetes.io/component=router"))
            .await
            .ok()?;
        (list.items.len() == 3).then_some(list.items)
    })
    .await;
    // One agent Deployment per region, mirroring the two other regions, with
    // an identity allowed to write the GeoCluster's status.
    // The agents are applied after the routers: wait for them as well.
    let agents = eventually("three agent Deployments", WAIT, || async {
        let list = deployments
            .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
            .await
            .ok()?;
        (list.items.len() == 3).then_some(list.items)
    })
    .await;
    // The routers share a peer token from a Secret the operator created
    // (and that no Deployment spells out).
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), NS);
    let secret = secrets
        .get("payments-router-peer-token")
        .await
        .expect("the peer token Secret");
    let token = secret.data.as_ref().expect("data")["token"].0.len();
    assert_eq!(token, 64, "32 random bytes in hex");
    for r in &routers {
        let pod = r.spec.template.spec.as_ref().expect("pod");
        let env = pod.containers[0].env.clone().unwrap_or_default();
        let from = env
            .iter()
            .find(|e| e.name == "TERN_PEER_TOKEN")
            .and_then(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
            .expect("TERN_PEER_TOKEN from the Secret");
        assert_eq!(
            (from.name.as_str(), from.key.as_str()),
            ("payments-router-peer-token", "token")
        );
    }
    for a in &agents {
        let pod = a.spec.template.spec.as_ref().expect("pod");
        assert_eq!(pod.service_account_name.as_deref(), Some("payments-agent"));
        let args = pod.containers[0].args.clone().unwrap_or_default().join(" ");
        assert_eq!(args.matches("--source=").count(), 2, "{args}");
    }
    let role = cp
        .kubectl(&["get", "role", "payments-agent", "-o", "jsonpath={.rules[*].resources}"])
        .expect("agent role");
    assert!(role.contains("geoclusters/status"), "{role}");
    cp.kubectl(&["get", "serviceaccount,rolebinding", "payments-agent"])
        .expect("agent identity");
    for d in &routers {
        let region = d.labels()["tern.dev/region"].clone();
        assert_eq!(d.owner_references()[0].uid, gc.uid().expect("uid"));
        let args = d.spec.template.spec.as_ref().expect("pod").containers[0]
            .args
            .clone()
            .unwrap_or_default()
            .join(" ");
        assert!(args.contains(&format!("--region={region}")), "{args}");
        assert!(
            args.contains(&format!(
                "--group-endpoints=http://payments-{region}-client.default.svc.cluster.local:2379"
            )),
            "{args}"
        );
        assert_eq!(
            args.matches(":2379").count(),
            4,
            "the group and three directory members: {args}"
        );
        Api::<Service>::namespaced(client.clone(), NS)
            .get(&format!("payments-router-{region}"))
            .await
            .expect("router service");
    }

    // kubectl get answers "is it healthy" at a glance.
    let table = cp.kubectl(&["get", "geoclusters"]).expect("kubectl get");
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "READY", "REGIONS", "PHASE", "AGE"] {
        assert!(header.contains(column), "missing column {column}: {table}");
    }
    let table = cp.kubectl(&["get", "rg"]).expect("short name works");
    assert!(
        table.contains("payments-dir-eu-west") && table.contains("Directory"),
        "{table}"
    );

    // Members become ready → the GeoCluster is Ready.
    eventually("GeoCluster progressing", WAIT, || async {
        (geocluster_phase(&client, "payments").await.as_deref() == Some("Progressing")).then_some(())
    })
    .await;
    mark_statefulsets_ready(&client).await;
    eventually("GeoCluster Ready", WAIT, || async {
        (geocluster_phase(&client, "payments").await.as_deref() == Some("Ready")).then_some(())
    })
    .await;
    let gc = Api::<GeoCluster>::namespaced(client.clone(), NS)
        .get("payments")
        .await
        .expect("geocluster");
    assert_eq!(condition(&gc, "Ready"), Some(("True".into(), "AllMembersReady".into())));
    assert_eq!(condition(&gc, "Degraded").map(|c| c.0), Some("False".into()));
    let table = cp.kubectl(&["get", "geoclusters"]).expect("kubectl get");
    assert!(
        table.contains("True") && table.contains("3/3") && table.contains("Ready"),
        "{table}"
    );

    // A reconcile with nothing to change writes nothing: restart the operator
    // (it reconciles everything on start) and compare resource versions.
    let before = versions(&client).await;
    let result = operator.stop().await;
    assert!(matches!(result, Some(Ok(()))), "graceful stop: {result:?}");
    let operator = OperatorGuard::start(&cp, &[]).await.expect("operator restarts");
    eventually("the new operator reconciled both kinds", WAIT, || async {
        let gcs = operator
            .metric("tern_operator_reconciles_total{controller=\"geocluster\"}")
            .await?;
        let rgs = operator
            .metric("tern_operator_reconciles_total{controller=\"regiongroup\"}")
            .await?;
        (gcs >= 1.0 && rgs >= 6.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(before, versions(&client).await, "a no-op reconcile changed objects");

    // A region's resize is a Raft membership change: the operator asks
    // etcd first, and no pod starts before etcd has the new member. Here
    // no member runs (no kubelet), so the change waits and says why; the
    // StatefulSet and its budget stay as they are. (The steps themselves
    // run against real etcd in tests/membership.rs.)
    cp.kubectl(&[
        "patch",
        "geocluster",
        "payments",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/regions/0/replicas","value":5}]"#,
    ])
    .expect("a region's replica change is accepted");
    let rg_api = Api::<RegionGroup>::namespaced(client.clone(), NS);
    let waiting = eventually("the resize waits for etcd and says so", WAIT, || async {
        let rg = rg_api.get("payments-us-east").await.ok()?;
        let change = rg.status?.membership_change?;
        (rg.spec.replicas == 5).then_some(change)
    })
    .await;
    assert!(
        waiting.contains("5 members wanted, 3 running") && waiting.contains("cannot"),
        "{waiting}"
    );
    let sts = sts_api.get("payments-us-east").await.expect("statefulset");
    assert_eq!(sts.spec.replicas, Some(3), "no pod before Raft");
    cp.kubectl(&[
        "patch",
        "geocluster",
        "payments",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/regions/0/replicas","value":3}]"#,
    ])
    .expect("the resize is taken back");
    eventually("a change that never began is gone", WAIT, || async {
        let rg = rg_api.get("payments-us-east").await.ok()?;
        (rg.spec.replicas == 3 && rg.status?.membership_change.is_none()).then_some(())
    })
    .await;
    // The directory is one group across regions: its size is fixed.
    let refused = cp
        .kubectl(&[
            "patch",
            "geocluster",
            "payments",
            "--type=json",
            "-p",
            r#"[{"op":"replace","path":"/spec/directory/members/0/replicas","value":3}]"#,
        ])
        .expect_err("a directory replica change is refused");
    assert!(
        refused.to_string().contains("spec.directory.members[0].replicas")
            && refused.to_string().contains("directory replicas cannot be changed"),
        "the refusal names the field and the reason: {refused}"
    );

    // An etcd image that skips a minor version is held back: the members
    // stay on the image they run, and the status and an event say why.
    // (The default is v3.6.16; v3.8.0 skips 3.7.)
    let deployed_image = tern_crds::DEFAULT_ETCD_IMAGE;
    let etcd_image = |image: &str| {
        cp.kubectl(&[
            "patch",
            "geocluster",
            "payments",
            "--type=merge",
            "-p",
            &format!(r#"{{"spec":{{"etcd":{{"image":"{image}"}}}}}}"#),
        ])
    };
    etcd_image("gcr.io/etcd-development/etcd:v3.8.0").expect("the schema takes any image");
    let held = eventually("an upgrade that skips a minor is refused", WAIT, || async {
        rg_api.get("payments-us-east").await.ok()?.status?.upgrade_refused
    })
    .await;
    assert!(
        held.contains(deployed_image) && held.contains("skips a minor version"),
        "{held}"
    );
    let sts = sts_api.get("payments-us-east").await.expect("statefulset");
    let image = sts
        .spec
        .template
        .spec
        .as_ref()
        .and_then(|p| p.containers[0].image.clone());
    assert_eq!(
        image.as_deref(),
        Some(deployed_image),
        "the members stay on their image"
    );
    etcd_image(deployed_image).expect("back to the deployed image");
    eventually("nothing held once the spec names the deployed image", WAIT, || async {
        let rg = rg_api.get("payments-us-east").await.ok()?;
        rg.status?.upgrade_refused.is_none().then_some(())
    })
    .await;

    // Editing the members' resources rolls them through: spec, then status.
    cp.kubectl(&[
        "patch",
        "geocluster",
        "payments",
        "--type=merge",
        "-p",
        r#"{"spec":{"etcd":{"resources":{"requests":{"cpu":"100m"}}}}}"#,
    ])
    .expect("edit resources");
    eventually(
        "StatefulSet template has the new requests; replicas and budget unchanged",
        WAIT,
        || async {
            let sts = sts_api.get("payments-us-east").await.ok()?;
            let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), NS)
                .get("payments-us-east")
                .await
                .ok()?;
            let requests = sts.spec.template.spec.as_ref()?.containers[0]
                .resources
                .as_ref()?
                .requests
                .clone()?;
            (sts.spec.replicas == Some(3)
                && requests.get("cpu").map(|q| q.0.as_str()) == Some("100m")
                && pdb.spec?.min_available == Some(IntOrString::Int(2)))
            .then_some(())
        },
    )
    .await;
    // Every group rolls, not only us-east's: mark them ready only once
    // each has the new template, or a late one stays unobserved.
    eventually("every StatefulSet has the new requests", WAIT, || async {
        let all = sts_api.list(&ListParams::default()).await.ok()?.items;
        all.iter()
            .all(|sts| {
                sts.spec
                    .template
                    .spec
                    .as_ref()
                    .and_then(|p| p.containers[0].resources.as_ref())
                    .and_then(|r| r.requests.as_ref())
                    .and_then(|r| r.get("cpu"))
                    .map(|q| q.0.as_str())
                    == Some("100m")
            })
            .then_some(())
    })
    .await;
    eventually("GeoCluster no longer Ready while rolling", WAIT, || async {
        (geocluster_phase(&client, "payments").await.as_deref() != Some("Ready")).then_some(())
    })
    .await;
    mark_statefulsets_ready(&client).await;
    eventually("GeoCluster Ready after the roll", WAIT, || async {
        (geocluster_phase(&client, "payments").await.as_deref() == Some("Ready")).then_some(())
    })
    .await;

    // Events say what happened.
    let events = cp
        .kubectl(&[
            "get",
            "events.events.k8s.io",
            "-n",
            NS,
            "-o",
            "custom-columns=REASON:.reason,NOTE:.note",
        ])
        .expect("events");
    assert!(
        events.contains("GroupCreated") && events.contains("MembersUpdated"),
        "{events}"
    );

    // Deleting with deletionPolicy Retain removes the workloads, keeps volumes.
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
    let template = sts_api.get("payments-us-east").await.expect("sts");
    let labels = template.spec.volume_claim_templates.as_ref().expect("templates")[0]
        .metadata
        .labels
        .clone();
    for i in 0..3 {
        // As the StatefulSet controller would create them.
        let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": format!("data-payments-us-east-{i}"), "labels": labels},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}}
        }))
        .expect("pvc");
        pvcs.create(&PostParams::default(), &pvc).await.expect("create pvc");
    }
    cp.kubectl(&["delete", "geocluster", "payments", "--wait=true", "--timeout=30s"])
        .expect("delete geocluster");
    for (kind, n) in [
        (
            "RegionGroup",
            groups.list(&ListParams::default()).await.expect("list").items.len(),
        ),
        (
            "StatefulSet",
            sts_api.list(&ListParams::default()).await.expect("list").items.len(),
        ),
        (
            "PodDisruptionBudget",
            Api::<PodDisruptionBudget>::namespaced(client.clone(), NS)
                .list(&ListParams::default())
                .await
                .expect("list")
                .items
                .len(),
        ),
        (
            "ConfigMap(tern)",
            Api::<ConfigMap>::namespaced(client.clone(), NS)
                .list(&ListParams::default().labels("app.kubernetes.io/managed-by=tern-operator"))
                .await
                .expect("list")
                .items
                .len(),
        ),
        (
            "Service(tern)",
            Api::<Service>::namespaced(client.clone(), NS)
                .list(&ListParams::default().labels("app.kubernetes.io/managed-by=tern-operator"))
                .await
                .expect("list")
                .items
                .len(),
        ),
    ] {
        assert_eq!(n, 0, "{kind} left after deletion");
    }
    assert_eq!(
        pvcs.list(&ListParams::default()).await.expect("list").items.len(),
        3,
        "Retain keeps every volume"
    );
    drop(operator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_geocluster_is_reported_not_retried() {
    let (cp, client) = setup("invalid").await;
    // The operator traces its reconciles too.
    let receiver = tern_local::otlp::OtlpReceiver::start().await.expect("receiver");
    let otlp = format!("--otlp-endpoint={}", receiver.endpoint());
    let operator = OperatorGuard::start(&cp, &["--identity=traced", &otlp])
        .await
        .expect("operator starts");
    // Valid for the schema, but a node selector key is not a label key (the
    // schema cannot check map keys within its CEL cost budget).
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("badlabel.yaml");
    std::fs::write(
        &path,
        "apiVersion: tern.dev/v1alpha1\nkind: GeoCluster\nmetadata:\n  name: badlabel\n  namespace: default\nspec:\n  regions:\n  - {name: us-east, zones: [a], nodeSelector: {\"bad key\": x}}\n  - {name: eu-west, zones: [a]}\n  directory:\n    members: [{region: us-east}, {region: eu-west, replicas: 2}]\n",
    )
    .expect("write");
    cp.kubectl(&["apply", "-f", path.to_str().expect("utf-8")])
        .expect("schema accepts it");
    let api: Api<GeoCluster> = Api::namespaced(client.clone(), NS);
    let gc = eventually("status says InvalidSpec", WAIT, || async {
        let gc = api.get("badlabel").await.ok()?;
        (condition(&gc, "Degraded") == Some(("True".into(), "InvalidSpec".into()))).then_some(gc)
    })
    .await;
    let message = gc
        .status
        .expect("status")
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("condition")
        .message
        .clone();
    assert!(
        message.contains("spec.regions[0].nodeSelector") && message.contains("label key"),
        "{message}"
    );
    let events = cp
        .kubectl(&[
            "get",
            "events.events.k8s.io",
            "-n",
            NS,
            "-o",
            "custom-columns=TYPE:.type,REASON:.reason",
        ])
        .expect("events");
    assert!(events.contains("Warning") && events.contains("InvalidSpec"), "{events}");
    assert!(
        Api::<RegionGroup>::namespaced(client.clone(), NS)
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .is_empty()
    );

    // It waits for a change instead of spinning.
    let metric =
        "tern_operator_reconcile_errors_total{controller=\"geocluster\",kind=\"invalid_spec\",class=\"permanent\"}";
    let errors = eventually("the error is counted", WAIT, || operator.metric(metric)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        operator.metric(metric).await,
        Some(errors),
        "the operator retried an invalid object"
    );

    // Fixing it lets the operator proceed.
    cp.kubectl(&[
        "patch",
        "geocluster",
        "badlabel",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/regions/0/nodeSelector","value":{"topology.kubernetes.io/region":"us-east"}}]"#,
    ])
    .expect("fix");
    eventually("groups created after the fix", WAIT, || async {
        (Api::<RegionGroup>::namespaced(client.clone(), NS)
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .len()
            == 4)
            .then_some(())
    })
    .await;

    // Stopping the operator flushes its spans: the refused reconcile and the
    // one after the fix, each naming the object.
    operator.stop().await;
    let spans = receiver.spans();
    let reconciles: Vec<_> = spans
        .iter()
        .filter(|s| {
            s.name == "operator.reconcile"
                && s.instance == "traced"
                && s.attribute("tern.object") == Some("GeoCluster/default/badlabel")
        })
        .collect();
    let outcomes: Vec<_> = reconciles.iter().filter_map(|s| s.attribute("tern.outcome")).collect();
    assert!(
        outcomes.contains(&"invalid") && outcomes.contains(&"applied"),
        "{outcomes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_replica_leads() {
    let (cp, client) = setup("leader").await;
    let a = OperatorGuard::start(&cp, &["--identity=replica-a"])
        .await
        .expect("a starts");
    eventually("a leads", WAIT, || async {
        (a.metric("tern_operator_is_leader").await? == 1.0).then_some(())
    })
    .await;
    let b = OperatorGuard::start(&cp, &["--identity=replica-b"])
        .await
        .expect("b starts");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        b.metric("tern_operator_is_leader").await,
        Some(0.0),
        "a standby must not lead while the leader renews"
    );

    // The standby is ready (it can take over), and does not reconcile.
    cp.kubectl(&["apply", "-f", "examples/geocluster.yaml"]).expect("apply");
    eventually("the leader provisions", WAIT, || async {
        (Api::<RegionGroup>::namespaced(client.clone(), NS)
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .len()
            == 6)
            .then_some(())
    })
    .await;
    assert_eq!(
        b.metric("tern_operator_reconciles_total").await,
        None,
        "the standby reconciled"
    );

    // The leader crashes without releasing: b takes over once the lease expires.
    a.crash();
    eventually("b leads after a's lease expires", Duration::from_secs(20), || async {
        (b.metric("tern_operator_is_leader").await? == 1.0).then_some(())
    })
    .await;
    let lease = cp
        .kubectl(&[
            "get",
            "lease",
            "tern-operator",
            "-n",
            "tern-system",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .expect("lease");
    assert_eq!(lease, "replica-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_operator_per_cluster() {
    let regions = ["us-east", "eu-west", "ap-south"];
    let mut clusters = Vec::new();
    for region in regions {
        let (cp, client) = setup(region).await;
        let flag = format!("--regions={region}");
        let operator = OperatorGuard::start(&cp, &[flag.as_str()])
            .await
            .expect("operator starts");
        cp.kubectl(&["apply", "-f", "examples/multicluster.yaml"])
            .expect("apply the same GeoCluster everywhere");
        // The operator first: fields drop in order, and it should stop
        // before its API server does.
        clusters.push((region, operator, client, cp));
    }
    for (region, _operator, client, _cp) in &clusters {
        let groups: Api<RegionGroup> = Api::namespaced(client.clone(), NS);
        let names = eventually("this region's groups", WAIT, || async {
            let mut names: Vec<String> = groups
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .iter()
                .map(|g| g.name_any())
                .collect();
            names.sort();
            (names.len() == 2).then_some(names)
        })
        .await;
        let mut expected = vec![format!("payments-{region}"), format!("payments-dir-{region}")];
        expected.sort();
        assert_eq!(names, expected, "cluster {region} holds only its region's groups");
        let cm = eventually("directory config", WAIT, || async {
            Api::<ConfigMap>::namespaced(client.clone(), NS)
                .get_opt(&format!("payments-dir-{region}-config"))
                .await
                .ok()?
        })
        .await;
        let initial = cm.data.expect("data")["initial-cluster"].clone();
        for other in regions {
            let peer = format!(
                "payments-dir-{other}-0=http://payments-dir-{other}-0.payments-dir-{other}-peer.default.svc.{other}.tern.example:2380"
            );
            assert!(initial.contains(&peer), "cluster {region}: {initial} lacks {peer}");
        }
        let names = eventually("status of the managed region", WAIT, || async {
            let gc = Api::<GeoCluster>::namespaced(client.clone(), NS)
                .get("payments")
                .await
                .ok()?;
            let names: Vec<String> = gc.status?.regions.iter().map(|r| r.name.clone()).collect();
            (!names.is_empty()).then_some(names)
        })
        .await;
        assert_eq!(names, vec![region.to_string()], "status covers the managed region only");
    }
}

/// Status churn costs the operator nothing: on an idle, Ready GeoCluster
/// whose status an "agent" patches every second for 30 s (status
/// subresource, the agent's own field manager, as region-agent does), the
/// operator sends no write request at all, counted from the API server's
/// audit log. Changes to owned objects still reconcile, and those reconciles
/// write nothing either when nothing differs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_churn_causes_no_operator_writes() {
    let (cp, client) = setup("churn").await;
    // No leader election: renewing the Lease is a write the operator makes
    // on a timer, unrelated to the GeoCluster.
    let operator = OperatorGuard::start(&cp, &["--leader-elect=false"])
        .await
        .expect("operator starts");
    cp.kubectl(&["apply", "-f", "examples/geocluster.yaml"])
        .expect("apply example");
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    eventually("six StatefulSets", WAIT, || async {
        (sts_api.list(&ListParams::default()).await.ok()?.items.len() == 6).then_some(())
    })
    .await;
    mark_statefulsets_ready(&client).await;
    eventually("GeoCluster Ready", WAIT, || async {
        (geocluster_phase(&client, "payments").await.as_deref() == Some("Ready")).then_some(())
    })
    .await;
    // The Ready event is the last write of the reconcile that made it Ready.
    eventually("the Ready event", WAIT, || async {
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), NS);
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Ready"))
            .then_some(())
    })
    .await;
    let operator_writes = || {
        cp.audited_writes()
            .expect("audit log readable")
            .into_iter()
            .filter(|w| w.user == tern_e2e::operator::OPERATOR_USER)
            .collect::<Vec<_>>()
    };
    // Provisioning may still be settling after the Ready event (a group's
    // status arriving a moment later is one more status write, on a busy
    // machine seconds later): wait until the operator has written nothing
    // for 3 s before counting.
    let mut before = operator_writes();
    let settled = Instant::now() + WAIT;
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = operator_writes();
        if now.len() == before.len() || Instant::now() > settled {
            break;
        }
        before = now;
    }
    assert!(
        !before.is_empty(),
        "the audit log shows the operator's writes while provisioning"
    );
    let reconciles = |controller: &'static str| {
        let operator = &operator;
        async move {
            operator
                .metric(&format!(
                    "tern_operator_reconciles_total{{controller=\"{controller}\"}}"
                ))
                .await
                .unwrap_or_default()
        }
    };
    let (gc_reconciles, rg_reconciles) = (reconciles("geocluster").await, reconciles("regiongroup").await);

    // 30 s of an agent publishing lag every second.
    let gcs: Api<GeoCluster> = Api::namespaced(client.clone(), NS);
    for second in 0..30i64 {
        let patch = json!({
            "apiVersion": "tern.dev/v1alpha1",
            "kind": "GeoCluster",
            "status": {"regions": [{
                "name": "us-east",
                "agent": "payments-agent-us-east-0",
                "mirrors": [{"source": "eu-west", "state": "streaming", "lagMs": 40 + second,
                             "lagRevisions": second % 3, "skewMs": 1}],
                "membersBehind": 0,
                "groupLeader": format!("http://payments-us-east-{}:2379", second % 3),
            }]}
        });
        gcs.patch_status(
            "payments",
            &PatchParams::apply("tern-agent-us-east").force(),
            &Patch::Apply(&patch),
        )
        .await
        .expect("agent status patch");
        if second == 10 {
            // Owned objects changing (here: someone else's label) still
            // trigger reconciles of both controllers; with nothing of the
            // operator's to put back they must write nothing.
            let label = json!({"metadata": {"labels": {"example.com/touched": "yes"}}});
            Api::<Deployment>::namespaced(client.clone(), NS)
                .patch(
                    "payments-router-us-east",
                    &PatchParams::default(),
                    &Patch::Merge(&label),
                )
                .await
                .expect("label the router Deployment");
            sts_api
                .patch("payments-eu-west", &PatchParams::default(), &Patch::Merge(&label))
                .await
                .expect("label a StatefulSet");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let agent_patches = cp
        .audited_writes()
        .expect("audit log readable")
        .into_iter()
        .filter(|w| w.resource == "geoclusters" && w.subresource == "status" && w.code == 200)
        .filter(|w| w.user == "admin")
        .count();
    assert!(
        agent_patches >= 30,
        "the agent's status patches were audited: {agent_patches}"
    );
    eventually("both controllers reconciled the touched objects", WAIT, || async {
        (reconciles("geocluster").await > gc_reconciles && reconciles("regiongroup").await > rg_reconciles)
            .then_some(())
    })
    .await;
    let after = operator_writes();
    let new: Vec<String> = after[before.len()..].iter().map(ToString::to_string).collect();
    assert!(
        new.is_empty(),
        "the operator wrote while only status churned and owned objects were touched:\n{}",
        new.join("\n")
    );
    let gc = gcs.get("payments").await.expect("geocluster");
    let us_east = gc
        .status
        .as_ref()
        .and_then(|s| s.regions.iter().find(|r| r.name == "us-east"))
        .expect("us-east status");
    assert_eq!(
        us_east.mirrors.first().map(|m| m.lag_ms),
        Some(69),
        "the agent's fields stay the agent's"
    );
    let result = operator.stop().await;
    assert!(matches!(result, Some(Ok(()))), "graceful stop: {result:?}");
}

/// The namespaced install (operator/deploy/overlays/namespaced): the
/// operator's service account is granted the ClusterRole's rules by a
/// RoleBinding in `default` only. It provisions and deletes a GeoCluster
/// there with no request refused (NetworkPolicies made and pruned on the
/// way), cannot read GeoClusters anywhere else, and leaves another
/// namespace's GeoCluster alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespaced_operator_works_in_its_namespace_and_sees_nothing_else() {
    let (cp, client) = setup("namespaced").await;
    cp.kubectl(&["apply", "-k", "operator/deploy/overlays/namespaced"])
        .expect("the namespaced bundle applies");
    let rendered = cp
        .kubectl(&["kustomize", "operator/deploy/overlays/namespaced"])
        .expect("renders");
    assert!(!rendered.contains("kind: ClusterRoleBinding"), "{rendered}");
    assert!(
        rendered.contains("name: TERN_OPERATOR_NAMESPACE\n          value: default"),
        "the Deployment watches the namespace the RoleBinding grants:\n{rendered}"
    );
    let can = |verb: &str, scope: &str| {
        cp.kubectl(&[
            "auth",
            "can-i",
            verb,
            "geoclusters.tern.dev",
            scope,
            "--as",
            tern_e2e::operator::OPERATOR_USER,
        ])
        // "no" is an exit status of 1; the "yes" below shows kubectl works.
        .is_ok_and(|out| out.trim() == "yes")
    };
    assert!(can("list", "--namespace=default"));
    assert!(can("patch", "--namespace=default"));
    assert!(!can("list", "--all-namespaces"));
    assert!(!can("list", "--namespace=elsewhere"));

    // The operator as the bundle runs it: its namespace from the same value.
    let operator = OperatorGuard::start_installed(&cp, &["--namespace=default"])
        .await
        .expect("operator starts");
    cp.kubectl(&["create", "namespace", "elsewhere"]).expect("namespace");
    let other = std::fs::read_to_string(tern_e2e::repo_root().join("examples/geocluster.yaml"))
        .expect("example")
        .replace("namespace: default", "namespace: elsewhere");
    let dir = tempfile::tempdir().expect("tempdir");
    let other_path = dir.path().join("elsewhere.yaml");
    std::fs::write(&other_path, other).expect("write");
    cp.kubectl(&["apply", "-f", other_path.to_str().expect("utf-8")])
        .expect("a GeoCluster elsewhere");
    cp.kubectl(&["apply", "-f", "examples/geocluster.yaml"])
        .expect("apply example");

    let groups: Api<RegionGroup> = Api::namespaced(client.clone(), NS);
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    eventually("six RegionGroups and StatefulSets in default", WAIT, || async {
        let g = groups.list(&ListParams::default()).await.ok()?.items.len();
        let s = sts_api.list(&ListParams::default()).await.ok()?.items.len();
        (g == 6 && s == 6).then_some(())
    })
    .await;
    mark_statefulsets_ready(&client).await;
    eventually("the GeoCluster's status is written", WAIT, || async {
        geocluster_phase(&client, "payments").await.filter(|p| p != "Pending")
    })
    .await;

    // spec.networkPolicy: three NetworkPolicies per region, accepted by the
    // API server; gone again when the field is.
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), NS);
    let policy_names = || async {
        let mut names: Vec<String> = policies
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .iter()
            .map(|p| p.name_any())
            .collect();
        names.sort();
        Some(names)
    };
    cp.kubectl(&[
        "patch",
        "geocluster",
        "payments",
        "--type=merge",
        "-p",
        r#"{"spec":{"networkPolicy":{"clients":[{"namespaceSelector":{"team":"payments"},"podSelector":{}}]}}}"#,
    ])
    .expect("networkPolicy set");
    eventually("nine NetworkPolicies", WAIT, || async {
        policy_names().await.filter(|n| n.len() == 9)
    })
    .await;
    let etcd = policies.get("payments-etcd-eu-west").await.expect("etcd policy");
    let from = etcd.spec.and_then(|s| s.ingress).expect("ingress")[0]
        .from
        .clone()
        .expect("from");
    assert_eq!(
        from[1]
            .namespace_selector
            .clone()
            .and_then(|s| s.match_labels)
            .map(|l| l["kubernetes.io/metadata.name"].clone()),
        Some("tern-system".to_string()),
        "the operator's pods reach the members"
    );
    cp.kubectl(&[
        "patch",
        "geocluster",
        "payments",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/networkPolicy"}]"#,
    ])
    .expect("networkPolicy removed");
    eventually("the NetworkPolicies pruned", WAIT, || async {
        policy_names().await.filter(|n| n.is_empty())
    })
    .await;

    cp.kubectl(&["delete", "geocluster", "payments", "--wait=true", "--timeout=30s"])
        .expect("the finalizer is removed and the GeoCluster goes");

    // Nothing was made in the other namespace, and nothing written there.
    let elsewhere: Api<RegionGroup> = Api::namespaced(client.clone(), "elsewhere");
    assert!(
        elsewhere
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .is_empty()
    );
    let gc = Api::<GeoCluster>::namespaced(client.clone(), "elsewhere")
        .get("payments")
        .await
        .expect("still there");
    assert!(gc.status.is_none() && gc.finalizers().is_empty(), "{gc:?}");
    let writes: Vec<_> = cp
        .audited_writes()
        .expect("audit log readable")
        .into_iter()
        .filter(|w| w.user == tern_e2e::operator::OPERATOR_USER)
        .collect();
    assert!(!writes.is_empty());
    let refused: Vec<String> = writes.iter().filter(|w| w.code == 403).map(|w| w.to_string()).collect();
    assert!(refused.is_empty(), "refused writes: {refused:?}");
    assert!(
        writes.iter().all(|w| w.namespace == NS || w.namespace == "tern-system"),
        "writes outside the namespace: {:?}",
        writes
            .iter()
            .filter(|w| w.namespace != NS)
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
    );
    drop(operator);
}

/// A directory (one etcd member, its data in `dir`) and the operator,
/// which reaches it through --directory-endpoints.
async fn operator_with_directory(
    cp: &ControlPlane,
    dir: &std::path::Path,
) -> (tern_local::etcd_cluster::EtcdCluster, OperatorGuard) {
    let directory =
        tern_local::etcd_cluster::EtcdCluster::start(dir, "directory", 1, tern_local::etcd_cluster::Tuning::default())
            .expect("directory starts");
    let endpoints = format!("--directory-endpoints={}", directory.endpoints().join(","));
    let operator = OperatorGuard::start(cp, &[&endpoints]).await.expect("operator starts");
    (directory, operator)
}

/// Plays the Job controller: Job `name`'s one pod ended as `outcome`
/// (`succeeded` or `failed`).
async fn finish_job(client: &Client, name: &str, outcome: &str) {
    let api: Api<Job> = Api::namespaced(client.clone(), NS);
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = json!({"status": {"startTime": now, outcome: 1}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("patch the status of Job {name}: {e}"));
}

/// regions[].restoreFrom: the operator makes the members' claims and a Job
/// per member that restores the backup into one with etcdutl, and makes
/// the StatefulSet only once every Job has succeeded. A failed Job is
/// reported with what to do. A group whose member volume exists already is
/// never restored over: it starts on its volume and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_group_starts_only_after_its_restore_jobs() {
    let (cp, client) = setup("restore").await;
    // A directory, where the operator holds a restored region until its
    // fences agree with it.
    let dir = tempfile::tempdir().expect("temp dir");
    let (directory, _operator) = operator_with_directory(&cp, dir.path()).await;
    // eu-west's member has a volume already.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
    let existing: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "data-restored-eu-west-0"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }))
    .expect("claim");
    claims
        .create(&PostParams::default(), &existing)
        .await
        .expect("claim created");
    let path = dir.path().join("restored.yaml");
    std::fs::write(
        &path,
        "apiVersion: tern.dev/v1alpha1\nkind: GeoCluster\nmetadata:\n  name: restored\n  namespace: default\nspec:\n  regions:\n  - {name: us-east, zones: [a, b, c], restoreFrom: us-east-20261203T113457.236Z}\n  - {name: eu-west, zones: [a], replicas: 1, restoreFrom: eu-west-20261203T113457.236Z}\n  - {name: ap-south, zones: [a], replicas: 1, restoreFrom: ap-south-20261203T113457.236Z}\n  directory:\n    members: [{region: us-east}, {region: eu-west, replicas: 2}]\n  backup: {claimName: tern-backups}\n",
    )
    .expect("write");
    cp.kubectl(&["apply", "-f", path.to_str().expect("utf-8")])
        .expect("the GeoCluster applies");

    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let groups: Api<RegionGroup> = Api::namespaced(client.clone(), NS);
    let names: Vec<String> = (0..3).map(|o| format!("restored-us-east-{o}-restore")).collect();
    for name in &names {
        eventually(&format!("Job {name}"), WAIT, || async {
            jobs.get_opt(name).await.ok()?
        })
        .await;
    }
    let job = jobs.get(&names[1]).await.expect("job");
    let pod = job.spec.expect("spec").template.spec.expect("pod");
    let container = &pod.containers[0];
    assert_eq!(container.command.as_deref(), Some(&["etcdutl".to_string()][..]));
    assert_eq!(container.image.as_deref(), Some(tern_crds::DEFAULT_ETCD_IMAGE));
    let args = container.args.clone().expect("args");
    for want in [
        "/var/lib/tern/backups/us-east/us-east-20261203T113457.236Z.db",
        "--name=restored-us-east-1",
        "--data-dir=/var/lib/etcd/data",
        "--mark-compacted",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} in {args:?}");
    }
    let volumes: Vec<String> = pod
        .volumes
        .expect("volumes")
        .iter()
        .filter_map(|v| v.persistent_volume_claim.as_ref().map(|c| c.claim_name.clone()))
        .collect();
    assert_eq!(volumes, ["data-restored-us-east-1", "tern-backups"]);
    for o in 0..3 {
        let claim = claims
            .get(&format!("data-restored-us-east-{o}"))
            .await
            .expect("the member's claim is made before its StatefulSet");
        assert_eq!(
            claim.labels().get("tern.dev/restore-backup").map(String::as_str),
            Some("us-east-20261203T113457.236Z")
        );
    }

    // eu-west's volume is not restored over: its members start on it.
    eventually("eu-west's StatefulSet", WAIT, || async {
        sets.get_opt("restored-eu-west").await.ok()?
    })
    .await;
    let eu = groups.get("restored-eu-west").await.expect("group");
    let refused = eu.status.and_then(|s| s.restore).expect("status.restore");
    assert!(!refused.done);
    assert!(
        refused.message.contains("data-restored-eu-west-0") && refused.message.contains("never writes over"),
        "{}",
        refused.message
    );
    assert!(
        jobs.get_opt("restored-eu-west-0-restore").await.expect("get").is_none(),
        "no restore Job for a group with a volume"
    );

    // Until every Job has succeeded, us-east has no members.
    finish_job(&client, &names[0], "succeeded").await;
    finish_job(&client, &names[1], "failed").await;
    let message = eventually("the failure is reported", WAIT, || async {
        let s = groups.get("restored-us-east").await.ok()?.status?.restore?;
        s.message.contains("failed").then_some(s.message)
    })
    .await;
    assert!(
        message.contains("kubectl logs job/restored-us-east-1-restore") && message.contains("data-restored-us-east-1"),
        "{message}"
    );
    assert!(sets.get_opt("restored-us-east").await.expect("get").is_none());
    // Trying again: the Job is deleted, and the operator makes it anew.
    jobs.delete(&names[1], &kube::api::DeleteParams::background())
        .await
        .expect("delete");
    eventually("a new Job", WAIT, || async {
        let j = jobs.get_opt(&names[1]).await.ok()??;
        j.status.is_none_or(|s| s.failed.is_none()).then_some(())
    })
    .await;
    finish_job(&client, &names[1], "succeeded").await;
    finish_job(&client, &names[2], "succeeded").await;
    let sts = eventually("us-east's StatefulSet once restored", WAIT, || async {
        sets.get_opt("restored-us-east").await.ok()?
    })
    .await;
    assert_eq!(sts.spec.replicas, Some(3));
    let status = groups
        .get("restored-us-east")
        .await
        .expect("group")
        .status
        .expect("status");
    let restore = status.restore.expect("status.restore");
    assert!(restore.done, "{restore:?}");
    assert!(restore.message.contains("lost"), "{}", restore.message);
    // us-east is held in the directory before its members start: its
    // agent claims no lease until the fences agree (no members serve here).
    let mut d = etcd_client::Client::connect(directory.endpoints(), None)
        .await
        .expect("directory client");
    let hold = d.get("/tern/dir/holds/us-east", None).await.expect("read");
    let hold = hold.kvs().first().expect("us-east is held");
    assert!(
        hold.value_str()
            .expect("utf-8")
            .contains("restored-us-east restored from backup"),
        "{:?}",
        hold.value_str()
    );
    // The restored members are a cluster of their own: a member that joins
    // later is told this membership.
    assert_eq!(status.raft_members.len(), 3);
    let config = Api::<ConfigMap>::namespaced(client.clone(), NS)
        .get("restored-us-east-config")
        .await
        .expect("config map");
    assert_eq!(
        config
            .data
            .expect("data")
            .get("initial-cluster-state")
            .map(String::as_str),
        Some("existing")
    );
    // Its claims are no longer marked as a restore's own.
    for o in 0..3 {
        let claim = claims.get(&format!("data-restored-us-east-{o}")).await.expect("claim");
        assert!(
            !claim.labels().contains_key("tern.dev/restore-backup"),
            "{:?}",
            claim.labels()
        );
    }
    // Deleting the StatefulSet does not restore the group again.
    sets.delete("restored-us-east", &Default::default())
        .await
        .expect("delete");
    eventually("the StatefulSet made again", WAIT, || async {
        let s = sets.get_opt("restored-us-east").await.ok()??;
        s.metadata.deletion_timestamp.is_none().then_some(())
    })
    .await;
    // Then every volume of us-east is lost, and no restore is asked for
    // (restoreFrom names the backup restored above): no member is started
    // on empty volumes, and the region is held. The restore's hold is
    // lifted first, as the fences would (no member serves here).
    d.delete("/tern/dir/holds/us-east", None).await.expect("lift");
    for o in 0..3 {
        let name = format!("data-restored-us-east-{o}");
        claims.delete(&name, &Default::default()).await.expect("delete claim");
        // No controller here removes the protection finalizer.
        claims
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await
            .ok();
    }
    eventually("us-east's claims gone", WAIT, || async {
        let left = claims
            .list(&ListParams::default().labels("app.kubernetes.io/instance=restored-us-east"))
            .await
            .ok()?;
        left.items.is_empty().then_some(())
    })
    .await;
    sets.delete("restored-us-east", &Default::default())
        .await
        .expect("delete");
    let lost = eventually("us-east's data reported lost", WAIT, || async {
        groups
            .get("restored-us-east")
            .await
            .ok()?
            .status?
            .data_lost
            .filter(|d| d.held)
    })
    .await;
    assert!(
        lost.message.contains("its data is gone")
            && lost
                .message
                .contains("restoreFrom still names backup us-east-20261203T113457.236Z"),
        "{}",
        lost.message
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        sets.get_opt("restored-us-east").await.expect("get").is_none(),
        "no member starts on empty volumes"
    );
    let hold = d.get("/tern/dir/holds/us-east", None).await.expect("read");
    let hold = hold.kvs().first().expect("us-east is held again");
    assert!(
        hold.value_str()
            .expect("utf-8")
            .contains("every member's volume of restored-us-east is gone"),
        "{:?}",
        hold.value_str()
    );
    // ap-south's restore is switched to another backup midway: its claim
    // holds part of the first, and nothing starts on it.
    eventually("ap-south's restore Job", WAIT, || async {
        jobs.get_opt("restored-ap-south-0-restore").await.ok()?
    })
    .await;
    cp.kubectl(&[
        "patch",
        "geocluster",
        "restored",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/regions/2/restoreFrom","value":"ap-south-20261203T120000.000Z"}]"#,
    ])
    .expect("another backup");
    let message = eventually("the unfinished restore is reported", WAIT, || async {
        let s = groups.get("restored-ap-south").await.ok()?.status?.restore?;
        s.message.contains("unfinished").then_some(s.message)
    })
    .await;
    assert!(
        message.contains("data-restored-ap-south-0") && message.contains("ap-south-20261203T113457.236Z"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(sets.get_opt("restored-ap-south").await.expect("get").is_none());
    let events = cp
        .kubectl(&[
            "get",
            "events.events.k8s.io",
            "-n",
            NS,
            "-o",
            "custom-columns=REASON:.reason",
        ])
        .expect("events");
    for reason in [
        "RestoreStarted",
        "RestoreFailed",
        "Restored",
        "RestoreRefused",
        "GroupDataLost",
    ] {
        assert!(events.contains(reason), "{reason} in {events}");
    }
    // us-east's and ap-south's.
    assert_eq!(events.matches("RestoreStarted").count(), 2, "{events}");
}

/// The apply used for a data group's StatefulSet never makes the object
/// again once it has been deleted: the API server refuses a server-side
/// apply that names the uid of an object that has gone (or been replaced),
/// and `apply_existing` reports the object gone rather than creating it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_only_apply_never_makes_a_deleted_object_again() {
    use tern_operator::apply::{Outcome, apply, apply_existing, apply_to};
    let (_cp, client) = setup("apply-existing").await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let config = |value: &str| {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some("members".into());
        cm.metadata.namespace = Some(NS.into());
        cm.data = Some([("k".to_string(), value.to_string())].into());
        cm
    };
    let value = |cm: ConfigMap| cm.data.and_then(|d| d.get("k").cloned());
    let absent = apply_existing(&client, &config("a")).await.expect("apply");
    assert_eq!(absent, None, "an absent object is reported gone");
    assert!(api.get_opt("members").await.expect("get").is_none(), "and not made");

    assert_eq!(apply(&client, &config("a")).await.expect("apply"), Outcome::Created);
    let first = api.get("members").await.expect("get").uid().expect("uid");
    assert_eq!(
        apply_existing(&client, &config("b")).await.expect("apply"),
        Some(Outcome::Updated)
    );
    assert_eq!(
        apply_existing(&client, &config("b")).await.expect("apply"),
        Some(Outcome::Unchanged)
    );

    // To an object deleted since it was read: refused, not made again.
    api.delete("members", &Default::default()).await.expect("delete");
    match apply_to(&api, &config("c"), &first).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 409, "a conflict: {e:?}"),
        other => panic!("an apply to a deleted object made it again: {other:?}"),
    }
    assert!(
        api.get_opt("members").await.expect("get").is_none(),
        "the deleted object was made again"
    );
    assert_eq!(apply_existing(&client, &config("c")).await.expect("apply"), None);

    // To an object replaced by another of its name: refused, not written.
    assert_eq!(apply(&client, &config("d")).await.expect("apply"), Outcome::Created);
    match apply_to(&api, &config("e"), &first).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 422, "the uid is immutable: {e:?}"),
        other => panic!("an apply to a replaced object wrote the new one: {other:?}"),
    }
    assert_eq!(value(api.get("members").await.expect("get")).as_deref(), Some("d"));
    // apply_existing reads again and writes the object there now.
    assert_eq!(
        apply_existing(&client, &config("e")).await.expect("apply"),
        Some(Outcome::Updated)
    );
    assert_eq!(value(api.get("members").await.expect("get")).as_deref(), Some("e"));
}

/// A region taken out of the spec goes with its RegionGroup, not only with
/// the RegionGroup's objects: a RegionGroup left behind would make its
/// StatefulSet again on its next reconcile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_removed_from_the_spec_goes_with_its_regiongroup() {
    let (cp, client) = setup("prune").await;
    let _operator = OperatorGuard::start(&cp, &[]).await.expect("operator starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("prune.yaml");
    let write = |regions: &str| {
        std::fs::write(
            &path,
            format!(
                "apiVersion: tern.dev/v1alpha1\nkind: GeoCluster\nmetadata:\n  name: prune\n  namespace: default\nspec:\n  regions:\n{regions}  directory:\n    members: [{{region: us-east}}]\n"
            ),
        )
        .expect("write");
    };
    write("  - {name: us-east, zones: [a], replicas: 1}\n  - {name: eu-west, zones: [a], replicas: 1}\n");
    cp.kubectl(&["apply", "-f", path.to_str().expect("utf-8")])
        .expect("the GeoCluster applies");
    let groups: Api<RegionGroup> = Api::namespaced(client.clone(), NS);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    eventually("eu-west's StatefulSet", WAIT, || async {
        sets.get_opt("prune-eu-west").await.ok()?
    })
    .await;

    write("  - {name: us-east, zones: [a], replicas: 1}\n");
    cp.kubectl(&["apply", "-f", path.to_str().expect("utf-8")])
        .expect("eu-west leaves the spec");
    eventually("eu-west's RegionGroup and StatefulSet gone", WAIT, || async {
        let group = groups.get_opt("prune-eu-west").await.ok()?;
        let set = sets.get_opt("prune-eu-west").await.ok()?;
        (group.is_none() && set.is_none_or(|s| s.metadata.deletion_timestamp.is_some())).then_some(())
    })
    .await;
    // Nothing makes it again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(groups.get_opt("prune-eu-west").await.expect("get").is_none());
    assert!(
        sets.get_opt("prune-eu-west")
            .await
            .expect("get")
            .is_none_or(|s| s.metadata.deletion_timestamp.is_some()),
        "eu-west's StatefulSet was made again"
    );
    assert!(groups.get_opt("prune-us-east").await.expect("get").is_some());
}

/// The args of Job `name`'s container.
async fn job_args(jobs: &Api<Job>, name: &str) -> Vec<String> {
    let job = jobs.get(name).await.unwrap_or_else(|e| panic!("Job {name}: {e}"));
    job.spec.expect("spec").template.spec.expect("pod").containers[0]
        .args
        .clone()
        .expect("args")
}

/// directory.restoreFrom: every share of the directory is restored from
/// the one backup, into one cluster of every share's members, bound to
/// that backup; its StatefulSet comes only after its Jobs. Once the
/// directory serves, the share says what it holds (its holds from the
/// backup's time named). And a directory is not restored under a region
/// group that runs on data of its own: nothing of the share starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_is_restored_share_by_share_from_one_backup() {
    let (cp, client) = setup("dirrestore").await;
    // The directory as restored (the operator reaches it through
    // --directory-endpoints): one account, and a hold put before the
    // backup.
    let dir = tempfile::tempdir().expect("temp dir");
    let (directory, _operator) = operator_with_directory(&cp, dir.path()).await;
    let mut d = etcd_client::Client::connect(directory.endpoints(), None)
        .await
        .expect("directory client");
    let record = tern_common::AccountRecord {
        home: tern_common::RegionName::new("us-east").expect("region"),
        epoch: tern_common::Epoch(1),
        state: tern_common::AccountState::Active,
        allowed_regions: vec![],
        moved_ms: None,
        pinned: false,
    };
    d.put(
        "/tern/dir/accounts/acct-1",
        serde_json::to_vec(&record).expect("json"),
        None,
    )
    .await
    .expect("account");
    let hold = tern_common::RegionHold {
        by: "a person".into(),
        reason: "checking eu-west".into(),
        since_ms: 1,
    };
    d.put(
        "/tern/dir/holds/eu-west",
        serde_json::to_vec(&hold).expect("json"),
        None,
    )
    .await
    .expect("hold");
    let backup = "directory-20261203T113457.236Z";
    let geocluster = |name: &str, restore: bool| {
        format!(
            "apiVersion: tern.dev/v1alpha1\nkind: GeoCluster\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  regions:\n  - {{name: us-east, zones: [a], replicas: 1}}\n  - {{name: eu-west, zones: [a, b], replicas: 1}}\n  directory:\n    members: [{{region: us-east}}, {{region: eu-west, replicas: 2}}]\n{}  backup: {{claimName: tern-backups}}\n",
            if restore {
                format!("    restoreFrom: {backup}\n")
            } else {
                String::new()
            }
        )
    };
    let path = dir.path().join("restored.yaml");
    std::fs::write(&path, geocluster("whole", true)).expect("write");
    cp.kubectl(&["apply", "-f", path.to_str().expect("utf-8")])
        .expect("the GeoCluster applies");

    let jobs: Api<Job> = Api::namespaced(client.clone(), NS);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let groups: Api<RegionGroup> = Api::namespaced(client.clone(), NS);
    let names = [
        "whole-dir-us-east-0-restore",
        "whole-dir-eu-west-0-restore",
        "whole-dir-eu-west-1-restore",
    ];
    for name in names {
        eventually(&format!("Job {name}"), WAIT, || async {
            jobs.get_opt(name).await.ok()?
        })
        .await;
    }
    let flag = |args: &[String], flag: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(flag).map(str::to_string))
            .unwrap_or_else(|| panic!("{flag} in {args:?}"))
    };
    let mut agreed = Vec::new();
    for name in names {
        let args = job_args(&jobs, name).await;
        assert_eq!(args[2], format!("/var/lib/tern/backups/directory/{backup}.db"));
        assert_eq!(
            flag(&args, "--name="),
            name.trim_end_matches("-restore"),
            "each share restores its own members"
        );
        agreed.push((
            flag(&args, "--initial-cluster="),
            flag(&args, "--initial-cluster-token="),
        ));
    }
    agreed.dedup();
    assert_eq!(agreed.len(), 1, "one cluster, one token: {agreed:?}");
    let (cluster, token) = &agreed[0];
    assert_eq!(cluster.split(',').count(), 3, "{cluster}");
    assert!(token.ends_with(backup), "the token names the backup: {token}");
    // The data groups, not restored, start at once; no share does.
    eventually("us-east's data group", WAIT, || async {
        sets.get_opt("whole-us-east").await.ok()?
    })
    .await;
    assert!(sets.get_opt("whole-dir-us-east").await.expect("get").is_none());
    for name in names {
        finish_job(&client, name, "succeeded").await;
    }
    for share in ["whole-dir-us-east", "whole-dir-eu-west"] {
        eventually(&format!("{share}'s StatefulSet once restored"), WAIT, || async {
            sets.get_opt(share).await.ok()?
        })
        .await;
    }
    // Once the shares' members are ready, the directory they serve is
    // described.
    mark_statefulsets_ready(&client).await;
    let described = eventually("what the restored directory holds", WAIT, || async {
        let r = groups.get("whole-dir-eu-west").await.ok()?.status?.restore?;
        assert!(r.done, "{r:?}");
        r.directory
    })
    .await;
    assert!(
        described.contains("1 accounts placed (us-east 1)")
            && described.contains("eu-west (by a person: checking eu-west)"),
        "{described}"
    );
    // The restored directory's hold is not the operator's to lift.
    assert_eq!(d.get("/tern/dir/holds/eu-west", None).await.expect("read").count(), 1);

    // Under a region that runs on data of its own, the directory is not
    // restored: its share's StatefulSet deleted (the directory's volume
    // lost), restoreFrom set, nothing starts and the status says why.
    let path = dir.path().join("live.yaml");
    std::fs::write(&path, geocluster("live", false)).expect("write");
    cp.kubectl(&["apply", "-f", path.to_str().expect("utf-8")])
        .expect("the GeoCluster applies");
    eventually("live's directory share", WAIT, || async {
        sets.get_opt("live-dir-us-east").await.ok()?
    })
    .await;
    std::fs::write(&path, geocluster("live", true)).expect("write");
    cp.kubectl(&["apply", "-f", path.to_str().expect("utf-8")])
        .expect("restoreFrom applies");
    eventually("the share asked to restore", WAIT, || async {
        let g = groups.get("live-dir-us-east").await.ok()?;
        g.spec.restore.map(|_| ())
    })
    .await;
    // us-east's data group has run: its Raft membership is recorded (as
    // the operator records it once its members are ready).
    let member = tern_crds::ClusterMember {
        name: "live-us-east-0".into(),
        peer_url: "http://live-us-east-0:2380".into(),
    };
    let ran = json!({"status": {"raftMembers": [member]}});
    groups
        .patch_status("live-us-east", &PatchParams::default(), &Patch::Merge(&ran))
        .await
        .expect("patch status");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let recorded = groups.get("live-us-east").await.expect("group").status.expect("status");
    assert_eq!(recorded.raft_members.len(), 1, "the membership stays recorded");
    sets.delete("live-dir-us-east", &Default::default())
        .await
        .expect("delete");
    let message = eventually("the directory restore is refused", WAIT, || async {
        let r = groups.get("live-dir-us-east").await.ok()?.status?.restore?;
        r.message.contains("not restored").then_some(r.message)
    })
    .await;
    assert!(
        message.contains("live-us-east") && message.contains("run on data of their own"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(sets.get_opt("live-dir-us-east").await.expect("get").is_none());
    assert!(
        jobs.get_opt("live-dir-us-east-0-restore").await.expect("get").is_none(),
        "no restore Job"
    );
}
