//! Finds the pinned binaries (etcd, toxiproxy, Jaeger; the tests also
//! kube-apiserver and kubectl) that `e2e/build-tools.sh` builds, and picks
//! free loopback ports for the servers started from them.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::{LocalError, Result};

/// The directory named at start-up (`tern --assets`), ahead of the
/// environment: set once, before anything is started.
static CHOSEN: OnceLock<PathBuf> = OnceLock::new();

/// Names the directory of the binaries for the rest of this process (a
/// command-line flag); the first call wins.
pub fn use_dir(dir: PathBuf) {
    let _ = CHOSEN.set(dir);
}

/// Directory of the binaries: the one given to [`use_dir`], else
/// `$TERN_ASSETS`, else `target/controlplane/bin` of the checkout this was
/// built in, if that checkout is still there.
pub fn dir() -> Option<PathBuf> {
    if let Some(dir) = CHOSEN.get() {
        return Some(dir.clone());
    }
    match std::env::var_os("TERN_ASSETS") {
        Some(dir) if !dir.is_empty() => Some(PathBuf::from(dir)),
        _ => crate::source_checkout().map(|root| root.join("target/controlplane/bin")),
    }
}

/// Path of one binary, or an error that says where it was looked for and
/// how to provide it.
pub fn binary(name: &str) -> Result<PathBuf> {
    let Some(dir) = dir() else {
        return Err(LocalError::NoAssetsDir { name: name.to_string() });
    };
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(LocalError::MissingBinary {
            name: name.to_string(),
            path: path.display().to_string(),
        })
    }
}

/// A free TCP port on 127.0.0.1 for a child process to listen on.
///
/// Not one the OS picks for `bind(0)`: that comes from the ephemeral range,
/// where every outgoing connection of the tests also takes its source port,
/// and a port released here could be taken by a client's connection before
/// the child binds it (CI saw etcd fail with "address already in use").
/// Instead: a port below the ephemeral range, never handed out twice in this
/// process, free when checked, starting from a random place so that two
/// processes (two `tern demo`s of one test binary) rarely walk the same
/// ports. What remains of the race is retried by `retry_port_clash`.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Below Linux's default ephemeral range (32768–60999).
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let seed = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        (h.finish() % u64::from(SPAN)) as u32
    };
    let _ = NEXT.compare_exchange(u32::MAX, seed, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    // Everything taken (not expected): fall back to the OS's choice.
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the OS hands out a loopback port")
}

/// An error of starting a server that may be a lost port.
pub trait StartFailure: std::fmt::Display {
    /// The server exited while starting: most often because another
    /// process took a port between `free_port` and its bind (what it says
    /// in its log is not parsed; starting again with fresh ports is safe
    /// either way, and a server that cannot start fails three times).
    fn exited_early(&self) -> bool;
}

impl StartFailure for crate::LocalError {
    fn exited_early(&self) -> bool {
        matches!(self, Self::Exited { .. })
    }
}

/// Runs `start` again (with fresh ports: it must pick its own) when a
/// server it started exited while starting; at most three times. Generic
/// over the error so that the test harness's own servers retry the same
/// way.
pub fn retry_port_clash<T, E: StartFailure>(
    mut start: impl FnMut() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    let mut attempt = 1;
    loop {
        match start() {
            Err(e) if attempt < 3 && e.exited_early() => {
                tracing::warn!(error = %e, attempt, "a port was taken before the server bound it; retrying with new ports");
                attempt += 1;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_missing_binary_says_where_it_was_looked_for_and_how_to_name_the_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        super::use_dir(dir.path().to_path_buf());
        let err = super::binary("etcd").expect_err("an empty directory");
        assert!(
            matches!(&err, crate::LocalError::MissingBinary { name, path }
                if name == "etcd" && path == &dir.path().join("etcd").display().to_string()),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("TERN_ASSETS") && text.contains("--assets"), "{text}");
    }

    #[test]
    fn ports_are_below_the_ephemeral_range_and_never_repeat() {
        let ports: Vec<u16> = (0..200).map(|_| super::free_port()).collect();
        let unique: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(unique.len(), ports.len());
        assert!(ports.iter().all(|p| (20_000..32_000).contains(p)), "{ports:?}");
    }
}
