//! The binary's command line: `--help` explains every flag, and a bad flag is
//! refused at start-up with a message that names it and the rule.

use std::process::Command;

fn router(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern-router"))
        .args(args)
        .env_remove("TERN_REGION")
        .env_remove("TERN_GROUP_ENDPOINTS")
        .env_remove("TERN_DIRECTORY_ENDPOINTS")
        .output()
        .expect("the binary runs")
}

#[test]
fn help_explains_every_flag() {
    let out = router(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--region",
        "--listen",
        "--http-addr",
        "--group-endpoints",
        "--directory-endpoints",
        "--advertise",
        "--peer",
        "--dns-server",
        "--default-deadline",
        "--write-count-window",
        "--write-count-accounts",
        "--drain-timeout",
        "--log-format",
        "--log-filter",
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
    for (bad, needle) in [
        ("--region=Not_A_Region", "--region"),
        ("--peer=nowhere", "--peer"),
        ("--default-deadline=later", "--default-deadline"),
        ("--listen=not-an-address", "--listen"),
    ] {
        let mut args = base.to_vec();
        if !bad.starts_with("--region") {
            args.push("--region=us-east");
        }
        args.push(bad);
        let out = router(&args);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{bad}: {err}");
    }
    let out = router(&["--region=us-east"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--group-endpoints"));
}
