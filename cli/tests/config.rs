//! Config files of the daemons: `--config FILE` and `--print-config`.

use std::process::Command;

mod util;
use util::BIN;

fn voltool(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("VOLTOOL_CONGESTION")
        .env_remove("VOLTOOL_SWARM_KNOBS")
        .env_remove("VOLTOOL_SNAPSHOTS")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn a_printed_config_reads_back_the_same_and_flags_win_over_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("c");
    let data = data.to_str().unwrap();
    let (ok, printed, err) = voltool(&[
        "coordinator",
        "--data",
        data,
        "--keep-versions",
        "3",
        "--max-egress",
        "50mbit",
        "--swarm-knob",
        "serve_slots=4",
        "--print-config",
    ]);
    assert!(ok, "{err}");
    assert!(printed.contains("keep-versions = 3\n"), "{printed}");
    assert!(printed.contains("max-egress = \"50mbit\"\n"), "{printed}");
    assert!(
        printed.contains("swarm-knob = [\"serve_slots=4\"]\n"),
        "{printed}"
    );
    // Every option is described.
    assert!(printed.contains("# Versions of each volume the origin keeps"));
    let file = dir.path().join("coordinator.toml");
    std::fs::write(&file, &printed).unwrap();
    let file = file.to_str().unwrap();
    let (ok, again, err) = voltool(&["coordinator", "--config", file, "--print-config"]);
    assert!(ok, "{err}");
    assert_eq!(again, printed);
    // A flag counts for more than the file.
    let (ok, flagged, err) = voltool(&[
        "coordinator",
        "--config",
        file,
        "--keep-versions",
        "7",
        "--print-config",
    ]);
    assert!(ok, "{err}");
    assert!(flagged.contains("keep-versions = 7\n"), "{flagged}");
    assert!(flagged.contains("max-egress = \"50mbit\"\n"), "{flagged}");
}

#[test]
fn a_config_file_with_an_unknown_key_or_a_bad_value_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "coordinator = \"x@127.0.0.1:1\"\nmax-egres = \"1mbit\"\n",
    )
    .unwrap();
    let (ok, _, err) = voltool(&[
        "agent",
        "--config",
        file.to_str().unwrap(),
        "--print-config",
    ]);
    assert!(!ok);
    assert!(
        err.contains("\"max-egres\" is not an option of `voltool agent`"),
        "{err}"
    );
    std::fs::write(&file, "origin-only = \"yes\"\n").unwrap();
    let (ok, _, err) = voltool(&[
        "agent",
        "--config",
        file.to_str().unwrap(),
        "--print-config",
    ]);
    assert!(!ok);
    assert!(
        err.contains("origin-only") && err.contains("true or false"),
        "{err}"
    );
    std::fs::write(&file, "listen = [\n").unwrap();
    let (ok, _, err) = voltool(&["agent", "--config", file.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("not valid TOML"), "{err}");
}

#[test]
fn the_example_configs_under_deploy_read() {
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    let (ok, out, err) = voltool(&[
        "coordinator",
        "--config",
        &format!("{deploy}/coordinator.toml"),
        "--print-config",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("keep-versions = 10\n"), "{out}");
    // The coordinator in failover: the fleet's state in etcd, its TLS, the fleet key.
    let (ok, out, err) = voltool(&[
        "coordinator",
        "--config",
        &format!("{deploy}/coordinator-ha.toml"),
        "--print-config",
    ]);
    assert!(ok, "{err}");
    for line in [
        "meta = \"etcd://10.0.0.11:2379,10.0.0.12:2379,10.0.0.13:2379/voltool/fleet-1\"\n",
        "etcd-ca = \"/etc/voltool/etcd/ca.pem\"\n",
        "lease-ttl = \"5s\"\n",
        "fleet-key = \"/etc/voltool/fleet.key\"\n",
    ] {
        assert!(out.contains(line), "{line} in {out}");
    }
    // The agent's example names its coordinator by a placeholder: a copy names a real one
    // (a --coordinator on the command line would add to the file's list, not replace it).
    let text = std::fs::read_to_string(format!("{deploy}/agent.toml")).unwrap();
    assert!(text.contains("COORDINATOR_NODE_ID@"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        text.replace(
            "COORDINATOR_NODE_ID",
            "7fa1c5f2d3b0e4a6c8b9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5",
        ),
    )
    .unwrap();
    let (ok, out, err) = voltool(&[
        "agent",
        "--config",
        file.to_str().unwrap(),
        "--print-config",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("listen = \"0.0.0.0:4434\"\n"), "{out}");
}
