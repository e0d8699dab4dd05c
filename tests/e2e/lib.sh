# shellcheck shell=bash
# Shared helpers for wraith's end-to-end tests (tests/e2e/run.sh) and the benchmark (scripts/bench).
#
# Sourced, never run. Provides:
#   - a tiny TAP-like assertion framework: ok/not_ok/check/check_fails/check_eq, summary
#   - a work directory and a cleanup that runs on EXIT (also on failure and Ctrl-C):
#     unmounts what we mounted, stops what we started (by pid), deletes our namespaces
#   - network namespaces joined by a veth pair (10.77.0.1/24 <-> 10.77.0.2/24, both ends
#     inside the namespaces; nothing is added to the host's own namespace)
#   - starting wraith-serve and wraith-mount and waiting for them, all bounded in time
#
# Everything that can hang on a broken mount runs under `timeout`.

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$E2E_DIR/../.." && pwd)
WRAITH_BIN=${WRAITH_BIN:-$REPO_ROOT/target/release}
case $WRAITH_BIN in /*) ;; *) WRAITH_BIN=$REPO_ROOT/$WRAITH_BIN ;; esac

NS_A_ADDR=10.77.0.1
NS_B_ADDR=10.77.0.2

PASS=0
FAIL=0
FAILED_NAMES=()
WORK=
NS_A=
NS_B=
NS_R=
MOUNTS=()       # mount points we mounted (or tried to)
PIDS=()         # background processes we started
CLEANED=0

log() { printf '# %s\n' "$*"; }
die() {
    not_ok "$1" "$2"
    # Before setup_work there is no exit trap to print the summary.
    [ -z "$WORK" ] && [ "${E2E_SUMMARY:-0}" = 1 ] && summary
    exit 1
}

# --- assertions -------------------------------------------------------------------------------

ok() {
    PASS=$((PASS + 1))
    printf 'ok - %s\n' "$1"
}

# not_ok NAME REASON
not_ok() {
    FAIL=$((FAIL + 1))
    FAILED_NAMES+=("$1")
    local reason
    reason=$(printf '%s' "${2:-failed}" | tr '\n' ' ' | cut -c 1-600)
    printf 'not ok - %s: %s\n' "$1" "$reason"
}

# Last line of a file, squashed, for reasons.
last_line() { [ -s "$1" ] && tail -n 1 "$1" | tr -d '\r' | cut -c 1-300; }

# check NAME CMD...: ok when CMD exits 0. The command's output goes to a per-check log.
check() {
    local name=$1
    shift
    local out="$WORK/logs/check.out" rc
    "$@" >"$out" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        ok "$name"
    elif [ "$rc" -eq 124 ]; then
        not_ok "$name" "timed out: $(last_line "$out")"
    else
        not_ok "$name" "exit $rc: $(last_line "$out")"
    fi
    return "$rc"
}

# check_fails NAME CMD...: ok when CMD exits non-zero (and did not time out).
check_fails() {
    local name=$1
    shift
    local out="$WORK/logs/check.out" rc
    "$@" >"$out" 2>&1
    rc=$?
    if [ "$rc" -eq 124 ]; then
        not_ok "$name" "timed out instead of failing"
    elif [ "$rc" -ne 0 ]; then
        ok "$name"
    else
        not_ok "$name" "succeeded but should have failed: $(last_line "$out")"
    fi
}

# read_ahead_kb MNT: the kernel's readahead (KiB) for the filesystem mounted at MNT.
read_ahead_kb() {
    local dev
    dev=$(mountpoint -d "$1" 2>/dev/null) || { echo "not a mount point"; return; }
    cat "/sys/class/bdi/$dev/read_ahead_kb" 2>&1
}

# check_eq NAME EXPECTED ACTUAL
check_eq() {
    if [ "$2" == "$3" ]; then
        ok "$1"
    else
        not_ok "$1" "expected '$(printf '%s' "$2" | head -c 200)', got '$(printf '%s' "$3" | head -c 200)'"
    fi
}

# summary: prints the closing line "N passed, N failed".
summary() {
    if [ "$FAIL" -gt 0 ]; then
        log "failed checks:"
        local n
        for n in "${FAILED_NAMES[@]}"; do log "  $n"; done
    fi
    printf '%d passed, %d failed\n' "$PASS" "$FAIL"
    # For scripts/test, which reads the counts without piping our output (a pipe could be held
    # open by a daemon that outlived us).
    if [ -n "${WRAITH_E2E_RESULT:-}" ]; then
        printf '%d %d\n' "$PASS" "$FAIL" >"$WRAITH_E2E_RESULT"
    fi
}

# --- time -------------------------------------------------------------------------------------

now() { printf '%s' "$EPOCHREALTIME"; }
# elapsed T0 [T1]: seconds since T0 with millisecond precision
elapsed() { awk -v a="$1" -v b="${2:-$EPOCHREALTIME}" 'BEGIN { printf "%.3f", b - a }'; }
# le A B: true when A <= B (decimals)
le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a <= b) }'; }

# --- work dir and cleanup ---------------------------------------------------------------------

# setup_work PREFIX: make the work directory and install the traps. On exit (normal, failure
# or signal) on_exit unmounts, stops and deletes what we made; with E2E_SUMMARY=1 it first
# dumps logs of a failed run and ends with the summary line.
setup_work() {
    WORK=$(mktemp -d "/tmp/$1.XXXXXX") || die "mktemp" "cannot create a work directory"
    mkdir -p "$WORK/logs" "$WORK/srv" "$WORK/cli" "$WORK/keys" "$WORK/state"
    # The traps may fire inside a check whose output is redirected to a log: keep the real
    # stdout and stderr on fds 7 and 8 and report there.
    exec 7>&1 8>&2
    trap on_exit EXIT
    trap 'exec 1>&7 2>&8; not_ok "interrupted" "SIGINT"; exit 130' INT
    trap 'exec 1>&7 2>&8; not_ok "terminated" "SIGTERM"; exit 143' TERM
    trap 'exec 1>&7 2>&8; not_ok "hangup" "SIGHUP"; exit 129' HUP
}

on_exit() {
    local rc=$?
    exec 1>&7 2>&8
    if [ "${E2E_SUMMARY:-0}" = 1 ]; then
        [ "$rc" -eq 0 ] && [ "$FAIL" -gt 0 ] && rc=1
        [ "$FAIL" -gt 0 ] && dump_logs
        cleanup
        [ "$rc" -eq 0 ] && [ "$FAIL" -gt 0 ] && rc=1
        summary
    else
        cleanup
    fi
    exit "$rc"
}

is_mounted() { findmnt -rn --mountpoint "$1" >/dev/null 2>&1; }

# pids_with_arg ARG: pids of processes that have ARG (one of our unique work paths) as an
# argument. Used to find the daemonized wraith-mount of one of our mount points.
pids_with_arg() {
    local p a
    for p in /proc/[0-9]*; do
        [ -r "$p/cmdline" ] || continue
        while IFS= read -r -d '' a; do
            if [ "$a" == "$1" ]; then
                printf '%s\n' "${p#/proc/}"
                break
            fi
        done <"$p/cmdline" 2>/dev/null
    done
}

# pids_mentioning STR: pids of processes with STR inside one of their arguments (STR is our
# unique work directory, so these are processes this run started), not counting this shell.
pids_mentioning() {
    local p a
    for p in /proc/[0-9]*; do
        [ "${p#/proc/}" = "$$" ] || [ "${p#/proc/}" = "$BASHPID" ] && continue
        [ -r "$p/cmdline" ] || continue
        while IFS= read -r -d '' a; do
            if [[ $a == *"$1"* ]]; then
                printf '%s\n' "${p#/proc/}"
                break
            fi
        done <"$p/cmdline" 2>/dev/null
    done
}

# stop_pid PID [GRACE_SECS]: TERM, wait up to GRACE, then KILL. Only for pids we started.
stop_pid() {
    local pid=$1 grace=${2:-5} i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null
        sleep 0.2
    fi
    wait "$pid" 2>/dev/null
    return 0
}

# wait_until TENTHS CMD...: run CMD every 0.1 s until it succeeds, at most TENTHS times; its
# last status.
wait_until() {
    local n=$1 i
    shift
    for ((i = 0; i < n; i++)); do
        "$@" && return 0
        sleep 0.1
    done
    "$@"
}

# daemon_gone MNT: no wraith-mount serves MNT any more and it is not mounted.
daemon_gone() { [ -z "$(pids_with_arg "$1")" ] && ! mountpoint -q "$1"; }

# pid_gone PID: the process has exited.
pid_gone() { ! kill -0 "$1" 2>/dev/null; }

# sigterm_daemon NAME MNT SECS: SIGTERM to MNT's mount daemon; it must unmount and exit within
# SECS. On failure it is killed and MNT detached.
sigterm_daemon() {
    local name=$1 mnt=$2 secs=$3 dpids t0
    dpids=$(pids_with_arg "$mnt")
    if [ -z "$dpids" ]; then
        not_ok "$name" "no wraith-mount process for $mnt"
        umount_ok "$name" "$mnt"
        return
    fi
    t0=$(now)
    kill -TERM $dpids 2>/dev/null
    if wait_until $((secs * 10)) daemon_gone "$mnt"; then
        ok "$name ($(elapsed "$t0") s)"
    else
        not_ok "$name" "after $secs s: pids '$(pids_with_arg "$mnt")', mounted: $(mountpoint -q "$mnt" && echo yes || echo no)"
        kill -KILL $(pids_with_arg "$mnt") 2>/dev/null
        umount -l "$mnt" 2>/dev/null
    fi
}

# unmount MNT: umount, falling back to a lazy unmount; never hangs.
unmount() {
    local m=$1
    is_mounted "$m" || return 0
    timeout 20 umount "$m" 2>/dev/null && return 0
    timeout 10 fusermount3 -u "$m" 2>/dev/null && return 0
    timeout 10 umount -l "$m" 2>/dev/null && return 0
    timeout 10 fusermount3 -uz "$m" 2>/dev/null
}

cleanup() {
    [ "$CLEANED" -eq 1 ] && return
    CLEANED=1
    trap - INT TERM HUP
    local m p
    for m in "${MOUNTS[@]}"; do
        unmount "$m" || not_ok "cleanup: unmount $m" "umount, fusermount3 -u and lazy unmount all failed"
    done
    for p in "${PIDS[@]}"; do
        stop_pid "$p" 3
    done
    # Daemonized mount processes of our mount points (unmounting normally ends them), and
    # anything else still running with our work directory in its arguments.
    for m in "${MOUNTS[@]}"; do
        for p in $(pids_with_arg "$m"); do
            stop_pid "$p" 3
        done
    done
    if [ -n "$WORK" ]; then
        for p in $(pids_mentioning "$WORK/"); do
            log "stopping leftover process $p: $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c 1-200)"
            stop_pid "$p" 3
        done
    fi
    netns_teardown
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if findmnt -rn -o TARGET | grep -qF "$WORK"; then
            log "something is still mounted under $WORK; leaving it in place"
        elif [ "${WRAITH_E2E_KEEP:-0}" = 1 ]; then
            log "kept $WORK"
        else
            timeout 120 rm -rf --one-file-system "$WORK"
        fi
    fi
}

# --- prerequisites ----------------------------------------------------------------------------

# require_env: root, ip netns, FUSE, the tools the checks use, and the binaries. Fails loudly.
require_env() {
    local missing=() t
    [ "$(id -u)" -eq 0 ] || die "prerequisites" "must run as root (network namespaces, FUSE mounts, drop_caches)"
    for t in ip nsenter ss findmnt umount fusermount3 timeout cmp b3sum getfattr tar python3 stat find xargs awk sqlite3; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    [ ${#missing[@]} -eq 0 ] || die "prerequisites" "missing tools: ${missing[*]} (run .ci/run or install them)"
    [ -c /dev/fuse ] || die "prerequisites" "/dev/fuse is missing (modprobe fuse; mknod /dev/fuse c 10 229)"
    ip netns list >/dev/null 2>&1 || die "prerequisites" "'ip netns' does not work here"
}

require_bins() {
    local b
    for b in wraith-serve wraith-mount; do
        [ -x "$WRAITH_BIN/$b" ] || die "prerequisites" "$WRAITH_BIN/$b not found (build with 'cargo build --release --bins' or set WRAITH_BIN)"
    done
}

# --- network namespaces -----------------------------------------------------------------------

# netns_setup: two namespaces joined by veth, both ends inside them.
netns_setup() {
    local tag=wre2e-$$
    # Namespaces of earlier runs whose process is gone (a crash or kill -9).
    local ns pid
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^wre2e-[0-9]+-[ab]$'); do
        pid=${ns#wre2e-}
        pid=${pid%-*}
        kill -0 "$pid" 2>/dev/null || ip netns del "$ns" 2>/dev/null
    done
    NS_A=$tag-a
    NS_B=$tag-b
    ip netns add "$NS_A" || return 1
    ip netns add "$NS_B" || return 1
    ip link add wr0 netns "$NS_A" type veth peer name wr1 netns "$NS_B" || return 1
    ip -n "$NS_A" addr add "$NS_A_ADDR/24" dev wr0 || return 1
    ip -n "$NS_B" addr add "$NS_B_ADDR/24" dev wr1 || return 1
    ip -n "$NS_A" link set lo up && ip -n "$NS_A" link set wr0 up || return 1
    ip -n "$NS_B" link set lo up && ip -n "$NS_B" link set wr1 up || return 1
    # Wait (bounded) until the link carries traffic: both ends up and the neighbour reachable.
    local i
    for ((i = 0; i < 50; i++)); do
        if ip -n "$NS_B" link show wr1 | grep -q 'state UP' && ip -n "$NS_A" link show wr0 | grep -q 'state UP'; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

netns_teardown() {
    [ -n "$NS_A" ] && ip netns del "$NS_A" 2>/dev/null
    [ -n "$NS_B" ] && ip netns del "$NS_B" 2>/dev/null
    # A third namespace (a router) where a test made one.
    [ -n "${NS_R:-}" ] && ip netns del "$NS_R" 2>/dev/null
    NS_A=
    NS_B=
    NS_R=
    return 0
}

# in_ns NS CMD...: run CMD in namespace NS's network namespace only. Not `ip netns exec`: that
# also makes a private mount namespace, so a FUSE mount made inside it would be invisible to
# us, and every FUSE mount that exists when it starts is copied into it and outlives our umount
# (the mount daemon then never sees the unmount). NS empty: run CMD here.
in_ns() {
    local ns=$1
    shift
    if [ -n "$ns" ]; then
        nsenter --net="/run/netns/$ns" -- "$@"
    else
        "$@"
    fi
}

# --- helpers for files ------------------------------------------------------------------------

# free_udp_port: a UDP port on 127.0.0.1 that nothing is bound to right now.
free_udp_port() {
    python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# make_key FILE: a valid key file (32 random bytes as 64 hex chars and a newline), mode 0600.
make_key() {
    (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$1" && echo >>"$1")
}

# drop_caches: flush the page cache (cold reads). Returns non-zero where not allowed.
drop_caches() {
    timeout 60 sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null
}

# treecmp A B: compare two trees: names, types, sizes, symlink targets, exec bits and the bytes
# of every regular file. Prints up to 20 differences; exits non-zero if any. Bounded in time by
# $TREECMP_TIMEOUT (default 1200 s).
treecmp() {
    timeout "${TREECMP_TIMEOUT:-1200}" python3 - "$1" "$2" <<'PY'
import os, stat, sys
a_root, b_root = sys.argv[1], sys.argv[2]
diffs, files, nbytes = [], 0, 0

def kind(m):
    if stat.S_ISREG(m): return "file"
    if stat.S_ISDIR(m): return "dir"
    if stat.S_ISLNK(m): return "symlink"
    return "other(%o)" % stat.S_IFMT(m)

def same_bytes(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return "content differs near offset %d" % off
            if not x:
                return None
            off += len(x)

stack = [""]
while stack and len(diffs) < 20:
    rel = stack.pop()
    da, db = os.path.join(a_root, rel), os.path.join(b_root, rel)
    try:
        na, nb = sorted(os.listdir(da)), sorted(os.listdir(db))
    except OSError as e:
        diffs.append("%s: listdir: %s" % (rel or ".", e)); continue
    if na != nb:
        only_a = sorted(set(na) - set(nb))[:5]; only_b = sorted(set(nb) - set(na))[:5]
        diffs.append("%s: names differ; only in source %r, only in copy %r" % (rel or ".", only_a, only_b))
    for name in na:
        if name not in nb:
            continue
        r = os.path.join(rel, name)
        pa, pb = os.path.join(a_root, r), os.path.join(b_root, r)
        try:
            sa, sb = os.lstat(pa), os.lstat(pb)
        except OSError as e:
            diffs.append("%s: lstat: %s" % (r, e)); continue
        ka, kb = kind(sa.st_mode), kind(sb.st_mode)
        if ka != kb:
            diffs.append("%s: type %s vs %s" % (r, ka, kb)); continue
        if ka == "dir":
            stack.append(r)
        elif ka == "symlink":
            ta, tb = os.readlink(pa), os.readlink(pb)
            if ta != tb:
                diffs.append("%s: symlink target %r vs %r" % (r, ta, tb))
        elif ka == "file":
            files += 1
            if sa.st_size != sb.st_size:
                diffs.append("%s: size %d vs %d" % (r, sa.st_size, sb.st_size)); continue
            if (sa.st_mode & 0o111) != (sb.st_mode & 0o111):
                diffs.append("%s: exec bits %o vs %o" % (r, sa.st_mode & 0o777, sb.st_mode & 0o777))
            try:
                d = same_bytes(pa, pb)
            except OSError as e:
                d = "read: %s" % e
            if d:
                diffs.append("%s: %s" % (r, d))
            nbytes += sa.st_size
for d in diffs[:20]:
    print(d)
print("compared %d files, %d bytes, %d difference(s)%s%s" % (files, nbytes, len(diffs),
      "+" if len(diffs) >= 20 else "", "; first: " + diffs[0] if diffs else ""))
sys.exit(1 if diffs else 0)
PY
}

# --- wraith processes -------------------------------------------------------------------------

# start_server NS LOG ARGS...: start wraith-serve in namespace NS (empty: here) in the
# background, appending its output to LOG. Sets SERVER_PID. The caller waits for it.
start_server() {
    local ns=$1 logf=$2
    shift 2
    printf '=== %s wraith-serve %s\n' "$(date +%T.%N)" "$*" >>"$logf"
    # Started directly, not through a function (that would fork a subshell): nsenter execs the
    # server, so $! is the server itself and killing it kills the server. 7 and 8 (our saved
    # stdout/stderr) are closed so that nothing left running can hold a caller's pipe open.
    if [ -n "$ns" ]; then
        nsenter --net="/run/netns/$ns" -- "$WRAITH_BIN/wraith-serve" "$@" >>"$logf" 2>&1 </dev/null 7>&- 8>&- &
    else
        "$WRAITH_BIN/wraith-serve" "$@" >>"$logf" 2>&1 </dev/null 7>&- 8>&- &
    fi
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
}

# wait_udp_listen NS ADDR PORT PID [SECS]: wait until PID has a UDP socket on ADDR:PORT.
wait_udp_listen() {
    local ns=$1 addr=$2 port=$3 pid=$4 secs=${5:-20} i ssargs=(-H -u -l -n)
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 2
        in_ns "$ns" ss "${ssargs[@]}" 2>/dev/null | awk '{print $4}' | grep -qxF -e "$addr:$port" -e "[$addr]:$port" -e "*:$port" -e "[::]:$port" && return 0
        sleep 0.1
    done
    return 1
}

# serve NAME NS LISTEN_ADDR PORT ARGS...: start the server and wait for it. Logs to
# $WORK/logs/serve-NAME.log. Sets SERVER_PID. Reports a check "NAME: server starts".
serve() {
    local name=$1 ns=$2 addr=$3 port=$4 listen
    shift 4
    case $addr in *:*) listen="[$addr]:$port" ;; *) listen="$addr:$port" ;; esac
    start_server "$ns" "$WORK/logs/serve-$name.log" --listen "$listen" "$@"
    if wait_udp_listen "$ns" "$addr" "$port" "$SERVER_PID" 30; then
        ok "$name: server listens on $listen"
        return 0
    fi
    not_ok "$name: server listens on $listen" "not listening after 30 s: $(last_line "$WORK/logs/serve-$name.log")"
    return 1
}

# mount_wraith NS SPEC MNT OPTS [EXTRA...]: run wraith-mount (daemonizing) with a bound on
# its run time. Output in $WORK/logs/mount.err/out. Returns its exit code.
mount_wraith() {
    local ns=$1 spec=$2 mnt=$3 opts=$4 rc
    shift 4
    mkdir -p "$mnt"
    MOUNTS+=("$mnt")
    local args=("$spec" "$mnt")
    # Each mount gets its own disk cache inside the work directory (never /var/cache/wraith),
    # unless the test chose cache options itself.
    case ",$opts," in
        *,cache_dir=*|*,cache_size=*) ;;
        *) opts="cache_dir=$WORK/cache/$(basename "$mnt").$RANDOM${opts:+,$opts}" ;;
    esac
    args+=(-o "$opts")
    printf '=== %s wraith-mount %s\n' "$(date +%T.%N)" "${args[*]} $*" >>"$WORK/logs/mount-all.log"
    in_ns "$ns" timeout 90 "$WRAITH_BIN/wraith-mount" "${args[@]}" "$@" \
        >"$WORK/logs/mount.out" 2>"$WORK/logs/mount.err" </dev/null 7>&- 8>&-
    rc=$?
    cat "$WORK/logs/mount.out" "$WORK/logs/mount.err" >>"$WORK/logs/mount-all.log" 2>/dev/null
    return "$rc"
}

# mount_ok NAME NS SPEC MNT OPTS: mount, and check that the parent returned 0 only once the
# mount serves (it is in the mount table and its root can be listed).
mount_ok() {
    local name=$1 ns=$2 spec=$3 mnt=$4 opts=$5 rc
    mount_wraith "$ns" "$spec" "$mnt" "$opts"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        not_ok "$name: mount $spec" "wraith-mount exit $rc: $(last_line "$WORK/logs/mount.err")"
        return 1
    fi
    if ! is_mounted "$mnt"; then
        not_ok "$name: mount $spec" "wraith-mount exited 0 but $mnt is not in the mount table"
        return 1
    fi
    if ! timeout 30 ls "$mnt" >/dev/null 2>"$WORK/logs/check.out"; then
        not_ok "$name: mount $spec" "mounted, but ls of its root fails: $(last_line "$WORK/logs/check.out")"
        return 1
    fi
    ok "$name: mount $spec (parent exits 0 once the mount serves)"
}

# umount_ok NAME MNT: umount must succeed, the mount disappear and its daemon exit.
umount_ok() {
    local name=$1 mnt=$2 i
    if ! timeout 30 umount "$mnt" 2>"$WORK/logs/check.out"; then
        not_ok "$name: umount" "$(last_line "$WORK/logs/check.out")"
        unmount "$mnt"
        return 1
    fi
    if is_mounted "$mnt"; then
        not_ok "$name: umount" "still in the mount table"
        return 1
    fi
    ok "$name: umount"
    for ((i = 0; i < 100; i++)); do
        [ -z "$(pids_with_arg "$mnt")" ] && break
        sleep 0.1
    done
    if [ -z "$(pids_with_arg "$mnt")" ]; then
        ok "$name: mount daemon exits after umount"
    else
        local p waits=
        for p in $(pids_with_arg "$mnt"); do
            waits+="$p: $(for t in /proc/"$p"/task/*; do cat "$t/wchan" 2>/dev/null; echo; done | sort | uniq -c | tr -s ' \n' ' ')"
        done
        # A copy of the mount in another mount namespace keeps the FUSE connection alive.
        local holders
        holders=$(grep -lF " $mnt " /proc/[0-9]*/mountinfo 2>/dev/null | head -n 5 |
            while IFS= read -r f; do p=${f#/proc/}; p=${p%/mountinfo}; printf '%s(%s) ' "$p" "$(cat "/proc/$p/comm" 2>/dev/null)"; done)
        not_ok "$name: mount daemon exits after umount" "still running 10 s after umount (pid: thread wait channels) $waits; mount still present in the mount namespaces of: ${holders:-none}"
    fi
}

# dump_logs: the tail of every log, for a failed run.
dump_logs() {
    local f
    for f in "$WORK"/logs/serve-*.log "$WORK/logs/mount-all.log"; do
        [ -s "$f" ] || continue
        log "---- tail of ${f#"$WORK"/}"
        tail -n 25 "$f" | cut -c 1-300 | sed 's/^/#   /'
    done
}
