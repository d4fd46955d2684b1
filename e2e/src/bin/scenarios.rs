//! `tern-e2e-scenarios`: the multi-cluster scenarios (tern_e2e::scenarios)
//! against clusters someone else made: the kind e2e (e2e/kind/run.sh) runs
//! it with one kubeconfig per region and the command that stops a region's
//! nodes. A test tool: it is not shipped.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tern_e2e::scenarios::{RegionCluster, Scenarios};

#[derive(Parser, Debug)]
#[command(about = "Runs tern's multi-cluster scenarios against one cluster per region")]
struct Args {
    /// REGION=PATH, one per region (us-east, eu-west, ap-south): the
    /// kubeconfig of that region's cluster.
    #[arg(long = "kubeconfig", value_parser = parse_region_path, required = true)]
    kubeconfigs: Vec<(String, PathBuf)>,
    /// Command that stops every node of a region's cluster; `{region}` is
    /// replaced by the region, e.g. 'docker stop tern-{region}-control-plane'.
    #[arg(long)]
    stop_command: String,
    /// kubectl to use.
    #[arg(long, default_value = "kubectl")]
    kubectl: PathBuf,
}

fn parse_region_path(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((region, path)) if !region.is_empty() && !path.is_empty() => Ok((region.to_string(), PathBuf::from(path))),
        _ => Err(format!("'{s}' is not REGION=PATH")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    for want in ["us-east", "eu-west", "ap-south"] {
        if !args.kubeconfigs.iter().any(|(r, _)| r == want) {
            eprintln!(
                "tern-e2e-scenarios: --kubeconfig {want}=PATH is missing (the scenarios use us-east, eu-west and ap-south)"
            );
            return ExitCode::from(2);
        }
    }
    let clusters = args
        .kubeconfigs
        .iter()
        .map(|(region, kubeconfig)| RegionCluster {
            region: region.clone(),
            kubeconfig: kubeconfig.clone(),
        })
        .collect();
    let mut scenarios = Scenarios::new(clusters, args.kubectl.clone());
    let stop = |region: &str| {
        let command = args.stop_command.replace("{region}", region);
        let status = std::process::Command::new("sh").arg("-c").arg(&command).status();
        match status {
            Ok(s) if s.success() => Ok(()),
            other => Err(tern_e2e::HarnessError::Command {
                command,
                stderr: format!("{other:?}"),
            }),
        }
    };
    let result = scenarios.run_all(stop).await;
    eprint!("{}", scenarios.report());
    match result {
        Ok(()) => {
            eprintln!("tern-e2e-scenarios: every scenario passed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tern-e2e-scenarios: {e}");
            ExitCode::FAILURE
        }
    }
}
