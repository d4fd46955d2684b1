//! Writes lost with a region, reconciled with the history before it is
//! judged. When a run loses a region, the region's successor never had some
//! of what the region committed, and the region reports exactly those in
//! its quarantine when it returns (docs/failover.md). So:
//!
//! - the quarantine must hold exactly what the failed region's group
//!   applied after the successor's mirror stopped, by etcd's own history
//!   (`check_stopped`: no fewer, no more);
//! - the checkers then see the quarantined writes as not applied (they are
//!   gone from the successor's lineage);
//! - every quarantined write must be one a client asked for, and none the
//!   client was told was *not* applied;
//! - reads that returned a quarantined value (the failed region served them
//!   before it was lost) are counted and left out: they saw data that was
//!   later lost, which is what a failover with data loss means. So are
//!   compare-and-sets whose compare failed on a key with lost writes and
//!   that were still running when the first of them was sent, or began
//!   after: a failed compare does not say what it saw, and it may have been
//!   a lost value (`tern verify` seed 200; CI's seed 0 had one sent just
//!   before the lost write and answered after it).
//!
//! Values are unique per write (`c{client}-{n}`), which is how quarantined
//! writes are matched to the history; runs that lose a region write no
//! deletes for that reason.

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::GetOptions;
use tern_common::{DIR_QUARANTINE, QuarantinedWrite};
use tern_local::LocalDeployment;
use tern_verify::{History, Outcome, Request, Violation};

use crate::CliError;

/// What a run lost with its region, as reconciled.
#[derive(Clone, Debug, Default)]
pub struct Lost {
    /// Writes in the quarantine.
    pub quarantined: usize,
    /// Of those, acknowledged to their client.
    pub acknowledged: usize,
    /// Of those, with an outcome the client never learned.
    pub unknown: usize,
    /// Reads that had returned a value later lost, and compare-and-sets
    /// whose compare failed when one may have been current.
    pub reads_of_lost: usize,
    pub violations: Vec<Violation>,
}

/// Where a successor's mirror of a failed region stopped: the failed
/// region's revisions up to `complete` were applied whole, and `partial`
/// names a revision applied only in part.
#[derive(Clone, Debug)]
pub struct Stopped {
    pub region: String,
    pub complete: i64,
    pub partial: Option<i64>,
}

/// Reads where each of `regions`' successors' mirrors stopped (the
/// successor from the region's record, the mark from its group).
pub async fn stopped(d: &LocalDeployment, regions: &[String]) -> Result<Vec<Stopped>, CliError> {
    let mut out = Vec::new();
    for region in regions {
        let name = tern_common::RegionName::new(region).map_err(|e| CliError::Setup(e.to_string()))?;
        let record = d
            .directory_client()
            .await
            .get(tern_common::dir_region_key(&name), None)
            .await
            .ok()
            .and_then(|r| serde_json::from_slice::<tern_common::RegionRecord>(r.kvs().first()?.value()).ok());
        let Some(successor) = record.and_then(|r| r.successor) else {
            continue;
        };
        let mark = d
            .group_client(successor.as_str())
            .await
            .get(tern_common::mirror_applied_key(&name), None)
            .await
            .ok()
            .and_then(|r| Some(String::from_utf8_lossy(r.kvs().first()?.value()).into_owned()));
        let Some(mark) = mark else { continue };
        let stop = match mark.split_once(':') {
            None => mark.parse().ok().map(|r: i64| (r, None)),
            Some((r, _)) => r.parse().ok().map(|r: i64| (r - 1, Some(r))),
        };
        if let Some((complete, partial)) = stop {
            out.push(Stopped {
                region: region.clone(),
                complete,
                partial,
            });
        }
    }
    Ok(out)
}

/// The quarantine against etcd's own history: every write a failed
/// region's group applied after its successor's mirror stopped must be in
/// the quarantine ("no fewer"), and none applied before it ("no more").
/// Writes of a revision the mirror applied only in part are not judged.
pub fn check_stopped(
    home_writes: &[(String, String, String, i64)],
    stopped: &[Stopped],
    quarantined: &[QuarantinedWrite],
) -> Vec<Violation> {
    let listed: BTreeSet<(String, String)> = quarantined
        .iter()
        .filter_map(|q| Some((format!("{}/{}", q.account, q.key), q.value.clone()?)))
        .collect();
    let mut out = Vec::new();
    for s in stopped {
        for (group, key, value, revision) in home_writes.iter().filter(|w| w.0 == s.region) {
            if s.partial == Some(*revision) {
                continue;
            }
            let after = *revision > s.complete;
            let is_listed = listed.contains(&(key.clone(), value.clone()));
            if after && !is_listed {
                out.push(Violation {
                    checker: "quarantine",
                    key: key.clone(),
                    detail: format!(
                        "{group} applied {value} at revision {revision}, after its successor's mirror stopped at {}, and it is not quarantined",
                        s.complete
                    ),
                });
            }
            if !after && is_listed {
                out.push(Violation {
                    checker: "quarantine",
                    key: key.clone(),
                    detail: format!(
                        "{value} is quarantined, but {group} applied it at revision {revision}, which its successor's mirror had (up to {})",
                        s.complete
                    ),
                });
            }
        }
    }
    out
}

/// Every quarantined write in the directory.
pub async fn read_quarantine(d: &LocalDeployment) -> Result<Vec<QuarantinedWrite>, CliError> {
    let found = d
        .directory_client()
        .await
        .get(DIR_QUARANTINE, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|source| CliError::EtcdRequest {
            what: "reading the quarantine".into(),
            source,
        })?;
    Ok(found
        .kvs()
        .iter()
        .filter(|kv| !kv.key().ends_with(b"/summary"))
        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
        .collect())
}

/// Marks the quarantined writes in `history` as not applied, removes them
/// from `applied`, leaves out reads of them, and says what did not match.
pub fn reconcile(
    history: &mut History,
    applied: &mut tern_verify::applied::Applied,
    quarantined: &[QuarantinedWrite],
) -> Lost {
    let mut lost = Lost {
        quarantined: quarantined.len(),
        ..Lost::default()
    };
    let mut values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for q in quarantined {
        let key = format!("{}/{}", q.account, q.key);
        match &q.value {
            Some(v) if !q.deleted => {
                values.entry(key).or_default().insert(v.clone());
            }
            _ => lost.violations.push(Violation {
                checker: "quarantine",
                key,
                detail: format!(
                    "revision {}: a delete or a binary value was quarantined, which this workload never writes",
                    q.revision
                ),
            }),
        }
    }
    // When the first write later lost was sent, per key.
    let mut first_lost: BTreeMap<String, u64> = BTreeMap::new();
    for r in &history.records {
        let written = match &r.request {
            Request::Put { value } | Request::Cas { new: Some(value), .. } => Some(value),
            _ => None,
        };
        if let Some(v) = written
            && values.get(&r.key).is_some_and(|vs| vs.contains(v))
        {
            let first = first_lost.entry(r.key.clone()).or_insert(r.invoke_us);
            *first = (*first).min(r.invoke_us);
        }
    }
    let mut asked: BTreeSet<(String, String)> = BTreeSet::new();
    history.records.retain_mut(|r| {
        let Some(lost_values) = values.get(&r.key) else {
            return true;
        };
        let written = match &r.request {
            Request::Put { value } => Some(value),
            Request::Cas { new: Some(value), .. } => Some(value),
            _ => None,
        };
        if let Some(value) = written.filter(|v| lost_values.contains(*v)) {
            asked.insert((r.key.clone(), value.clone()));
            match &r.outcome {
                Outcome::Ok { .. } => lost.acknowledged += 1,
                Outcome::Indeterminate { .. } => lost.unknown += 1,
                Outcome::Failed { reason } => lost.violations.push(Violation {
                    checker: "quarantine",
                    key: r.key.clone(),
                    detail: format!(
                        "{value} is quarantined (its region committed it) but its client was told it was not applied: {reason}"
                    ),
                }),
            }
            r.outcome = Outcome::Failed {
                reason: "lost with its region; listed in its quarantine".into(),
            };
            return true;
        }
        let read_lost = matches!(&r.request, Request::Get | Request::GetBounded { .. })
            && matches!(&r.outcome, Outcome::Ok { value: Some(v), .. } if lost_values.contains(v));
        // A compare that failed while or after the first lost write was
        // sent may have compared against it (the two ran concurrently: CI
        // found a CAS sent just before a lost write and answered after it).
        let compare_failed_after_a_loss = matches!(&r.request, Request::Cas { .. })
            && matches!(&r.outcome, Outcome::Ok { swapped: Some(false), .. })
            && first_lost.get(&r.key).is_some_and(|first| r.complete_us >= *first);
        let read_lost = read_lost || compare_failed_after_a_loss;
        if read_lost {
            lost.reads_of_lost += 1;
        }
        !read_lost
    });
    for (key, vs) in &values {
        for v in vs {
            if !asked.contains(&(key.clone(), v.clone())) {
                lost.violations.push(Violation {
                    checker: "quarantine",
                    key: key.clone(),
                    detail: format!("{v} is quarantined but no client wrote it"),
                });
            }
        }
        if let Some(list) = applied.get_mut(key) {
            list.retain(|a| !vs.contains(a));
        }
    }
    lost
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_verify::Record;

    fn put(client: u32, value: &str, outcome: Outcome) -> Record {
        Record {
            client,
            key: "a/k".into(),
            invoke_us: 0,
            complete_us: 1,
            request: Request::Put { value: value.into() },
            outcome,
            idempotency_key: None,
        }
    }

    fn ok() -> Outcome {
        Outcome::Ok {
            value: None,
            swapped: None,
            staleness_ms: None,
        }
    }

    fn q(value: &str) -> QuarantinedWrite {
        QuarantinedWrite {
            account: "a".into(),
            key: "k".into(),
            value: Some(value.into()),
            value_hex: None,
            deleted: false,
            revision: 9,
            committed_after_ms: None,
        }
    }

    #[test]
    fn the_quarantine_must_hold_exactly_what_the_failed_region_applied_after_the_mirror_stopped() {
        let writes = vec![
            ("us-east".to_string(), "a/k".to_string(), "c1-1".to_string(), 10),
            ("us-east".to_string(), "a/k".to_string(), "c1-2".to_string(), 12),
            ("us-east".to_string(), "a/k".to_string(), "c1-3".to_string(), 13),
            ("eu-west".to_string(), "a/k".to_string(), "c1-9".to_string(), 99),
        ];
        let stopped = [Stopped {
            region: "us-east".into(),
            complete: 11,
            partial: None,
        }];
        assert!(check_stopped(&writes, &stopped, &[q("c1-2"), q("c1-3")]).is_empty());
        let too_few = check_stopped(&writes, &stopped, &[q("c1-2")]);
        assert!(
            too_few.len() == 1 && too_few[0].detail.contains("not quarantined"),
            "{too_few:?}"
        );
        let too_many = check_stopped(&writes, &stopped, &[q("c1-1"), q("c1-2"), q("c1-3")]);
        assert!(
            too_many.len() == 1 && too_many[0].detail.contains("mirror had"),
            "{too_many:?}"
        );
    }

    #[test]
    fn quarantined_writes_become_not_applied_and_mismatches_are_violations() {
        let mut history = History {
            records: vec![
                put(1, "c1-1", ok()),
                put(1, "c1-2", ok()),
                put(
                    2,
                    "c2-1",
                    Outcome::Failed {
                        reason: "refused".into(),
                    },
                ),
                Record {
                    request: Request::Get,
                    outcome: Outcome::Ok {
                        value: Some("c1-2".into()),
                        swapped: None,
                        staleness_ms: None,
                    },
                    ..put(3, "", ok())
                },
            ],
        };
        let mut applied = BTreeMap::from([("a/k".to_string(), vec!["c1-1".to_string(), "c1-2".to_string()])]);
        // A compare that failed once a lost write may have been current.
        history.records.push(Record {
            request: Request::Cas {
                expect: Some("c1-1".into()),
                new: Some("c4-1".into()),
            },
            outcome: Outcome::Ok {
                value: None,
                swapped: Some(false),
                staleness_ms: None,
            },
            invoke_us: 5,
            complete_us: 6,
            ..put(4, "", ok())
        });
        let lost = reconcile(&mut history, &mut applied, &[q("c1-2"), q("c2-1"), q("c9-9")]);
        assert_eq!((lost.quarantined, lost.acknowledged, lost.reads_of_lost), (3, 1, 2));
        assert_eq!(applied["a/k"], ["c1-1"]);
        assert_eq!(
            history.records.len(),
            3,
            "the read of a lost value and the failed compare are left out"
        );
        assert!(matches!(history.records[1].outcome, Outcome::Failed { .. }));
        let details: Vec<&str> = lost.violations.iter().map(|v| v.detail.as_str()).collect();
        assert_eq!(details.len(), 2, "{details:?}");
        assert!(details.iter().any(|d| d.contains("told it was not applied")));
        assert!(details.iter().any(|d| d.contains("no client wrote it")));
    }
}
