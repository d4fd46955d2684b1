//! BOUNDED reads: one served from a mirror with bound `b` must return a
//! value at least as new as every write acknowledged before `invoke − b`,
//! and the staleness it reports must not be below the truth measured
//! against the history. A value is stale from the moment a write that
//! certainly followed it (invoked after it completed) was acknowledged.

use crate::Violation;
use crate::history::{History, Outcome, Record, Request};

/// The value a write may leave (None: a delete), and whether it certainly
/// did (acknowledged) or only may have (outcome unknown).
fn leaves(r: &Record) -> Option<(Option<&str>, bool)> {
    let certain = match &r.outcome {
        Outcome::Ok { swapped, .. } => {
            if *swapped == Some(false) {
                return None;
            }
            true
        }
        Outcome::Indeterminate { .. } => false,
        Outcome::Failed { .. } => return None,
    };
    let value = match &r.request {
        Request::Put { value } => Some(value.as_str()),
        Request::Delete => None,
        Request::Cas { new, .. } => new.as_deref(),
        _ => return None,
    };
    Some((value, certain))
}

/// Checks every BOUNDED read of `history` that a mirror served.
pub fn check(history: &History) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (key, ops) in history.by_key() {
        let writes: Vec<(&Record, Option<&str>, bool)> = ops
            .iter()
            .filter_map(|r| {
                let (v, certain) = leaves(r)?;
                Some((*r, v, certain))
            })
            .collect();
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
            let what = problem(read, value.as_deref(), *max_staleness_ms, *reported, &writes);
            if let Some(what) = what {
                violations.push(Violation {
                    checker: "staleness",
                    key: key.to_string(),
                    detail: format!("client {} read {value:?} at {} µs {what}", read.client, read.invoke_us),
                });
            }
        }
    }
    violations
}

/// What is wrong with a mirror read of `value` that accepted `max_ms` and
/// reported `reported_ms`, given the key's `writes`; None: nothing.
fn problem(
    read: &Record,
    value: Option<&str>,
    max_ms: u64,
    reported_ms: u64,
    writes: &[(&Record, Option<&str>, bool)],
) -> Option<String> {
    // Every write the value may come from (invoked before the read
    // answered; an absent key may also be the start of the run).
    let sources: Vec<&(&Record, Option<&str>, bool)> = writes
        .iter()
        .filter(|(w, v, _)| *v == value && w.invoke_us < read.complete_us)
        .collect();
    if sources.is_empty() && value.is_some() {
        return Some(", a value no write left".into());
    }
    // A write whose outcome is unknown may have landed at any time: the read
    // may be as fresh as it likes.
    if sources.iter().any(|(_, _, certain)| !certain) {
        return None;
    }
    // For each source, when it was certainly overwritten: the first
    // acknowledged write of another value invoked after the source completed
    // and done before the read. The most favourable source decides (the
    // freshest explanation of the read).
    let overwritten = |written: u64| {
        writes
            .iter()
            .filter(|(w, v, certain)| {
                *certain && *v != value && w.invoke_us > written && w.complete_us < read.invoke_us
            })
            .map(|(w, _, _)| w.complete_us)
            .min()
    };
    let mut times: Vec<Option<u64>> = sources.iter().map(|(w, _, _)| overwritten(w.complete_us)).collect();
    if value.is_none() {
        times.push(overwritten(0));
    }
    // None (never overwritten) beats any time; otherwise the latest.
    let superseded = times.into_iter().try_fold(0u64, |latest, t| t.map(|t| latest.max(t)))?;
    let true_ms = (read.invoke_us - superseded) / 1000;
    if true_ms > max_ms {
        Some(format!(
            "with a bound of {max_ms} ms, but it was overwritten {true_ms} ms before"
        ))
    } else if reported_ms < true_ms {
        Some(format!(
            "reported {reported_ms} ms stale, but it was overwritten {true_ms} ms before"
        ))
    } else {
        None
    }
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
    fn the_freshest_explanation_counts() {
        let del = |at| ok(1, "k", at, Request::Delete);
        let h = History {
            records: vec![
                put(1, (0, 1_000), "a"),
                del((2_000, 3_000)),
                put(1, (4_000, 5_000), "b"),
                del((2_000_000, 2_001_000)),
                // Absent: the second delete explains it, fresh.
                bounded(2, (2_100_000, 2_101_000), 1_000, None, 0),
                // Written by a put whose outcome is unknown: it may have
                // landed just now.
                unknown(put(3, (2_200_000, 2_300_000), "c")),
                bounded(2, (2_900_000, 2_901_000), 1_000, Some("c"), 0),
            ],
        };
        assert_eq!(check(&h), vec![]);
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
