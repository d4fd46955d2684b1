//! TLS on tern's links: router↔router, router and agent↔etcd, and clients
//! to a router, all with mutual authentication against one CA.
//!
//! A process reads its material from a directory laid out as a
//! cert-manager (or `kubernetes.io/tls`) Secret is mounted: `ca.crt`,
//! `tls.crt`, `tls.key`. The files are read again every
//! [`RELOAD_EVERY`]; a changed, consistent set replaces the old one for
//! every handshake after it, so certificates rotate without a restart
//! (established connections keep the session they have). A set that does
//! not load (a Secret caught half-updated, a key that does not match its
//! certificate) is logged and the old one stays in use.
//!
//! Identity: a tern certificate names its holder with a SPIFFE URI
//! (`spiffe://tern/<role>/<region>`, see [`identity`]); the router trusts
//! forwarding headers only from a peer whose verified client certificate
//! names a router of the origin region it claims.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::CommonError;

/// The files of a TLS directory: cert-manager's Secret keys.
pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// How often the files are read again for a rotated certificate. A
/// kubelet refreshes a mounted Secret within about a minute; this adds
/// little to that.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// How long a client has to finish its TLS handshake before the server
/// drops the connection (a slow or silent client must not hold a slot).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Handshakes under way at once; a connection beyond them is closed at
/// once, so that clients without a certificate cannot hold a server's
/// descriptors.
const HANDSHAKES_MAX: usize = 256;

/// The SPIFFE trust domain of tern's certificates.
pub const TRUST_DOMAIN: &str = "tern";

/// What a certificate's holder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Router,
    Agent,
    Operator,
    Etcd,
    /// A person or program using the `tern` command.
    Client,
}

impl Role {
    /// The role's name in identities and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Router => "router",
            Role::Agent => "agent",
            Role::Operator => "operator",
            Role::Etcd => "etcd",
            Role::Client => "client",
        }
    }
}

/// The SPIFFE URI a certificate of `role` in `scope` (a region, or
/// `global`) carries as a subject alternative name.
pub fn identity(role: Role, scope: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/{}/{scope}", role.as_str())
}

/// What a server's certificate must name beyond the host it is dialled
/// by, for the links where the name alone is not enough.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Exactly this identity: another region's router, about to be handed
    /// its clients' writes, must be *that* region's.
    Identity(String),
    /// Some identity of this role: an etcd member must be an etcd member
    /// (a router's or a client's leaf from the same CA, given a member's
    /// DNS name, must not pass as one and be handed every write).
    Role(Role),
}

impl Expect {
    fn met_by(&self, identities: &[String]) -> bool {
        match self {
            Expect::Identity(want) => identities.iter().any(|i| i == want),
            Expect::Role(role) => {
                let prefix = format!("spiffe://{TRUST_DOMAIN}/{}/", role.as_str());
                identities
                    .iter()
                    .any(|i| i.strip_prefix(&prefix).is_some_and(|scope| !scope.is_empty()))
            }
        }
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Identity(i) => f.write_str(i),
            Expect::Role(role) => write!(f, "spiffe://{TRUST_DOMAIN}/{}/<scope>", role.as_str()),
        }
    }
}

/// Whether the server asks every client for a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client without a certificate from the CA is refused in the
    /// handshake.
    Required,
    /// A client may connect without one (it then has no identity; the
    /// server authenticates it some other way or not at all).
    Optional,
}

/// What a loaded certificate says, for logs and status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertSummary {
    /// The serial number in hex.
    pub serial: String,
    /// Unix seconds after which the certificate is no longer valid.
    pub not_after: i64,
    /// Its SPIFFE (URI) identities.
    pub identities: Vec<String>,
}

/// One consistent set of files, made into configurations.
struct Material {
    files: [Vec<u8>; 3],
    roots: Arc<RootCertStore>,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    summary: CertSummary,
}

struct Inner {
    dir: PathBuf,
    client_auth: ClientAuth,
    current: RwLock<Arc<Material>>,
}

/// A process's TLS material, reloaded from its directory. Cheap to clone;
/// the reload task stops when the last clone is dropped.
#[derive(Clone)]
pub struct Tls(Arc<Inner>);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Paths and the public certificate only; never key material.
        f.debug_struct("Tls")
            .field("dir", &self.0.dir)
            .field("client_auth", &self.0.client_auth)
            .field("serial", &self.summary().serial)
            .finish()
    }
}

fn tls_error(path: &Path, what: impl std::fmt::Display) -> CommonError {
    CommonError::Tls(format!("{}: {what}", path.display()))
}

fn read_files(dir: &Path) -> Result<[Vec<u8>; 3], CommonError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|e| tls_error(&path, e))
    };
    Ok([read(CA_FILE)?, read(CERT_FILE)?, read(KEY_FILE)?])
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a certificate (DER) says: serial, expiry, URI identities.
pub fn summarize(der: &[u8]) -> Result<CertSummary, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let identities = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("unreadable subject alternative names: {e}")),
    };
    Ok(CertSummary {
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_after: cert.validity().not_after.timestamp(),
        identities,
    })
}

/// [`summarize`] of the first certificate of a PEM file.
pub fn summarize_pem(pem: &[u8]) -> Result<CertSummary, String> {
    let first = CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or("no certificate in it")?
        .map_err(|e| format!("not PEM: {e}"))?;
    summarize(&first)
}

fn build(dir: &Path, files: [Vec<u8>; 3], client_auth: ClientAuth) -> Result<Material, CommonError> {
    let [ca, cert, key] = &files;
    let ca_path = dir.join(CA_FILE);
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        let c = c.map_err(|e| tls_error(&ca_path, format!("not PEM certificates: {e}")))?;
        roots
            .add(c)
            .map_err(|e| tls_error(&ca_path, format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(tls_error(&ca_path, "holds no certificate"));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|e| tls_error(&cert_path, format!("not PEM certificates: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(tls_error(&cert_path, "holds no certificate"));
    };
    let summary = summarize(leaf).map_err(|e| tls_error(&cert_path, e))?;
    let key =
        PrivateKeyDer::from_pem_slice(key).map_err(|e| tls_error(&key_path, format!("not a PEM private key: {e}")))?;
    let roots = Arc::new(roots);
    // Every tern certificate is a client's too (a router dials its peers,
    // an etcd member its peers): one that does not chain to ca.crt, has
    // expired or may not authenticate a client would be refused by every
    // peer, so it is refused here and the previous one stays in use.
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| tls_error(&ca_path, format!("cannot verify certificates with it: {e}")))?
        .verify_client_cert(leaf, &chain[1..], rustls::pki_types::UnixTime::now())
        .map_err(|e| {
            tls_error(
                &cert_path,
                format!("is not a valid client certificate under {}: {e}", ca_path.display()),
            )
        })?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
    let verifier = match client_auth {
        ClientAuth::Required => verifier.build(),
        ClientAuth::Optional => verifier.allow_unauthenticated().build(),
    }
    .map_err(|e| tls_error(&ca_path, format!("cannot verify clients with it: {e}")))?;
    let mismatch = |e: rustls::Error| tls_error(&key_path, format!("does not go with {}: {e}", cert_path.display()));
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(dir, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(mismatch)?;
    // gRPC runs over HTTP/2, which TLS negotiates with ALPN (grpc-go, and
    // so etcd, refuses a connection without it).
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(dir, e))?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain, key)
        .map_err(mismatch)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Material {
        files,
        roots,
        server: Arc::new(server),
        client: Arc::new(client),
        summary,
    })
}

impl Tls {
    /// Loads `dir` (ca.crt, tls.crt, tls.key) and starts reloading it
    /// every [`RELOAD_EVERY`] (inside a Tokio runtime; outside one the
    /// material stays as loaded).
    pub fn load(dir: &Path, client_auth: ClientAuth) -> Result<Self, CommonError> {
        let material = build(dir, read_files(dir)?, client_auth)?;
        let tls = Tls(Arc::new(Inner {
            dir: dir.to_path_buf(),
            client_auth,
            current: RwLock::new(Arc::new(material)),
        }));
        tracing::info!(dir = %dir.display(), serial = %tls.summary().serial, not_after = tls.summary().not_after, "TLS certificate loaded");
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&tls.0);
            handle.spawn(reload_loop(weak));
        }
        Ok(tls)
    }

    /// Material given as PEM text rather than files, e.g. a Secret read
    /// through the Kubernetes API; `source` names it in errors. It is not
    /// reloaded: the caller builds a new one when the source changes.
    pub fn from_pem(
        source: &str,
        ca: &[u8],
        cert: &[u8],
        key: &[u8],
        client_auth: ClientAuth,
    ) -> Result<Self, CommonError> {
        let dir = PathBuf::from(source);
        let material = build(&dir, [ca.to_vec(), cert.to_vec(), key.to_vec()], client_auth)?;
        Ok(Tls(Arc::new(Inner {
            dir,
            client_auth,
            current: RwLock::new(Arc::new(material)),
        })))
    }

    fn current(&self) -> Arc<Material> {
        self.0.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the files again; true when they changed and now serve.
    pub fn reload(&self) -> Result<bool, CommonError> {
        let files = read_files(&self.0.dir)?;
        if files == self.current().files {
            return Ok(false);
        }
        let material = build(&self.0.dir, files, self.0.client_auth)?;
        let summary = material.summary.clone();
        *self.0.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(material);
        tracing::info!(dir = %self.0.dir.display(), serial = %summary.serial, not_after = summary.not_after, "TLS certificate rotated");
        Ok(true)
    }

    /// The certificate now in use.
    pub fn summary(&self) -> CertSummary {
        self.current().summary.clone()
    }

    /// The server side of a handshake, as of now.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current().server.clone()
    }

    /// The client side of a handshake, as of now.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current().client.clone()
    }

    /// Dials `addr` and completes a handshake that checks the server's
    /// certificate against `server_name` (a DNS name or an IP address).
    pub async fn connect(
        &self,
        addr: &str,
        server_name: &str,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        self.connect_to(addr, server_name, None).await
    }

    /// [`Tls::connect`]; with `expect`, the server's certificate must also
    /// name that identity or role (see [`Expect`]).
    async fn connect_to(
        &self,
        addr: &str,
        server_name: &str,
        expect: Option<&Expect>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("`{server_name}`: {e}")))?;
        let config = match expect {
            None => self.client_config(),
            Some(identity) => {
                let material = self.current();
                let inner =
                    rustls::client::WebPkiServerVerifier::builder_with_provider(material.roots.clone(), provider())
                        .build()
                        .map_err(std::io::Error::other)?;
                let mut config = (*material.client).clone();
                config.dangerous().set_certificate_verifier(Arc::new(ExpectIdentity {
                    inner,
                    expect: identity.clone(),
                }));
                Arc::new(config)
            }
        };
        let tcp = TcpStream::connect(addr).await?;
        // Small gRPC frames must not wait for a delayed ACK.
        tcp.set_nodelay(true)?;
        tokio_rustls::TlsConnector::from(config).connect(name, tcp).await
    }

    /// A gRPC channel to a tern router at `url` (http://, https:// or
    /// host:port) over TLS, with the certificate checked for the URL's
    /// host and for a router's identity (a client hands it its writes).
    /// It connects on first use and again after a failure, with the
    /// material current then.
    pub fn channel(&self, url: &str) -> Result<tonic::transport::Channel, CommonError> {
        let (authority, host) = authority_of(url)?;
        self.channel_to(&authority, &host)
    }

    /// [`Tls::channel`] to an etcd member, with each call bounded by
    /// `timeout`: the member's certificate must name an etcd identity
    /// too, as well as the URL's host.
    pub fn channel_to_etcd(
        &self,
        url: &str,
        timeout: Option<Duration>,
    ) -> Result<tonic::transport::Channel, CommonError> {
        let (authority, host) = authority_of(url)?;
        self.dial(&authority, &host, timeout, Some(Expect::Role(Role::Etcd)), true)
    }

    /// A gRPC channel to a tern router that dials `addr` (host:port) and
    /// checks the server's certificate for `server_name` and for a
    /// router's identity.
    pub fn channel_to(&self, addr: &str, server_name: &str) -> Result<tonic::transport::Channel, CommonError> {
        self.dial(addr, server_name, None, Some(Expect::Role(Role::Router)), true)
    }

    /// [`Tls::channel_to`] a server whose certificate must also name
    /// `identity` (see [`identity`]).
    pub fn channel_to_identity(
        &self,
        addr: &str,
        server_name: &str,
        identity: &str,
    ) -> Result<tonic::transport::Channel, CommonError> {
        self.dial(
            addr,
            server_name,
            None,
            Some(Expect::Identity(identity.to_string())),
            true,
        )
    }

    /// [`Tls::channel`] to an OTLP collector, each call bounded by
    /// `timeout`, and without the
    /// keep-alive pings of tern's own links. gRPC servers in Go (the
    /// OpenTelemetry Collector, Jaeger) by default close a connection that
    /// pings more often than every five minutes ("too_many_pings"), and an
    /// export that finds its connection gone simply dials again.
    pub fn channel_to_collector(&self, url: &str, timeout: Duration) -> Result<tonic::transport::Channel, CommonError> {
        let (authority, host) = authority_of(url)?;
        self.dial(&authority, &host, Some(timeout), None, false)
    }

    /// The connect timeout and keep-alives (`keep_alive`) are those of
    /// every tern link (a dead peer is noticed within 15 s); `timeout`
    /// bounds each call.
    fn dial(
        &self,
        addr: &str,
        server_name: &str,
        timeout: Option<Duration>,
        expect: Option<Expect>,
        keep_alive: bool,
    ) -> Result<tonic::transport::Channel, CommonError> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| CommonError::Tls(format!("`{addr}` is not a host:port: {e}")))?
            .connect_timeout(Duration::from_secs(2));
        if keep_alive {
            endpoint = endpoint
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true);
        }
        if let Some(t) = timeout {
            endpoint = endpoint.timeout(t);
        }
        let tls = self.clone();
        let addr = addr.to_string();
        let name = server_name.to_string();
        let connector = tower::service_fn(move |_: http::Uri| {
            let (tls, addr, name, expect) = (tls.clone(), addr.clone(), name.clone(), expect.clone());
            async move {
                tls.connect_to(&addr, &name, expect.as_ref())
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        });
        Ok(endpoint.connect_with_connector_lazy(connector))
    }
}

/// The usual server checks (chain to the CA, name, validity), then that the
/// certificate names what `expect` asks for.
#[derive(Debug)]
struct ExpectIdentity {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    expect: Expect,
}

impl rustls::client::danger::ServerCertVerifier for ExpectIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let identities = summarize(end_entity).map(|s| s.identities).unwrap_or_default();
        if self.expect.met_by(&identities) {
            Ok(verified)
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate names {identities:?}, not {}",
                self.expect
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `host:port` and the host of an endpoint URL.
/// Checks that `name` can name a server to check a certificate against (a
/// DNS name or an IP address), for a flag that gives one.
pub fn check_server_name(name: &str) -> Result<(), CommonError> {
    ServerName::try_from(name.to_string())
        .map(|_| ())
        .map_err(|e| CommonError::Tls(format!("`{name}` is not a DNS name or IP address: {e}")))
}

fn authority_of(url: &str) -> Result<(String, String), CommonError> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest).to_string();
    let unbracket = |h: &str| h.trim_start_matches('[').trim_end_matches(']').to_string();
    match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')) => {
            let host = unbracket(h);
            Ok((authority, host))
        }
        // An https:// URL without a port has https's (a collector behind
        // a load balancer); this dialer speaks TLS, so no other default
        // would be right.
        _ if url.starts_with("https://") => Ok((format!("{authority}:443"), unbracket(&authority))),
        _ => Err(CommonError::Tls(format!("endpoint `{url}` has no port"))),
    }
}

async fn reload_loop(weak: Weak<Inner>) {
    let mut failing = false;
    loop {
        tokio::time::sleep(RELOAD_EVERY).await;
        let Some(inner) = weak.upgrade() else { return };
        match Tls(inner).reload() {
            Ok(_) => failing = false,
            Err(e) => {
                // Once per bad spell: a Secret is often caught mid-update.
                if !failing {
                    tracing::warn!(error = %e, "TLS files changed but do not load; the previous certificate stays in use");
                }
                failing = true;
            }
        }
    }
}

/// Who is on the other end of an accepted connection: tonic puts it in
/// every request's extensions.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The SPIFFE identities of the client's verified certificate; empty
    /// without TLS or without a client certificate.
    pub identities: Arc<[String]>,
}

impl PeerInfo {
    /// Whether the client proved to be `identity`.
    pub fn is(&self, identity: &str) -> bool {
        self.identities.iter().any(|i| i == identity)
    }
}

/// An accepted connection, plain or TLS.
pub enum Conn {
    Plain(TcpStream, PeerInfo),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, PeerInfo),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Plain(_, p) | Conn::Tls(_, p) => p.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

type Accepted = std::io::Result<Conn>;

/// The connections `listener` accepts, with TLS when `tls` is given. Each
/// handshake runs on its own task (a slow client does not hold up the
/// others); a failed one is logged and never reaches the server. The
/// accept loop ends when the stream is dropped.
pub fn incoming(listener: TcpListener, tls: Option<Tls>) -> impl tokio_stream::Stream<Item = Accepted> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel::<Accepted>(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, or a connection reset before
                    // accept: try again shortly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let plain = PeerInfo {
                remote,
                identities: Arc::from(Vec::new()),
            };
            let Some(tls) = &tls else {
                if tx.send(Ok(Conn::Plain(tcp, plain))).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(slot) = handshakes.clone().try_acquire_owned() else {
                tracing::debug!(%remote, "too many TLS handshakes under way; connection closed");
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        // Debug: a load balancer's TCP checks would fill the log.
                        tracing::debug!(%remote, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let identities = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|leaf| summarize(leaf).ok())
                    .map(|s| s.identities)
                    .unwrap_or_default();
                let info = PeerInfo {
                    remote,
                    identities: Arc::from(identities),
                };
                let _ = tx.send(Ok(Conn::Tls(Box::new(stream), info))).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// How long an etcd endpoint whose connection failed is passed over.
const ENDPOINT_DOWN_FOR: Duration = Duration::from_secs(5);

/// etcd endpoints over TLS, each a channel of its own: calls go round the
/// endpoints, and one whose call failed at the transport (refused, reset,
/// connect timeout: a member down or cut off) is passed over for
/// [`ENDPOINT_DOWN_FOR`], so that a lost member costs one failed call, not
/// a share of all of them. (Every endpoint of a lazy channel looks ready
/// to a load balancer; only a failure tells a dead one apart.) When every
/// endpoint is down the one down longest is tried.
#[derive(Clone)]
struct Endpoints {
    channels: Arc<[tonic::transport::Channel]>,
    down_until: Arc<[std::sync::Mutex<Option<tokio::time::Instant>>]>,
    next: Arc<std::sync::atomic::AtomicUsize>,
}

impl Endpoints {
    fn pick(&self) -> usize {
        let n = self.channels.len();
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = tokio::time::Instant::now();
        let down = |i: usize| *self.down_until[i].lock().unwrap_or_else(|e| e.into_inner());
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| down(i).is_none_or(|until| until <= now))
            .unwrap_or_else(|| (0..n).min_by_key(|&i| down(i)).unwrap_or(0))
    }
}

type EtcdRequest = http::Request<tonic::body::Body>;
type EtcdResponse = http::Response<tonic::body::Body>;

impl tower::Service<EtcdRequest> for Endpoints {
    type Response = EtcdResponse;
    type Error = tower::BoxError;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<EtcdResponse, tower::BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each channel buffers its own calls.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: EtcdRequest) -> Self::Future {
        use tower::ServiceExt;
        let i = self.pick();
        let channel = self.channels[i].clone();
        let this = self.clone();
        Box::pin(async move {
            let result = channel.oneshot(request).await;
            // gRPC errors arrive as responses; an error here is the
            // transport's.
            let mut down = this.down_until[i].lock().unwrap_or_else(|e| e.into_inner());
            *down = match result {
                Ok(_) => None,
                Err(_) => Some(tokio::time::Instant::now() + ENDPOINT_DOWN_FOR),
            };
            drop(down);
            result.map_err(Into::into)
        })
    }
}

/// An etcd channel over TLS to every endpoint (see [`Endpoints`]); each
/// call times out after `timeout` when given.
pub(crate) fn etcd_channel(
    endpoints: &[String],
    tls: &Tls,
    timeout: Option<Duration>,
) -> Result<etcd_client::Channel, CommonError> {
    let mut channels = Vec::with_capacity(endpoints.len());
    for e in endpoints {
        channels.push(tls.channel_to_etcd(e, timeout)?);
    }
    if channels.is_empty() {
        return Err(CommonError::Tls("no etcd endpoint given".into()));
    }
    let down_until = channels.iter().map(|_| std::sync::Mutex::new(None)).collect();
    Ok(etcd_client::Channel::Custom(tower::util::BoxCloneSyncService::new(
        Endpoints {
            channels: channels.into(),
            down_until,
            next: Arc::default(),
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};

    struct Ca(CertifiedIssuer<'static, KeyPair>);

    impl Ca {
        fn new() -> Self {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            Ca(CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("ca"))
        }
        fn write(&self, dir: &Path, uri: &str) {
            let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
            p.subject_alt_names.push(SanType::URI(uri.try_into().expect("uri")));
            let key = KeyPair::generate().expect("key");
            let cert = p.signed_by(&key, &self.0).expect("signed");
            std::fs::write(dir.join(CA_FILE), self.0.pem()).expect("write");
            std::fs::write(dir.join(CERT_FILE), cert.pem()).expect("write");
            std::fs::write(dir.join(KEY_FILE), key.serialize_pem()).expect("write");
        }
    }

    #[test]
    fn identity_is_read_and_a_rotation_is_picked_up_only_when_consistent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new();
        ca.write(dir.path(), &identity(Role::Router, "us-east"));
        let tls = Tls::load(dir.path(), ClientAuth::Required).expect("loads");
        let first = tls.summary();
        assert_eq!(first.identities, vec!["spiffe://tern/router/us-east".to_string()]);
        assert!(!tls.reload().expect("same files"));

        // Half a rotation (a new certificate, the old key) is refused and
        // the old material stays.
        let key = std::fs::read(dir.path().join(KEY_FILE)).expect("read");
        ca.write(dir.path(), &identity(Role::Router, "eu-west"));
        let new_key = std::fs::read(dir.path().join(KEY_FILE)).expect("read");
        std::fs::write(dir.path().join(KEY_FILE), &key).expect("write");
        let e = tls.reload().expect_err("mismatched key").to_string();
        assert!(e.contains("tls.key") && e.contains("does not go with"), "{e}");
        assert_eq!(tls.summary(), first);

        std::fs::write(dir.path().join(KEY_FILE), new_key).expect("write");
        assert!(tls.reload().expect("complete rotation"));
        assert_eq!(tls.summary().identities, vec![identity(Role::Router, "eu-west")]);
        assert_ne!(tls.summary().serial, first.serial);
    }

    #[tokio::test]
    async fn a_peer_must_name_the_identity_asked_for() {
        let ca = Ca::new();
        let server_dir = tempfile::tempdir().expect("tempdir");
        ca.write(server_dir.path(), &identity(Role::Router, "us-east"));
        let client_dir = tempfile::tempdir().expect("tempdir");
        ca.write(client_dir.path(), &identity(Role::Router, "eu-west"));
        let server = Tls::load(server_dir.path(), ClientAuth::Required).expect("loads");
        let client = Tls::load(client_dir.path(), ClientAuth::Required).expect("loads");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let accepted = incoming(listener, Some(server));
        let us_east = Expect::Identity(identity(Role::Router, "us-east"));
        client
            .connect_to(&addr, "127.0.0.1", Some(&us_east))
            .await
            .expect("the us-east router is who it was asked for");
        client
            .connect_to(&addr, "127.0.0.1", Some(&Expect::Role(Role::Router)))
            .await
            .expect("a router");
        let e = client
            .connect_to(
                &addr,
                "127.0.0.1",
                Some(&Expect::Identity(identity(Role::Router, "ap-south"))),
            )
            .await
            .expect_err("not ap-south's router")
            .to_string();
        assert!(e.contains("ap-south"), "{e}");
        // A router's certificate, whatever its names, is no etcd member's.
        let e = client
            .connect_to(&addr, "127.0.0.1", Some(&Expect::Role(Role::Etcd)))
            .await
            .expect_err("not an etcd member")
            .to_string();
        assert!(e.contains("spiffe://tern/etcd/<scope>"), "{e}");
        drop(accepted);
    }

    #[test]
    fn a_role_is_met_only_by_an_identity_of_that_role_with_a_scope() {
        let etcd = Expect::Role(Role::Etcd);
        assert!(etcd.met_by(&[identity(Role::Etcd, "global")]));
        assert!(etcd.met_by(&["dns".into(), identity(Role::Etcd, "local")]));
        assert!(!etcd.met_by(&[]));
        assert!(!etcd.met_by(&["spiffe://tern/etcd/".into()]));
        assert!(!etcd.met_by(&["spiffe://tern/etcdx/global".into()]));
        assert!(!etcd.met_by(&["spiffe://other/etcd/global".into()]));
        assert!(!etcd.met_by(&[identity(Role::Router, "etcd")]));
    }

    #[test]
    fn an_expired_or_foreign_certificate_is_not_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::new();
        ca.write(dir.path(), "spiffe://tern/client/global");
        // The same leaf under another CA's ca.crt.
        std::fs::write(dir.path().join(CA_FILE), Ca::new().0.pem()).expect("write");
        let e = Tls::load(dir.path(), ClientAuth::Required)
            .expect_err("foreign")
            .to_string();
        assert!(
            e.contains("tls.crt") && e.contains("not a valid client certificate"),
            "{e}"
        );
        // Expired yesterday.
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &ca.0).expect("signed");
        std::fs::write(dir.path().join(CA_FILE), ca.0.pem()).expect("write");
        std::fs::write(dir.path().join(CERT_FILE), cert.pem()).expect("write");
        std::fs::write(dir.path().join(KEY_FILE), key.serialize_pem()).expect("write");
        let e = Tls::load(dir.path(), ClientAuth::Required)
            .expect_err("expired")
            .to_string();
        assert!(e.contains("tls.crt") && e.to_lowercase().contains("expired"), "{e}");
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = Tls::load(dir.path(), ClientAuth::Required)
            .expect_err("empty dir")
            .to_string();
        assert!(e.contains("ca.crt"), "{e}");
        Ca::new().write(dir.path(), "spiffe://tern/client/global");
        std::fs::write(dir.path().join(CA_FILE), "not pem").expect("write");
        let e = Tls::load(dir.path(), ClientAuth::Required)
            .expect_err("bad ca")
            .to_string();
        assert!(e.contains("ca.crt") && e.contains("no certificate"), "{e}");
        assert!(authority_of("http://127.0.0.1").is_err());
        assert_eq!(
            authority_of("https://collector.observability").expect("https's port"),
            (
                "collector.observability:443".to_string(),
                "collector.observability".to_string()
            )
        );
        assert_eq!(
            authority_of("https://[::1]:4317/").expect("valid"),
            ("[::1]:4317".to_string(), "::1".to_string())
        );
        assert_eq!(
            authority_of("https://etcd-0.us-east:2379").expect("valid"),
            ("etcd-0.us-east:2379".to_string(), "etcd-0.us-east".to_string())
        );
    }
}
