//! `tern move-leader REGION [--to ENDPOINT]`: planned switchover of a region
//! group's Raft leader before etcd maintenance on its member (a restart,
//! a host to drain). etcd's MoveLeader hands leadership to a caught-up
//! follower without an election timeout, so writes keep flowing; stopping
//! the leader instead costs an election (about a second at etcd's
//! defaults) in which the region commits nothing.
//!
//! The members are found in the region's record in the directory (its
//! agent publishes them) or given with `--group`.

use std::time::{Duration, Instant};

use clap::Args;
use tern_common::RegionName;

use crate::CliError;

#[derive(Args, Debug)]
pub struct MoveLeaderArgs {
    /// The region whose group's leader moves.
    region: String,
    /// Client URL of the member to lead; default: the follower that has
    /// applied the most.
    #[arg(long)]
    to: Option<String>,
    /// Client URLs of the region's group; default: as its agent published
    /// them in the directory.
    #[arg(long, value_delimiter = ',')]
    group: Vec<String>,
    /// Client URLs of the directory group (printed by `tern demo --keep`).
    #[arg(long, env = "TERN_DIRECTORY_ENDPOINTS", value_delimiter = ',')]
    directory: Vec<String>,
}

/// One member as its own status says.
struct Member {
    endpoint: String,
    id: u64,
    leader: u64,
    applied: u64,
}

async fn members(endpoints: &[String]) -> Vec<Member> {
    let mut out = Vec::new();
    for e in endpoints {
        let Ok(mut c) = tern_common::etcd::client(&[e.as_str()], crate::tls(), None).await else {
            continue;
        };
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), c.status()).await {
            out.push(Member {
                endpoint: e.clone(),
                id: s.header().map(|h| h.member_id()).unwrap_or(0),
                leader: s.leader(),
                applied: s.raft_applied_index(),
            });
        }
    }
    out
}

pub async fn run(args: MoveLeaderArgs) -> Result<(), CliError> {
    let region = RegionName::new(&args.region).map_err(|e| CliError::Usage(format!("REGION: {e}")))?;
    let endpoints = crate::group_endpoints(region.as_str(), &args.group, &args.directory).await?;
    let seen = members(&endpoints).await;
    let Some(leader) = seen.iter().find(|m| m.id == m.leader) else {
        return Err(CliError::Setup(format!(
            "no member of {region}'s group ({}) answers as its leader",
            endpoints.join(", ")
        )));
    };
    let followers: Vec<&Member> = seen.iter().filter(|m| m.id != leader.id).collect();
    let target =
        match &args.to {
            Some(to) if *to == leader.endpoint => {
                println!("{to} leads {region}'s group already");
                return Ok(());
            }
            Some(to) => followers.iter().find(|m| m.endpoint == *to).copied().ok_or_else(|| {
                let known: Vec<&str> = followers.iter().map(|m| m.endpoint.as_str()).collect();
                CliError::Usage(format!(
                    "--to {to}: not an answering follower of {region}'s group (followers: {})",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ))
            })?,
            None => followers.iter().max_by_key(|m| m.applied).copied().ok_or_else(|| {
                CliError::Setup(format!("{region}'s group has no answering follower to take the lead"))
            })?,
        };
    // MoveLeader is served by the leader only.
    let mut c = tern_common::etcd::client(&[leader.endpoint.as_str()], crate::tls(), None)
        .await
        .map_err(|source| CliError::EtcdRequest {
            what: format!("connecting to the leader {}", leader.endpoint),
            source,
        })?;
    let began = Instant::now();
    c.move_leader(target.id).await.map_err(|source| CliError::EtcdRequest {
        what: format!("moving the lead of {region}'s group to {}", target.endpoint),
        source,
    })?;
    let until = began + Duration::from_secs(10);
    loop {
        let now = members(std::slice::from_ref(&target.endpoint)).await;
        if now.first().is_some_and(|m| m.leader == target.id) {
            println!(
                "{region}'s group: leader moved from {} to {} in {} ms",
                leader.endpoint,
                target.endpoint,
                began.elapsed().as_millis()
            );
            return Ok(());
        }
        if Instant::now() > until {
            return Err(CliError::Setup(format!(
                "{} did not become the leader of {region}'s group within 10 s",
                target.endpoint
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
