//! What clients record: one `Record` per operation, with its invocation and
//! completion on a monotonic clock shared by every client of a run (µs since
//! the run started), the request, and the outcome. Stored as JSON lines so
//! that a failed run can be checked again offline and attached to a bug.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::VerifyError;

/// What one operation asked for, on one key (values as UTF-8 text: the
/// workload writes unique text values).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Put `value`.
    Put { value: String },
    /// Delete the key.
    Delete,
    /// A linearizable (STRONG) read.
    Get,
    /// A BOUNDED read accepting `max_staleness_ms`.
    GetBounded { max_staleness_ms: u64 },
    /// Compare-and-set: if the key holds `expect` (None: absent), write
    /// `new` (None: delete).
    Cas {
        expect: Option<String>,
        new: Option<String>,
    },
}

impl Request {
    /// Whether it may change the key.
    pub fn writes(&self) -> bool {
        matches!(self, Self::Put { .. } | Self::Delete | Self::Cas { .. })
    }
}

/// How it ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Answered: applied (writes), read (reads), or evaluated (a CAS whose
    /// compare failed has `swapped: false` and changed nothing). `value`:
    /// what a read returned (None: absent).
    /// `staleness_ms`: a BOUNDED read served from a mirror says how stale.
    Ok {
        /// (`read` in the file: `value` is the request's.)
        #[serde(default, rename = "read", skip_serializing_if = "Option::is_none")]
        value: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        swapped: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        staleness_ms: Option<u64>,
    },
    /// Definitely not applied (refused, compare failed, "retry").
    Failed { reason: String },
    /// May have been applied, at any time after the invocation.
    Indeterminate { reason: String },
}

/// One operation of one client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub client: u32,
    pub key: String,
    /// µs since the run started, when the request was sent and when its
    /// answer came.
    pub invoke_us: u64,
    pub complete_us: u64,
    #[serde(flatten)]
    pub request: Request,
    #[serde(flatten)]
    pub outcome: Outcome,
    /// The idempotency key it carried, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// A run's operations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    pub records: Vec<Record>,
}

impl History {
    /// The operations on each key, in invocation order.
    pub fn by_key(&self) -> BTreeMap<&str, Vec<&Record>> {
        let mut keys: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
        for r in &self.records {
            keys.entry(r.key.as_str()).or_default().push(r);
        }
        for ops in keys.values_mut() {
            ops.sort_by_key(|r| (r.invoke_us, r.complete_us));
        }
        keys
    }

    /// Writes the history as JSON lines.
    pub fn save(&self, path: &Path) -> Result<(), VerifyError> {
        let io = |source| VerifyError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
        for r in &self.records {
            let line = serde_json::to_string(r).expect("records always serialise");
            writeln!(out, "{line}").map_err(io)?;
        }
        out.flush().map_err(io)
    }

    /// Reads a history written by `save`.
    pub fn load(path: &Path) -> Result<Self, VerifyError> {
        let file = std::fs::File::open(path).map_err(|source| VerifyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut records = Vec::new();
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|source| VerifyError::Io {
                path: path.display().to_string(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            records.push(serde_json::from_str(&line).map_err(|source| VerifyError::Parse {
                path: path.display().to_string(),
                line: i + 1,
                source,
            })?);
        }
        Ok(Self { records })
    }
}

#[cfg(test)]
pub(crate) mod build {
    //! Short-hands for hand-made histories in the checkers' tests.
    use super::*;

    pub fn ok(client: u32, key: &str, at: (u64, u64), request: Request) -> Record {
        Record {
            client,
            key: key.into(),
            invoke_us: at.0,
            complete_us: at.1,
            request,
            outcome: Outcome::Ok {
                value: None,
                swapped: None,
                staleness_ms: None,
            },
            idempotency_key: None,
        }
    }

    pub fn put(client: u32, at: (u64, u64), value: &str) -> Record {
        ok(client, "k", at, Request::Put { value: value.into() })
    }

    pub fn get(client: u32, at: (u64, u64), value: Option<&str>) -> Record {
        let mut r = ok(client, "k", at, Request::Get);
        r.outcome = Outcome::Ok {
            value: value.map(str::to_string),
            swapped: None,
            staleness_ms: None,
        };
        r
    }

    pub fn cas(client: u32, at: (u64, u64), expect: Option<&str>, new: &str, swapped: bool) -> Record {
        let mut r = ok(
            client,
            "k",
            at,
            Request::Cas {
                expect: expect.map(str::to_string),
                new: Some(new.into()),
            },
        );
        r.outcome = Outcome::Ok {
            value: None,
            swapped: Some(swapped),
            staleness_ms: None,
        };
        r
    }

    pub fn unknown(mut r: Record) -> Record {
        r.outcome = Outcome::Indeterminate {
            reason: "outcome unknown".into(),
        };
        r
    }

    pub fn failed(mut r: Record) -> Record {
        r.outcome = Outcome::Failed {
            reason: "unavailable".into(),
        };
        r
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    #[test]
    fn a_history_survives_a_round_trip_through_its_file() {
        let h = History {
            records: vec![
                put(1, (0, 10), "a"),
                unknown(put(2, (5, 30), "b")),
                get(1, (40, 50), Some("b")),
                cas(3, (60, 70), Some("b"), "c", false),
            ],
        };
        let dir = std::env::temp_dir().join(format!("tern-verify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("history.jsonl");
        h.save(&path).expect("save");
        assert_eq!(History::load(&path).expect("load"), h);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.lines().next().expect("a line").contains("\"op\":\"put\""),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
