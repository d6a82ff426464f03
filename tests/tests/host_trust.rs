//! What a volume's writer gains on the hosts that read it: nothing. A setuid program
//! committed into a volume never runs with its owner's rights on a reader, through a mount
//! (mounted `nosuid,nodev`; copied snapshots are made without the bits) or through
//! `volume get`; the bits stay in the manifest, and the stripped copy is no change to commit.
//! These tests run programs as user `nobody` (`setpriv`), so they need root.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use voltool_agent::control::{ReloadMode, Reply, Request};
use voltool_tests::{TestFleet, bytes, is_root, mode_independent_pass, need, snapshot_mode};

/// The unprivileged user programs run as.
const NOBODY: &str = "65534";

/// Runs `program args` as user and group 65534 with no supplementary groups; its stdout.
fn as_nobody(program: &Path, args: &[&str]) -> String {
    let out = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
        .arg(program)
        .args(args)
        .output()
        .expect("setpriv runs");
    assert!(
        out.status.success(),
        "{} as nobody: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Lets user nobody reach `target` (where a mount's link leads, or a file) from the fleet's
/// directory: the directories on the way become traversable (the test is about what a
/// volume's files grant, not about who may reach them).
fn reachable(f: &TestFleet, target: &Path) {
    let target = std::fs::canonicalize(target).unwrap();
    let root = std::fs::canonicalize(f.dir.path()).unwrap();
    for d in target.ancestors().skip(1) {
        if !d.starts_with(&root) {
            break;
        }
        let mode = std::fs::metadata(d).unwrap().permissions().mode();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o111)).unwrap();
    }
}

/// A setuid-root copy of `id` in the fleet's directory.
fn setuid_id(f: &TestFleet) -> PathBuf {
    let p = f.dir.path().join("sid");
    std::fs::copy("/usr/bin/id", &p).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o4755)).unwrap();
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
        0o4755
    );
    p
}

/// The committed mode of `path` in volume `name`, as `volume ls` shows it.
async fn committed_mode(f: &TestFleet, name: &str, path: &str) -> u32 {
    let req = Request::VolumeLs {
        name: name.into(),
        path: Some(path.into()),
        recursive: false,
    };
    match f.req(0, req).await.unwrap() {
        Reply::Ls(e) => e[0].mode,
        other => panic!("unexpected {other:?}"),
    }
}

/// The per-mount options of the mount at `dir` (e.g. `rw,nosuid,nodev,relatime`).
fn mount_options(dir: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(dir).unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .rfind(|l| l.split(' ').nth(4) == dir.to_str())
        .and_then(|l| l.split(' ').nth(5).map(str::to_string))
}

/// Checks that the snapshot behind `mnt` grants nothing: in overlay mode it is mounted
/// `nosuid,nodev`; in copy mode its file has no setuid bit. Either way `sid` runs as nobody.
fn check_snapshot(mnt: &Path) {
    let sid = mnt.join("sid");
    if snapshot_mode() == voltool_agent::node::SnapshotMode::Copy {
        let mode = std::fs::metadata(&sid).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o7777,
            0o755,
            "a copied snapshot makes no setuid file"
        );
    } else {
        let opts = mount_options(mnt).expect("the snapshot is a mount");
        let opts: Vec<&str> = opts.split(',').collect();
        assert!(
            opts.contains(&"nosuid") && opts.contains(&"nodev"),
            "mount options {opts:?}"
        );
    }
    assert_eq!(
        as_nobody(&sid, &["-u"]),
        NOBODY,
        "a setuid file of a volume ran with its owner's rights"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setuid_program_in_a_volume_never_runs_as_root_through_a_mount() {
    if !need("root (programs run as user nobody)", is_root()) {
        return;
    }
    let f = TestFleet::start(2).await;
    f.create("vol").await;
    let sid = setuid_id(&f);
    f.put(0, "vol", &sid, "sid", false).await.unwrap();
    // The manifest keeps what the writer committed.
    assert_eq!(committed_mode(&f, "vol", "sid").await, 0o4755);

    let mnt = f.mount(1, "vol").await;
    reachable(&f, &mnt);
    check_snapshot(&mnt);

    // The stripped copy is no change of the committed file.
    let c = f.commit(1, "vol").await.unwrap();
    assert_eq!(c.changed, 0, "{c:?}");
    // A commit and a reload that move the mount (freezes, remounts, a new snapshot) keep
    // it so.
    std::fs::write(mnt.join("other"), bytes(1, 1000)).unwrap();
    let c = f.commit(1, "vol").await.unwrap();
    assert_eq!(c.changed, 1, "only the new file: {c:?}");
    assert_eq!(committed_mode(&f, "vol", "sid").await, 0o4755);
    reachable(&f, &mnt);
    check_snapshot(&mnt);
    f.put(0, "vol", &sid, "again", false).await.unwrap();
    f.reload(1, "vol", ReloadMode::Refuse).await.unwrap();
    assert!(mnt.join("again").exists());
    reachable(&f, &mnt);
    check_snapshot(&mnt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_get_never_makes_a_setuid_file() {
    if !mode_independent_pass() || !need("root (programs run as user nobody)", is_root()) {
        return;
    }
    let f = TestFleet::start(1).await;
    f.create("vol").await;
    let sid = setuid_id(&f);
    f.put(0, "vol", &sid, "d/sid", false).await.unwrap();
    let out = f.dir.path().join("got");
    for (remote, local) in [("d/sid", out.join("sid")), ("d", out.join("d"))] {
        std::fs::create_dir_all(&out).unwrap();
        f.get(0, "vol", remote, &local, false).await.unwrap();
        let file = if local.is_dir() {
            local.join("sid")
        } else {
            local
        };
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755, "get of {remote} made {mode:o}");
        reachable(&f, &file);
        assert_eq!(as_nobody(&file, &["-u"]), NOBODY);
    }
}

/// Commits on agent 0 what `make` does in its mount.
async fn commit_with(f: &TestFleet, make: impl FnOnce(&Path)) -> Result<u64, String> {
    let mnt = f.mount_path(0);
    make(&mnt);
    f.commit(0, "vol")
        .await
        .map(|c| c.version)
        .map_err(|e| e.message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_links_that_leaves_the_volume_is_refused_naming_the_link() {
    if !mode_independent_pass() {
        return;
    }
    let f = TestFleet::start(2).await;
    f.create("vol").await;
    f.mount(0, "vol").await;
    let link = |t: &str, at: &Path| std::os::unix::fs::symlink(t, at).unwrap();
    // Harmless one by one: `a/b/k/up` is the volume root; a chain through it is not.
    let v1 = commit_with(&f, |m| {
        std::fs::create_dir_all(m.join("a/b/k")).unwrap();
        link("../../..", &m.join("a/b/k/up"));
        link("a/b/k/up/sub", &m.join("inside"));
    })
    .await
    .unwrap();
    let e = commit_with(&f, |m| {
        link("a/b/k/up/../../../etc/hostname", &m.join("s"));
    })
    .await
    .unwrap_err();
    assert!(
        e.contains("\"s\"") && e.contains("outside the volume"),
        "{e}"
    );
    // A link to a link to the escape, and a link whose own target is harmless but whose
    // directory is reached through a link.
    std::fs::remove_file(f.mount_path(0).join("s")).unwrap();
    // `t1` goes through `t2`, a link to the link `a/b/k/up` (the root), and climbs.
    for (at, target) in [("t1", "t2/../x"), ("t2", "a/b/k/up")] {
        link(target, &f.mount_path(0).join(at));
    }
    let e = commit_with(&f, |_| {}).await.unwrap_err();
    assert!(
        e.contains("\"t1\"") && e.contains("outside the volume"),
        "{e}"
    );
    for at in ["t1", "t2"] {
        std::fs::remove_file(f.mount_path(0).join(at)).unwrap();
    }
    // Nothing of the refused commits reached the head: a reader sees version 1.
    let b = f.mount(1, "vol").await;
    assert!(!b.join("s").exists() && std::fs::symlink_metadata(b.join("s")).is_err());
    let head = match f.req(1, Request::Status).await.unwrap() {
        Reply::Status(s) => s.mounts[0].local_version,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(head, v1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_commit_that_turns_a_harmless_link_into_an_escape_is_refused() {
    if !mode_independent_pass() {
        return;
    }
    let f = TestFleet::start(1).await;
    f.create("vol").await;
    f.mount(0, "vol").await;
    // `s` climbs from `d/e` back to the root: harmless while `d/e` is a directory.
    commit_with(&f, |m| {
        std::fs::create_dir_all(m.join("d/e")).unwrap();
        std::fs::create_dir_all(m.join("etc")).unwrap();
        std::os::unix::fs::symlink("d/e/../../etc", m.join("s")).unwrap();
    })
    .await
    .unwrap();
    // Replacing the directory `d/e` by a link to `d` makes `s` climb one level higher.
    let e = commit_with(&f, |m| {
        std::fs::remove_dir(m.join("d/e")).unwrap();
        std::os::unix::fs::symlink(".", m.join("d/e")).unwrap();
    })
    .await
    .unwrap_err();
    assert!(
        e.contains("\"s\"") && e.contains("outside the volume"),
        "{e}"
    );
    // A missing directory made later: `n/../..` stops at `n` until `n` exists.
    let mnt = f.mount_path(0);
    std::fs::remove_file(mnt.join("d/e")).unwrap();
    std::fs::create_dir(mnt.join("d/e")).unwrap();
    // A name missing today: `later` stops at `m` until a later commit makes `m` a link to
    // the root, from which `..` leaves.
    commit_with(&f, |m| {
        std::os::unix::fs::symlink("m/../x", m.join("later")).unwrap();
    })
    .await
    .unwrap();
    let e = commit_with(&f, |m| {
        std::os::unix::fs::symlink(".", m.join("m")).unwrap()
    })
    .await
    .unwrap_err();
    assert!(e.contains("\"later\""), "{e}");
}

/// Mounts `vol` on agent `i` at `path`.
async fn mount_at(f: &TestFleet, i: usize, path: &Path) {
    let req = Request::Mount {
        name: "vol".into(),
        path: path.to_path_buf(),
        background_commit_secs: None,
        read_only: false,
        follow: voltool_agent::control::Follow::No,
        lazy: false,
    };
    f.req(i, req).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_swapped_for_a_link_between_two_commits_redirects_nothing() {
    let mut f = TestFleet::start(1).await;
    f.create("vol").await;
    let root = std::fs::canonicalize(f.dir.path()).unwrap();
    std::fs::create_dir_all(root.join("u/sub")).unwrap();
    std::fs::create_dir_all(root.join("victim")).unwrap();
    std::fs::write(root.join("victim/mnt"), b"precious").unwrap();
    let mnt = root.join("u/sub/mnt");
    mount_at(&f, 0, &mnt).await;
    std::fs::write(mnt.join("a"), b"a").unwrap();
    f.commit(0, "vol").await.unwrap();

    // The owner of `u` moves `sub` away and puts a link to the victim in its place.
    std::fs::rename(root.join("u/sub"), root.join("u/old")).unwrap();
    std::os::unix::fs::symlink(root.join("victim"), root.join("u/sub")).unwrap();
    std::fs::write(root.join("u/old/mnt/b"), b"b").unwrap();
    f.commit(0, "vol").await.unwrap();
    f.reload(0, "vol", ReloadMode::Refuse).await.unwrap();
    assert_eq!(std::fs::read(root.join("victim/mnt")).unwrap(), b"precious");
    // The mount went with its directory.
    assert_eq!(std::fs::read(root.join("u/old/mnt/b")).unwrap(), b"b");
    let req = Request::Unmount {
        name: Some("vol".into()),
        mode: ReloadMode::Refuse,
    };
    f.req(0, req).await.unwrap();
    assert_eq!(std::fs::read(root.join("victim/mnt")).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(root.join("u/old/mnt")).is_err());

    // A mount whose directory is replaced while the agent is down is refused at restart,
    // and nothing is made in the new directory.
    std::fs::create_dir_all(root.join("w/x")).unwrap();
    let mnt = root.join("w/x/mnt");
    mount_at(&f, 0, &mnt).await;
    let agent = f.agents.remove(0);
    agent.shutdown().await;
    // As after a reboot: nothing stays mounted.
    voltool_agent::overlay::unmount_all_under(f.dir.path());
    std::fs::rename(root.join("w/x"), root.join("w/gone")).unwrap();
    std::fs::create_dir(root.join("w/x")).unwrap();
    let agent = f.start_agent(0).await;
    f.agents.push(agent);
    assert!(
        std::fs::symlink_metadata(&mnt).is_err(),
        "a link was made in the new directory"
    );
    let e = f.commit(0, "vol").await.unwrap_err();
    assert!(e.message.contains("not the one it was mounted in"), "{e:?}");
    let e = f.reload(0, "vol", ReloadMode::Refuse).await.unwrap_err();
    assert!(e.message.contains("not the one it was mounted in"), "{e:?}");
    // Unmounting forgets it, and leaves the path alone.
    let req = Request::Unmount {
        name: Some("vol".into()),
        mode: ReloadMode::Discard,
    };
    f.req(0, req).await.unwrap();
    assert!(std::fs::symlink_metadata(&mnt).is_err());
    assert!(std::fs::symlink_metadata(root.join("w/gone/mnt")).is_ok());
}
