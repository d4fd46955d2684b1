//! Linearizability of each key's history, as a register with
//! compare-and-set: a Wing–Gong search (the one Knossos and porcupine
//! refine) over one key at a time, with memoisation of (operations placed,
//! register value). An operation may be placed next when it was invoked
//! before every unplaced completed operation returned; the search succeeds
//! once every completed operation is placed. Indeterminate writes never
//! return: they may be placed at any point after their invocation, or not
//! at all. Reads whose outcome is unknown say nothing and are left out, and
//! so are BOUNDED reads (they may be stale by design; `staleness` checks
//! them).
//!
//! The search is exponential in the worst case, so it is bounded in time
//! per key and a key that runs out of time is "unknown", never "ok".

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::Violation;
use crate::history::{History, Outcome, Record, Request};

/// The verdict on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No order of the operations explains what clients saw.
    NotLinearizable(String),
    /// The search ran out of time.
    Unknown,
}

/// What the checker said about a whole history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub keys: usize,
    pub unknown: Vec<String>,
    pub violations: Vec<Violation>,
}

/// Checks every key of `history`, each within `per_key`.
pub fn check(history: &History, per_key: Duration) -> Report {
    let mut report = Report::default();
    for (key, ops) in history.by_key() {
        report.keys += 1;
        match check_key(&ops, per_key) {
            Verdict::Linearizable => {}
            Verdict::Unknown => report.unknown.push(key.to_string()),
            Verdict::NotLinearizable(detail) => report.violations.push(Violation {
                checker: "linearizable",
                key: key.to_string(),
                detail,
            }),
        }
    }
    report
}

/// One operation as the search sees it.
struct Op<'a> {
    record: &'a Record,
    invoke: u64,
    /// None: indeterminate, never returns.
    ret: Option<u64>,
}

/// The register after `op`, when `op` can happen on `value` with the
/// outcome its client saw; None when it cannot.
fn step(value: &Option<String>, op: &Record) -> Option<Option<String>> {
    let unknown = matches!(op.outcome, Outcome::Indeterminate { .. });
    match (&op.request, &op.outcome) {
        (Request::Put { value: v }, _) => Some(Some(v.clone())),
        (Request::Delete, _) => Some(None),
        (Request::Get, Outcome::Ok { value: seen, .. }) => (seen == value).then(|| value.clone()),
        (Request::Cas { expect, new }, _) if unknown => {
            // It takes effect only if its compare holds when it does.
            Some(if value == expect { new.clone() } else { value.clone() })
        }
        (Request::Cas { expect, new }, Outcome::Ok { swapped, .. }) => match swapped {
            Some(false) => (value != expect).then(|| value.clone()),
            _ => (value == expect).then(|| new.clone()),
        },
        _ => None,
    }
}

/// Whether the search considers `r` at all.
fn relevant(r: &Record) -> bool {
    match (&r.request, &r.outcome) {
        (Request::GetBounded { .. }, _) => false,
        (_, Outcome::Failed { .. }) => false,
        (req, Outcome::Indeterminate { .. }) => req.writes(),
        (_, Outcome::Ok { .. }) => true,
    }
}

fn describe(r: &Record) -> String {
    let outcome = match &r.outcome {
        Outcome::Ok { value, swapped, .. } => match (&r.request, swapped) {
            (Request::Get, _) => format!("returned {value:?}"),
            (_, Some(false)) => "compare failed".into(),
            _ => "ok".into(),
        },
        Outcome::Failed { reason } => format!("failed ({reason})"),
        Outcome::Indeterminate { .. } => "outcome unknown".into(),
    };
    format!(
        "client {} {:?} [{} µs, {} µs] {outcome}",
        r.client, r.request, r.invoke_us, r.complete_us
    )
}

/// Checks one key's operations within `limit`.
pub fn check_key(records: &[&Record], limit: Duration) -> Verdict {
    let ops: Vec<Op<'_>> = records
        .iter()
        .filter(|r| relevant(r))
        .map(|r| Op {
            record: r,
            invoke: r.invoke_us,
            ret: (!matches!(r.outcome, Outcome::Indeterminate { .. })).then_some(r.complete_us),
        })
        .collect();
    let n = ops.len();
    let words = n.div_ceil(64).max(1);
    let started = Instant::now();
    let mut seen: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    // The deepest point reached, for the report: how many were placed and
    // which completed operation could not follow.
    let mut deepest: (usize, Option<usize>) = (0, None);

    struct Frame {
        done: Vec<u64>,
        placed: usize,
        value: Option<String>,
        candidates: Vec<usize>,
        next: usize,
    }
    let is_done = |done: &[u64], i: usize| done[i / 64] & (1 << (i % 64)) != 0;
    let frame = |done: Vec<u64>, placed: usize, value: Option<String>| -> Result<Frame, ()> {
        // The earliest return among unplaced completed operations bounds
        // what may be placed next.
        let first_return = (0..n)
            .filter(|&i| !is_done(&done, i))
            .filter_map(|i| ops[i].ret.map(|r| (r, i)))
            .min();
        let Some((bound, _)) = first_return else {
            return Err(()); // every completed operation is placed
        };
        let candidates = (0..n)
            .filter(|&i| !is_done(&done, i) && ops[i].invoke <= bound)
            .collect();
        Ok(Frame {
            done,
            placed,
            value,
            candidates,
            next: 0,
        })
    };
    let mut stack = match frame(vec![0; words], 0, None) {
        Ok(f) => vec![f],
        Err(()) => return Verdict::Linearizable,
    };
    let mut steps: u64 = 0;
    while let Some(top) = stack.last_mut() {
        steps += 1;
        if steps.is_multiple_of(1024) && started.elapsed() > limit {
            return Verdict::Unknown;
        }
        let Some(&i) = top.candidates.get(top.next) else {
            if top.placed >= deepest.0 {
                let blocked = (0..n)
                    .filter(|&j| !is_done(&top.done, j))
                    .filter_map(|j| ops[j].ret.map(|r| (r, j)))
                    .min()
                    .map(|(_, j)| j);
                deepest = (top.placed, blocked);
            }
            stack.pop();
            continue;
        };
        top.next += 1;
        let Some(value) = step(&top.value, ops[i].record) else {
            continue;
        };
        let mut done = top.done.clone();
        done[i / 64] |= 1 << (i % 64);
        if !seen.insert((done.clone(), value.clone())) {
            continue;
        }
        let placed = top.placed + 1;
        match frame(done, placed, value) {
            Ok(f) => stack.push(f),
            Err(()) => return Verdict::Linearizable,
        }
    }
    let detail = match deepest.1 {
        Some(j) => format!(
            "no order of the {n} operations explains the answers: at most {} can be placed, then {} cannot follow any of them",
            deepest.0,
            describe(ops[j].record)
        ),
        None => format!("no order of the {n} operations explains the answers"),
    };
    Verdict::NotLinearizable(detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::build::*;

    const LIMIT: Duration = Duration::from_secs(5);

    fn verdict(records: Vec<Record>) -> Verdict {
        let refs: Vec<&Record> = records.iter().collect();
        check_key(&refs, LIMIT)
    }

    #[test]
    fn sequential_and_concurrent_histories_that_make_sense_pass() {
        assert_eq!(
            verdict(vec![put(1, (0, 10), "a"), get(2, (20, 30), Some("a"))]),
            Verdict::Linearizable
        );
        // Two concurrent puts: a read after both may see either.
        for seen in ["a", "b"] {
            assert_eq!(
                verdict(vec![
                    put(1, (0, 10), "a"),
                    put(2, (5, 15), "b"),
                    get(3, (20, 30), Some(seen))
                ]),
                Verdict::Linearizable,
                "{seen}"
            );
        }
        // A read concurrent with a put may see the old or the new value.
        assert_eq!(
            verdict(vec![
                put(1, (0, 10), "a"),
                put(2, (20, 40), "b"),
                get(3, (25, 30), Some("a"))
            ]),
            Verdict::Linearizable
        );
    }

    #[test]
    fn a_stale_read_is_caught() {
        let v = verdict(vec![
            put(1, (0, 10), "a"),
            put(2, (20, 30), "b"),
            get(3, (40, 50), Some("a")),
        ]);
        assert!(matches!(v, Verdict::NotLinearizable(_)), "{v:?}");
    }

    #[test]
    fn a_lost_acknowledged_write_is_caught() {
        // "b" was acknowledged, then a later read finds nothing.
        let v = verdict(vec![put(1, (0, 10), "b"), get(2, (20, 30), None)]);
        let Verdict::NotLinearizable(detail) = v else {
            panic!("{v:?}")
        };
        assert!(detail.contains("client 2"), "{detail}");
    }

    #[test]
    fn a_value_never_written_is_caught() {
        let v = verdict(vec![put(1, (0, 10), "a"), get(2, (20, 30), Some("zzz"))]);
        assert!(matches!(v, Verdict::NotLinearizable(_)), "{v:?}");
    }

    #[test]
    fn a_compare_and_set_that_cannot_have_held_is_caught() {
        // Both CASes expect "a" and both say they swapped: only one can.
        let v = verdict(vec![
            put(1, (0, 10), "a"),
            cas(2, (20, 30), Some("a"), "b", true),
            cas(3, (40, 50), Some("a"), "c", true),
        ]);
        assert!(matches!(v, Verdict::NotLinearizable(_)), "{v:?}");
        // "Compare failed" while the key held what it expected.
        let v = verdict(vec![put(1, (0, 10), "a"), cas(2, (20, 30), Some("a"), "b", false)]);
        assert!(matches!(v, Verdict::NotLinearizable(_)), "{v:?}");
        // Concurrent CASes where one wins are fine.
        assert_eq!(
            verdict(vec![
                put(1, (0, 10), "a"),
                cas(2, (20, 40), Some("a"), "b", true),
                cas(3, (25, 45), Some("a"), "c", false),
                get(1, (50, 60), Some("b")),
            ]),
            Verdict::Linearizable
        );
    }

    #[test]
    fn indeterminate_writes_may_land_late_or_never() {
        // The unknown put of "b" lands after the read of "a"...
        assert_eq!(
            verdict(vec![
                put(1, (0, 10), "a"),
                unknown(put(2, (5, 15), "b")),
                get(3, (20, 30), Some("a")),
                get(3, (40, 50), Some("b")),
            ]),
            Verdict::Linearizable
        );
        // ... or never.
        assert_eq!(
            verdict(vec![unknown(put(2, (5, 15), "b")), get(3, (40, 50), None)]),
            Verdict::Linearizable
        );
        // But not before it was sent.
        let v = verdict(vec![get(3, (0, 10), Some("b")), unknown(put(2, (20, 30), "b"))]);
        assert!(matches!(v, Verdict::NotLinearizable(_)), "{v:?}");
        // And a write that definitely failed never lands.
        let v = verdict(vec![failed(put(2, (0, 10), "b")), get(3, (20, 30), Some("b"))]);
        assert!(matches!(v, Verdict::NotLinearizable(_)), "{v:?}");
    }

    #[test]
    fn a_search_out_of_time_is_unknown_not_ok() {
        // Many concurrent writes and a read that fits none: the search must
        // try every order, which takes far longer than no time at all.
        let mut records: Vec<Record> = (0..40).map(|i| unknown(put(i, (0, 10), &format!("v{i}")))).collect();
        records.push(get(99, (20, 30), Some("none of them")));
        let refs: Vec<&Record> = records.iter().collect();
        assert_eq!(check_key(&refs, Duration::ZERO), Verdict::Unknown);
    }
}
