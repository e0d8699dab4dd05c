# shellcheck shell=bash
# Namespaces for the AF_XDP test (tests/e2e/xdp.sh) and benchmark (scripts/bench-xdp). Sourced
# after lib.sh, whose cleanup deletes $NS_A and $NS_B on exit.
#
# Server namespace A: S_IF with S_ADDR; client namespace B: C_IF with C_ADDR; one veth pair,
# both ends inside the namespaces, nothing added to the host's namespace. XDP_QUEUES (default 1)
# receive and transmit queues on each end. xdp_router_setup adds a router namespace R between
# them on two more links (lib.sh's cleanup deletes $NS_R too).

S_ADDR=10.77.1.1
C_ADDR=10.77.1.2
S_ADDR6=fd00:77:0:1::1
C_ADDR6=fd00:77:0:1::2
S_IF=wx0
C_IF=wx1

# veth_pair NS1 IF1 NS2 IF2: a veth pair with an end in each namespace, XDP_QUEUES queues each.
veth_pair() {
    local q=${XDP_QUEUES:-1}
    ip link add "$2" netns "$1" numrxqueues "$q" numtxqueues "$q" type veth \
        peer name "$4" netns "$3" numrxqueues "$q" numtxqueues "$q"
}

# links_up NS1 IF1 NS2 IF2: wait (up to 5 s) until both interfaces are up.
links_up() {
    local i
    for ((i = 0; i < 50; i++)); do
        ip -n "$1" link show "$2" | grep -q 'state UP' && ip -n "$3" link show "$4" | grep -q 'state UP' && return 0
        sleep 0.1
    done
    return 1
}

xdp_setup() {
    local ns pid
    # Namespaces of earlier runs whose process is gone.
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^wrxdp-[0-9]+-[abr]$'); do
        pid=${ns#wrxdp-}
        pid=${pid%-*}
        kill -0 "$pid" 2>/dev/null || ip netns del "$ns" 2>/dev/null
    done
    NS_A=wrxdp-$$-a
    NS_B=wrxdp-$$-b
    ip netns add "$NS_A" && ip netns add "$NS_B" || return 1
    veth_pair "$NS_A" "$S_IF" "$NS_B" "$C_IF" || return 1
    ip -n "$NS_A" addr add "$S_ADDR/24" dev "$S_IF" && ip -n "$NS_B" addr add "$C_ADDR/24" dev "$C_IF" || return 1
    # IPv6 too (nodad: usable at once).
    ip -n "$NS_A" addr add "$S_ADDR6/64" dev "$S_IF" nodad && ip -n "$NS_B" addr add "$C_ADDR6/64" dev "$C_IF" nodad || return 1
    ip -n "$NS_A" link set lo up && ip -n "$NS_A" link set "$S_IF" up || return 1
    ip -n "$NS_B" link set lo up && ip -n "$NS_B" link set "$C_IF" up || return 1
    links_up "$NS_A" "$S_IF" "$NS_B" "$C_IF"
}

# A server subnet and a client subnet joined by a router namespace R that forwards between them:
# A's RS_IF (RS_ADDR) -- R (RS_GW | RC_GW) -- B's RC_IF (RC_ADDR). Each end reaches the other's
# subnet only via its router address, so a packet must carry the router's Ethernet address.
RS_IF=wxr0
RC_IF=wxr1
RS_ADDR=10.77.20.1
RS_GW=10.77.20.254
RC_ADDR=10.77.21.2
RC_GW=10.77.21.254

xdp_router_setup() {
    NS_R=wrxdp-$$-r
    ip netns add "$NS_R" || return 1
    veth_pair "$NS_A" "$RS_IF" "$NS_R" wxr2 && veth_pair "$NS_B" "$RC_IF" "$NS_R" wxr3 || return 1
    ip -n "$NS_A" addr add "$RS_ADDR/24" dev "$RS_IF" && ip -n "$NS_B" addr add "$RC_ADDR/24" dev "$RC_IF" || return 1
    ip -n "$NS_R" addr add "$RS_GW/24" dev wxr2 && ip -n "$NS_R" addr add "$RC_GW/24" dev wxr3 || return 1
    ip -n "$NS_R" link set lo up && ip -n "$NS_R" link set wxr2 up && ip -n "$NS_R" link set wxr3 up || return 1
    ip -n "$NS_A" link set "$RS_IF" up && ip -n "$NS_B" link set "$RC_IF" up || return 1
    ip netns exec "$NS_R" sysctl -qw net.ipv4.ip_forward=1 || return 1
    ip -n "$NS_A" route add "${RC_ADDR%.*}.0/24" via "$RS_GW" dev "$RS_IF" &&
        ip -n "$NS_B" route add "${RS_ADDR%.*}.0/24" via "$RC_GW" dev "$RC_IF" || return 1
    links_up "$NS_A" "$RS_IF" "$NS_B" "$RC_IF"
}
