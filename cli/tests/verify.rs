//! The short `tern verify` of the test suite: three randomized runs of the
//! mixed workload from three regions, routers and agents as processes: one
//! with a router killed (kill -9), one with a region partitioned from the
//! others, one with us-east's Raft leader frozen (SIGSTOP), each maybe with
//! a second fault the seed draws; judged by every
//! checker; they must find nothing, save their histories, and leave no
//! process behind. Longer runs over every fault are a documented command
//! (README, "Verifying under faults").

use std::path::Path;
use std::process::Command;

/// tern-router and tern-agent beside `tern`: `cargo test --workspace`
/// builds them (their crates have tests that run them); a test run of this
/// crate alone builds them here.
fn ensure_binaries(tern: &Path) {
    let dir = tern.parent().expect("tern is in a directory");
    if dir.join("tern-router").is_file() && dir.join("tern-agent").is_file() {
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "tern-router", "-p", "tern-agent"]);
    if dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(status.success(), "building tern-router and tern-agent failed");
}

#[test]
fn a_short_verify_run_under_faults_finds_no_violation() {
    let tern = Path::new(env!("CARGO_BIN_EXE_tern"));
    ensure_binaries(tern);
    let tmp = tempfile::tempdir().expect("temp dir");
    let out_dir = tmp.path().join("verify");
    let out = Command::new(tern)
        .args([
            "verify",
            // Checked as deployed: TLS on every link.
            "--tls",
            "--runs",
            "3",
            "--seed",
            "0",
            "--duration",
            "18",
            "--faults",
            "kill-router,partition,pause-leader,reset",
            "--out",
        ])
        .arg(&out_dir)
        .env("TMPDIR", tmp.path())
        .output()
        .expect("tern runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tern verify failed:\n{stdout}\n{stderr}");
    assert_eq!(stdout.matches(", 0 violations").count(), 3, "{stdout}");
    for fault in ["kill-router(", "partition(", "pause-leader("] {
        assert!(stdout.contains(fault), "no {fault}: {stdout}");
    }
    let histories: Vec<_> = std::fs::read_dir(&out_dir)
        .expect("the out dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
        .collect();
    assert_eq!(histories.len(), 3, "a history saved per run");
    // The saved history checks again offline, and a forged read in it
    // (a value nobody wrote, after everything else) is caught.
    let saved = histories[0].path();
    let again = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["verify", "--check"])
        .arg(&saved)
        .output()
        .expect("tern runs");
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(again.status.success() && text.contains("0 violations"), "{text}");
    let mut history = std::fs::read_to_string(&saved).expect("history");
    let last = history.lines().last().expect("a record").to_string();
    let mut forged: serde_json::Value = serde_json::from_str(&last).expect("json");
    forged["client"] = 4242.into();
    forged["op"] = "get".into();
    forged["outcome"] = "ok".into();
    forged["read"] = "nobody-wrote-this".into();
    forged["invoke_us"] = (forged["complete_us"].as_u64().expect("time") + 1).into();
    forged["complete_us"] = (forged["complete_us"].as_u64().expect("time") + 2).into();
    history.push_str(&format!("{forged}\n"));
    std::fs::write(&saved, history).expect("forge");
    let forged = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["verify", "--check"])
        .arg(&saved)
        .output()
        .expect("tern runs");
    let text = String::from_utf8_lossy(&forged.stdout);
    assert!(!forged.status.success() && text.contains("[linearizable]"), "{text}");
    no_processes_left(tmp.path());
}

#[test]
fn runs_that_lose_a_region_fail_it_over_without_split_brain_and_account_for_every_lost_write() {
    let tern = Path::new(env!("CARGO_BIN_EXE_tern"));
    ensure_binaries(tern);
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = Command::new(tern)
        .args([
            "verify",
            "--runs",
            "2",
            "--seed",
            "0",
            "--duration",
            "18",
            "--faults",
            "kill-region,cut-directory",
            "--out",
        ])
        .arg(tmp.path().join("verify"))
        .env("TMPDIR", tmp.path())
        .output()
        .expect("tern runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tern verify failed:\n{stdout}\n{stderr}");
    assert_eq!(stdout.matches(", 0 violations").count(), 2, "{stdout}");
    for fault in ["kill-region(", "cut-directory("] {
        assert!(stdout.contains(fault), "no {fault}: {stdout}");
    }
    assert_eq!(
        stdout.matches("lost with the region and quarantined").count(),
        2,
        "{stdout}"
    );
    no_processes_left(tmp.path());
}

/// No process started under `dir` (the run's TMPDIR) is still running.
fn no_processes_left(dir: &Path) {
    let leftovers = Command::new("pgrep")
        .args(["-f", &dir.to_string_lossy()])
        .output()
        .expect("pgrep runs");
    assert!(leftovers.stdout.is_empty(), "processes left behind");
}
