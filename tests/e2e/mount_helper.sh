#!/usr/bin/env bash
# Mount integration: mount(8) -> /sbin/mount.wraith -> wraith-mount, driven by a temporary fstab.
#
# Runs as root, inside a private mount namespace that it makes itself, and installs nothing on the
# host. The e2e runner provides:
#   WRAITH_BIN   directory with wraith-mount and the helper (mount.wraith, or mount-wraith as cargo
#                names it; the helper finds wraith-mount next to its own real path)
#   SERVER_SPEC  a served export, e.g. 127.0.0.1:7447:/share
#   KEYFILE      the key that export accepts
#   SRC          the export's source directory, to compare content with
# Optional: MOUNT_TIMEOUT (seconds any one mount may take before the test calls it hung; 120).
#
# How mount(8) finds the helper without installing it. util-linux mount(8) runs a helper only
# from a fixed search path (/sbin, /sbin/fs.d, /sbin/fs; no PATH, no environment override), so
# "mount -t wraith" needs /sbin/mount.wraith to exist. In the private namespace this script puts
# an overlayfs over the real directory behind /sbin (lower: that directory, read-only; upper: a
# tmpfs holding one symlink, mount.wraith -> $WRAITH_BIN/<helper>). Every host file stays visible
# and untouched, an installed /sbin/mount.wraith is shadowed by the one under test, and it all
# disappears with the namespace. If overlayfs is unavailable, the fallback binds a tmpfs of
# symlinks (to a bind of the original directory, plus the helper) over it, with the same effect.
# libmount would also record userspace options (_netdev) in /run/mount/utab, a host file:
# LIBMOUNT_UTAB points it into the test's temporary directory instead.
#
# Output: "ok - ..." / "not ok - ..." lines, "# ..." diagnostics, then "N passed, N failed".
# Exit status 0 only when every check passed.

set -uo pipefail

if [[ -z ${WRAITH_E2E_IN_NS:-} ]]; then
    [[ $(id -u) -eq 0 ]] || { echo "not ok - mount_helper.sh must run as root"; exit 1; }
    exec unshare -m --propagation private env WRAITH_E2E_IN_NS=1 bash "${BASH_SOURCE[0]}" "$@"
fi

MOUNT_TIMEOUT=${MOUNT_TIMEOUT:-120}
PASSED=0
FAILED=0

pass() { echo "ok - $*"; PASSED=$((PASSED + 1)); }
fail() { echo "not ok - $*"; FAILED=$((FAILED + 1)); }
diag() {
    local line
    while IFS= read -r line; do echo "#   $line"; done <<<"$*"
}
check() { # check DESCRIPTION COMMAND...
    local desc=$1
    shift
    if "$@"; then pass "$desc"; else fail "$desc"; fi
}
verdict() { # CONDITION; verdict $? DESCRIPTION
    if [[ $1 -eq 0 ]]; then pass "$2"; else fail "$2"; fi
}

for v in WRAITH_BIN SERVER_SPEC KEYFILE SRC; do
    if [[ -z ${!v:-} ]]; then
        echo "not ok - setup: environment variable $v is not set"
        exit 1
    fi
done
HELPER=""
for name in mount.wraith mount-wraith; do
    if [[ -x $WRAITH_BIN/$name ]]; then HELPER=$(readlink -f "$WRAITH_BIN/$name"); break; fi
done
if [[ -z $HELPER || ! -x $WRAITH_BIN/wraith-mount ]]; then
    echo "not ok - setup: $WRAITH_BIN lacks wraith-mount or mount.wraith/mount-wraith"
    exit 1
fi

T=$(mktemp -d /tmp/wraith-mount-helper.XXXXXX)
export LIBMOUNT_UTAB=$T/utab
mkdir -p "$T/mnt" "$T/bad" "$T/wrongkey" "$T/esc" "$T/opt"

# --- helpers -------------------------------------------------------------------------------------

# Number of mounts stacked on exactly this directory (0 when not mounted).
mount_count() { awk -v d="$1" '$5 == d' /proc/self/mountinfo | wc -l; }
is_mounted() { [[ $(mount_count "$1") -gt 0 ]]; }
not_mounted() { [[ $(mount_count "$1") -eq 0 ]]; }
# PIDs of wraith-mount processes serving DIR (its path is unique to this test run).
daemons_for() { pgrep -f -- "wraith-mount.* $1( |\$)"; }
# Waits up to 10 s for every wraith-mount of DIR to exit.
no_daemon_for() {
    local i
    for ((i = 0; i < 100; i++)); do
        daemons_for "$1" >/dev/null || return 0
        sleep 0.1
    done
    diag "still running for $1: $(daemons_for "$1" | tr '\n' ' ')"
    return 1
}
findmnt_field() { findmnt -n -o "$2" --mountpoint "$1" | head -n1; }
has_opt() { [[ ,$(findmnt_field "$1" OPTIONS), == *",$2,"* ]]; }
# fstab fields are split on white space and unescaped with \NNN octal.
fstab_esc() {
    local s=$1
    s=${s//\\/\\134}
    s=${s// /\\040}
    s=${s//$'\t'/\\011}
    printf '%s' "$s"
}
# Runs a command with a deadline; its stdout+stderr in $OUT, its status in $RC. Output goes
# through a file, not a pipe: a daemon that kept the pipe open would otherwise hang the test.
run() {
    timeout "$MOUNT_TIMEOUT" "$@" >"$T/run.out" 2>&1
    RC=$?
    OUT=$(cat "$T/run.out")
    if [[ $RC -eq 124 ]]; then OUT="(hung: killed after ${MOUNT_TIMEOUT}s) $OUT"; fi
}
# True when no wraith-mount of DIR holds the output file of `run` open (a daemon must detach).
daemon_detached() {
    local pid fd
    for pid in $(daemons_for "$1"); do
        for fd in /proc/"$pid"/fd/*; do
            if [[ $(readlink "$fd") == "$T/run.out" ]]; then
                diag "wraith-mount $pid still holds mount's output open as fd ${fd##*/}"
                return 1
            fi
        done
    done
}
one_clear_line() { [[ -n $OUT && $(grep -c . <<<"$OUT") -eq 1 ]]; }
unmount() { timeout 30 umount "$1" 2>/dev/null || timeout 30 umount -l "$1" 2>/dev/null; }

cleanup() {
    local d pid
    for d in mnt bad wrongkey esc opt; do
        while is_mounted "$T/$d"; do umount -l "$T/$d" 2>/dev/null || break; done
        for pid in $(daemons_for "$T/$d"); do kill "$pid" 2>/dev/null; done
    done
    umount -l "$T/ovl" 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT

# --- make /sbin/mount.wraith exist inside this namespace only -------------------------------------

SBIN=$(readlink -f /sbin)
mkdir -p "$T/ovl"
if ! mount -t tmpfs -o mode=0755 wraith-test "$T/ovl"; then
    echo "not ok - setup: cannot mount a tmpfs in the private namespace"
    exit 1
fi
mkdir -p "$T/ovl/upper" "$T/ovl/work"
ln -s "$HELPER" "$T/ovl/upper/mount.wraith"
if ! mount -t overlay wraith-test \
    -o "lowerdir=$SBIN,upperdir=$T/ovl/upper,workdir=$T/ovl/work" "$SBIN" 2>"$T/ovl.err"; then
    diag "overlayfs over $SBIN failed ($(cat "$T/ovl.err")); using a bind-mounted symlink farm"
    mkdir -p "$T/ovl/orig" "$T/ovl/farm"
    mount --bind "$SBIN" "$T/ovl/orig"
    for f in "$T/ovl/orig"/* "$T/ovl/orig"/.[!.]*; do
        [[ -e $f || -L $f ]] && ln -s "$f" "$T/ovl/farm/${f##*/}"
    done
    rm -f "$T/ovl/farm/mount.wraith"
    ln -s "$HELPER" "$T/ovl/farm/mount.wraith"
    mount --bind "$T/ovl/farm" "$SBIN"
fi
check "mount(8) sees the helper under test as /sbin/mount.wraith" \
    test "$(readlink -f /sbin/mount.wraith)" = "$HELPER"

# --- a temporary fstab --------------------------------------------------------------------------

# SERVER_SPEC is HOST[:PORT]:/SHARE; the same share on a port where nothing listens is "server down".
SHARE_PATH="/${SERVER_SPEC#*:/}"
HOSTPORT=${SERVER_SPEC%%:/*}
HOST=$HOSTPORT
if [[ $HOSTPORT =~ ^(.*[^:]):([0-9]+)$ ]]; then HOST=${BASH_REMATCH[1]}; fi
DOWN_SPEC="$HOST:1:$SHARE_PATH"

# A copy of the key whose name holds a comma and a space, for the escaping checks, and a wrong key
# of the same shape (every hex digit rotated).
ODDKEY="$T/key, odd"
cp "$KEYFILE" "$ODDKEY"
chmod 600 "$ODDKEY"
tr '0123456789abcdef' '123456789abcdef0' <"$KEYFILE" >"$T/wrong.key"
chmod 600 "$T/wrong.key"

K=$(fstab_esc "$KEYFILE")
ODD_ESCAPED=$(fstab_esc "$ODDKEY")
ODD_ESCAPED=${ODD_ESCAPED//,/\\,}
FSTAB=$T/fstab
cat >"$FSTAB" <<EOF
# written by tests/e2e/mount_helper.sh
$SERVER_SPEC  $T/mnt       wraith  _netdev,keyfile=$K,nofail,x-systemd.automount,attr_timeout=1,readahead=2M  0 0
$DOWN_SPEC    $T/bad       wraith  noauto,_netdev,keyfile=$K,timeout=5  0 0
$SERVER_SPEC  $T/wrongkey  wraith  noauto,keyfile=$(fstab_esc "$T/wrong.key"),timeout=5  0 0
$SERVER_SPEC  $T/esc       wraith  noauto,keyfile=$ODD_ESCAPED  0 0
EOF
diag "fstab:"
diag "$(grep -v '^#' "$FSTAB")"

# A small regular file from the export to compare, by path relative to SRC.
SAMPLE=$(cd "$SRC" && find . -type f -size -8M -print -quit 2>/dev/null)
SAMPLE=${SAMPLE#./}

# Content equal to SRC: one file byte for byte, and the top-level listing.
content_matches() {
    local dir=$1
    if [[ -z $SAMPLE ]]; then
        diag "no regular file under $SRC to compare"
        return 1
    fi
    timeout 60 cmp -- "$SRC/$SAMPLE" "$dir/$SAMPLE" || return 1
    diff <(cd "$SRC" && ls -A) <(cd "$dir" && timeout 60 ls -A) >/dev/null
}

# --- mount through the fstab --------------------------------------------------------------------

run mount --fstab "$FSTAB" "$T/mnt"
[[ $RC -eq 0 ]] || diag "$OUT"
check "mount DIR (fstab entry) exits 0" test "$RC" -eq 0
check "findmnt source is the remote spec" test "$(findmnt_field "$T/mnt" SOURCE)" = "$SERVER_SPEC"
check "findmnt type is fuse.wraith" test "$(findmnt_field "$T/mnt" FSTYPE)" = "fuse.wraith"
has_opt "$T/mnt" ro && has_opt "$T/mnt" nosuid && has_opt "$T/mnt" nodev
verdict $? "mounted ro,nosuid,nodev"
check "content equals SRC ($SAMPLE)" content_matches "$T/mnt"
check "readahead=2M from the fstab line is the mount's readahead" test "$(cat "/sys/class/bdi/$(mountpoint -d "$T/mnt")/read_ahead_kb" 2>&1)" = 2048
check "the daemon detached from mount's stdout/stderr" daemon_detached "$T/mnt"
run touch "$T/mnt/wraith-write-probe"
if [[ $RC -ne 0 && $OUT == *"Read-only file system"* ]]; then
    pass "a write fails with EROFS"
else
    fail "a write fails with EROFS"
    diag "touch: rc=$RC: $OUT"
fi
run umount "$T/mnt"
[[ $RC -eq 0 ]] || diag "$OUT"
check "umount DIR exits 0" test "$RC" -eq 0
check "nothing left mounted after umount" not_mounted "$T/mnt"
check "wraith-mount exits after umount" no_daemon_for "$T/mnt"

# --- mount -a -------------------------------------------------------------------------------------

run mount -a --fstab "$FSTAB"
[[ $RC -eq 0 ]] || diag "$OUT"
check "mount -a --fstab exits 0" test "$RC" -eq 0
check "mount -a mounted the auto entry once" test "$(mount_count "$T/mnt")" -eq 1
not_mounted "$T/bad" && not_mounted "$T/wrongkey" && not_mounted "$T/esc"
verdict $? "mount -a left the noauto entries alone"
check "content equals SRC after mount -a" content_matches "$T/mnt"
run mount -a --fstab "$FSTAB"
[[ $RC -eq 0 && $(mount_count "$T/mnt") -eq 1 ]]
verdict $? "a second mount -a exits 0 and does not mount again"
run umount -l "$T/mnt"
[[ $RC -eq 0 ]] && not_mounted "$T/mnt"
verdict $? "umount -l works"
check "wraith-mount exits after umount -l" no_daemon_for "$T/mnt"

# --- failures: non-zero, one clear line, nothing mounted, no process left -------------------------

expect_refused() { # expect_refused DIR WHAT-TO-FIND-IN-MESSAGE(regex, case-insensitive) DESCRIPTION
    local dir=$1 want=$2 desc=$3
    diag "$desc: rc=$RC: $OUT"
    [[ $RC -ne 0 && $RC -ne 124 ]]
    verdict $? "$desc: mount exits non-zero (not hung)"
    check "$desc: one line on stderr" one_clear_line
    check "$desc: the message says what is wrong" grep -qiE -- "$want" <<<"$OUT"
    check "$desc: nothing mounted" not_mounted "$dir"
    check "$desc: no wraith-mount left running" no_daemon_for "$dir"
    check "$desc: the directory is usable" timeout 10 ls -A "$dir"
    while is_mounted "$dir"; do unmount "$dir" || break; done
}

run mount --fstab "$FSTAB" "$T/bad"
expect_refused "$T/bad" 'reach|unreachable|no answer|timed? ?out|refused|down' "server down ($DOWN_SPEC)"

run mount --fstab "$FSTAB" "$T/wrongkey"
expect_refused "$T/wrongkey" 'key' "wrong key"

run mount -t wraith -o "keyfile=$KEYFILE,frobnicate=3" "$SERVER_SPEC" "$T/opt"
expect_refused "$T/opt" "'frobnicate'" "unknown option"

run mount -t wraith -o "keyfile=$KEYFILE,transport=carrier-pigeon" "$SERVER_SPEC" "$T/opt"
expect_refused "$T/opt" 'transport' "bad value transport=carrier-pigeon"

# mount(8) never passes suid, dev or exec on (they are its defaults), so ask the helper directly.
run "$HELPER" "$SERVER_SPEC" "$T/opt" -o "keyfile=$KEYFILE,suid"
expect_refused "$T/opt" 'nosuid' "mount.wraith -o suid"

# --- option escaping: a key file named "key, odd" ------------------------------------------------

escaped_mount() { # escaped_mount DESCRIPTION COMMAND...
    local desc=$1
    shift
    run "$@"
    [[ $RC -eq 0 ]] || diag "$desc: rc=$RC: $OUT"
    [[ $RC -eq 0 ]] && is_mounted "$T/esc"
    verdict $? "$desc: mounts"
    check "$desc: content equals SRC" content_matches "$T/esc"
    unmount "$T/esc"
    check "$desc: unmounted" not_mounted "$T/esc"
    no_daemon_for "$T/esc" >/dev/null
}

escaped_mount "fstab value with \\, and \\040" mount --fstab "$FSTAB" "$T/esc"
escaped_mount "double-quoted value with comma and space" \
    mount -t wraith -o "keyfile=\"$ODDKEY\"" "$SERVER_SPEC" "$T/esc"
escaped_mount "mount.wraith called directly with \\, and a space" \
    "$HELPER" "$SERVER_SPEC" "$T/esc" -o "keyfile=${ODDKEY//,/\\,}" -o 'attr_timeout=1'
escaped_mount "mount.wraith -o with an octal escape" \
    "$HELPER" "$SERVER_SPEC" "$T/esc" -o "keyfile=$T/key\\,\\040odd"

# --- flags mount(8) passes: -f (fake), -s (sloppy) ------------------------------------------------

run mount -f -t wraith -o "keyfile=$KEYFILE" "$SERVER_SPEC" "$T/opt"
[[ $RC -eq 0 ]] && not_mounted "$T/opt"
verdict $? "mount -f exits 0 and mounts nothing"
[[ $RC -eq 0 ]] || diag "$OUT"

run mount -s -t wraith -o "keyfile=$KEYFILE,frobnicate=3" "$SERVER_SPEC" "$T/opt"
[[ $RC -eq 0 ]] || diag "$OUT"
[[ $RC -eq 0 ]] && is_mounted "$T/opt"
verdict $? "mount -s ignores an unknown option and mounts"
unmount "$T/opt"
check "sloppy mount unmounted" not_mounted "$T/opt"
no_daemon_for "$T/opt" >/dev/null

echo "$PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
