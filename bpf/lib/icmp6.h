/* Reject a pod's IPv6 packet with ICMPv6 destination unreachable, answered
 * on the spot (lib/icmp.h's twin): a new flow to an IPv6 Service without
 * endpoints, or to a port its ClusterIP does not have. The packet is
 * rewritten in place into the error (RFC 4443: the offending packet's
 * IPv6 header and the first 8 bytes of its transport header are quoted;
 * 20 of an SCTP packet, FP_ICMP6_QUOTE_SCTP)
 * and sent back into the pod's netns, from the address it was sent to.
 * The ICMPv6 checksum covers a pseudo-header of both addresses.
 */
#ifndef FP_LIB_ICMP6_H
#define FP_LIB_ICMP6_H

#include "lib/icmp.h"
#include "lib/parse6.h"

#define FP_ICMP6_QUOTE (sizeof(struct ipv6hdr) + 8)
/* lib/icmp.h's FP_ICMP_QUOTE_SCTP for IPv6 (an error about an SCTP packet) */
#define FP_ICMP6_QUOTE_SCTP (sizeof(struct ipv6hdr) + 20)
#define FP_ICMP6_PORT_UNREACH 4    /* code of FP_ICMP6_UNREACH */

struct fp_icmp6_reply {
	struct ipv6hdr ip;
	__u8 type;
	__u8 code;
	__sum16 check;
	__u32 unused;
	__u8 quote[FP_ICMP6_QUOTE_SCTP];
};

/* What the ICMPv6 checksum covers before the message: RFC 8200 8.1. */
struct fp_icmp6_pseudo {
	__u8 saddr[16];
	__u8 daddr[16];
	__be32 len;
	__u8 zero[3];
	__u8 nexthdr;
};

/* What is built, in the per-CPU scratch (maps.c fp_icmp6_scratch). */
struct fp_icmp6_work {
	struct fp_icmp6_reply r;
	struct fp_icmp6_pseudo ph;
	struct ethhdr eth;
	struct ethhdr out;
};
_Static_assert(sizeof(struct fp_icmp6_work) <= FP_ICMP6_SCRATCH_BYTES, "fp_icmp6_work fits");

/* Returns the tc verdict: the error redirected into the sender's netns
 * (`out_dev` 0: a pod's veth) or out of the device the packet came in on
 * (`out_dev` 1: the primary NIC or an ENI, for a client outside), into
 * the node's stack by that device's ingress (FP_ICMP_TO_STACK: the node's
 * own packet on its way out, lib/icmp.h), or a
 * drop when the packet cannot be quoted (extension headers before the
 * transport header: the quote would not reach its ports). */
static __always_inline int fp_reject_icmp6_dev(struct __sk_buff *skb, const struct fp_ipv6 *ip,
					       __u8 code, enum fp_reason reason, int out_dev)
{
	struct fp_icmp6_work *w = fp_icmp6_scratch();
	__u32 qlen = FP_ICMP6_QUOTE;
	__u32 rlen;
	__s64 sum;

	/* a constant on each path, as in lib/icmp.h */
	if (ip->proto == IPPROTO_SCTP && skb->len >= ip->l3_off + FP_ICMP6_QUOTE_SCTP)
		qlen = FP_ICMP6_QUOTE_SCTP;
	rlen = sizeof(w->r) - FP_ICMP6_QUOTE_SCTP + qlen;

	if (!w)
		return TC_ACT_SHOT;
	__builtin_memset(w, 0, sizeof(*w));
	if (ip->l4_off != ip->l3_off + sizeof(struct ipv6hdr) ||
	    bpf_skb_load_bytes(skb, 0, &w->eth, sizeof(w->eth)) ||
	    bpf_skb_load_bytes(skb, ip->l3_off, w->r.quote, qlen))
		return TC_ACT_SHOT;
	w->r.ip.version = 6;
	w->r.ip.payload_len = bpf_htons(rlen - sizeof(w->r.ip));
	w->r.ip.nexthdr = FP_NH_ICMPV6;
	w->r.ip.hop_limit = 64;
	__builtin_memcpy(&w->r.ip.saddr, ip->daddr, 16);   /* the address the pod asked for */
	__builtin_memcpy(&w->r.ip.daddr, ip->saddr, 16);
	w->r.type = FP_ICMP6_UNREACH;
	w->r.code = code;
	__builtin_memcpy(w->ph.saddr, ip->daddr, 16);
	__builtin_memcpy(w->ph.daddr, ip->saddr, 16);
	w->ph.len = bpf_htonl(rlen - sizeof(w->r.ip));
	w->ph.nexthdr = FP_NH_ICMPV6;
	sum = bpf_csum_diff(0, 0, (__be32 *)&w->ph, sizeof(w->ph), 0);
	sum = bpf_csum_diff(0, 0, (__be32 *)&w->r.type, rlen - sizeof(w->r.ip), sum);
	w->r.check = fp_csum_fold(sum);

	if (bpf_skb_change_tail(skb, ETH_HLEN + rlen, 0))
		return TC_ACT_SHOT;
	__builtin_memcpy(w->out.h_dest, w->eth.h_source, ETH_ALEN);
	__builtin_memcpy(w->out.h_source, w->eth.h_dest, ETH_ALEN);
	w->out.h_proto = bpf_htons(ETH_P_IPV6);
	if (bpf_skb_store_bytes(skb, 0, &w->out, sizeof(w->out), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &w->r, rlen, 0))
		return TC_ACT_SHOT;
	if (out_dev == FP_ICMP_TO_STACK) {
		fp_test_record(skb->ifindex, FP_RD_INGRESS, 0, reason);
		return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
	}
	if (out_dev) {
		fp_test_record(skb->ifindex, FP_RD_PLAIN, 0, reason);
		return bpf_redirect(skb->ifindex, 0);
	}
	fp_test_record(skb->ifindex, FP_RD_PEER, 0, reason);
	return bpf_redirect_peer(skb->ifindex, 0);
}

static __always_inline int fp_reject_icmp6(struct __sk_buff *skb, const struct fp_ipv6 *ip,
					   __u8 code, enum fp_reason reason)
{
	return fp_reject_icmp6_dev(skb, ip, code, reason, 0);
}

#endif /* FP_LIB_ICMP6_H */
