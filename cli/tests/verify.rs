//! The short `tern verify` run of the test suite: one randomized run of the
//! mixed workload from three regions while router links reset, cut and
//! slow down, judged by every checker; it must find nothing, save its
//! history, and leave no process behind. Longer runs are a documented
//! command (README, "Verifying under faults").

use std::process::Command;

#[test]
fn a_short_verify_run_under_faults_finds_no_violation() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let out_dir = tmp.path().join("verify");
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "verify",
            "--runs",
            "1",
            "--duration",
            "15",
            "--faults",
            "reset,limit,latency",
            "--out",
        ])
        .arg(&out_dir)
        .env("TMPDIR", tmp.path())
        .output()
        .expect("tern runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tern verify failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("0 violations"), "{stdout}");
    let histories: Vec<_> = std::fs::read_dir(&out_dir)
        .expect("the out dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
        .collect();
    assert_eq!(histories.len(), 1, "one history saved");
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
    let leftovers = Command::new("pgrep")
        .args(["-f", &tmp.path().to_string_lossy()])
        .output()
        .expect("pgrep runs");
    assert!(leftovers.stdout.is_empty(), "processes left behind");
}
