//! A backup asked for through the group itself: the operator, before it
//! rolls a region's members onto another etcd image, asks the region's
//! agent (which holds the backup volume) for a backup and waits until one
//! is taken. The two keys are in the group being backed up, outside the
//! mirrored range (docs/keys.md):
//!
//! - `/tern/ops/backup-request`, put by whoever asks. Its value says who
//!   and why; what counts is the revision of the put.
//! - `/tern/ops/backup-last`, put by the leading agent after every backup of
//!   its group it takes, scheduled or asked for: [`Taken`].
//!
//! A request at revision R is answered by a backup whose `revision_min` is
//! at least R: that backup's linearizable read came after the request, so
//! it holds everything the group acknowledged before it (docs/backup.md).
//! Revisions, not clocks: the operator's and the agent's clocks need not
//! agree, and a backup begun before the request can never answer it.

use etcd_client::{Client, Compare, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::CommonError;

/// Put by whoever asks for a backup.
pub const REQUEST_KEY: &str = "/tern/ops/backup-request";
/// Put by the agent after each backup of its group.
pub const LAST_KEY: &str = "/tern/ops/backup-last";
const PREFIX: &str = "/tern/ops/backup-";

/// The value of [`REQUEST_KEY`]: who asked, and why (for people reading
/// the key; the agent acts on the revision alone).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub by: String,
    pub reason: String,
    /// What the request is for, so that whoever asked finds its own
    /// request again rather than asking twice (the operator: the image it
    /// rolls onto).
    #[serde(default)]
    pub tag: String,
}

/// The value of [`LAST_KEY`]: the newest backup the agent took of its group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    /// The backup's id (`tern backup list`, `tern restore --backup`).
    pub id: String,
    pub revision_min: i64,
    pub revision_max: i64,
    pub taken_at_ms: u64,
}

fn etcd_error(what: &str, e: etcd_client::Error) -> CommonError {
    CommonError::Backup(format!("{what}: {e}"))
}

/// The request and the last backup, as the group holds them now:
/// `(the request and its revision, if any, the last backup, if any)`. A
/// request whose value cannot be read still counts, with an empty one.
pub async fn read(client: &mut Client) -> Result<(Option<(i64, Request)>, Option<Taken>), CommonError> {
    let resp = client
        .get(PREFIX, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| etcd_error("reading the backup request", e))?;
    let mut request = None;
    let mut last = None;
    for kv in resp.kvs() {
        if kv.key() == REQUEST_KEY.as_bytes() {
            request = Some((
                kv.mod_revision(),
                serde_json::from_slice(kv.value()).unwrap_or_default(),
            ));
        } else if kv.key() == LAST_KEY.as_bytes() {
            last = Some(
                serde_json::from_slice::<Taken>(kv.value())
                    .map_err(|e| CommonError::Backup(format!("{LAST_KEY} holds no backup record: {e}")))?,
            );
        }
    }
    Ok((request, last))
}

/// Asks for a backup; returns the request's revision, for [`answer`].
pub async fn ask(client: &mut Client, request: &Request) -> Result<i64, CommonError> {
    let value = serde_json::to_vec(request).map_err(|e| CommonError::Backup(e.to_string()))?;
    let resp = client
        .put(REQUEST_KEY, value, None::<PutOptions>)
        .await
        .map_err(|e| etcd_error("asking for a backup", e))?;
    resp.header()
        .map(|h| h.revision())
        .ok_or_else(|| CommonError::Backup("etcd's answer to the backup request has no header".into()))
}

/// The backup that answers the request put at `revision`, once there is
/// one.
pub async fn answer(client: &mut Client, revision: i64) -> Result<Option<Taken>, CommonError> {
    let (_, last) = read(client).await?;
    Ok(last.filter(|t| answers(t, revision)))
}

/// Whether `taken` answers a request put at `revision`.
pub fn answers(taken: &Taken, revision: i64) -> bool {
    taken.revision_min >= revision
}

/// Whether a request is waiting: one was put, and no backup taken since
/// answers it.
pub fn pending(request: Option<i64>, last: Option<&Taken>) -> bool {
    match (request, last) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(r), Some(t)) => !answers(t, r),
    }
}

/// Records a backup of the group as its last, if `guard` (the agent's
/// leadership, in its own group) still holds. Returns whether it held.
/// The directory's record has no guard: the agent's leadership lives in
/// its own group, and a record written by an agent deposed a moment ago is
/// still of a backup that was taken.
pub async fn record(client: &mut Client, taken: &Taken, guard: Option<Compare>) -> Result<bool, CommonError> {
    let value = serde_json::to_vec(taken).map_err(|e| CommonError::Backup(e.to_string()))?;
    let resp = client
        .txn(
            Txn::new()
                .when(guard.into_iter().collect::<Vec<_>>())
                .and_then([TxnOp::put(LAST_KEY, value, None)]),
        )
        .await
        .map_err(|e| etcd_error("recording the backup taken", e))?;
    Ok(resp.succeeded())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(revision_min: i64) -> Taken {
        Taken {
            id: "eu-west-x".into(),
            revision_min,
            revision_max: revision_min + 3,
            taken_at_ms: 1,
        }
    }

    #[test]
    fn a_request_is_answered_only_by_a_backup_that_read_after_it() {
        assert!(!pending(None, None), "nothing asked");
        assert!(!pending(None, Some(&taken(5))));
        assert!(pending(Some(7), None), "asked, nothing taken yet");
        // Begun before the request (its read at 6 < 7): it may miss writes
        // acknowledged before the request, so it does not answer.
        assert!(pending(Some(7), Some(&taken(6))));
        assert!(!pending(Some(7), Some(&taken(7))));
        assert!(!pending(Some(7), Some(&taken(9))));
    }

    #[test]
    fn the_keys_are_not_mirrored_to_other_regions() {
        // Each region's request and last backup are its own: a mirror that
        // copied them would make another region's agent answer for us.
        for key in [REQUEST_KEY, LAST_KEY] {
            assert!(key.starts_with(crate::keys::ROOT));
            assert!(!crate::keys::is_mirrored(key.as_bytes()), "{key}");
            // The mirrors watch [MIRRORED_START, MIRRORED_END).
            assert!(key >= crate::keys::MIRRORED_END, "{key}");
        }
    }
}
