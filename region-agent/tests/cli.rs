//! The binary's command line: `--help` explains every flag, and a bad flag is
//! refused at start-up with a message that names it.

use std::process::Command;

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern-agent"))
        .args(args)
        .env_remove("TERN_REGION")
        .env_remove("TERN_AGENT_SOURCES")
        .output()
        .expect("the binary runs")
}

#[test]
fn help_explains_every_flag() {
    let out = agent(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--region",
        "--group-endpoints",
        "--directory-endpoints",
        "--source",
        "--heartbeat-interval",
        "--publish-interval",
        "--election-ttl",
        "--http-addr",
        "--identity",
        "--clock-offset-ms",
        "--geocluster",
        "--log-format",
    ] {
        assert!(help.contains(flag), "--help does not explain {flag}:\n{help}");
    }
}

#[test]
fn bad_flags_are_refused_by_name() {
    let base = [
        "--group-endpoints=http://127.0.0.1:1",
        "--directory-endpoints=http://127.0.0.1:1",
    ];
    for (extra, needle) in [
        (vec!["--region=Bad_Region"], "--region"),
        (vec!["--region=us-east", "--source=eu-west=nourl"], "--source"),
        (
            vec!["--region=us-east", "--heartbeat-interval=often"],
            "--heartbeat-interval",
        ),
        (vec!["--region=us-east", "--source=us-east=http://x:1"], "itself"),
    ] {
        let mut args = base.to_vec();
        args.extend(extra.iter().copied());
        let out = agent(&args);
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{extra:?}: {err}");
    }
}
