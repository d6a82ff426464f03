//! Lazy mounts with real processes: `voltool mount --lazy` is ready before the bytes are
//! here, a read waits only for what it reads, the mount switches off the lazy data layer
//! when its fill is through; kill -9 of the agent while a file is open. In the pass forced
//! to copies, `--lazy` is refused with a clear message.

mod util;

use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use util::{Fleet, expect, stderr, stdout};

const SIZE: usize = 48 * 1024 * 1024;

fn data(seed: u8, len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    blake3::Hasher::new_keyed(&[seed; 32])
        .finalize_xof()
        .fill(&mut d);
    d
}

/// `len` bytes at `at` of the file at `path`, read through a shared read-only mapping
/// of it (by Python's `mmap`, as model loaders map their files).
fn mapped(path: &std::path::Path, at: usize, len: usize) -> Vec<u8> {
    let out = path.with_file_name(format!(".mapped-{}", std::process::id()));
    let out = std::env::temp_dir().join(out.file_name().unwrap());
    let script = "import mmap, sys\n\
        f = open(sys.argv[1], 'rb')\n\
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n\
        a, n = int(sys.argv[2]), int(sys.argv[3])\n\
        open(sys.argv[4], 'wb').write(m[a:a + n])\n";
    let o = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .args([at.to_string(), len.to_string()])
        .arg(&out)
        .output()
        .expect("python3 runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    v
}

/// Whether this pass mounts overlays; in the copy pass, checks that `--lazy` is refused.
fn lazy_pass(f: &Fleet, i: usize, name: &str) -> bool {
    if voltool_tests::snapshot_mode() != voltool_agent::node::SnapshotMode::Copy {
        return true;
    }
    let p = f.dir.path().join("refused");
    let o = f.run(i, &["mount", name, p.to_str().unwrap(), "--lazy"]);
    assert!(
        !o.status.success(),
        "a lazy mount of copies: {}",
        stdout(&o)
    );
    assert!(
        stderr(&o).contains("lazy mounts need overlay snapshots"),
        "{}",
        stderr(&o)
    );
    false
}

/// A fleet where agent 0 (started with `args0`) committed `big` (a large file and a small
/// one) and agent 1 runs with its ingress capped at `rate`.
fn committed(rate: &str, args0: &[&str]) -> (Fleet, Vec<u8>, Vec<u8>) {
    let mut f = Fleet::start_with(1, args0);
    let tmp = f.dir.path().to_path_buf();
    expect(&f.run(0, &["volume", "create", "big"]), 0);
    let m0 = tmp.join("m0");
    expect(&f.run(0, &["mount", "big", m0.to_str().unwrap()]), 0);
    let (big, small) = (data(7, SIZE), data(8, 5000));
    std::fs::create_dir(m0.join("d")).unwrap();
    std::fs::write(m0.join("d/weights.bin"), &big).unwrap();
    std::fs::write(m0.join("config.json"), &small).unwrap();
    expect(&f.run(0, &["commit"]), 0);
    f.start_agent(1, &["--max-ingress", rate]);
    (f, big, small)
}

/// Agent 1's lazy mount of `big` at `DIR/m1`, and its large file opened.
fn mount_lazy(f: &Fleet) -> (std::path::PathBuf, std::fs::File) {
    let m1 = f.dir.path().join("m1");
    let o = f.run(1, &["mount", "big", m1.to_str().unwrap(), "--lazy"]);
    expect(&o, 0);
    assert!(stdout(&o).contains("lazy"), "{}", stdout(&o));
    let file = std::fs::File::open(m1.join("d/weights.bin")).unwrap();
    (m1, file)
}

#[test]
fn a_lazy_mount_reads_before_the_fill_is_through_and_then_reads_from_the_store() {
    let (f, big, small) = committed("6MiB/s", &[]);
    if !lazy_pass(&f, 1, "big") {
        return;
    }
    let start = Instant::now();
    // The tail of the large file, the small file: each read waits for its own bytes only
    // (48 MiB at 6 MiB/s take 8 s; the fill has not got there).
    let (m1, mut file) = mount_lazy(&f);
    assert_eq!(file.metadata().unwrap().len(), SIZE as u64);
    let mut tail = vec![0u8; 1 << 20];
    file.seek(SeekFrom::Start((SIZE - tail.len()) as u64))
        .unwrap();
    file.read_exact(&mut tail).unwrap();
    assert_eq!(tail, big[SIZE - tail.len()..]);
    assert_eq!(std::fs::read(m1.join("config.json")).unwrap(), small);
    // Mapped, as model loaders read: a page fault waits for its bytes as a read does.
    let at = SIZE / 3;
    let region = mapped(&m1.join("d/weights.bin"), at, 1 << 20);
    assert!(region == big[at..at + (1 << 20)], "mapped bytes differ");
    let read_at = start.elapsed();
    let lazy_status = || -> serde_json::Value {
        let o = f.run(1, &["status", "--json"]);
        expect(&o, 0);
        let s: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        s["mounts"][0]["lazy"].clone()
    };
    let l = lazy_status();
    assert!(
        !f.log("agent-1").contains("a lazy mount's fill is through"),
        "the fill was through before the reads ({read_at:?}): nothing was lazy"
    );
    assert_eq!(l["total"], (SIZE + small.len()) as u64, "{l}");
    // The whole file, through the mount: what the fill has not brought yet, the reads
    // ask for first.
    let mut all = Vec::new();
    file.seek(SeekFrom::Start(0)).unwrap();
    file.read_to_end(&mut all).unwrap();
    assert!(all == big, "the file read through the lazy mount differs");
    drop(file);
    // Then the mount leaves the lazy data layer, and reads the same from the store.
    f.wait_log("agent-1", "the lazy mount reads from the store now");
    assert!(lazy_status().is_null());
    assert_eq!(std::fs::read(m1.join("d/weights.bin")).unwrap(), big);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let lazy_dir = f.agent_dir(1).join("lazy");
    assert!(
        mounts
            .lines()
            .filter(|l| l.contains(" overlay ") && l.contains(f.agent_dir(1).to_str().unwrap()))
            .all(|l| !l.contains(lazy_dir.to_str().unwrap())),
        "an overlay of agent 1 is still over the lazy data layer"
    );
    // A write through it commits like any other.
    std::fs::write(m1.join("d/notes.txt"), b"seen").unwrap();
    expect(&f.run(1, &["commit"]), 0);
}

#[test]
fn kill_9_of_the_agent_fails_open_files_and_a_restart_serves_the_lazy_mount_again() {
    let (mut f, big, _) = committed("3MiB/s", &[]);
    if !lazy_pass(&f, 1, "big") {
        return;
    }
    let (m1, mut file) = mount_lazy(&f);
    let mut head = vec![0u8; 1 << 20];
    file.read_exact(&mut head).unwrap();
    assert_eq!(head, big[..head.len()]);
    f.kill9_agent(1);
    // Bytes not read before: an error, never zeros.
    let mut rest = vec![0u8; 1 << 20];
    file.seek(SeekFrom::Start((SIZE / 2) as u64)).unwrap();
    let r = file.read_exact(&mut rest);
    assert!(
        r.is_err(),
        "a read through a lazy mount whose agent is gone returned bytes"
    );
    drop(file);
    // Restarted (no cap): the lazy mount is served again before the agent answers, and a
    // new open reads the right bytes.
    f.start_agent(1, &[]);
    let got = std::fs::read(m1.join("d/weights.bin")).unwrap();
    assert!(got == big, "the file read after the restart differs");
    f.wait_log("agent-1", "the lazy mount reads from the store now");
}

#[test]
fn a_liar_is_banned_and_the_reader_gets_the_right_bytes_from_the_origin() {
    // Agent 0 holds every piece and flips a byte in all it sends.
    let (f, big, _) = committed("12MiB/s", &["--evil"]);
    if !lazy_pass(&f, 1, "big") {
        return;
    }
    let (_, mut file) = mount_lazy(&f);
    let mut part = vec![0u8; 4 << 20];
    file.seek(SeekFrom::Start((SIZE / 2) as u64)).unwrap();
    file.read_exact(&mut part).unwrap();
    assert!(
        part == big[SIZE / 2..SIZE / 2 + part.len()],
        "a lazy read returned bytes that differ"
    );
    f.wait_log("agent-1", "banned for this download");
    let mut all = Vec::new();
    file.seek(SeekFrom::Start(0)).unwrap();
    file.read_to_end(&mut all).unwrap();
    assert!(all == big, "the file read through the lazy mount differs");
}

#[test]
fn a_range_only_a_liar_holds_reads_as_an_error_not_zeros() {
    let (mut f, big, _) = committed("64MiB/s", &[]);
    if !lazy_pass(&f, 1, "big") {
        return;
    }
    // The only peer gone, and the origin's copy of the large blob rotten: nobody can
    // send its bytes.
    f.kill9_agent(0);
    let hash: voltool_protocol::Hash = blake3::hash(&big).to_hex().parse().unwrap();
    let rotten =
        voltool_agent::store::Store::blob_path_in(&f.dir.path().join("coordinator/origin"), &hash);
    std::fs::write(&rotten, vec![0u8; SIZE]).unwrap();
    let (_, mut file) = mount_lazy(&f);
    let mut part = vec![0u8; 1 << 20];
    for at in [0, SIZE / 2] {
        file.seek(SeekFrom::Start(at as u64)).unwrap();
        let e = file
            .read_exact(&mut part)
            .expect_err("a read of bytes nobody can send returned bytes");
        assert_eq!(e.raw_os_error(), Some(5), "not EIO: {e}");
    }
    f.wait_log("agent-1", "a lazy read fails");
}

#[test]
fn a_lazy_reload_switches_before_the_new_bytes_are_here() {
    let mut f = Fleet::start(1);
    let tmp = f.dir.path().to_path_buf();
    expect(&f.run(0, &["volume", "create", "big"]), 0);
    let m0 = tmp.join("m0");
    expect(&f.run(0, &["mount", "big", m0.to_str().unwrap()]), 0);
    std::fs::write(m0.join("config.json"), b"v1").unwrap();
    expect(&f.run(0, &["commit"]), 0);
    f.start_agent(1, &["--max-ingress", "6MiB/s"]);
    if !lazy_pass(&f, 1, "big") {
        return;
    }
    let m1 = tmp.join("m1");
    expect(&f.run(1, &["mount", "big", m1.to_str().unwrap()]), 0);
    let big = data(9, SIZE);
    std::fs::write(m0.join("weights.bin"), &big).unwrap();
    std::fs::write(m0.join("config.json"), b"v2").unwrap();
    expect(&f.run(0, &["commit"]), 0);
    let o = f.run(1, &["reload", "--lazy", "--json"]);
    expect(&o, 0);
    let r: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(r["version"], 2, "{r}");
    assert_eq!(std::fs::read(m1.join("config.json")).unwrap(), b"v2");
    let mut file = std::fs::File::open(m1.join("weights.bin")).unwrap();
    let mut tail = vec![0u8; 1 << 20];
    file.seek(SeekFrom::Start((SIZE - tail.len()) as u64))
        .unwrap();
    file.read_exact(&mut tail).unwrap();
    assert!(tail == big[SIZE - tail.len()..]);
    assert!(
        !f.log("agent-1").contains("a lazy mount's fill is through"),
        "the fill was through before the read: nothing was lazy"
    );
    drop(file);
    f.wait_log("agent-1", "the lazy mount reads from the store now");
    assert!(std::fs::read(m1.join("weights.bin")).unwrap() == big);

    // A blob the store holds whole is passed through by the lazy data layer: the kernel
    // reads the store's file itself, so a read goes on while the agent is stopped.
    let hash = blake3::hash(&big).to_hex().to_string();
    let through = f
        .agent_dir(1)
        .join("lazy/.voltool-blobs")
        .join(&hash[..2])
        .join(format!("{hash}.data"));
    let mut file = std::fs::File::open(&through).unwrap();
    let pid = f.pid("agent-1").to_string();
    let signal = |s: &str| {
        let o = std::process::Command::new("kill")
            .args([s, &pid])
            .output()
            .unwrap();
        assert!(o.status.success());
    };
    signal("-STOP");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut part = vec![0u8; 4 << 20];
        file.seek(SeekFrom::Start((SIZE / 2) as u64)).unwrap();
        file.read_exact(&mut part).unwrap();
        tx.send(part).unwrap();
    });
    let got = rx.recv_timeout(Duration::from_secs(20));
    signal("-CONT");
    reader.join().unwrap();
    let part =
        got.expect("a read of a whole blob waited for the stopped agent: not passed through");
    assert!(part == big[SIZE / 2..SIZE / 2 + part.len()]);
}
