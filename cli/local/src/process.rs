//! A child process that lives in its own process group and is killed with its
//! whole group when the guard drops, so neither a panicking test nor an
//! interrupted `tern demo` leaves anything behind.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::{LocalError, Result};

/// A running child process and the file that captures its output.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ChildGuard {
    /// Starts `cmd` in a new process group with stdout and stderr appended to
    /// `log` (a restarted server keeps its earlier run's lines).
    /// On Linux the child also gets SIGKILL if this process dies without
    /// unwinding (`setpriv --pdeathsig`), when setpriv is installed.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| LocalError::Io {
                path: log.display().to_string(),
                source,
            })?;
        let err = out.try_clone().map_err(|source| LocalError::Io {
            path: log.display().to_string(),
            source,
        })?;
        let mut cmd = with_parent_death_signal(cmd.get_program().to_owned(), &mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        let child = cmd.spawn().map_err(|source| LocalError::Spawn {
            what: name.to_string(),
            source,
        })?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// The name it was started under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The captured output so far (the last 8 KiB), for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(8192);
        let start = (start..text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        text[start..].to_string()
    }

    /// Process id (also the process group id).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// An error if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(LocalError::Exited {
                what: self.name.clone(),
                status: status.to_string(),
                log: self.log_tail(),
            });
        }
        Ok(())
    }

    /// Polls `ready` every 50 ms until it is true, the process dies, or
    /// `limit` passes; the error carries the process's log.
    pub fn wait_until(&mut self, limit: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_running()?;
            if ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LocalError::NotReady {
                    what: self.name.clone(),
                    secs: limit.as_secs(),
                    log: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal to the whole process group.
    pub fn signal(&self, signal: Signal) {
        if let Some(child) = &self.child {
            let _ = killpg(Pid::from_raw(child.id() as i32), signal);
        }
    }

    /// Kills the group and waits for the process to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Asks the process to stop (SIGTERM), then kills it after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(child) = self.child.as_mut() {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Wraps a command in `setpriv --pdeathsig KILL` when setpriv exists.
fn with_parent_death_signal(program: std::ffi::OsString, cmd: &mut Command) -> Command {
    let setpriv = Path::new("/usr/bin/setpriv");
    let mut wrapped = if setpriv.exists() {
        let mut w = Command::new(setpriv);
        w.arg("--pdeathsig").arg("KILL").arg("--").arg(program);
        w
    } else {
        Command::new(program)
    };
    wrapped.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}
