//! Fail closed: the router writes into its region's group only while the
//! region's lease is valid (DESIGN.md write path step 4). A region cut off
//! from the directory majority stops writing before its lease key can
//! expire there, and so before a successor may take its accounts over.
//!
//! The router asks the region's elected agent (found at
//! `/tern/leader/{region}` in its own group) every quarter TTL how long the
//! lease is certain to last, and keeps `valid_until = sent + remaining`,
//! where `sent` is when it sent the question on its own monotonic clock:
//! the agent computed `remaining` after that instant, so the bound is never
//! later than the agent's own. Nothing here compares wall clocks.
//!
//! Every home transaction (writes, STRONG reads served as home, fence
//! creation) checks the gate first; BOUNDED reads from mirrors do not, they
//! carry their own staleness bound.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tern_common::{AgentEndpoint, LeaseAnswer, RegionName, agent_endpoint_key};
use tokio::time::Instant;

use crate::error::{Result, RouterError};
use crate::leader::Group;

/// How often to ask before the agent has said what its TTL is.
const FIRST_ASK_EVERY: Duration = Duration::from_millis(250);
/// How long one question may take; longer answers are worth less anyway.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// What the metrics show about the lease.
#[derive(Clone, Default)]
pub struct LeaseMetrics {
    /// 1 while writes are accepted.
    pub valid: Gauge,
    /// Milliseconds of validity left at the last answer.
    pub remaining_ms: Gauge,
    /// Home transactions refused because the lease was not valid.
    pub refused: Counter,
}

/// The region's lease as this router knows it.
pub struct LeaseGate {
    region: RegionName,
    /// Off: every home transaction passes (a router run without agents).
    required: bool,
    state: Mutex<Known>,
    metrics: LeaseMetrics,
}

#[derive(Default)]
struct Known {
    valid_until: Option<Instant>,
    /// Why it is not valid, for the refusal's message.
    why: String,
}

impl LeaseGate {
    pub fn new(region: RegionName, required: bool, metrics: LeaseMetrics) -> Self {
        Self {
            region,
            required,
            state: Mutex::new(Known {
                valid_until: None,
                why: "the region's agent has not confirmed the region's lease yet".into(),
            }),
            metrics,
        }
    }

    /// Ok while the router may write into its region's group.
    pub fn check(&self) -> Result<()> {
        self.check_at(Instant::now())
    }

    /// [`Self::check`] at `now` (the unit tests pass their own instants).
    fn check_at(&self, now: Instant) -> Result<()> {
        if !self.required {
            return Ok(());
        }
        let known = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if known.valid_until.is_some_and(|t| now < t) {
            return Ok(());
        }
        self.metrics.refused.inc();
        self.metrics.valid.set(0);
        Err(RouterError::NotServing {
            region: self.region.clone(),
            why: known.why.clone(),
        })
    }

    fn learned(&self, sent: Instant, answer: &LeaseAnswer) {
        let until = sent + Duration::from_millis(answer.remaining_ms);
        let mut known = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // An answer that arrives late says less than one already known.
        if known.valid_until.is_none_or(|t| t < until) {
            known.valid_until = Some(until);
        }
        // Said if this confirmation runs out before the next one arrives
        // (an agent slow to answer, or slow to renew in the directory).
        known.why = format!(
            "the lease last confirmed by agent {} has run out and no newer confirmation has arrived",
            answer.agent
        );
        self.metrics.valid.set(1);
        self.metrics.remaining_ms.set(answer.remaining_ms as i64);
        tracing::debug!(region = %self.region, remaining_ms = answer.remaining_ms, asked_ms = sent.elapsed().as_millis() as u64, "the region's lease is confirmed");
    }

    fn unknown(&self, why: String) {
        let mut known = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if known.why != why {
            tracing::warn!(region = %self.region, reason = %why, "cannot confirm the region's lease");
        }
        known.why = why;
        if known.valid_until.is_none_or(|t| Instant::now() >= t) {
            self.metrics.valid.set(0);
        }
    }

    /// Asks the region's agent again and again; never returns.
    pub async fn run(self: std::sync::Arc<Self>, group: Group) {
        if !self.required {
            return;
        }
        let key = agent_endpoint_key(&self.region);
        let mut every = FIRST_ASK_EVERY;
        loop {
            match self.ask(&group, &key).await {
                Ok(answer) => every = Duration::from_millis(answer.ttl_ms / 4).max(Duration::from_millis(50)),
                Err(why) => self.unknown(why),
            }
            tokio::time::sleep(every).await;
        }
    }

    async fn ask(&self, group: &Group, key: &str) -> Result<LeaseAnswer, String> {
        let found = tokio::time::timeout(ASK_TIMEOUT, group.kv().get(key, None))
            .await
            .map_err(|_| format!("the region group did not answer a read of {key}"))?
            .map_err(|e| format!("cannot read {key} from the region group: {e}"))?;
        let kv = found
            .kvs()
            .first()
            .ok_or_else(|| "no agent leads the region (nothing at its announcement key)".to_string())?;
        let endpoint: AgentEndpoint =
            serde_json::from_slice(kv.value()).map_err(|e| format!("{key} is unreadable: {e}"))?;
        let sent = Instant::now();
        let (code, body) = tern_common::ops::http_get(&endpoint.http, "/lease", ASK_TIMEOUT).await?;
        if code != 200 {
            return Err(format!(
                "agent {} at {}: {}",
                endpoint.agent,
                endpoint.http,
                body.trim()
            ));
        }
        let answer: LeaseAnswer = serde_json::from_str(&body)
            .map_err(|e| format!("agent {} answered /lease unreadably: {e}", endpoint.agent))?;
        if answer.region != self.region.as_str() {
            return Err(format!(
                "agent {} at {} speaks for region {}, not {}",
                endpoint.agent, endpoint.http, answer.region, self.region
            ));
        }
        self.learned(sent, &answer);
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(remaining_ms: u64) -> LeaseAnswer {
        LeaseAnswer {
            region: "us-east".into(),
            agent: "a".into(),
            leadership: 7,
            remaining_ms,
            ttl_ms: 2000,
        }
    }

    #[test]
    fn validity_runs_from_the_send_time_and_ends_on_time() {
        let gate = LeaseGate::new(
            RegionName::new("us-east").expect("valid"),
            true,
            LeaseMetrics::default(),
        );
        let err = gate.check().expect_err("nothing confirmed yet").to_string();
        assert!(err.contains("us-east") && err.contains("not serving"), "{err}");
        let sent = Instant::now();
        let at = |ms: u64| sent + Duration::from_millis(ms);
        // Answered 300 ms after it was sent.
        gate.learned(sent, &answer(1000));
        gate.check_at(at(300)).expect("valid");
        // 1000 ms from the send, not from the answer.
        gate.check_at(at(999)).expect("still valid");
        let err = gate.check_at(at(1000)).expect_err("ran out").to_string();
        assert!(err.contains("last confirmed by agent a has run out"), "{err}");
        // A late answer with less validity never shortens what is known.
        gate.learned(sent, &answer(500));
        assert!(gate.check_at(at(1000)).is_err());
        gate.learned(at(1000), &answer(800));
        gate.check_at(at(1000)).expect("renewed");
    }

    #[test]
    fn a_gate_that_is_not_required_always_passes() {
        let gate = LeaseGate::new(
            RegionName::new("us-east").expect("valid"),
            false,
            LeaseMetrics::default(),
        );
        gate.check().expect("off");
    }
}
