/* Per-packet service translation (DNAT) with connection tracking, and the
 * reverse translation of replies.
 *
 * A new flow to a frontend picks a backend (ClientIP affinity first, else a
 * random slot), is rewritten to it, and leaves two conntrack entries: the
 * forward one keeps later packets of the flow on the same backend, the reply
 * one lets the delivery path put the VIP back as the reply's source. A
 * forward entry whose backend has been removed is re-balanced at once (the
 * backend id no longer resolves), so UDP flows move without waiting.
 * Checksums are fixed incrementally: the IPv4 header checksum, and the
 * TCP/UDP checksum including its pseudo-header (a zero UDP checksum stays
 * zero). SCTP's CRC32c covers no pseudo-header, so an address change needs
 * no L4 fix; a port change updates the CRC incrementally (fp_sctp_crc_fix).
 * IP fragments are not translated per packet.
 */
#ifndef FP_LIB_LB_H
#define FP_LIB_LB_H

#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include "lib/parse.h"

#define FP_NSEC_PER_SEC 1000000000ULL

struct fp_l4 {
	__be16 sport;          /* NBO */
	__be16 dport;          /* NBO */
	__u32 off;             /* HBO: offset of the L4 header */
};

/* Ports of a first (or only) TCP/UDP fragment; -1 when there are none. */
static __always_inline int fp_parse_l4(struct __sk_buff *skb, const struct fp_ipv4 *ip,
				       struct fp_l4 *l4)
{
	__be16 frag;
	__be16 ports[2];

	if (ip->proto != IPPROTO_TCP && ip->proto != IPPROTO_UDP && ip->proto != IPPROTO_SCTP)
		return -1;
	if (bpf_skb_load_bytes(skb, ip->l3_off + offsetof(struct iphdr, frag_off), &frag, 2))
		return -1;
	if (frag & bpf_htons(0x3FFF))      /* MF or a fragment offset */
		return -1;
	l4->off = ip->l3_off + ip->ihl_bytes;
	if (bpf_skb_load_bytes(skb, l4->off, ports, sizeof(ports)))
		return -1;
	l4->sport = ports[0];
	l4->dport = ports[1];
	return 0;
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
static __always_inline int fp_sctp_crc_fix(struct __sk_buff *skb, const struct fp_ipv4 *ip,
					   __u32 l4_off, __u32 field_off, __be16 old_port,
					   __be16 new_port)
{
	__be16 delta = old_port ^ new_port;
	__u8 *d = (__u8 *)&delta;
	__u32 len = bpf_ntohs(ip->tot_len) - ip->ihl_bytes;
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

/* Rewrite one address (saddr or daddr) and one port, checksums included. */
static __always_inline int fp_nat_rewrite(struct __sk_buff *skb, const struct fp_ipv4 *ip,
					  const struct fp_l4 *l4, int is_src,
					  __be32 old_addr, __be32 new_addr,
					  __be16 old_port, __be16 new_port)
{
	__u32 addr_off = ip->l3_off + (is_src ? offsetof(struct iphdr, saddr)
					      : offsetof(struct iphdr, daddr));
	__u32 port_off = l4->off + (is_src ? 0 : 2);
	__u32 csum_off = l4->off + fp_l4_csum_off(ip->proto);
	__u64 l4flags = ip->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (old_addr != new_addr) {
		if (ip->proto != IPPROTO_SCTP &&
		    bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
					l4flags | BPF_F_PSEUDO_HDR | sizeof(new_addr)))
			return -1;
		if (bpf_l3_csum_replace(skb, ip->l3_off + offsetof(struct iphdr, check),
					old_addr, new_addr, sizeof(new_addr)))
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0))
			return -1;
	}
	if (old_port != new_port) {
		if (ip->proto == IPPROTO_SCTP) {
			if (fp_sctp_crc_fix(skb, ip, l4->off, port_off, old_port, new_port))
				return -1;
		} else if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port,
					       l4flags | sizeof(new_port))) {
			return -1;
		}
		if (bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0))
			return -1;
	}
	return 0;
}

static __always_inline struct fp_backend4 *fp_lb_pick(struct fp_svc4 *svc, __be32 client,
						       __u32 *backend_id, __u64 now)
{
	struct fp_backend4 *be;
	__u32 slot;

	if (svc->count == 0)
		return NULL;
	if (svc->flags & FP_SVC_F_AFFINITY) {
		struct fp_aff4_key akey = { .svc_id = svc->svc_id, .client = client };
		struct fp_aff4 *aff = fp_affinity_lookup(&akey);

		if (aff && now - aff->last_seen <= (__u64)svc->affinity_timeout * FP_NSEC_PER_SEC) {
			be = fp_backend_lookup(aff->backend_id);
			if (be) {
				*backend_id = aff->backend_id;
				aff->last_seen = now;
				return be;
			}
		}
	}
	slot = (bpf_get_prandom_u32() % svc->count) + 1;
	be = fp_slot_backend(svc->svc_id, slot, backend_id);
	if (be && (svc->flags & FP_SVC_F_AFFINITY)) {
		struct fp_aff4_key akey = { .svc_id = svc->svc_id, .client = client };
		struct fp_aff4 val = { .last_seen = now, .backend_id = *backend_id };

		fp_affinity_put(&akey, &val);
	}
	return be;
}

/* A TCP SYN without ACK: the first packet of a new connection. */
static __always_inline int fp_tcp_syn_only(struct __sk_buff *skb, const struct fp_ipv4 *ip,
					   const struct fp_l4 *l4)
{
	__u8 flags;

	if (ip->proto != IPPROTO_TCP || bpf_skb_load_bytes(skb, l4->off + 13, &flags, 1))
		return 0;
	return (flags & 0x12) == 0x02;
}

/* DNAT a packet addressed to a frontend. Returns 0 when translated (ip and
 * l4 then describe the rewritten packet), 1 when the destination is not a
 * service, and -1 (with *reason) when the packet must be dropped. */
static __always_inline int fp_lb_translate(struct __sk_buff *skb, struct fp_ipv4 *ip,
					   struct fp_l4 *l4, enum fp_reason *reason)
{
	struct fp_svc4 *svc = fp_service_lookup(ip->daddr, l4->dport, ip->proto);
	struct fp_ct4_key fwd = {}, rev = {};
	struct fp_ct4 *ct, entry = {}, reply = {};
	struct fp_backend4 *be = NULL;
	__u32 backend_id = 0;
	int hairpin = 0, write_reply;
	__u64 now;

	if (!svc)
		return 1;
	now = bpf_ktime_get_ns();
	fwd.saddr = ip->saddr;
	fwd.daddr = ip->daddr;
	fwd.sport = l4->sport;
	fwd.dport = l4->dport;
	fwd.proto = ip->proto;
	fwd.dir = FP_CT_FORWARD;

	ct = fp_ct_lookup(&fwd);
	if (ct && ct->svc_id == svc->svc_id) {
		be = fp_backend_lookup(ct->backend_id);
		if (be) {
			backend_id = ct->backend_id;
			ct->last_seen = now;
		}
	}
	hairpin = be && be->ip == ip->saddr;
	if (!be) {
		be = fp_lb_pick(svc, ip->saddr, &backend_id, now);
		if (!be) {
			*reason = FP_DROP_NO_BACKEND;
			return -1;
		}
		hairpin = be->ip == ip->saddr;
		entry.last_seen = now;
		entry.flags = hairpin ? FP_CT_F_HAIRPIN : 0;
		entry.nat_addr = be->ip;
		entry.nat_port = be->port;
		entry.backend_id = backend_id;
		entry.svc_id = svc->svc_id;
		fp_ct_put(&fwd, &entry);
		write_reply = 1;
	} else {
		/* A new connection on the tuple of an old one keeps its backend,
		 * but the old reply entry may be gone (a direct SYN on the
		 * backend's tuple in between retires it): write it again, or the
		 * SYN-ACK would reach the client from the backend, not the VIP. */
		write_reply = fp_tcp_syn_only(skb, ip, l4);
	}
	if (write_reply) {
		rev.saddr = be->ip;
		rev.daddr = hairpin ? FP_HAIRPIN_IP : ip->saddr;
		rev.sport = be->port;
		rev.dport = l4->sport;
		rev.proto = ip->proto;
		rev.dir = FP_CT_REPLY;
		reply.last_seen = now;
		reply.flags = hairpin ? FP_CT_F_HAIRPIN : 0;
		reply.nat_addr = ip->daddr;
		reply.nat_port = l4->dport;
		reply.backend_id = backend_id;
		reply.svc_id = svc->svc_id;
		fp_ct_put(&rev, &reply);
	}
	{
		__be32 new_addr = be->ip;
		__be16 new_port = be->port;

		if (fp_nat_rewrite(skb, ip, l4, 0, ip->daddr, new_addr, l4->dport, new_port)) {
			*reason = FP_DROP_CSUM;
			return -1;
		}
		ip->daddr = new_addr;
		l4->dport = new_port;
		if (hairpin) {
			__be32 router = FP_HAIRPIN_IP;

			if (fp_nat_rewrite(skb, ip, l4, 1, ip->saddr, router, l4->sport, l4->sport)) {
				*reason = FP_DROP_CSUM;
				return -1;
			}
			ip->saddr = router;
		}
	}
	fp_decision_nat(svc->svc_id, backend_id, ip->daddr, l4->dport);
	*reason = FP_FWD_SVC;
	return 0;
}

/* A new TCP connection that is not translated (its SYN goes straight to a
 * pod) may reuse the 4-tuple of an earlier translated one; the reply entry
 * of that old flow would turn the new flow's SYN-ACK into one "from the VIP"
 * and the connection would hang. The SYN retires it. */
static __always_inline void fp_lb_forget_stale_reply(struct __sk_buff *skb,
						     const struct fp_ipv4 *ip,
						     const struct fp_l4 *l4)
{
	struct fp_ct4_key key = {};

	if (!fp_tcp_syn_only(skb, ip, l4))
		return;
	key.saddr = ip->daddr;
	key.daddr = ip->saddr;
	key.sport = l4->dport;
	key.dport = l4->sport;
	key.proto = IPPROTO_TCP;
	key.dir = FP_CT_REPLY;
	fp_ct_delete(&key);
}

/* Put the VIP back as the source of a reply from a backend. Returns 1 when
 * the packet was a reply of a translated flow, 0 when not, -1 on failure. */
static __always_inline int fp_lb_reverse(struct __sk_buff *skb, struct fp_ipv4 *ip)
{
	struct fp_ct4_key key = {};
	struct fp_ct4 *ct;
	struct fp_l4 l4;
	__be32 vip;
	__be16 vport;

	if (fp_parse_l4(skb, ip, &l4))
		return 0;
	key.saddr = ip->saddr;
	key.daddr = ip->daddr;
	key.sport = l4.sport;
	key.dport = l4.dport;
	key.proto = ip->proto;
	key.dir = FP_CT_REPLY;
	ct = fp_ct_lookup(&key);
	if (!ct)
		return 0;
	ct->last_seen = bpf_ktime_get_ns();
	vip = ct->nat_addr;
	vport = ct->nat_port;
	if (ct->flags & FP_CT_F_HAIRPIN) {
		/* the client is the backend itself */
		__be32 client = ip->saddr;

		if (fp_nat_rewrite(skb, ip, &l4, 0, ip->daddr, client, l4.dport, l4.dport))
			return -1;
		ip->daddr = client;
	}
	if (fp_nat_rewrite(skb, ip, &l4, 1, ip->saddr, vip, l4.sport, vport))
		return -1;
	ip->saddr = vip;
	return 1;
}

#endif /* FP_LIB_LB_H */
