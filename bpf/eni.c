/* Programs on the node's ENIs (eth1..ethN), tc hooks.
 *
 * fp_from_vpc (tc ingress): IPv4 for a local endpoint passes the pod's
 * ingress policy (when NetworkPolicy is on), gets its VIP back if it is a
 * reply of a translated flow (or an ICMP error about one), and is
 * redirected straight into the pod's netns; a fragment after the first
 * follows its first one. Everything else (the node's own traffic, ARP, ...)
 * goes to the stack unchanged.
 * fp_to_vpc (tc egress) lets everything through; a hook for later stages.
 */
#include "lib/fwd.h"
#include "lib/policy.h"

static __always_inline int fp_from_vpc_run(struct __sk_buff *skb)
{
	struct fp_ipv4 ip = {};
	struct fp_endpoint *dst;
	struct fp_verdict pv = {};
	struct fp_l4 l4 = {};
	enum fp_reason reason = FP_FWD_STACK;
	int verdict = FP_TC_CONTINUE, rc;
	__be32 arrived = 0, arrived_dst = 0;
	__be16 sport = 0, dport = 0;

	switch (fp_parse_ipv4(skb, &ip)) {
	case FP_PARSE_OTHER:
		return FP_TC_CONTINUE;
	case FP_PARSE_INVALID:
		reason = FP_DROP_INVALID;
		verdict = TC_ACT_SHOT;
		goto out;
	}

	/* the redirect may restore a VIP as source: report the arrival */
	arrived = ip.saddr;
	arrived_dst = ip.daddr;
	dst = fp_endpoint_lookup(ip.daddr);
	if (!dst)
		goto out;
	fp_parse_l4(skb, &ip, &l4);
	sport = l4.sport;
	dport = l4.dport;
	if (l4.kind == FP_L4_LATER_FRAG) {
		rc = fp_ct_frag_follow(skb, &ip, &l4, &reason);
		sport = l4.sport;
		dport = l4.dport;
		if (rc < 0 || (rc > 0 && fp_policy_enabled())) {
			if (rc > 0)
				reason = FP_DROP_FRAG_NO_FIRST;
			verdict = TC_ACT_SHOT;
			goto out;
		}
		verdict = fp_redirect_local(skb, &ip, dst, &reason);
		goto out;
	}
	if (fp_policy_enabled() &&
	    fp_policy_judge(skb, FP_DIR_FROM_VPC, &ip, &l4, 0, &pv) < 0) {
		reason = FP_DROP_POLICY;
		verdict = TC_ACT_SHOT;
		goto done;
	}
	if (fp_ct_reverse(skb, &ip, &l4) < 0) {
		reason = FP_DROP_CSUM;
		verdict = TC_ACT_SHOT;
		goto done;
	}
	verdict = fp_redirect_local(skb, &ip, dst, &reason);
done:
	fp_ct_frag_record(&ip, arrived, arrived_dst, sport, dport, reason);
out:
	fp_count(skb->ifindex, FP_DIR_FROM_VPC, reason, skb->len);
	fp_report(skb, FP_DIR_FROM_VPC, reason, &ip, sport, dport, arrived, ip.daddr, dport, &pv);
	if (verdict != TC_ACT_REDIRECT)
		fp_test_record(0, FP_RD_NONE, 0, reason);
	return verdict;
}

int fp_from_vpc(struct __sk_buff *skb)
{
	__u32 prev = fp_whatif_enter(skb);
	int verdict = fp_from_vpc_run(skb);

	fp_whatif_exit(prev);
	return verdict;
}

int fp_to_vpc(struct __sk_buff *skb)
{
	return FP_TC_CONTINUE;
}
