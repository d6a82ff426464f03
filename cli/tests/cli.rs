//! Every subcommand, run as the real binary: success paths and bad input.

mod util;

use std::io::Write;
use std::process::Stdio;

use util::{Fleet, expect, stderr, stdout, voltool};

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["volume", "put"][..],
        &["volume", "create"],
        &["volume", "cp", "v", "only-one"],
        &["reload", "--discard", "--commit-first"],
        &["no-such-command"],
        &["agent"],
    ] {
        let o = voltool().args(args).output().unwrap();
        expect(&o, 2);
        assert!(!stderr(&o).is_empty());
    }
    let o = voltool().arg("--help").output().unwrap();
    expect(&o, 0);
    assert!(stdout(&o).contains("volume"));
}

#[test]
fn no_agent_is_a_clear_failure() {
    let dir = tempfile::tempdir().unwrap();
    let o = voltool()
        .arg("--agent")
        .arg(dir.path())
        .args(["volume", "list"])
        .output()
        .unwrap();
    expect(&o, 1);
    assert!(
        stderr(&o).contains("cannot reach the agent"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn every_subcommand_end_to_end() {
    let f = Fleet::start(2);
    let tmp = f.dir.path();

    // create / list
    expect(&f.run(0, &["volume", "create", "models"]), 0);
    let o = f.run(0, &["volume", "create", "models"]);
    expect(&o, 1);
    assert!(stderr(&o).contains("already exists"));
    let o = f.run(0, &["volume", "create", "bad name!"]);
    expect(&o, 2);
    assert!(stderr(&o).contains("may only contain"));
    expect(&f.run(0, &["volume", "create", &"x".repeat(65)]), 2);
    let o = f.run(0, &["volume", "list", "--json"]);
    expect(&o, 0);
    let list: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(list[0]["name"], "models");
    assert_eq!(list[0]["version"], 0);
    expect(&f.run(0, &["volume", "list"]), 0);

    // put / ls
    let local = tmp.join("w.bin");
    std::fs::write(&local, vec![7u8; 100_000]).unwrap();
    let l = local.to_str().unwrap();
    expect(
        &f.run(0, &["volume", "put", "models", l, "/weights/w.bin"]),
        0,
    );
    let o = f.run(0, &["volume", "put", "models", l, "/weights/w.bin"]);
    expect(&o, 1);
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    expect(
        &f.run(0, &["volume", "put", "-f", "models", l, "/weights/w.bin"]),
        0,
    );
    expect(&f.run(0, &["volume", "put", "models", l, "weights/"]), 1);
    expect(&f.run(0, &["volume", "put", "models", l, "/"]), 0);
    expect(&f.run(0, &["volume", "put", "nope", l]), 1);
    expect(&f.run(0, &["volume", "put", "models", "/no/such/file"]), 1);
    let o = f.run(0, &["volume", "ls", "models", "--json"]);
    expect(&o, 0);
    let ls: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let paths: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["filename"].as_str().unwrap())
        .collect();
    assert_eq!(paths, vec!["w.bin", "weights"]);
    let o = f.run(0, &["volume", "ls", "models", "weights"]);
    expect(&o, 0);
    assert!(stdout(&o).contains("weights/w.bin"));
    expect(&f.run(0, &["volume", "ls", "models", "missing"]), 1);
    expect(&f.run(0, &["volume", "ls", "nope"]), 1);

    // get (from the other agent: it fetches from the origin)
    let dest = tmp.join("got.bin");
    let d = dest.to_str().unwrap();
    expect(
        &f.run(1, &["volume", "get", "models", "weights/w.bin", d]),
        0,
    );
    assert_eq!(std::fs::read(&dest).unwrap(), vec![7u8; 100_000]);
    let o = f.run(1, &["volume", "get", "models", "weights/w.bin", d]);
    expect(&o, 1);
    assert!(stderr(&o).contains("already exists"));
    expect(
        &f.run(
            1,
            &["volume", "get", "--force", "models", "weights/w.bin", d],
        ),
        0,
    );
    let o = f.run(1, &["volume", "get", "models", "/weights/w.bin", "-"]);
    expect(&o, 0);
    assert_eq!(o.stdout, vec![7u8; 100_000]);
    expect(&f.run(1, &["volume", "get", "models", "nope", d]), 1);
    let gdir = tmp.join("gdir");
    std::fs::create_dir_all(&gdir).unwrap();
    expect(
        &f.run(
            1,
            &["volume", "get", "models", "weights", gdir.to_str().unwrap()],
        ),
        0,
    );
    assert!(gdir.join("weights/w.bin").exists());

    // cp / rm
    expect(&f.run(0, &["volume", "cp", "models", "weights", "copy"]), 1);
    expect(
        &f.run(0, &["volume", "cp", "-r", "models", "weights", "copy"]),
        0,
    );
    expect(&f.run(0, &["volume", "cp", "models", "w.bin", "w2.bin"]), 0);
    expect(&f.run(0, &["volume", "cp", "models", "nope", "x"]), 1);
    expect(&f.run(0, &["volume", "rm", "models", "copy"]), 1);
    expect(&f.run(0, &["volume", "rm", "-r", "models", "copy"]), 0);
    expect(&f.run(0, &["volume", "rm", "models", "w2.bin"]), 0);
    expect(&f.run(0, &["volume", "rm", "models", "w2.bin"]), 1);
    let o = f.run(0, &["volume", "ls", "models"]);
    assert!(!stdout(&o).contains("copy") && !stdout(&o).contains("w2.bin"));

    // mount / commit / reload / status
    let m0 = tmp.join("m0");
    let m1 = tmp.join("m1");
    expect(&f.run(0, &["mount", "models", m0.to_str().unwrap()]), 0);
    expect(&f.run(1, &["mount", "models", m1.to_str().unwrap()]), 0);
    expect(&f.run(1, &["mount", "models", m1.to_str().unwrap()]), 1);
    expect(
        &f.run(0, &["mount", "nope", tmp.join("m9").to_str().unwrap()]),
        1,
    );
    assert_eq!(
        std::fs::read(m1.join("weights/w.bin")).unwrap(),
        vec![7u8; 100_000]
    );
    std::fs::write(m0.join("new.txt"), b"fresh").unwrap();
    let o = f.run(0, &["commit", "--json"]);
    expect(&o, 0);
    let c: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(c["changed"], 1);
    std::fs::write(m1.join("dirty.txt"), b"x").unwrap();
    let o = f.run(1, &["reload", "models"]);
    expect(&o, 1);
    assert!(stderr(&o).contains("uncommitted"), "{}", stderr(&o));
    let o = f.run(1, &["reload", "--discard", "--json"]);
    expect(&o, 0);
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["changed"], true);
    assert_eq!(std::fs::read(m1.join("new.txt")).unwrap(), b"fresh");
    let o = f.run(1, &["status", "--json"]);
    expect(&o, 0);
    let s: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        s["mounts"][0]["local_version"],
        s["mounts"][0]["remote_version"]
    );
    expect(&f.run(1, &["status"]), 0);
    expect(&f.run(1, &["commit", "nope"]), 1);

    // rename / delete: they ask unless -y
    let mut child = f
        .cmd(0, &["volume", "rename", "models", "models2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"y\n").unwrap();
    expect(&child.wait_with_output().unwrap(), 0);
    expect(
        &f.run(0, &["volume", "rename", "-y", "models2", "bad name"]),
        2,
    );
    expect(&f.run(0, &["volume", "rename", "-y", "nope", "other"]), 1);
    let o = f.run(0, &["volume", "delete", "models2"]);
    expect(&o, 1);
    assert!(stderr(&o).contains("aborted"));
    expect(&f.run(0, &["volume", "ls", "models2"]), 0);
    expect(&f.run(0, &["volume", "delete", "-y", "models2"]), 0);
    expect(&f.run(0, &["volume", "delete", "-y", "models2"]), 1);
    expect(
        &f.run(0, &["volume", "delete", "-y", "--allow-missing", "models2"]),
        0,
    );
    let o = f.run(0, &["volume", "list", "--json"]);
    assert_eq!(stdout(&o).trim(), "[]");

    // node-id
    let o = voltool()
        .args(["node-id", "--data"])
        .arg(f.agent_dir(0))
        .output()
        .unwrap();
    expect(&o, 0);
    assert_eq!(stdout(&o).trim().len(), 64);
}
