// SPDX-License-Identifier: MIT OR Apache-2.0
//
// wraith's XDP filter. Frames that carry UDP to wraith's port (IPv4 without fragmentation, or
// IPv6 with UDP as the first next header) go to the AF_XDP socket bound to the queue they
// arrived on. Everything else -- ARP, ICMP, TCP, other UDP ports, fragments, frames on a queue
// with no socket -- continues into the kernel's stack untouched (XDP_PASS).
//
// The port arrives after loading, through `wraith_cfg` (key 0, port in network byte order);
// until it is set the filter passes every frame. Built by build.rs with
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

struct wraith_cfg {
	__u16 port_be; // wraith's UDP port, network byte order; 0 = not configured
	__u16 reserved;
};

struct {
	__uint(type, MAP_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct wraith_cfg);
} wraith_cfg SEC(".maps");

// Queue index -> AF_XDP socket. Sized for the largest queue count wraith binds.
struct {
	__uint(type, MAP_XSKMAP);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} wraith_xsks SEC(".maps");

#define BE16(x) ((__u16)((((x) & 0xff) << 8) | (((x) >> 8) & 0xff)))

static inline __u16 load16(const __u8 *p)
{
	// The frame's bytes in wire order, read as the host (little-endian) sees them.
	return (__u16)p[0] | ((__u16)p[1] << 8);
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
	// At most two VLAN tags.
	for (int i = 0; i < 2; i++) {
		if (ethertype != BE16(ETH_P_VLAN) && ethertype != BE16(ETH_P_QINQ))
			break;
		if (p + 4 > end)
			return XDP_PASS;
		ethertype = load16(p + 2);
		p += 4;
	}

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
		udp = p + ihl;
	} else if (ethertype == BE16(ETH_P_IPV6)) {
		if (p + 40 > end)
			return XDP_PASS;
		if ((p[0] >> 4) != 6 || p[6] != PROTO_UDP)
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
