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

#endif /* FP_LIB_LO_H */
