//! Connecting to an etcd group the same way in every tern process: keep-alives
//! so a dead member is noticed, and retries at start-up because a process may
//! start before its group.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::CommonError;

/// Connects to `endpoints` and waits until one answers a status call, or
/// `deadline` passes. `what` names the group in the error.
pub async fn connect(endpoints: &[String], what: &str, deadline: Duration) -> Result<Client, CommonError> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true);
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let error = match Client::connect(endpoints, Some(options.clone())).await {
            Ok(mut c) => match c.status().await {
                Ok(_) => return Ok(c),
                Err(source) => CommonError::EtcdUnanswered {
                    what: what.to_string(),
                    endpoints: endpoints.join(","),
                    source,
                },
            },
            Err(source) => CommonError::EtcdConnect {
                what: what.to_string(),
                endpoints: endpoints.join(","),
                source,
            },
        };
        if tokio::time::Instant::now() > until {
            return Err(error);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
