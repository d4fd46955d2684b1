//! Section 8: what TLS on every link costs. The same in-region writes go
//! through the router of a plain deployment and through that of one with
//! TLS everywhere (client to router with a client certificate, router to
//! etcd with its own, etcd requiring both), in alternating rounds, so
//! that machine noise hits both alike.

use std::collections::BTreeMap;

use tern_api::pb;
use tern_local::{Layout, LocalDeployment};

use super::workload::{ms, round, summarize};
use super::{BenchArgs, OVERHEAD_ROUNDS};
use crate::CliError;

pub async fn run(args: &BenchArgs) -> Result<String, CliError> {
    let layout = |tls| Layout {
        regions: vec![("us-east".to_string(), args.members)],
        directory_members: 1,
        rtt_ms: BTreeMap::new(),
        agents: false,
        otlp_endpoint: None,
        tls,
    };
    println!(
        "tern bench: starting a plain and a TLS region of {} etcd members each",
        args.members
    );
    let plain = LocalDeployment::start(layout(false)).await?;
    let secure = LocalDeployment::start(layout(true)).await?;
    let deployments = [&plain, &secure];
    for d in deployments {
        d.client("us-east")
            .await
            .create_account(pb::CreateAccountRequest {
                account: "bench".into(),
                home_region: "us-east".into(),
                allowed_regions: vec![],
            })
            .await?;
    }
    let mut rounds = [Vec::new(), Vec::new()];
    for r in 0..OVERHEAD_ROUNDS {
        for (i, d) in deployments.iter().enumerate() {
            println!("  tls round {}: {}", r + 1, if i == 0 { "plain" } else { "TLS" });
            let client = d.client("us-east").await;
            rounds[i].push(
                round(args.concurrency, args.round_secs, move |w, n| {
                    let mut c = client.clone();
                    async move { c.put(super::put("bench", &format!("{w}-{}", n % 64))).await.is_ok() }
                })
                .await,
            );
        }
    }
    let (plain_tput, plain_p50, plain_p99) = summarize(&rounds[0]);
    let (tls_tput, tls_p50, tls_p99) = summarize(&rounds[1]);
    Ok(format!(
        "## TLS on every link (in-region router writes, {} writers, {OVERHEAD_ROUNDS} × {} s rounds each, alternating)\n\n\
         | deployment | writes/s | p50 | p99 |\n|---|---:|---:|---:|\n\
         | plain TCP | {plain_tput:.0} | {:.2} ms | {:.2} ms |\n\
         | TLS: client certificates to the router and to etcd | {tls_tput:.0} | {:.2} ms | {:.2} ms |\n\n\
         Throughput ratio TLS/plain: **{:.2}**; added latency p50 {:+.2} ms, p99 {:+.2} ms.\n\n",
        args.concurrency,
        args.round_secs,
        ms(plain_p50),
        ms(plain_p99),
        ms(tls_p50),
        ms(tls_p99),
        tls_tput / plain_tput,
        ms(tls_p50) - ms(plain_p50),
        ms(tls_p99) - ms(plain_p99),
    ))
}
