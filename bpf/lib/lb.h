/* Service load-balancing: which backend a new flow gets, and the packet
 * rewrites that translate it.
 *
 * Backend selection: ClientIP affinity first (never a draining backend),
 * else the Maglev table for traffic from outside when the frontend has one
 * (the same backend on every node for a flow), else a random slot; slots
 * list only the backends new connections may choose. Which packets may choose, and what later packets of a flow reuse,
 * is conntrack's decision (lib/ct.h), as is reverse translation.
 * Checksums are fixed incrementally: the IPv4 header checksum, and the
 * TCP/UDP checksum including its pseudo-header (a zero UDP checksum stays
 * zero). SCTP's CRC32c covers no pseudo-header, so an address change needs
 * no L4 fix; a port change updates the CRC incrementally (fp_sctp_crc_fix).
 */
#ifndef FP_LIB_LB_H
#define FP_LIB_LB_H

#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include "lib/parse.h"

#define FP_NSEC_PER_SEC 1000000000ULL

/* The clock of conntrack, affinity and fragment records: lifetimes are
 * seconds, so the tick-granular clock (CLOCK_MONOTONIC as of the last tick)
 * does, at a fraction of a precise read's cost, once per packet. It may
 * stand behind a precise stamp another hook wrote (socket-LB's affinity):
 * every age computed from it is signed. */
static __always_inline __u64 fp_now(void)
{
	return bpf_ktime_get_coarse_ns();
}

static __always_inline int fp_l4_csum_off(__u8 proto)
{
	return proto == IPPROTO_TCP ? offsetof(struct tcphdr, check) : offsetof(struct udphdr, check);
}

/* SCTP checksum (CRC32c, RFC 9260 appendix A) after a port change, without
 * reading the packet: the CRC is affine in the message, so for two messages
 * of equal length crc(A) ^ crc(B) = crc0(A ^ B), the CRC with zero initial
 * value and no final xor. A ^ B is the two changed port bytes followed by
 * `tail` zero bytes: crc0 of the two bytes, times x^(8 * tail) modulo the
 * polynomial (bit-reflected arithmetic). x^(8 * tail) is the product of two
 * powers the agent wrote into FP_MAP_CRC32C (tail < 65536), which keeps the
 * work (and the verifier's) to two 32-step multiplications. */
#define FP_CRC32C_POLY 0x82F63B78U     /* reflected Castagnoli polynomial */
#define FP_SCTP_CSUM_OFF 8             /* offset of the checksum in the SCTP header */

static __always_inline __u32 fp_crc32c_mulmod(__u32 a, __u32 b)
{
	__u32 p = 0;
	int i;

	/* branch-free and kept a loop: the verifier walks it once per call */
#pragma clang loop unroll(disable)
	for (i = 0; i < 32; i++) {
		p ^= b & -((a >> (31 - i)) & 1);
		b = (b >> 1) ^ (FP_CRC32C_POLY & -(b & 1));
	}
	return p;
}

static __always_inline __u32 fp_crc32c_byte0(__u32 crc, __u8 byte)
{
	int i;

	crc ^= byte;
#pragma clang loop unroll(disable)
	for (i = 0; i < 8; i++)
		crc = (crc >> 1) ^ (FP_CRC32C_POLY & -(crc & 1));
	return crc;
}

/* The SCTP checksum field is stored little-endian (Linux: cpu_to_le32 of the
 * CRC); like the rest of fastpath this assumes a little-endian host. A zero
 * field means the sender left the CRC to offload (CHECKSUM_PARTIAL: the
 * stack zeroes it and the CRC is computed over the final bytes later), so
 * it is left zero. */
static __always_inline int fp_sctp_crc_fix_len(struct __sk_buff *skb, __u32 len, __u32 l4_off,
					       __u32 field_off, __be16 old_port, __be16 new_port)
{
	__be16 delta = old_port ^ new_port;
	__u8 *d = (__u8 *)&delta;
	__u32 tail, crc, lo, hi;
	__u32 sum;

	if (bpf_skb_load_bytes(skb, l4_off + FP_SCTP_CSUM_OFF, &sum, sizeof(sum)))
		return -1;
	if (sum == 0)
		return 0;
	if (len < field_off - l4_off + 2)
		return -1;
	tail = len - (field_off - l4_off) - 2;
	if (tail > 0xFFFF ||
	    fp_crc32c_power(tail & 0xFF, &lo) ||
	    fp_crc32c_power(256 + (tail >> 8), &hi))
		return -1;
	crc = fp_crc32c_byte0(fp_crc32c_byte0(0, d[0]), d[1]);
	crc = fp_crc32c_mulmod(fp_crc32c_mulmod(lo, hi), crc);
	sum ^= crc;
	return bpf_skb_store_bytes(skb, l4_off + FP_SCTP_CSUM_OFF, &sum, sizeof(sum), 0) ? -1 : 0;
}

/* IPv4's: the SCTP packet is what follows the IPv4 header (IPv6 passes its
 * own length, lib/ct6.h). */
static __always_inline int fp_sctp_crc_fix(struct __sk_buff *skb, const struct fp_ipv4 *ip,
					   __u32 l4_off, __u32 field_off, __be16 old_port,
					   __be16 new_port)
{
	return fp_sctp_crc_fix_len(skb, bpf_ntohs(ip->tot_len) - ip->ihl_bytes, l4_off, field_off,
				   old_port, new_port);
}

/* A ones' complement checksum after a 32-bit word it covers went from
 * `from` to `to` (RFC 1624, eqn. 3), in the packet's byte order. */
static __always_inline __u16 fp_csum_replace4(__u16 check, __be32 from, __be32 to)
{
	__u64 s = (__u16)~check;

	s += (__u32)~from;
	s += (__u32)to;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* fp_nat_rewrite's address, port and IPv4 header checksum, written in place
 * when the headers are linear (they are, but for odd packets). Returns 1
 * when they are not: nothing was written. */
static __always_inline int fp_nat_rewrite_direct(struct __sk_buff *skb, const struct fp_ipv4 *ip,
						 const struct fp_l4 *l4, int is_src,
						 __be32 old_addr, __be32 new_addr,
						 __be16 old_port, __be16 new_port)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *iph = data + ETH_HLEN;
	__u32 l4_off = l4->off;
	__be16 *ports;

	if (ip->l3_off != ETH_HLEN || l4_off > ETH_HLEN + 60)
		return 1;
	ports = data + l4_off;
	if ((void *)(iph + 1) > data_end || (void *)(ports + 2) > data_end)
		return 1;
	if (old_addr != new_addr) {
		iph->check = fp_csum_replace4(iph->check, old_addr, new_addr);
		if (is_src)
			iph->saddr = new_addr;
		else
			iph->daddr = new_addr;
	}
	if (old_port != new_port) {
		if (is_src)
			ports[0] = new_port;
		else
			ports[1] = new_port;
	}
	return 0;
}

/* The transport checksum after an address and a port changed: the
 * kernel's to fix (bpf_l4_csum_replace), since a packet whose checksum is
 * left to offload takes only the pseudo-header's change, which only the
 * kernel can tell. SCTP's CRC covers no pseudo-header. */
static __always_inline int fp_nat_l4_csum(struct __sk_buff *skb, const struct fp_ipv4 *ip,
					  const struct fp_l4 *l4, __u32 port_off,
					  __be32 old_addr, __be32 new_addr,
					  __be16 old_port, __be16 new_port)
{
	__u32 csum_off = l4->off + fp_l4_csum_off(ip->proto);
	__u64 l4flags = ip->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (old_addr != new_addr && ip->proto != IPPROTO_SCTP &&
	    bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
				l4flags | BPF_F_PSEUDO_HDR | sizeof(new_addr)))
		return -1;
	if (old_port == new_port)
		return 0;
	if (ip->proto == IPPROTO_SCTP)
		return fp_sctp_crc_fix(skb, ip, l4->off, port_off, old_port, new_port);
	return bpf_l4_csum_replace(skb, csum_off, old_port, new_port,
				   l4flags | sizeof(new_port)) ? -1 : 0;
}

/* Rewrite one address (saddr or daddr) and one port, checksums included:
 * in place but for the transport checksum (fp_nat_rewrite_direct,
 * fp_nat_l4_csum); by helpers alone when the headers are not linear. */
static __always_inline int fp_nat_rewrite(struct __sk_buff *skb, const struct fp_ipv4 *ip,
					  const struct fp_l4 *l4, int is_src,
					  __be32 old_addr, __be32 new_addr,
					  __be16 old_port, __be16 new_port)
{
	__u32 addr_off = ip->l3_off + (is_src ? offsetof(struct iphdr, saddr)
					      : offsetof(struct iphdr, daddr));
	__u32 port_off = l4->off + (is_src ? 0 : 2);

	if (!fp_nat_rewrite_direct(skb, ip, l4, is_src, old_addr, new_addr, old_port, new_port))
		return fp_nat_l4_csum(skb, ip, l4, port_off, old_addr, new_addr, old_port,
				      new_port);
	if (old_addr != new_addr &&
	    (bpf_l3_csum_replace(skb, ip->l3_off + offsetof(struct iphdr, check),
				 old_addr, new_addr, sizeof(new_addr)) ||
	     bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0)))
		return -1;
	if (old_port != new_port &&
	    bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0))
		return -1;
	return fp_nat_l4_csum(skb, ip, l4, port_off, old_addr, new_addr, old_port, new_port);
}

/* Maglev's flow hash: Bob Jenkins' final mix over the client's address and
 * port, the frontend's port and the protocol, with a fixed seed, so every
 * node hashes a flow alike. Not the frontend's address: a NodePort is
 * reached at each node's own. agent/lb/maglev.py flow_hash is its twin. */
#define FP_MAGLEV_SEED 0x6D61676CU
#define FP_NO_MAGLEV 0xFFFFFFFFFFFFFFFFULL

static __always_inline __u32 fp_rol32(__u32 x, int k)
{
	return (x << k) | (x >> (32 - k));
}

/* Bob Jenkins' final mix of three words (lookup3); the result is c. */
static __always_inline __u32 fp_jhash_final(__u32 a, __u32 b, __u32 c)
{
	c ^= b; c -= fp_rol32(b, 14);
	a ^= c; a -= fp_rol32(c, 11);
	b ^= a; b -= fp_rol32(a, 25);
	c ^= b; c -= fp_rol32(b, 16);
	a ^= c; a -= fp_rol32(c, 4);
	b ^= a; b -= fp_rol32(a, 14);
	c ^= b; c -= fp_rol32(b, 24);
	return c;
}

static __always_inline __u64 fp_maglev_hash(__be32 saddr, __be16 sport, __be16 dport, __u8 proto)
{
	return fp_jhash_final(saddr + 0xdeadbeef,
			      ((__u32)sport | ((__u32)dport << 16)) + 0xdeadbeef,
			      (proto ^ FP_MAGLEV_SEED) + 0xdeadbeef);
}

/* ClientIP affinity, shared by both families' pickers (service and
 * backend ids are one id space, so one affinity map serves both). The
 * client's live entry, or NULL when the Service has no affinity or the
 * entry has outlived the Service's timeout. */
static __always_inline struct fp_aff4 *fp_lb_affinity_live(struct fp_svc4 *svc, __be32 client,
							    __u64 now)
{
	struct fp_aff4_key akey = { .svc_id = svc->svc_id, .client = client };
	struct fp_aff4 *aff;

	if (!(svc->flags & FP_SVC_F_AFFINITY))
		return NULL;
	aff = fp_affinity_lookup(&akey);
	if (aff && (__s64)(now - aff->last_seen) <= (__s64)svc->affinity_timeout * (__s64)FP_NSEC_PER_SEC)
		return aff;
	return NULL;
}

static __always_inline void fp_lb_affinity_remember(struct fp_svc4 *svc, __be32 client,
						    __u32 backend_id, __u64 now)
{
	struct fp_aff4_key akey = { .svc_id = svc->svc_id, .client = client };
	struct fp_aff4 val = { .last_seen = now, .backend_id = backend_id };

	if (svc->flags & FP_SVC_F_AFFINITY)
		fp_affinity_put(&akey, &val);
}

/* A backend for a new flow of `client`. `mhash`: the flow's Maglev hash
 * (fp_maglev_hash), or FP_NO_MAGLEV where Maglev does not apply (pods'
 * and the node's own traffic). */
static __always_inline struct fp_backend4 *fp_lb_pick_flow(struct fp_svc4 *svc, __be32 client,
							    __u64 mhash, __u32 *backend_id,
							    __u64 now)
{
	struct fp_backend4 *be = NULL;
	struct fp_aff4 *aff;
	__u32 slot;

	if (svc->count == 0)
		return NULL;
	aff = fp_lb_affinity_live(svc, client, now);
	if (aff) {
		be = fp_backend_lookup(aff->backend_id);
		if (be && !(be->flags & FP_BE_F_DRAINING)) {
			*backend_id = aff->backend_id;
			aff->last_seen = now;
			return be;
		}
		be = NULL;
	}
	if ((svc->flags & FP_SVC_F_MAGLEV) && mhash != FP_NO_MAGLEV) {
		__u32 bid = fp_maglev_backend(svc->svc_id, (__u32)mhash % FP_MAGLEV_M);

		be = bid ? fp_backend_lookup(bid) : NULL;
		if (be && !(be->flags & FP_BE_F_DRAINING))
			*backend_id = bid;
		else
			be = NULL;
	}
	if (!be) {
		/* one backend needs no dice */
		slot = svc->count == 1 ? 1 : (bpf_get_prandom_u32() % svc->count) + 1;
		be = fp_slot_backend(svc->svc_id, slot, backend_id);
	}
	if (be)
		fp_lb_affinity_remember(svc, client, *backend_id, now);
	return be;
}

static __always_inline struct fp_backend4 *fp_lb_pick(struct fp_svc4 *svc, __be32 client,
						       __u32 *backend_id, __u64 now)
{
	return fp_lb_pick_flow(svc, client, FP_NO_MAGLEV, backend_id, now);
}

/* kube-proxy's nftables checks for a new flow no frontend took: its
 * destination is a live ClusterIP (a port or protocol none of its Services
 * has: reject, FP_DROP_SVC_UNKNOWN_PORT) or lies in a Service CIDR without
 * being one (unallocated: drop, FP_DROP_SVC_UNALLOCATED). 0 otherwise, and
 * for packets that open no flow. */
static __always_inline int fp_svcnet_check(const struct fp_ipv4 *ip, const struct fp_l4 *l4)
{
	int f;

	if (l4->kind == FP_L4_ICMP_ERR || l4->kind == FP_L4_LATER_FRAG)
		return 0;
	if ((l4->kind == FP_L4_PORTS || l4->kind == FP_L4_ECHO) && !l4->opening)
		return 0;
	f = fp_svcnet_flags(ip->daddr);
	if (f < 0)
		return 0;
	if (f & FP_SVCNET_F_CLUSTER_IP)
		return FP_DROP_SVC_UNKNOWN_PORT;
	if (f & FP_SVCNET_F_RANGE)
		return FP_DROP_SVC_UNALLOCATED;
	return 0;
}

#endif /* FP_LIB_LB_H */
