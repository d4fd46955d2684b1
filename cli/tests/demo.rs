//! `tern demo` runs end to end for a short while, exits 0, and leaves no
//! process behind.

use std::process::Command;

#[test]
fn demo_runs_and_cleans_up() {
    // A temp dir of its own: every process the demo starts has it in its
    // command line, so leftovers can be found afterwards.
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["demo", "--duration", "3"])
        .env("TMPDIR", tmp.path())
        .output()
        .expect("tern runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tern demo failed:\n{stdout}\n{stderr}");
    for needle in ["summary", "us-east", "eu-west", "ap-south", "proxied p99"] {
        assert!(stdout.contains(needle), "missing `{needle}` in:\n{stdout}");
    }
    let left = Command::new("pgrep")
        .args(["-f", &tmp.path().to_string_lossy()])
        .output()
        .expect("pgrep runs");
    assert!(
        left.stdout.is_empty(),
        "processes left running: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}
