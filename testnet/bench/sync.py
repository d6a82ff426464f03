#!/usr/bin/env python3
"""How a batch of new small files is best made durable here: one syncfs of the file
system, or fdatasync of every file (two threads) and one fsync per directory.

    python3 testnet/bench/sync.py [FILES] [KIB] [RUNS]

Writes FILES files of KIB KiB in 64 directories under a temporary directory on the file
system of /tmp (or $TMPDIR), then times each way of making them durable, RUNS times each
(alternating), and prints one JSON line with the medians and their ratio. The page cache is
flushed (sync) before each write, so both start from the same state.
"""
import concurrent.futures, ctypes, json, os, shutil, statistics, sys, tempfile, time

files = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
kib = int(sys.argv[2]) if len(sys.argv) > 2 else 4
runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
libc = ctypes.CDLL(None, use_errno=True)


def write(root):
    paths = []
    for i in range(files):
        d = os.path.join(root, "%02d" % (i % 64))
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, "f%d" % i)
        with open(p, "wb") as f:
            f.write(os.urandom(kib * 1024))
        paths.append(p)
    return paths


def by_syncfs(root, paths):
    fd = os.open(root, os.O_RDONLY)
    try:
        if libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
    finally:
        os.close(fd)


def by_fdatasync(root, paths):
    def one(p):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        list(ex.map(one, paths))
    for d in {os.path.dirname(p) for p in paths} | {root}:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


times = {"syncfs": [], "fdatasync": []}
for _ in range(runs):
    for name, how in (("syncfs", by_syncfs), ("fdatasync", by_fdatasync)):
        root = tempfile.mkdtemp(prefix="voltool-sync-")
        try:
            os.sync()
            paths = write(root)
            t = time.monotonic()
            how(root, paths)
            times[name].append(time.monotonic() - t)
        finally:
            shutil.rmtree(root)
m = {k: statistics.median(v) for k, v in times.items()}
print(json.dumps({"files": files, "kib": kib, "runs": runs,
                  "syncfs_s": round(m["syncfs"], 4), "fdatasync_s": round(m["fdatasync"], 4),
                  "fdatasync_over_syncfs": round(m["fdatasync"] / m["syncfs"], 2),
                  "raw": times, "loadavg": open("/proc/loadavg").read().split()[:3]}))
