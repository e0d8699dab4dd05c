#!/usr/bin/env python3
"""Generate the deterministic test tree that the end-to-end tests and the benchmark serve.

    gen_tree.py SEED DEST [--big-mib N] [--small N]

The same SEED gives the same file contents, names and sizes (the sqlite database is
written by the local sqlite library, so its bytes may differ between library versions;
its query results do not). DEST must not exist or be empty. Standard library only.

Layout (relative to DEST):
    big.bin                      N MiB of seeded random bytes, written 1 MiB at a time
    small/dNN/eNN/fNNNNN.dat     the small files (0..8 KiB) spread over 100 dirs in 2 levels
    empty.txt, empty/e0..e2      empty files;  emptydir/  an empty directory
    chunk/size-*                 sizes around the 256 KiB chunk: c-1, c, c+1, 2c+7, and 1
    links/                       symlinks: inside, outside (relative and absolute), dangling, to a dir
    escape -> ../outside-secret  points next to the export root (the tests put a canary there)
    hardlinks/a, b, sub/c        one file with three names
    names/                       names with spaces and UTF-8
    db/test.sqlite               table t(id, name, v) with 1000 rows
    bin/true-copy                a copy of /bin/true, mode 0755
    deep/l01/.../l40/leaf.txt    a deep nested directory
    change/                      a few files the tests may rewrite on the server
"""

import argparse
import os
import random
import shutil
import sqlite3
import sys

CHUNK = 262144
MIB = 1 << 20


class Counter:
    def __init__(self):
        self.files = 0
        self.dirs = 0
        self.symlinks = 0
        self.hardlinks = 0
        self.bytes = 0


def write_file(path, data, stats, mode=0o644):
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    stats.files += 1
    stats.bytes += len(data)


def make_dir(path, stats):
    os.makedirs(path, exist_ok=True)
    stats.dirs += 1


def symlink(target, path, stats):
    os.symlink(target, path)
    stats.symlinks += 1


def gen_big(rng, dest, mib, stats):
    path = os.path.join(dest, "big.bin")
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(rng.randbytes(MIB))
    os.chmod(path, 0o644)
    stats.files += 1
    stats.bytes += mib * MIB


def gen_small(rng, dest, count, stats):
    root = os.path.join(dest, "small")
    make_dir(root, stats)
    leaves = []
    for i in range(10):
        top = os.path.join(root, "d%02d" % i)
        make_dir(top, stats)
        for j in range(10):
            leaf = os.path.join(top, "e%02d" % j)
            make_dir(leaf, stats)
            leaves.append(leaf)
    for n in range(count):
        size = rng.randint(0, 8192)
        leaf = leaves[n % len(leaves)]
        write_file(os.path.join(leaf, "f%05d.dat" % n), rng.randbytes(size), stats)


def gen_edges(rng, dest, stats):
    # Empty files and an empty directory.
    write_file(os.path.join(dest, "empty.txt"), b"", stats)
    make_dir(os.path.join(dest, "empty"), stats)
    for i in range(3):
        write_file(os.path.join(dest, "empty", "e%d" % i), b"", stats)
    make_dir(os.path.join(dest, "emptydir"), stats)

    # Sizes around the chunk boundary.
    make_dir(os.path.join(dest, "chunk"), stats)
    for size in (1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 7):
        write_file(os.path.join(dest, "chunk", "size-%d" % size), rng.randbytes(size), stats)

    # Symlinks. Targets are stored verbatim; the client resolves them on its side.
    links = os.path.join(dest, "links")
    make_dir(links, stats)
    symlink("../chunk/size-%d" % CHUNK, os.path.join(links, "rel-inside"), stats)
    symlink("../../../etc/passwd", os.path.join(links, "outside-rel"), stats)
    symlink("/etc/passwd", os.path.join(links, "abs"), stats)
    symlink("does-not-exist", os.path.join(links, "dangling"), stats)
    symlink("../small/d00", os.path.join(links, "dir-link"), stats)
    symlink("../outside-secret", os.path.join(dest, "escape"), stats)

    # One file with three names.
    hl = os.path.join(dest, "hardlinks")
    make_dir(os.path.join(hl, "sub"), stats)
    stats.dirs += 1
    write_file(os.path.join(hl, "a"), rng.randbytes(10000), stats)
    os.link(os.path.join(hl, "a"), os.path.join(hl, "b"))
    os.link(os.path.join(hl, "a"), os.path.join(hl, "sub", "c"))
    stats.hardlinks += 2

    # Names with spaces and UTF-8.
    names = os.path.join(dest, "names")
    make_dir(os.path.join(names, "with space"), stats)
    make_dir(os.path.join(names, "日本語"), stats)
    stats.dirs += 1
    for rel in ("résumé ü.txt", "with space/a b  c.txt", "日本語/ファイル.txt",
                "日本語/emoji-\U0001F600.txt", "-leading-dash", "trailing space "):
        write_file(os.path.join(names, rel), rng.randbytes(rng.randint(1, 3000)), stats)

    # A small sqlite database.
    make_dir(os.path.join(dest, "db"), stats)
    db_path = os.path.join(dest, "db", "test.sqlite")
    con = sqlite3.connect(db_path)
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL, v INTEGER NOT NULL)")
    con.executemany("INSERT INTO t (id, name, v) VALUES (?, ?, ?)",
                    [(i, "row-%04d-%08x" % (i, rng.getrandbits(32)), rng.randint(0, 10**6))
                     for i in range(1000)])
    con.commit()
    con.close()
    os.chmod(db_path, 0o644)
    stats.files += 1
    stats.bytes += os.path.getsize(db_path)

    # An executable.
    make_dir(os.path.join(dest, "bin"), stats)
    exe = os.path.join(dest, "bin", "true-copy")
    shutil.copyfile("/bin/true", exe)
    os.chmod(exe, 0o755)
    stats.files += 1
    stats.bytes += os.path.getsize(exe)

    # A deep nested directory.
    deep = os.path.join(dest, "deep", *("l%02d" % i for i in range(1, 41)))
    os.makedirs(deep)
    stats.dirs += 41
    write_file(os.path.join(deep, "leaf.txt"), b"deep leaf\n", stats)

    # Files the change-on-server tests may rewrite.
    make_dir(os.path.join(dest, "change"), stats)
    for name in ("inplace.txt", "replace.txt"):
        write_file(os.path.join(dest, "change", name), b"version 1 of %s\n" % name.encode() * 100, stats)


def main():
    ap = argparse.ArgumentParser(description="Generate wraith's deterministic test tree.")
    ap.add_argument("seed", type=int)
    ap.add_argument("dest")
    ap.add_argument("--big-mib", type=int, default=1024, help="size of big.bin in MiB (default 1024)")
    ap.add_argument("--small", type=int, default=10000, help="number of small files (default 10000)")
    args = ap.parse_args()
    if args.big_mib < 0 or args.small < 0:
        ap.error("sizes must not be negative")

    dest = args.dest
    if os.path.lexists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        print("gen_tree: %s exists and is not an empty directory; refusing to write into it" % dest,
              file=sys.stderr)
        return 2
    os.umask(0o022)
    os.makedirs(dest, exist_ok=True)

    rng = random.Random(args.seed)
    stats = Counter()
    stats.dirs += 1
    # Separate streams so that --small does not change big.bin and vice versa.
    gen_big(random.Random(rng.getrandbits(64)), dest, args.big_mib, stats)
    gen_small(random.Random(rng.getrandbits(64)), dest, args.small, stats)
    gen_edges(random.Random(rng.getrandbits(64)), dest, stats)

    print("gen_tree: seed=%d dest=%s big=%dMiB small=%d files=%d dirs=%d symlinks=%d extra_hardlinks=%d bytes=%d"
          % (args.seed, dest, args.big_mib, args.small, stats.files, stats.dirs, stats.symlinks,
             stats.hardlinks, stats.bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
