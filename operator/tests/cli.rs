//! The binary's command line: `--help` explains every flag, and a bad flag is
//! refused at start-up with a message that names it.

use std::process::Command;

fn operator(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern-operator"))
        .args(args)
        .env_remove("TERN_OPERATOR_REGIONS")
        .output()
        .expect("the binary runs")
}

#[test]
fn help_explains_every_flag() {
    let out = operator(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--regions",
        "--namespace",
        "--http-addr",
        "--leader-elect",
        "--leader-election-namespace",
        "--leader-election-id",
        "--lease-duration",
        "--lease-retry",
        "--identity",
        "--resync",
        "--log-format",
        "--log-filter",
    ] {
        assert!(help.contains(flag), "--help does not explain {flag}:\n{help}");
    }
}

#[test]
fn bad_flags_are_refused_by_name() {
    let out = operator(&["--regions=Not_A_Region"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--regions") && err.contains("Not_A_Region"), "{err}");

    let out = operator(&["--lease-duration=forever"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--lease-duration") && err.contains("forever"), "{err}");
}
