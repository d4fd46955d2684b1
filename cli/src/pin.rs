//! `tern pin ACCOUNT [--unpin]`: sets the account's `pinned` flag in its
//! directory placement, compared on the record as read, so a move or
//! another change in between is never overwritten. The follow-the-sun
//! policy skips pinned accounts and says so; manual moves still move them,
//! and a move keeps the flag.

use std::time::Duration;

use clap::Args;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use tern_common::{AccountId, AccountRecord, dir_account_key};

use crate::CliError;

#[derive(Args, Debug)]
pub struct PinArgs {
    /// The account.
    account: String,
    /// Allow automatic moves again.
    #[arg(long)]
    unpin: bool,
    /// Client URLs of the directory group (printed by `tern demo --keep`).
    #[arg(long, env = "TERN_DIRECTORY_ENDPOINTS", value_delimiter = ',', required = true)]
    directory: Vec<String>,
}

pub async fn run(args: PinArgs) -> Result<(), CliError> {
    let account = AccountId::new(&args.account).map_err(|e| CliError::Usage(format!("ACCOUNT: {e}")))?;
    let directory = crate::etcd(&args.directory, "directory", Duration::from_secs(10)).await?;
    let key = dir_account_key(&account);
    let want = !args.unpin;
    // A few tries: a placement that changes between the read and the
    // write (a move's step) is read again.
    for _ in 0..5 {
        let resp = directory
            .clone()
            .get(key.clone(), None)
            .await
            .map_err(|source| CliError::EtcdRequest {
                what: format!("reading the placement of {account}"),
                source,
            })?;
        let Some(kv) = resp.kvs().first() else {
            return Err(CliError::Usage(format!("account {account} does not exist")));
        };
        let mut p: AccountRecord = serde_json::from_slice(kv.value())
            .map_err(|e| CliError::Setup(format!("the placement of {account} is malformed: {e}")))?;
        if let tern_common::AccountState::Migrating { target } = &p.state {
            // The move's switch compares the placement it wrote: a change
            // now would hold the move up.
            return Err(CliError::Usage(format!(
                "account {account} is moving to {target}; pin it once the move is done"
            )));
        }
        if p.pinned == want {
            println!("{account} is {} already", if want { "pinned" } else { "not pinned" });
            return Ok(());
        }
        p.pinned = want;
        let value = serde_json::to_string(&p).map_err(|e| CliError::Setup(e.to_string()))?;
        let done = directory
            .clone()
            .txn(
                Txn::new()
                    .when([Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision())])
                    .and_then([TxnOp::put(key.clone(), value, None)]),
            )
            .await
            .map_err(|source| CliError::EtcdRequest {
                what: format!("writing the placement of {account}"),
                source,
            })?
            .succeeded();
        if done {
            println!(
                "{account} {} (homed in {})",
                if want {
                    "pinned: follow the sun leaves it where it is"
                } else {
                    "unpinned: follow the sun may move it"
                },
                p.home
            );
            return Ok(());
        }
    }
    Err(CliError::Setup(format!(
        "the placement of {account} kept changing; try again"
    )))
}
