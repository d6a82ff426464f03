//! A container's bind of a mount path (Docker's `-v PATH:/data:rslave`, Kubernetes'
//! `mountPropagation: HostToContainer`) sees every reload and commit made outside it,
//! also across a kill -9 and restart of the agent. Overlay mode: the path is a mount point
//! that stays (copy mode keeps a link, which a bind resolves once).

mod util;

use util::{Fleet, expect, stdout};
use voltool_tests::{Container, is_root, mode_independent_pass, need};

#[test]
fn a_bind_in_another_namespace_follows_reloads_commits_and_a_restart() {
    if !mode_independent_pass() || !need("root (mount namespaces)", is_root()) {
        return;
    }
    let mut f = Fleet::start(2);
    let o = f.run(1, &["status", "--json"]);
    expect(&o, 0);
    need(
        "overlay snapshots",
        stdout(&o).contains("\"snapshots\":\"overlay\""),
    );
    let tmp = f.dir.path().to_path_buf();
    let (m0, m1) = (tmp.join("m0"), tmp.join("m1"));
    expect(&f.run(0, &["volume", "create", "v"]), 0);
    expect(&f.run(0, &["mount", "v", m0.to_str().unwrap()]), 0);
    expect(&f.run(1, &["mount", "v", m1.to_str().unwrap()]), 0);
    let mut ctr = Container::bind(&m1, &tmp.join("ctr"));
    assert_eq!(ctr.read("a.txt"), "");

    let publish = |f: &Fleet, v: &str| {
        std::fs::write(m0.join("a.txt"), v).unwrap();
        expect(&f.run(0, &["commit", "v"]), 0);
        expect(&f.run(1, &["reload", "v"]), 0);
    };
    publish(&f, "one");
    assert_eq!(ctr.read("a.txt"), "one");
    publish(&f, "two");
    assert_eq!(ctr.read("a.txt"), "two");
    // A commit on the reader's host switches its mount too.
    std::fs::write(m1.join("b.txt"), "mine").unwrap();
    expect(&f.run(1, &["commit", "v"]), 0);
    assert_eq!(ctr.read("b.txt"), "mine");
    std::fs::write(m1.join("c.txt"), "after the commit").unwrap();
    assert_eq!(ctr.read("c.txt"), "after the commit");
    expect(&f.run(1, &["commit", "v"]), 0);

    // kill -9 with the bind in place, restart, reload: the bind follows.
    f.kill9_agent(1);
    assert_eq!(ctr.read("a.txt"), "two");
    f.start_agent(1, &[]);
    publish(&f, "three");
    assert_eq!(ctr.read("a.txt"), "three");
    assert_eq!(ctr.read("c.txt"), "after the commit");
    assert_eq!(std::fs::read_to_string(m1.join("a.txt")).unwrap(), "three");
}

#[test]
fn a_writer_through_a_bind_stops_a_reload_and_loses_no_byte() {
    if !mode_independent_pass() || !need("root (mount namespaces)", is_root()) {
        return;
    }
    let f = Fleet::start(2);
    let tmp = f.dir.path().to_path_buf();
    let (m0, m1) = (tmp.join("m0"), tmp.join("m1"));
    expect(&f.run(0, &["volume", "create", "v"]), 0);
    expect(&f.run(0, &["mount", "v", m0.to_str().unwrap()]), 0);
    expect(&f.run(1, &["mount", "v", m1.to_str().unwrap()]), 0);
    let o = f.run(1, &["status", "--json"]);
    need(
        "overlay snapshots",
        stdout(&o).contains("\"snapshots\":\"overlay\""),
    );
    let mut ctr = Container::bind(&m1, &tmp.join("ctr"));
    ctr.open("log");
    ctr.write("one");
    std::fs::write(m0.join("other"), "from agent 0").unwrap();
    expect(&f.run(0, &["commit", "v"]), 0);
    // The writer holds the file open through its bind: the switch is refused, naming it;
    // what it wrote so far is committed first.
    let o = f.run(1, &["reload", "v", "--commit-first"]);
    expect(&o, 1);
    assert!(
        util::stderr(&o).contains("open for writing") && util::stderr(&o).contains("log"),
        "{}",
        util::stderr(&o)
    );
    ctr.write("two");
    ctr.close();
    expect(&f.run(1, &["reload", "v", "--commit-first"]), 0);
    assert_eq!(ctr.read("other"), "from agent 0");
    // Every byte the writer wrote is committed.
    expect(&f.run(0, &["reload", "v"]), 0);
    assert_eq!(
        std::fs::read_to_string(m0.join("log")).unwrap(),
        "one\ntwo\n"
    );
}
