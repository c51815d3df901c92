/* The node talking to itself through a Service: an association from one of
 * the node's own addresses whose frontend, or whose chosen backend, is one
 * of the node's own addresses too (fp_lo on lo's egress, fp_to_vpc_node).
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
#include "lib/icmp6.h"
#include "lib/ct6.h"
#include "lib/event6.h"
#include "lib/policy.h"

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

/* IPv6: the same test (fp_to_vpc6_node) */
static __always_inline int fp_lo6_self(const struct fp_ipv6 *ip)
{
	return fp_ip6_eq(ip->saddr, ip->daddr);
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

/* Both families: the packet (a GSO one by its segments) is longer than
 * `ifindex`'s MTU, which *mtu then tells. */
static __always_inline int fp_lo_over_mtu(struct __sk_buff *skb, __u32 ifindex, __u32 *mtu)
{
	return fp_bpf_check_mtu(skb, ifindex, mtu, 0, BPF_MTU_CHK_SEGS) > 0;
}

/* Both families: the error built in `r` replaces the packet and goes into
 * the node's stack through lo's ingress; else a drop. */
static __always_inline int fp_lo_answer(struct __sk_buff *skb, __be16 proto, void *r,
					__u32 rlen)
{
	struct ethhdr out = {};

	out.h_proto = proto;
	if (bpf_skb_change_tail(skb, ETH_HLEN + rlen, 0) ||
	    bpf_skb_store_bytes(skb, 0, &out, sizeof(out), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, r, rlen, 0)) {
		fp_test_record(0, FP_RD_NONE, 0, FP_DROP_FRAG_NEEDED);
		return TC_ACT_SHOT;
	}
	fp_test_record(FP_LO_IFINDEX, FP_RD_INGRESS, 0, FP_DROP_FRAG_NEEDED);
	return bpf_redirect(FP_LO_IFINDEX, BPF_F_INGRESS);
}

/* Returns 0 when the packet fits `ifindex` (or the check cannot tell),
 * else 1 with *verdict: the error redirected into lo's ingress, or a drop
 * when it cannot be built. `frontend`:`fport`: what the node sent to (ip
 * and l4: the translated packet). The monitor gets the drop as any other. */
static __always_inline int fp_lo_too_big(struct __sk_buff *skb, __u32 ifindex,
					 const struct fp_lo_quote *q, const struct fp_ipv4 *ip,
					 const struct fp_l4 *l4, __be32 frontend, __be16 fport,
					 int *verdict)
{
	struct fp_icmp_reply r = {};
	__u32 mtu = 0;
	__s64 sum;

	if (!fp_lo_over_mtu(skb, ifindex, &mtu))
		return 0;
	barrier_var(skb);
	fp_count(skb->ifindex, FP_DIR_TO_VPC, FP_DROP_FRAG_NEEDED, skb->len);
	fp_report(skb, FP_DIR_TO_VPC, FP_DROP_FRAG_NEEDED, ip, l4->sport, l4->dport, ip->saddr,
		  frontend, fport, NULL);
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

	*verdict = fp_lo_answer(skb, bpf_htons(ETH_P_IP), &r, sizeof(r));
	return 1;
}

/* IPv6: ICMPv6 Packet Too Big (RFC 4443 3.2) with the same fixed quote as
 * the IPv4 answer and as lib/icmp6.h's errors (the IPv6 header and 20
 * bytes: an SCTP packet's verification tag and first chunk, all the
 * stack's SCTP error handler reads), not RFC 4443's "as much as fits in
 * 1,280": nothing reads more. The error is from the frontend the node sent
 * to (the quote's destination). The way out's MTU is at least 1,280 on an
 * IPv6 device, so the stack takes the MTU told.
 *
 * The quote waits in the ICMPv6 scratch's reply (fp_lo6_quote), not on the
 * stack: fp_lo's IPv4 half keeps its own there and both halves are one
 * program. Nothing between the load and the check uses that scratch but
 * the port-unreachable reject, which returns. */
#define FP_ICMP6_PKT_TOOBIG 2

/* The MTU the answer tells: 8 bytes below the way out's, never below
 * IPv6's minimum (an error telling less is ignored). The node's IPv6
 * stack records a path MTU for one of its own addresses only below the MTU
 * of the device that holds the address (a route exception at or above it
 * is refused, and the error is then without effect), and in the usual
 * layout that device (eth0) and the way out (a pod's veth, an ENI) have
 * one MTU. IPv4 has no such rule: its answer tells the MTU itself. */
#define FP_IP6_MIN_MTU 1280
#define FP_LO6_TOLD_MTU(mtu) ((mtu) >= FP_IP6_MIN_MTU + 8 ? (mtu) - 8 : FP_IP6_MIN_MTU)

/* The packet as the node sent it, into the scratch's quote; NULL when the
 * scratch is missing (no check then). On a failed load the helper zeroes
 * it: a packet that short fits any way out. */
static __always_inline struct fp_icmp6_work *fp_lo6_quote(struct __sk_buff *skb,
							  const struct fp_ipv6 *ip)
{
	struct fp_icmp6_work *w = fp_icmp6_scratch();

	if (w)
		bpf_skb_load_bytes(skb, ip->l3_off, w->r.quote, sizeof(w->r.quote));
	return w;
}

/* fp_lo_too_big's IPv6 twin; `w` from fp_lo6_quote, `ip` the translated
 * packet (the monitor's IPv6 events carry no frontend). */
static __always_inline int fp_lo6_too_big(struct __sk_buff *skb, __u32 ifindex,
					  struct fp_icmp6_work *w, const struct fp_ipv6 *ip,
					  int *verdict)
{
	__u32 mtu = 0;
	__s64 sum;

	if (!fp_lo_over_mtu(skb, ifindex, &mtu))
		return 0;
	barrier_var(skb);
	fp_count_family(skb->ifindex, FP_DIR_TO_VPC, FP_DROP_FRAG_NEEDED, skb->len,
			FP_FAM_IPV6);
	fp_report6(skb, FP_DIR_TO_VPC, FP_DROP_FRAG_NEEDED, ip);
	__builtin_memset(&w->r, 0, sizeof(w->r) - sizeof(w->r.quote));
	__builtin_memset(&w->ph, 0, sizeof(w->ph));
	w->r.ip.version = 6;
	w->r.ip.payload_len = bpf_htons(sizeof(w->r) - sizeof(w->r.ip));
	w->r.ip.nexthdr = FP_NH_ICMPV6;
	w->r.ip.hop_limit = 64;
	/* the quoted header's destination, then source (struct ipv6hdr) */
	__builtin_memcpy(&w->r.ip.saddr, w->r.quote + 24, 16);
	__builtin_memcpy(&w->r.ip.daddr, w->r.quote + 8, 16);
	w->r.type = FP_ICMP6_PKT_TOOBIG;
	/* a Packet Too Big's MTU field: FP_LO6_TOLD_MTU */
	w->r.unused = bpf_htonl(FP_LO6_TOLD_MTU(mtu));
	__builtin_memcpy(w->ph.saddr, w->r.quote + 24, 16);
	__builtin_memcpy(w->ph.daddr, w->r.quote + 8, 16);
	w->ph.len = bpf_htonl(sizeof(w->r) - sizeof(w->r.ip));
	w->ph.nexthdr = FP_NH_ICMPV6;
	sum = bpf_csum_diff(0, 0, (__be32 *)&w->ph, sizeof(w->ph), 0);
	sum = bpf_csum_diff(0, 0, (__be32 *)&w->r.type, sizeof(w->r) - sizeof(w->r.ip), sum);
	w->r.check = fp_csum_fold(sum);
	*verdict = fp_lo_answer(skb, bpf_htons(ETH_P_IPV6), &w->r, sizeof(w->r));
	return 1;
}

#endif /* FP_LIB_LO_H */
