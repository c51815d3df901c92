/* Reject a packet with ICMP destination unreachable, answered on the spot.
 *
 * Used when a Service has no usable endpoint: the client must learn at once
 * (a TCP connect fails with ECONNREFUSED, a UDP socket sees the error)
 * instead of retrying into a black hole. The packet itself is rewritten in
 * place into the ICMP error (IPv4 header + 8 bytes of the original, as
 * RFC 792 asks; 20 bytes of an SCTP packet, FP_ICMP_QUOTE_SCTP) and sent
 * back into the sender's netns.
 */
#ifndef FP_LIB_ICMP_H
#define FP_LIB_ICMP_H

#include <uapi/linux/icmp.h>
#include "lib/parse.h"

#define FP_ICMP_QUOTE (sizeof(struct iphdr) + 8)
/* An error about an SCTP packet quotes 20 bytes of it: the sender's SCTP
 * (a pod's, the node's, an outside client's) matches an error about an
 * INIT by the initiate tag after the common and chunk headers, and ignores
 * one that does not reach it. */
#define FP_ICMP_QUOTE_SCTP (sizeof(struct iphdr) + 20)

struct fp_icmp_reply {
	struct iphdr ip;
	struct icmphdr icmp;
	__u8 quote[FP_ICMP_QUOTE_SCTP];
};

static __always_inline __u16 fp_csum_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* Returns the tc verdict: the ICMP error redirected to the sender, or a
 * drop when the packet cannot be quoted. `code` is an ICMP unreachable code
 * (ICMP_PORT_UNREACH, ICMP_HOST_UNREACH); `reason` is why (counted and
 * recorded by the caller). `peer`: the packet came in from a pod's veth
 * (the error goes into the pod's netns); FP_ICMP_TO_STACK: the node sent it
 * out of a node interface (the error comes back in by that one, to the
 * node's stack); otherwise it came in on a node interface and the error
 * leaves by the same one. */
#define FP_ICMP_TO_STACK 2
static __always_inline int fp_reject_icmp_dev(struct __sk_buff *skb, const struct fp_ipv4 *ip,
					      __u8 code, enum fp_reason reason, int peer)
{
	struct fp_icmp_reply r = {};
	struct ethhdr eth;
	__u32 qlen = FP_ICMP_QUOTE;
	__u32 rlen;
	__s64 sum;

	/* Chosen by a branch, a constant on each path: a length computed from
	 * the protocol would have the verifier track the protocol precisely
	 * back through the caller and lose its pruning there. An SCTP packet
	 * too short for 20 bytes gets the usual quote. */
	if (ip->proto == IPPROTO_SCTP && skb->len >= ip->l3_off + FP_ICMP_QUOTE_SCTP)
		qlen = FP_ICMP_QUOTE_SCTP;
	rlen = sizeof(r) - FP_ICMP_QUOTE_SCTP + qlen;

	if (ip->ihl_bytes != sizeof(struct iphdr) ||
	    bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) ||
	    bpf_skb_load_bytes(skb, ip->l3_off, r.quote, qlen))
		return TC_ACT_SHOT;

	r.ip.version = 4;
	r.ip.ihl = 5;
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_ICMP;
	r.ip.tot_len = bpf_htons(rlen);
	r.ip.saddr = ip->daddr;      /* the VIP the client asked for */
	r.ip.daddr = ip->saddr;
	sum = bpf_csum_diff(0, 0, (__be32 *)&r.ip, sizeof(r.ip), 0);
	r.ip.check = fp_csum_fold(sum);

	r.icmp.type = ICMP_DEST_UNREACH;
	r.icmp.code = code;
	sum = bpf_csum_diff(0, 0, (__be32 *)&r.icmp, sizeof(r.icmp) + qlen, 0);
	r.icmp.checksum = fp_csum_fold(sum);

	if (bpf_skb_change_tail(skb, ETH_HLEN + rlen, 0))
		return TC_ACT_SHOT;
	{
		struct ethhdr out = {};

		__builtin_memcpy(out.h_dest, eth.h_source, ETH_ALEN);
		__builtin_memcpy(out.h_source, eth.h_dest, ETH_ALEN);
		out.h_proto = bpf_htons(ETH_P_IP);
		if (bpf_skb_store_bytes(skb, 0, &out, sizeof(out), 0) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN, &r, rlen, 0))
			return TC_ACT_SHOT;
	}
	if (peer == FP_ICMP_TO_STACK) {
		fp_test_record(skb->ifindex, FP_RD_INGRESS, 0, reason);
		return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
	}
	if (peer) {
		fp_test_record(skb->ifindex, FP_RD_PEER, 0, reason);
		return bpf_redirect_peer(skb->ifindex, 0);
	}
	fp_test_record(skb->ifindex, FP_RD_PLAIN, 0, reason);
	return bpf_redirect(skb->ifindex, 0);
}

/* A pod's packet refused: the error goes back into its netns. */
static __always_inline int fp_reject_icmp(struct __sk_buff *skb, const struct fp_ipv4 *ip,
					  __u8 code, enum fp_reason *reason)
{
	return fp_reject_icmp_dev(skb, ip, code, *reason, 1);
}

#endif /* FP_LIB_ICMP_H */
