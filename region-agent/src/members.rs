//! Raft lag inside the region: every member's own status (one client per
//! member endpoint), compared with the leader's commit index.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tern_common::MemberStatus;
use tern_common::tls::Tls;

use crate::metrics::MemberLabels;
use crate::state::Shared;

/// Polls every member every `interval`, forever.
pub async fn run(endpoints: Vec<String>, tls: Option<Tls>, shared: Arc<Shared>, interval: Duration) {
    let mut clients: Vec<(String, Option<Client>)> = endpoints.into_iter().map(|e| (e, None)).collect();
    loop {
        let mut seen = Vec::new();
        for (endpoint, client) in clients.iter_mut() {
            if client.is_none() {
                *client = tern_common::etcd::client(&[endpoint.as_str()], tls.as_ref(), None)
                    .await
                    .ok();
            }
            let Some(c) = client.as_mut() else { continue };
            match tokio::time::timeout(interval, c.status()).await {
                Ok(Ok(status)) => {
                    let id = status.header().map(|h| h.member_id()).unwrap_or(0);
                    seen.push((
                        endpoint.clone(),
                        id,
                        status.leader(),
                        status.raft_index(),
                        status.raft_applied_index(),
                    ));
                }
                _ => *client = None,
            }
        }
        let commit = seen
            .iter()
            .find(|(_, id, leader, _, _)| id == leader)
            .map(|(_, _, _, raft, _)| *raft);
        let members: Vec<MemberStatus> = seen
            .iter()
            .map(|(endpoint, id, leader, raft_index, applied)| MemberStatus {
                endpoint: endpoint.clone(),
                is_leader: id == leader,
                raft_index: *raft_index,
                applied_index: *applied,
                behind: commit.map(|c| c.saturating_sub(*applied)).unwrap_or(0),
            })
            .collect();
        for m in &members {
            shared
                .metrics
                .member_behind
                .get_or_create(&MemberLabels {
                    member: m.endpoint.clone(),
                })
                .set(m.behind as i64);
        }
        *shared.members.lock().unwrap_or_else(|e| e.into_inner()) = members;
        tokio::time::sleep(interval).await;
    }
}
