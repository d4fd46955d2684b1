//! `tern create-account`, `tern put`, `tern get`: one call to a router.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use tern_api::pb;

use crate::CliError;

#[derive(Args, Debug)]
pub struct Target {
    /// Router to talk to (host:port), e.g. one printed by `tern demo --keep`.
    #[arg(long, env = "TERN_ROUTER", default_value = "127.0.0.1:7400")]
    router: SocketAddr,
    /// Deadline of the call, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[command(flatten)]
    target: Target,
    /// Account id.
    account: String,
    /// Home region; default: the router's region.
    #[arg(long, default_value = "")]
    home: String,
}

#[derive(Args, Debug)]
pub struct PutArgs {
    #[command(flatten)]
    target: Target,
    account: String,
    key: String,
    value: String,
    /// Makes the write idempotent: a retry with the same key is applied once.
    #[arg(long, default_value = "")]
    idempotency_key: String,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    #[command(flatten)]
    target: Target,
    account: String,
    key: String,
}

/// Creates `account` homed in `home` through router client `c`, retrying
/// for up to `patience` what the router says to retry: UNAVAILABLE, which
/// a region answers for a moment while its agent claims (or re-claims)
/// its lease, as right after a deployment starts. An account found to
/// exist (a retry after a lost answer) counts as created.
pub async fn create_account_retrying(
    c: &mut tern_api::RouterClient,
    account: &str,
    home: &str,
    patience: Duration,
) -> Result<(), tonic::Status> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let created = c
            .create_account(pb::CreateAccountRequest {
                account: account.to_string(),
                home_region: home.to_string(),
                allowed_regions: vec![],
            })
            .await;
        match created {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
            Err(s) if s.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => return Err(s),
        }
    }
}

fn request<T>(target: &Target, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(Duration::from_millis(target.timeout_ms));
    r
}

pub async fn create(args: CreateArgs) -> Result<(), CliError> {
    let mut c = crate::router(args.target.router).await?;
    let resp = c
        .create_account(request(
            &args.target,
            pb::CreateAccountRequest {
                account: args.account,
                home_region: args.home,
                allowed_regions: vec![],
            },
        ))
        .await?
        .into_inner();
    println!(
        "account {} homed in {} at epoch {}{}",
        resp.account,
        resp.home_region,
        resp.epoch,
        if resp.created { "" } else { " (already existed)" }
    );
    Ok(())
}

pub async fn put(args: PutArgs) -> Result<(), CliError> {
    let mut c = crate::router(args.target.router).await?;
    let resp = c
        .put(request(
            &args.target,
            pb::PutRequest {
                account: args.account,
                key: args.key,
                value: args.value.into_bytes(),
                idempotency_key: args.idempotency_key,
            },
        ))
        .await?
        .into_inner();
    let m = resp.meta.unwrap_or_default();
    println!(
        "committed in {} at revision {} (epoch {}{}{})",
        m.home_region,
        m.revision,
        m.epoch,
        if m.forwarded { ", forwarded" } else { "" },
        if m.replayed { ", replayed: applied before" } else { "" }
    );
    Ok(())
}

pub async fn get(args: GetArgs) -> Result<(), CliError> {
    let mut c = crate::router(args.target.router).await?;
    let resp = c
        .get(request(
            &args.target,
            pb::GetRequest {
                account: args.account,
                key: args.key,
                read: None,
            },
        ))
        .await?
        .into_inner();
    if resp.found {
        println!("{}", String::from_utf8_lossy(&resp.value));
        Ok(())
    } else {
        Err(CliError::Usage("not found".into()))
    }
}
