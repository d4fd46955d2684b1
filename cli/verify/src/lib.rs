//! tern-verify: the instrument that checks tern's promises the way Jepsen
//! and etcd's robustness suite check etcd. Clients record every operation
//! as a `history::Record` (invoke and completion time, request, outcome);
//! the checkers judge a history:
//!
//! - `linearizable`: each key's history is linearizable as a register with
//!   compare-and-set (a Wing–Gong search with memoisation, one key at a
//!   time, bounded in time: a timeout is "unknown", never "ok");
//! - `applied`: against the values etcd really applied (its watch history),
//!   nothing acknowledged is lost, nothing is applied twice, and nothing
//!   answered "not applied" was applied;
//! - `restore`: a group restored from a backup holds exactly the lost
//!   group's state at the backup's revision, with every write acknowledged
//!   before the backup began, and the later acknowledged writes listed as
//!   the known loss;
//! - `staleness`: a BOUNDED read is at least as new as its bound says, and
//!   its reported staleness is not below the truth.
//!
//! Indeterminate operations (a deadline, "outcome unknown", a link failure
//! after send) may take effect at any time after their invocation, or never.
#![forbid(unsafe_code)]

pub mod applied;
pub mod history;
pub mod linearizable;
pub mod restore;
pub mod staleness;

pub use history::{History, Outcome, Record, Request};

/// Why a history could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("history file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("history file {path}, line {line}: {source}")]
    Parse {
        path: String,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
}

/// Every checker on one history: linearizability (each key within
/// `per_key`; with `applied` known, on the history it resolves), what etcd
/// applied when `applied` is known, and bounded staleness. The report's
/// `unknown` lists keys the search ran out of time on.
pub fn judge(
    history: &History,
    applied: Option<&applied::Applied>,
    per_key: std::time::Duration,
) -> linearizable::Report {
    let mut report = match applied {
        Some(applied) => linearizable::check(&applied::resolve(history, applied), per_key),
        None => linearizable::check(history, per_key),
    };
    if let Some(applied) = applied {
        report.violations.extend(applied::check(history, applied));
    }
    report.violations.extend(staleness::check(history));
    report
}

/// One broken promise, for the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which checker found it.
    pub checker: &'static str,
    /// The key it concerns.
    pub key: String,
    /// What is wrong, with the operations involved.
    pub detail: String,
}
