//! The CLI's manners matched to Modal's, run as the real binary: `put` never replaces a
//! directory, `ls` as a table or bare paths, `get` of a directory to stdout, `put` from
//! stdin, `commit` ending on the merged head, `unmount`, read-only mounts.

mod util;

use std::io::Write;
use std::process::Stdio;

use util::{Fleet, expect, stderr, stdout};

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(&stdout(o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

/// Whether the agent makes overlay snapshots (else copies).
fn overlays(f: &Fleet, i: usize) -> bool {
    json(&f.run(i, &["status", "--json"]))["snapshots"] == "overlay"
}

fn put_stdin(f: &Fleet, i: usize, args: &[&str], bytes: &[u8]) -> std::process::Output {
    let mut child = f
        .cmd(i, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn put_ls_and_get_as_in_modal() {
    let f = Fleet::start(2);
    let tmp = f.dir.path();
    expect(&f.run(0, &["volume", "create", "v"]), 0);
    let o = f.run(0, &["volume", "create", "v"]);
    expect(&o, 1);
    expect(&f.run(0, &["volume", "create", "--allow-existing", "v"]), 0);

    // From stdin: a remote file path is needed.
    let o = put_stdin(&f, 0, &["volume", "put", "v", "-", "/d/a.txt"], b"alpha");
    expect(&o, 0);
    let o = put_stdin(&f, 0, &["volume", "put", "v", "-"], b"x");
    expect(&o, 2);
    assert!(stderr(&o).contains("remote file path"), "{}", stderr(&o));
    let o = put_stdin(&f, 0, &["volume", "put", "v", "-", "/d/"], b"x");
    expect(&o, 2);
    let big = tmp.join("b.bin");
    std::fs::write(&big, vec![3u8; 100_000]).unwrap();
    expect(
        &f.run(0, &["volume", "put", "v", big.to_str().unwrap(), "/d/e/"]),
        0,
    );

    // A file never replaces a directory, -f or not, and the directory's files stay.
    for force in [&[][..], &["-f"][..]] {
        let mut args = vec!["volume", "put"];
        args.extend_from_slice(force);
        args.extend(["v", big.to_str().unwrap(), "/d"]);
        let o = f.run(0, &args);
        expect(&o, 1);
        assert!(stderr(&o).contains("is a directory"), "{}", stderr(&o));
    }
    let o = f.run(1, &["volume", "get", "v", "/d/a.txt", "-"]);
    expect(&o, 0);
    assert_eq!(o.stdout, b"alpha");

    // ls in a pipe: bare paths; -r: everything below; --json: Modal's keys.
    let o = f.run(0, &["volume", "ls", "v", "d"]);
    expect(&o, 0);
    assert_eq!(stdout(&o), "d/a.txt\nd/e\n");
    let o = f.run(0, &["volume", "ls", "-r", "v"]);
    assert_eq!(stdout(&o), "d\nd/a.txt\nd/e\nd/e/b.bin\n");
    let ls = json(&f.run(0, &["volume", "ls", "--recursive", "--json", "v", "/d"]));
    let rows = ls.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let b = rows.iter().find(|r| r["filename"] == "d/e/b.bin").unwrap();
    assert_eq!(b["type"], "file");
    assert_eq!(b["size"], "97.7 KiB");
    assert!(
        b["created_modified"]
            .as_str()
            .is_some_and(|t| t.len() >= 16)
    );
    let e = rows.iter().find(|r| r["filename"] == "d/e").unwrap();
    assert_eq!(e["type"], "dir");
    assert!(e["created_modified"].is_null());
    let a = rows.iter().find(|r| r["filename"] == "d/a.txt").unwrap();
    assert_eq!(a["size"], "5 B");

    // A listing longer than one frame's part arrives whole and in order.
    let many = tmp.join("many");
    std::fs::create_dir(&many).unwrap();
    let n = voltool_agent::control::LS_PART + 100;
    for k in 0..n {
        std::fs::write(many.join(format!("{k:05}")), b"").unwrap();
    }
    expect(
        &f.run(0, &["volume", "put", "v", many.to_str().unwrap(), "/many"]),
        0,
    );
    let o = f.run(1, &["volume", "ls", "v", "/many"]);
    expect(&o, 0);
    let want: String = (0..n).map(|k| format!("many/{k:05}\n")).collect();
    assert_eq!(stdout(&o), want);
    expect(&f.run(0, &["volume", "rm", "-r", "v", "/many"]), 0);

    // get of a directory to stdout: its files' bytes, in path order.
    let o = f.run(1, &["volume", "get", "v", "d", "-"]);
    expect(&o, 0);
    let mut want = b"alpha".to_vec();
    want.extend(vec![3u8; 100_000]);
    assert_eq!(o.stdout, want);

    // get makes missing parents; --force replaces what is in the way.
    let deep = tmp.join("x/y/z.txt");
    expect(
        &f.run(
            1,
            &["volume", "get", "v", "d/a.txt", deep.to_str().unwrap()],
        ),
        0,
    );
    assert_eq!(std::fs::read(&deep).unwrap(), b"alpha");
    let blocked = tmp.join("blocked");
    std::fs::create_dir_all(blocked.join("inner")).unwrap();
    let o = f.run(
        1,
        &["volume", "get", "v", "d/a.txt", blocked.to_str().unwrap()],
    );
    expect(&o, 0); // an existing directory: the file goes into it
    assert_eq!(std::fs::read(blocked.join("a.txt")).unwrap(), b"alpha");
    let o = f.run(
        1,
        &["volume", "get", "v", "d/a.txt", blocked.to_str().unwrap()],
    );
    expect(&o, 1);
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    std::fs::create_dir_all(blocked.join("e/b.bin/sub")).unwrap();
    let o = f.run(1, &["volume", "get", "v", "d/e", blocked.to_str().unwrap()]);
    expect(&o, 1);
    let o = f.run(
        1,
        &[
            "volume",
            "get",
            "--force",
            "v",
            "d/e",
            blocked.to_str().unwrap(),
        ],
    );
    expect(&o, 0);
    assert_eq!(
        std::fs::read(blocked.join("e/b.bin")).unwrap(),
        vec![3u8; 100_000]
    );
}

#[test]
fn commit_ends_on_the_merged_head_and_unmount_keeps_changes_safe() {
    let f = Fleet::start(2);
    let tmp = f.dir.path();
    expect(&f.run(0, &["volume", "create", "v"]), 0);
    let (m0, m1) = (tmp.join("m0"), tmp.join("m1"));
    expect(&f.run(0, &["mount", "v", m0.to_str().unwrap()]), 0);
    expect(&f.run(1, &["mount", "v", m1.to_str().unwrap()]), 0);

    std::fs::write(m1.join("theirs"), b"from agent 1").unwrap();
    expect(&f.run(1, &["commit"]), 0);
    std::fs::write(m0.join("mine"), b"from agent 0").unwrap();
    let o = f.run(0, &["commit", "--json"]);
    expect(&o, 0);
    let c = json(&o);
    assert_eq!(c["version"], 2);
    assert!(c["stayed"].is_null(), "{c}");
    assert_eq!(c["reloaded"]["version"], 2);
    // The writer sees the other writer's file at once, as after Modal's commit().
    assert_eq!(std::fs::read(m0.join("theirs")).unwrap(), b"from agent 1");
    assert_eq!(std::fs::read(m0.join("mine")).unwrap(), b"from agent 0");
    let o = f.run(0, &["commit"]);
    expect(&o, 0);
    assert!(stdout(&o).contains("nothing to commit"), "{}", stdout(&o));

    if overlays(&f, 0) {
        // A file open for writing: the commit lands, the mount stays on its own view and
        // says why.
        std::fs::write(m1.join("later"), b"v3").unwrap();
        expect(&f.run(1, &["commit"]), 0);
        let mut open = std::fs::File::create(m0.join("open.log")).unwrap();
        open.write_all(b"still writing").unwrap();
        let o = f.run(0, &["commit", "--json"]);
        expect(&o, 0);
        let c = json(&o);
        assert_eq!(c["version"], 4);
        let why = c["stayed"].as_str().unwrap_or_default();
        assert!(why.contains("open.log"), "{c}");
        assert!(!m0.join("later").exists());
        drop(open);
        expect(&f.run(0, &["reload"]), 0);
        assert_eq!(std::fs::read(m0.join("later")).unwrap(), b"v3");
    }

    // unmount: refused with uncommitted changes, unless told what to do with them.
    std::fs::write(m1.join("uncommitted"), b"keep me").unwrap();
    let o = f.run(1, &["unmount", "v"]);
    expect(&o, 1);
    assert!(stderr(&o).contains("--commit-first"), "{}", stderr(&o));
    assert_eq!(std::fs::read(m1.join("uncommitted")).unwrap(), b"keep me");
    expect(&f.run(1, &["unmount", "--discard", "--commit-first"]), 2);
    let o = f.run(1, &["unmount", "--commit-first", "v"]);
    expect(&o, 0);
    assert!(!m1.exists(), "the mount's path is gone");
    let o = f.run(1, &["volume", "get", "v", "uncommitted", "-"]);
    assert_eq!(o.stdout, b"keep me");
    expect(&f.run(1, &["unmount", "v"]), 1);
    expect(&f.run(1, &["commit", "v"]), 1);
    let s = json(&f.run(1, &["status", "--json"]));
    assert_eq!(s["mounts"].as_array().unwrap().len(), 0);
    // Mounted again at the same path, the volume is whole.
    expect(&f.run(1, &["mount", "v", m1.to_str().unwrap()]), 0);
    assert_eq!(std::fs::read(m1.join("uncommitted")).unwrap(), b"keep me");
    std::fs::write(m1.join("thrown-away"), b"x").unwrap();
    expect(&f.run(1, &["unmount", "--discard"]), 0);
    let o = f.run(1, &["volume", "ls", "v"]);
    assert!(!stdout(&o).contains("thrown-away"));
}

#[test]
fn a_read_only_mount_takes_no_writes_and_commits_nothing() {
    let f = Fleet::start(2);
    let tmp = f.dir.path();
    expect(&f.run(0, &["volume", "create", "v"]), 0);
    let src = tmp.join("s");
    std::fs::write(&src, b"one").unwrap();
    expect(
        &f.run(0, &["volume", "put", "v", src.to_str().unwrap(), "/f"]),
        0,
    );
    let ro = tmp.join("ro");
    let o = f.run(1, &["mount", "--read-only", "v", ro.to_str().unwrap()]);
    expect(&o, 0);
    assert!(stdout(&o).contains("read-only"), "{}", stdout(&o));
    let s = json(&f.run(1, &["status", "--json"]));
    assert_eq!(s["mounts"][0]["read_only"], true);
    expect(
        &f.run(
            1,
            &[
                "mount",
                "--read-only",
                "--background-commit",
                "5",
                "v",
                tmp.join("x").to_str().unwrap(),
            ],
        ),
        2,
    );
    assert_eq!(std::fs::read(ro.join("f")).unwrap(), b"one");

    let written = std::fs::write(ro.join("f"), b"changed");
    if overlays(&f, 1) {
        // Not even root writes through it.
        let e = written.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(30), "EROFS: {e}");
        assert!(std::fs::write(ro.join("new"), b"x").is_err());
    }
    let o = f.run(1, &["commit", "v"]);
    expect(&o, 1);
    assert!(stderr(&o).contains("read-only"), "{}", stderr(&o));

    // A reload brings the new head (and, with copies, replaces what was written).
    std::fs::write(&src, b"two").unwrap();
    expect(
        &f.run(
            0,
            &["volume", "put", "-f", "v", src.to_str().unwrap(), "/f"],
        ),
        0,
    );
    expect(&f.run(1, &["reload", "v"]), 0);
    assert_eq!(std::fs::read(ro.join("f")).unwrap(), b"two");
    if overlays(&f, 1) {
        assert!(
            std::fs::write(ro.join("f"), b"x").is_err(),
            "still read-only"
        );
    }
    expect(&f.run(1, &["unmount", "v"]), 0);
}
