//! Rolling etcd upgrades of a group, one member at a time: followers first
//! (highest ordinal first, as a StatefulSet goes), the leader last, after
//! handing its leadership to an upgraded follower that has caught up. A
//! member restarts only while every member answers and has applied within
//! [`MAX_APPLY_GAP`] entries of the leader, so a restart never costs more
//! than the one member it stops; and etcd's version-skew rule (one minor
//! version at a time, no downgrade without etcd's downgrade API) is checked
//! before the first.
//!
//! `plan` is a pure function of what `observe` reads from the members, so
//! an operator that restarts mid-upgrade takes the same next step. A data
//! group's StatefulSet uses the `OnDelete` strategy, and the RegionGroup
//! controller deletes the pod `plan` names (`controller/regiongroup.rs`,
//! `rolling_update`): every template change, an image or a setting, rolls
//! this way.

use std::time::Duration;

/// A member may be this many Raft entries behind the leader and still count
/// as caught up: a few heartbeats' worth of writes in flight.
pub const MAX_APPLY_GAP: u64 = 1_000;

/// One member, as its own status answered (or did not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberState {
    pub ordinal: i32,
    /// What the reasons call it (its pod's name).
    pub name: String,
    /// 0 when it did not answer.
    pub id: u64,
    /// The etcd server version it runs (`3.6.16`), empty when it did not
    /// answer.
    pub version: String,
    pub applied: u64,
    /// The leader it knows (0: none).
    pub leader: u64,
    /// Whether its pod already runs the target image.
    pub current: bool,
    /// What Kubernetes says of its pod: Ready, and not being deleted.
    pub pod: PodState,
}

/// A member's pod as Kubernetes reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodState {
    /// The pod exists and its Ready condition is true.
    pub ready: bool,
    /// The pod is being deleted (a drain, an eviction, this roll's own
    /// restart still terminating).
    pub terminating: bool,
}

impl PodState {
    /// A pod that runs and is ready: what a process in a test is.
    pub const READY: Self = Self {
        ready: true,
        terminating: false,
    };
}

impl MemberState {
    fn answered(&self) -> bool {
        self.id != 0
    }
}

/// The next thing to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Every member runs the target: nothing to do.
    Steady,
    /// Not now; the reason says what is awaited.
    Wait { reason: String },
    /// Hand leadership from the last outdated member to an upgraded one.
    MoveLeader { from: u64, to: u64 },
    /// Restart this member's pod on the target image.
    Restart { ordinal: i32 },
}

/// A `MAJOR.MINOR.PATCH` version, from an image tag (`…:v3.6.16`) or
/// etcd's status (`3.6.16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    /// Parses `3.6.16`, `v3.6.16` or `3.6.16-rc.0` (the suffix ignored).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.strip_prefix('v').unwrap_or(s);
        let core = s.split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
        let (major, minor, patch) = (parts.next()??, parts.next()??, parts.next()??);
        parts.next().is_none().then_some(Self { major, minor, patch })
    }

    /// The version an image reference's tag names (`registry/etcd:v3.6.16`).
    pub fn of_image(image: &str) -> Option<Self> {
        let name = image.split('@').next()?;
        let (_, tag) = name.rsplit_once(':')?;
        // A registry port (`host:5000/etcd`) is not a tag.
        if tag.contains('/') {
            return None;
        }
        Self::parse(tag)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// etcd's skew rule for a rolling upgrade from the group's `running`
/// versions to `target`: the same major version, and at most one minor
/// version up from the oldest member. A downgrade across minor versions
/// needs etcd's downgrade API and is refused; a patch downgrade is allowed.
pub fn check_skew(running: &[Version], target: Version) -> Result<(), String> {
    let Some(oldest) = running.iter().min().copied() else {
        return Err("no member reported its version".into());
    };
    let newest = running.iter().max().copied().unwrap_or(oldest);
    if target.major != oldest.major {
        return Err(format!(
            "etcd {target} is another major version than the group's {oldest}: not an upgrade etcd supports"
        ));
    }
    if target.minor > oldest.minor + 1 {
        return Err(format!(
            "etcd {target} skips a minor version from the group's oldest member ({oldest}): upgrade to {}.{}.x first",
            oldest.major,
            oldest.minor + 1
        ));
    }
    if target.minor < newest.minor {
        return Err(format!(
            "etcd {target} is older than a member's {newest}: a downgrade across minor versions needs etcd's downgrade API, which tern does not drive"
        ));
    }
    Ok(())
}

/// Whether the members may go from image `deployed` to image `wanted`:
/// both tags must name versions (`…:v3.6.16`) that etcd's skew rule allows
/// between (a tag without a version cannot be checked, and is refused: the
/// operator would otherwise roll a payments database onto an unknown etcd).
pub fn image_change(deployed: &str, wanted: &str) -> Result<(), String> {
    if deployed == wanted {
        return Ok(());
    }
    let version = |image: &str| {
        Version::of_image(image).ok_or_else(|| {
            format!(
                "the etcd image {image} has no vMAJOR.MINOR.PATCH tag, so the upgrade's version skew cannot be checked"
            )
        })
    };
    check_skew(&[version(deployed)?], version(wanted)?)
}

/// The next step of the upgrade, from the members' states.
pub fn plan(members: &[MemberState]) -> Step {
    if members.iter().all(|m| m.current) {
        return Step::Steady;
    }
    // A pod on its way out (this roll's last restart, or a drain) is a
    // member down already: nothing else goes until it is back.
    if let Some(m) = members.iter().find(|m| m.pod.terminating) {
        return Step::Wait {
            reason: format!("{}'s pod is terminating", m.name),
        };
    }
    let down: Vec<&MemberState> = members.iter().filter(|m| !m.answered() || !m.pod.ready).collect();
    if let [m] = down[..]
        && !m.answered()
        && !m.pod.ready
        && !m.current
    {
        // One member down, on the old template, and the rest healthy: its
        // pod is replaced first. It costs the group nothing more, and the
        // new template may be its fix (a crash-looping configuration).
        // Never while a member on the new template is down: that template
        // may be what brings members down.
        let others: Vec<MemberState> = members.iter().filter(|o| o.ordinal != m.ordinal).cloned().collect();
        return match healthy(&others) {
            Ok(_) => Step::Restart { ordinal: m.ordinal },
            Err(reason) => Step::Wait { reason },
        };
    }
    if let Some(m) = down.first() {
        return Step::Wait {
            reason: if m.answered() {
                format!("{}'s pod is not ready", m.name)
            } else {
                format!("{} does not answer", m.name)
            },
        };
    }
    let leader = match healthy(members) {
        Ok(leader) => leader,
        Err(reason) => return Step::Wait { reason },
    };
    if let Some(m) = members
        .iter()
        .filter(|m| !m.current && m.id != leader.id)
        .max_by_key(|m| m.ordinal)
    {
        return Step::Restart { ordinal: m.ordinal };
    }
    // Only the leader is left: leadership goes to the upgraded follower
    // that has applied the most. A group of one has no one to hand it to,
    // and restarts it (its clients wait out the restart).
    match members.iter().filter(|m| m.id != leader.id).max_by_key(|m| m.applied) {
        Some(to) => Step::MoveLeader {
            from: leader.id,
            to: to.id,
        },
        None => Step::Restart {
            ordinal: leader.ordinal,
        },
    }
}

/// Every member answers, follows one leader and has caught up, and no pod
/// is unready or on its way out: what a directory share waits for before
/// it gives the directory's roll lock back.
pub fn settled(members: &[MemberState]) -> Result<(), String> {
    if let Some(m) = members.iter().find(|m| m.pod.terminating || !m.pod.ready) {
        return Err(format!("{}'s pod is not ready", m.name));
    }
    healthy(members).map(|_| ())
}

/// The leader, when every member in `members` answers, follows it and has
/// applied within [`MAX_APPLY_GAP`] of it; else what is awaited.
fn healthy(members: &[MemberState]) -> Result<&MemberState, String> {
    if let Some(m) = members.iter().find(|m| !m.answered()) {
        return Err(format!("{} does not answer", m.name));
    }
    let leader_id = members.iter().map(|m| m.leader).find(|l| *l != 0).unwrap_or(0);
    let Some(leader) = members.iter().find(|m| m.id == leader_id) else {
        return Err("the group has no leader".into());
    };
    if let Some(m) = members.iter().find(|m| m.leader != leader_id) {
        return Err(format!("{} does not follow the leader yet", m.name));
    }
    if let Some(m) = members
        .iter()
        .find(|m| leader.applied.saturating_sub(m.applied) > MAX_APPLY_GAP)
    {
        return Err(format!("{} is behind the leader", m.name));
    }
    Ok(leader)
}

/// Reads each member's status at its client URL (`(ordinal, url)`), named
/// `member <ordinal>`; see [`observe_named`].
pub async fn observe(
    members: &[(i32, String)],
    tls: Option<&tern_common::tls::Tls>,
    pod: impl Fn(i32) -> (bool, PodState),
) -> Vec<MemberState> {
    let named: Vec<(i32, String, String)> = members
        .iter()
        .map(|(o, url)| (*o, format!("member {o}"), url.clone()))
        .collect();
    observe_named(&named, tls, pod).await
}

/// Reads each member's status at its client URL (`(ordinal, name, url)`);
/// `pod` says whether a member's pod runs the target image, and its state.
/// A member that does not answer within 2 s is returned unanswered.
pub async fn observe_named(
    members: &[(i32, String, String)],
    tls: Option<&tern_common::tls::Tls>,
    pod: impl Fn(i32) -> (bool, PodState),
) -> Vec<MemberState> {
    let mut out = Vec::new();
    for (ordinal, name, url) in members {
        let (current, pod) = pod(*ordinal);
        let mut state = MemberState {
            ordinal: *ordinal,
            name: name.clone(),
            id: 0,
            version: String::new(),
            applied: 0,
            leader: 0,
            current,
            pod,
        };
        if let Ok(Ok(Ok(status))) = tokio::time::timeout(Duration::from_secs(2), async {
            let mut c = tern_common::etcd::client(&[url.as_str()], tls, None).await?;
            c.status().await.map(Ok::<_, etcd_client::Error>)
        })
        .await
        {
            state.id = status.header().map(|h| h.member_id()).unwrap_or(0);
            state.version = status.version().to_string();
            state.applied = status.raft_applied_index();
            state.leader = status.leader();
        }
        out.push(state);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).expect("a version")
    }

    fn member(ordinal: i32, leader: u64, applied: u64, current: bool) -> MemberState {
        MemberState {
            ordinal,
            name: format!("member {ordinal}"),
            id: ordinal as u64 + 1,
            version: "3.6.16".into(),
            applied,
            leader,
            current,
            pod: PodState::READY,
        }
    }

    /// A directory share: its own member 0, and two members of other
    /// shares (ordinals from 1000, counted as current: never restarted
    /// from here, but counted for health and leadership).
    #[test]
    fn a_directory_share_hands_over_to_another_share_and_waits_for_every_share() {
        let share = |leader: u64| {
            vec![
                member(0, leader, 100, false),
                member(1000, leader, 100, true),
                member(1001, leader, 100, true),
            ]
        };
        // Its member leads: the lead goes to another share's member first.
        match plan(&share(1)) {
            Step::MoveLeader { from: 1, to } => assert!(to == 1001 || to == 1002, "{to}"),
            other => panic!("the share's leader must hand over first: {other:?}"),
        }
        // Led from elsewhere: its member restarts.
        assert_eq!(plan(&share(1001)), Step::Restart { ordinal: 0 });
        // Another share's member down: nothing restarts.
        let mut g = share(1001);
        g[2].id = 0;
        g[2].name = "payments-dir-ap-south-0".into();
        assert!(
            matches!(plan(&g), Step::Wait { reason } if reason.contains("payments-dir-ap-south-0 does not answer")),
            "{:?}",
            plan(&g)
        );
        // Another share's member behind: nothing restarts either.
        let mut g = share(1001);
        g[1].applied = 100 + MAX_APPLY_GAP + 1;
        g[0].applied = 100 + MAX_APPLY_GAP + 1;
        assert!(matches!(plan(&g), Step::Wait { .. }), "{:?}", plan(&g));
        // Its own members all current: steady, whatever the others run.
        let mut g = share(1001);
        g[0].current = true;
        assert_eq!(plan(&g), Step::Steady);
        // Settled (the roll lock may go) only once its restarted member is
        // back: ready, answering, following and caught up.
        assert_eq!(settled(&g), Ok(()));
        g[0].pod.ready = false;
        assert!(settled(&g).is_err_and(|e| e.contains("member 0's pod is not ready")));
        g[0].pod.ready = true;
        g[0].id = 0;
        assert!(settled(&g).is_err_and(|e| e.contains("member 0 does not answer")));
    }

    #[test]
    fn versions_come_from_tags_and_status() {
        assert_eq!(
            Version::of_image("gcr.io/etcd-development/etcd:v3.6.16"),
            Some(v("3.6.16"))
        );
        assert_eq!(Version::of_image("localhost:5000/etcd:3.7.0-rc.1"), Some(v("3.7.0")));
        assert_eq!(Version::of_image("localhost:5000/etcd"), None);
        assert_eq!(Version::of_image("etcd:latest"), None);
        assert_eq!(Version::of_image("etcd@sha256:abc"), None);
        assert_eq!(Version::parse("3.6"), None);
    }

    #[test]
    fn skew_allows_one_minor_up_and_patch_changes_only() {
        let group = [v("3.5.17"), v("3.5.17")];
        assert!(check_skew(&group, v("3.5.21")).is_ok());
        assert!(check_skew(&group, v("3.6.16")).is_ok());
        let e = check_skew(&group, v("3.7.0")).expect_err("a skipped minor");
        assert!(e.contains("skips a minor version") && e.contains("3.6.x"), "{e}");
        let e = check_skew(&[v("3.6.16")], v("3.5.21")).expect_err("a downgrade");
        assert!(e.contains("downgrade"), "{e}");
        assert!(
            check_skew(&[v("3.6.16")], v("3.6.15")).is_ok(),
            "patch downgrades are fine"
        );
        assert!(check_skew(&[v("3.6.16")], v("4.0.0")).is_err());
        // Mid-upgrade, the oldest member decides.
        assert!(check_skew(&[v("3.5.17"), v("3.6.16")], v("3.6.16")).is_ok());
    }

    #[test]
    fn an_image_change_is_checked_by_its_tags() {
        let base = "gcr.io/etcd-development/etcd";
        assert!(image_change(&format!("{base}:v3.6.16"), &format!("{base}:v3.6.16")).is_ok());
        assert!(image_change(&format!("{base}:v3.5.21"), &format!("{base}:v3.6.16")).is_ok());
        let e = image_change(&format!("{base}:v3.5.21"), &format!("{base}:v3.7.0")).expect_err("skips 3.6");
        assert!(e.contains("skips a minor version"), "{e}");
        let e = image_change(&format!("{base}:v3.6.16"), "my/etcd:latest").expect_err("no version");
        assert!(e.contains("my/etcd:latest") && e.contains("cannot be checked"), "{e}");
    }

    #[test]
    fn followers_go_first_highest_ordinal_first_and_the_leader_last() {
        // Member 1 (id 2) leads.
        let mut g = vec![
            member(0, 2, 100, false),
            member(1, 2, 100, false),
            member(2, 2, 100, false),
        ];
        assert_eq!(plan(&g), Step::Restart { ordinal: 2 });
        g[2].current = true;
        assert_eq!(plan(&g), Step::Restart { ordinal: 0 });
        g[0].current = true;
        g[0].applied = 99;
        // Only the leader is left: leadership goes to the follower that has
        // applied the most, then the old leader restarts.
        assert_eq!(plan(&g), Step::MoveLeader { from: 2, to: 3 });
        for m in &mut g {
            m.leader = 3;
        }
        assert_eq!(plan(&g), Step::Restart { ordinal: 1 });
        g[1].current = true;
        assert_eq!(plan(&g), Step::Steady);
    }

    #[test]
    fn nothing_restarts_while_a_member_is_down_behind_or_leaderless() {
        let mut g = vec![
            member(0, 1, 5_000, false),
            member(1, 1, 5_000, true),
            member(2, 1, 5_000, false),
        ];
        // Down on the new template: waited for, never "fixed" by
        // restarting more members onto it.
        g[1].id = 0;
        g[1].pod.ready = false;
        assert!(matches!(plan(&g), Step::Wait { reason } if reason.contains("member 1 does not answer")));
        // Down on the old template, the rest healthy: replaced first,
        // whoever leads.
        g[1].current = false;
        assert_eq!(plan(&g), Step::Restart { ordinal: 1 });
        // Two down: nothing is touched.
        g[2].id = 0;
        g[2].pod.ready = false;
        assert!(matches!(plan(&g), Step::Wait { .. }));
        // One unanswered status call of a Ready pod is not "down".
        g[1].id = 2;
        g[1].pod.ready = true;
        g[2].pod.ready = true;
        assert!(matches!(plan(&g), Step::Wait { reason } if reason.contains("member 2 does not answer")));
        g[2].id = 3;
        // A terminating pod (a drain, or the last restart) holds everything.
        g[0].pod.terminating = true;
        assert!(matches!(plan(&g), Step::Wait { reason } if reason.contains("member 0's pod is terminating")));
        g[0].pod.terminating = false;
        g[1].applied = 5_000 - MAX_APPLY_GAP - 1;
        assert!(matches!(plan(&g), Step::Wait { reason } if reason.contains("member 1 is behind")));
        g[1].applied = 5_000;
        g[2].leader = 0;
        assert!(matches!(plan(&g), Step::Wait { reason } if reason.contains("member 2 does not follow")));
        for m in &mut g {
            m.leader = 0;
        }
        assert!(matches!(plan(&g), Step::Wait { reason } if reason.contains("no leader")));
    }

    #[test]
    fn a_group_of_one_restarts_its_only_member() {
        assert_eq!(plan(&[member(0, 1, 10, false)]), Step::Restart { ordinal: 0 });
    }
}
