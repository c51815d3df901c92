/* The node talking to itself through a Service: an association from one of
 * the node's own addresses whose frontend, or whose chosen backend, is one
 * of the node's own addresses too (fp_lo on lo's egress, fp_to_vpc_sctp).
 *
 * Such a packet can only reach the node's socket again through lo: input
 * routing refuses a packet whose source is one of the node's own addresses
 * on any other device (a martian source), and, because a redirect drops the
 * route the packet had, on lo too unless lo accepts local sources; the
 * agent sets net.ipv4.conf.lo.accept_local (agent/datapath/node.py). Only lo
 * is given that: nothing arrives on lo from outside the node.
 */
#ifndef FP_LIB_LO_H
#define FP_LIB_LO_H

#include "lib/fwd.h"
#include "lib/icmp.h"

/* the loopback's ifindex in every network namespace (the kernel's
 * LOOPBACK_IFINDEX) */
#define FP_LO_IFINDEX 1

/* Both ends are the node's own address: the source the node's stack picks
 * for a destination it holds is that destination itself, and a reply
 * restored by conntrack names the frontend the node reached. (A node socket
 * bound to another of the node's addresses than the one it reaches is not
 * recognised; see docs/services.md.) */
static __always_inline int fp_lo_self(const struct fp_ipv4 *ip)
{
	return ip->saddr == ip->daddr;
}

/* Into the node's stack through lo's ingress. lo's MAC is all zero: a frame
 * addressed elsewhere would be taken for another host's and dropped. */
static __always_inline int fp_lo_deliver(struct __sk_buff *skb, enum fp_reason *reason)
{
	__u8 zero[ETH_ALEN] = {};

	if (fp_set_macs(skb, zero, zero)) {
		*reason = FP_DROP_INVALID;
		return TC_ACT_SHOT;
	}
	*reason = FP_FWD_STACK;
	fp_test_record(FP_LO_IFINDEX, FP_RD_INGRESS, 0, FP_FWD_STACK);
	return bpf_redirect(FP_LO_IFINDEX, BPF_F_INGRESS);
}

/* ---- the path MTU of the node's packets to itself ----
 *
 * The node's stack sizes what it sends itself by lo's MTU (65,536); the way
 * fp_lo sends a translated packet on (a pod's veth, an ENI) is narrower,
 * and a packet longer than it would be dropped there with the node told
 * nothing (kube-proxy's DNAT re-routes, so the stack learns the real
 * device's MTU). So fp_lo checks the packet against that device (a GSO
 * packet by its segments) and answers one that does not fit with ICMP
 * "fragmentation needed" into the node's stack, as a router on the way
 * would: the error quotes the packet as the node sent it, before the
 * translation (fp_lo_quote), so the stack finds the association, lowers
 * the path MTU and sends again in smaller pieces. Sent whatever DF says:
 * a redirect does not fragment, and the stack's answer to the error is
 * the same. */

/* the header and 20 bytes of the node's packet as it left the socket
 * (an SCTP INIT's initiate tag, a TCP segment's sequence number) */
struct fp_lo_quote {
	__u8 b[FP_ICMP_QUOTE_SCTP];
};

/* bcc 0.26 declares no bpf_check_mtu */
static long (*fp_bpf_check_mtu)(void *ctx, __u32 ifindex, __u32 *mtu_len, __s32 len_diff,
				__u64 flags) = (void *)BPF_FUNC_check_mtu;

/* Returns 0 when the packet fits `ifindex` (or the check cannot tell),
 * else 1 with *verdict: the error redirected into lo's ingress, or a drop
 * when it cannot be built. `frontend`: the address the node sent to. */
static __always_inline int fp_lo_too_big(struct __sk_buff *skb, __u32 ifindex,
					 const struct fp_lo_quote *q, const struct fp_ipv4 *ip,
					 __be32 frontend, int *verdict)
{
	struct fp_icmp_reply r = {};
	struct ethhdr out = {};
	__u32 mtu = 0;
	__s64 sum;

	if (fp_bpf_check_mtu(skb, ifindex, &mtu, 0, BPF_MTU_CHK_SEGS) <= 0)
		return 0;
	barrier_var(skb);
	fp_count(skb->ifindex, FP_DIR_TO_VPC, FP_DROP_FRAG_NEEDED, skb->len);
	*verdict = TC_ACT_SHOT;
	__builtin_memcpy(r.quote, q->b, sizeof(r.quote));
	r.ip.version = 4;
	r.ip.ihl = 5;
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_ICMP;
	r.ip.tot_len = bpf_htons(sizeof(r));
	r.ip.saddr = frontend;
	r.ip.daddr = ip->saddr;
	sum = bpf_csum_diff(0, 0, (__be32 *)&r.ip, sizeof(r.ip), 0);
	r.ip.check = fp_csum_fold(sum);
	r.icmp.type = ICMP_DEST_UNREACH;
	r.icmp.code = ICMP_FRAG_NEEDED;
	r.icmp.un.frag.mtu = bpf_htons((__u16)mtu);
	sum = bpf_csum_diff(0, 0, (__be32 *)&r.icmp, sizeof(r.icmp) + sizeof(r.quote), 0);
	r.icmp.checksum = fp_csum_fold(sum);

	out.h_proto = bpf_htons(ETH_P_IP);
	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(r), 0) ||
	    bpf_skb_store_bytes(skb, 0, &out, sizeof(out), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &r, sizeof(r), 0)) {
		fp_test_record(0, FP_RD_NONE, 0, FP_DROP_FRAG_NEEDED);
		return 1;
	}
	fp_test_record(FP_LO_IFINDEX, FP_RD_INGRESS, 0, FP_DROP_FRAG_NEEDED);
	*verdict = bpf_redirect(FP_LO_IFINDEX, BPF_F_INGRESS);
	return 1;
}

#endif /* FP_LIB_LO_H */
