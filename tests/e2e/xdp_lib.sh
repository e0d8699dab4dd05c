# shellcheck shell=bash
# Namespaces for the AF_XDP test (tests/e2e/xdp.sh) and benchmark (scripts/bench-xdp). Sourced
# after lib.sh, whose cleanup deletes $NS_A and $NS_B on exit.
#
# Server namespace A: S_IF with S_ADDR; client namespace B: C_IF with C_ADDR; one veth pair,
# both ends inside the namespaces, nothing added to the host's namespace. XDP_QUEUES (default 1)
# receive and transmit queues on each end.

S_ADDR=10.77.1.1
C_ADDR=10.77.1.2
S_ADDR6=fd00:77:0:1::1
C_ADDR6=fd00:77:0:1::2
S_IF=wx0
C_IF=wx1

xdp_setup() {
    local ns pid
    # Namespaces of earlier runs whose process is gone.
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^wrxdp-[0-9]+-[ab]$'); do
        pid=${ns#wrxdp-}
        pid=${pid%-*}
        kill -0 "$pid" 2>/dev/null || ip netns del "$ns" 2>/dev/null
    done
    NS_A=wrxdp-$$-a
    NS_B=wrxdp-$$-b
    ip netns add "$NS_A" && ip netns add "$NS_B" || return 1
    local q=${XDP_QUEUES:-1}
    ip link add "$S_IF" netns "$NS_A" numrxqueues "$q" numtxqueues "$q" type veth \
        peer name "$C_IF" netns "$NS_B" numrxqueues "$q" numtxqueues "$q" || return 1
    ip -n "$NS_A" addr add "$S_ADDR/24" dev "$S_IF" && ip -n "$NS_B" addr add "$C_ADDR/24" dev "$C_IF" || return 1
    # IPv6 too (nodad: usable at once).
    ip -n "$NS_A" addr add "$S_ADDR6/64" dev "$S_IF" nodad && ip -n "$NS_B" addr add "$C_ADDR6/64" dev "$C_IF" nodad || return 1
    ip -n "$NS_A" link set lo up && ip -n "$NS_A" link set "$S_IF" up || return 1
    ip -n "$NS_B" link set lo up && ip -n "$NS_B" link set "$C_IF" up || return 1
    local i
    for ((i = 0; i < 50; i++)); do
        ip -n "$NS_A" link show "$S_IF" | grep -q 'state UP' && ip -n "$NS_B" link show "$C_IF" | grep -q 'state UP' && return 0
        sleep 0.1
    done
    return 1
}

