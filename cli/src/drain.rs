//! `tern drain REGION` and `tern undrain REGION`: planned switchover. A
//! draining region's agent moves every account homed there out with the
//! migration protocol (nothing is lost), and the region takes no new
//! accounts and no moves in (`tern_common::drain`,
//! `region-agent/src/drain.rs`). `--wait` follows the drain with a progress
//! bar until no account is homed there.
//!
//! Given a directory (`--directory`, a local deployment) it writes the
//! region's record; given a GeoCluster (`--cluster`, as `kubectl tern
//! drain`) it sets `spec.regions[].drain`, which the operator carries into
//! the directory (a drain written straight into the directory of a
//! Kubernetes deployment would be undone by the operator, which follows the
//! spec), and follows `status.regions[].drain`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::Args;
use tern_common::drain::set_draining;
use tern_common::{DrainProgress, RegionName, RegionRecord, RegionState, dir_region_key};

use crate::CliError;

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// The region to drain (or undrain).
    region: String,
    /// Follow the drain until no account is homed in the region, with a
    /// progress bar; the exit status says whether it finished.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, e.g. 30m.
    #[arg(long, default_value = "30m", value_parser = tern_common::parse_duration)]
    timeout: Duration,
    /// Client URLs of the directory group (printed by `tern demo --keep`).
    #[arg(long, env = "TERN_DIRECTORY_ENDPOINTS", value_delimiter = ',')]
    directory: Vec<String>,
    /// Or: the GeoCluster in Kubernetes; sets `spec.regions[].drain` there.
    /// Takes precedence over --directory (and TERN_DIRECTORY_ENDPOINTS).
    #[arg(long)]
    cluster: Option<String>,
    /// Namespace of the GeoCluster.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Kubeconfig; default: $KUBECONFIG or ~/.kube/config.
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
}

/// `tern drain` (`drain` true) or `tern undrain`.
pub async fn run(args: DrainArgs, drain: bool) -> Result<(), CliError> {
    let region = RegionName::new(&args.region).map_err(|e| CliError::Usage(format!("REGION: {e}")))?;
    let verb = if drain { "drain" } else { "undrain" };
    if let Some(cluster) = &args.cluster {
        return kubernetes(&args, cluster, &region, drain).await;
    }
    if args.directory.is_empty() {
        return Err(CliError::Usage(format!(
            "name a directory (--directory URLS, a local deployment) or a GeoCluster in Kubernetes (--cluster NAME) to {verb} {region}"
        )));
    }
    let mut d = crate::etcd(&args.directory, "directory", Duration::from_secs(10)).await?;
    let changed = set_draining(&mut d, &region, drain)
        .await
        .map_err(|e| CliError::Setup(format!("{verb} {region}: {e}")))?;
    match (drain, changed.changed()) {
        (true, true) => println!("{region} drains: its agent moves every account homed there out"),
        (true, false) => println!("{region} is draining already"),
        (false, true) => println!("{region} is active again: no more moves out start; those under way finish"),
        (false, false) => println!("{region} is not draining"),
    }
    if !drain || !args.wait {
        return Ok(());
    }
    let started = tern_common::unix_ms();
    let mut bar = Bar::new();
    let until = Instant::now() + args.timeout;
    loop {
        let key = dir_region_key(&region);
        let found = d.get(key.clone(), None).await.map_err(|source| CliError::EtcdRequest {
            what: format!("reading {key}"),
            source,
        })?;
        let record = found
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice::<RegionRecord>(kv.value()).ok());
        match record.as_ref().map(|r| r.state) {
            Some(RegionState::Draining) => {}
            state => {
                bar.end();
                return Err(CliError::Setup(format!(
                    "{region} stopped draining (it is {}) before it was drained",
                    match state {
                        Some(RegionState::Failed) => "failed over",
                        Some(_) => "active: undrained",
                        None => "gone from the directory",
                    }
                )));
            }
        }
        // Progress counted since this command set the drain (an older
        // count may predate accounts created since).
        if let Some(p) = record
            .and_then(|r| r.drain)
            .filter(|p| p.updated_ms >= started || !changed.changed())
        {
            bar.show(&p);
            if p.homed == 0 && p.moving == 0 {
                bar.end();
                println!("{region} is drained: {} accounts moved out", p.moved);
                return Ok(());
            }
        }
        if Instant::now() > until {
            bar.end();
            return Err(CliError::Setup(format!(
                "{region} was not drained within {:?}",
                args.timeout
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The drain as `spec.regions[].drain` of a GeoCluster, followed through
/// its status.
async fn kubernetes(args: &DrainArgs, cluster: &str, region: &RegionName, drain: bool) -> Result<(), CliError> {
    use kube::api::{Api, Patch, PatchParams};
    use tern_crds::GeoCluster;
    let client = crate::kubernetes::client(args.kubeconfig.as_deref()).await?;
    let api: Api<GeoCluster> = Api::namespaced(client, &args.namespace);
    let ns = &args.namespace;
    let k8s = |what: String| {
        move |e: kube::Error| CliError::Kubernetes {
            what,
            source: Box::new(e),
        }
    };
    let gc = api
        .get(cluster)
        .await
        .map_err(k8s(format!("reading GeoCluster {ns}/{cluster}")))?;
    let Some(index) = gc.spec.regions.iter().position(|r| r.name == region.as_str()) else {
        let names: Vec<&str> = gc.spec.regions.iter().map(|r| r.name.as_str()).collect();
        return Err(CliError::Usage(format!(
            "REGION: GeoCluster {ns}/{cluster} has no region {region} (it has {})",
            names.join(", ")
        )));
    };
    // The whole list (a merge patch replaces lists), compared on the
    // object's resourceVersion: a change since it was read makes it fail.
    let mut regions = gc.spec.regions.clone();
    regions[index].drain = drain;
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": gc.metadata.resource_version},
        "spec": {"regions": regions},
    });
    api.patch(cluster, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(k8s(format!(
            "setting spec.regions[{index}].drain of GeoCluster {ns}/{cluster}"
        )))?;
    println!(
        "GeoCluster {ns}/{cluster}: {region} {}",
        if drain { "set to drain" } else { "undrained" }
    );
    if !drain || !args.wait {
        return Ok(());
    }
    let mut bar = Bar::new();
    let until = Instant::now() + args.timeout;
    let mut seen_draining = false;
    loop {
        let gc = api
            .get(cluster)
            .await
            .map_err(k8s(format!("reading GeoCluster {ns}/{cluster}")))?;
        let status = gc
            .status
            .as_ref()
            .and_then(|s| s.regions.iter().find(|r| r.name == region.as_str()));
        let serving = status.and_then(|s| s.serving.clone());
        if serving.as_deref() == Some("Draining") {
            seen_draining = true;
            if let Some(d) = status.and_then(|s| s.drain.as_ref()) {
                let p = progress(d);
                bar.show(&p);
                if p.homed == 0 && p.moving == 0 {
                    bar.end();
                    println!("{region} is drained: {} accounts moved out", p.moved);
                    return Ok(());
                }
            }
        } else if seen_draining {
            bar.end();
            return Err(CliError::Setup(format!(
                "{region} stopped draining (it is {}) before it was drained",
                serving.as_deref().unwrap_or("unknown")
            )));
        }
        if Instant::now() > until {
            bar.end();
            return Err(CliError::Setup(format!(
                "{region} was not drained within {:?}",
                args.timeout
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A GeoCluster's drain status as the agent's count.
pub fn progress(d: &tern_crds::DrainStatus) -> DrainProgress {
    DrainProgress {
        homed: d.homed.max(0) as u64,
        moving: d.moving.max(0) as u64,
        moved: d.moved.max(0) as u64,
        blocked: d.blocked.max(0) as u64,
        message: d.message.clone(),
        ..Default::default()
    }
}

/// A progress bar redrawn in place on a terminal, a line per change
/// otherwise (logs, CI).
struct Bar {
    terminal: bool,
    last: Option<String>,
}

impl Bar {
    fn new() -> Self {
        Self {
            terminal: std::io::stdout().is_terminal(),
            last: None,
        }
    }

    fn show(&mut self, p: &DrainProgress) {
        let line = render(p);
        if self.last.as_deref() == Some(line.as_str()) {
            return;
        }
        let mut out = std::io::stdout().lock();
        if self.terminal {
            let _ = write!(out, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
        self.last = Some(line);
    }

    fn end(&mut self) {
        if self.terminal && self.last.is_some() {
            println!();
        }
        self.last = None;
    }
}

/// `[#########-----------]  12/40 moved · 3 moving · 1 blocked (acct-9: …)`.
pub fn render(p: &DrainProgress) -> String {
    const WIDTH: u64 = 30;
    // Homed counts the accounts moving; moved ones have left.
    let total = p.moved + p.homed;
    let filled = (p.moved * WIDTH).checked_div(total).unwrap_or(WIDTH);
    let mut line = format!(
        "[{}{}] {:>6}/{} moved · {} moving",
        "#".repeat(filled as usize),
        "-".repeat((WIDTH - filled) as usize),
        p.moved,
        total,
        p.moving
    );
    if p.blocked > 0 {
        line.push_str(&format!(" · {} blocked", p.blocked));
        if let Some(m) = &p.message {
            line.push_str(&format!(" ({m})"));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_counts_moved_against_moved_plus_homed_and_says_why_accounts_are_blocked() {
        let p = DrainProgress {
            homed: 30,
            moving: 3,
            moved: 10,
            blocked: 1,
            message: Some("acct-9: none of its allowed regions [us-east] is active".into()),
            ..Default::default()
        };
        let line = render(&p);
        assert!(
            line.starts_with(&format!("[{}{}]", "#".repeat(7), "-".repeat(23))),
            "{line}"
        );
        assert!(
            line.contains("10/40 moved · 3 moving · 1 blocked (acct-9: none"),
            "{line}"
        );
        let done = render(&DrainProgress {
            moved: 40,
            ..Default::default()
        });
        assert!(done.contains(&"#".repeat(30)) && done.contains("40/40"), "{done}");
    }
}
