//! Status as pure functions of what the operator observed: a group's phase
//! from its StatefulSet, a GeoCluster's conditions from its groups. Condition
//! transition times only move when a condition's status really changes, so a
//! reconcile that observes nothing new computes the same status and writes
//! nothing.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use tern_crds::{ClusterPhase, GeoCluster, GeoClusterStatus, GroupPhase, GroupRole, RegionGroup, RegionStatus};

use crate::build::regiongroup::quorum;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// What the StatefulSet of a group reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemberCounts {
    pub desired: i32,
    pub created: i32,
    pub ready: i32,
    pub updated: i32,
    /// The StatefulSet controller has seen the latest spec.
    pub observed: bool,
    /// The StatefulSet reports any status at all.
    pub reported: bool,
}

impl MemberCounts {
    pub fn of(sts: Option<&StatefulSet>) -> Self {
        let Some(sts) = sts else {
            return Self::default();
        };
        let desired = sts.spec.replicas.unwrap_or(1);
        let Some(status) = sts.status.as_ref() else {
            return Self {
                desired,
                ..Self::default()
            };
        };
        Self {
            desired,
            created: status.replicas,
            ready: status.ready_replicas.unwrap_or(0),
            updated: status.updated_replicas.unwrap_or(0),
            observed: status.observed_generation.unwrap_or(0) >= sts.metadata.generation.unwrap_or(0),
            reported: status.observed_generation.is_some(),
        }
    }

    /// The phase these counts mean.
    pub fn phase(&self) -> GroupPhase {
        if !self.reported {
            return GroupPhase::Pending;
        }
        if !self.observed || self.created < self.desired || self.updated < self.desired {
            return GroupPhase::Provisioning;
        }
        if self.ready >= self.desired {
            GroupPhase::Ready
        } else if self.ready >= quorum(self.desired) {
            GroupPhase::Degraded
        } else {
            GroupPhase::Unavailable
        }
    }
}

/// `conditions` with `new` set: the old transition time is kept unless the
/// status changed.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            *old = new;
        }
        None => conditions.push(new),
    }
}

/// A condition; `now` becomes its transition time if its status changed.
pub fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// The three standard conditions of a GeoCluster or group, from its phase.
pub fn phase_conditions(
    conditions: &mut Vec<Condition>,
    phase: GroupPhase,
    detail: String,
    generation: Option<i64>,
    now: &Time,
) {
    let ready = phase == GroupPhase::Ready;
    let progressing = matches!(phase, GroupPhase::Pending | GroupPhase::Provisioning);
    let degraded = matches!(phase, GroupPhase::Degraded | GroupPhase::Unavailable);
    set_condition(
        conditions,
        condition(
            READY,
            ready,
            if ready { "AllMembersReady" } else { phase.as_str() },
            detail.clone(),
            generation,
            now,
        ),
    );
    set_condition(
        conditions,
        condition(
            PROGRESSING,
            progressing,
            if progressing { "Provisioning" } else { "Stable" },
            if progressing { detail.clone() } else { String::new() },
            generation,
            now,
        ),
    );
    set_condition(
        conditions,
        condition(
            DEGRADED,
            degraded,
            if degraded { phase.as_str() } else { "AsExpected" },
            if degraded { detail } else { String::new() },
            generation,
            now,
        ),
    );
}

/// The worst of several phases: what a GeoCluster reports for its groups.
pub fn worst(phases: impl IntoIterator<Item = GroupPhase>) -> GroupPhase {
    fn rank(p: GroupPhase) -> u8 {
        match p {
            GroupPhase::Ready => 0,
            GroupPhase::Provisioning => 1,
            GroupPhase::Pending => 2,
            GroupPhase::Degraded => 3,
            GroupPhase::Unavailable => 4,
        }
    }
    phases
        .into_iter()
        .max_by_key(|p| rank(*p))
        .unwrap_or(GroupPhase::Pending)
}

/// Per-region status from the region's groups (data and directory).
pub fn region_statuses(regions: &[String], groups: &[RegionGroup]) -> Vec<RegionStatus> {
    regions
        .iter()
        .map(|region| {
            let mine = groups.iter().filter(|g| &g.spec.region == region);
            let mut status = RegionStatus {
                name: region.clone(),
                ..RegionStatus::default()
            };
            let mut phases = Vec::new();
            for g in mine {
                let gs = g.status.clone().unwrap_or_default();
                phases.push(gs.phase);
                match g.spec.role {
                    GroupRole::Data => {
                        status.members = g.spec.replicas;
                        status.ready_members = gs.ready_members;
                    }
                    GroupRole::Directory => {
                        status.directory_members = g.spec.replicas;
                        status.directory_ready_members = gs.ready_members;
                    }
                }
            }
            status.phase = worst(phases);
            status
        })
        .collect()
}

/// A GeoCluster's status from the groups of its managed `regions`: the
/// per-region states (keeping the fields the agents own, so that comparing
/// with the stored status sees only the operator's changes), the worst phase
/// as conditions and as one word, and how many regions are ready.
pub fn geocluster_status(gc: &GeoCluster, regions: &[String], groups: &[RegionGroup], now: &Time) -> GeoClusterStatus {
    let mut region_statuses = region_statuses(regions, groups);
    let phase = worst(region_statuses.iter().map(|r| r.phase));
    let ready = region_statuses.iter().filter(|r| r.phase == GroupPhase::Ready).count();
    let detail = region_statuses
        .iter()
        .map(|r| {
            format!(
                "{}: {} ({}/{} members)",
                r.name,
                r.phase.as_str(),
                r.ready_members,
                r.members
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let mut st = gc.status.clone().unwrap_or_default();
    phase_conditions(&mut st.conditions, phase, detail, gc.metadata.generation, now);
    st.observed_generation = gc.metadata.generation;
    st.phase = Some(ClusterPhase::of(phase));
    st.ready_regions = Some(format!("{ready}/{}", regions.len()));
    for r in region_statuses.iter_mut() {
        if let Some(old) = st.regions.iter().find(|o| o.name == r.name) {
            r.keep_agent_fields(old);
        }
    }
    st.regions = region_statuses;
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(desired: i32, ready: i32) -> MemberCounts {
        MemberCounts {
            desired,
            created: desired,
            ready,
            updated: desired,
            observed: true,
            reported: true,
        }
    }

    #[test]
    fn phase_follows_quorum() {
        assert_eq!(MemberCounts::default().phase(), GroupPhase::Pending);
        assert_eq!(counts(3, 3).phase(), GroupPhase::Ready);
        assert_eq!(counts(3, 2).phase(), GroupPhase::Degraded);
        assert_eq!(counts(3, 1).phase(), GroupPhase::Unavailable);
        assert_eq!(counts(5, 3).phase(), GroupPhase::Degraded);
        assert_eq!(counts(5, 2).phase(), GroupPhase::Unavailable);
        let rolling = MemberCounts {
            updated: 1,
            ..counts(3, 3)
        };
        assert_eq!(rolling.phase(), GroupPhase::Provisioning);
        let unobserved = MemberCounts {
            observed: false,
            ..counts(3, 3)
        };
        assert_eq!(unobserved.phase(), GroupPhase::Provisioning);
    }

    #[test]
    fn transition_time_moves_only_on_change() {
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(1_000).expect("valid"));
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(2_000).expect("valid"));
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            condition(READY, false, "Pending", "x".into(), Some(1), &t0),
        );
        set_condition(
            &mut conditions,
            condition(READY, false, "Pending", "y".into(), Some(1), &t1),
        );
        assert_eq!(conditions[0].last_transition_time, t0);
        assert_eq!(conditions[0].message, "y");
        set_condition(
            &mut conditions,
            condition(READY, true, "AllMembersReady", "z".into(), Some(1), &t1),
        );
        assert_eq!(conditions[0].last_transition_time, t1);
    }

    #[test]
    fn worst_phase_wins() {
        assert_eq!(worst([GroupPhase::Ready, GroupPhase::Degraded]), GroupPhase::Degraded);
        assert_eq!(worst([GroupPhase::Ready, GroupPhase::Ready]), GroupPhase::Ready);
        assert_eq!(worst([]), GroupPhase::Pending);
    }
}

#[cfg(test)]
mod geocluster_tests {
    use super::*;
    use crate::build::geocluster::region_groups;
    use crate::build::testing::example;
    use crate::regions::RegionFilter;

    #[test]
    fn an_unchanged_observation_computes_the_stored_status() {
        let t0 = Time(k8s_openapi::jiff::Timestamp::from_second(1_000).expect("valid"));
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(2_000).expect("valid"));
        let mut gc = example();
        let regions: Vec<String> = gc.spec.regions.iter().map(|r| r.name.clone()).collect();
        let groups = region_groups(&gc, &RegionFilter::all());
        let first = geocluster_status(&gc, &regions, &groups, &t0);
        assert_eq!(first.phase, Some(ClusterPhase::Progressing));
        assert_eq!(first.ready_regions.as_deref(), Some("0/3"));
        // What an agent adds to the stored status is carried over, so the
        // next reconcile compares equal and writes nothing.
        let mut stored = first.clone();
        stored.regions[0].group_leader = Some("payments-us-east-0".into());
        gc.status = Some(stored.clone());
        assert_eq!(geocluster_status(&gc, &regions, &groups, &t1), stored);
    }
}
