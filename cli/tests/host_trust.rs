//! What a local user, or an operator's slip, gains on a host: the agent's socket has a
//! fixed mode whatever the umask, so a user outside it cannot borrow the agent's rights
//! (read any file through `volume put`/`get`); its data directory is the agent's alone; a
//! coordinator admits nobody it was not told of unless started `--open`. Real processes;
//! commands run as user `nobody` (`setpriv`), so these need root.

mod util;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Command;

use util::{BIN, Fleet, expect, stderr, voltool};
use voltool_tests::{is_root, mode_independent_pass, need};

/// `voltool args…` as user and group 65534 with no supplementary groups.
fn as_nobody(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            BIN,
        ])
        .args(args)
        .env_clear()
        .output()
        .unwrap()
}

#[test]
fn a_user_outside_cannot_use_the_socket_even_under_umask_0() {
    if !mode_independent_pass() || !need("root (commands run as user nobody)", is_root()) {
        return;
    }
    let mut f = Fleet::start(0);
    // Everything on the way to the socket is open to all: only the socket's mode decides.
    std::fs::set_permissions(f.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    f.start_agent_umask(0, &[], Some("000"));
    let data = f.agent_dir(0);
    let md = std::fs::metadata(&data).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o711, "data directory");
    let sock = data.join("agent.sock");
    let md = std::fs::metadata(&sock).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o600, "socket");
    let key = std::fs::metadata(data.join("node.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600, "node key");
    // Root still uses it.
    expect(&f.run(0, &["volume", "create", "x"]), 0);

    let agent = data.as_os_str();
    for args in [
        vec!["status"],
        vec!["volume", "put", "x", "/etc/shadow", "/s"],
        vec!["volume", "get", "x", "/s", "-"],
    ] {
        let mut all: Vec<&std::ffi::OsStr> = vec!["--agent".as_ref(), agent];
        all.extend(args.iter().map(std::ffi::OsStr::new));
        let o = as_nobody(&all);
        assert!(!o.status.success(), "{args:?} as nobody succeeded");
        assert!(
            stderr(&o).contains("Permission denied"),
            "{args:?}: {}",
            stderr(&o)
        );
    }
    // Nothing reached the volume.
    let o = f.run(0, &["volume", "ls", "x"]);
    expect(&o, 0);
    assert!(!util::stdout(&o).contains('s'), "{}", util::stdout(&o));
}

#[test]
fn a_coordinator_without_members_refuses_to_start_unless_open() {
    if !mode_independent_pass() {
        return;
    }
    let dir = voltool_tests::test_dir();
    let o = voltool()
        .args(["coordinator", "--data"])
        .arg(dir.path().join("c"))
        .output()
        .unwrap();
    expect(&o, 1);
    let e = stderr(&o);
    assert!(e.contains("--members") && e.contains("--open"), "{e}");
    // Both at once make no sense.
    let o = voltool()
        .args(["coordinator", "--open", "--members", "/dev/null", "--data"])
        .arg(dir.path().join("c"))
        .output()
        .unwrap();
    expect(&o, 2);
}

#[test]
fn an_agent_refuses_a_data_directory_or_key_others_may_write() {
    if !mode_independent_pass() {
        return;
    }
    let dir = voltool_tests::test_dir();
    let data = dir.path().join("a");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let coordinator = voltool_tests::seed_key(&dir.path().join("c"), 7);
    let o = voltool()
        .args([
            "agent",
            "--coordinator",
            &format!("{coordinator}@127.0.0.1:1"),
        ])
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("writable by others"), "{}", stderr(&o));
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(data.join("node.key"), "00".repeat(32)).unwrap();
    std::fs::set_permissions(
        data.join("node.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let o = voltool()
        .args(["node-id", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("readable by others"), "{}", stderr(&o));
}
