#!/usr/bin/env bash
# wraith over AF_XDP, end to end: the real binaries in two network namespaces joined by veth.
#
#   tests/e2e/xdp.sh            (as root)
#
# Checks: all four combinations (UDP/AF_XDP client x UDP/AF_XDP server) read files
# byte-identical (cmp and b3sum); while wraith runs on AF_XDP, a TCP connection over the same
# veth works (the XDP filter passes everything that is not wraith's), and so does UDP to the same
# port on another address of the interface; a server on the default listen address serves IPv4
# and IPv6 clients, and through its kernel socket clients of another address of the interface;
# a datagram that reaches the server in IP fragments (which the filter leaves to the kernel) is
# answered; after each process
# exits (umount, SIGTERM, kill -9) no XDP program is left on the interface; a stale wraith
# program attached without an owner is replaced; generic (skb) mode works; transport=auto
# falls back to UDP and transport=xdp fails, each with one line, when AF_XDP cannot start (no
# such interface, an interface that is down); a server without privilege exits with one line
# that says so; on a driver without native XDP (lo) the server picks generic mode by itself; a
# client whose side has a larger MTU than the server's reads through both kinds of server; a
# client and a server on two subnets joined by a router namespace read over AF_XDP through it
# (frames addressed to the gateway); policy rules, on addresses and ports, choose routes on both
# sides.
#
# Environment: WRAITH_BIN (directory with wraith-serve and wraith-mount, default
# target/release), WRAITH_XDP_MIB (size of the big file, default 64), WRAITH_E2E_KEEP=1.
# Prints "ok - NAME" / "not ok - NAME: REASON", then "N passed, N failed"; exits non-zero on
# failure. Addresses: 10.77.1.1 (server) and 10.77.1.2 (client), on the veth pair only.

set -uo pipefail
# shellcheck source=tests/e2e/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# shellcheck source=tests/e2e/xdp_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/xdp_lib.sh"

E2E_SUMMARY=1
MIB=${WRAITH_XDP_MIB:-64}
PORT=7447
# Two queues per veth end, so that every AF_XDP process binds (and is tested with) two sockets.
XDP_QUEUES=2

[ "$(id -u)" -eq 0 ] || die "prerequisites" "must run as root (namespaces, XDP, FUSE)"
for t in ip nsenter findmnt umount timeout cmp b3sum python3 ss setpriv; do
    command -v "$t" >/dev/null 2>&1 || die "prerequisites" "missing tool: $t"
done
[ -c /dev/fuse ] || die "prerequisites" "/dev/fuse is missing"
require_bins
setup_work wraith-xdp

SRC=$WORK/srv/tree
KEY=$WORK/keys/xdp.key
SERVER_PID=
HTTP_PID=

# xdp_attached NS IF: true when an XDP program is attached to IF.
xdp_attached() { ip -n "$1" link show "$2" 2>/dev/null | grep -q 'prog/xdp'; }

# no_xdp_left NAME NS IF: checks, waiting up to 5 s, that IF has no XDP program.
no_xdp_left() {
    local i
    for ((i = 0; i < 50; i++)); do
        xdp_attached "$2" "$3" || { ok "$1: no XDP program left on $3"; return 0; }
        sleep 0.1
    done
    not_ok "$1: no XDP program left on $3" "$(ip -n "$2" link show "$3" | grep prog/xdp)"
}

# xdp_refused NAME IFACE REASON: a client with transport=xdp on IFACE exits non-zero with one
# line that contains REASON.
xdp_refused() {
    local name=$1 ifc=$2 reason=$3 mnt=$WORK/cli/refused rc
    mount_wraith "$NS_B" "$S_ADDR:$PORT:/tree" "$mnt" "keyfile=$KEY,transport=xdp,iface=$ifc"
    rc=$?
    if [ "$rc" -ne 0 ] && [ "$(wc -l <"$WORK/logs/mount.err")" -eq 1 ] && grep -qF "$reason" "$WORK/logs/mount.err"; then
        ok "$name: transport=xdp exits non-zero with one line ($(cat "$WORK/logs/mount.err"))"
    else
        not_ok "$name: transport=xdp exits non-zero with one line" "exit $rc: $(cat "$WORK/logs/mount.err")"
        is_mounted "$mnt" && unmount "$mnt"
    fi
}

# auto_falls_back NAME IFACE REASON FILE: a client with transport=auto on IFACE says why in one
# line ("AF_XDP unavailable (REASON...); using UDP"), mounts over UDP and reads small/FILE.
auto_falls_back() {
    local name=$1 ifc=$2 reason=$3 file=$4 mnt=$WORK/cli/fallback
    if mount_wraith "$NS_B" "$S_ADDR:$PORT:/tree" "$mnt" "keyfile=$KEY,transport=auto,iface=$ifc"; then
        check_eq "$name: transport=auto says why in one line and falls back to UDP" 1 \
            "$(grep -c 'AF_XDP unavailable' "$WORK/logs/mount.err")"
        check "$name: the line names the reason" grep -qF "AF_XDP unavailable ($reason" "$WORK/logs/mount.err"
        check "$name: read over the UDP fallback" timeout 60 cmp "$SRC/small/$file" "$mnt/small/$file"
        umount_ok "$name" "$mnt"
    else
        not_ok "$name: transport=auto falls back to UDP" "$(last_line "$WORK/logs/mount.err")"
    fi
}

# start_server_mode NAME MODE [ARGS...]: MODE udp or xdp; on $SERVE_ADDR (default $S_ADDR), AF_XDP
# on $SERVE_IF (default $S_IF).
# Sets SERVER_PID.
start_server_mode() {
    local name=$1 mode=$2
    shift 2
    local extra=() ifc=${SERVE_IF:-$S_IF}
    [ "$mode" = xdp ] && extra=(--xdp "$ifc")
    serve "$name" "$NS_A" "${SERVE_ADDR:-$S_ADDR}" "$PORT" --key "$KEY" --state-dir "$WORK/state/s" \
        --export "tree=$SRC" "${extra[@]}" "$@" || return 1
    if [ "$mode" = xdp ]; then
        # The port is reserved before the program and sockets are up: wait for the start-up line.
        local i
        for ((i = 0; i < 100; i++)); do
            grep -q "AF_XDP on $ifc" "$WORK/logs/serve-$name.log" && break
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        if xdp_attached "$NS_A" "$ifc" && grep -q "AF_XDP on $ifc" "$WORK/logs/serve-$name.log"; then
            ok "$name: server runs AF_XDP on $ifc ($(grep -o '[0-9]* queue(s), [a-z]* mode, [a-z-]*' "$WORK/logs/serve-$name.log" | tail -1))"
        else
            not_ok "$name: server runs AF_XDP on $ifc" "$(last_line "$WORK/logs/serve-$name.log")"
            stop_pid "$SERVER_PID" 10
            return 1
        fi
    fi
}

# read_check NAME MNT: the big file and the small ones, byte for byte and by BLAKE3.
read_check() {
    local name=$1 mnt=$2 f
    check "$name: cmp big.bin" timeout 300 cmp "$SRC/big.bin" "$mnt/big.bin"
    local want got
    want=$(b3sum --no-names "$SRC/big.bin")
    got=$(timeout 300 b3sum --no-names "$mnt/big.bin" 2>&1)
    check_eq "$name: b3sum big.bin" "$want" "$got"
    local bad=0
    for f in "$SRC"/small/*; do
        timeout 30 cmp -s "$f" "$mnt/small/${f##*/}" || bad=$((bad + 1))
    done
    check_eq "$name: cmp of every small file" 0 "$bad"
}

# combo SERVER_MODE CLIENT_MODE
combo() {
    local smode=$1 cmode=$2 name="$1 server, $2 client" mnt=$WORK/cli/$1-$2
    if ! mount_ok "$name" "$NS_B" "$S_ADDR:$PORT:/tree" "$mnt" "keyfile=$KEY,transport=$cmode,iface=$C_IF"; then
        return 1
    fi
    if [ "$cmode" = xdp ]; then
        if xdp_attached "$NS_B" "$C_IF"; then ok "$name: client runs AF_XDP on $C_IF"; else not_ok "$name: client runs AF_XDP on $C_IF" "no XDP program on $C_IF"; fi
    fi
    read_check "$name" "$mnt"
    umount_ok "$name" "$mnt"
    no_xdp_left "$name: after umount" "$NS_B" "$C_IF"
}

# all_over_xdp NAME MNT: the mount sent every datagram over AF_XDP, none through the kernel path
# (it knew the server's next hop and its Ethernet address from its first datagram on).
all_over_xdp() {
    local st viak viax
    st=$(timeout 10 "$WRAITH_BIN/wraith-mount" --stats "$2")
    viak=$(awk '$1 == "xdp_tx_through_kernel" { print $2 }' <<<"$st")
    viax=$(awk '$1 == "xdp_tx_frames" { print $2 }' <<<"$st")
    check "$1: every datagram went over AF_XDP ($viax), none through the kernel ($viak)" \
        test "${viak:-1}" -eq 0 -a "${viax:-0}" -gt 10
}

# server_sent_over_xdp NAME LOG: the server that wrote LOG (stopped) sent its datagrams over
# AF_XDP, at most the two handshake answers through its kernel socket.
server_sent_over_xdp() {
    local totals viax viak
    totals=$(grep -o 'tx=[0-9]* .*tx_through_kernel=[0-9]*' "$2" | tail -1)
    viax=$(sed -n 's/^tx=\([0-9]*\) .*/\1/p' <<<"$totals")
    viak=$(sed -n 's/.*tx_through_kernel=\([0-9]*\)/\1/p' <<<"$totals")
    check "$1: it sent over AF_XDP ($viax), only the handshake answers through the kernel ($viak)" \
        test "${viak:-99}" -le 2 -a "${viax:-0}" -gt 1000
}

# udp_other_check NAME: another program's UDP socket on wraith's port, at another address of the
# server's interface, gets its datagrams while wraith runs AF_XDP (the filter takes only
# wraith's address and port).
udp_other_check() {
    local name=$1 other=10.77.1.3 got
    ip -n "$NS_A" addr add "$other/24" dev "$S_IF" || { not_ok "$name: add $other" "ip addr add failed"; return; }
    ip netns exec "$NS_A" timeout 20 python3 -c '
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(15)
d, a = s.recvfrom(2048)
s.sendto(b"echo:" + d, a)' "$other" "$PORT" >"$WORK/logs/udp-other.log" 2>&1 </dev/null &
    local echo_pid=$!
    PIDS+=("$echo_pid")
    got=$(nsenter --net="/run/netns/$NS_B" timeout 15 python3 -c '
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
for _ in range(20):
    s.sendto(b"ping", (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recvfrom(2048)[0].decode()); break
    except socket.timeout:
        pass' "$other" "$PORT" 2>&1)
    check_eq "$name: UDP to port $PORT at another address of $S_IF reaches its own program" "echo:ping" "$got"
    stop_pid "$echo_pid" 2
    ip -n "$NS_A" addr del "$other/24" dev "$S_IF"
}

tcp_check() {
    local name=$1
    ip netns exec "$NS_A" timeout 60 python3 -m http.server 8080 --bind "$S_ADDR" --directory "$SRC/small" \
        >"$WORK/logs/http.log" 2>&1 </dev/null &
    HTTP_PID=$!
    PIDS+=("$HTTP_PID")
    local i got=
    for ((i = 0; i < 50; i++)); do
        got=$(nsenter --net="/run/netns/$NS_B" timeout 5 python3 -c \
            'import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1], timeout=4).read())' \
            "http://$S_ADDR:8080/f0" 2>/dev/null | b3sum --no-names) && break
        sleep 0.1
    done
    check_eq "$name: TCP (HTTP over the same veth) works while wraith runs AF_XDP" "$(b3sum --no-names "$SRC/small/f0")" "$got"
    stop_pid "$HTTP_PID" 2
}

# --- setup --------------------------------------------------------------------------------------

xdp_setup || die "netns" "ip netns/veth setup failed"
ok "netns: $NS_A ($S_ADDR) and $NS_B ($C_ADDR) joined by veth ($XDP_QUEUES queues)"
make_key "$KEY"
mkdir -p "$SRC/small"
head -c $((MIB * 1048576)) /dev/urandom >"$SRC/big.bin" || die "setup" "cannot write the big file"
for i in $(seq 0 19); do head -c $((RANDOM * 7 + i)) /dev/urandom >"$SRC/small/f$i"; done

# --- the four combinations ----------------------------------------------------------------------

for smode in udp xdp; do
    start_server_mode "$smode-server" "$smode" || continue
    pid=$SERVER_PID
    for cmode in udp xdp; do
        combo "$smode" "$cmode"
    done
    [ "$smode" = xdp ] && tcp_check "xdp server"
    [ "$smode" = xdp ] && udp_other_check "xdp server"
    stop_pid "$pid" 10
    [ "$smode" = xdp ] && no_xdp_left "xdp server: after SIGTERM" "$NS_A" "$S_IF"
done

# --- IPv6: AF_XDP server on an IPv6 address, AF_XDP and UDP clients -----------------------------
# The client asks the kernel to resolve the server's address (neighbour discovery, which the
# filter passes) before its first datagram and reads it from the neighbour table (rtnetlink), so
# every datagram it sends goes over AF_XDP.
if SERVE_ADDR=$S_ADDR6 start_server_mode v6-xdp-server xdp; then
    pid=$SERVER_PID
    for cmode in xdp udp; do
        name="v6 xdp server, $cmode client"
        mnt=$WORK/cli/v6-$cmode
        if mount_ok "$name" "$NS_B" "[$S_ADDR6]:$PORT:/tree" "$mnt" "keyfile=$KEY,transport=$cmode,iface=$C_IF"; then
            [ "$cmode" = xdp ] && check "$name: client runs AF_XDP on $C_IF" xdp_attached "$NS_B" "$C_IF"
            read_check "$name" "$mnt"
            [ "$cmode" = xdp ] && all_over_xdp "$name" "$mnt"
            umount_ok "$name" "$mnt"
        fi
    done
    stop_pid "$pid" 10
    # A handshake answer goes through the kernel only if the server's neighbour table has no
    # entry for the client yet (a HELLO can be replayed, so its source address is not learned).
    server_sent_over_xdp "v6 xdp server" "$WORK/logs/serve-v6-xdp-server.log"
    no_xdp_left "v6 xdp server: after SIGTERM" "$NS_A" "$S_IF"
fi

# --- policy routing: the routes both ways are in tables of their own -----------------------------
# Client: its main table has no route to $PR_ADDR (an address of the server's interface); a rule
# on the destination *and wraith's port* sends UDP to it to table 100, which routes it via $S_ADDR
# from the client's extra address $PR_CLIENT. Server: its main table makes $PR_CLIENT
# unreachable; a rule on the source ($PR_ADDR) and source port sends replies to table 101, which
# has it on the link. Each side asks the kernel for the route of its own packets (rtnetlink, like
# `ip route get to DST from SRC ipproto udp sport S dport D`), so both follow their rules, ports
# included: the client picks the interface itself (no iface= option) and sends to the gateway's
# Ethernet address; the server answers over AF_XDP, not through its kernel socket.
PR_ADDR=10.77.9.1
PR_CLIENT=10.77.7.2
if ip -n "$NS_A" addr add "$PR_ADDR/32" dev "$S_IF" &&
    ip -n "$NS_B" addr add "$PR_CLIENT/32" dev "$C_IF" &&
    ip -n "$NS_B" route add "$PR_ADDR/32" via "$S_ADDR" dev "$C_IF" src "$PR_CLIENT" table 100 &&
    ip -n "$NS_B" rule add to "$PR_ADDR" ipproto udp dport "$PORT" lookup 100 pref 100 &&
    ip -n "$NS_A" route add unreachable "$PR_CLIENT/32" &&
    ip -n "$NS_A" route add "$PR_CLIENT/32" dev "$S_IF" table 101 &&
    ip -n "$NS_A" rule add from "$PR_ADDR" ipproto udp sport "$PORT" lookup 101 pref 100 &&
    ip netns exec "$NS_A" sysctl -qw net.ipv4.conf.all.rp_filter=0 "net.ipv4.conf.$S_IF.rp_filter=0"; then
    check "policy routing: the client's main table has no route to $PR_ADDR" \
        bash -c "! ip -n '$NS_B' route show table main | grep -q '$PR_ADDR'"
    check "policy routing: the server's main table has $PR_CLIENT unreachable" \
        bash -c "ip -n '$NS_A' route show table main | grep -q 'unreachable $PR_CLIENT'"
    if SERVE_ADDR=$PR_ADDR start_server_mode policy-xdp-server xdp; then
        pid=$SERVER_PID
        name="policy routing, xdp client"
        mnt=$WORK/cli/policy
        if mount_ok "$name" "$NS_B" "$PR_ADDR:$PORT:/tree" "$mnt" "keyfile=$KEY,transport=xdp"; then
            check "$name: client runs AF_XDP on $C_IF, the interface of table 100's route" xdp_attached "$NS_B" "$C_IF"
            check "$name: cmp of a small file" timeout 60 cmp "$SRC/small/f3" "$mnt/small/f3"
            check "$name: cmp big.bin" timeout 300 cmp "$SRC/big.bin" "$mnt/big.bin"
            all_over_xdp "$name" "$mnt"
            umount_ok "$name" "$mnt"
        fi
        stop_pid "$pid" 10
        server_sent_over_xdp "policy routing: server, by table 101's route" "$WORK/logs/serve-policy-xdp-server.log"
        no_xdp_left "policy routing: after SIGTERM" "$NS_A" "$S_IF"
    fi
else
    not_ok "policy routing: set up" "ip addr/route/rule or sysctl failed"
fi
ip -n "$NS_B" rule del pref 100 2>/dev/null
ip -n "$NS_A" rule del pref 100 2>/dev/null
ip -n "$NS_B" route flush table 100 2>/dev/null
ip -n "$NS_A" route flush table 101 2>/dev/null
ip -n "$NS_A" route del unreachable "$PR_CLIENT/32" 2>/dev/null
ip -n "$NS_B" addr del "$PR_CLIENT/32" dev "$C_IF" 2>/dev/null
ip -n "$NS_A" addr del "$PR_ADDR/32" dev "$S_IF" 2>/dev/null

# --- through a router: the next hop is the gateway, not the peer --------------------------------
# The server and the client sit on subnets of their own, joined by a router namespace that
# forwards between them. Each end runs AF_XDP on its link to the router and must address every
# frame to the router's Ethernet address (its route's gateway): the router drops frames for any
# other address, and a frame sent through the kernel socket instead shows in the counters.
if xdp_router_setup; then
    ok "router: $NS_A ($RS_ADDR) and $NS_B ($RC_ADDR) on two subnets, joined by $NS_R"
    if SERVE_ADDR=$RS_ADDR SERVE_IF=$RS_IF start_server_mode routed-xdp-server xdp; then
        pid=$SERVER_PID
        name="through a router, xdp client"
        mnt=$WORK/cli/routed
        read_ok=0
        if mount_ok "$name" "$NS_B" "$RS_ADDR:$PORT:/tree" "$mnt" "keyfile=$KEY,transport=xdp"; then
            read_ok=1
            check "$name: client runs AF_XDP on $RC_IF, the interface of its route" xdp_attached "$NS_B" "$RC_IF"
            check "$name: cmp of a small file" timeout 60 cmp "$SRC/small/f5" "$mnt/small/f5"
            check "$name: cmp big.bin" timeout 300 cmp "$SRC/big.bin" "$mnt/big.bin"
            all_over_xdp "$name" "$mnt"
            umount_ok "$name" "$mnt"
        fi
        no_xdp_left "$name: after umount" "$NS_B" "$RC_IF"
        stop_pid "$pid" 10
        server_sent_over_xdp "through a router: server" "$WORK/logs/serve-routed-xdp-server.log"
        no_xdp_left "through a router: server, after SIGTERM" "$NS_A" "$RS_IF"
        # The file crossed the router: it forwarded at least one frame per 1500 bytes of it
        # (whether they were sent over AF_XDP the counters above tell).
        if [ "$read_ok" = 1 ]; then
            fwd=$(ip -n "$NS_R" -s -j link show wxr3 | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["stats64"]["tx"]["packets"])')
            check "through a router: the router forwarded the read to the client ($fwd frames)" \
                test "${fwd:-0}" -gt $((MIB * 1048576 / 1500))
        fi
    fi
else
    not_ok "router: set up" "ip netns, veth, route or sysctl failed"
fi
[ -n "$NS_R" ] && ip netns del "$NS_R" 2>/dev/null
NS_R=

# --- the default listen address: both families; the kernel path ---------------------------------
# `wraith-serve --xdp IFACE` without --listen listens on [::]:7447, which on the UDP path is a
# dual-stack socket: over AF_XDP it serves the interface's IPv4 and global IPv6 address.
start_server "$NS_A" "$WORK/logs/serve-default.log" --key "$KEY" --state-dir "$WORK/state/s" --export "tree=$SRC" --xdp "$S_IF"
for ((i = 0; i < 100; i++)); do
    grep -q "AF_XDP on $S_IF" "$WORK/logs/serve-default.log" && break
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
done
if grep -q "address $S_ADDR and $S_ADDR6" "$WORK/logs/serve-default.log"; then
    ok "default listen: AF_XDP serves $S_ADDR and $S_ADDR6"
    for c in "xdp $S_ADDR" "udp [$S_ADDR6]"; do
        cmode=${c% *}
        host=${c#* }
        name="default listen, $cmode client to $host"
        if mount_ok "$name" "$NS_B" "$host:$PORT:/tree" "$WORK/cli/default" "keyfile=$KEY,transport=$cmode,iface=$C_IF"; then
            check "$name: read byte-identical" timeout 60 cmp "$SRC/small/f4" "$WORK/cli/default/small/f4"
            umount_ok "$name" "$WORK/cli/default"
        fi
    done
    # A HELLO of another protocol version, 3000 bytes: it crosses the 1500-byte link in IP
    # fragments, which the filter leaves to the kernel; the server reads the reassembled
    # datagram from its kernel socket and answers with a REJECT.
    check "default listen: a datagram that arrives in IP fragments is answered"         nsenter --net="/run/netns/$NS_B" timeout 15 python3 - "$S_ADDR" "$PORT" <<'PY'
import os, socket, sys
nonce = os.urandom(32)
hello = bytes([0x52, 0x57, 1, 1]) + bytes(16) + nonce
hello += bytes(3000 - len(hello))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
for _ in range(10):
    s.sendto(hello, (sys.argv[1], int(sys.argv[2])))
    try:
        r, _ = s.recvfrom(2048)
    except socket.timeout:
        continue
    assert r[20:52] == nonce, r.hex()
    sys.exit(0)
sys.exit("no answer")
PY
    # Another address of the interface, which AF_XDP does not serve: the filter leaves it to the
    # kernel, and the kernel path answers from that address (left to the kernel's route, the
    # answers came from $S_ADDR, and the client dropped them as a stranger's).
    other=10.77.1.9
    if ip -n "$NS_A" addr add "$other/24" dev "$S_IF"; then
        for cmode in udp xdp; do
            name="default listen, $cmode client to a second address of the interface"
            if mount_ok "$name" "$NS_B" "$other:$PORT:/tree" "$WORK/cli/default" "keyfile=$KEY,transport=$cmode,iface=$C_IF,timeout=10"; then
                check "$name: read byte-identical" timeout 60 cmp "$SRC/small/f4" "$WORK/cli/default/small/f4"
                umount_ok "$name" "$WORK/cli/default"
            fi
        done
        ip -n "$NS_A" addr del "$other/24" dev "$S_IF"
    else
        not_ok "default listen: add $other to $S_IF" "ip addr add failed"
    fi
else
    not_ok "default listen: AF_XDP serves $S_ADDR and $S_ADDR6" "$(last_line "$WORK/logs/serve-default.log")"
fi
stop_pid "$SERVER_PID" 10
no_xdp_left "default listen: after SIGTERM" "$NS_A" "$S_IF"

# --- replies through another interface with a smaller MTU ---------------------------------------
# The route back to the client leaves through a second link of MTU 1280, so the AF_XDP server
# answers through its kernel path, which does not fragment: the size of its datagrams must
# follow that route, not the AF_XDP interface (1500, which the client sends over and offers).
# Before, every answer above 1280 bytes was lost and reads ran into the mount's timeout.
if ip -n "$NS_A" link add wxm0 mtu 1280 type veth peer name wxm1 mtu 1280 netns "$NS_B" &&
    ip -n "$NS_A" addr add 10.77.3.1/24 dev wxm0 && ip -n "$NS_B" addr add 10.77.3.2/24 dev wxm1 &&
    ip -n "$NS_A" link set wxm0 up && ip -n "$NS_B" link set wxm1 up &&
    ip netns exec "$NS_B" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.wxm1.rp_filter=0 &&
    ip -n "$NS_A" route add "$C_ADDR/32" via 10.77.3.2 dev wxm0; then
    if start_server_mode "small-mtu-back" xdp; then
        name="answers through a 1280-byte link"
        mnt=$WORK/cli/mtu
        big=$(find "$SRC/small" -type f -size +100k | head -1)
        if mount_ok "$name" "$NS_B" "$S_ADDR:$PORT:/tree" "$mnt" "keyfile=$KEY,transport=udp,timeout=10"; then
            check "$name: cmp of ${big##*/} ($(stat -c %s "$big") bytes)" timeout 60 cmp "$big" "$mnt/small/${big##*/}"
            umount_ok "$name" "$mnt"
        fi
        stop_pid "$SERVER_PID" 10
        viak=$(grep -o 'tx_through_kernel=[0-9]*' "$WORK/logs/serve-small-mtu-back.log" | tail -1)
        check "$name: the server answered through the kernel ($viak)" test "${viak#*=}" -gt 50
    fi
    ip -n "$NS_A" link del wxm0
else
    not_ok "a second link of MTU 1280 between the namespaces" "ip failed"
    ip -n "$NS_A" link del wxm0 2>/dev/null
fi

# A TCP connection while the *client* side runs AF_XDP too.
start_server_mode "both-xdp" xdp || true
if mount_ok "both xdp, TCP" "$NS_B" "$S_ADDR:$PORT:/tree" "$WORK/cli/tcp" "keyfile=$KEY,transport=xdp"; then
    tcp_check "xdp server and client"
    check "both xdp: read while HTTP ran" timeout 60 cmp "$SRC/small/f1" "$WORK/cli/tcp/small/f1"
    umount_ok "both xdp, TCP" "$WORK/cli/tcp"
fi

# --- crash and stale programs -------------------------------------------------------------------

kill -KILL "$SERVER_PID" 2>/dev/null
wait "$SERVER_PID" 2>/dev/null
no_xdp_left "xdp server: after kill -9 (the BPF link dies with the process)" "$NS_A" "$S_IF"

OBJ=$WORK/stale.o
if command -v clang >/dev/null && clang -O2 -g -target bpf -c "$REPO_ROOT/bpf/wraith_xdp.c" -o "$OBJ" 2>"$WORK/logs/clang.log" &&
    ip -n "$NS_A" link set dev "$S_IF" xdpdrv obj "$OBJ" sec xdp 2>"$WORK/logs/iplink.log"; then
    ok "stale: a wraith XDP program attached without an owner (ip link ... xdp obj)"
    start_server_mode "stale" xdp || true
    if grep -q "replaced a stale wraith XDP program" "$WORK/logs/serve-stale.log"; then
        ok "stale: the server detects and replaces it"
    else
        not_ok "stale: the server detects and replaces it" "$(last_line "$WORK/logs/serve-stale.log")"
    fi
    if mount_ok "stale" "$NS_B" "$S_ADDR:$PORT:/tree" "$WORK/cli/stale" "keyfile=$KEY"; then
        check "stale: read after replacing" timeout 60 cmp "$SRC/small/f2" "$WORK/cli/stale/small/f2"
        umount_ok "stale" "$WORK/cli/stale"
    fi
    stop_pid "$SERVER_PID" 10
    no_xdp_left "stale: after SIGTERM" "$NS_A" "$S_IF"
else
    not_ok "stale: attach a wraith program by hand" "$(cat "$WORK/logs/clang.log" "$WORK/logs/iplink.log" | tail -1)"
fi

# --- generic mode, fallback and refusal ---------------------------------------------------------

start_server_mode "generic" xdp --xdp-mode generic --xdp-queues 0,1 || true
check "generic: --xdp-queues 0,1 binds two sockets" grep -q "AF_XDP on $S_IF (2 queue(s), generic mode" "$WORK/logs/serve-generic.log"
if ip -n "$NS_A" link show "$S_IF" | grep -q xdpgeneric; then ok "generic: server program in skb mode"; else not_ok "generic: server program in skb mode" "not xdpgeneric"; fi
if mount_ok "generic" "$NS_B" "$S_ADDR:$PORT:/tree" "$WORK/cli/generic" "keyfile=$KEY,transport=xdp,xdp_mode=generic"; then
    read_check "generic" "$WORK/cli/generic"
    umount_ok "generic" "$WORK/cli/generic"
fi

auto_falls_back "no such interface" nosuch0 "interface nosuch0 does not exist" f3
xdp_refused "no such interface" nosuch0 "interface nosuch0 does not exist"
# A second AF_XDP server on the same interface is refused (the first one owns the program).
check_fails "xdp: a second server on the same interface is refused" \
    ip netns exec "$NS_A" timeout 20 "$WRAITH_BIN/wraith-serve" --listen "$S_ADDR:7448" --key "$KEY" \
    --state-dir "$WORK/state/s2" --export "tree=$SRC" --xdp "$S_IF"
stop_pid "$SERVER_PID" 10
no_xdp_left "end" "$NS_A" "$S_IF"
no_xdp_left "end" "$NS_B" "$C_IF"

# --- a client whose side carries larger datagrams than the server's ------------------------------

# The client's end of the veth gets MTU 3000 and says so in its HELLO; the server's end stays at
# 1500. The server must send no datagram larger than its side carries (the UDP socket sends with
# "don't fragment": EMSGSIZE; an AF_XDP frame larger than the MTU).
ip -n "$NS_B" link set "$C_IF" mtu 3000
for smode in udp xdp; do
    SERVER_PID=
    start_server_mode "mtu $smode" "$smode" || { [ -n "$SERVER_PID" ] && stop_pid "$SERVER_PID" 10; continue; }
    if mount_ok "mtu $smode" "$NS_B" "$S_ADDR:$PORT:/tree" "$WORK/cli/mtu" "keyfile=$KEY,transport=udp"; then
        check "client MTU 3000, $smode server MTU 1500: read byte-identical" timeout 60 cmp "$SRC/small/f2" "$WORK/cli/mtu/small/f2"
        umount_ok "mtu $smode" "$WORK/cli/mtu"
    fi
    stop_pid "$SERVER_PID" 10
done
ip -n "$NS_B" link set "$C_IF" mtu 1500

# --- why AF_XDP cannot start: privilege, an interface that is down, a driver without XDP -------

# No privilege: a server as nobody, without capabilities, exits non-zero with one line that says so.
NOBODY=$WORK/nobody
mkdir -p "$NOBODY/state" && cp "$KEY" "$NOBODY/key" && chown -R 65534:65534 "$NOBODY" && chmod 711 "$WORK"
in_ns "$NS_A" timeout 20 setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all \
    "$WRAITH_BIN/wraith-serve" --listen "$S_ADDR:$PORT" --key "$NOBODY/key" --state-dir "$NOBODY/state" \
    --export "tree=$SRC" --xdp "$S_IF" >"$WORK/logs/serve-nobody.log" 2>&1 </dev/null
rc=$?
reason=$(grep 'AF_XDP unavailable' "$WORK/logs/serve-nobody.log")
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ "$(printf '%s\n' "$reason" | grep -c .)" -eq 1 ] && grep -q 'privilege' <<<"$reason"; then
    ok "no privilege: the server exits non-zero with one line naming the reason ($reason)"
else
    not_ok "no privilege: the server exits non-zero with one line naming the reason" "exit $rc: $(last_line "$WORK/logs/serve-nobody.log")"
fi
chmod 700 "$WORK"

# An interface that is down (a second veth pair in the client's namespace, its peer down).
DOWN_IF=wxd0
if ip -n "$NS_B" link add "$DOWN_IF" type veth peer name wxd1 && ip -n "$NS_B" link set "$DOWN_IF" up; then
    SERVER_PID=
    start_server_mode "down" udp
    xdp_refused "interface down" "$DOWN_IF" "interface $DOWN_IF is down"
    auto_falls_back "interface down" "$DOWN_IF" "interface $DOWN_IF is down" f1
    [ -n "$SERVER_PID" ] && stop_pid "$SERVER_PID" 10
    no_xdp_left "interface down" "$NS_B" "$DOWN_IF"
    ip -n "$NS_B" link del "$DOWN_IF" 2>/dev/null
else
    not_ok "interface down: make a veth pair that is down" "ip link add failed"
fi

# A driver without native XDP: loopback. The server picks generic (skb) mode by itself, and a
# client's requests reach it through the AF_XDP socket (rx counted in its AF_XDP totals). The
# frames must fit a 4 KiB UMEM frame: lo's MTU is lowered in this namespace for the test.
ip -n "$NS_A" link set lo mtu 3000
SERVER_PID=
serve "lo" "$NS_A" 127.0.0.1 "$PORT" --key "$KEY" --state-dir "$WORK/state/s" \
    --export "tree=$SRC" --xdp lo
for ((i = 0; i < 100; i++)); do
    grep -q "AF_XDP on lo" "$WORK/logs/serve-lo.log" && break
    sleep 0.1
done
check "no native XDP (lo): the server falls back to generic mode by itself" grep -q "AF_XDP on lo (1 queue(s), generic mode" "$WORK/logs/serve-lo.log"
if mount_ok "lo" "$NS_A" "127.0.0.1:$PORT:/tree" "$WORK/cli/lo" "keyfile=$KEY,transport=udp"; then
    check "lo: read byte-identical through the generic-mode server" timeout 60 cmp "$SRC/small/f4" "$WORK/cli/lo/small/f4"
    umount_ok "lo" "$WORK/cli/lo"
fi
[ -n "$SERVER_PID" ] && stop_pid "$SERVER_PID" 10
rx=$(grep -o 'AF_XDP totals rx=[0-9]*' "$WORK/logs/serve-lo.log" | tail -1 | cut -d= -f2)
check "lo: the requests came through the AF_XDP socket (rx=${rx:-none})" test "${rx:-0}" -gt 0
no_xdp_left "lo" "$NS_A" lo
ip -n "$NS_A" link set lo mtu 65536
