//! Raft membership changes of a region's data group: how a group of N etcd
//! members becomes a group of M without ever dropping below quorum.
//!
//! A StatefulSet cannot do this alone. A pod it adds would bootstrap a new
//! cluster of its own, and a pod it removes would stay a Raft voter, so a
//! 5→3 shrink would leave five voters with three members. The operator
//! therefore moves one member at a time, with Raft first:
//!
//! - grow: add the next ordinal as a *learner* (it does not count towards
//!   quorum), start its pod (it joins with `initial-cluster-state=existing`),
//!   promote it once etcd says it has caught up;
//! - shrink: move leadership off the highest ordinal if it leads, remove it
//!   from Raft, then stop its pod (its volume goes with it: a removed
//!   member's data can never rejoin).
//!
//! `plan` decides the next step from what etcd reports and how many pods
//! run; it keeps no state of its own, so an operator restarted in the
//! middle of a change (or a new leader replica) resumes where the group is.
//! `observe` and `execute` are the etcd side, against real members.

use std::time::Duration;

use etcd_client::{Client, MemberAddOptions};
use tern_common::tls::Tls;

use crate::{Error, Result};

/// How long one etcd call of a step may take: a membership change commits
/// through Raft inside one region.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// One member as etcd's member list reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftMember {
    pub id: u64,
    /// Empty for a member that was added but has not started yet.
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub learner: bool,
}

/// The group's membership and its leader, as one member saw them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub members: Vec<RaftMember>,
    /// The member id of the leader (0: none known).
    pub leader: u64,
}

/// The next thing to do. One step per reconcile; each is safe to repeat
/// after a crash (a repeated add fails as "already a member", and the next
/// observation sees the member and moves on).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The group has the members it should: nothing to do.
    Steady,
    /// Add ordinal `ordinal` as a learner, at `peer_url`.
    AddLearner { ordinal: i32, peer_url: String },
    /// Run `replicas` pods, so that the added member's pod starts.
    StartPod { replicas: i32 },
    /// Promote the learner at `ordinal` to a voter once it has caught up.
    Promote { ordinal: i32, id: u64 },
    /// Hand leadership to member `to` before the leader is removed.
    MoveLeader { from: u64, to: u64 },
    /// Remove ordinal `ordinal` from Raft.
    Remove { ordinal: i32, id: u64 },
    /// Run `replicas` pods: the removed member's pod stops.
    StopPod { replicas: i32 },
    /// Delete the volume of the member at `ordinal`, removed from Raft to be
    /// replaced: its pod may have started on it while etcd still counted
    /// the member, and written a log under the old id that the member
    /// added back could never start from.
    ClearVolume { ordinal: i32 },
    /// Restart the pod of the member at `ordinal` (a replaced member added
    /// back: its pod, failing on an empty volume, starts again with the
    /// membership it joins).
    RestartPod { ordinal: i32 },
}

impl Step {
    /// What the step does, for the status, events and logs.
    pub fn describe(&self, group: &str) -> String {
        match self {
            Self::Steady => "no membership change".to_string(),
            Self::AddLearner { ordinal, .. } => format!("adding {group}-{ordinal} as a learner"),
            Self::StartPod { replicas } => format!("starting the pod of {group}-{}", replicas - 1),
            Self::Promote { ordinal, .. } => format!("promoting {group}-{ordinal} to a voter once it has caught up"),
            Self::MoveLeader { .. } => "moving leadership off the member to be removed".to_string(),
            Self::Remove { ordinal, .. } => format!("removing {group}-{ordinal} from the Raft group"),
            Self::StopPod { replicas } => format!("stopping the pod of removed member {group}-{replicas}"),
            Self::RestartPod { ordinal } => format!("restarting the pod of {group}-{ordinal} to join as a learner"),
            Self::ClearVolume { ordinal } => {
                format!("deleting the volume of {group}-{ordinal} so that it joins on an empty one")
            }
        }
    }
}

/// The most ordinals a group can have (the schema allows up to 7 members;
/// a change in progress holds one more).
const MAX_ORDINALS: i32 = 16;

/// Ordinals given to the members of a directory share's group that are
/// not the share's own (the other regions' shares), above any of its own:
/// they are counted for quorum and leadership, never started or stopped
/// from here.
pub const OTHERS_FROM: i32 = 1000;

/// Every ordinal a member may have: a group's own, then the other shares'.
fn ordinals() -> impl Iterator<Item = i32> {
    (0..MAX_ORDINALS).chain(OTHERS_FROM..OTHERS_FROM + tern_common::limits::MAX_GROUP_MEMBERS)
}

/// The next step that takes the group towards `desired` members, given the
/// membership etcd reports, the number of pods running now (`pods`) and the
/// peer URL of each ordinal.
pub fn plan(membership: &Membership, pods: i32, desired: i32, peer_url: impl Fn(i32) -> String) -> Result<Step> {
    let mut voters = Vec::new();
    let mut learners = Vec::new();
    for m in &membership.members {
        let ordinal = ordinal_of(m, &peer_url).ok_or_else(|| {
                refused(format!(
                    "member {:?} (peer URLs {:?}) is not one of this group's pods; tern changes the membership only of groups it alone manages: remove it with etcdctl first",
                    m.name, m.peer_urls
                ))
            })?;
        if m.learner {
            learners.push((ordinal, m.id));
        } else {
            voters.push((ordinal, m.id));
        }
    }
    voters.sort_unstable();
    learners.sort_unstable();
    if learners.len() > 1 {
        let ordinals: Vec<i32> = learners.iter().map(|l| l.0).collect();
        return Err(refused(format!(
            "more than one learner (ordinals {ordinals:?}): tern adds one member at a time; remove all but one with etcdctl"
        )));
    }
    let count = voters.len();
    if voters.iter().enumerate().any(|(i, (o, _))| *o != i as i32)
        || learners.first().is_some_and(|(o, _)| *o != count as i32)
    {
        let mut ordinals: Vec<i32> = voters.iter().chain(&learners).map(|v| v.0).collect();
        ordinals.sort_unstable();
        return Err(refused(format!(
            "the members are ordinals {ordinals:?}, not 0..{count} with at most a learner after them: a member was added or removed by hand; restore it before tern resizes the group"
        )));
    }
    let count = count as i32;

    if let Some(&(ordinal, id)) = learners.first() {
        // A learner is half of a grow step: finish it, or take it back if
        // the group is no longer to grow (a learner never counts towards
        // quorum, so removing it is always safe).
        return Ok(if ordinal >= desired {
            Step::Remove { ordinal, id }
        } else if pods <= ordinal {
            Step::StartPod { replicas: ordinal + 1 }
        } else {
            Step::Promote { ordinal, id }
        });
    }
    if pods < count {
        // A voter without a pod: bring it back before anything else.
        return Ok(Step::StartPod { replicas: count });
    }
    if pods > count {
        // A removed member's pod: stop it now (etcd has shut it down).
        return Ok(Step::StopPod { replicas: count });
    }
    if count < desired {
        return Ok(Step::AddLearner {
            ordinal: count,
            peer_url: peer_url(count),
        });
    }
    if count > desired {
        let (_, last) = voters[voters.len() - 1];
        if last == membership.leader {
            let (_, first) = voters[0];
            return Ok(Step::MoveLeader { from: last, to: first });
        }
        return Ok(Step::Remove {
            ordinal: count - 1,
            id: last,
        });
    }
    Ok(Step::Steady)
}

/// The next step of replacing the member at `ordinal`, whose volume was
/// lost: etcd still counts it, and it cannot come back on an empty volume
/// (started with `new`, etcd refuses a member already bootstrapped; with
/// `existing`, it takes the old id with an empty log, which the leader's
/// next append makes it abandon). It is removed from Raft, its volume
/// cleared unless `fresh` (made since the removal: no pod can have
/// written to it as the old member), added back at its address as a
/// learner, its pod restarted to join, and promoted once caught up;
/// `Steady` once a voter with a new id is at its address. `removed` is the
/// id it had, once its removal is recorded; `restarted`, whether its pod
/// has been restarted since it was added back.
///
/// Only a group that keeps a quorum without the member can do this: with
/// fewer than three members, a lost volume is a lost group, restored from
/// a backup.
pub fn plan_replacement(
    membership: &Membership,
    ordinal: i32,
    removed: Option<u64>,
    fresh: bool,
    restarted: bool,
    peer_url: impl Fn(i32) -> String,
) -> Result<Step> {
    let mut at = None;
    let mut others = Vec::new();
    for m in &membership.members {
        match ordinal_of(m, &peer_url) {
            Some(o) if o == ordinal => at = Some(m),
            Some(_) if !m.learner => others.push(m.id),
            Some(_) => {
                return Err(refused(format!(
                    "a learner ({:?}) is in the group: one change of the members at a time; the replacement of ordinal {ordinal} waits until it is promoted or removed",
                    m.name
                )));
            }
            None => {
                return Err(refused(format!(
                    "member {:?} (peer URLs {:?}) is not one of this group's pods; tern replaces members only of groups it alone manages: remove it with etcdctl first",
                    m.name, m.peer_urls
                )));
            }
        }
    }
    if others.len() < 2 {
        return Err(refused(format!(
            "the group has {} other voters: without the member at ordinal {ordinal} it has no quorum, so the member cannot be replaced; restore the group from a backup (docs/backup.md)",
            others.len()
        )));
    }
    Ok(match at {
        // The member as it was: its data is gone, so it goes.
        Some(m) if removed.is_none_or(|id| id == m.id) => {
            // It cannot lead: it has not run since its volume went. The
            // others have not noticed yet, and elect another leader within
            // an election timeout.
            if m.id == membership.leader {
                return Err(refused(format!(
                    "the others still name ordinal {ordinal} their leader: waiting for them to elect another"
                )));
            }
            Step::Remove { ordinal, id: m.id }
        }
        Some(m) if m.learner => {
            if m.name.is_empty() && !restarted {
                Step::RestartPod { ordinal }
            } else {
                Step::Promote { ordinal, id: m.id }
            }
        }
        Some(_) => Step::Steady,
        None if !fresh => Step::ClearVolume { ordinal },
        None => Step::AddLearner {
            ordinal,
            peer_url: peer_url(ordinal),
        },
    })
}

/// The ordinal of a member, by its peer URL.
fn ordinal_of(m: &RaftMember, peer_url: &impl Fn(i32) -> String) -> Option<i32> {
    ordinals().find(|o| m.peer_urls.contains(&peer_url(*o)))
}

/// The `--initial-cluster` a joining member needs: the group's members
/// after the add, itself included, each as `name=peer URL` (etcd checks
/// that this list is exactly the membership it finds). A member added but
/// not started has no name in etcd yet: `name_of` its ordinal gives it.
pub fn initial_cluster(
    membership: &Membership,
    name_of: impl Fn(i32) -> String,
    peer_url: impl Fn(i32) -> String,
) -> Vec<tern_crds::ClusterMember> {
    let mut members: Vec<(i32, tern_crds::ClusterMember)> = membership
        .members
        .iter()
        .filter_map(|m| {
            let o = ordinal_of(m, &peer_url)?;
            Some((
                o,
                tern_crds::ClusterMember {
                    name: name_of(o),
                    peer_url: peer_url(o),
                },
            ))
        })
        .collect();
    members.sort_by_key(|(o, _)| *o);
    members.into_iter().map(|(_, m)| m).collect()
}

/// A step's etcd call that could not be made or was refused: retried on
/// the next reconcile.
fn refused(reason: String) -> Error {
    Error::Membership { reason }
}

/// What went wrong, without the "membership change" prefix (for messages
/// that already say what they are about).
pub fn reason(e: Error) -> String {
    match e {
        Error::Membership { reason } => reason,
        e => e.to_string(),
    }
}

/// How a step went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    Done,
    /// Nothing went wrong, but the step has to wait (a learner catching up).
    Waiting(String),
}

async fn connect(endpoints: &[String], tls: Option<&Tls>) -> Result<Client> {
    if endpoints.is_empty() {
        return Err(refused("no member to ask: none has a client URL".into()));
    }
    tern_common::etcd::client(endpoints, tls, Some(CALL_TIMEOUT))
        .await
        .map_err(|e| refused(format!("cannot reach the group at {endpoints:?}: {e}")))
}

/// The group's membership and leader, asked of the first of `endpoints`
/// that answers. One at a time: a learner among them refuses most calls.
pub async fn observe(endpoints: &[String], tls: Option<&Tls>) -> Result<Membership> {
    let mut why = Vec::new();
    for endpoint in endpoints {
        match observe_one(endpoint, tls).await {
            Ok((m, answered_by)) => {
                // A follower's list can lag the leader's for a moment (a
                // step just taken not applied there yet): ask the leader.
                let leader = m.members.iter().find(|l| l.id == m.leader && l.id != answered_by);
                if let Some(url) = leader.and_then(|l| l.client_urls.first())
                    && let Ok((fresh, _)) = observe_one(url, tls).await
                {
                    return Ok(fresh);
                }
                return Ok(m);
            }
            Err(e) => why.push(format!("{endpoint}: {}", reason(e))),
        }
    }
    Err(refused(format!("cannot read the group's members: {}", why.join("; "))))
}

/// The membership as `endpoint` sees it, and that member's id.
async fn observe_one(endpoint: &str, tls: Option<&Tls>) -> Result<(Membership, u64)> {
    let mut client = connect(&[endpoint.to_string()], tls).await?;
    let list = client.member_list().await.map_err(|e| refused(e.to_string()))?;
    let status = client.status().await.map_err(|e| refused(e.to_string()))?;
    let members = list
        .members()
        .iter()
        .map(|m| RaftMember {
            id: m.id(),
            name: m.name().to_string(),
            peer_urls: m.peer_urls().to_vec(),
            client_urls: m.client_urls().to_vec(),
            learner: m.is_learner(),
        })
        .collect();
    let answered_by = status.header().map_or(0, |h| h.member_id());
    Ok((
        Membership {
            members,
            leader: status.leader(),
        },
        answered_by,
    ))
}

/// Whether the member at `url` answers as member `id` and has applied at
/// least nine tenths of what a member at one of `others` has (etcd's own
/// bar for promoting a learner): a member that serves with its data, not
/// one that lost it, whatever its volume's claim says.
pub async fn serves(url: &str, id: u64, others: &[String], tls: Option<&Tls>) -> bool {
    let applied = async |urls: &[String]| -> Option<(u64, u64)> {
        let mut c = connect(urls, tls).await.ok()?;
        let s = c.status().await.ok()?;
        Some((s.header().map_or(0, |h| h.member_id()), s.raft_applied_index()))
    };
    let Some((answered_by, mine)) = applied(&[url.to_string()]).await else {
        return false;
    };
    let Some((_, theirs)) = applied(others).await else {
        return false;
    };
    answered_by == id && mine > 0 && mine.saturating_mul(10) >= theirs.saturating_mul(9)
}

/// The client URLs of the voters: where membership calls go (a learner
/// refuses them).
fn voter_endpoints(membership: &Membership) -> Vec<String> {
    membership
        .members
        .iter()
        .filter(|m| !m.learner)
        .flat_map(|m| m.client_urls.iter().cloned())
        .collect()
}

/// Every voter answers. A change begins only then: adding or removing a
/// member while another is down is how a group loses quorum. (Learners do
/// not count towards quorum; one not started yet has no address.)
pub async fn check_healthy(membership: &Membership, tls: Option<&Tls>) -> Result<()> {
    for m in membership.members.iter().filter(|m| !m.learner) {
        let name = &m.name;
        let url = m.client_urls.first().ok_or_else(|| {
            refused(format!(
                "voter {name:?} has not started: a change waits until every member is healthy"
            ))
        })?;
        let unhealthy = |e: Error| {
            refused(format!(
                "member {name} at {url} does not answer: a change waits until every member is healthy ({e})"
            ))
        };
        let mut c = connect(std::slice::from_ref(url), tls).await.map_err(unhealthy)?;
        c.status().await.map_err(|e| unhealthy(refused(e.to_string())))?;
    }
    Ok(())
}

/// Carries out the etcd side of `step` (pod steps have none: the caller
/// scales the StatefulSet), through the voters of `membership`; a leader
/// move is sent to the leader itself, as etcd requires.
pub async fn execute(step: &Step, membership: &Membership, tls: Option<&Tls>) -> Result<Progress> {
    let endpoints = voter_endpoints(membership);
    let endpoints = endpoints.as_slice();
    let failed = |action: String| move |e: etcd_client::Error| refused(format!("{action}: {e}"));
    match step {
        Step::Steady
        | Step::StartPod { .. }
        | Step::StopPod { .. }
        | Step::RestartPod { .. }
        | Step::ClearVolume { .. } => Ok(Progress::Done),
        Step::AddLearner { peer_url, ordinal } => {
            check_healthy(membership, tls).await?;
            add_learner(&mut connect(endpoints, tls).await?, peer_url, *ordinal).await
        }
        Step::Promote { id, ordinal } => promote(&mut connect(endpoints, tls).await?, *id, *ordinal).await,
        Step::MoveLeader { from, to } => {
            check_healthy(membership, tls).await?;
            let leader = membership
                .members
                .iter()
                .find(|m| m.id == *from)
                .map(|m| m.client_urls.clone())
                .unwrap_or_default();
            let mut c = connect(&leader, tls).await?;
            c.move_leader(*to)
                .await
                .map(|_| Progress::Done)
                .map_err(failed(format!("moving leadership from {from:x} to {to:x}")))
        }
        Step::Remove { id, ordinal } => {
            // A learner does not vote: taking one back is safe with a
            // voter down. A voter's removal waits until all answer.
            let learner = membership.members.iter().any(|m| m.id == *id && m.learner);
            if !learner {
                check_healthy(membership, tls).await?;
            }
            remove(&mut connect(endpoints, tls).await?, *id, *ordinal).await
        }
    }
}

/// Carries out a Raft step of a member's replacement
/// ([`plan_replacement`]). Unlike a resize, it does not wait for every
/// voter to answer: a group that lost one member's volume may have lost
/// another's, which is replaced next, and waiting for it would wait
/// forever. A removal waits until the voters that answer, without the
/// member removed, are a quorum of the group before it (then also of the
/// group after it); a learner is added and promoted through the voters
/// that answer (a learner does not vote, and etcd refuses a promotion
/// that would leave too few started voters).
pub async fn execute_replacement(step: &Step, membership: &Membership, tls: Option<&Tls>) -> Result<Progress> {
    let except = match step {
        Step::Remove { id, .. } => Some(*id),
        _ => None,
    };
    let voters: Vec<&RaftMember> = membership.members.iter().filter(|m| !m.learner).collect();
    let mut answering = Vec::new();
    for m in voters.iter().filter(|m| Some(m.id) != except) {
        let Some(url) = m.client_urls.first() else { continue };
        if let Ok(mut c) = connect(std::slice::from_ref(url), tls).await
            && c.status().await.is_ok()
        {
            answering.push(url.clone());
        }
    }
    let quorum = voters.len() / 2 + 1;
    if answering.len() < quorum {
        return Err(refused(format!(
            "{} of the group's {} voters answer, fewer than a quorum ({quorum}): the replacement waits",
            answering.len(),
            voters.len()
        )));
    }
    let mut c = connect(&answering, tls).await?;
    match step {
        Step::Remove { id, ordinal } => remove(&mut c, *id, *ordinal).await,
        Step::AddLearner { peer_url, ordinal } => add_learner(&mut c, peer_url, *ordinal).await,
        Step::Promote { id, ordinal } => promote(&mut c, *id, *ordinal).await,
        _ => execute(step, membership, tls).await,
    }
}

/// Adds a learner at `peer_url` (ordinal `ordinal`).
async fn add_learner(c: &mut Client, peer_url: &str, ordinal: i32) -> Result<Progress> {
    let r = c
        .member_add([peer_url.to_string()], Some(MemberAddOptions::new().with_is_learner()))
        .await;
    match r {
        // etcd derives a new member's id from its address and the current
        // second: re-adding an address removed within the same second hits
        // the removed id. A second later it works.
        Err(e) if e.to_string().contains("member not found") => Ok(Progress::Waiting(format!(
            "adding ordinal {ordinal}: its address was removed a moment ago ({e})"
        ))),
        r => settle(r, format!("adding ordinal {ordinal} as a learner")),
    }
}

/// Promotes learner `id` (ordinal `ordinal`).
async fn promote(c: &mut Client, id: u64, ordinal: i32) -> Result<Progress> {
    match c.member_promote(id).await {
        Ok(_) => Ok(Progress::Done),
        // etcd refuses until the learner's log is close to the leader's:
        // wait, do not fail.
        Err(e) if e.to_string().contains("in sync with leader") => Ok(Progress::Waiting(format!(
            "ordinal {ordinal} has not caught up with the leader yet"
        ))),
        Err(e) => Err(refused(format!("promoting ordinal {ordinal}: {e}"))),
    }
}

/// Removes member `id` (ordinal `ordinal`).
async fn remove(c: &mut Client, id: u64, ordinal: i32) -> Result<Progress> {
    match c.member_remove(id).await {
        // Removed already (a step repeated after a crash).
        Err(e) if e.to_string().contains("member not found") => Ok(Progress::Done),
        r => settle(r, format!("removing ordinal {ordinal}")),
    }
}

/// The outcome of an add or a remove. etcd's strict reconfiguration check
/// refuses either until every member has been connected to the leader for
/// a few seconds ("unhealthy cluster"), and a remove that would leave too
/// few started members: both are waits, not failures.
fn settle<T>(r: std::result::Result<T, etcd_client::Error>, action: String) -> Result<Progress> {
    match r {
        Ok(_) => Ok(Progress::Done),
        Err(e)
            if e.to_string().contains("unhealthy cluster") || e.to_string().contains("not enough started members") =>
        {
            Ok(Progress::Waiting(format!("{action}: etcd says {e}")))
        }
        Err(e) => Err(refused(format!("{action}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(o: i32) -> String {
        format!("http://g-{o}.g-peer:2380")
    }

    fn member(o: i32, learner: bool) -> RaftMember {
        RaftMember {
            id: 100 + o as u64,
            name: format!("g-{o}"),
            peer_urls: vec![url(o)],
            client_urls: vec![format!("http://g-{o}.g-peer:2379")],
            learner,
        }
    }

    fn group(voters: i32, learner: Option<i32>, leader: i32) -> Membership {
        let mut members: Vec<_> = (0..voters).map(|o| member(o, false)).collect();
        members.extend(learner.map(|o| member(o, true)));
        Membership {
            members,
            leader: 100 + leader as u64,
        }
    }

    fn step(g: &Membership, pods: i32, desired: i32) -> Step {
        plan(g, pods, desired, url).expect("a plan")
    }

    fn refusal(g: &Membership, pods: i32, desired: i32) -> String {
        match plan(g, pods, desired, url) {
            Ok(s) => panic!("planned {s:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_member_with_a_lost_volume_is_removed_added_back_restarted_and_promoted() {
        let replace = |g: &Membership, removed: Option<u64>, restarted: bool| {
            plan_replacement(g, 1, removed, true, restarted, url).expect("a plan")
        };
        // As it was: removed (its id recorded by the caller first).
        assert_eq!(
            replace(&group(3, None, 0), None, false),
            Step::Remove { ordinal: 1, id: 101 }
        );
        assert_eq!(
            replace(&group(3, None, 0), Some(101), false),
            Step::Remove { ordinal: 1, id: 101 }
        );
        // Gone: its volume cleared, unless made since, then added back at
        // its address.
        let mut without = group(3, None, 0);
        without.members.retain(|m| m.id != 101);
        assert_eq!(
            plan_replacement(&without, 1, Some(101), false, false, url).expect("a plan"),
            Step::ClearVolume { ordinal: 1 }
        );
        assert_eq!(
            replace(&without, Some(101), false),
            Step::AddLearner {
                ordinal: 1,
                peer_url: url(1)
            }
        );
        // Back as a learner that has not started: its pod restarts, once.
        let mut learner = without.clone();
        learner.members.push(RaftMember {
            id: 201,
            name: String::new(),
            client_urls: vec![],
            ..member(1, true)
        });
        assert_eq!(replace(&learner, Some(101), false), Step::RestartPod { ordinal: 1 });
        assert_eq!(
            replace(&learner, Some(101), true),
            Step::Promote { ordinal: 1, id: 201 }
        );
        learner.members[2].name = "g-1".into();
        assert_eq!(
            replace(&learner, Some(101), true),
            Step::Promote { ordinal: 1, id: 201 }
        );
        // A voter with a new id at its address: replaced.
        learner.members[2].learner = false;
        assert_eq!(replace(&learner, Some(101), true), Step::Steady);
    }

    #[test]
    fn a_member_is_replaced_only_where_the_others_keep_a_quorum() {
        let leading = group(3, None, 1);
        let e = plan_replacement(&leading, 1, None, false, false, url).expect_err("it cannot lead");
        assert!(e.to_string().contains("elect another"), "{e}");
        let two = group(2, None, 0);
        let e = plan_replacement(&two, 1, None, false, false, url).expect_err("two members cannot");
        assert!(
            e.to_string().contains("no quorum") && e.to_string().contains("restore"),
            "{e}"
        );
        let growing = group(3, Some(3), 0);
        let e = plan_replacement(&growing, 1, None, false, false, url).expect_err("one change at a time");
        assert!(e.to_string().contains("learner"), "{e}");
    }

    #[test]
    fn a_steady_group_needs_nothing() {
        assert_eq!(step(&group(3, None, 0), 3, 3), Step::Steady);
    }

    #[test]
    fn growing_adds_a_learner_starts_it_then_promotes_it() {
        let add = |ordinal| Step::AddLearner {
            ordinal,
            peer_url: url(ordinal),
        };
        assert_eq!(step(&group(3, None, 0), 3, 5), add(3));
        assert_eq!(step(&group(3, Some(3), 0), 3, 5), Step::StartPod { replicas: 4 });
        assert_eq!(step(&group(3, Some(3), 0), 4, 5), Step::Promote { ordinal: 3, id: 103 });
        assert_eq!(step(&group(4, None, 0), 4, 5), add(4));
        assert_eq!(step(&group(5, None, 0), 5, 5), Step::Steady);
    }

    #[test]
    fn shrinking_removes_the_highest_ordinal_then_its_pod() {
        assert_eq!(step(&group(5, None, 0), 5, 3), Step::Remove { ordinal: 4, id: 104 });
        assert_eq!(step(&group(4, None, 0), 5, 3), Step::StopPod { replicas: 4 });
        assert_eq!(step(&group(4, None, 0), 4, 3), Step::Remove { ordinal: 3, id: 103 });
        assert_eq!(step(&group(3, None, 0), 4, 3), Step::StopPod { replicas: 3 });
    }

    #[test]
    fn the_leader_is_moved_off_before_it_is_removed() {
        assert_eq!(step(&group(5, None, 4), 5, 3), Step::MoveLeader { from: 104, to: 100 });
    }

    #[test]
    fn a_learner_no_longer_wanted_is_removed() {
        assert_eq!(step(&group(3, Some(3), 0), 4, 3), Step::Remove { ordinal: 3, id: 103 });
        assert_eq!(step(&group(3, Some(3), 0), 3, 3), Step::Remove { ordinal: 3, id: 103 });
    }

    #[test]
    fn a_voter_without_its_pod_is_started_first() {
        assert_eq!(step(&group(4, None, 0), 3, 3), Step::StartPod { replicas: 4 });
    }

    #[test]
    fn a_group_it_does_not_recognise_is_left_alone() {
        let mut g = group(3, None, 0);
        g.members[1].peer_urls = vec!["http://elsewhere:2380".into()];
        assert!(refusal(&g, 3, 5).contains("http://elsewhere:2380"));
        let mut g = group(3, None, 0);
        g.members.remove(1);
        assert!(refusal(&g, 3, 5).contains("ordinals [0, 2], not 0..2"));
        let mut g = group(3, Some(3), 0);
        g.members.push(member(4, true));
        assert!(refusal(&g, 3, 5).contains("more than one learner (ordinals [3, 4])"));
    }
}
