//! TLS on every link of a local deployment (routers and agents as
//! processes, etcd groups with `--client-cert-auth`, certificates from a
//! CA made for the run): the data path works across regions, strangers are
//! refused by etcd and by the routers, forwarding headers count only from a
//! peer router's certificate for its own region, an etcd member with
//! another role's certificate is refused by tern, a rotated certificate
//! is served without a restart, and no key or token reaches a log.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tern_api::pb;
use tern_common::tls::{self, ClientAuth, Role, Tls};
use tern_local::pki::LocalPki;
use tern_local::{Binaries, Layout, LocalDeployment};

const METRIC_UNTRUSTED: &str = "tern_router_untrusted_forward_headers_total ";

/// target/debug, where e2e/test.sh builds tern-router and tern-agent.
fn binaries() -> Binaries {
    let exe = std::env::current_exe().expect("test binary path");
    let dir: PathBuf = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .to_path_buf();
    Binaries::in_dir(&dir).expect("tern-router and tern-agent are built (cargo build -p tern-router -p tern-agent)")
}

fn put(account: &str, key: &str, value: &str) -> tonic::Request<pb::PutRequest> {
    let mut r = tonic::Request::new(pb::PutRequest {
        account: account.into(),
        key: key.into(),
        value: value.as_bytes().to_vec(),
        idempotency_key: String::new(),
    });
    r.set_timeout(Duration::from_secs(5));
    r
}

/// What `addr`'s server answers a client with `config`, which must be a
/// refusal: under TLS 1.3 the server judges the client's certificate after
/// the client has finished its side, so the verdict (an alert) arrives on
/// the first read.
async fn server_refuses(addr: &str, config: Arc<rustls::ClientConfig>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("an IP address");
        let mut s = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut buf = [0u8; 256];
        loop {
            if s.read(&mut buf).await? == 0 {
                return Err::<(), _>(std::io::Error::other("closed without an alert"));
            }
        }
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| panic!("{addr} accepted the client (no refusal within 10 s)"));
    outcome.expect_err("refused").to_string()
}

/// A client that trusts `ca_pem` and shows the certificate in `dir` (a
/// stranger's: tern itself would not load one that does not chain to its
/// CA), or none.
fn client_config(ca_pem: &[u8], dir: Option<&std::path::Path>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.expect("PEM")).expect("a CA");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let mut config = match dir {
        None => builder.with_no_client_auth(),
        Some(dir) => {
            let read = |name: &str| std::fs::read(dir.join(name)).expect("stranger file");
            let chain = CertificateDer::pem_slice_iter(&read(tls::CERT_FILE))
                .collect::<Result<Vec<_>, _>>()
                .expect("PEM");
            let key = PrivateKeyDer::from_pem_slice(&read(tls::KEY_FILE)).expect("PEM key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("a certificate and its key")
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// The serial of the certificate a fresh handshake with `addr` is shown.
async fn served_serial(client: &Tls, addr: &str) -> String {
    let stream = client.connect(addr, "127.0.0.1").await.expect("handshake");
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("the server shows a certificate")
        .clone();
    tls::summarize(&leaf).expect("readable").serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_link_is_tls_strangers_are_refused_and_certificates_rotate_live() {
    tern_e2e::init_logs();
    let d = LocalDeployment::start_with(
        Layout {
            regions: vec![("us-east".into(), 1), ("eu-west".into(), 1)],
            directory_members: 1,
            rtt_ms: BTreeMap::new(),
            agents: true,
            otlp_endpoint: None,
            tls: true,
        },
        Some(binaries()),
    )
    .await
    .expect("a TLS deployment starts (agents hold their leases over TLS to etcd)");
    let pki = d.pki.as_ref().expect("TLS deployment has a CA");
    let us = d.region("us-east").router.as_ref().expect("router").grpc_addr;
    let group_url = d.region("us-east").group.endpoints()[0].clone();

    // The data path: an account homed in us-east, created and written
    // through eu-west's router (forwarded over mutual TLS), read at home.
    let mut eu_client = d.client("eu-west").await;
    eu_client
        .create_account(pb::CreateAccountRequest {
            account: "acct-tls".into(),
            home_region: "us-east".into(),
            allowed_regions: vec![],
        })
        .await
        .expect("create through eu-west");
    let meta = eu_client
        .put(put("acct-tls", "k", "v1"))
        .await
        .expect("a proxied write over TLS")
        .into_inner()
        .meta
        .expect("meta");
    assert!(meta.forwarded && meta.home_region == "us-east", "{meta:?}");
    let got = d
        .client("us-east")
        .await
        .get(pb::GetRequest {
            account: "acct-tls".into(),
            key: "k".into(),
            read: None,
        })
        .await
        .expect("read at home")
        .into_inner();
    assert_eq!(got.value, b"v1");
    let us_router = d.region("us-east").router.as_ref().expect("router");
    assert_eq!(us_router.metric(METRIC_UNTRUSTED).await, Some(0.0));

    // Strangers are refused, by the router and by etcd alike: no TLS at
    // all, no client certificate, or one from another CA (presented by a
    // client that trusts the servers, so that the refusal is the
    // server's).
    let ca_pem = std::fs::read(pki.dir("client").join(tls::CA_FILE)).expect("CA");
    let stranger_pki = LocalPki::new(&d.dir.path().join("stranger")).expect("another CA");
    let stranger_dir = stranger_pki
        .issue("client", &tls::identity(Role::Router, "eu-west"))
        .expect("issue");
    let group_addr = group_url.trim_start_matches("https://").to_string();
    for (server, addr) in [("router", us.to_string()), ("etcd", group_addr.clone())] {
        for (who, config) in [
            ("no certificate", client_config(&ca_pem, None)),
            ("another CA's", client_config(&ca_pem, Some(&stranger_dir))),
        ] {
            let e = server_refuses(&addr, config).await;
            assert!(e.contains("alert"), "{server} must refuse a client with {who}: {e}");
        }
    }
    // The connection breaks before any call is served: a transport error,
    // whose code depends on when it broke.
    tern_api::connect(us)
        .await
        .put(put("acct-tls", "k", "plain"))
        .await
        .expect_err("plain text is refused");
    let plain_url = group_url.replace("https://", "http://");
    let plain = async {
        let mut c = etcd_client::Client::connect([plain_url.as_str()], None).await?;
        c.get("k", None).await
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(10), plain)
            .await
            .map(|r| r.is_err())
            .unwrap_or(true),
        "etcd must not answer plain text"
    );
    d.group_client("us-east")
        .await
        .get("k", None)
        .await
        .expect("etcd answers tern's CA");
    // And tern refuses a server that is not what it dialled: an etcd
    // member whose certificate, from the same CA and with the right host,
    // is a router's.
    let impostor = tern_local::etcd_cluster::EtcdCluster::start_tls(
        d.dir.path(),
        "impostor",
        1,
        tern_local::etcd_cluster::Tuning::default(),
        tern_local::etcd_cluster::EtcdTls {
            server_dir: pki
                .issue("impostor", &tls::identity(Role::Router, "us-east"))
                .expect("issue"),
            client: d.client_tls.clone().expect("TLS deployment"),
        },
    )
    .expect("an etcd member with a router's certificate starts");
    let refused = async {
        let mut c = tern_common::etcd::client(
            &impostor.endpoints(),
            d.client_tls.as_ref(),
            Some(Duration::from_secs(5)),
        )
        .await?;
        c.get("k", None).await
    };
    let e = tokio::time::timeout(Duration::from_secs(20), refused)
        .await
        .expect("refused within 20 s")
        .expect_err("a router's certificate is no etcd member's");
    assert!(format!("{e:?}").contains("spiffe://tern/etcd/<scope>"), "{e:?}");
    drop(impostor);

    // Forwarding headers without the peer token: from a client
    // certificate they are ignored and counted; from eu-west's router
    // certificate they are trusted (and claiming another region is not).
    let as_identity = |name: &str| Tls::load(&pki.dir(name), ClientAuth::Required).expect("loads");
    let forwarded_put = |origin: &str| {
        let mut r = put("acct-tls", "k", "fwd");
        let md = r.metadata_mut();
        md.insert("tern-forwarded", "1".parse().expect("ascii"));
        md.insert("tern-origin-region", origin.parse().expect("ascii"));
        r
    };
    let send = async |who: &Tls, origin: &str| {
        tern_api::RouterClient::new(who.channel(&us.to_string()).expect("channel"))
            .put(forwarded_put(origin))
            .await
            .expect("the write itself is served")
    };
    send(&as_identity("router-eu-west"), "eu-west").await;
    assert_eq!(us_router.metric(METRIC_UNTRUSTED).await, Some(0.0));
    send(&as_identity("client"), "eu-west").await;
    assert_eq!(us_router.metric(METRIC_UNTRUSTED).await, Some(1.0));
    send(&as_identity("router-eu-west"), "ap-south").await;
    assert_eq!(us_router.metric(METRIC_UNTRUSTED).await, Some(2.0));

    // Rotation: a new certificate written over the router's files is
    // served to new connections within seconds, with no restart; the
    // connection opened before keeps working.
    let harness = d.client_tls.clone().expect("harness certificate");
    let before = served_serial(&harness, &us.to_string()).await;
    pki.issue("router-us-east", &tls::identity(Role::Router, "us-east"))
        .expect("reissue");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let after = loop {
        let now = served_serial(&harness, &us.to_string()).await;
        if now != before {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotated certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let written = std::fs::read(pki.dir("router-us-east").join(tls::CERT_FILE)).expect("read");
    assert_eq!(tls::summarize_pem(&written).expect("readable").serial, after);
    eu_client
        .put(put("acct-tls", "k", "v2"))
        .await
        .expect("the old connection still works");
    d.client("eu-west")
        .await
        .put(put("acct-tls", "k", "v3"))
        .await
        .expect("a new client connection works after the rotation");

    // The client side rotates too: a certificate written over eu-west's
    // router's files is the one it presents at its next handshake with
    // us-east, with no restart. To tell the two apart at us-east, the new
    // one names another region's router: once the link has been cut and
    // dialled again, eu-west's forwarded writes no longer count as
    // eu-west's.
    let untrusted = us_router.metric(METRIC_UNTRUSTED).await.expect("metric");
    pki.issue("router-eu-west", &tls::identity(Role::Router, "ap-south"))
        .expect("reissue");
    let eu_log = d.dir.path().join("eu-west-router.log");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&eu_log)
        .expect("eu-west's router log")
        .contains("TLS certificate rotated")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "eu-west's router never loaded its new certificate"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let link = &d.links[&("eu-west".to_string(), "us-east".to_string())];
    d.toxiproxy.set_enabled(link, false).await.expect("cut");
    d.toxiproxy.set_enabled(link, true).await.expect("restored");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        // The first write after the cut may meet the broken connection.
        if eu_client.put(put("acct-tls", "k", "v4")).await.is_ok()
            && us_router.metric(METRIC_UNTRUSTED).await > Some(untrusted)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "eu-west's router never presented its new certificate"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // With TLS the routers run without a peer token: they trusted each
    // other's forwarded writes above by certificate alone.
    assert!(
        !d.region("us-east")
            .router_args
            .iter()
            .any(|a| a.starts_with("--peer-token")),
        "{:?}",
        d.region("us-east").router_args
    );
    // Nothing secret in any log of the run: not a line of any private key.
    let mut secrets = Vec::new();
    for name in [
        "etcd",
        "client",
        "router-us-east",
        "router-eu-west",
        "agent-us-east",
        "agent-eu-west",
    ] {
        let key = std::fs::read_to_string(pki.dir(name).join(tls::KEY_FILE)).expect("key");
        secrets.extend(
            key.lines()
                .filter(|l| !l.starts_with("-----") && l.len() > 20)
                .map(str::to_string),
        );
    }
    let mut logs = 0;
    let mut served = false;
    for entry in std::fs::read_dir(d.dir.path()).expect("run dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).expect("log");
            served |= text.contains("tern-router serving");
            for s in &secrets {
                assert!(!text.contains(s.as_str()), "{} holds a secret", path.display());
            }
            logs += 1;
        }
    }
    assert!(logs >= 5 && served, "the scan read the run's logs ({logs} files)");
    let router_log = std::fs::read_to_string(d.dir.path().join("us-east-router.log")).expect("router log");
    assert!(router_log.contains("TLS certificate rotated"), "{router_log}");
}
