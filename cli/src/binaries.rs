//! The external binaries `tern demo` and `tern bench` run (the pinned etcd,
//! toxiproxy and Jaeger): the flag that names their directory, and building
//! them with e2e/build-tools.sh when this tern runs from its checkout.

use std::path::PathBuf;

use clap::Args;
use tern_local::assets;

use crate::CliError;

/// Where the pinned binaries are.
#[derive(Args, Debug)]
pub struct AssetsArgs {
    /// Directory holding etcd and toxiproxy-server (and jaeger, for `tern
    /// demo --jaeger`), as e2e/build-tools.sh builds them. Default: $TERN_ASSETS,
    /// else target/controlplane/bin of the checkout this tern was built in.
    // TERN_ASSETS is read by tern-local, not here: the tests set it too, and
    // an empty one means unset there, where clap would refuse it.
    #[arg(long, value_name = "DIR")]
    assets: Option<PathBuf>,
}

impl AssetsArgs {
    /// Names the directory for the rest of this run, then makes sure etcd and
    /// toxiproxy are in it.
    pub fn apply(&self) -> Result<(), CliError> {
        if let Some(dir) = &self.assets {
            assets::use_dir(dir.clone());
        }
        ensure(Tools::EtcdAndToxiproxy)
    }
}

/// The binaries a command runs, by the build-tools.sh modules that make them.
#[derive(Clone, Copy, Debug)]
pub enum Tools {
    EtcdAndToxiproxy,
    Jaeger,
}

impl Tools {
    fn modules(self) -> &'static [&'static str] {
        match self {
            Self::EtcdAndToxiproxy => &["etcd", "toxiproxy"],
            Self::Jaeger => &["jaeger"],
        }
    }

    fn binaries(self) -> &'static [&'static str] {
        match self {
            Self::EtcdAndToxiproxy => &["etcd", "toxiproxy-server"],
            Self::Jaeger => &["jaeger"],
        }
    }

    fn missing(self) -> Option<tern_local::LocalError> {
        self.binaries().iter().find_map(|b| assets::binary(b).err())
    }
}

/// Builds `tools` with e2e/build-tools.sh, into the directory they are looked
/// for in, when they are missing and this tern runs from its checkout;
/// otherwise the error says where they were looked for and how to name them.
pub fn ensure(tools: Tools) -> Result<(), CliError> {
    let Some(missing) = tools.missing() else {
        return Ok(());
    };
    let (Some(checkout), Some(dir)) = (tern_local::source_checkout(), assets::dir()) else {
        return Err(missing.into());
    };
    let script = checkout.join("e2e/build-tools.sh");
    println!(
        "tern: building the pinned {} into {} (once)",
        tools.modules().join(" and "),
        dir.display()
    );
    let status = std::process::Command::new(&script)
        .args(tools.modules())
        .env("TERN_ASSETS", &dir)
        .status()
        .map_err(|e| CliError::Setup(format!("running {}: {e}", script.display())))?;
    if !status.success() {
        return Err(CliError::Setup(format!("{} failed", script.display())));
    }
    match tools.missing() {
        Some(still) => Err(still.into()),
        None => Ok(()),
    }
}
