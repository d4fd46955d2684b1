//! Leader election on a coordination.k8s.io Lease, so that two operator
//! replicas never reconcile at once. Same rules as client-go's leaderelection:
//! updates are compare-and-swap on the Lease's resourceVersion, and a holder's
//! lease counts as expired only after this replica has watched it stay
//! unchanged for a whole lease duration by its own clock, so clock skew
//! between replicas does not matter.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::time::Instant;

use crate::{Error, Result};

/// Timing of the election.
#[derive(Clone, Debug)]
pub struct LeaseTiming {
    /// How long a lease stays valid without renewal.
    pub duration: Duration,
    /// How often the leader renews, and how often a standby retries.
    pub retry: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            retry: Duration::from_secs(2),
        }
    }
}

/// One replica's side of the election.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
    /// The lease record last seen and when this replica first saw it.
    observed: Option<(String, Instant)>,
}

impl LeaderElector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, timing: LeaseTiming) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            timing,
            observed: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&mut self) -> Result<()> {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "acquired leadership");
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.timing.retry).await;
        }
    }

    /// Renews the lease until that fails for longer than two thirds of its
    /// duration (then another replica may already be taking over), and says
    /// why leadership ended.
    pub async fn hold(&mut self) -> Error {
        let deadline_after = self.timing.duration * 2 / 3;
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = Instant::now(),
                Ok(false) => {
                    return Error::LostLeadership(format!("lease {} is held by another replica", self.name));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    if last_renewal.elapsed() > deadline_after {
                        return Error::LostLeadership(format!(
                            "could not renew lease {} for {:?}: {e}",
                            self.name,
                            last_renewal.elapsed()
                        ));
                    }
                }
            }
        }
    }

    /// Gives the lease up, so a standby takes over without waiting for it to
    /// expire.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        if let Err(e) = self.api.replace(&self.name, &PostParams::default(), &lease).await {
            tracing::warn!(error = %e, "could not release the lease");
        }
    }

    /// One round: take a free or expired lease, renew our own, or observe
    /// another holder. Returns whether this replica leads now.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let duration_secs = i32::try_from(self.timing.duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let held = spec.holder_identity.as_deref().is_some_and(|h| !h.is_empty());
        if !ours && held {
            let lease_secs = u64::try_from(spec.lease_duration_seconds.unwrap_or(duration_secs)).unwrap_or(0);
            let first_seen = match &self.observed {
                Some((v, at)) if *v == version => *at,
                _ => {
                    self.observed = Some((version.clone(), Instant::now()));
                    Instant::now()
                }
            };
            if first_seen.elapsed() < Duration::from_secs(lease_secs) {
                return Ok(false);
            }
        }
        if !ours {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(duration_secs);
        spec.renew_time = Some(now);
        // replace() sends the resourceVersion we read: if anyone wrote the
        // lease since, the API server refuses with 409 and we did not lead.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
