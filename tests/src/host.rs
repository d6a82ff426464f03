//! What the host offers the tests (root, the snapshot mode of this pass, programs on
//! `PATH`), waiting on servers the tests start, and the tests' temporary directories.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

use voltool_agent::control::{Reply, Request};

use crate::TestFleet;

/// Runs `cmd` (quietly) every 100 ms until it succeeds, for up to a minute; fails the test
/// with `what` and `log()` otherwise. For servers a test starts, which answer a command of
/// their own once up.
pub(crate) fn until_command_succeeds(
    what: &str,
    mut cmd: impl FnMut() -> std::process::Command,
    log: impl Fn() -> String,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let ok = cmd()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {}", log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Runs `cmd` to its end and returns what it printed; fails the test, naming `what` and
/// showing the output, if it does not succeed.
pub(crate) fn run_ok(mut cmd: std::process::Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The program `name` where `PATH` finds it.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The snapshot mode the suite runs in: `VOLTOOL_SNAPSHOTS` (auto, overlay or copy), auto
/// by default, so one run covers overlays (as root) and another the copy fallback.
pub fn snapshot_mode() -> voltool_agent::node::SnapshotMode {
    std::env::var("VOLTOOL_SNAPSHOTS")
        .ok()
        .map(|s| {
            s.parse()
                .expect("VOLTOOL_SNAPSHOTS is auto, overlay or copy")
        })
        .unwrap_or_default()
}

/// Fails the test, naming `what`, unless its requirement is met (`available`): a test never
/// passes without checking what its name promises.
pub fn need(what: &str, available: bool) -> bool {
    assert!(available, "this test needs {what}, which is missing here");
    true
}

/// Whether this process runs as root (tests that run programs as other users, mount
/// file systems or make namespaces need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Whether this pass of the suite runs the tests that do not depend on the snapshot mode:
/// the suite runs twice, and those tests run only in the pass that is not forced to copies.
pub fn mode_independent_pass() -> bool {
    let run = snapshot_mode() != voltool_agent::node::SnapshotMode::Copy;
    if !run {
        eprintln!("not in the copy pass: this test does not depend on the snapshot mode");
    }
    run
}

/// Whether this pass of the suite runs overlay snapshots: `false` (saying so) in the pass
/// forced to copies; fails if an agent of `f` could not mount overlays where the suite
/// requires them.
pub async fn overlay_pass(f: &TestFleet) -> bool {
    if snapshot_mode() == voltool_agent::node::SnapshotMode::Copy {
        eprintln!("the copy pass: overlay checks belong to the overlay pass");
        return false;
    }
    let s = match f.req(0, Request::Status).await.unwrap() {
        Reply::Status(s) => s,
        other => panic!("unexpected {other:?}"),
    };
    need("overlay snapshots", s.snapshots == "overlay")
}

/// Prefix of the temporary directories of fleets started by tests.
pub const TEST_DIR_PREFIX: &str = "voltool-test-";

/// A temporary directory for a test fleet, named after this process. Mounts left under the
/// directories of test processes that are gone (a run killed before it could clean up)
/// are detached and their directories removed first.
pub fn test_dir() -> TempDir {
    let tmp = std::env::temp_dir();
    if let Ok(rd) = std::fs::read_dir(&tmp) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(TEST_DIR_PREFIX)
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                voltool_agent::overlay::unmount_all_under(&e.path());
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    tempfile::Builder::new()
        .prefix(&format!("{TEST_DIR_PREFIX}{}-", std::process::id()))
        .tempdir()
        .unwrap()
}
