//! A group restored from a backup, against what its clients were told and
//! what the lost group applied: the restored group must hold exactly the
//! lost group's state at the backup's revision (each key's last value at or
//! below it, and nothing else), and every write acknowledged before the
//! backup began must be at or below that revision. The writes acknowledged
//! after it are the restore's data loss: listed, so that it is known.
//!
//! It compares puts: a key deleted before the backup and back after the
//! restore would pass. The workloads that use it delete nothing.

use std::collections::BTreeMap;

use crate::Violation;
use crate::history::{History, Outcome, Request};

/// One put the lost group applied, from its own history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedWrite {
    pub key: String,
    pub value: String,
    pub revision: i64,
}

/// What the restore check found.
#[derive(Debug, Default)]
pub struct RestoreReport {
    pub violations: Vec<Violation>,
    /// Acknowledged writes the restored group does not have (applied after
    /// the backup's revision): the known loss.
    pub lost: Vec<AppliedWrite>,
    /// Acknowledged writes at or below the backup's revision.
    pub kept: usize,
}

/// Checks `restored` (every key and value the restored group holds) against
/// the lost group's `applied` puts, the backup's exact `revision`, and the
/// clients' `history`; `backup_began_us` is when the backup was asked for,
/// on the history's clock.
pub fn check(
    history: &History,
    applied: &[AppliedWrite],
    revision: i64,
    backup_began_us: u64,
    restored: &BTreeMap<String, String>,
) -> RestoreReport {
    let mut report = RestoreReport::default();
    let mut held: BTreeMap<&str, &AppliedWrite> = BTreeMap::new();
    for w in applied.iter().filter(|w| w.revision <= revision) {
        if held.get(w.key.as_str()).is_none_or(|h| h.revision < w.revision) {
            held.insert(&w.key, w);
        }
    }
    for (key, w) in &held {
        match restored.get(*key) {
            Some(v) if *v == w.value => {}
            Some(v) => report.violations.push(Violation {
                checker: "restore",
                key: key.to_string(),
                detail: format!(
                    "restored {v:?}, but at revision {revision} the group held {:?} (written at revision {})",
                    w.value, w.revision
                ),
            }),
            None => report.violations.push(Violation {
                checker: "restore",
                key: key.to_string(),
                detail: format!(
                    "missing after the restore; at revision {revision} the group held {:?} (written at revision {})",
                    w.value, w.revision
                ),
            }),
        }
    }
    for (key, v) in restored {
        if !held.contains_key(key.as_str()) {
            report.violations.push(Violation {
                checker: "restore",
                key: key.clone(),
                detail: format!("restored {v:?}, but the key had no value at revision {revision}"),
            });
        }
    }
    let revision_of: BTreeMap<(&str, &str), i64> = applied
        .iter()
        .map(|w| ((w.key.as_str(), w.value.as_str()), w.revision))
        .collect();
    for r in &history.records {
        let value = match (&r.request, &r.outcome) {
            (Request::Put { value }, Outcome::Ok { .. }) => value,
            (
                Request::Cas { new: Some(value), .. },
                Outcome::Ok {
                    swapped: Some(true), ..
                },
            ) => value,
            _ => continue,
        };
        match revision_of.get(&(r.key.as_str(), value.as_str())) {
            Some(&rev) if rev <= revision => report.kept += 1,
            Some(&rev) => {
                if r.complete_us < backup_began_us {
                    report.violations.push(Violation {
                        checker: "restore",
                        key: r.key.clone(),
                        detail: format!(
                            "{value:?} was acknowledged at {} µs, before the backup began at {backup_began_us} µs, but applied at revision {rev}, after the backup's {revision}",
                            r.complete_us
                        ),
                    });
                }
                report.lost.push(AppliedWrite {
                    key: r.key.clone(),
                    value: value.clone(),
                    revision: rev,
                });
            }
            None => report.violations.push(Violation {
                checker: "restore",
                key: r.key.clone(),
                detail: format!("{value:?} was acknowledged but the lost group never applied it"),
            }),
        }
    }
    report.lost.sort_by_key(|w| w.revision);
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Record;

    fn put(key: &str, value: &str, complete_us: u64) -> Record {
        Record {
            client: 0,
            key: key.into(),
            invoke_us: complete_us.saturating_sub(1),
            complete_us,
            request: Request::Put { value: value.into() },
            outcome: Outcome::Ok {
                value: None,
                swapped: None,
                staleness_ms: None,
            },
            idempotency_key: None,
        }
    }

    fn w(key: &str, value: &str, revision: i64) -> AppliedWrite {
        AppliedWrite {
            key: key.into(),
            value: value.into(),
            revision,
        }
    }

    /// Three writes at revisions 2, 3, 4; the backup began at 25 µs (after
    /// the first two were acknowledged) and holds revision 3.
    fn case() -> (History, Vec<AppliedWrite>) {
        let history = History {
            records: vec![put("a", "a1", 10), put("b", "b1", 20), put("a", "a2", 30)],
        };
        (history, vec![w("a", "a1", 2), w("b", "b1", 3), w("a", "a2", 4)])
    }

    fn restored(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_state_at_the_backups_revision_passes_and_the_later_write_is_the_loss() {
        let (h, applied) = case();
        let r = check(&h, &applied, 3, 25, &restored(&[("a", "a1"), ("b", "b1")]));
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.kept, 2);
        assert_eq!(r.lost, vec![w("a", "a2", 4)]);
    }

    #[test]
    fn a_missing_key_a_wrong_value_and_a_phantom_are_each_reported() {
        let (h, applied) = case();
        let r = check(&h, &applied, 3, 25, &restored(&[("a", "a2"), ("c", "x")]));
        let details: Vec<&str> = r.violations.iter().map(|v| v.detail.as_str()).collect();
        assert_eq!(r.violations.len(), 3, "{details:?}");
        assert!(details.iter().any(|d| d.starts_with("restored \"a2\"")), "{details:?}");
        assert!(
            details.iter().any(|d| d.starts_with("missing after the restore")),
            "{details:?}"
        );
        assert!(details.iter().any(|d| d.contains("had no value")), "{details:?}");
    }

    #[test]
    fn a_write_acknowledged_before_the_backup_began_must_be_in_it() {
        let (h, applied) = case();
        // A backup that claims to have begun after all three were
        // acknowledged, but holds only revision 3.
        let r = check(&h, &applied, 3, 35, &restored(&[("a", "a1"), ("b", "b1")]));
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
        assert!(r.violations[0].detail.contains("before the backup began"));
    }

    #[test]
    fn an_acknowledged_write_the_group_never_applied_is_reported() {
        let (mut h, applied) = case();
        h.records.push(put("b", "b9", 5));
        let r = check(&h, &applied, 3, 25, &restored(&[("a", "a1"), ("b", "b1")]));
        assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
        assert!(r.violations[0].detail.contains("never applied"));
    }
}
