//! Traces of cross-region writes, received over the real OTLP protocol: a
//! proxied write is one trace across both routers, and a client's own trace
//! context is continued.

use std::collections::BTreeMap;
use std::time::Duration;

use tern_api::pb;
use tern_common::tls::{ClientAuth, Role, Tls, identity};
use tern_local::otlp::OtlpReceiver;
use tern_local::{Layout, LocalDeployment};

const RTT_MS: u64 = 80;

/// us-east and eu-west, exporting to `otlp`, with `acct-1` homed in us-east.
async fn start(agents: bool, otlp: String) -> LocalDeployment {
    start_with(agents, otlp, false).await
}

/// [`start`], with TLS on every link when `tls`.
async fn start_with(agents: bool, otlp: String, tls: bool) -> LocalDeployment {
    let d = LocalDeployment::start(Layout {
        regions: vec![("us-east".into(), 1), ("eu-west".into(), 1)],
        directory_members: 1,
        rtt_ms: BTreeMap::from([(("us-east".into(), "eu-west".into()), RTT_MS)]),
        agents,
        otlp_endpoint: Some(otlp),
        tls,
    })
    .await
    .expect("deployment");
    d.client("us-east")
        .await
        .create_account(pb::CreateAccountRequest {
            account: "acct-1".into(),
            home_region: "us-east".into(),
            allowed_regions: vec![],
        })
        .await
        .expect("account");
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_write_is_one_trace_across_both_regions() {
    tern_e2e::init_logs();
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let mut d = start(false, receiver.endpoint()).await;
    let mut eu = d.client("eu-west").await;
    let put = |key: &str| pb::PutRequest {
        account: "acct-1".into(),
        key: key.into(),
        value: b"v".to_vec(),
        idempotency_key: String::new(),
    };
    eu.put(put("warm")).await.expect("warm the channel");
    let resp = eu.put(put("traced")).await.expect("proxied put").into_inner();
    assert!(resp.meta.expect("meta").forwarded);

    // A client that sends its own traceparent gets its trace continued.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(put("client-traced"));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{client_trace}-00f067aa0ba902b7-01").parse().expect("ascii"),
    );
    eu.put(request).await.expect("put with traceparent");

    // Stopping the routers flushes their exporters.
    for r in ["us-east", "eu-west"] {
        if let Some(router) = d.region_mut(r).router.take() {
            router.stop().await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = receiver.spans();

    // The trace of the "traced" write: find its home-side request span.
    let home_request = spans
        .iter()
        .find(|s| {
            s.name == "router.request"
                && s.instance == "us-east-router"
                && s.attribute("tern.operation") == Some("put")
                && s.attribute("tern.origin_region") == Some("eu-west")
        })
        .expect("a request span in the home region");
    let trace: Vec<_> = spans.iter().filter(|s| s.trace_id == home_request.trace_id).collect();
    let names: Vec<(&str, &str)> = trace.iter().map(|s| (s.name.as_str(), s.instance.as_str())).collect();
    for expected in [
        ("router.request", "eu-west-router"),
        ("router.forward", "eu-west-router"),
        ("router.request", "us-east-router"),
        ("store.txn", "us-east-router"),
    ] {
        assert!(names.contains(&expected), "missing {expected:?} in {names:?}");
    }
    // One tree: exactly one root, every other span's parent is in the trace.
    let roots: Vec<_> = trace.iter().filter(|s| s.parent_span_id.is_empty()).collect();
    assert_eq!(roots.len(), 1, "{names:?}");
    for s in &trace {
        if !s.parent_span_id.is_empty() {
            assert!(
                trace.iter().any(|p| p.span_id == s.parent_span_id),
                "{} has no parent in the trace",
                s.name
            );
        }
    }
    let forward = trace.iter().find(|s| s.name == "router.forward").expect("forward span");
    assert!(
        forward.duration_ms() >= RTT_MS as f64,
        "forward took {} ms, less than the {RTT_MS} ms round trip",
        forward.duration_ms()
    );
    assert_eq!(forward.attribute("tern.target_region"), Some("us-east"));
    let txn = trace.iter().find(|s| s.name == "store.txn").expect("txn span");
    assert_eq!(txn.attribute("tern.guard"), Some("held"));
    assert!(
        txn.attribute("tern.revision")
            .is_some_and(|r| r.parse::<i64>().is_ok_and(|r| r > 0))
    );
    assert_eq!(home_request.attribute("tern.account"), Some("acct-1"));
    assert_eq!(home_request.attribute("tern.epoch"), Some("1"));

    // The client's trace id was continued on both sides.
    let continued: Vec<_> = spans
        .iter()
        .filter(|s| hex(&s.trace_id) == client_trace)
        .map(|s| s.instance.as_str())
        .collect();
    assert!(
        continued.contains(&"eu-west-router") && continued.contains(&"us-east-router"),
        "{continued:?}"
    );
}

/// An https:// endpoint: the routers export over mutual TLS with their own
/// certificates (the collector sees each router's identity), and check the
/// collector's against the deployment's CA. The collector's certificate is
/// made once the deployment's CA exists, on a port handed out before; the
/// exports that find it not yet serving are retried by the next batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_export_to_an_https_collector_over_mutual_tls() {
    tern_e2e::init_logs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("https://127.0.0.1:{}", listener.local_addr().expect("addr").port());
    let mut d = start_with(false, endpoint, true).await;
    let pki = d.pki.as_ref().expect("a deployment with TLS has a CA");
    let dir = pki
        .issue("collector", &identity(Role::Client, "collector"))
        .expect("collector certificate");
    let tls = Tls::load(&dir, ClientAuth::Required).expect("collector TLS");
    let receiver = OtlpReceiver::start_tls(listener, tls).expect("receiver");
    assert!(receiver.endpoint().starts_with("https://"));

    let mut eu = d.client("eu-west").await;
    let resp = eu
        .put(pb::PutRequest {
            account: "acct-1".into(),
            key: "traced".into(),
            value: b"v".to_vec(),
            idempotency_key: String::new(),
        })
        .await
        .expect("proxied put")
        .into_inner();
    assert!(resp.meta.expect("meta").forwarded);
    for r in ["us-east", "eu-west"] {
        if let Some(router) = d.region_mut(r).router.take() {
            router.stop().await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = receiver.spans();
    for (region, instance) in [("us-east", "us-east-router"), ("eu-west", "eu-west-router")] {
        let theirs: Vec<_> = spans.iter().filter(|s| s.instance == instance).collect();
        assert!(
            theirs.iter().any(|s| s.name == "router.request"),
            "no request span from {instance} over TLS: {:?}",
            spans.iter().map(|s| (&s.name, &s.instance)).collect::<Vec<_>>()
        );
        let router = identity(Role::Router, region);
        assert!(
            theirs.iter().all(|s| s.exporter_identities.contains(&router)),
            "{instance}'s spans did not come with its certificate ({router})"
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The same kind of write, found through Jaeger's query API by trace id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_write_is_found_in_jaeger() {
    use tern_local::jaeger::Jaeger;
    if !Jaeger::available() {
        eprintln!("SKIPPED: the Jaeger binary is not built; run e2e/build-tools.sh jaeger (.ci/run does)");
        return;
    }
    tern_e2e::init_logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let jaeger = Jaeger::start(dir.path()).expect("jaeger starts");
    let mut d = start(false, jaeger.otlp_endpoint.clone()).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let mut request = tonic::Request::new(pb::PutRequest {
        account: "acct-1".into(),
        key: "k".into(),
        value: b"v".to_vec(),
        idempotency_key: String::new(),
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-b7ad6b7169203331-01").parse().expect("ascii"),
    );
    let mut eu = d.client("eu-west").await;
    eu.put(request).await.expect("proxied put");
    for r in ["us-east", "eu-west"] {
        if let Some(router) = d.region_mut(r).router.take() {
            router.stop().await;
        }
    }
    let mut found = None;
    for _ in 0..50 {
        if let Some(body) = jaeger.trace(trace_id).await
            && body.contains("router.forward")
            && body.contains("store.txn")
        {
            found = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let body = found.unwrap_or_else(|| panic!("Jaeger does not have trace {trace_id}; its log:\n{}", jaeger.log()));
    assert!(
        body.contains("us-east-router") && body.contains("eu-west-router"),
        "both routers in the trace: {body}"
    );
}

/// Agents trace their heartbeats and every source revision they mirror, each
/// agent as its own service instance, with the guard's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_trace_heartbeats_and_mirrored_revisions() {
    tern_e2e::init_logs();
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let d = start(true, receiver.endpoint()).await;
    let mut us = d.client("us-east").await;
    // The first sync of a mirror copies a snapshot; wait until eu-west
    // streams us-east's revisions one by one (it mirrors heartbeats).
    let streaming = |spans: &[tern_local::otlp::ReceivedSpan]| {
        spans
            .iter()
            .any(|s| s.name == "agent.mirror" && s.instance == "eu-west-agent-a")
    };
    for _ in 0..100 {
        if streaming(&receiver.spans()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let revision = us
        .put(pb::PutRequest {
            account: "acct-1".into(),
            key: "k".into(),
            value: b"v".to_vec(),
            idempotency_key: String::new(),
        })
        .await
        .expect("put")
        .into_inner()
        .meta
        .expect("meta")
        .revision;

    // Spans are exported every second; wait for eu-west's mirror of the put.
    let wanted = revision.to_string();
    let mut mirrored = None;
    for _ in 0..100 {
        mirrored = receiver.spans().into_iter().find(|s| {
            s.name == "agent.mirror"
                && s.attribute("tern.source_region") == Some("us-east")
                && s.attribute("tern.source_revision") == Some(wanted.as_str())
        });
        if mirrored.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mirrored = mirrored.unwrap_or_else(|| panic!("no agent.mirror span for us-east revision {revision}"));
    assert_eq!(mirrored.instance, "eu-west-agent-a");
    assert_eq!(mirrored.attribute("tern.region"), Some("eu-west"));
    assert_eq!(mirrored.attribute("tern.guard"), Some("held"));
    assert!(
        mirrored
            .attribute("tern.revision")
            .is_some_and(|r| r.parse::<i64>().is_ok_and(|r| r > 0)),
        "the local revision of the mirror transaction is recorded"
    );

    let spans = receiver.spans();
    for agent in ["us-east-agent-a", "eu-west-agent-a"] {
        let beat = spans
            .iter()
            .find(|s| s.name == "agent.heartbeat" && s.instance == agent)
            .unwrap_or_else(|| panic!("no heartbeat span from {agent}"));
        assert_eq!(beat.attribute("tern.guard"), Some("held"));
        assert!(beat.attribute("tern.heartbeat.seq").is_some());
    }
}
