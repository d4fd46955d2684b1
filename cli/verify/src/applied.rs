//! What etcd really applied, against what clients were told: the values a
//! key took in etcd's own history (read with a watch from the first
//! revision) must show every acknowledged write exactly once, nothing that
//! was answered "not applied", nothing applied twice (an idempotent retry
//! included), and no value no client wrote. Values are unique per write in
//! the workload, so a value names its write.

use std::collections::BTreeMap;

use crate::Violation;
use crate::history::{History, Outcome, Request};

/// The values each key took in etcd, in commit order.
pub type Applied = BTreeMap<String, Vec<String>>;

/// Checks `history` against `applied`.
pub fn check(history: &History, applied: &Applied) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut told: BTreeMap<(&str, &str), Vec<&crate::Record>> = BTreeMap::new();
    for r in &history.records {
        let written = match &r.request {
            Request::Put { value } => Some(value.as_str()),
            Request::Cas { new: Some(v), .. } => Some(v.as_str()),
            _ => None,
        };
        if let Some(v) = written {
            told.entry((r.key.as_str(), v)).or_default().push(r);
        }
    }
    for (key, values) in applied {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for v in values {
            *counts.entry(v.as_str()).or_default() += 1;
        }
        for (v, n) in &counts {
            if !told.contains_key(&(key.as_str(), *v)) {
                violations.push(Violation {
                    checker: "applied",
                    key: key.clone(),
                    detail: format!("value {v:?} was applied {n} times but no client wrote it"),
                });
            }
        }
    }
    for ((key, value), attempts) in &told {
        let n = applied
            .get(*key)
            .map_or(0, |vs| vs.iter().filter(|v| v.as_str() == *value).count());
        // Attempts with the same value are one logical write (an idempotent
        // retry): applied once if any was acknowledged, never if every one
        // was refused, at most once otherwise.
        let acknowledged = attempts.iter().any(|r| match &r.outcome {
            Outcome::Ok { swapped, .. } => *swapped != Some(false),
            _ => false,
        });
        let maybe = attempts
            .iter()
            .any(|r| matches!(r.outcome, Outcome::Indeterminate { .. }));
        let wrong = if acknowledged {
            (n != 1).then(|| format!("acknowledged, applied {n} times"))
        } else if maybe {
            (n > 1).then(|| format!("outcome unknown, applied {n} times"))
        } else {
            (n != 0).then(|| format!("answered \"not applied\", applied {n} times"))
        };
        if let Some(what) = wrong {
            violations.push(Violation {
                checker: "applied",
                key: key.to_string(),
                detail: format!("write of {value:?} ({} attempts): {what}", attempts.len()),
            });
        }
    }
    violations
}

/// `history` with what etcd's own history settles: an indeterminate write
/// whose value etcd never applied to its key did not take effect, and is
/// marked failed. Only writes that did land stay open for the
/// linearizability search, which is exponential in them (etcd's robustness
/// suite patches its histories from the watch the same way). Sound because
/// values are unique per write: no value applied, no write of it happened.
pub fn resolve(history: &History, applied: &Applied) -> History {
    let mut out = history.clone();
    for r in &mut out.records {
        if !matches!(r.outcome, Outcome::Indeterminate { .. }) {
            continue;
        }
        let written = match &r.request {
            Request::Put { value } => value,
            Request::Cas { new: Some(v), .. } => v,
            _ => continue,
        };
        let landed = applied.get(&r.key).is_some_and(|vs| vs.iter().any(|v| v == written));
        if !landed {
            r.outcome = Outcome::Failed {
                reason: "outcome unknown to its client; etcd never applied its value".into(),
            };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::build::*;

    fn applied(values: &[&str]) -> Applied {
        BTreeMap::from([("k".to_string(), values.iter().map(|v| v.to_string()).collect())])
    }

    #[test]
    fn writes_applied_as_told_pass() {
        let h = History {
            records: vec![
                put(1, (0, 10), "a"),
                unknown(put(2, (20, 30), "b")),
                unknown(put(2, (40, 50), "c")),
                failed(put(3, (60, 70), "d")),
                cas(1, (80, 90), Some("a"), "e", false),
            ],
        };
        assert_eq!(check(&h, &applied(&["a", "c"])), vec![]);
    }

    #[test]
    fn a_lost_write_a_double_apply_and_a_refused_write_that_landed_are_caught() {
        let h = History {
            records: vec![
                put(1, (0, 10), "a"),
                put(1, (20, 30), "b"),
                failed(put(2, (40, 50), "c")),
            ],
        };
        let v = check(&h, &applied(&["b", "b", "c"]));
        let details: Vec<&str> = v.iter().map(|v| v.detail.as_str()).collect();
        assert_eq!(v.len(), 3, "{details:?}");
        assert!(
            details
                .iter()
                .any(|d| d.contains("\"a\"") && d.contains("applied 0 times"))
        );
        assert!(
            details
                .iter()
                .any(|d| d.contains("\"b\"") && d.contains("applied 2 times"))
        );
        assert!(details.iter().any(|d| d.contains("\"c\"") && d.contains("not applied")));
    }

    #[test]
    fn an_idempotent_retry_counts_once_and_a_phantom_value_is_caught() {
        let mut first = unknown(put(1, (0, 10), "a"));
        first.idempotency_key = Some("op-1".into());
        let mut retry = put(1, (20, 30), "a");
        retry.idempotency_key = Some("op-1".into());
        let h = History {
            records: vec![first, retry],
        };
        assert_eq!(check(&h, &applied(&["a"])), vec![]);
        let twice = check(&h, &applied(&["a", "a"]));
        assert_eq!(twice.len(), 1, "{twice:?}");
        let phantom = check(&h, &applied(&["a", "ghost"]));
        assert!(
            phantom.iter().any(|v| v.detail.contains("no client wrote it")),
            "{phantom:?}"
        );
    }

    #[test]
    fn resolving_drops_only_unknown_writes_that_never_landed() {
        let h = History {
            records: vec![
                put(1, (0, 10), "a"),
                unknown(put(2, (20, 30), "b")),
                unknown(put(3, (20, 30), "c")),
                get(1, (40, 50), Some("b")),
            ],
        };
        let r = resolve(&h, &applied(&["a", "b"]));
        assert!(matches!(r.records[1].outcome, Outcome::Indeterminate { .. }));
        assert!(matches!(r.records[2].outcome, Outcome::Failed { .. }));
        // A read of a value whose write never landed is now a violation the
        // unresolved history could explain.
        let h = History {
            records: vec![
                put(1, (0, 10), "a"),
                unknown(put(2, (20, 30), "c")),
                get(1, (40, 50), Some("c")),
            ],
        };
        let limit = std::time::Duration::from_secs(5);
        assert!(crate::linearizable::check(&h, limit).violations.is_empty());
        let resolved = resolve(&h, &applied(&["a"]));
        assert_eq!(crate::linearizable::check(&resolved, limit).violations.len(), 1);
    }
}
