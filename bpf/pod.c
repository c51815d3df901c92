/* Programs on the host side of each pod's veth (cali*), tc hooks.
 *
 * fp_from_pod (tc ingress: packets the pod sends):
 *   - anything but IPv4 (ARP, IPv6, ...) goes to the stack unchanged;
 *   - the source must be the endpoint registered on this veth (anti-spoof);
 *     a pod fastpath does not know yet is left to the stack;
 *   - a TCP/UDP packet to a service frontend is translated to a backend
 *     (conntrack keeps the flow on it), then forwarded like any other;
 *   - host-stack bypass prefixes (node-local DNS) go to the stack;
 *   - a destination that is a local endpoint is redirected into its netns;
 *   - anything else leaves by the pod's ENI when the FIB agrees.
 * fp_to_pod (tc egress: packets the stack delivers to the pod) restores the
 * VIP on replies of translated flows and lets everything through.
 * Programs never return TC_ACT_OK for "not mine": they return
 * TC_ACT_UNSPEC so that other tc filters on the device still run.
 */
#include "lib/fwd.h"
#include "lib/icmp.h"

static __always_inline int fp_finish(struct __sk_buff *skb, enum fp_dir dir,
				     enum fp_reason reason, int verdict)
{
	fp_count(skb->ifindex, dir, reason, skb->len);
	if (verdict != TC_ACT_REDIRECT)
		fp_test_record(0, FP_RD_NONE, 0, reason);
	return verdict;
}

int fp_from_pod(struct __sk_buff *skb)
{
	struct fp_ipv4 ip = {};
	struct fp_endpoint *src, *dst;
	enum fp_reason reason = FP_FWD_STACK;
	__u32 eni_ifindex;
	int verdict;

	switch (fp_parse_ipv4(skb, &ip)) {
	case FP_PARSE_OTHER:
		return fp_finish(skb, FP_DIR_FROM_POD, FP_FWD_PASS, FP_TC_CONTINUE);
	case FP_PARSE_INVALID:
		return fp_finish(skb, FP_DIR_FROM_POD, FP_DROP_INVALID, TC_ACT_SHOT);
	}

	src = fp_endpoint_lookup(ip.saddr);
	if (!src)
		return fp_finish(skb, FP_DIR_FROM_POD, FP_FWD_STACK, FP_TC_CONTINUE);
	if (src->host_ifindex != skb->ifindex)
		return fp_finish(skb, FP_DIR_FROM_POD, FP_DROP_SPOOFED, TC_ACT_SHOT);
	eni_ifindex = src->eni_ifindex;

	/* A hairpinned flow's reply is addressed to the local router address:
	 * give it back its client (and the VIP as source) before routing. */
	if (ip.daddr == FP_HAIRPIN_IP && fp_lb_reverse(skb, &ip) < 0)
		return fp_finish(skb, FP_DIR_FROM_POD, FP_DROP_CSUM, TC_ACT_SHOT);

	{
		struct fp_l4 l4;

		if (fp_parse_l4(skb, &ip, &l4) == 0) {
			int rc = fp_lb_translate(skb, &ip, &l4, &reason);

			if (rc < 0 && reason == FP_DROP_NO_BACKEND)
				/* counted as a drop of the original; the client gets ICMP */
				return fp_finish(skb, FP_DIR_FROM_POD, reason,
						 fp_reject_icmp(skb, &ip, ICMP_PORT_UNREACH, &reason));
			if (rc < 0)
				return fp_finish(skb, FP_DIR_FROM_POD, reason, TC_ACT_SHOT);
			if (rc == 0)
				fp_count(skb->ifindex, FP_DIR_FROM_POD, FP_FWD_SVC, skb->len);
			else
				fp_lb_forget_stale_reply(skb, &ip, &l4);
		}
	}

	if (fp_bypass_match(ip.daddr))
		return fp_finish(skb, FP_DIR_FROM_POD, FP_FWD_BYPASS, FP_TC_CONTINUE);

	dst = fp_endpoint_lookup(ip.daddr);
	if (dst)
		verdict = fp_redirect_local(skb, &ip, dst, &reason);
	else
		verdict = fp_redirect_vpc(skb, &ip, eni_ifindex, &reason);
	return fp_finish(skb, FP_DIR_FROM_POD, reason, verdict);
}

int fp_to_pod(struct __sk_buff *skb)
{
	struct fp_ipv4 ip = {};
	int rc;

	if (fp_parse_ipv4(skb, &ip) != FP_PARSE_IPV4)
		return FP_TC_CONTINUE;
	rc = fp_lb_reverse(skb, &ip);
	if (rc < 0)
		return fp_finish(skb, FP_DIR_TO_POD, FP_DROP_CSUM, TC_ACT_SHOT);
	if (rc > 0)
		fp_count(skb->ifindex, FP_DIR_TO_POD, FP_FWD_REVNAT, skb->len);
	return FP_TC_CONTINUE;
}
