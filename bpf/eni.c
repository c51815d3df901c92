/* Programs on the node's ENIs (eth1..ethN), tc hooks.
 *
 * fp_from_vpc (tc ingress): IPv4 for a local endpoint is redirected straight
 * into the pod's netns; everything else (the node's own traffic, ARP, ...)
 * goes to the stack unchanged.
 * fp_to_vpc (tc egress) lets everything through; a hook for later stages.
 */
#include "lib/fwd.h"

int fp_from_vpc(struct __sk_buff *skb)
{
	struct fp_ipv4 ip = {};
	struct fp_endpoint *dst;
	enum fp_reason reason = FP_FWD_STACK;
	int verdict = FP_TC_CONTINUE;

	switch (fp_parse_ipv4(skb, &ip)) {
	case FP_PARSE_OTHER:
		return FP_TC_CONTINUE;
	case FP_PARSE_INVALID:
		fp_count(skb->ifindex, FP_DIR_FROM_VPC, FP_DROP_INVALID, skb->len);
		fp_test_record(0, FP_RD_NONE, 0, FP_DROP_INVALID);
		return TC_ACT_SHOT;
	}

	dst = fp_endpoint_lookup(ip.daddr);
	if (dst)
		verdict = fp_redirect_local(skb, &ip, dst, &reason);
	fp_count(skb->ifindex, FP_DIR_FROM_VPC, reason, skb->len);
	if (verdict != TC_ACT_REDIRECT)
		fp_test_record(0, FP_RD_NONE, 0, reason);
	return verdict;
}

int fp_to_vpc(struct __sk_buff *skb)
{
	return FP_TC_CONTINUE;
}
