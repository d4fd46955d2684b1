//! BOUNDED reads: one served from a mirror with bound `b` must return a
//! value at least as new as every write acknowledged before `invoke − b`,
//! and the staleness it reports must not be below the truth measured
//! against the history. A value is stale from the moment a write that
//! certainly followed it (invoked after it completed) was acknowledged.

use crate::Violation;
use crate::history::{History, Outcome, Record, Request};

/// The value a write leaves (None: a delete).
fn leaves(r: &Record) -> Option<Option<&str>> {
    let applied = match &r.outcome {
        Outcome::Ok { swapped, .. } => *swapped != Some(false),
        _ => false,
    };
    if !applied {
        return None;
    }
    match &r.request {
        Request::Put { value } => Some(Some(value.as_str())),
        Request::Delete => Some(None),
        Request::Cas { new, .. } => Some(new.as_deref()),
        _ => None,
    }
}

/// Checks every BOUNDED read of `history` that a mirror served.
pub fn check(history: &History) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (key, ops) in history.by_key() {
        let writes: Vec<(&Record, Option<&str>)> = ops.iter().filter_map(|r| Some((*r, leaves(r)?))).collect();
        for read in &ops {
            let (
                Request::GetBounded { max_staleness_ms },
                Outcome::Ok {
                    value, staleness_ms, ..
                },
            ) = (&read.request, &read.outcome)
            else {
                continue;
            };
            // Served by the home (no reported staleness): linearizable, and
            // checked there.
            let Some(reported) = staleness_ms else { continue };
            // When the value read was written: the earliest completion of a
            // write that leaves it (an absent key: the start of the run).
            let written = writes
                .iter()
                .filter(|(_, v)| *v == value.as_deref())
                .map(|(w, _)| w.complete_us)
                .min();
            let Some(written) = written.or(value.is_none().then_some(0)) else {
                violations.push(Violation {
                    checker: "staleness",
                    key: key.to_string(),
                    detail: format!(
                        "client {} read {value:?} at {} µs, a value no acknowledged write left",
                        read.client, read.invoke_us
                    ),
                });
                continue;
            };
            // The first acknowledged write certainly after it: from its
            // completion on, the value read was stale.
            let Some(superseded) = writes
                .iter()
                .filter(|(w, v)| w.invoke_us > written && *v != value.as_deref() && w.complete_us < read.invoke_us)
                .map(|(w, _)| w.complete_us)
                .min()
            else {
                continue;
            };
            let true_ms = (read.invoke_us - superseded) / 1000;
            if true_ms > *max_staleness_ms {
                violations.push(Violation {
                    checker: "staleness",
                    key: key.to_string(),
                    detail: format!(
                        "client {} read {value:?} at {} µs with a bound of {max_staleness_ms} ms, but it was overwritten {true_ms} ms before",
                        read.client, read.invoke_us
                    ),
                });
            } else if *reported < true_ms {
                violations.push(Violation {
                    checker: "staleness",
                    key: key.to_string(),
                    detail: format!(
                        "client {} read {value:?} at {} µs reported {reported} ms stale, but it was overwritten {true_ms} ms before",
                        read.client, read.invoke_us
                    ),
                });
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::build::*;

    fn bounded(client: u32, at: (u64, u64), bound_ms: u64, value: Option<&str>, reported_ms: u64) -> Record {
        let mut r = ok(
            client,
            "k",
            at,
            Request::GetBounded {
                max_staleness_ms: bound_ms,
            },
        );
        r.outcome = Outcome::Ok {
            value: value.map(str::to_string),
            swapped: None,
            staleness_ms: Some(reported_ms),
        };
        r
    }

    #[test]
    fn reads_within_their_bound_and_honestly_reported_pass() {
        let h = History {
            records: vec![
                put(1, (0, 1_000), "a"),
                put(1, (2_000, 3_000), "b"),
                // "a" was overwritten at 3 ms; read at 250 ms with a bound of
                // 500 ms and 300 ms reported: true staleness 247 ms.
                bounded(2, (250_000, 251_000), 500, Some("a"), 300),
                bounded(2, (260_000, 261_000), 500, Some("b"), 0),
            ],
        };
        assert_eq!(check(&h), vec![]);
    }

    #[test]
    fn a_read_older_than_its_bound_is_caught() {
        let h = History {
            records: vec![
                put(1, (0, 1_000), "a"),
                put(1, (2_000, 3_000), "b"),
                bounded(2, (1_503_000, 1_504_000), 1_000, Some("a"), 900),
            ],
        };
        let v = check(&h);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].detail.contains("bound of 1000 ms") && v[0].detail.contains("1500 ms"),
            "{v:?}"
        );
    }

    #[test]
    fn an_understated_staleness_is_caught() {
        let h = History {
            records: vec![
                put(1, (0, 1_000), "a"),
                put(1, (2_000, 3_000), "b"),
                bounded(2, (803_000, 804_000), 1_000, Some("a"), 200),
            ],
        };
        let v = check(&h);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].detail.contains("reported 200 ms") && v[0].detail.contains("800 ms"),
            "{v:?}"
        );
    }
}
