//! `tern demo` runs end to end for a short while, exits 0, and leaves no
//! process behind; with --keep it stays up for `tern status` until Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn leftovers(tmp: &std::path::Path) -> String {
    let out = Command::new("pgrep")
        .args(["-f", &tmp.to_string_lossy()])
        .output()
        .expect("pgrep runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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
    for needle in [
        "summary",
        "us-east",
        "eu-west",
        "ap-south",
        "proxied p99",
        "mirror lag (ms) from",
        "Slowest proxied write",
        "router.forward",
        "store.txn",
    ] {
        assert!(stdout.contains(needle), "missing `{needle}` in:\n{stdout}");
    }
    assert!(
        leftovers(tmp.path()).is_empty(),
        "processes left running: {}",
        leftovers(tmp.path())
    );
}

#[test]
fn status_reads_a_running_demo_and_ctrl_c_stops_it() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut demo = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["demo", "--duration", "2", "--keep", "--members", "1"])
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tern demo starts");
    let stdout = demo.stdout.take().expect("piped");
    // The demo runs TLS by default: status needs the client certificate
    // it prints before the directory's endpoints.
    let (mut certificate, mut router) = (None, None);
    let directory = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            if let Some(dir) = l.strip_prefix("Client certificate: ") {
                certificate = Some(dir.to_string());
            }
            if let Some(line) = l.strip_prefix("  us-east ") {
                router = line.split_whitespace().next().map(str::to_string);
            }
            l.strip_prefix("Directory: ").map(str::to_string)
        })
        .expect("the demo prints the directory endpoints");
    let certificate = certificate.expect("the demo prints its client certificate");
    let router = router.expect("the demo prints us-east's router");
    assert!(directory.starts_with("https://"), "{directory}");
    let status = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["status", "--tls-dir", &certificate, "--directory", &directory])
        .output()
        .expect("tern status runs");
    let text = String::from_utf8_lossy(&status.stdout);
    // The router's certificate checked for a name other than the address
    // dialled (as through a port-forward): its own name passes, another
    // is refused, and the flag means nothing without --tls-dir.
    let tern = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(args)
            .output()
            .expect("tern runs")
    };
    let put = |name: &str| {
        tern(&[
            "put",
            "--tls-dir",
            &certificate,
            "--tls-server-name",
            name,
            "--router",
            &router,
            "acct-us-east-0",
            "greeting",
            "hello",
        ])
    };
    let named = put("localhost");
    let stranger = put("router.elsewhere.example");
    let bare = tern(&[
        "put",
        "--tls-server-name",
        "localhost",
        "--router",
        &router,
        "a",
        "k",
        "v",
    ]);
    let _ = Command::new("kill").args(["-INT", &demo.id().to_string()]).status();
    assert!(
        named.status.success(),
        "the router's own name: {}",
        String::from_utf8_lossy(&named.stderr)
    );
    let refused = String::from_utf8_lossy(&stranger.stderr);
    assert!(
        !stranger.status.success() && refused.contains("router.elsewhere.example"),
        "another name is refused, and named: {refused}"
    );
    let usage = String::from_utf8_lossy(&bare.stderr);
    assert!(!bare.status.success() && usage.contains("--tls-dir"), "{usage}");
    let exit = demo.wait().expect("the demo exits");
    assert!(
        status.status.success(),
        "tern status failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    for needle in [
        "Region us-east",
        "Region ap-south",
        "holds the region's lease",
        "Group members",
        "leader",
        "Mirrors of other regions",
        "streaming",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    assert!(exit.code().is_some(), "the demo exits by itself on Ctrl-C");
    assert!(
        leftovers(tmp.path()).is_empty(),
        "processes left running: {}",
        leftovers(tmp.path())
    );
}
