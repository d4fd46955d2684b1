//! Finds the pinned binaries (etcd, kube-apiserver, kubectl, ...) that
//! `e2e/build-tools.sh` builds.

use std::path::PathBuf;

use crate::{HarnessError, Result};

/// Directory of the binaries: `$TERN_ASSETS`, else `target/controlplane/bin`.
pub fn dir() -> PathBuf {
    match std::env::var_os("TERN_ASSETS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => crate::repo_root().join("target/controlplane/bin"),
    }
}

/// Path of one binary, or an error that names the build script.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = dir().join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::MissingBinary {
            name: name.to_string(),
            path: path.display().to_string(),
        })
    }
}

/// A free TCP port on 127.0.0.1, chosen by the OS. The listener is closed before
/// the port is handed to a child process; envtest takes the same small risk.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the OS hands out a loopback port")
}
