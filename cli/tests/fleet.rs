//! The daemon re-reads its members and writers files on SIGHUP: a node added joins, a
//! reader may not write, with no restart.

mod util;

use util::{Fleet, expect, stderr, voltool};

/// Creates a node's key in `dir` and returns its id.
fn node_id(dir: &std::path::Path) -> String {
    let o = voltool()
        .args(["node-id", "--data"])
        .arg(dir)
        .output()
        .unwrap();
    expect(&o, 0);
    util::stdout(&o).trim().to_string()
}

/// Tells the coordinator to re-read its files.
fn hup(f: &Fleet) {
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &f.pid("coordinator").to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

#[test]
fn members_and_writers_files_are_re_read_on_sighup() {
    let dir = voltool_tests::test_dir();
    let ids: Vec<String> = (0..2)
        .map(|i| node_id(&dir.path().join(format!("agent-{i}"))))
        .collect();
    let members = dir.path().join("members");
    let writers = dir.path().join("writers");
    std::fs::write(&members, format!("# the fleet\n{}\n", ids[0])).unwrap();
    std::fs::write(&writers, format!("{}\n", ids[0])).unwrap();
    let (m, w) = (members.display().to_string(), writers.display().to_string());
    let f = Fleet::start_in(dir, 2, &["--members", &m, "--writers", &w], &[]);

    let o = f.run(1, &["volume", "list"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("not a member"), "{}", stderr(&o));

    // Agent 1 listed as a member (a reader), and the coordinator told.
    std::fs::write(&members, format!("{}\n{}\n", ids[0], ids[1])).unwrap();
    hup(&f);
    f.wait_log("coordinator", "fleet membership replaced");
    expect(&f.run(1, &["volume", "list"]), 0);
    let o = f.run(1, &["volume", "create", "mine"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("writers list"), "{}", stderr(&o));
    expect(&f.run(0, &["volume", "create", "theirs"]), 0);

    // A file that fails to read keeps the lists as they were.
    std::fs::write(&writers, "not a node id\n").unwrap();
    hup(&f);
    f.wait_log("coordinator", "membership kept as it was");
    expect(&f.run(0, &["volume", "create", "again"]), 0);
}
