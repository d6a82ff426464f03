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

/// A command run as user `uid` (group 65534) with the supplementary `groups` (none: the
/// groups cleared), and a clean environment.
fn setpriv(uid: u32, groups: &[u32], program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", &uid.to_string(), "--regid", "65534"]);
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
        c.args(["--groups", &groups.join(",")]);
    }
    c.arg(program).env_clear();
    c
}

/// `voltool args…` as user and group 65534 with no supplementary groups.
fn as_nobody(args: &[&std::ffi::OsStr]) -> std::process::Output {
    setpriv(65534, &[], BIN).args(args).output().unwrap()
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
    // Overlay snapshots are mounted at their paths: nobody else enters the data directory.
    assert_eq!(md.permissions().mode() & 0o777, 0o700, "data directory");
    let run = f.run_dir(0);
    let md = std::fs::metadata(&run).unwrap();
    assert_eq!(md.permissions().mode() & 0o777, 0o755, "run directory");
    let md = std::fs::metadata(run.join("agent.sock")).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o600, "socket");
    let key = std::fs::metadata(data.join("node.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600, "node key");
    // Root still uses it.
    expect(&f.run(0, &["volume", "create", "x"]), 0);

    let agent = run.as_os_str();
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

/// Removes `/run/voltool` at the end of a test that made it.
struct RemoveAfter(Option<&'static std::path::Path>);

impl Drop for RemoveAfter {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

#[test]
fn a_root_agent_serves_its_sockets_from_run_voltool_where_clients_find_them() {
    if !mode_independent_pass() || !need("root (the agent's default run directory)", is_root()) {
        return;
    }
    let run = std::path::Path::new("/run/voltool");
    let _cleanup = RemoveAfter((!run.exists()).then_some(run));
    let mut f = Fleet::start(0);
    // A umask that would leave the directory closed to everyone else.
    f.start_agent_in(0, &[], Some("077"), None);
    let md = std::fs::metadata(run).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o755, "{}", run.display());
    let sock = std::fs::metadata(run.join("agent.sock")).unwrap();
    assert!(sock.file_type().is_socket());
    assert_eq!(sock.permissions().mode() & 0o777, 0o600);
    assert!(!f.agent_dir(0).join("agent.sock").exists());
    // No --agent, no VOLTOOL_AGENT: the CLI looks there.
    expect(
        &voltool().args(["volume", "create", "x"]).output().unwrap(),
        0,
    );
    let o = voltool().args(["volume", "list"]).output().unwrap();
    expect(&o, 0);
    assert!(util::stdout(&o).contains('x'));
    // One agent a run directory: a second one there refuses to start, naming it.
    let data = f.dir.path().join("second");
    let o = voltool()
        .args(["agent", "--coordinator", &f.coordinator.clone()])
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("another agent serves /run/voltool"),
        "{}",
        stderr(&o)
    );
    // The first one still answers.
    expect(&voltool().args(["volume", "list"]).output().unwrap(), 0);
}

/// `voltool --agent DIR args…` as user `uid` (group 65534) with the supplementary `groups`.
fn as_user(
    uid: u32,
    groups: &[u32],
    agent: &std::path::Path,
    args: &[&str],
) -> std::process::Output {
    setpriv(uid, groups, BIN)
        .arg("--agent")
        .arg(agent)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn group_members_use_the_agent_with_their_own_rights_write_into_their_own_mounts_and_commit() {
    if !need("root (commands run as other users)", is_root()) {
        return;
    }
    let (user, admin) = (4242u32, 4243u32);
    let mut f = Fleet::start(0);
    std::fs::set_permissions(f.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    f.start_agent(
        0,
        &[
            "--socket-group",
            &user.to_string(),
            "--admin-group",
            &admin.to_string(),
        ],
    );
    let agent = f.run_dir(0);
    for (sock, gid) in [("agent.sock", user), ("admin.sock", admin)] {
        let md = std::fs::metadata(agent.join(sock)).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o660, "{sock}");
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&md), gid, "{sock}");
    }
    let local = f.dir.path().join("a.txt");
    std::fs::write(&local, b"hello").unwrap();
    expect(&f.run(0, &["volume", "create", "v"]), 0);
    expect(
        &f.run(
            0,
            &["volume", "put", "v", local.to_str().unwrap(), "/a.txt"],
        ),
        0,
    );
    let mine = f.dir.path().join("n");
    let roots = f.dir.path().join("r");
    std::fs::create_dir(&mine).unwrap();
    std::fs::create_dir(&roots).unwrap();
    std::os::unix::fs::chown(&mine, Some(65534), Some(65534)).unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let fails = |o: std::process::Output, why: &str| {
        assert!(!o.status.success(), "succeeded: {}", util::stdout(&o));
        assert!(stderr(&o).contains(why), "{why:?} not in: {}", stderr(&o));
    };

    // Outside both groups: the kernel refuses both sockets.
    fails(
        as_user(65534, &[], &agent, &["status"]),
        "Permission denied",
    );
    // In the socket group: reads, and mounts of its own in a directory of its own.
    expect(&as_user(65534, &[user], &agent, &["status"]), 0);
    expect(&as_user(65534, &[user], &agent, &["volume", "ls", "v"]), 0);
    fails(
        as_user(65534, &[user], &agent, &["volume", "create", "x"]),
        "admin group",
    );
    fails(
        as_user(
            65534,
            &[user],
            &agent,
            &["mount", "v", &s(&roots.join("m"))],
        ),
        "belongs to uid 0",
    );
    let m = mine.join("m");
    expect(&as_user(65534, &[user], &agent, &["mount", "v", &s(&m)]), 0);
    assert_eq!(std::fs::read(m.join("a.txt")).unwrap(), b"hello");
    // Its files are its own: it writes into the mount and commits, as itself.
    let md = std::fs::metadata(m.join("a.txt")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&md), 65534);
    let mm = s(&m);
    let wrote = setpriv(65534, &[], "sh")
        .arg("-c")
        .arg(format!(
            "echo changed > {mm}/a.txt && mkdir {mm}/d && echo new > {mm}/d/f"
        ))
        .output()
        .unwrap();
    assert!(wrote.status.success(), "{}", stderr(&wrote));
    expect(&as_user(65534, &[user], &agent, &["commit", "v"]), 0);
    let o = f.run(0, &["volume", "get", "v", "/a.txt", "-"]);
    assert_eq!(o.stdout, b"changed\n");
    let o = f.run(0, &["volume", "get", "v", "/d/f", "-"]);
    assert_eq!(o.stdout, b"new\n");
    // Another user of the group may not touch it; root may.
    for cmd in [&["reload", "v"][..], &["unmount", "v"], &["commit", "v"]] {
        fails(as_user(65533, &[user], &agent, cmd), "belongs to uid 65534");
    }
    expect(&f.run(0, &["reload", "v"]), 0);
    expect(&as_user(65534, &[user], &agent, &["reload", "v"]), 0);
    expect(&as_user(65534, &[user], &agent, &["unmount", "v"]), 0);
    assert!(std::fs::symlink_metadata(&m).is_err());
    // The admin group changes volumes, but never has the agent read a file by name.
    expect(
        &as_user(65534, &[admin], &agent, &["volume", "create", "x"]),
        0,
    );
    // It puts what it can read itself (the CLI reads the files, as the caller), and nothing
    // it cannot: the agent opens no local path for it.
    expect(
        &as_user(
            65534,
            &[admin],
            &agent,
            &["volume", "put", "x", "/etc/hostname", "/h"],
        ),
        0,
    );
    fails(
        as_user(
            65534,
            &[admin],
            &agent,
            &["volume", "put", "x", "/etc/shadow", "/s"],
        ),
        "Permission denied",
    );
    // `get` into local files: written by the CLI, as the caller, so they are the caller's.
    let got = mine.join("got");
    expect(
        &as_user(
            65534,
            &[user],
            &agent,
            &["volume", "get", "v", "/a.txt", &s(&got)],
        ),
        0,
    );
    assert_eq!(std::fs::read(&got).unwrap(), b"changed\n");
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&got).unwrap()),
        65534
    );
    // Where the caller may not write, it cannot have the agent write for it.
    fails(
        as_user(
            65534,
            &[user],
            &agent,
            &["volume", "get", "v", "/a.txt", "/etc/x"],
        ),
        "Permission denied",
    );
    let o = as_user(
        65534,
        &[admin],
        &agent,
        &["volume", "get", "v", "/a.txt", "-"],
    );
    expect(&o, 0);
    assert_eq!(o.stdout, b"changed\n");
}
