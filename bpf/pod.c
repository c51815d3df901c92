/* Programs on the host side of each pod's veth (cali*), tc hooks.
 *
 * fp_from_pod (tc ingress: packets the pod sends):
 *   - first the guards (lib/guard.h): on a registered veth, any packet
 *     (IPv4, IPv6, ARP) whose source is not the endpoint's own is dropped
 *     as spoofed; IPv6 of an isolated pod is dropped, neighbour discovery
 *     aside;
 *   - anything else but IPv4 goes to the stack unchanged;
 *   - the source must be the endpoint registered on this veth; on a veth
 *     without a registration, an unknown source is left to the stack and
 *     another local pod's address is dropped as spoofed;
 *   - a TCP/UDP packet to a service frontend is translated to a backend
 *     (conntrack keeps the flow on it), then forwarded like any other;
 *   - with NetworkPolicy on, a new flow must pass the pod's egress and, when
 *     the destination is a pod of this node, that pod's ingress (lib/policy.h);
 *   - the pod's egress limits apply (lib/bw.h);
 *   - host-stack bypass prefixes (node-local DNS) go to the stack;
 *   - a destination that is a local endpoint is redirected into its netns;
 *   - anything else leaves by the pod's ENI when the FIB agrees.
 * fp_to_pod (tc egress: packets the stack delivers to the pod) drops IPv6
 * to an isolated pod (lib/guard.h), checks the pod's ingress policy and
 * ingress limits (lib/bw.h), restores the VIP on replies of translated
 * flows and lets everything else through.
 * Every drop is reported to the monitor's ring buffer (lib/policy.h).
 * Programs never return TC_ACT_OK for "not mine": they return
 * TC_ACT_UNSPEC so that other tc filters on the device still run.
 */
#include "lib/fwd.h"
#include "lib/icmp.h"
#include "lib/policy.h"
#include "lib/guard.h"
#include "lib/bw.h"

/* What a from-pod packet looked like on arrival, for the report. */
struct fp_seen {
	__be32 saddr;
	__be32 daddr;
	__be16 dport;
};

static __always_inline int fp_finish(struct __sk_buff *skb, enum fp_dir dir,
				     enum fp_reason reason, int verdict)
{
	fp_count(skb->ifindex, dir, reason, skb->len);
	if (verdict != TC_ACT_REDIRECT)
		fp_test_record(0, FP_RD_NONE, 0, reason);
	return verdict;
}

static __always_inline int fp_finish_report(struct __sk_buff *skb, enum fp_dir dir,
					    enum fp_reason reason, int verdict,
					    const struct fp_ipv4 *ip, const struct fp_seen *seen,
					    __be16 sport, __be16 dport,
					    const struct fp_verdict *v)
{
	fp_report(skb, dir, reason, ip, sport, dport, seen->saddr, seen->daddr, seen->dport, v);
	return fp_finish(skb, dir, reason, verdict);
}

static __always_inline int fp_from_pod_run(struct __sk_buff *skb)
{
	struct fp_ipv4 ip = {};
	struct fp_endpoint *src, *dst;
	enum fp_reason reason = FP_FWD_STACK;
	struct fp_verdict pv = {};
	struct fp_seen seen = {};
	struct fp_l4 l4 = {};
	int has_l4 = 0, hairpin = 0;
	__u32 eni_ifindex;
	int verdict;

	if (fp_guard_from_pod(skb, &reason))
		return fp_finish(skb, FP_DIR_FROM_POD, reason, TC_ACT_SHOT);

	switch (fp_parse_ipv4(skb, &ip)) {
	case FP_PARSE_OTHER:
		return fp_finish(skb, FP_DIR_FROM_POD, FP_FWD_PASS, FP_TC_CONTINUE);
	case FP_PARSE_INVALID:
		return fp_finish_report(skb, FP_DIR_FROM_POD, FP_DROP_INVALID, TC_ACT_SHOT,
					&ip, &seen, 0, 0, NULL);
	}

	seen.saddr = ip.saddr;
	seen.daddr = ip.daddr;
	src = fp_endpoint_lookup(ip.saddr);
	if (!src)
		return fp_finish(skb, FP_DIR_FROM_POD, FP_FWD_STACK, FP_TC_CONTINUE);
	if (src->host_ifindex != skb->ifindex)
		return fp_finish_report(skb, FP_DIR_FROM_POD, FP_DROP_SPOOFED, TC_ACT_SHOT,
					&ip, &seen, 0, 0, NULL);
	eni_ifindex = src->eni_ifindex;

	/* A hairpinned flow's reply is addressed to the local router address:
	 * give it back its client (and the VIP as source) before routing. */
	if (ip.daddr == FP_HAIRPIN_IP) {
		hairpin = 1;
		if (fp_lb_reverse(skb, &ip) < 0)
			return fp_finish(skb, FP_DIR_FROM_POD, FP_DROP_CSUM, TC_ACT_SHOT);
	}

	if (fp_parse_l4(skb, &ip, &l4) == 0) {
		int rc;

		has_l4 = 1;
		seen.daddr = ip.daddr;
		seen.dport = l4.dport;
		rc = fp_lb_translate(skb, &ip, &l4, &reason);
		if (rc < 0 && reason == FP_DROP_NO_BACKEND) {
			/* counted as a drop of the original; the client gets ICMP */
			fp_report(skb, FP_DIR_FROM_POD, reason, &ip, l4.sport, l4.dport,
				  seen.saddr, ip.daddr, l4.dport, NULL);
			return fp_finish(skb, FP_DIR_FROM_POD, reason,
					 fp_reject_icmp(skb, &ip, ICMP_PORT_UNREACH, &reason));
		}
		if (rc < 0)
			return fp_finish(skb, FP_DIR_FROM_POD, reason, TC_ACT_SHOT);
		if (rc == 0) {
			fp_count(skb->ifindex, FP_DIR_FROM_POD, FP_FWD_SVC, skb->len);
			hairpin |= ip.saddr == FP_HAIRPIN_IP;
		} else {
			fp_lb_forget_stale_reply(skb, &ip, &l4);
		}
	} else {
		seen.daddr = ip.daddr;
	}

	/* A pod reaching itself through a Service never leaves its netns as
	 * far as policy is concerned. */
	if (!hairpin && fp_policy_enabled() &&
	    fp_policy_judge(skb, FP_DIR_FROM_POD, &ip, has_l4 ? l4.sport : 0,
			    has_l4 ? l4.dport : 0, 1, &pv) < 0)
		return fp_finish_report(skb, FP_DIR_FROM_POD, FP_DROP_POLICY, TC_ACT_SHOT, &ip,
					&seen, l4.sport, l4.dport, &pv);

	/* Bandwidth manager (lib/bw.h): the pod's egress limits. */
	if (fp_bw_from_pod(skb, &ip, &l4, has_l4, &reason) < 0)
		return fp_finish_report(skb, FP_DIR_FROM_POD, reason, TC_ACT_SHOT, &ip, &seen,
					l4.sport, l4.dport, &pv);

	if (fp_bypass_match(ip.daddr)) {
		verdict = FP_TC_CONTINUE;
		reason = FP_FWD_BYPASS;
	} else {
		dst = fp_endpoint_lookup(ip.daddr);
		if (dst)
			verdict = fp_redirect_local(skb, &ip, dst, &reason);
		else
			verdict = fp_redirect_vpc(skb, &ip, eni_ifindex, &reason);
	}
	return fp_finish_report(skb, FP_DIR_FROM_POD, reason, verdict, &ip, &seen,
				l4.sport, l4.dport, &pv);
}

int fp_from_pod(struct __sk_buff *skb)
{
	__u32 prev = fp_whatif_enter(skb);
	int verdict = fp_from_pod_run(skb);

	fp_whatif_exit(prev);
	return verdict;
}

static __always_inline int fp_to_pod_run(struct __sk_buff *skb)
{
	struct fp_ipv4 ip = {};
	struct fp_verdict pv = {};
	enum fp_reason reason;
	__be16 sport, dport;
	int rc;

	if (fp_guard_to_pod(skb, &reason))
		return fp_finish(skb, FP_DIR_TO_POD, reason, TC_ACT_SHOT);

	if (fp_parse_ipv4(skb, &ip) != FP_PARSE_IPV4)
		return FP_TC_CONTINUE;
	if (fp_policy_enabled()) {
		fp_policy_ports(skb, &ip, &sport, &dport);
		if (fp_policy_judge(skb, FP_DIR_TO_POD, &ip, sport, dport, 0, &pv) < 0) {
			fp_report(skb, FP_DIR_TO_POD, FP_DROP_POLICY, &ip, sport, dport,
				  ip.saddr, ip.daddr, dport, &pv);
			return fp_finish(skb, FP_DIR_TO_POD, FP_DROP_POLICY, TC_ACT_SHOT);
		}
	}
	/* Bandwidth manager (lib/bw.h): the pod's ingress limits. */
	if (fp_bw_deliver(skb, &ip, &reason) < 0) {
		fp_report(skb, FP_DIR_TO_POD, reason, &ip, 0, 0, ip.saddr, ip.daddr, 0, NULL);
		return fp_finish(skb, FP_DIR_TO_POD, reason, TC_ACT_SHOT);
	}
	rc = fp_lb_reverse(skb, &ip);
	if (rc < 0)
		return fp_finish(skb, FP_DIR_TO_POD, FP_DROP_CSUM, TC_ACT_SHOT);
	if (rc > 0)
		fp_count(skb->ifindex, FP_DIR_TO_POD, FP_FWD_REVNAT, skb->len);
	return FP_TC_CONTINUE;
}

int fp_to_pod(struct __sk_buff *skb)
{
	__u32 prev = fp_whatif_enter(skb);
	int verdict = fp_to_pod_run(skb);

	fp_whatif_exit(prev);
	return verdict;
}
