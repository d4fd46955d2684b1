//! Cutting a source's changes into local transactions, and the mark that
//! says how far a mirror got.
//!
//! One source revision per local transaction kept each source transaction
//! atomic in the mirror, but capped catch-up at one local commit per source
//! revision (about a thousand a second here), and a source revision bigger
//! than one local transaction may hold (an idempotency lease expiring
//! deletes thousands of keys at once; a user Txn near the size limit plus
//! the mirror's key prefixes) could never be applied: the mirror wedged.
//! Now whole source revisions are packed into a transaction up to a limit
//! of operations and bytes, so each stays atomic; only a revision that alone
//! exceeds the limit is split, and the applied record then marks progress
//! inside it (`R:n`: revisions before R applied, and the first n events of
//! R), so a restart resumes exactly there. A transaction never writes one
//! key twice (etcd refuses that): a batch ends before a revision that
//! touches a key already in it, except the source's heartbeat key, of which
//! only the newest value is written.

use std::collections::HashSet;
use std::fmt;

use tern_common::SourceRevision;

/// How far a mirror has applied its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub revision: SourceRevision,
    /// None: `revision` is applied whole. Some(n): revisions before it are,
    /// and the first n of its events.
    pub events: Option<usize>,
}

impl Mark {
    pub fn whole(revision: SourceRevision) -> Self {
        Self { revision, events: None }
    }

    /// Parses the applied record: `R` or `R:n`.
    pub fn parse(text: &str) -> Option<Self> {
        match text.split_once(':') {
            None => Some(Self::whole(SourceRevision(text.parse().ok()?))),
            Some((r, n)) => Some(Self {
                revision: SourceRevision(r.parse().ok()?),
                events: Some(n.parse().ok()?),
            }),
        }
    }

    /// The newest revision applied whole.
    pub fn complete(&self) -> SourceRevision {
        match self.events {
            None => self.revision,
            Some(_) => SourceRevision(self.revision.0 - 1),
        }
    }

    /// Where a watch resumes.
    pub fn resume(&self) -> SourceRevision {
        self.complete().next()
    }

    /// Events of `revision` already applied (to skip when they come again).
    fn skip(&self, revision: SourceRevision) -> usize {
        match self.events {
            Some(n) if revision == self.revision => n,
            _ => 0,
        }
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.events {
            None => write!(f, "{}", self.revision),
            Some(n) => write!(f, "{}:{n}", self.revision),
        }
    }
}

/// One event of a source revision, as the planner needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: Vec<u8>,
    /// None: a delete.
    pub value: Option<Vec<u8>>,
    /// False for keys mirrors skip (they still count as events of their
    /// revision, so that a resume skips them too).
    pub mirrored: bool,
}

/// The most one local transaction may carry.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub ops: usize,
    pub bytes: usize,
    /// Bytes each mirrored key gains (its `/tern/r/{source}` prefix).
    pub prefix: usize,
}

impl Limits {
    /// Within etcd's --max-txn-ops (tern runs 1024) and --max-request-bytes
    /// (1.5 MiB by default), with room for the applied and closed records.
    pub fn for_prefix(prefix: usize) -> Self {
        Self {
            ops: 1000,
            bytes: 1024 * 1024,
            prefix,
        }
    }

    fn cost(&self, c: &Change) -> (usize, usize) {
        if c.mirrored {
            (1, self.prefix + c.key.len() + c.value.as_ref().map_or(0, Vec::len) + 16)
        } else {
            (0, 0)
        }
    }
}

/// One local transaction: mirrored changes (each key once) and the mark it
/// moves the applied record to.
#[derive(Debug, Default)]
pub struct Batch {
    pub changes: Vec<Change>,
    /// Values of the source heartbeats it carries, oldest first.
    pub heartbeats: Vec<Vec<u8>>,
    /// Source revisions it applies (whole or in part).
    pub revisions: Vec<SourceRevision>,
    pub mark: Option<Mark>,
    ops: usize,
    bytes: usize,
    keys: HashSet<Vec<u8>>,
}

impl Batch {
    fn fits(&self, ops: usize, bytes: usize, limits: &Limits) -> bool {
        self.ops + ops <= limits.ops && self.bytes + bytes <= limits.bytes
    }

    fn touches(&self, changes: &[Change], heartbeat_key: &[u8]) -> bool {
        changes
            .iter()
            .any(|c| c.mirrored && c.key != heartbeat_key && self.keys.contains(&c.key))
    }

    fn add(&mut self, change: &Change, heartbeat_key: &[u8], limits: &Limits) {
        if !change.mirrored {
            return;
        }
        let (ops, bytes) = limits.cost(change);
        if change.key == heartbeat_key {
            if let Some(v) = &change.value {
                self.heartbeats.push(v.clone());
            }
            // Only the newest heartbeat is written.
            if let Some(i) = self.changes.iter().position(|c| c.key == heartbeat_key) {
                self.changes[i] = change.clone();
                return;
            }
        }
        self.keys.insert(change.key.clone());
        self.changes.push(change.clone());
        self.ops += ops;
        self.bytes += bytes;
    }

    fn note(&mut self, revision: SourceRevision, mark: Mark) {
        if self.revisions.last() != Some(&revision) {
            self.revisions.push(revision);
        }
        self.mark = Some(mark);
    }
}

/// Cuts `revisions` (in order, each with all its events) into local
/// transactions, starting after `after`.
pub fn plan(
    revisions: &[(SourceRevision, Vec<Change>)],
    after: &Mark,
    heartbeat_key: &[u8],
    limits: &Limits,
) -> Vec<Batch> {
    let mut out = Vec::new();
    let mut cur = Batch::default();
    for (revision, events) in revisions {
        if *revision < after.resume() {
            continue;
        }
        let skip = after.skip(*revision).min(events.len());
        let rest = &events[skip..];
        let (ops, bytes) = rest.iter().fold((0, 0), |(o, b), c| {
            let (co, cb) = limits.cost(c);
            (o + co, b + cb)
        });
        if (!cur.fits(ops, bytes, limits) || cur.touches(rest, heartbeat_key)) && cur.mark.is_some() {
            out.push(std::mem::take(&mut cur));
        }
        if cur.fits(ops, bytes, limits) {
            for c in rest {
                cur.add(c, heartbeat_key, limits);
            }
            cur.note(*revision, Mark::whole(*revision));
            continue;
        }
        // Alone too big for one transaction: split, marking progress inside.
        for (i, c) in rest.iter().enumerate() {
            let (o, b) = limits.cost(c);
            if !cur.fits(o, b, limits) && cur.mark.is_some() {
                out.push(std::mem::take(&mut cur));
            }
            cur.add(c, heartbeat_key, limits);
            cur.note(
                *revision,
                Mark {
                    revision: *revision,
                    events: Some(skip + i + 1),
                },
            );
        }
        cur.note(*revision, Mark::whole(*revision));
    }
    if cur.mark.is_some() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: &[u8] = b"/tern/hb/eu-west";

    fn put(key: &str, size: usize) -> Change {
        Change {
            key: key.as_bytes().to_vec(),
            value: Some(vec![b'x'; size]),
            mirrored: true,
        }
    }

    fn rev(r: i64, changes: Vec<Change>) -> (SourceRevision, Vec<Change>) {
        (SourceRevision(r), changes)
    }

    fn limits() -> Limits {
        Limits {
            ops: 10,
            bytes: 1000,
            prefix: 0,
        }
    }

    #[test]
    fn marks_parse_and_print() {
        for text in ["42", "42:7"] {
            assert_eq!(Mark::parse(text).expect("parses").to_string(), text);
        }
        assert_eq!(Mark::parse("42:7").expect("parses").resume(), SourceRevision(42));
        assert_eq!(Mark::parse("42").expect("parses").resume(), SourceRevision(43));
        assert_eq!(Mark::parse("x"), None);
        assert_eq!(Mark::parse("4:y"), None);
    }

    #[test]
    fn whole_revisions_share_a_transaction_up_to_the_limits() {
        let revisions: Vec<_> = (1..=25).map(|r| rev(r, vec![put(&format!("k{r}"), 10)])).collect();
        let batches = plan(&revisions, &Mark::whole(SourceRevision(0)), HB, &limits());
        assert_eq!(batches.len(), 3);
        assert_eq!(batches[0].changes.len(), 10);
        assert_eq!(batches[0].mark, Some(Mark::whole(SourceRevision(10))));
        assert_eq!(batches[2].mark, Some(Mark::whole(SourceRevision(25))));
        // Resuming after 20 plans only 21..=25.
        let rest = plan(&revisions, &Mark::whole(SourceRevision(20)), HB, &limits());
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].revisions.first(), Some(&SourceRevision(21)));
    }

    #[test]
    fn a_key_written_again_starts_a_new_transaction_but_heartbeats_collapse() {
        let revisions = vec![
            rev(1, vec![put("a", 1)]),
            rev(2, vec![put(std::str::from_utf8(HB).expect("utf8"), 1)]),
            rev(3, vec![put("b", 1)]),
            rev(4, vec![put(std::str::from_utf8(HB).expect("utf8"), 2)]),
            rev(5, vec![put("a", 3)]),
        ];
        let batches = plan(&revisions, &Mark::whole(SourceRevision(0)), HB, &limits());
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].mark, Some(Mark::whole(SourceRevision(4))));
        assert_eq!(batches[0].heartbeats.len(), 2);
        let hb: Vec<_> = batches[0].changes.iter().filter(|c| c.key == HB).collect();
        assert_eq!(hb.len(), 1, "one write of the heartbeat key");
        assert_eq!(hb[0].value.as_ref().map(Vec::len), Some(2), "the newest");
        assert_eq!(batches[1].changes, vec![put("a", 3)]);
    }

    #[test]
    fn a_revision_too_big_alone_is_split_with_marks_inside_it() {
        let big: Vec<Change> = (0..25).map(|i| put(&format!("lease-{i}"), 1)).collect();
        let revisions = vec![rev(7, vec![put("a", 1)]), rev(8, big), rev(9, vec![put("b", 1)])];
        let batches = plan(&revisions, &Mark::whole(SourceRevision(6)), HB, &limits());
        let marks: Vec<String> = batches.iter().map(|b| b.mark.expect("mark").to_string()).collect();
        assert_eq!(marks, ["7", "8:10", "8:20", "9"]);
        assert!(batches.iter().all(|b| b.changes.len() <= 10));
        // A restart after "8:20" resumes inside revision 8.
        let mark = Mark::parse("8:20").expect("mark");
        let again = plan(&revisions, &mark, HB, &limits());
        assert_eq!(again[0].changes.first(), Some(&put("lease-20", 1)));
        let total: usize = again.iter().map(|b| b.changes.len()).sum();
        assert_eq!(total, 5 + 1);
    }

    #[test]
    fn bytes_limit_too() {
        let revisions = vec![rev(1, vec![put("a", 600)]), rev(2, vec![put("b", 600)])];
        let batches = plan(&revisions, &Mark::whole(SourceRevision(0)), HB, &limits());
        assert_eq!(batches.len(), 2);
    }
}
