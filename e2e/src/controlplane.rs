//! A real Kubernetes API server for tests: etcd plus kube-apiserver with
//! certificates, RBAC and a kubeconfig, started the way controller-runtime's
//! envtest does it. There is no controller-manager, scheduler or kubelet: tests
//! assert on API objects and play the kubelet by patching status subresources.
//! The node e2e (`crate::node`) starts it with [`ApiOptions::for_nodes`]:
//! reachable from the nodes' network namespaces, with service accounts and
//! the `kubernetes` Service, so that real pods can use it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::core::v1::Namespace;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use tempfile::TempDir;

use crate::certs::{Authority, CertPair, service_account_key};
use crate::etcd::EtcdServer;
use crate::process::ChildGuard;
use crate::{HarnessError, Result, assets};

/// One test "cluster": an API server, its etcd, and credentials for it.
///
/// Dropping it stops the API server first, then etcd, and removes its
/// directory. Start it from the test's own thread (not a spawned task): the
/// children are tied to the thread that starts them.
pub struct ControlPlane {
    name: String,
    pub url: String,
    /// The serving CA's certificate (the nodes' kubeconfigs trust it).
    pub serving_ca_pem: String,
    cert_dir: PathBuf,
    client_ca: Authority,
    admin_kubeconfig: PathBuf,
    apiserver: ChildGuard,
    etcd: EtcdServer,
    dir: TempDir,
}

/// How a test API server is reached and what it runs.
#[derive(Clone, Debug, Default)]
pub struct ApiOptions {
    /// Address it listens on and advertises; loopback when unset.
    pub bind: Option<std::net::Ipv4Addr>,
    /// Service IP range; 10.0.0.0/24 when unset.
    pub service_cidr: Option<String>,
    /// Service-account admission and the `kubernetes` Service's endpoint:
    /// what pods on real nodes need. Off for the API-only tests, which
    /// play the controllers themselves.
    pub for_pods: bool,
}

impl ApiOptions {
    /// An API server for real nodes: listening on `bind`, with its own
    /// service range.
    pub fn for_nodes(bind: std::net::Ipv4Addr, service_cidr: &str) -> Self {
        Self {
            bind: Some(bind),
            service_cidr: Some(service_cidr.to_string()),
            for_pods: true,
        }
    }
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver, waits until the server is ready and the
    /// `default` namespace exists.
    pub async fn start(name: &str) -> Result<Self> {
        Self::start_with(name, &ApiOptions::default()).await
    }

    /// As [`ControlPlane::start`], with options.
    pub async fn start_with(name: &str, options: &ApiOptions) -> Result<Self> {
        // As `assets::retry_port_clash`, for this async start.
        let mut attempt = 1;
        loop {
            match Self::start_once(name, options).await {
                Err(e) if attempt < 3 && tern_local::assets::StartFailure::exited_early(&e) => {
                    tracing::warn!(error = %e, attempt, "a port was taken before the server bound it; retrying");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn start_once(name: &str, options: &ApiOptions) -> Result<Self> {
        let apiserver_bin = assets::binary("kube-apiserver")?;
        assets::binary("kubectl")?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("tern-cp-{name}-"))
            .tempdir()
            .map_err(|source| HarnessError::Io {
                path: std::env::temp_dir().display().to_string(),
                source,
            })?;
        let etcd = EtcdServer::start(dir.path(), &format!("{name}-apiserver-etcd"))?;

        let serving_ca = Authority::new(&format!("{name}-serving-ca"))?;
        let client_ca = Authority::new(&format!("{name}-client-ca"))?;
        let bind = options.bind.unwrap_or(std::net::Ipv4Addr::LOCALHOST);
        let service_cidr = options.service_cidr.clone().unwrap_or_else(|| "10.0.0.0/24".into());
        // Pods reach the server through the first address of the service
        // range (the `kubernetes` Service).
        let service_ip = first_service_ip(&service_cidr);
        let serving = serving_ca.serving_cert_for(&[bind.to_string(), service_ip])?;
        let cert_dir = dir.path().join("certs");
        write(&cert_dir.join("apiserver.crt"), &serving.cert_pem)?;
        write(&cert_dir.join("apiserver.key"), &serving.key_pem)?;
        write(&cert_dir.join("client-ca.crt"), &client_ca.cert_pem())?;
        let (sa_private, sa_public) = service_account_key()?;
        let sa_key = cert_dir.join("sa.key");
        let sa_pub = cert_dir.join("sa.pub");
        write(&sa_key, &sa_private)?;
        write(&sa_pub, &sa_public)?;

        // Every write request is audited (who, what verb, which object), so
        // tests can count the writes a component makes; reads are not
        // logged, which keeps the log small.
        let audit_policy = dir.path().join("audit-policy.yaml");
        write(&audit_policy, AUDIT_POLICY)?;
        let audit_log = dir.path().join("audit.log");

        let port = assets::free_port();
        let url = format!("https://{bind}:{port}");
        let mut cmd = Command::new(apiserver_bin);
        cmd.arg(format!("--etcd-servers={}", etcd.client_url))
            .arg(format!("--cert-dir={}", cert_dir.display()))
            .arg(format!("--tls-cert-file={}", cert_dir.join("apiserver.crt").display()))
            .arg(format!(
                "--tls-private-key-file={}",
                cert_dir.join("apiserver.key").display()
            ))
            .arg(format!("--client-ca-file={}", cert_dir.join("client-ca.crt").display()))
            .arg(format!("--secure-port={port}"))
            .arg(format!("--bind-address={bind}"))
            .arg(format!("--advertise-address={bind}"))
            .arg(format!("--service-cluster-ip-range={service_cidr}"))
            .arg("--allow-privileged=true")
            .arg("--authorization-mode=RBAC")
            .arg(format!("--service-account-issuer={url}/"))
            .arg(format!("--service-account-key-file={}", sa_pub.display()))
            .arg(format!("--service-account-signing-key-file={}", sa_key.display()))
            // Logs, exec and port-forward reach a kubelet at its node IP
            // (the node names do not resolve on the host).
            .arg("--kubelet-preferred-address-types=InternalIP");
        if options.for_pods {
            // Pods get service-account tokens; the `kubernetes` Service
            // points at this server (the lease reconciler's default).
            cmd.arg("--enable-admission-plugins=ServiceAccount");
        } else {
            // Without a controller-manager no token controller creates the
            // `default` service accounts, and nothing runs behind the
            // `kubernetes` Service.
            cmd.arg("--disable-admission-plugins=ServiceAccount")
                .arg("--endpoint-reconciler-type=none");
        }
        cmd.arg(format!("--audit-policy-file={}", audit_policy.display()))
            .arg(format!("--audit-log-path={}", audit_log.display()))
            .arg("--audit-log-format=json")
            // Written as they happen, not in batches, so a test sees every
            // request that was answered before it reads the log.
            .arg("--audit-log-mode=blocking")
            .arg("-v=1");
        let apiserver = ChildGuard::spawn(
            &format!("kube-apiserver {name}"),
            cmd,
            &dir.path().join("kube-apiserver.log"),
        )?;

        let admin = client_ca.client_cert("admin", &["system:masters"])?;
        let admin_kubeconfig = dir.path().join("admin.kubeconfig");
        write(
            &admin_kubeconfig,
            &kubeconfig_yaml(name, &url, &serving_ca.cert_pem(), "admin", &admin),
        )?;
        let mut cp = Self {
            name: name.to_string(),
            url,
            client_ca,
            serving_ca_pem: serving_ca.cert_pem(),
            cert_dir,
            admin_kubeconfig,
            apiserver,
            etcd,
            dir,
        };
        cp.wait_ready(Duration::from_secs(90)).await?;
        Ok(cp)
    }

    async fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let client = self.client().await?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        loop {
            self.apiserver.check_running()?;
            let ready = match client
                .request_text(http::Request::get("/readyz").body(Vec::new()).expect("static request"))
                .await
            {
                Ok(body) if body.trim() == "ok" => {
                    matches!(namespaces.get_opt("default").await, Ok(Some(_)))
                }
                _ => false,
            };
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::NotReady {
                    what: format!("kube-apiserver {}", self.name),
                    secs: limit.as_secs(),
                    log: self.apiserver.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The directory of the server's keys: `sa.key` (the controller-manager
    /// signs with it) and `client-ca.crt`.
    pub fn cert_dir(&self) -> &Path {
        &self.cert_dir
    }

    /// The test's directory for this cluster (removed when it drops).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The admin kubeconfig (user `admin`, group `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// A client with the admin's credentials.
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.admin_kubeconfig).await
    }

    /// Writes a kubeconfig for `user` in `groups`, authenticated by a client
    /// certificate from this server's client CA, and returns its path. A
    /// service account is `system:serviceaccount:<namespace>:<name>`: RBAC
    /// bindings to the service account then apply to it.
    pub fn user_kubeconfig(&self, user: &str, groups: &[&str]) -> Result<PathBuf> {
        let pair = self.client_ca.client_cert(user, groups)?;
        let file = user.replace([':', '/'], "_");
        let path = self.dir.path().join(format!("{file}.kubeconfig"));
        write(
            &path,
            &kubeconfig_yaml(&self.name, &self.url, &self.serving_ca_pem, user, &pair),
        )?;
        Ok(path)
    }

    /// Runs the pinned kubectl against this server as admin; returns stdout, or
    /// an error with stderr when kubectl fails.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_as(&self.admin_kubeconfig, args)
    }

    /// Runs kubectl with another kubeconfig.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Result<String> {
        run_kubectl(&assets::binary("kubectl")?, kubeconfig, args)
    }

    /// Applies `crds/manifests/` and waits until every CRD is Established.
    pub fn install_crds(&self) -> Result<()> {
        self.kubectl(&["apply", "--server-side", "-f", "crds/manifests/"])?;
        self.kubectl(&["wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"])?;
        Ok(())
    }

    /// Every write request (create, update, patch, delete) the API server has
    /// answered so far, oldest first.
    pub fn audited_writes(&self) -> Result<Vec<AuditedWrite>> {
        let path = self.dir.path().join("audit.log");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(HarnessError::Io {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|e| {
                let field = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
                let object = &e["objectRef"];
                AuditedWrite {
                    user: field(&e["user"]["username"]),
                    verb: field(&e["verb"]),
                    resource: field(&object["resource"]),
                    subresource: field(&object["subresource"]),
                    namespace: field(&object["namespace"]),
                    name: field(&object["name"]),
                    code: e["responseStatus"]["code"].as_i64().unwrap_or_default(),
                }
            })
            .collect())
    }

    /// The API server's log so far, for diagnosing a failed test.
    pub fn apiserver_log(&self) -> String {
        self.apiserver.log_tail()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // API server first: it would otherwise log etcd errors while stopping.
        self.apiserver.stop(Duration::from_secs(5));
        self.etcd.stop();
    }
}

/// Audit policy of the test API servers: metadata of every write request
/// once answered, nothing else.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    verbs: [create, update, patch, delete, deletecollection]
  - level: None
";

/// One write request from the API server's audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditedWrite {
    /// Who sent it (`system:serviceaccount:tern-system:tern-operator`).
    pub user: String,
    /// create, update, patch, delete or deletecollection.
    pub verb: String,
    /// Plural resource (`geoclusters`) and subresource (`status`), if any.
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// HTTP status of the answer.
    pub code: i64,
}

impl std::fmt::Display for AuditedWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sub = if self.subresource.is_empty() {
            String::new()
        } else {
            format!("/{}", self.subresource)
        };
        write!(
            f,
            "{} {} {}{sub} {}/{} ({})",
            self.user, self.verb, self.resource, self.namespace, self.name, self.code
        )
    }
}

/// Runs `kubectl` with `kubeconfig` from the repository root; returns
/// stdout, or an error with stderr when kubectl fails.
pub fn run_kubectl(kubectl: &Path, kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new(kubectl)
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .current_dir(crate::repo_root())
        .output()
        .map_err(|source| HarnessError::Spawn {
            what: "kubectl".into(),
            source,
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(HarnessError::Kubectl {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// A kube client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let text = std::fs::read_to_string(path).map_err(|source| HarnessError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let kubeconfig = Kubeconfig::from_yaml(&text).map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
    Ok(Client::try_from(config)?)
}

fn kubeconfig_yaml(cluster: &str, url: &str, ca_pem: &str, user: &str, pair: &CertPair) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster}\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\ncontexts:\n- name: {cluster}\n  context:\n    cluster: {cluster}\n    user: {user}\ncurrent-context: {cluster}\n",
        ca = b64(ca_pem),
        cert = b64(&pair.cert_pem),
        key = b64(&pair.key_pem),
    )
}

/// The first host address of an IPv4 CIDR ("10.96.1.0/24" → "10.96.1.1").
fn first_service_ip(cidr: &str) -> String {
    let base = cidr.split('/').next().unwrap_or(cidr);
    match base.parse::<std::net::Ipv4Addr>() {
        Ok(ip) => std::net::Ipv4Addr::from(u32::from(ip) + 1).to_string(),
        Err(_) => base.to_string(),
    }
}

pub(crate) fn write(path: &Path, contents: &str) -> Result<()> {
    let io = |source| HarnessError::Io {
        path: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(path, contents).map_err(io)
}
