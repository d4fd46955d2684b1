//! The certificates of a local deployment run with TLS: one CA made for
//! it, and for each component a directory laid out as a mounted
//! cert-manager Secret is (`ca.crt`, `tls.crt`, `tls.key`), so that the
//! processes read them exactly as they would in Kubernetes. Every leaf is
//! valid for loopback and names its holder with tern's SPIFFE identity;
//! issuing a name again writes a new certificate in place, which is how a
//! test rotates one under a running process.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use tern_common::tls::{CA_FILE, CERT_FILE, KEY_FILE};

use crate::{LocalError, Result};

/// A deployment's CA and the directory its certificates go in.
pub struct LocalPki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

fn pki_error(what: &str, e: impl std::fmt::Display) -> LocalError {
    LocalError::NotStarted {
        component: "certificate authority",
        region: "local".into(),
        reason: format!("{what}: {e}"),
    }
}

fn write(path: &Path, contents: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| LocalError::Io {
        path: path.display().to_string(),
        source,
    };
    // Written beside and renamed over: a reader sees the old file or the
    // new one, never half of one. The mode is set explicitly too: a file
    // left over by an interrupted run keeps the mode it was made with.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

impl LocalPki {
    /// A new CA whose certificates go under `dir`.
    pub fn new(dir: &Path) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| pki_error("CA parameters", e))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "tern local CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(|e| pki_error("CA key", e))?;
        let ca = CertifiedIssuer::self_signed(params, key).map_err(|e| pki_error("CA certificate", e))?;
        std::fs::create_dir_all(dir).map_err(|source| LocalError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            ca,
        })
    }

    /// Where `name`'s files are.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes (again, for a rotation) a certificate for `name` that names
    /// `identity` and is valid for localhost and 127.0.0.1, as a server and
    /// as a client (an etcd member is both to its peers; a router serves
    /// and dials its peers); returns its directory.
    pub fn issue(&self, name: &str, identity: &str) -> Result<PathBuf> {
        self.issue_for(name, identity, &["localhost".to_string(), "127.0.0.1".to_string()])
    }

    /// Like [`LocalPki::issue`], valid for `hosts` (DNS names, `*.`
    /// wildcards or IP addresses): a server in Kubernetes, named by its
    /// Services.
    pub fn issue_for(&self, name: &str, identity: &str, hosts: &[String]) -> Result<PathBuf> {
        self.issue_as(name, identity, Some(hosts))
    }

    /// Like [`LocalPki::issue`], for a client only: no host names and no
    /// server use, so that it cannot pose as a router or an etcd member.
    pub fn issue_client(&self, name: &str, identity: &str) -> Result<PathBuf> {
        self.issue_as(name, identity, None)
    }

    /// `hosts`: a server's names; none: a client only.
    fn issue_as(&self, name: &str, identity: &str, hosts: Option<&[String]>) -> Result<PathBuf> {
        let server = hosts.is_some();
        let mut params =
            CertificateParams::new(hosts.unwrap_or_default().to_vec()).map_err(|e| pki_error("leaf parameters", e))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .subject_alt_names
            .push(SanType::URI(identity.try_into().map_err(|e| pki_error("identity", e))?));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = if server {
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        let key = KeyPair::generate().map_err(|e| pki_error("leaf key", e))?;
        let cert = params
            .signed_by(&key, &self.ca)
            .map_err(|e| pki_error("signing a leaf", e))?;
        let dir = self.dir(name);
        std::fs::create_dir_all(&dir).map_err(|source| LocalError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        write(&dir.join(CA_FILE), &self.ca.pem(), 0o644)?;
        // The key before the certificate: a reader between the two sees a
        // pair that does not match and keeps its old one until the next read.
        write(&dir.join(KEY_FILE), &key.serialize_pem(), 0o600)?;
        write(&dir.join(CERT_FILE), &cert.pem(), 0o644)?;
        Ok(dir)
    }
}
