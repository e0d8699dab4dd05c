#!/usr/bin/env bash
# wraith end-to-end tests: the real binaries, a real FUSE mount, ordinary programs.
#
#   tests/e2e/run.sh [SUITE...]        (as root; default: every suite, in this order)
#
# Suites: loopback chunk64 change errors ipv6 netns restart gone mount_helper
# (mount_helper runs tests/e2e/mount_helper.sh: mount(8) through the mount.wraith helper)
#
# Environment:
#   WRAITH_BIN           directory holding wraith-serve and wraith-mount (default target/release)
#   WRAITH_E2E_BIG_MIB   size of the big file in MiB (default 1024)
#   WRAITH_E2E_SMALL     number of small files (default 10000)
#   WRAITH_E2E_SEED      seed of the generated tree (default 1)
#   WRAITH_E2E_KEEP=1    keep the work directory (logs, tree) afterwards
#
# Every check prints "ok - NAME" or "not ok - NAME: REASON"; the last line is
# "N passed, N failed" and the exit status is non-zero when anything failed. Missing
# prerequisites (not root, no ip netns, no FUSE, no binaries) are failures, never skips.
# Network traffic stays on loopback or on a veth pair between two namespaces made here.

set -uo pipefail
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

E2E_SUMMARY=1
BIG_MIB=${WRAITH_E2E_BIG_MIB:-1024}
SMALL=${WRAITH_E2E_SMALL:-10000}
SEED=${WRAITH_E2E_SEED:-1}
ALL_SUITES=(loopback chunk64 change errors ipv6 netns restart gone rechunk hard mount_helper cache xdp)
CHUNK=262144

SRC=        # the generated tree, exported as "tree" (and "tree64" with 64 KiB chunks)
CHG=        # a small tree the change suite rewrites, exported as "chg"
KEY=        # the key file; the first server creates it
CANARY=     # content of $WORK/srv/outside-secret, next to the export root
BIG_B3=     # b3sum of the source's big.bin
LO_PORT=
LO_PID=
LO_TRIED=
NS_PID=
NS_TRIED=

# ----------------------------------------------------------------------------------------------
# shared servers

# The loopback server with the exports tree, chg and tree64. Started once, on demand.
ensure_lo_server() {
    if [ -n "$LO_PID" ] && kill -0 "$LO_PID" 2>/dev/null; then return 0; fi
    [ -n "$LO_TRIED" ] && return 1
    LO_TRIED=1
    LO_PORT=$(free_udp_port)
    serve loopback "" 127.0.0.1 "$LO_PORT" --key "$KEY" --state-dir "$WORK/state/lo" \
        --export "tree=$SRC" --export "chg=$CHG" --export "tree64=$SRC,chunk=65536" || return 1
    LO_PID=$SERVER_PID
}

# The server in namespace A on 10.77.0.1:7447 (the default port), exporting tree.
ensure_ns_server() {
    if [ -n "$NS_PID" ] && kill -0 "$NS_PID" 2>/dev/null; then return 0; fi
    [ -n "$NS_TRIED" ] && return 1
    NS_TRIED=1
    if ! netns_setup; then
        not_ok "netns: namespaces $NS_A and $NS_B joined by veth" "ip netns/veth setup failed"
        return 1
    fi
    ok "netns: namespaces $NS_A ($NS_A_ADDR) and $NS_B ($NS_B_ADDR) joined by veth"
    ns_serve netns || return 1
}

ns_serve() {
    serve "$1" "$NS_A" "$NS_A_ADDR" 7447 --key "$KEY" --state-dir "$WORK/state/ns" --export "tree=$SRC" || return 1
    NS_PID=$SERVER_PID
}

# ----------------------------------------------------------------------------------------------
# small check functions: print a reason and return non-zero on failure

t_key_file() {
    local i
    for ((i = 0; i < 50; i++)); do
        [ -s "$KEY" ] && break
        sleep 0.1
    done
    [ -f "$KEY" ] || { echo "$KEY was not created"; return 1; }
    local mode
    mode=$(stat -c %a "$KEY")
    [ "$mode" = 600 ] || { echo "mode $mode, expected 600"; return 1; }
    if ! grep -qxE '[0-9a-f]{64}' "$KEY" || [ "$(wc -c <"$KEY")" -ne 65 ]; then
        echo "content is not 64 hex chars and a newline"
        return 1
    fi
}

t_listing() {
    local mnt=$1 d=$WORK/logs/listing.diff
    # No cd into the mount: every access to it goes through a command bounded by timeout.
    diff <(find "$SRC" -printf '%y %P\n' | LC_ALL=C sort) \
        <(timeout 300 find "$mnt" -printf '%y %P\n' | LC_ALL=C sort) >"$d"
    local rc=$?
    [ "$rc" -eq 0 ] && return 0
    echo "$(grep -c '^[<>]' "$d") lines differ (< source, > mount), first: $(grep -m1 '^[<>]' "$d")"
    return 1
}

# t_xattr MNT REL [EXPECTED]: getfattr user.wraith.blake3 on the mount equals b3sum of the source.
t_xattr() {
    local mnt=$1 rel=$2 want=${3:-} got
    [ -n "$want" ] || want=$(b3sum --no-names "$SRC/$rel")
    got=$(timeout 60 getfattr --only-values -n user.wraith.blake3 "$mnt/$rel" 2>"$WORK/logs/xattr.err") ||
        { echo "getfattr failed: $(last_line "$WORK/logs/xattr.err")"; return 1; }
    [ "$got" == "$want" ] || { echo "getfattr '$got' != b3sum '$want'"; return 1; }
}

t_b3sum() {
    local got
    got=$(timeout 600 b3sum --no-names "$1") || { echo "b3sum failed"; return 1; }
    [ "$got" == "$2" ] || { echo "b3sum $got, source $2"; return 1; }
}

t_same_inode() {
    local mnt=$1 i1 i2 i3
    i1=$(timeout 10 stat -c %i "$mnt/hardlinks/a") || { echo "stat a failed"; return 1; }
    i2=$(timeout 10 stat -c %i "$mnt/hardlinks/b") || { echo "stat b failed"; return 1; }
    i3=$(timeout 10 stat -c %i "$mnt/hardlinks/sub/c") || { echo "stat sub/c failed"; return 1; }
    if [ "$i1" != "$i2" ] || [ "$i2" != "$i3" ]; then
        echo "inodes $i1 $i2 $i3"
        return 1
    fi
}

t_outside_rel() {
    local out rc
    out=$(timeout 10 cat "$1/links/outside-rel" 2>/dev/null)
    rc=$?
    [ "$rc" -eq 124 ] && { echo "cat hung"; return 1; }
    [ "$rc" -ne 0 ] && { echo "read fails (allowed)"; return 0; }
    [ "$out" == "$(cat /etc/passwd)" ] && { echo "read gives the client's /etc/passwd"; return 0; }
    echo "read gave ${#out} bytes that are not the client's /etc/passwd"
    return 1
}

t_no_canary() {
    local out
    out=$(timeout 10 cat "$1/escape" 2>&1)
    [ "$?" -eq 124 ] && { echo "cat hung"; return 1; }
    case $out in *"$CANARY"*) echo "read through 'escape' printed the server's file outside the export"; return 1 ;; esac
    return 0
}

t_tar_count() {
    local a b
    a=$(tar -C "$SRC" -cf - . | wc -c) || { echo "tar of the source failed"; return 1; }
    b=$(timeout 600 tar -C "$1" -cf - . 2>"$WORK/logs/tar.err" | wc -c) ||
        { echo "tar of the mount failed: $(last_line "$WORK/logs/tar.err")"; return 1; }
    [ "$a" = "$b" ] || { echo "tar of the mount is $b bytes, of the source $a bytes"; return 1; }
    echo "$b bytes"
}

t_tar_extract() {
    local u=$WORK/untar rc
    rm -rf --one-file-system "$u"
    mkdir -p "$u"
    timeout 600 tar -C "$1" -cf - . 2>"$WORK/logs/tar.err" | timeout 600 tar -C "$u" -xf - ||
        { echo "tar pipeline failed: $(last_line "$WORK/logs/tar.err")"; rm -rf --one-file-system "$u"; return 1; }
    treecmp "$SRC" "$u"
    rc=$?
    rm -rf --one-file-system "$u"
    return "$rc"
}

t_mmap() {
    timeout 60 python3 - "$SRC/$2" "$1/$2" <<'PY'
import mmap, sys
src, mnt = sys.argv[1], sys.argv[2]
with open(src, "rb") as f:
    want = f.read()
with open(mnt, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
    got = m[:]
    mid = m[len(m) // 2: len(m) // 2 + 4096]
if got != want or mid != want[len(want) // 2: len(want) // 2 + 4096]:
    print("mmap content differs from the source"); sys.exit(1)
PY
}

SQL='SELECT count(*), sum(v), min(name), max(name) FROM t'

t_sqlite_py() {
    timeout 60 python3 - "$SRC/db/test.sqlite" "$1/db/test.sqlite" "$SQL" <<'PY'
import sqlite3, sys, urllib.parse
src, mnt, sql = sys.argv[1:4]
want = sqlite3.connect(src).execute(sql).fetchall()
con = sqlite3.connect("file:%s?mode=ro&immutable=1" % urllib.parse.quote(mnt), uri=True)
con.execute("PRAGMA mmap_size=16777216")
got = con.execute(sql).fetchall()
if got != want:
    print("query on the mount gave %r, on the source %r" % (got, want)); sys.exit(1)
PY
}

t_sqlite_cli() {
    local want got
    want=$(sqlite3 -readonly "$SRC/db/test.sqlite" "$SQL") || { echo "sqlite3 on the source failed"; return 1; }
    got=$(timeout 60 sqlite3 -readonly "$1/db/test.sqlite" "PRAGMA mmap_size=16777216; $SQL" 2>&1) ||
        { echo "sqlite3 on the mount failed: $got"; return 1; }
    got=$(printf '%s\n' "$got" | tail -n 1)
    [ "$got" == "$want" ] || { echo "mount: '$got', source: '$want'"; return 1; }
}

# t_errno OP PATH ERRNO: a write-type operation on PATH fails with ERRNO.
t_errno() {
    timeout 30 python3 - "$@" <<'PY'
import errno, os, sys
op, path, want = sys.argv[1], sys.argv[2], sys.argv[3]
ops = {
    "create": lambda: os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)),
    "write-existing": lambda: os.close(os.open(path, os.O_WRONLY)),
    "mkdir": lambda: os.mkdir(path),
    "unlink": lambda: os.unlink(path),
    "chmod": lambda: os.chmod(path, 0o777),
    "stat": lambda: os.stat(path),
}
try:
    ops[op]()
except OSError as e:
    if errno.errorcode.get(e.errno) == want:
        sys.exit(0)
    print("%s failed with %s (%s), expected %s" % (op, errno.errorcode.get(e.errno), e.strerror, want))
    sys.exit(1)
print("%s succeeded, expected %s" % (op, want))
sys.exit(1)
PY
}

t_touch_erofs() {
    local out
    out=$(timeout 10 touch "$1/new-file" 2>&1) && { echo "touch succeeded"; return 1; }
    case $out in *"Read-only file system"*) return 0 ;; esac
    echo "touch failed with: $out"
    return 1
}

t_ls_missing() {
    local out
    out=$(timeout 10 ls "$1/no-such-file" 2>&1) && { echo "ls succeeded"; return 1; }
    case $out in *"No such file or directory"*) return 0 ;; esac
    echo "ls failed with: $out"
    return 1
}

t_exec_version() {
    local a b
    a=$(/bin/true --version 2>&1)
    b=$(timeout 10 "$1/bin/true-copy" --version 2>&1) || { echo "exit $?"; return 1; }
    [ "$a" == "$b" ] || { echo "output differs from /bin/true --version"; return 1; }
}

t_dir_link() {
    local a b
    a=$(ls "$SRC/small/d00")
    b=$(timeout 10 ls "$1/links/dir-link/") || { echo "ls through the symlink failed"; return 1; }
    [ "$a" == "$b" ] || { echo "listing through dir-link differs"; return 1; }
}

t_xattr_listed() {
    local out
    out=$(timeout 10 getfattr --absolute-names -d -m - "$1" 2>&1) || { echo "getfattr -d failed: $out"; return 1; }
    case $out in *user.wraith.blake3*) return 0 ;; esac
    echo "listxattr does not name user.wraith.blake3"
    return 1
}

# ----------------------------------------------------------------------------------------------
# suites

suite_loopback() {
    local M=$WORK/cli/lo f
    ensure_lo_server || return
    check "loopback: key file created, mode 0600, 64 hex chars" t_key_file
    if grep -qF "$KEY" "$WORK/logs/serve-loopback.log"; then
        ok "loopback: server prints the key file's path"
    else
        not_ok "loopback: server prints the key file's path" "$KEY not in its output"
    fi
    mount_ok loopback "" "127.0.0.1:$LO_PORT:/tree" "$M" "keyfile=$KEY,attr_timeout=1" || return
    check_eq "loopback: the kernel's readahead for the mount is 1 MiB (readahead= default)" 1024 "$(read_ahead_kb "$M")"

    check "loopback: every file equal to the source (names, types, sizes, links, bytes)" treecmp "$SRC" "$M"
    check "loopback: find listing equals the source's (spaces, UTF-8)" t_listing "$M"
    check "loopback: ls -a shows . and .. like the source" bash -c "diff <(ls -a '$SRC/small') <(timeout 30 ls -a '$M/small')"
    check "loopback: b3sum of big.bin equals the source's" t_b3sum "$M/big.bin" "$BIG_B3"
    check "loopback: cmp chunk/size-$((2 * CHUNK + 7))" timeout 60 cmp "$SRC/chunk/size-$((2 * CHUNK + 7))" "$M/chunk/size-$((2 * CHUNK + 7))"
    for f in empty.txt chunk/size-1 "chunk/size-$((CHUNK - 1))" "chunk/size-$CHUNK" "chunk/size-$((CHUNK + 1))" \
        "chunk/size-$((2 * CHUNK + 7))" "names/résumé ü.txt" hardlinks/sub/c; do
        check "loopback: getfattr user.wraith.blake3 = b3sum: $f" t_xattr "$M" "$f"
    done
    check "loopback: getfattr user.wraith.blake3 = b3sum: big.bin" t_xattr "$M" big.bin "$BIG_B3"
    check "loopback: listxattr names user.wraith.blake3" t_xattr_listed "$M/chunk/size-1"
    check_eq "loopback: hard link count is 3" 3 "$(timeout 10 stat -c %h "$M/hardlinks/a" 2>&1)"
    check "loopback: the three hard link names have one inode" t_same_inode "$M"
    for f in links/rel-inside links/outside-rel links/abs links/dangling links/dir-link escape; do
        check_eq "loopback: readlink $f" "$(readlink "$SRC/$f")" "$(timeout 10 readlink "$M/$f" 2>&1)"
    done
    check "loopback: read through a relative symlink inside the export" timeout 30 cmp "$SRC/chunk/size-$CHUNK" "$M/links/rel-inside"
    check "loopback: list through a symlink to a directory" t_dir_link "$M"
    check "loopback: absolute symlink resolves on the client" timeout 10 cmp /etc/passwd "$M/links/abs"
    check "loopback: outside-pointing symlink gives the client's /etc/passwd or fails" t_outside_rel "$M"
    check "loopback: symlink to ../outside-secret never shows the server's file" t_no_canary "$M"
    check_fails "loopback: dangling symlink does not read" timeout 10 cat "$M/links/dangling"
    check "loopback: tar cf - . | wc -c equals the source's" t_tar_count "$M"
    check "loopback: tar of the mount extracts to a tree equal to the source" t_tar_extract "$M"
    check "loopback: mmap read (python3)" t_mmap "$M" "chunk/size-$((2 * CHUNK + 7))"
    check "loopback: sqlite query, read-only immutable URI with mmap (python3)" t_sqlite_py "$M"
    check "loopback: sqlite3 -readonly query" t_sqlite_cli "$M"
    check "loopback: execute bin/true-copy from the mount" timeout 10 "$M/bin/true-copy"
    check "loopback: bin/true-copy --version equals /bin/true's" t_exec_version "$M"
    check "loopback: touch fails with 'Read-only file system'" t_touch_erofs "$M"
    check "loopback: create fails with EROFS" t_errno create "$M/created" EROFS
    check "loopback: open existing file for writing fails with EROFS" t_errno write-existing "$M/chunk/size-1" EROFS
    check "loopback: mkdir fails with EROFS" t_errno mkdir "$M/newdir" EROFS
    check "loopback: unlink fails with EROFS" t_errno unlink "$M/chunk/size-1" EROFS
    check "loopback: chmod fails with EROFS" t_errno chmod "$M/chunk/size-1" EROFS
    check "loopback: ls of a missing file fails with 'No such file or directory'" t_ls_missing "$M"
    check "loopback: stat of a missing file fails with ENOENT" t_errno stat "$M/small/no-such-file" ENOENT
    check "loopback: statfs (stat -f)" timeout 10 stat -f "$M"
    f=$(find "$SRC/deep" -name leaf.txt -printf '%P')
    check "loopback: deep nested file" timeout 30 cmp "$SRC/deep/$f" "$M/deep/$f"
    umount_ok loopback "$M"
}

# The same tree exported with 64 KiB chunks: content and roots do not depend on the chunk size.
suite_chunk64() {
    local M=$WORK/cli/c64 f
    ensure_lo_server || return
    mount_ok chunk64 "" "127.0.0.1:$LO_PORT:/tree64" "$M" "keyfile=$KEY,readahead=4M" || return
    check_eq "chunk64: readahead=4M sets the kernel's readahead for the mount" 4096 "$(read_ahead_kb "$M")"
    for f in chunk/size-1 "chunk/size-$CHUNK" "chunk/size-$((CHUNK + 1))" "chunk/size-$((2 * CHUNK + 7))" db/test.sqlite; do
        check "chunk64: cmp $f" timeout 60 cmp "$SRC/$f" "$M/$f"
        check "chunk64: getfattr = b3sum: $f" t_xattr "$M" "$f"
    done
    check "chunk64: getfattr = b3sum: big.bin" t_xattr "$M" big.bin "$BIG_B3"
    umount_ok chunk64 "$M"
    # A mount of a subdirectory of the share.
    M=$WORK/cli/c64sub
    mount_ok chunk64-subdir "" "127.0.0.1:$LO_PORT:/tree64/chunk" "$M" "keyfile=$KEY" || return
    check "chunk64-subdir: cmp size-$((CHUNK + 1)) at the mount's root" timeout 60 cmp "$SRC/chunk/size-$((CHUNK + 1))" "$M/size-$((CHUNK + 1))"
    check_fails "chunk64-subdir: nothing above the subdirectory is reachable" timeout 10 ls "$M/big.bin"
    umount_ok chunk64-subdir "$M"
}

suite_change() {
    local M=$WORK/cli/chg wait=2
    ensure_lo_server || return
    mount_ok change "" "127.0.0.1:$LO_PORT:/chg" "$M" "keyfile=$KEY,attr_timeout=1" || return
    check "change: initial inplace.txt" timeout 30 cmp "$CHG/inplace.txt" "$M/inplace.txt"
    check "change: initial replace.txt" timeout 30 cmp "$CHG/replace.txt" "$M/replace.txt"
    check_fails "change: new.txt does not exist yet" timeout 10 ls "$M/new.txt"

    # Rewrite in place (same inode, larger), replace by rename (new inode, smaller), add, delete.
    python3 -c 'import sys; open(sys.argv[1], "r+b").write(b"version 2, longer than before\n" * 500)' "$CHG/inplace.txt"
    printf 'version 2, short\n' >"$CHG/replace.txt.tmp" && mv -f "$CHG/replace.txt.tmp" "$CHG/replace.txt"
    printf 'a new file\n' >"$CHG/new.txt"
    rm -f "$CHG/gone.txt"
    sleep "$wait"
    check "change: rewritten in place, seen after attr_timeout" timeout 30 cmp "$CHG/inplace.txt" "$M/inplace.txt"
    check "change: replaced by rename, seen after attr_timeout" timeout 30 cmp "$CHG/replace.txt" "$M/replace.txt"
    check "change: new file seen after attr_timeout" timeout 30 cmp "$CHG/new.txt" "$M/new.txt"
    check "change: getfattr follows the new content" t_xattr "$M" replace.txt "$(b3sum --no-names "$CHG/replace.txt")"
    check_fails "change: deleted file is gone after attr_timeout" timeout 10 cat "$M/gone.txt"

    # A second rewrite to a different size, read by a new open.
    python3 -c 'import sys; open(sys.argv[1], "wb").write(b"version 3\n" * 7)' "$CHG/inplace.txt"
    sleep "$wait"
    check "change: truncated and rewritten, seen after attr_timeout" timeout 30 cmp "$CHG/inplace.txt" "$M/inplace.txt"
    # A file of several chunks rewritten in place twice, read each time: the server keeps only
    # the hash tree of its current version (older ones are collected).
    local i
    for i in 1 2 3; do
        python3 -c 'import sys; open(sys.argv[1], "r+b" if sys.argv[2] != "1" else "wb").write(bytes([int(sys.argv[2])]) * (600000 + int(sys.argv[2])))' "$CHG/multi.bin" "$i"
        sleep "$wait"
        check "change: multi-chunk file, version $i, reads right" timeout 30 cmp "$CHG/multi.bin" "$M/multi.bin"
    done
    check "change: the server's state holds the tree of the current version of multi.bin only" \
        timeout 30 python3 - "$WORK/state/lo" "$CHG/multi.bin" <<'PY'
import os, struct, sys
st = os.stat(sys.argv[2])
mine = []
for n in os.listdir(sys.argv[1]):
    if not n.endswith(".tree"):
        continue
    h = open(os.path.join(sys.argv[1], n), "rb").read(96)
    dev, ino, size, mtime, ctime = struct.unpack_from("<QQQqq", h, 12)
    if (dev, ino) == (st.st_dev, st.st_ino):
        mine.append((size, ctime))
assert mine == [(st.st_size, st.st_ctime_ns)], mine
PY
    # One version per open: a reader holds a 48 MiB file open while it is rewritten on the
    # server (same size, other bytes). It may go on reading what was fetched before the change
    # (its readahead and prefetch window, a few MiB), then gets ESTALE: never a byte of the new
    # version, never a mix.
    head -c $((48 << 20)) /dev/urandom >"$CHG/open.bin"
    check "change: a file rewritten while open reads old bytes, then ESTALE, never new ones" \
        timeout 60 python3 - "$M/open.bin" "$CHG/open.bin" <<'PY'
import errno, os, sys
mnt, src = sys.argv[1], sys.argv[2]
old = open(src, "rb").read()
f = open(mnt, "rb", buffering=0)
got = bytearray(f.read(1 << 20))
with open(src, "r+b") as w:
    w.write(os.urandom(len(old)))
err = None
try:
    while True:
        b = f.read(1 << 20)
        if not b:
            break
        got += b
except OSError as e:
    err = e.errno
assert got == old[: len(got)], f"the {len(got)} bytes read are not the version opened"
assert err == errno.ESTALE, f"read {len(got)} of {len(old)} bytes, then {err and errno.errorcode[err]} (want ESTALE)"
assert len(got) < len(old), "the whole old version was read"
PY
    check "change: a new open of the rewritten file reads the new version" timeout 30 cmp "$CHG/open.bin" "$M/open.bin"
    umount_ok change "$M"
}

# expect_mount_failure NAME SPEC OPTS PATTERN MAX_SECS
expect_mount_failure() {
    local name=$1 spec=$2 opts=$3 pattern=$4 max=$5 mnt=$WORK/cli/fail t0 rc el lines
    t0=$(now)
    mount_wraith "" "$spec" "$mnt" "$opts"
    rc=$?
    el=$(elapsed "$t0")
    if [ "$rc" -eq 0 ]; then
        not_ok "$name: refused (non-zero exit)" "wraith-mount exited 0"
        unmount "$mnt"
        return
    elif [ "$rc" -eq 124 ]; then
        not_ok "$name: refused (non-zero exit)" "still running after 90 s"
    else
        ok "$name: refused (non-zero exit $rc)"
    fi
    if le "$el" "$max"; then ok "$name: fails within $max s (${el} s)"; else not_ok "$name: fails within $max s" "took $el s"; fi
    if grep -qiE "$pattern" "$WORK/logs/mount.err"; then
        ok "$name: message matches /$pattern/"
    else
        not_ok "$name: message matches /$pattern/" "stderr was: $(head -c 300 "$WORK/logs/mount.err")"
    fi
    lines=$(grep -c . "$WORK/logs/mount.err")
    check_eq "$name: exactly one line on stderr" 1 "$lines"
    if is_mounted "$mnt"; then
        not_ok "$name: nothing left mounted" "$mnt is mounted"
        unmount "$mnt"
    else
        ok "$name: nothing left mounted"
    fi
    local i
    for ((i = 0; i < 30; i++)); do
        [ -z "$(pids_with_arg "$mnt")" ] && break
        sleep 0.1
    done
    if [ -z "$(pids_with_arg "$mnt")" ]; then
        ok "$name: no process left behind"
    else
        not_ok "$name: no process left behind" "pid $(pids_with_arg "$mnt" | tr '\n' ' ')"
    fi
}

suite_errors() {
    ensure_lo_server || return
    local other=$WORK/keys/other.key port
    make_key "$other"
    expect_mount_failure "errors: wrong key" "127.0.0.1:$LO_PORT:/tree" "keyfile=$other" 'key' 15
    expect_mount_failure "errors: missing key file" "127.0.0.1:$LO_PORT:/tree" "keyfile=$WORK/keys/does-not-exist" 'key' 15
    expect_mount_failure "errors: unknown share" "127.0.0.1:$LO_PORT:/nosuchshare" "keyfile=$KEY" 'share' 15
    expect_mount_failure "errors: bad spec" "nocolon" "keyfile=$KEY" '.' 5
    expect_mount_failure "errors: readahead too large" "127.0.0.1:$LO_PORT:/tree" "keyfile=$KEY,readahead=1G" 'readahead=1G: at most 256M' 5
    port=$(free_udp_port)
    expect_mount_failure "errors: unreachable server" "127.0.0.1:$port:/tree" "keyfile=$KEY,timeout=3" 'did not answer within .*: unreachable.*\[[0-9]+ datagrams sent, nothing came back\]' 20
    # Another protocol version. A HELLO of version 1 gets a small answer naming ours ...
    check "errors: a HELLO of protocol version 1 is answered with a REJECT in version 2, echoing its nonce" \
        timeout 10 python3 - "$LO_PORT" <<'PY'
import os, socket, sys
nonce = os.urandom(32)
hello = bytes([0x52, 0x57, 1, 1]) + bytes(16) + nonce
hello += bytes(1200 - len(hello))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(hello, ("127.0.0.1", int(sys.argv[1])))
r, _ = s.recvfrom(2048)
assert len(r) == 52 and r[:4] == bytes([0x52, 0x57, 2, 3]) and r[20:52] == nonce, r.hex()
PY
    # ... and a server of another version (played by python: it answers any HELLO that way, as
    # version 3) makes the mount fail at once with a message that says so.
    port=$(free_udp_port)
    timeout 30 python3 - "$port" 2>/dev/null <<'PY' &
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.settimeout(25)
while True:
    d, a = s.recvfrom(4096)
    if len(d) >= 1200 and d[:2] == bytes([0x52, 0x57]) and d[3] == 1:
        s.sendto(bytes([0x52, 0x57, 3, 3]) + bytes(16) + d[20:52], a)
PY
    PIDS+=("$!")
    wait_udp_listen "" 127.0.0.1 "$port" "$!" 10 >/dev/null 2>&1
    expect_mount_failure "errors: server of another protocol version" "127.0.0.1:$port:/tree" "keyfile=$KEY" 'protocol version 3.*same wraith version' 10
}

suite_ipv6() {
    local M=$WORK/cli/v6 port pid
    if ! ip -6 addr show dev lo 2>/dev/null | grep -q 'inet6 ::1/'; then
        not_ok "ipv6: ::1 configured on lo" "no ::1 here (IPv6 disabled?)"
        return
    fi
    ensure_lo_server || return
    # A host name: whatever localhost resolves to, the client must find the IPv4 server.
    if mount_ok hostname "" "localhost:$LO_PORT:/tree" "$WORK/cli/hn" "keyfile=$KEY"; then
        check "hostname: cmp chunk/size-$((CHUNK + 1))" timeout 60 cmp "$SRC/chunk/size-$((CHUNK + 1))" "$WORK/cli/hn/chunk/size-$((CHUNK + 1))"
        umount_ok hostname "$WORK/cli/hn"
    fi
    port=$(free_udp_port)
    serve ipv6 "" ::1 "$port" --key "$KEY" --state-dir "$WORK/state/v6" --export "tree=$SRC" || return
    pid=$SERVER_PID
    if mount_ok ipv6 "" "[::1]:$port:/tree" "$M" "keyfile=$KEY"; then
        check "ipv6: cmp chunk/size-$((2 * CHUNK + 7))" timeout 60 cmp "$SRC/chunk/size-$((2 * CHUNK + 7))" "$M/chunk/size-$((2 * CHUNK + 7))"
        check "ipv6: getfattr = b3sum: chunk/size-$CHUNK" t_xattr "$M" "chunk/size-$CHUNK"
        umount_ok ipv6 "$M"
    fi
    stop_pid "$pid" 10
    # A server on the wildcard address (the default, dual-stack) answers from the address it
    # was sent to: 127.0.0.2 is this machine's too, but a reply left to the kernel's route
    # comes from 127.0.0.1, and the client drops it.
    port=$(free_udp_port)
    serve wildcard "" :: "$port" --key "$KEY" --state-dir "$WORK/state/wild" --export "tree=$SRC" || return
    pid=$SERVER_PID
    local a
    for a in 127.0.0.2 '[::1]'; do
        if mount_ok "wildcard via $a" "" "$a:$port:/tree" "$M" "keyfile=$KEY,timeout=10"; then
            check "wildcard via $a: cmp chunk/size-$((2 * CHUNK + 7))" timeout 60 cmp "$SRC/chunk/size-$((2 * CHUNK + 7))" "$M/chunk/size-$((2 * CHUNK + 7))"
            umount_ok "wildcard via $a" "$M"
        fi
    done
    stop_pid "$pid" 10
}

suite_netns() {
    local M=$WORK/cli/ns t0 el
    ensure_ns_server || return
    mount_ok netns "$NS_B" "$NS_A_ADDR:/tree" "$M" "keyfile=$KEY" || return
    drop_caches || log "drop_caches not permitted: the server's disk cache may be warm"
    t0=$(now)
    check "netns: cold read of big.bin through veth, b3sum equals the source's" t_b3sum "$M/big.bin" "$BIG_B3"
    el=$(elapsed "$t0")
    log "netns: ${BIG_MIB} MiB cold in ${el} s ($(awk -v m="$BIG_MIB" -v s="$el" 'BEGIN { printf "%.0f", m * 1.048576 / (s > 0 ? s : 0.001) }') MB/s)"
    check "netns: small files equal to the source" treecmp "$SRC/small/d03" "$M/small/d03"
    check "netns: getfattr = b3sum: chunk/size-$((CHUNK + 1))" t_xattr "$M" "chunk/size-$((CHUNK + 1))"
    umount_ok netns "$M"
}

# children PID: direct children of PID.
children() { cat "/proc/$1/task/$1/children" 2>/dev/null; }

suite_restart() {
    local M=$WORK/cli/rs big_bytes cmp_pid tpid rc in_flight=0 i rchar t0 el
    ensure_ns_server || return
    mount_ok restart "$NS_B" "$NS_A_ADDR:/tree" "$M" "keyfile=$KEY" || return
    drop_caches || log "drop_caches not permitted: the read may be faster than the kill"
    big_bytes=$((BIG_MIB * 1048576))
    t0=$(now)
    timeout 300 cmp "$SRC/big.bin" "$M/big.bin" >"$WORK/logs/restart-cmp.out" 2>&1 7>&- 8>&- &
    tpid=$!
    PIDS+=("$tpid")
    # Kill after ~0.5 s, or earlier once cmp has read about a quarter of the mounted file.
    for ((i = 0; i < 10; i++)); do
        sleep 0.05
        cmp_pid=$(children "$tpid" | awk '{print $1}')
        [ -n "$cmp_pid" ] || continue
        rchar=$(awk '/^rchar/ {print $2}' "/proc/$cmp_pid/io" 2>/dev/null || echo 0)
        [ "${rchar:-0}" -ge $((big_bytes / 2)) ] && break
    done
    kill -0 "$tpid" 2>/dev/null && in_flight=1
    kill -KILL "$NS_PID" 2>/dev/null
    wait "$NS_PID" 2>/dev/null
    log "restart: server killed with SIGKILL after $(elapsed "$t0") s; read in flight: $in_flight"
    sleep 2
    ns_serve restart || { stop_pid "$tpid" 1; return; }
    wait "$tpid"
    rc=$?
    el=$(elapsed "$t0")
    case $rc in
        0) ok "restart: read across kill -9 and restart completes, bytes equal (cmp, ${el} s)" ;;
        124) not_ok "restart: read across kill -9 and restart completes" "cmp still running after 300 s" ;;
        *) not_ok "restart: read across kill -9 and restart completes" "cmp exit $rc: $(last_line "$WORK/logs/restart-cmp.out")" ;;
    esac
    if [ "$in_flight" = 1 ]; then
        ok "restart: the server was killed while the read was in flight"
    elif [ "$BIG_MIB" -ge 256 ]; then
        not_ok "restart: the server was killed while the read was in flight" "cmp had finished before the kill"
    else
        log "restart: big.bin (${BIG_MIB} MiB) was read before the kill; the mid-read restart was not exercised"
    fi
    check "restart: mount works again (an uncached file)" timeout 60 cmp "$SRC/chunk/size-$((CHUNK - 1))" "$M/chunk/size-$((CHUNK - 1))"
    umount_ok restart "$M"
}

# An export's chunk size changed while a mount stays up: the same file (the same BLAKE3 root)
# comes back cut at another size, and the chunks memory holds of the old cut are other chunks.
# Before, they were served for the new cut (keyed by root and index alone): wrong offsets, or a
# FUSE thread's panic.
suite_rechunk() {
    local M=$WORK/cli/rechunk port pid dir=$WORK/srv/rechunk want got
    mkdir -p "$dir"
    head -c $((3 * 1048576 + 4097)) /dev/urandom >"$dir/f"
    want=$(b3sum --no-names "$dir/f")
    port=$(free_udp_port)
    serve rechunk-64k "" 127.0.0.1 "$port" --key "$KEY" --state-dir "$WORK/state/rechunk" --export "r=$dir,chunk=64K" || return
    pid=$SERVER_PID
    if mount_ok rechunk "" "127.0.0.1:$port:/r" "$M" "keyfile=$KEY,cache_size=0,attr_timeout=0,timeout=10"; then
        check "rechunk: read at 64 KiB chunks" timeout 60 cmp "$dir/f" "$M/f"
        stop_pid "$pid" 10
        if serve rechunk-1m "" 127.0.0.1 "$port" --key "$KEY" --state-dir "$WORK/state/rechunk" --export "r=$dir,chunk=1M"; then
            pid=$SERVER_PID
            drop_caches || log "drop_caches not permitted: the page cache may answer"
            check "rechunk: read again after the export went to 1 MiB chunks, bytes equal" timeout 60 cmp "$dir/f" "$M/f"
            got=$(timeout 60 b3sum --no-names "$M/f" 2>&1)
            check_eq "rechunk: b3sum after the change" "$want" "$got"
        fi
        umount_ok rechunk "$M"
    fi
    stop_pid "$pid" 10
}

suite_gone() {
    local M=$WORK/cli/gone port pid i t0 el rc f="chunk/size-$((2 * CHUNK + 7))"
    port=$(free_udp_port)
    serve gone "" 127.0.0.1 "$port" --key "$KEY" --state-dir "$WORK/state/gone" --export "tree=$SRC" || return
    pid=$SERVER_PID
    if ! mount_ok gone "" "127.0.0.1:$port:/tree" "$M" "keyfile=$KEY,timeout=3,attr_timeout=1"; then
        stop_pid "$pid" 5
        return
    fi
    check "gone: read while the server runs" timeout 30 cmp "$SRC/chunk/size-1" "$M/chunk/size-1"
    kill -TERM "$pid"
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        not_ok "gone: server exits on SIGTERM" "still running 10 s after SIGTERM"
        stop_pid "$pid" 1
    else
        ok "gone: server exits on SIGTERM"
    fi
    wait "$pid" 2>/dev/null
    t0=$(now)
    timeout 30 cat "$M/$f" >/dev/null 2>"$WORK/logs/check.out"
    rc=$?
    el=$(elapsed "$t0")
    case $rc in
        0) not_ok "gone: read of an uncached file fails" "cat succeeded with the server gone" ;;
        124) not_ok "gone: read of an uncached file fails" "cat hung for 30 s" ;;
        *) ok "gone: read of an uncached file fails (exit $rc: $(last_line "$WORK/logs/check.out"))" ;;
    esac
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && le "$el" 12; then
        ok "gone: the failure comes within ~10 s with timeout=3 (${el} s)"
    else
        not_ok "gone: the failure comes within ~10 s with timeout=3" "took $el s"
    fi
    umount_ok gone "$M"
}

# A hard mount keeps retrying while the server is gone, Ctrl-C (SIGINT) interrupts the waiting
# reader, and the mount works again by itself once the server is back on the same port.
suite_hard() {
    local M=$WORK/cli/hard port pid rpid t0 f="chunk/size-$((2 * CHUNK + 7))"
    port=$(free_udp_port)
    serve hard "" 127.0.0.1 "$port" --key "$KEY" --state-dir "$WORK/state/hard" --export "tree=$SRC" || return
    pid=$SERVER_PID
    if ! mount_ok hard "" "127.0.0.1:$port:/tree" "$M" "keyfile=$KEY,hard,timeout=2,attr_timeout=1,cache_size=0"; then
        stop_pid "$pid" 5
        return
    fi
    check "hard: read while the server runs" timeout 30 cmp "$SRC/chunk/size-1" "$M/chunk/size-1"
    stop_pid "$pid" 5
    # A reader of an uncached file waits instead of failing... (bash starts background jobs with
    # SIGINT ignored; restore the default as an interactive shell's Ctrl-C would find it.)
    python3 -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp("cat", ["cat", sys.argv[1]])' \
        "$M/$f" >/dev/null 2>"$WORK/logs/hard-cat.out" &
    rpid=$!
    sleep 5
    if kill -0 "$rpid" 2>/dev/null; then
        ok "hard: a read keeps waiting past timeout=2 while the server is gone"
    else
        not_ok "hard: a read keeps waiting past timeout=2 while the server is gone" "cat ended: $(last_line "$WORK/logs/hard-cat.out")"
    fi
    # ...and Ctrl-C interrupts it.
    t0=$(now)
    kill -INT "$rpid" 2>/dev/null
    if wait_until 100 pid_gone "$rpid"; then
        ok "hard: SIGINT interrupts the waiting read ($(elapsed "$t0") s)"
    else
        not_ok "hard: SIGINT interrupts the waiting read" "still waiting 10 s after SIGINT"
        kill -KILL "$rpid" 2>/dev/null
    fi
    wait "$rpid" 2>/dev/null
    # The server comes back on the same port: the same mount serves again, with no remount.
    serve hard2 "" 127.0.0.1 "$port" --key "$KEY" --state-dir "$WORK/state/hard" --export "tree=$SRC" || return
    pid=$SERVER_PID
    check "hard: after the server returns, the mount reads again (cmp)" timeout 60 cmp "$SRC/$f" "$M/$f"
    # SIGTERM to the mount daemon: it unmounts and exits by itself.
    sigterm_daemon "hard: SIGTERM to the mount daemon unmounts it and it exits" "$M" 10
    # SIGTERM while the server is gone and reads wait for it: the daemon stops retrying (the
    # reader gets an error), unmounts and exits. Before, its FUSE and prefetch threads retried
    # for ever and the daemon never exited.
    if mount_ok hard-stop "" "127.0.0.1:$port:/tree" "$M" "keyfile=$KEY,hard,timeout=2,attr_timeout=1,cache_size=0"; then
        stop_pid "$pid" 5
        timeout 120 cat "$M/big.bin" >/dev/null 2>"$WORK/logs/hard-cat2.out" &
        rpid=$!
        sleep 3
        check "hard: a read waits while the server is gone (before SIGTERM)" kill -0 "$rpid"
        sigterm_daemon "hard: SIGTERM with the server gone and a read waiting: the daemon unmounts and exits" "$M" 20
        if wait_until 50 pid_gone "$rpid"; then
            ok "hard: the waiting read ended with the daemon ($(last_line "$WORK/logs/hard-cat2.out"))"
        else
            not_ok "hard: the waiting read ended with the daemon" "still running"
            kill -KILL "$rpid" 2>/dev/null
        fi
        wait "$rpid" 2>/dev/null
    fi
    stop_pid "$pid" 5
}

# run_script NAME SCRIPT [ARGS...]: run a suite that lives in its own script (with env set by
# the caller) and count its ok/not ok lines here.
run_script() {
    local name=$1 script=$E2E_DIR/$2 line rc n0=$FAIL
    shift 2
    [ -f "$script" ] || { not_ok "$name: $script exists" "missing"; return; }
    timeout 1500 bash "$script" "$@" >"$WORK/logs/$name.out" 2>&1 </dev/null 7>&- 8>&-
    rc=$?
    while IFS= read -r line; do
        case $line in
            "ok - "*) ok "$name: ${line#ok - }" ;;
            "not ok - "*) FAIL=$((FAIL + 1)); FAILED_NAMES+=("$name: ${line#not ok - }"); printf 'not ok - %s: %s\n' "$name" "${line#not ok - }" ;;
            "#"*) printf '%s\n' "$line" ;;
        esac
    done <"$WORK/logs/$name.out"
    if [ "$rc" -ne 0 ] && [ "$FAIL" -eq "$n0" ]; then
        not_ok "$name: exits 0" "exit $rc: $(last_line "$WORK/logs/$name.out")"
    fi
}

# mount(8) -> mount.wraith -> wraith-mount, in tests/e2e/mount_helper.sh (its own private mount
# namespace), against the loopback server.
suite_mount_helper() {
    ensure_lo_server || return
    WRAITH_BIN=$WRAITH_BIN SERVER_SPEC="127.0.0.1:$LO_PORT:/tree" KEYFILE=$KEY SRC=$SRC \
        run_script mount_helper mount_helper.sh
}

# AF_XDP (issue 4): tests/e2e/xdp.sh makes its own namespaces (10.77.1.x), servers and mounts.
suite_xdp() {
    WRAITH_BIN=$WRAITH_BIN run_script xdp xdp.sh
}

# The disk cache (issue 3): tests/e2e/cache.sh makes its own server, tree and mounts.
suite_cache() {
    WRAITH_BIN=$WRAITH_BIN run_script cache cache.sh --crash-trials "${WRAITH_E2E_CRASH_TRIALS:-50}"
}

# ----------------------------------------------------------------------------------------------

main() {
    local suites=("$@") s
    [ ${#suites[@]} -gt 0 ] || suites=("${ALL_SUITES[@]}")
    for s in "${suites[@]}"; do
        case " ${ALL_SUITES[*]} " in *" $s "*) ;; *) die "arguments" "unknown suite '$s' (have: ${ALL_SUITES[*]})" ;; esac
    done
    require_env
    require_bins
    setup_work wraith-e2e
    log "work $WORK; binaries $WRAITH_BIN; big ${BIG_MIB} MiB; small $SMALL; seed $SEED; suites ${suites[*]}"

    SRC=$WORK/srv/tree
    CHG=$WORK/srv/chg
    KEY=$WORK/keys/main.key
    CANARY="wraith-canary-$RANDOM$RANDOM: this file lies outside the export"
    printf '%s\n' "$CANARY" >"$WORK/srv/outside-secret"
    local t0
    t0=$(now)
    timeout 900 python3 "$REPO_ROOT/tests/gen_tree.py" "$SEED" "$SRC" --big-mib "$BIG_MIB" --small "$SMALL" \
        >"$WORK/logs/gen_tree.out" 2>&1 || die "generate the test tree" "$(last_line "$WORK/logs/gen_tree.out")"
    log "$(cat "$WORK/logs/gen_tree.out") in $(elapsed "$t0") s"
    cp -a "$SRC/change" "$CHG"
    printf 'about to be deleted\n' >"$CHG/gone.txt"
    BIG_B3=$(b3sum --no-names "$SRC/big.bin")

    for s in "${suites[@]}"; do
        t0=$(now)
        log "suite $s"
        "suite_$s"
        log "suite $s took $(elapsed "$t0") s"
    done
    [ -n "$LO_PID" ] && stop_pid "$LO_PID" 10
    [ -n "$NS_PID" ] && stop_pid "$NS_PID" 10
    [ "$FAIL" -eq 0 ]
}

main "$@"
