// SPDX-License-Identifier: MIT OR Apache-2.0
//
// wraith's XDP filter. Frames that carry UDP to wraith's port (IPv4 without fragmentation, or
// IPv6 with UDP as the first next header) go to the AF_XDP socket bound to the queue they
// arrived on. Everything else -- ARP, ICMP, TCP, other UDP ports, fragments, frames on a queue
// with no socket -- continues into the kernel's stack untouched (XDP_PASS).
//
// The port and the local addresses arrive after loading, through `wraith_cfg` (key 0); until
// the port is set the filter passes every frame. Only frames to wraith's port *and* to one of
// its addresses are taken: the same port on another address of the machine belongs to whoever
// bound it there, and keeps working. Built by build.rs with
// `clang -O2 -target bpf`; self-contained on purpose (no kernel or libbpf headers needed).

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

// Kernel ABI constants (include/uapi/linux/bpf.h, if_ether.h, in.h).
enum { XDP_ABORTED = 0, XDP_DROP = 1, XDP_PASS = 2 };
enum { MAP_ARRAY = 2, MAP_XSKMAP = 17 };
#define ETH_P_IPV4 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_VLAN 0x8100
#define ETH_P_QINQ 0x88A8
#define PROTO_UDP 17

struct xdp_md {
	__u32 data;
	__u32 data_end;
	__u32 data_meta;
	__u32 ingress_ifindex;
	__u32 rx_queue_index;
	__u32 egress_ifindex;
};

// Helper numbers are fixed kernel ABI: 1 = map_lookup_elem, 51 = redirect_map.
static void *(*map_lookup)(void *map, const void *key) = (void *)1;
static long (*redirect_map)(void *map, __u64 key, __u64 flags) = (void *)51;

#define CFG_V4 1
#define CFG_V6 2

struct wraith_cfg {
	__u16 port_be; // wraith's UDP port, network byte order; 0 = not configured
	__u16 flags;   // CFG_V4: serve IPv4 to `v4`; CFG_V6: serve IPv6 to `v6`
	__u8 v4[4];    // wire order
	__u8 v6[16];   // wire order
};

struct {
	__uint(type, MAP_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct wraith_cfg);
} wraith_cfg SEC(".maps");

// Queue index -> AF_XDP socket. Sized for the largest queue count wraith binds (MAX_QUEUES in
// src/sys/xdp_prog.rs).
struct {
	__uint(type, MAP_XSKMAP);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} wraith_xsks SEC(".maps");

// `-target bpf` compiles for the host's byte order: constants are turned into wire order for it.
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define BE16(x) ((__u16)((((x) & 0xff) << 8) | (((x) >> 8) & 0xff)))
#else
#define BE16(x) ((__u16)(x))
#endif

static inline __u16 load16(const __u8 *p)
{
	// Two bytes in wire order, as the host reads them from memory (comparable with BE16).
	__u16 v;
	__builtin_memcpy(&v, p, 2);
	return v;
}

static inline int same(const __u8 *a, const __u8 *b, int n)
{
	for (int i = 0; i < n; i++)
		if (a[i] != b[i])
			return 0;
	return 1;
}

SEC("xdp")
int wraith_xdp(struct xdp_md *ctx)
{
	const __u8 *p = (const __u8 *)(unsigned long)ctx->data;
	const __u8 *end = (const __u8 *)(unsigned long)ctx->data_end;
	__u32 zero = 0;
	struct wraith_cfg *cfg = map_lookup(&wraith_cfg, &zero);
	if (!cfg || cfg->port_be == 0)
		return XDP_PASS;

	if (p + 14 > end)
		return XDP_PASS;
	__u16 ethertype = load16(p + 12);
	p += 14;
	// VLAN-tagged frames belong to the kernel's VLAN devices: the AF_XDP path answers
	// untagged, so a tagged request is answered by the kernel path (its socket is bound there).
	if (ethertype == BE16(ETH_P_VLAN) || ethertype == BE16(ETH_P_QINQ))
		return XDP_PASS;

	const __u8 *udp;
	if (ethertype == BE16(ETH_P_IPV4)) {
		if (p + 20 > end)
			return XDP_PASS;
		__u32 ihl = (p[0] & 0x0f) * 4;
		if ((p[0] >> 4) != 4 || ihl < 20 || p[9] != PROTO_UDP)
			return XDP_PASS;
		// Fragments (more-fragments set or a non-zero offset) go to the kernel to reassemble.
		if ((load16(p + 6) & BE16(0x3fff)) != 0)
			return XDP_PASS;
		if (!(cfg->flags & CFG_V4) || !same(p + 16, cfg->v4, 4))
			return XDP_PASS;
		udp = p + ihl;
	} else if (ethertype == BE16(ETH_P_IPV6)) {
		if (p + 40 > end)
			return XDP_PASS;
		if ((p[0] >> 4) != 6 || p[6] != PROTO_UDP)
			return XDP_PASS;
		if (!(cfg->flags & CFG_V6) || !same(p + 24, cfg->v6, 16))
			return XDP_PASS;
		udp = p + 40;
	} else {
		return XDP_PASS;
	}
	if (udp + 8 > end)
		return XDP_PASS;
	if (load16(udp + 2) != cfg->port_be)
		return XDP_PASS;
	// No socket on this queue: the flags argument makes the kernel take the frame instead.
	return redirect_map(&wraith_xsks, ctx->rx_queue_index, XDP_PASS);
}

char _license[] SEC("license") = "Dual MIT/GPL";
