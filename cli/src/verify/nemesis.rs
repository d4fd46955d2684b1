//! The nemesis of `tern verify`: the faults a run injects into its local
//! deployment and how each is healed. Link faults go through toxiproxy;
//! process faults need routers and agents as processes of their own
//! (`LocalDeployment::start_with` with binaries), so kill -9 and SIGSTOP hit
//! a real process the way they would in a pod.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use rand::Rng;
use rand::rngs::StdRng;
use tern_local::LocalDeployment;
use tern_local::toxiproxy::Stream;

use crate::CliError;

/// The region whose group has three members: member and leader faults hit it.
pub const REPLICATED: &str = "us-east";

/// A fault the nemesis can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Fault {
    /// Connections between routers reset 100 ms in (half of them), re-armed
    /// every 500 ms: links fail after requests left.
    Reset,
    /// Connections between routers cut after 2 KiB of answers, re-armed.
    Limit,
    /// 300 ms more each way between routers.
    Latency,
    /// 600 ms more on every mirror link, held: BOUNDED reads must notice.
    MirrorDelay,
    /// Everything sent on one class of links vanishes, connections stay
    /// open: one region's router links, the mirror links into one region, or
    /// one directory member's peer link.
    Blackhole,
    /// One region cut off from the others: its router links both ways, the
    /// mirror links both ways, and its directory member's peer link.
    Partition,
    /// kill -9 of one region's router; started again when healing.
    KillRouter,
    /// SIGSTOP of one region's router; SIGCONT when healing.
    PauseRouter,
    /// kill -9 of one region's agent (no step-down); started again.
    KillAgent,
    /// SIGSTOP of one region's agent; SIGCONT when healing.
    PauseAgent,
    /// kill -9 of a follower of us-east's three-member group; restarted.
    KillMember,
    /// kill -9 of us-east's Raft leader; restarted with its data.
    KillLeader,
    /// SIGSTOP of us-east's Raft leader (a hung node); SIGCONT.
    PauseLeader,
    /// The mirror links into one region cut, the other groups compacted at
    /// their newest revision half-way, the links restored: the mirror must
    /// resynchronise from a compacted source.
    Compaction,
    /// One region's clocks 0.5–1.5 s off either way: its agent and router
    /// restarted with the offset; restarted without it when healing.
    ClockOffset,
    /// Every router↔router and mirror link limited to 32 KB/s each way,
    /// held: answers and mirror streams queue up.
    Bandwidth,
    /// One region's agent cut off from the directory (every byte held both
    /// ways): its routers must stop writing before its lease can expire,
    /// and its successor fails it over (runs with this fault turn
    /// automatic failover on). Healed: the link back; the region stays
    /// failed over and quarantines what its successor never had.
    CutDirectory,
    /// A whole region lost: the other regions' mirror links from it cut,
    /// a second later its router, agent and every member of its group
    /// killed; its successor fails it over (automatic failover on), and
    /// what the region acknowledged in that second is lost.
    /// Healed: everything started again; the region stays failed over and
    /// quarantines what its successor never had.
    KillRegion,
    /// One region drained (`tern drain`): its agent moves every account
    /// homed there out with the migration protocol while the workload
    /// runs. Healed: undrained. The drain must have moved accounts.
    Drain,
}

impl Fault {
    /// Faults that lose a region: runs with one turn automatic failover on
    /// and inject nothing else (a killed or paused agent would then be a
    /// lost region too).
    pub fn loses_a_region(self) -> bool {
        matches!(self, Self::CutDirectory | Self::KillRegion)
    }
}

/// What healing undoes, in order.
enum Undo {
    Toxic {
        proxy: String,
        toxic: String,
    },
    Enable(String),
    StartRouter(String),
    ThawRouter(String),
    StartAgent(String),
    ThawAgent(String),
    /// Stop the agent running with a clock offset; start the usual one.
    ReplaceAgent(String),
    /// The same for the router.
    ReplaceRouter(String),
    StartMember(String, usize),
    ThawMember(String, usize),
    /// Every member of the region's group, then its agent and router.
    StartRegion(String),
    /// The region's drain ended (its progress noted first).
    Undrain(String),
}

/// A toxic re-added every 500 ms while the faults hold: toxiproxy's
/// `reset_peer` and `limit_data` act once per connection.
struct Rearm {
    name: &'static str,
    kind: &'static str,
    attributes: serde_json::Value,
    proxies: Vec<String>,
}

/// The faults of one run, injected and held, then healed.
pub struct Nemesis {
    undo: Vec<Undo>,
    rearm: Vec<Rearm>,
    /// Groups to compact half-way through the hold.
    compact: Vec<String>,
    /// (region, source): mirrors a compaction must have forced to resync.
    must_resync: Vec<(String, String)>,
    /// What was injected, for the report: `kill-router(eu-west)`.
    pub described: Vec<String>,
    /// Regions that must have been failed over (and quarantined after
    /// healing) by the end of the run.
    pub lost_regions: Vec<String>,
    /// Drained regions and the moves their drain completed by the heal.
    pub drained: Vec<(String, u64)>,
    used_regions: BTreeSet<String>,
}

impl Nemesis {
    pub fn new() -> Self {
        Self {
            undo: Vec::new(),
            rearm: Vec::new(),
            compact: Vec::new(),
            must_resync: Vec::new(),
            described: Vec::new(),
            lost_regions: Vec::new(),
            drained: Vec::new(),
            used_regions: BTreeSet::new(),
        }
    }

    /// A region no earlier fault of this run has targeted (two process
    /// faults on one agent would undo each other).
    fn pick_region(&mut self, d: &LocalDeployment, rng: &mut StdRng) -> String {
        let free: Vec<String> = d
            .regions
            .iter()
            .map(|r| r.name.clone())
            .filter(|r| !self.used_regions.contains(r))
            .collect();
        let pool = if free.is_empty() {
            d.regions.iter().map(|r| r.name.clone()).collect()
        } else {
            free
        };
        let region = pool[rng.random_range(0..pool.len())].clone();
        self.used_regions.insert(region.clone());
        region
    }

    /// Injects `fault`.
    pub async fn inject(&mut self, d: &mut LocalDeployment, fault: Fault, rng: &mut StdRng) -> Result<(), CliError> {
        let name = fault
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default();
        let router_links: Vec<String> = d.links.values().cloned().collect();
        let mirror_links: Vec<String> = d.mirror_links.values().flatten().cloned().collect();
        let detail = match fault {
            Fault::Reset | Fault::Limit => {
                let (toxic, kind, attributes) = if fault == Fault::Reset {
                    ("reset", "reset_peer", serde_json::json!({"timeout": 100}))
                } else {
                    ("limit", "limit_data", serde_json::json!({"bytes": 2048}))
                };
                for p in &router_links {
                    self.undo.push(Undo::Toxic {
                        proxy: p.clone(),
                        toxic: toxic.into(),
                    });
                }
                self.rearm.push(Rearm {
                    name: toxic,
                    kind,
                    attributes,
                    proxies: router_links,
                });
                String::new()
            }
            Fault::Latency => {
                self.hold_toxic(d, &router_links, "spike", Stream::Upstream, 300)
                    .await?;
                String::new()
            }
            Fault::MirrorDelay => {
                self.hold_toxic(d, &mirror_links, "held", Stream::Downstream, 600)
                    .await?;
                String::new()
            }
            Fault::Bandwidth => {
                let all: Vec<String> = router_links.iter().chain(&mirror_links).cloned().collect();
                for stream in [Stream::Upstream, Stream::Downstream] {
                    let toxic = format!("narrow_{}", stream.as_str());
                    for p in &all {
                        d.toxiproxy
                            .toxic(p, &toxic, "bandwidth", stream, 1.0, serde_json::json!({"rate": 32}))
                            .await?;
                        self.undo.push(Undo::Toxic {
                            proxy: p.clone(),
                            toxic: toxic.clone(),
                        });
                    }
                }
                String::new()
            }
            Fault::Blackhole => {
                let region = self.pick_region(d, rng);
                let (class, proxies) = match rng.random_range(0..3) {
                    0 => ("router links from", links_of(&d.links, &region, true, false)),
                    1 => ("mirror links into", mirror_links_of(d, &region, true, false)),
                    _ => ("directory peer link of", vec![format!("directory-peer-{region}")]),
                };
                for p in &proxies {
                    d.toxiproxy.blackhole(p, Stream::Upstream).await?;
                    self.undo.push(Undo::Toxic {
                        proxy: p.clone(),
                        toxic: format!("blackhole_{}", Stream::Upstream.as_str()),
                    });
                }
                format!("{class} {region}")
            }
            Fault::Partition => {
                let region = self.pick_region(d, rng);
                let mut proxies = links_of(&d.links, &region, true, true);
                proxies.extend(mirror_links_of(d, &region, true, true));
                proxies.push(format!("directory-peer-{region}"));
                for p in proxies {
                    d.toxiproxy.set_enabled(&p, false).await?;
                    self.undo.push(Undo::Enable(p));
                }
                region
            }
            Fault::KillRouter | Fault::PauseRouter => {
                let region = self.pick_region(d, rng);
                let r = d.region_mut(&region);
                if fault == Fault::KillRouter {
                    if let Some(router) = r.router.take() {
                        router.kill();
                    }
                    self.undo.push(Undo::StartRouter(region.clone()));
                } else {
                    let router = r.router.as_ref().expect("routers run until a fault stops them");
                    if !router.freeze(true) {
                        return Err(CliError::Setup("pause-router needs routers as processes".into()));
                    }
                    self.undo.push(Undo::ThawRouter(region.clone()));
                }
                region
            }
            Fault::KillAgent | Fault::PauseAgent => {
                let region = self.pick_region(d, rng);
                let r = d.region_mut(&region);
                if fault == Fault::KillAgent {
                    if let Some(agent) = r.agent.take() {
                        agent.kill();
                    }
                    self.undo.push(Undo::StartAgent(region.clone()));
                } else {
                    if let Some(agent) = &r.agent {
                        agent.freeze(true);
                    }
                    self.undo.push(Undo::ThawAgent(region.clone()));
                }
                region
            }
            Fault::KillMember | Fault::KillLeader | Fault::PauseLeader => {
                let group = &mut d.region_mut(REPLICATED).group;
                let leader = group
                    .leader()
                    .await
                    .ok_or_else(|| CliError::Setup(format!("{REPLICATED}'s group has no leader to fault")))?;
                let target = if fault == Fault::KillMember {
                    (leader + 1) % group.members.len()
                } else {
                    leader
                };
                if fault == Fault::PauseLeader {
                    group.pause(target);
                    self.undo.push(Undo::ThawMember(REPLICATED.into(), target));
                } else {
                    group.kill(target);
                    self.undo.push(Undo::StartMember(REPLICATED.into(), target));
                }
                format!("{REPLICATED} member {target}")
            }
            Fault::Compaction => {
                let region = self.pick_region(d, rng);
                for p in mirror_links_of(d, &region, true, false) {
                    d.toxiproxy.set_enabled(&p, false).await?;
                    self.undo.push(Undo::Enable(p));
                }
                self.compact = d
                    .regions
                    .iter()
                    .filter(|r| r.name != region)
                    .map(|r| r.name.clone())
                    .collect();
                self.must_resync = self.compact.iter().map(|s| (region.clone(), s.clone())).collect();
                format!("mirrors into {region}")
            }
            Fault::CutDirectory => {
                let region = self.pick_region(d, rng);
                for p in &d.agent_directory_links[&region] {
                    for stream in [Stream::Upstream, Stream::Downstream] {
                        d.toxiproxy.blackhole(p, stream).await?;
                        self.undo.push(Undo::Toxic {
                            proxy: p.clone(),
                            toxic: format!("blackhole_{}", stream.as_str()),
                        });
                    }
                }
                self.lost_regions.push(region.clone());
                region
            }
            Fault::KillRegion => {
                let region = self.pick_region(d, rng);
                // The others stop receiving its writes a second before it
                // dies (its links go first): what it acknowledged in that
                // second is lost with it, and must be in its quarantine.
                for p in mirror_links_of(d, &region, false, true) {
                    d.toxiproxy.set_enabled(&p, false).await?;
                    self.undo.push(Undo::Enable(p));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                d.kill_region(&region);
                self.undo.push(Undo::StartRegion(region.clone()));
                self.lost_regions.push(region.clone());
                region
            }
            Fault::Drain => {
                let region = self.pick_region(d, rng);
                let name = tern_common::RegionName::new(&region).expect("the deployment's regions are valid");
                tern_common::drain::set_draining(&mut d.directory_client().await, &name, true)
                    .await
                    .map_err(|e| CliError::Setup(format!("draining {region}: {e}")))?;
                self.undo.push(Undo::Undrain(region.clone()));
                region
            }
            Fault::ClockOffset => {
                let region = self.pick_region(d, rng);
                let offset = rng.random_range(500..1500) * if rng.random_bool(0.5) { 1 } else { -1 };
                let flag = [format!("--clock-offset-ms={offset}")];
                // The region's clocks are off together: its agent's and its
                // router's (which compares the agent's closed time with its
                // own clock).
                if let Some(agent) = d.region_mut(&region).agent.take() {
                    agent.stop().await;
                }
                let agent = d.start_agent(&region, &flag).await?;
                d.region_mut(&region).agent = Some(agent);
                if let Some(router) = d.region_mut(&region).router.take() {
                    router.stop().await;
                }
                d.start_router_with(&region, &flag).await?;
                self.undo.push(Undo::ReplaceAgent(region.clone()));
                self.undo.push(Undo::ReplaceRouter(region.clone()));
                format!("{region} {offset:+} ms")
            }
        };
        self.described.push(if detail.is_empty() {
            name
        } else {
            format!("{name}({detail})")
        });
        Ok(())
    }

    /// A latency toxic of `ms` on `proxies`, held until healing.
    async fn hold_toxic(
        &mut self,
        d: &LocalDeployment,
        proxies: &[String],
        toxic: &str,
        stream: Stream,
        ms: u64,
    ) -> Result<(), CliError> {
        for p in proxies {
            d.toxiproxy
                .toxic(p, toxic, "latency", stream, 1.0, serde_json::json!({"latency": ms}))
                .await?;
            self.undo.push(Undo::Toxic {
                proxy: p.clone(),
                toxic: toxic.into(),
            });
        }
        Ok(())
    }

    /// Holds the faults for `hold`: re-arms the one-shot toxics every 500 ms
    /// and compacts half-way when a compaction was injected.
    pub async fn hold(&mut self, d: &LocalDeployment, hold: Duration) -> Result<(), CliError> {
        let start = Instant::now();
        while start.elapsed() < hold {
            for r in &self.rearm {
                for p in &r.proxies {
                    // A fresh toxic starts its timer and byte count again.
                    // toxiproxy's API times out now and then while its links
                    // are busy resetting; a missed re-arm only makes the
                    // fault milder, so the run goes on.
                    let _ = d.toxiproxy.remove_toxic(p, r.name).await;
                    if let Err(e) = d
                        .toxiproxy
                        .toxic(p, r.name, r.kind, Stream::Downstream, 0.5, r.attributes.clone())
                        .await
                    {
                        tracing::debug!(proxy = %p, error = %e, "could not re-arm a fault");
                    }
                }
            }
            if !self.compact.is_empty() && start.elapsed() >= hold / 2 {
                for region in std::mem::take(&mut self.compact) {
                    compact(d, &region).await?;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(())
    }

    /// Undoes every fault: links back, processes started or thawed.
    pub async fn heal(&mut self, d: &mut LocalDeployment) -> Result<(), CliError> {
        for undo in std::mem::take(&mut self.undo) {
            match undo {
                Undo::Toxic { proxy, toxic } => {
                    // Gone already is fine (a re-arm may have failed).
                    let _ = d.toxiproxy.remove_toxic(&proxy, &toxic).await;
                }
                Undo::Enable(proxy) => d.toxiproxy.set_enabled(&proxy, true).await?,
                Undo::StartRouter(region) => d.start_router(&region).await?,
                Undo::ThawRouter(region) => {
                    if let Some(router) = &d.region(&region).router {
                        router.freeze(false);
                    }
                }
                Undo::StartAgent(region) => {
                    let agent = d.start_agent(&region, &[]).await?;
                    d.region_mut(&region).agent = Some(agent);
                }
                Undo::ThawAgent(region) => {
                    if let Some(agent) = &d.region(&region).agent {
                        agent.freeze(false);
                    }
                }
                Undo::ReplaceAgent(region) => {
                    if let Some(agent) = d.region_mut(&region).agent.take() {
                        agent.stop().await;
                    }
                    let agent = d.start_agent(&region, &[]).await?;
                    d.region_mut(&region).agent = Some(agent);
                }
                Undo::ReplaceRouter(region) => {
                    if let Some(router) = d.region_mut(&region).router.take() {
                        router.stop().await;
                    }
                    d.start_router(&region).await?;
                }
                Undo::StartMember(region, i) => {
                    let group = &mut d.region_mut(&region).group;
                    tokio::task::block_in_place(|| group.restart(i))?;
                }
                Undo::ThawMember(region, i) => d.region(&region).group.resume(i),
                Undo::Undrain(region) => {
                    let name = tern_common::RegionName::new(&region).expect("the deployment's regions are valid");
                    let mut dir = d.directory_client().await;
                    let moved = dir
                        .get(tern_common::dir_region_key(&name), None)
                        .await
                        .ok()
                        .and_then(|r| {
                            serde_json::from_slice::<tern_common::RegionRecord>(r.kvs().first()?.value()).ok()
                        })
                        .and_then(|r| r.drain)
                        .map_or(0, |p| p.moved);
                    self.drained.push((region.clone(), moved));
                    match tern_common::drain::set_draining(&mut dir, &name, false).await {
                        // Lost meanwhile: a failed region is not undrained.
                        Ok(_) | Err(tern_common::drain::DrainRefused::Failed { .. }) => {}
                        Err(e) => return Err(CliError::Setup(format!("undraining {region}: {e}"))),
                    }
                }
                Undo::StartRegion(region) => {
                    let group = &mut d.region_mut(&region).group;
                    tokio::task::block_in_place(|| group.restart_all())?;
                    let agent = d.start_agent(&region, &[]).await?;
                    d.region_mut(&region).agent = Some(agent);
                    d.start_router(&region).await?;
                }
            }
        }
        Ok(())
    }
}

impl Nemesis {
    /// Faults that left no trace where they must have: a fault that did not
    /// bite proves nothing, and a run that claims it is wrong. Today: the
    /// mirrors a compaction cut off must have resynchronised from a
    /// snapshot (within 30 s of healing).
    pub async fn did_not_bite(&self, d: &LocalDeployment) -> Vec<tern_verify::Violation> {
        let mut out = Vec::new();
        // Only a drain alone must have moved accounts: a second fault (a
        // partition, a lagging mirror) may rightly hold every move back.
        for (region, moved) in &self.drained {
            if *moved == 0 && self.described.len() == 1 {
                out.push(tern_verify::Violation {
                    checker: "nemesis",
                    key: String::new(),
                    detail: format!("{region} was drained but its drain moved no account out"),
                });
            }
        }
        // A lost region must have been failed over, and must have written
        // its quarantine once back.
        for region in &self.lost_regions {
            let name = tern_common::RegionName::new(region).expect("the deployment's regions are valid");
            let mut dir = d.directory_client().await;
            let give_up = Instant::now() + Duration::from_secs(30);
            let why = loop {
                let record = dir
                    .get(tern_common::dir_region_key(&name), None)
                    .await
                    .ok()
                    .and_then(|r| serde_json::from_slice::<tern_common::RegionRecord>(r.kvs().first()?.value()).ok());
                let summary = match &record {
                    Some(r) if r.state == tern_common::RegionState::Failed => dir
                        .get(tern_common::dir_quarantine_summary(&name, r.region_epoch), None)
                        .await
                        .ok()
                        .is_some_and(|found| found.count() > 0),
                    _ => false,
                };
                if summary {
                    break None;
                }
                if Instant::now() > give_up {
                    break Some(match record {
                        Some(r) if r.state == tern_common::RegionState::Failed => {
                            format!("{region} was failed over but never wrote its quarantine after healing")
                        }
                        _ => format!("{region} was lost but never failed over"),
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            if let Some(detail) = why {
                out.push(tern_verify::Violation {
                    checker: "nemesis",
                    key: String::new(),
                    detail,
                });
            }
        }
        for (region, source) in &self.must_resync {
            let metric = format!("tern_agent_mirror_resyncs_total{{source=\"{source}\"}}");
            let give_up = Instant::now() + Duration::from_secs(30);
            loop {
                let resyncs = match &d.region(region).agent {
                    Some(agent) => agent.metric(&metric).await.unwrap_or(0.0),
                    None => 0.0,
                };
                if resyncs >= 1.0 {
                    break;
                }
                if Instant::now() > give_up {
                    out.push(tern_verify::Violation {
                        checker: "nemesis",
                        key: String::new(),
                        detail: format!(
                            "compaction: {region}'s mirror of {source} never resynchronised from a snapshot"
                        ),
                    });
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        out
    }
}

/// Router links from (`from`) and/or to (`to`) `region`.
fn links_of(
    links: &std::collections::BTreeMap<(String, String), String>,
    region: &str,
    from: bool,
    to: bool,
) -> Vec<String> {
    links
        .iter()
        .filter(|((a, b), _)| (from && a == region) || (to && b == region))
        .map(|(_, p)| p.clone())
        .collect()
}

/// Mirror links into `region` (its agent reading the others: `into`) and/or
/// out of it (the other agents reading its group: `out`).
fn mirror_links_of(d: &LocalDeployment, region: &str, into: bool, out: bool) -> Vec<String> {
    d.mirror_links
        .iter()
        .filter(|((a, b), _)| (into && a == region) || (out && b == region))
        .flat_map(|(_, p)| p.iter().cloned())
        .collect()
}

/// Compacts `region`'s group at its newest revision.
async fn compact(d: &LocalDeployment, region: &str) -> Result<(), CliError> {
    let mut c = d.group_client(region).await;
    let failed = |source| CliError::EtcdRequest {
        what: format!("compacting {region}'s group"),
        source,
    };
    let revision = c
        .status()
        .await
        .map_err(failed)?
        .header()
        .map(|h| h.revision())
        .unwrap_or(0);
    if revision > 1 {
        c.compact(revision, Some(etcd_client::CompactionOptions::new().with_physical()))
            .await
            .map_err(failed)?;
    }
    Ok(())
}
