//! The multi-cluster scenarios, one cluster per region, shared by the kind
//! e2e (`e2e/kind/run.sh`, through the `tern-e2e-scenarios` binary) and the
//! node e2e (`e2e/tests/nodes.rs`): only the set-up of the clusters differs.
//! Everything here goes through kubectl and the routers' public API, as a
//! person would: install the bundle, apply the GeoCluster, wait for the
//! pods, a local and a proxied write, a region's group resized from one
//! member to three (Raft membership changes by the operator), a migration
//! by `kubectl apply` of an AccountMigration, the trace of a cross-region
//! write in Jaeger, and a region lost with its node and failed over.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_api::pb;

use crate::{HarnessError, Result};

/// The namespace and name of the scenarios' GeoCluster
/// (e2e/kind/manifests/geocluster.yaml).
pub const NAMESPACE: &str = "default";
pub const GEOCLUSTER: &str = "payments";
/// The region whose cluster runs Jaeger.
pub const TRACE_REGION: &str = "us-east";

/// The GeoCluster the scenarios apply, before spec.tls is added.
const MANIFEST: &str = "e2e/kind/manifests/geocluster.yaml";
/// spec.tls.secretPrefix of the scenarios' GeoCluster.
pub const TLS_PREFIX: &str = "payments-tls";

/// The etcd image the rolling update moves the members onto: the default
/// image's etcd under another name, whose tag names the same version (a
/// version etcd's skew rule allows). The node e2e builds it
/// (e2e/tests/nodes.rs), the kind e2e tags it (e2e/kind/run.sh).
pub fn retagged_etcd_image() -> String {
    let tag = tern_crds::DEFAULT_ETCD_IMAGE
        .rsplit_once(':')
        .map(|(_, t)| t)
        .unwrap_or("latest");
    format!("localhost/tern-e2e/etcd-retagged:{tag}-retagged")
}

/// The scenarios run with mutual TLS on every link, as a payments
/// deployment would: a CA made for the run, the Secrets spec.tls names in
/// every cluster, and the harness's own client certificate for the routers.
struct ScenarioTls {
    /// Holds the certificates' files until the run ends.
    _dir: tempfile::TempDir,
    client: tern_common::tls::Tls,
    /// Every region's cluster DNS domain, from the manifest.
    domains: std::collections::BTreeMap<String, String>,
}

/// One region's cluster, as kubectl reaches it.
#[derive(Clone, Debug)]
pub struct RegionCluster {
    pub region: String,
    pub kubeconfig: PathBuf,
}

/// The scenarios over a set of clusters.
pub struct Scenarios {
    pub clusters: Vec<RegionCluster>,
    kubectl: PathBuf,
    /// What each step took, for the report.
    pub timings: Vec<(String, Duration)>,
    tls: Option<ScenarioTls>,
}

/// How long the pods may take to become ready (images are local; etcd
/// members must find each other across the cluster DNS).
const READY_LIMIT: Duration = Duration::from_secs(240);

impl Scenarios {
    pub fn new(clusters: Vec<RegionCluster>, kubectl: PathBuf) -> Self {
        Self {
            clusters,
            kubectl,
            timings: Vec::new(),
            tls: None,
        }
    }

    /// Makes the run's CA and certificates, and creates the Secrets that
    /// spec.tls names in every cluster: one for every etcd member (valid
    /// for the members' and client Services' names in every region), the
    /// operator's, and each region's router's and agent's. Returns the
    /// GeoCluster manifest with spec.tls, to apply.
    fn make_tls(&mut self) -> Result<PathBuf> {
        use tern_common::tls::{ClientAuth, Role, Tls, identity};
        use tern_crds::GroupRole;
        use tern_operator::names;
        let text = std::fs::read_to_string(crate::repo_root().join(MANIFEST)).map_err(|source| HarnessError::Io {
            path: MANIFEST.into(),
            source,
        })?;
        let gc: tern_crds::GeoCluster =
            serde_yaml::from_str(&text).map_err(|e| HarnessError::Scenario(format!("{MANIFEST}: {e}")))?;
        let dir = tempfile::Builder::new()
            .prefix("tern-scenarios-tls-")
            .tempdir()
            .map_err(|source| HarnessError::Io {
                path: std::env::temp_dir().display().to_string(),
                source,
            })?;
        let pki = tern_local::pki::LocalPki::new(&dir.path().join("pki"))?;
        let domains: std::collections::BTreeMap<String, String> = gc
            .spec
            .regions
            .iter()
            .map(|r| {
                let domain = r
                    .cluster_domain
                    .clone()
                    .unwrap_or_else(|| names::DEFAULT_CLUSTER_DOMAIN.into());
                (r.name.clone(), domain)
            })
            .collect();
        let mut etcd_hosts = Vec::new();
        for (region, domain) in &domains {
            for role in [GroupRole::Data, GroupRole::Directory] {
                let group = names::group_name(GEOCLUSTER, region, role);
                etcd_hosts.push(format!("*.{}.{NAMESPACE}.svc.{domain}", names::peer_service(&group)));
                etcd_hosts.push(format!("{}.{NAMESPACE}.svc.{domain}", names::client_service(&group)));
            }
        }
        let mut secrets = vec![
            (
                format!("{TLS_PREFIX}-etcd"),
                pki.issue_for("etcd", &identity(Role::Etcd, "global"), &etcd_hosts)?,
            ),
            (
                format!("{TLS_PREFIX}-operator"),
                pki.issue_client("operator", &identity(Role::Operator, "global"))?,
            ),
        ];
        for (region, domain) in &domains {
            let router = format!("{}.{NAMESPACE}.svc.{domain}", router_service(region));
            secrets.push((
                format!("{TLS_PREFIX}-router-{region}"),
                pki.issue_for(&format!("router-{region}"), &identity(Role::Router, region), &[router])?,
            ));
            secrets.push((
                format!("{TLS_PREFIX}-agent-{region}"),
                pki.issue_client(&format!("agent-{region}"), &identity(Role::Agent, region))?,
            ));
        }
        let client_dir = pki.issue_client("client", &identity(Role::Client, "global"))?;
        let client = Tls::load(&client_dir, ClientAuth::Required)
            .map_err(|e| HarnessError::Scenario(format!("the harness's certificate: {e}")))?;
        let regions: Vec<String> = self.clusters.iter().map(|c| c.region.clone()).collect();
        for r in &regions {
            for (name, files) in &secrets {
                // A cluster reused from an earlier run (kind) may have them.
                self.kubectl(r, &["delete", "secret", name, "-n", NAMESPACE, "--ignore-not-found"])?;
                let from = |key: &str| format!("--from-file={key}={}", files.join(key).display());
                self.kubectl(
                    r,
                    &[
                        "create",
                        "secret",
                        "generic",
                        name,
                        "-n",
                        NAMESPACE,
                        &from(tern_common::tls::CA_FILE),
                        &from(tern_common::tls::CERT_FILE),
                        &from(tern_common::tls::KEY_FILE),
                    ],
                )?;
            }
        }
        // The manifest's last block is in spec: spec.tls goes after it.
        let manifest = dir.path().join("geocluster.yaml");
        std::fs::write(&manifest, format!("{text}  tls:\n    secretPrefix: {TLS_PREFIX}\n")).map_err(|source| {
            HarnessError::Io {
                path: manifest.display().to_string(),
                source,
            }
        })?;
        self.tls = Some(ScenarioTls {
            _dir: dir,
            client,
            domains,
        });
        Ok(manifest)
    }

    fn cluster(&self, region: &str) -> &RegionCluster {
        self.clusters
            .iter()
            .find(|c| c.region == region)
            .unwrap_or_else(|| panic!("no cluster for region {region}"))
    }

    /// Runs kubectl against `region`'s cluster from the repository root.
    pub fn kubectl(&self, region: &str, args: &[&str]) -> Result<String> {
        crate::controlplane::run_kubectl(&self.kubectl, &self.cluster(region).kubeconfig, args).map_err(|e| match e {
            HarnessError::Kubectl { args, stderr } => HarnessError::Kubectl {
                args: format!("(region {region}) {args}"),
                stderr,
            },
            other => other,
        })
    }

    fn timed(&mut self, what: &str, start: Instant) {
        let took = start.elapsed();
        eprintln!("scenario: {what} in {:.1} s", took.as_secs_f64());
        self.timings.push((what.to_string(), took));
    }

    /// Installs tern in every cluster as the README says (the bundle's
    /// multi-cluster overlay for its region), then Jaeger in the trace
    /// region, then the GeoCluster everywhere; waits until every region's
    /// members, router and agent are ready.
    pub async fn install(&mut self) -> Result<()> {
        let start = Instant::now();
        let regions: Vec<String> = self.clusters.iter().map(|c| c.region.clone()).collect();
        for r in &regions {
            self.kubectl(
                r,
                &["apply", "-k", &format!("operator/deploy/overlays/multicluster/{r}")],
            )?;
            self.kubectl(
                r,
                &["wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"],
            )?;
        }
        self.kubectl(TRACE_REGION, &["apply", "-f", "e2e/kind/manifests/jaeger.yaml"])?;
        // The claim the GeoCluster's spec.backup names.
        for r in &regions {
            self.kubectl(r, &["apply", "-f", "e2e/kind/manifests/backups.yaml"])?;
        }
        let manifest = self.make_tls()?;
        let manifest = manifest.display().to_string();
        for r in &regions {
            self.kubectl(r, &["apply", "-f", &manifest])?;
        }
        for r in &regions {
            self.wait_rollout(r, "tern-system", "deployment/tern-operator")?;
        }
        self.wait_rollout(TRACE_REGION, NAMESPACE, "deployment/jaeger")?;
        for r in &regions {
            self.wait_region(r).await?;
        }
        self.timed("install and every region ready", start);
        Ok(())
    }

    fn wait_rollout(&self, region: &str, namespace: &str, what: &str) -> Result<()> {
        let timeout = format!("--timeout={}s", READY_LIMIT.as_secs());
        // A data group's StatefulSet is rolled by the operator (OnDelete),
        // which `rollout status` does not follow: its RegionGroup's Ready
        // condition says when every member is ready.
        if let Some(name) = what.strip_prefix("statefulset.apps/") {
            return self
                .kubectl(
                    region,
                    &[
                        "wait",
                        "-n",
                        namespace,
                        "--for=condition=Ready",
                        &format!("regiongroup/{name}"),
                        &timeout,
                    ],
                )
                .map(|_| ());
        }
        self.kubectl(region, &["rollout", "status", "-n", namespace, what, &timeout])
            .map(|_| ())
    }

    /// The region's StatefulSets (its group, its directory member) have all
    /// their members ready, and its router and agent are available.
    async fn wait_region(&self, region: &str) -> Result<()> {
        let deadline = Instant::now() + READY_LIMIT;
        let selector = format!("tern.dev/geocluster={GEOCLUSTER}");
        // The operator creates the objects after the GeoCluster is seen.
        loop {
            let sets = self.kubectl(
                region,
                &["get", "statefulsets", "-n", NAMESPACE, "-l", &selector, "-o", "name"],
            )?;
            let deployments = self.kubectl(
                region,
                &["get", "deployments", "-n", NAMESPACE, "-l", &selector, "-o", "name"],
            )?;
            if sets.lines().count() >= 2 && deployments.lines().count() >= 2 {
                for name in sets.lines().chain(deployments.lines()) {
                    self.wait_rollout(region, NAMESPACE, name.trim())?;
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::NotReady {
                    what: format!("the {region} objects of GeoCluster {GEOCLUSTER}"),
                    secs: READY_LIMIT.as_secs(),
                    log: format!("statefulsets: {sets}\ndeployments: {deployments}"),
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Resizes `region`'s group to `to` members by editing the GeoCluster
    /// in every cluster (they share one spec), replaces the region's
    /// operator pods once the change has begun, and waits until the
    /// operator has carried it out: etcd lists `to` voters, every member's
    /// pod is ready, and no change is in progress.
    pub async fn resize(&mut self, region: &str, to: i32) -> Result<()> {
        let start = Instant::now();
        let index = self.region_index(region)?;
        let patch = format!(r#"[{{"op":"replace","path":"/spec/regions/{index}/replicas","value":{to}}}]"#);
        self.patch_geocluster("json", &patch)?;
        let group = format!("{GEOCLUSTER}-{region}");
        let deadline = Instant::now() + READY_LIMIT;
        let mut restarted = false;
        loop {
            let rg = self.regiongroup(region, &group)?;
            let status = &rg["status"];
            let raft = status["raftMembers"].as_array().map_or(0, Vec::len);
            let ready = status["readyMembers"].as_i64().unwrap_or(0);
            let change = status["membershipChange"].as_str();
            if raft == to as usize && ready == i64::from(to) && change.is_none() {
                break;
            }
            if let Some(step) = change
                && !restarted
            {
                // The operator's pods are replaced in the middle of the
                // change, as a rolling upgrade of the operator would: the
                // new leader finishes it from what etcd reports.
                eprintln!("scenario: {region}'s operator replaced during \"{step}\"");
                self.kubectl(
                    region,
                    &[
                        "delete",
                        "pod",
                        "-n",
                        "tern-system",
                        "-l",
                        "app.kubernetes.io/name=tern-operator",
                        "--timeout=60s",
                    ],
                )?;
                restarted = true;
            }
            if Instant::now() > deadline {
                return Err(HarnessError::NotReady {
                    what: format!("{region}'s group resized to {to} members"),
                    secs: READY_LIMIT.as_secs(),
                    log: format!("RegionGroup status: {status}"),
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // The region's router and agent list the group's members: they
        // roll to the new list, and a port-forward opened while the old
        // pods terminate would fail.
        self.wait_region(region).await?;
        let members = if to == 1 { "member" } else { "members" };
        self.timed(&format!("{region}'s group resized to {to} {members}"), start);
        Ok(())
    }

    /// Where `region` is in the GeoCluster's spec.regions, for a JSON patch.
    fn region_index(&self, region: &str) -> Result<usize> {
        let names = self.kubectl(
            region,
            &[
                "get",
                "geocluster",
                GEOCLUSTER,
                "-n",
                NAMESPACE,
                "-o",
                "jsonpath={.spec.regions[*].name}",
            ],
        )?;
        names
            .split_whitespace()
            .position(|n| n == region)
            .ok_or_else(|| failed(format!("{region} is not among the GeoCluster's regions: {names}")))
    }

    /// Loses `region`'s data group, its StatefulSet and every member's
    /// volume, and has the operator restore it from the backup taken
    /// before the image roll (GeoCluster regions[].restoreFrom): a Job per
    /// member restores that member's volume, then the members start on it.
    /// `kept` was written before the backup and must read back; the write
    /// to `lost` came after it and must be gone, as status.restore says.
    pub async fn restore_lost_group(&mut self, region: &str, kept: &str, lost: &str) -> Result<()> {
        let start = Instant::now();
        let group = format!("{GEOCLUSTER}-{region}");
        let backup = self.group_status(region, &group, "preUpgradeBackup.backup")?;
        let backup = backup.trim().to_string();
        check(!backup.is_empty(), format!("{group} has no backup to restore"))?;
        let index = self.region_index(region)?;
        let patch = format!(r#"[{{"op":"add","path":"/spec/regions/{index}/restoreFrom","value":"{backup}"}}]"#);
        self.patch_geocluster("json", &patch)?;
        // The GeoCluster's restoreFrom reaches the region's RegionGroup
        // first, as docs/backup.md asks.
        self.kubectl(
            region,
            &[
                "wait",
                "-n",
                NAMESPACE,
                &format!("--for=jsonpath={{.spec.restore.backup}}={backup}"),
                &format!("regiongroup/{group}"),
                "--timeout=60s",
            ],
        )?;
        // The claims first: they stay while their pods run, so that the
        // operator, which makes a deleted StatefulSet again, finds them
        // going and waits, rather than starting members on them.
        let selector = format!("app.kubernetes.io/name=etcd,app.kubernetes.io/instance={group}");
        self.kubectl(
            region,
            &["delete", "pvc", "-n", NAMESPACE, "-l", &selector, "--wait=false"],
        )?;
        self.kubectl(region, &["delete", "statefulset", &group, "-n", NAMESPACE])?;
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            let rg = self.regiongroup(region, &group)?;
            let restore = &rg["status"]["restore"];
            let ready = rg["status"]["readyMembers"].as_i64().unwrap_or(0);
            let done = restore["done"].as_bool() == Some(true) && restore["backup"].as_str() == Some(backup.as_str());
            // Once the member serves, the operator makes the accounts'
            // fences agree with the directory, which moved on since the
            // backup: `lost` was created after it.
            let fences = restore["fences"].as_str().unwrap_or_default();
            if done && ready == rg["spec"]["replicas"].as_i64().unwrap_or(-1) && !fences.is_empty() {
                eprintln!("scenario: {group}: {}", restore["message"].as_str().unwrap_or_default());
                eprintln!("scenario: {group}: {fences}");
                check(
                    fences.contains(lost),
                    format!(
                        "{group}'s fences after the restore do not name {lost}, created after the backup: {fences}"
                    ),
                )?;
                break;
            }
            if Instant::now() > deadline {
                let jobs = self.kubectl(region, &["get", "jobs,pods,pvc", "-n", NAMESPACE, "-o", "wide"])?;
                return Err(HarnessError::NotReady {
                    what: format!("{group} restored from {backup}"),
                    secs: READY_LIMIT.as_secs(),
                    log: format!("status.restore: {restore}\nready members: {ready}\n{jobs}"),
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // The router and agent find the new members; the agent's lease of
        // before the backup runs out first.
        self.wait_region(region).await?;
        let (_fwd, mut c) = self.router_client(region).await?;
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            match get(&mut c, kept, "k").await {
                Ok(v) if v == "local" => break,
                other if Instant::now() > deadline => {
                    return Err(failed(format!(
                        "{kept}'s write before the backup does not read back from the restored {group}: {other:?}"
                    )));
                }
                _ => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
        // The account created after the backup is there again, without
        // the write made after the backup, and takes writes.
        let after = get(&mut c, lost, "k").await?;
        check(
            after.is_empty(),
            format!(
                "{lost}'s write after the backup reads back from the restored {group} ({after:?}): the volume was not restored"
            ),
        )?;
        put(&mut c, lost, "k", "after-restore").await?;
        eprintln!(
            "scenario: {group} restored from {backup}: {kept} kept; {lost}'s later write lost, the account writable again"
        );
        self.timed(&format!("{region}'s lost group restored from its backup"), start);
        Ok(())
    }

    /// Loses the volume of each member in `losses` at once (its claim and
    /// pod deleted, as after a node lost with its local volume): the
    /// StatefulSet makes the claim again, empty, and the member cannot
    /// start on it. The operator replaces the member (removed from Raft,
    /// added back as a learner, promoted once caught up), and the group
    /// serves what it held. For a directory share's member, the directory
    /// is the group: its other regions' members keep the quorum. Each
    /// loss's account reads back what it held, through its region's
    /// router (which finds it through the directory), and takes a write.
    pub async fn replace_lost_members(&mut self, losses: &[Loss<'_>]) -> Result<()> {
        let start = Instant::now();
        let member = |l: &Loss| format!("{}-{}", l.group, l.ordinal);
        // The operator knows the member's volume once every member has been
        // ready on its own.
        let mut recorded = Vec::new();
        let mut before = Vec::new();
        for l in losses {
            let member = member(l);
            let deadline = Instant::now() + READY_LIMIT;
            let uid = loop {
                let rg = self.regiongroup(l.region, &l.group)?;
                if let Some(uid) = rg["status"]["memberVolumes"][&member].as_str() {
                    break uid.to_string();
                }
                if Instant::now() > deadline {
                    return Err(failed(format!("{} never recorded the volume of {member}", l.group)));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            };
            recorded.push(uid);
            let (_fwd, mut c) = self.router_client(l.region).await?;
            before.push(get(&mut c, l.account, "k").await?);
        }
        let lost_at = Instant::now();
        for l in losses {
            let member = member(l);
            let claim = format!("data-{member}");
            self.kubectl(l.region, &["delete", "pvc", &claim, "-n", NAMESPACE, "--wait=false"])?;
            self.kubectl(l.region, &["delete", "pod", &member, "-n", NAMESPACE])?;
        }
        for (i, l) in losses.iter().enumerate() {
            let member = member(l);
            let deadline = Instant::now() + READY_LIMIT;
            loop {
                let rg = self.regiongroup(l.region, &l.group)?;
                let st = &rg["status"];
                let now = st["memberVolumes"][&member].as_str().unwrap_or_default();
                let ready = st["readyMembers"].as_i64().unwrap_or(0);
                let wanted = rg["spec"]["replicas"].as_i64().unwrap_or(-1);
                if !now.is_empty() && now != recorded[i] && st["memberReplacement"].is_null() && ready == wanted {
                    break;
                }
                if Instant::now() > deadline {
                    let pods = self.kubectl(l.region, &["get", "pods,pvc", "-n", NAMESPACE, "-o", "wide"])?;
                    return Err(HarnessError::NotReady {
                        what: format!("{member} replaced after its volume was lost"),
                        secs: READY_LIMIT.as_secs(),
                        log: format!("status: {st}\n{pods}"),
                    });
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let (_fwd, mut c) = self.router_client(l.region).await?;
            let after = get(&mut c, l.account, "k").await?;
            check(
                after == before[i],
                format!(
                    "{} read {:?} before {member}'s volume was lost and {after:?} after its replacement",
                    l.account, before[i]
                ),
            )?;
            // Under a key of its own: the value of "k" is what later
            // scenarios read back (us-east's restore).
            put(&mut c, l.account, "replaced", "after-replacement").await?;
            eprintln!(
                "scenario: {member}'s lost volume: the member replaced ({:.1} s after the loss), {} kept and writable",
                lost_at.elapsed().as_secs_f64(),
                l.account
            );
        }
        let what: Vec<String> = losses.iter().map(member).collect();
        self.timed(&format!("lost volumes of {} replaced", what.join(" and ")), start);
        Ok(())
    }

    /// Waits until `region`'s group has its Raft membership in status
    /// (`spec.replicas` members) and its ConfigMap tells a member that
    /// starts without data to join it (`existing`), not to bootstrap.
    pub async fn membership_recorded(&mut self, region: &str) -> Result<()> {
        let start = Instant::now();
        let group = format!("{GEOCLUSTER}-{region}");
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            let rg = self.regiongroup(region, &group)?;
            let want = rg["spec"]["replicas"].as_i64().unwrap_or(-1);
            let raft = rg["status"]["raftMembers"].as_array().map_or(0, Vec::len);
            let state = self.kubectl(
                region,
                &[
                    "get",
                    "configmap",
                    &tern_operator::names::config_map(&group),
                    "-n",
                    NAMESPACE,
                    "-o",
                    "jsonpath={.data.initial-cluster-state}",
                ],
            )?;
            if i64::try_from(raft).ok() == Some(want) && state.trim() == "existing" {
                break;
            }
            if Instant::now() > deadline {
                return Err(failed(format!(
                    "{group}'s membership never recorded: {raft} raftMembers of {want}, initial-cluster-state {state:?}"
                )));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.timed(&format!("{group}'s membership recorded"), start);
        Ok(())
    }

    /// The only member of `region`'s group loses its volume (its claim and
    /// pod deleted, as a node lost with its local disk): the group's data is
    /// gone. The operator must hold the region in the directory
    /// (status.memberReplacement.held), and the member, told to join the
    /// cluster it had, must not start a new, empty one: its pod stays
    /// unready. `restore_lost_group` brings it back.
    pub async fn lose_only_member_volume(&mut self, region: &str) -> Result<()> {
        let start = Instant::now();
        let group = format!("{GEOCLUSTER}-{region}");
        let member = format!("{group}-0");
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            let rg = self.regiongroup(region, &group)?;
            let st = &rg["status"];
            let one = rg["spec"]["replicas"].as_i64() == Some(1);
            if one
                && st["memberVolumes"][&member].is_string()
                && st["raftMembers"].as_array().is_some_and(|m| m.len() == 1)
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(failed(format!(
                    "{group} never recorded the volume and membership of its only member: {st}"
                )));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.kubectl(
            region,
            &[
                "delete",
                "pvc",
                &format!("data-{member}"),
                "-n",
                NAMESPACE,
                "--wait=false",
            ],
        )?;
        self.kubectl(region, &["delete", "pod", &member, "-n", NAMESPACE])?;
        let deadline = Instant::now() + READY_LIMIT;
        let message = loop {
            let rg = self.regiongroup(region, &group)?;
            let r = &rg["status"]["memberReplacement"];
            if r["held"].as_bool() == Some(true) {
                break r["message"].as_str().unwrap_or_default().to_string();
            }
            if Instant::now() > deadline {
                let pods = self.kubectl(region, &["get", "pods,pvc", "-n", NAMESPACE, "-o", "wide"])?;
                return Err(HarnessError::NotReady {
                    what: format!("region {region} held after {member} lost its volume"),
                    secs: READY_LIMIT.as_secs(),
                    log: format!("status: {}\n{pods}", rg["status"]),
                });
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        eprintln!("scenario: {group}: {message}");
        // Long enough for an empty member to have started and become
        // ready, had it bootstrapped a cluster of its own.
        let watch_until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < watch_until {
            let ready = self.kubectl(
                region,
                &[
                    "get",
                    "pod",
                    &member,
                    "-n",
                    NAMESPACE,
                    "--ignore-not-found",
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ],
            )?;
            check(
                ready.trim() != "True",
                format!("{member} became ready on an empty volume: it started a new cluster of its own"),
            )?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.timed(&format!("{member}'s lost volume: region {region} held"), start);
        Ok(())
    }

    /// Sets spec.failover.mode in every cluster and waits until every
    /// region's agents run with it (a flag: they roll).
    pub async fn set_failover_mode(&mut self, mode: &str) -> Result<()> {
        let start = Instant::now();
        self.patch_geocluster("merge", &format!(r#"{{"spec":{{"failover":{{"mode":"{mode}"}}}}}}"#))?;
        let flag = format!("--failover-mode={}", mode.to_lowercase());
        let regions: Vec<String> = self.clusters.iter().map(|c| c.region.clone()).collect();
        for r in &regions {
            let agent = tern_operator::build::components::Component::Agent.name(GEOCLUSTER, r);
            let deadline = Instant::now() + READY_LIMIT;
            loop {
                let args = self.kubectl(
                    r,
                    &[
                        "get",
                        "deployment",
                        &agent,
                        "-n",
                        NAMESPACE,
                        "-o",
                        "jsonpath={.spec.template.spec.containers[0].args}",
                    ],
                )?;
                if args.contains(&flag) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(HarnessError::NotReady {
                        what: format!("{agent} with {flag}"),
                        secs: READY_LIMIT.as_secs(),
                        log: args,
                    });
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            self.wait_rollout(r, NAMESPACE, &format!("deployment/{agent}"))?;
        }
        self.timed(&format!("failover mode {mode} in every region's agents"), start);
        Ok(())
    }

    /// Patches the GeoCluster in every cluster (they share one spec);
    /// `kind` is kubectl's patch type (`json`, `merge`).
    fn patch_geocluster(&self, kind: &str, patch: &str) -> Result<()> {
        for c in &self.clusters {
            self.kubectl(
                &c.region,
                &[
                    "patch",
                    "geocluster",
                    GEOCLUSTER,
                    "-n",
                    NAMESPACE,
                    &format!("--type={kind}"),
                    "-p",
                    patch,
                ],
            )?;
        }
        Ok(())
    }

    /// Changes the etcd members' template (their CPU request and their
    /// image, [`retagged_etcd_image`]) in every cluster and waits until each
    /// region's data group has rolled onto it: the operator has the region's
    /// agent take a backup first (spec.backup), then restarts one member at
    /// a time, the leader last after handing its leadership over (an event
    /// says so in a group of more than one), and every member is ready on
    /// the new revision.
    pub async fn rolling_update(&mut self, cpu: &str) -> Result<()> {
        let start = Instant::now();
        let image = retagged_etcd_image();
        let patch =
            format!(r#"{{"spec":{{"etcd":{{"image":"{image}","resources":{{"requests":{{"cpu":"{cpu}"}}}}}}}}}}"#);
        let regions: Vec<String> = self.clusters.iter().map(|c| c.region.clone()).collect();
        // Each group's revision before: the roll must end on another one
        // (right after the patch, the StatefulSet still names the old one).
        let mut before = std::collections::BTreeMap::new();
        for r in &regions {
            let group = format!("{GEOCLUSTER}-{r}");
            let revision = self.kubectl(
                r,
                &[
                    "get",
                    "statefulset",
                    &group,
                    "-n",
                    NAMESPACE,
                    "-o",
                    "jsonpath={.status.updateRevision}",
                ],
            )?;
            before.insert(r.clone(), revision.trim().to_string());
        }
        self.patch_geocluster("merge", &patch)?;
        let deadline = Instant::now() + READY_LIMIT;
        for r in &regions {
            let group = format!("{GEOCLUSTER}-{r}");
            loop {
                let sts = self.statefulset(r, &group)?;
                let container = &sts["spec"]["template"]["spec"]["containers"][0];
                let cpu_now = container["resources"]["requests"]["cpu"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let image_now = container["image"].as_str().unwrap_or_default().to_string();
                let revision = sts["status"]["updateRevision"].as_str().unwrap_or_default().to_string();
                let seen = sts["status"]["observedGeneration"].as_i64() >= sts["metadata"]["generation"].as_i64();
                let new_revision = seen && !revision.is_empty() && before.get(r) != Some(&revision);
                let pods = self.pod_revisions(r, &group)?;
                let replicas = sts["spec"]["replicas"].as_u64().unwrap_or(0) as usize;
                let rolled = pods.lines().filter(|l| *l == format!("{revision} true")).count();
                let status = self.group_status(r, &group, "rollingUpdate")?;
                if cpu_now == cpu
                    && image_now == image
                    && new_revision
                    && rolled == replicas
                    && status.trim().is_empty()
                {
                    // The operator's account: one restart per member, and
                    // in a group of more than one the lead handed over
                    // before the last restart (the old leader's). Repeats
                    // of an event are one object with a series.
                    let events = self.group_events(r, &group)?;
                    let (mut restarts, mut last_restart, mut handed) = (0, String::new(), String::new());
                    let (mut first_restart, mut backed_up) = (None::<String>, None::<String>);
                    for line in events.lines() {
                        let f: Vec<&str> = line.split_whitespace().collect();
                        let (Some(reason), Some(at)) = (f.first(), f.get(1)) else {
                            continue;
                        };
                        let count = f.get(2).and_then(|c| c.parse::<usize>().ok()).unwrap_or(1);
                        let last = f.get(3).copied().unwrap_or(at).to_string();
                        match *reason {
                            "MemberRestarted" => {
                                restarts += count;
                                last_restart = last_restart.max(last);
                                if first_restart.as_deref().is_none_or(|f| *at < f) {
                                    first_restart = Some(at.to_string());
                                }
                            }
                            "LeaderHandedOver" => handed = handed.max(last),
                            // Its first report: a reconcile that read a
                            // status a moment old may report it again.
                            "PreUpgradeBackupTaken" if backed_up.as_deref().is_none_or(|b| *at < b) => {
                                backed_up = Some(at.to_string());
                            }
                            _ => {}
                        }
                    }
                    if restarts != replicas || (replicas > 1 && (handed.is_empty() || handed > last_restart)) {
                        return Err(failed(format!(
                            "{group}: {restarts} restarts for {replicas} members; the last at {last_restart}, the hand-over at {handed:?}; events:\n{events}"
                        )));
                    }
                    // The image changed: the agent's backup came before the
                    // first restart, and the status names it.
                    let backup = self.group_status(r, &group, "preUpgradeBackup.backup")?;
                    if backup.trim().is_empty() || backed_up.is_none() || backed_up > first_restart {
                        return Err(failed(format!(
                            "{group}: the pre-upgrade backup {backup:?} (taken at {backed_up:?}) must come before the first restart ({first_restart:?}); events:\n{events}"
                        )));
                    }
                    eprintln!(
                        "scenario: {group} backed up as {} before its first restart onto {image}",
                        backup.trim()
                    );
                    break;
                }
                if Instant::now() > deadline {
                    return Err(HarnessError::NotReady {
                        what: format!("{group} rolled onto {image} with a CPU request of {cpu}"),
                        secs: READY_LIMIT.as_secs(),
                        log: format!("pods (revision ready), want {revision}:\n{pods}\nrolling update: {status}"),
                    });
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        // The directory's shares, one per cluster, roll too: by their
        // operators (OnDelete), one directory member at a time, after a
        // backup of the directory.
        for r in &regions {
            let group = format!("{GEOCLUSTER}-dir-{r}");
            loop {
                let sts = self.statefulset(r, &group)?;
                let strategy = sts["spec"]["updateStrategy"]["type"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let image_now = sts["spec"]["template"]["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let revision = sts["status"]["updateRevision"].as_str().unwrap_or_default().to_string();
                let replicas = sts["spec"]["replicas"].as_u64().unwrap_or(0) as usize;
                let pods = self.pod_revisions(r, &group)?;
                let rolled = pods.lines().filter(|l| *l == format!("{revision} true")).count();
                let status = self.group_status(r, &group, "rollingUpdate")?;
                if image_now == image && rolled == replicas && status.trim().is_empty() {
                    check(
                        strategy == "OnDelete",
                        format!("{group}'s StatefulSet rolls by {strategy:?}, not by its operator (OnDelete)"),
                    )?;
                    let events = self.group_events(r, &group)?;
                    // Repeats of an event are one object with a series.
                    let restarts: usize = events
                        .lines()
                        .filter_map(|l| {
                            let f: Vec<&str> = l.split_whitespace().collect();
                            (f.first() == Some(&"MemberRestarted"))
                                .then(|| f.get(2).and_then(|c| c.parse::<usize>().ok()).unwrap_or(1))
                        })
                        .sum();
                    check(
                        restarts == replicas,
                        format!("{group}: {restarts} restarts by the operator for {replicas} members"),
                    )?;
                    // The template waited for a backup of the directory,
                    // asked through the directory.
                    let backup = self.group_status(r, &group, "preUpgradeBackup.backup")?;
                    check(
                        !backup.trim().is_empty(),
                        format!("{group} rolled onto {image} without a pre-upgrade backup of the directory"),
                    )?;
                    eprintln!(
                        "scenario: {group} rolled by its operator after directory backup {}",
                        backup.trim()
                    );
                    break;
                }
                if Instant::now() > deadline {
                    return Err(HarnessError::NotReady {
                        what: format!("directory share {group} rolled onto {image}"),
                        secs: READY_LIMIT.as_secs(),
                        log: format!("pods (revision ready), want {revision}:\n{pods}\nrolling update: {status}"),
                    });
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        self.timed(
            "every data group backed up, then rolled onto a new etcd image, leaders last; the directory one member at a time",
            start,
        );
        Ok(())
    }

    /// A StatefulSet as JSON.
    fn statefulset(&self, region: &str, name: &str) -> Result<serde_json::Value> {
        let json = self.kubectl(region, &["get", "statefulset", name, "-n", NAMESPACE, "-o", "json"])?;
        serde_json::from_str(&json).map_err(|e| failed(format!("StatefulSet {name}: {e}")))
    }

    /// Each member pod of `group`: its revision and whether its container
    /// is ready, a line each.
    fn pod_revisions(&self, region: &str, group: &str) -> Result<String> {
        self.kubectl(
            region,
            &[
                "get",
                "pods",
                "-n",
                NAMESPACE,
                "-l",
                &format!("app.kubernetes.io/name=etcd,app.kubernetes.io/instance={group}"),
                "-o",
                r#"jsonpath={range .items[*]}{.metadata.labels.controller-revision-hash} {.status.containerStatuses[0].ready}{"\n"}{end}"#,
            ],
        )
    }

    /// The events about `group`: reason, time, series count and last time,
    /// a line each (repeats of an event are one object with a series).
    fn group_events(&self, region: &str, group: &str) -> Result<String> {
        self.kubectl(
            region,
            &[
                "get",
                "events.v1.events.k8s.io",
                "-n",
                NAMESPACE,
                "--field-selector",
                &format!("regarding.name={group}"),
                "-o",
                r#"jsonpath={range .items[*]}{.reason} {.eventTime} {.series.count} {.series.lastObservedTime}{"\n"}{end}"#,
            ],
        )
    }

    /// A RegionGroup as JSON.
    fn regiongroup(&self, region: &str, group: &str) -> Result<serde_json::Value> {
        let json = self.kubectl(region, &["get", "regiongroup", group, "-n", NAMESPACE, "-o", "json"])?;
        serde_json::from_str(&json).map_err(|e| failed(format!("RegionGroup {group}: {e}")))
    }

    /// One field of a RegionGroup's status (`path` under `.status`), as
    /// kubectl prints it.
    fn group_status(&self, region: &str, group: &str, path: &str) -> Result<String> {
        self.kubectl(
            region,
            &[
                "get",
                "regiongroup",
                group,
                "-n",
                NAMESPACE,
                "-o",
                &format!("jsonpath={{.status.{path}}}"),
            ],
        )
    }

    /// A port-forward to `service`'s `port` in `region`'s cluster.
    pub fn forward(&self, region: &str, service: &str, port: u16) -> Result<PortForward> {
        PortForward::start(
            &self.kubectl,
            &self.cluster(region).kubeconfig,
            NAMESPACE,
            service,
            port,
        )
    }

    /// A port-forward to `region`'s router.
    pub fn router(&self, region: &str) -> Result<PortForward> {
        self.forward(region, &router_service(region), 7400)
    }

    /// A port-forward to `region`'s router and a client over it: TLS with
    /// the harness's certificate, the router's checked for its Service's
    /// name (the forward's address is loopback).
    pub async fn router_client(&self, region: &str) -> Result<(PortForward, tern_api::RouterClient)> {
        let fwd = self.router(region)?;
        let client = match &self.tls {
            Some(t) => {
                let domain = t
                    .domains
                    .get(region)
                    .map_or(tern_operator::names::DEFAULT_CLUSTER_DOMAIN, String::as_str);
                let name = format!("{}.{NAMESPACE}.svc.{domain}", router_service(region));
                let channel = t
                    .client
                    .channel_to(&fwd.addr.to_string(), &name)
                    .map_err(|e| HarnessError::Scenario(format!("a TLS channel to {region}'s router: {e}")))?;
                tern_api::RouterClient::new(channel)
            }
            None => tern_api::connect(fwd.addr).await,
        };
        Ok((fwd, client))
    }

    /// Creates `account` homed in `home` through `home`'s router, writes
    /// there (a local write), and reads it back.
    pub async fn local_write(&mut self, home: &str, account: &str) -> Result<()> {
        let start = Instant::now();
        let (_fwd, mut c) = self.router_client(home).await?;
        // A retry after an unknown outcome may find the account created by
        // the first attempt: that is success if it is homed where asked.
        let created = retry(Duration::from_secs(60), || {
            let mut c = c.clone();
            let account = account.to_string();
            let home = home.to_string();
            async move {
                c.create_account(pb::CreateAccountRequest {
                    account,
                    home_region: home,
                    allowed_regions: vec![],
                })
                .await
            }
        })
        .await;
        match created {
            Ok(resp) => check(
                resp.home_region == home,
                format!("{account} was created in {} instead of {home}", resp.home_region),
            )?,
            Err(HarnessError::Scenario(m)) if m.starts_with("AlreadyExists") => {}
            Err(e) => return Err(e),
        }
        let meta = put(&mut c, account, "k", "local").await?;
        check(
            !meta.forwarded,
            format!("a write to {account} in its home {home} was forwarded"),
        )?;
        check(
            meta.home_region == home,
            format!("{account} committed in {} instead of {home}", meta.home_region),
        )?;
        check(
            get(&mut c, account, "k").await? == "local",
            format!("{account}: read back differs"),
        )?;
        self.timed(&format!("local write in {home}"), start);
        Ok(())
    }

    /// Writes `account` (homed in `home`) through `via`'s router: forwarded
    /// once, committed in `home`, read back in `home`. Sends its own trace
    /// id, returned for the trace scenario.
    pub async fn proxied_write(&mut self, via: &str, home: &str, account: &str) -> Result<String> {
        let start = Instant::now();
        let trace_id = format!("{:032x}", rand_u128());
        let (_fwd, c) = self.router_client(via).await?;
        // Idempotent, so retried safely (a cold path across clusters may
        // answer UNAVAILABLE once); every attempt carries the same trace.
        let meta = retry(Duration::from_secs(30), || {
            let mut c = c.clone();
            let mut request = tonic::Request::new(pb::PutRequest {
                account: account.into(),
                key: "k".into(),
                value: b"proxied".to_vec(),
                idempotency_key: format!("proxied-{trace_id}"),
            });
            request.metadata_mut().insert(
                "traceparent",
                format!("00-{trace_id}-b7ad6b7169203331-01")
                    .parse()
                    .expect("a traceparent is ASCII"),
            );
            async move { c.put(request).await }
        })
        .await?
        .meta
        .unwrap_or_default();
        check(
            meta.forwarded,
            format!("a write to {account} through {via} was not forwarded"),
        )?;
        check(
            meta.home_region == home,
            format!("{account} committed in {} instead of {home}", meta.home_region),
        )?;
        let (_home_fwd, mut h) = self.router_client(home).await?;
        check(
            get(&mut h, account, "k").await? == "proxied",
            format!("{account}: the proxied write is not read back in {home}"),
        )?;
        self.timed(&format!("proxied write {via} -> {home}"), start);
        Ok(trace_id)
    }

    /// Moves `account` to `to` by applying an AccountMigration in `to`'s
    /// cluster, waits for it to complete, then writes there locally.
    pub async fn migration(&mut self, account: &str, to: &str) -> Result<()> {
        let start = Instant::now();
        let name = format!("move-{account}-to-{to}");
        let manifest = format!(
            "apiVersion: tern.dev/v1alpha1\nkind: AccountMigration\nmetadata:\n  name: {name}\n  namespace: {NAMESPACE}\nspec:\n  geoCluster: {GEOCLUSTER}\n  account: {account}\n  targetRegion: {to}\n"
        );
        let file = std::env::temp_dir().join(format!("tern-{name}-{}.yaml", std::process::id()));
        std::fs::write(&file, manifest).map_err(|source| HarnessError::Io {
            path: file.display().to_string(),
            source,
        })?;
        let applied = self.kubectl(to, &["apply", "-f", &file.display().to_string()]);
        let _ = std::fs::remove_file(&file);
        applied?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let phase = self.kubectl(
                to,
                &[
                    "get",
                    "accountmigration",
                    &name,
                    "-n",
                    NAMESPACE,
                    "-o",
                    "jsonpath={.status.phase}",
                ],
            )?;
            match phase.trim() {
                "Completed" => break,
                "Failed" => {
                    let status =
                        self.kubectl(to, &["get", "accountmigration", &name, "-n", NAMESPACE, "-o", "yaml"])?;
                    return Err(failed(format!("AccountMigration {name} failed:\n{status}")));
                }
                _ if Instant::now() > deadline => {
                    return Err(failed(format!("AccountMigration {name} still {phase:?} after 120 s")));
                }
                _ => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        let (_fwd, mut c) = self.router_client(to).await?;
        let meta = put(&mut c, account, "after-move", "here").await?;
        check(
            !meta.forwarded && meta.home_region == to,
            format!(
                "after the move {account} is served from {} (forwarded: {})",
                meta.home_region, meta.forwarded
            ),
        )?;
        check(
            get(&mut c, account, "k").await? == "proxied",
            format!("{account}: what was written before the move is not in {to}"),
        )?;
        self.timed(&format!("migration of {account} to {to}"), start);
        Ok(())
    }

    /// Jaeger in the trace region holds `trace_id` with spans of both
    /// regions' routers and the forward between them.
    pub async fn trace(&mut self, trace_id: &str, via: &str, home: &str) -> Result<()> {
        let start = Instant::now();
        let fwd = self.forward(TRACE_REGION, "jaeger", 16686)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            // The routers export in batches (every few seconds).
            if let Some(body) = tern_local::http::http_get(fwd.addr, &format!("/api/v3/traces/{trace_id}")).await {
                // Both routers' own spans: the forward out of `via`, and the
                // request the home region served for it (its context came
                // across the forward).
                let spans = tern_local::jaeger::parse_trace(&body);
                let forwarded = spans
                    .iter()
                    .any(|s| s.name == "router.forward" && s.attribute("tern.target_region") == Some(home));
                let served = spans
                    .iter()
                    .any(|s| s.name == "router.request" && s.attribute("tern.origin_region") == Some(via));
                if forwarded && served {
                    self.timed("trace of the proxied write in Jaeger", start);
                    return Ok(());
                }
                last = body;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Err(failed(format!(
            "Jaeger in {TRACE_REGION} has no trace {trace_id} with both regions' routers; last answer: {}",
            &last[..last.len().min(2000)]
        )))
    }

    /// `lost`'s node has been stopped: its successor takes its accounts
    /// over. Waits until `account` (homed in `lost`, last written with
    /// "before") is written through `successor`'s router and committed
    /// there, and its last value before the loss is read there.
    pub async fn failover(&mut self, lost: &str, successor: &str, account: &str) -> Result<()> {
        let start = Instant::now();
        let (_fwd, mut c) = self.router_client(successor).await?;
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut last_error;
        loop {
            match c
                .put(pb::PutRequest {
                    account: account.into(),
                    key: "after-failover".into(),
                    value: b"served".to_vec(),
                    idempotency_key: String::new(),
                })
                .await
            {
                Ok(resp) => {
                    let meta = resp.into_inner().meta.unwrap_or_default();
                    if meta.home_region == successor {
                        break;
                    }
                    last_error = format!("committed in {}", meta.home_region);
                }
                Err(status) => last_error = status.to_string(),
            }
            if Instant::now() > deadline {
                return Err(failed(format!(
                    "{account} of lost region {lost} was not taken over by {successor} within 180 s; last: {last_error}"
                )));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        check(
            get(&mut c, account, "k").await? == "before",
            format!("{account}: its last acknowledged value before the loss is not served by {successor}"),
        )?;
        self.timed(&format!("failover of {lost} to {successor}"), start);
        Ok(())
    }

    /// Writes `value` to `account`'s key "k" through `region`'s router.
    pub async fn write(&self, region: &str, account: &str, value: &str) -> Result<()> {
        let (_fwd, mut c) = self.router_client(region).await?;
        put(&mut c, account, "k", value).await.map(|_| ())
    }

    /// Every scenario in order, over clusters for us-east, eu-west and
    /// ap-south. `stop_node` stops every node of a region's cluster (kind:
    /// `docker stop`; the node e2e: kills the node's processes).
    pub async fn run_all(&mut self, mut stop_node: impl FnMut(&str) -> Result<()>) -> Result<()> {
        self.install().await?;
        self.local_write("us-east", "acct-us").await?;
        self.local_write("ap-south", "acct-ap").await?;
        // ap-south's group, never resized, has its membership recorded
        // once it has run: a member that starts empty is told to join it.
        self.membership_recorded("ap-south").await?;
        // eu-west grows from one member to three (two Raft membership
        // changes) and then serves a local write; it is the successor of
        // the region lost below.
        self.resize("eu-west", 3).await?;
        self.local_write("eu-west", "acct-eu").await?;
        // A member of eu-west loses its volume and is replaced: removed
        // from Raft and added back empty, it catches up from the others.
        // At the same time us-east's directory member loses its own: it is
        // replaced in the directory, whose other two members, in the other
        // clusters, keep the quorum.
        self.replace_lost_members(&[
            Loss {
                region: "eu-west",
                group: format!("{GEOCLUSTER}-eu-west"),
                ordinal: 1,
                account: "acct-eu",
            },
            Loss {
                region: "us-east",
                group: format!("{GEOCLUSTER}-dir-us-east"),
                ordinal: 0,
                account: "acct-us",
            },
        ])
        .await?;
        // A change of the members' template rolls every data group, one
        // member at a time and the leader last; the groups serve after it.
        self.rolling_update("50m").await?;
        // us-east shrinks from three members to one (two Raft membership
        // changes, the leadership moved off a member before it goes) and
        // serves after it.
        self.resize("us-east", 1).await?;
        self.local_write("us-east", "acct-us-rolled").await?;
        // us-east's only member loses its volume: the operator holds the
        // region, and the member does not start an empty cluster. The
        // group is restored from the backup taken before the roll:
        // acct-us's write (before it) is back, acct-us-rolled's (after it)
        // is lost, and the hold is lifted. The scenarios after run on the
        // restored group.
        self.lose_only_member_volume("us-east").await?;
        self.restore_lost_group("us-east", "acct-us", "acct-us-rolled").await?;
        // Failover has been Manual so far: with it Automatic, eu-west would
        // have taken over us-east's accounts while its group was lost.
        self.set_failover_mode("Automatic").await?;
        let trace_id = self.proxied_write("eu-west", "us-east", "acct-us").await?;
        self.trace(&trace_id, "eu-west", "us-east").await?;
        self.migration("acct-us", "eu-west").await?;
        // The last write before the loss; the successor's mirror has it
        // within milliseconds, waited for generously.
        self.write("ap-south", "acct-ap", "before").await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let start = Instant::now();
        stop_node("ap-south")?;
        self.timed("ap-south's node stopped", start);
        self.failover("ap-south", "eu-west", "acct-ap").await?;
        Ok(())
    }

    /// The report: one line per step.
    pub fn report(&self) -> String {
        self.timings
            .iter()
            .map(|(what, took)| format!("{:>8.1} s  {what}\n", took.as_secs_f64()))
            .collect()
    }
}

/// A member whose volume a scenario loses.
pub struct Loss<'a> {
    pub region: &'a str,
    /// Its group: a data group, or a directory share.
    pub group: String,
    pub ordinal: i32,
    /// An account of the region that reads back what it held.
    pub account: &'a str,
}

/// The Service of `region`'s routers.
fn router_service(region: &str) -> String {
    tern_operator::build::components::router_name(GEOCLUSTER, region)
}

/// `kubectl port-forward` to a Service, on a local port kubectl picks;
/// stopped on drop.
pub struct PortForward {
    pub addr: SocketAddr,
    child: Child,
}

impl PortForward {
    fn start(kubectl: &Path, kubeconfig: &Path, namespace: &str, service: &str, port: u16) -> Result<Self> {
        let mut child = Command::new(kubectl)
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(["port-forward", "-n", namespace, "--address=127.0.0.1"])
            .arg(format!("svc/{service}"))
            .arg(format!(":{port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                what: "kubectl port-forward".into(),
                source,
            })?;
        // "Forwarding from 127.0.0.1:40123 -> 7400"
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        let read = stdout.read_line(&mut line);
        let addr = line
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.parse::<SocketAddr>().ok());
        match (read, addr) {
            (Ok(_), Some(addr)) => {
                // kubectl writes a line per connection: keep reading, or it
                // fails writing into a closed pipe.
                std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
                if let Some(mut stderr) = child.stderr.take() {
                    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
                }
                Ok(Self { addr, child })
            }
            _ => {
                let _ = child.kill();
                let output = child.wait_with_output().ok();
                let stderr = output
                    .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    .unwrap_or_default();
                Err(HarnessError::Kubectl {
                    args: format!("port-forward svc/{service} :{port}"),
                    stderr: format!("{line}{stderr}"),
                })
            }
        }
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn put(c: &mut tern_api::RouterClient, account: &str, key: &str, value: &str) -> Result<pb::WriteMeta> {
    retry(Duration::from_secs(30), || {
        let mut c = c.clone();
        let request = pb::PutRequest {
            account: account.into(),
            key: key.into(),
            value: value.as_bytes().to_vec(),
            // Retried after an unknown outcome: the key makes it safe.
            idempotency_key: format!("scenario-{account}-{key}-{value}"),
        };
        async move { c.put(request).await }
    })
    .await
    .map(|r| r.meta.unwrap_or_default())
}

async fn get(c: &mut tern_api::RouterClient, account: &str, key: &str) -> Result<String> {
    let resp = retry(Duration::from_secs(30), || {
        let mut c = c.clone();
        let request = pb::GetRequest {
            account: account.into(),
            key: key.into(),
            read: None,
        };
        async move { c.get(request).await }
    })
    .await?;
    Ok(String::from_utf8_lossy(&resp.value).into_owned())
}

/// Retries a call while it fails with a status that says to retry
/// (UNAVAILABLE: a router or group still starting, a port-forward warming
/// up), until `limit`.
async fn retry<T, F, Fut>(limit: Duration, mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match call().await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s)
                if Instant::now() < deadline && matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => return Err(failed(format!("{:?}: {}", s.code(), s.message()))),
        }
    }
}

fn rand_u128() -> u128 {
    rand::random()
}

fn check(ok: bool, what: String) -> Result<()> {
    if ok { Ok(()) } else { Err(failed(what)) }
}

fn failed(what: String) -> HarnessError {
    HarnessError::Scenario(what)
}
