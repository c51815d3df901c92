/* Programs on the host side of each pod's veth (cali*), tc hooks.
 *
 * fp_from_pod (tc ingress: packets the pod sends):
 *   - IPv6 goes to fp_from_pod6 (tail call) before anything else: it runs
 *     the guards itself;
 *   - first the guards (lib/guard.h): on a registered veth, any packet
 *     (IPv4, ARP) whose source is not the endpoint's own is dropped as
 *     spoofed;
 *   - anything else but IPv4 goes to the stack unchanged;
 *   - a packet of an established flow to another pod of this node, or out
 *     to the VPC, with NetworkPolicy and the bandwidth manager off, is
 *     forwarded at once (fp_from_pod_established: the same outcome as the
 *     walk below);
 *   - the source must be the endpoint registered on this veth; on a veth
 *     without a registration, an unknown source is left to the stack and
 *     another local pod's address is dropped as spoofed;
 *   - a TCP/UDP/SCTP packet to a service frontend is translated to a
 *     backend (conntrack keeps the flow on it; a mid-stream packet conntrack
 *     does not know is dropped), then forwarded like any other; a new flow
 *     to a live ClusterIP's unknown port is rejected, one to an unallocated
 *     address of the Service CIDRs dropped (kube-proxy's nftables mode);
 *   - a fragment after the first follows its first fragment (lib/ct.h);
 *   - with NetworkPolicy on, a new flow must pass the pod's egress and, when
 *     the destination is a pod of this node, that pod's ingress (lib/policy.h);
 *   - the pod's egress limits apply (lib/bw.h);
 *   - host-stack bypass prefixes (node-local DNS) go to the stack;
 *   - a destination that is a local endpoint is redirected into its netns;
 *   - anything else leaves by the pod's ENI when the FIB agrees.
 * Replies of translated flows (and ICMP errors about them) get their VIP
 * back on delivery to a local pod (fp_ct_reverse); a local backend's reply
 * to a client outside the node (a NodePort, external or load-balancer IP)
 * gets its frontend back before it is routed, and may then leave by the
 * node's primary NIC, which owns that address.
 * fp_to_pod (tc egress: packets the stack delivers to the pod) hands IPv6
 * to fp_to_pod6 (tail call), checks the pod's ingress policy and
 * ingress limits (lib/bw.h), restores the VIP on replies of translated
 * flows (and ICMP errors about them) and lets everything else through.
 * Every drop is reported to the monitor's ring buffer (lib/policy.h).
 * Programs never return TC_ACT_OK for "not mine": they return
 * TC_ACT_UNSPEC so that other tc filters on the device still run.
 */
#include "lib/fwd.h"
#include "lib/fwd6.h"
#include "lib/icmp.h"
#include "lib/policy.h"
#include "lib/event6.h"
#include "lib/policy6.h"
#include "lib/guard.h"
#include "lib/bw.h"
#include "lib/ct6.h"
#include "lib/icmp6.h"
#include "lib/lo.h"

/* What a packet looked like on arrival, for reports and fragment records. */
struct fp_seen {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
};

/* fp_from_pod's walk is two programs: fp_from_pod judges (guards, Service
 * translation, NetworkPolicy) and tail-calls fp_pod_route
 * (FP_TAIL_FROM_POD_ROUTE), which limits (lib/bw.h), restores replies and
 * forwards. As one program the verifier's walk of every judged path times
 * every forwarding path passes its limit of a million instructions; as two
 * the paths add up. What the first hands the second, in the pinned per-CPU
 * FP_MAP_POD_ROUTE (tc programs do not nest on a CPU; a tail call runs on
 * the caller's): */
struct fp_pod_route {
	struct fp_ipv4 ip;         /* after translation */
	struct fp_l4 l4;
	struct fp_seen seen;
	struct fp_verdict pv;
	__u32 eni_ifindex;
	__u32 reason;
	__u8 translated;           /* a forward packet just translated (or a later
				    * fragment): nothing to restore */
	__u8 hairpin_reply;
};
_Static_assert(sizeof(struct fp_pod_route) <= FP_POD_ROUTE_BYTES, "fp_pod_route fits its slot");

static __always_inline struct fp_pod_route *fp_pod_route_slot(void)
{
	__u32 zero = 0;

	return (struct fp_pod_route *)FP_MAP_POD_ROUTE.lookup(&zero);
}

/* Tail-call `slot`; returns only when the slot is empty, which the agent
 * never leaves it: the packet is dropped and counted rather than let
 * through half-judged. */
static __always_inline int fp_tail_call(struct __sk_buff *skb, __u32 slot, enum fp_dir dir)
{
	fp_tail_jump(skb, slot);
	/* every slot but IPv4's second half is an IPv6 program's */
	fp_count_family(skb->ifindex, dir, FP_DROP_NO_TAIL_CALL, skb->len,
			slot == FP_TAIL_FROM_POD_ROUTE ? FP_FAM_IPV4 : FP_FAM_IPV6);
	fp_test_record(0, FP_RD_NONE, 0, FP_DROP_NO_TAIL_CALL);
	return TC_ACT_SHOT;
}

static __always_inline int fp_finish(struct __sk_buff *skb, enum fp_dir dir,
				     enum fp_reason reason, int verdict)
{
	/* a fresh ctx access: the verifier refuses a ctx field's address the
	 * compiler would otherwise keep in a register across the walk */
	barrier_var(skb);
	/* no IPv6 packet ends here: fp_from_pod and fp_to_pod hand IPv6 over
	 * before they decide anything (ARP and the like count as IPv4) */
	fp_count_family(skb->ifindex, dir, reason, skb->len, FP_FAM_IPV4);
	if (verdict != TC_ACT_REDIRECT)
		fp_test_record(0, FP_RD_NONE, 0, reason);
	return verdict;
}

/* The end of every IPv4 packet's walk: the fragments after a first one
 * will get what it got; the monitor and the counters hear of it. */
static __always_inline int fp_finish_report(struct __sk_buff *skb, enum fp_dir dir,
					    enum fp_reason reason, int verdict,
					    const struct fp_ipv4 *ip, const struct fp_seen *seen,
					    const struct fp_l4 *l4, const struct fp_verdict *v)
{
	fp_ct_frag_record(ip, seen->saddr, seen->daddr, seen->sport, seen->dport, reason);
	/* the source as it arrived (a reply's is restored to the VIP's on
	 * delivery); the destination after translation, with the arrival's */
	fp_report(skb, dir, reason, ip, seen->sport, l4->dport, seen->saddr, seen->daddr,
		  seen->dport, v);
	return fp_finish(skb, dir, reason, verdict);
}

/* Not a verdict: the packet needs the whole walk (fp_from_pod_local). */
#define FP_WALK_ON 0x7ffe

/* The common case in one program: a packet of an established flow from a
 * pod to another pod of this node or out to the VPC, with NetworkPolicy and
 * the bandwidth manager off. Nothing of the judging half applies to it (no
 * frontend takes it, the Service CIDR checks and the retiring of an old
 * reply entry are for packets that open flows, there is no policy) and of
 * the second half only what fp_pod_route does for its destination: the
 * reply of a translated flow gets its VIP back (or, leaving the node, its
 * frontend), then delivery into the pod or the FIB's way out of the pod's
 * ENI. Skipping the hand-over and the tail call is what makes it cheaper;
 * the outcome is the same. Returns the verdict, or FP_WALK_ON for anything
 * else. */
static __always_inline int fp_from_pod_established(struct __sk_buff *skb, struct fp_ipv4 *ip,
						   struct fp_l4 *l4, const struct fp_seen *seen,
						   __u32 eni_ifindex)
{
	struct fp_config *cfg = fp_config_get();
	struct fp_endpoint *dst;
	enum fp_reason reason = FP_FWD_STACK;
	int verdict, rc;

	if (l4->kind != FP_L4_PORTS || l4->opening || ip->daddr == FP_HAIRPIN_IP)
		return FP_WALK_ON;
	/* what-if runs record every decision the whole walk makes */
	if (!cfg || (cfg->flags & (FP_CFG_F_POLICY | FP_CFG_F_BW)) || fp_whatif())
		return FP_WALK_ON;
	if (fp_ct_frontend(ip, l4, 0) || fp_bypass_match(ip->daddr))
		return FP_WALK_ON;
	dst = fp_endpoint_lookup(ip->daddr);
	rc = fp_ct_reverse(skb, ip, l4);
	if (rc < 0)
		return fp_finish_report(skb, FP_DIR_FROM_POD, FP_DROP_CSUM, TC_ACT_SHOT, ip, seen,
					l4, NULL);
	if (!dst && rc > 0 && fp_lo_self(ip)) {
		/* the reply to the node's own association with itself (lib/lo.h) */
		verdict = fp_lo_deliver(skb, &reason);
		return fp_finish(skb, FP_DIR_FROM_POD, reason, verdict);
	}
	if (dst)
		verdict = fp_redirect_local(skb, ip, dst, &reason);
	else
		verdict = fp_redirect_fib(skb, ip, eni_ifindex, rc > 0 ? cfg->primary_ifindex : 0,
					  &reason);
	return fp_finish_report(skb, FP_DIR_FROM_POD, reason, verdict, ip, seen, l4, NULL);
}

static __always_inline int fp_from_pod_run(struct __sk_buff *skb)
{
	struct fp_ipv4 ip = {};
	struct fp_endpoint *src, *dst;
	enum fp_reason reason = FP_FWD_STACK;
	struct fp_verdict pv = {};
	struct fp_seen seen = {};
	struct fp_l4 l4 = {};
	int hairpin = 0, hairpin_reply = 0, translated = 0, rc;
	struct fp_pod_route *h;
	__u32 eni_ifindex;
	int parsed;

	/* The endpoint lookup the walk needs anyway proves an IPv4 source
	 * that is the endpoint registered on this very veth; the guard (and
	 * its lookup of the veth's registration) runs for everything else,
	 * before anything is decided, as it always did. */
	parsed = fp_parse_ipv4(skb, &ip);
	src = parsed == FP_PARSE_IPV4 ? fp_endpoint_lookup(ip.saddr) : NULL;
	barrier_var(skb);
	if ((!src || src->host_ifindex != skb->ifindex) && fp_guard_from_pod(skb, &reason))
		return fp_finish(skb, FP_DIR_FROM_POD, reason, TC_ACT_SHOT);
	/* the guard's ctx reads are not to be reused past here (see fp_finish) */
	barrier_var(skb);

	switch (parsed) {
	case FP_PARSE_OTHER:
		return fp_finish(skb, FP_DIR_FROM_POD, FP_FWD_PASS, FP_TC_CONTINUE);
	case FP_PARSE_INVALID:
		fp_report(skb, FP_DIR_FROM_POD, FP_DROP_INVALID, &ip, 0, 0, 0, 0, 0, NULL);
		return fp_finish(skb, FP_DIR_FROM_POD, FP_DROP_INVALID, TC_ACT_SHOT);
	}

	if (!src)
		return fp_finish(skb, FP_DIR_FROM_POD, FP_FWD_STACK, FP_TC_CONTINUE);
	fp_parse_l4(skb, &ip, &l4);
	seen.saddr = ip.saddr;
	seen.daddr = ip.daddr;
	seen.sport = l4.sport;
	seen.dport = l4.dport;
	if (src->host_ifindex != skb->ifindex)
		return fp_finish_report(skb, FP_DIR_FROM_POD, FP_DROP_SPOOFED, TC_ACT_SHOT,
					&ip, &seen, &l4, NULL);
	eni_ifindex = src->eni_ifindex;

	rc = fp_from_pod_established(skb, &ip, &l4, &seen, eni_ifindex);
	if (rc != FP_WALK_ON)
		return rc;

	if (l4.kind == FP_L4_LATER_FRAG) {
		/* no ports: it goes where its first fragment went, or nowhere */
		rc = fp_ct_frag_follow(skb, &ip, &l4, &reason);
		if (rc > 0)
			reason = FP_DROP_FRAG_NO_FIRST;
		if (rc)
			return fp_finish_report(skb, FP_DIR_FROM_POD, reason, TC_ACT_SHOT, &ip,
						&seen, &l4, NULL);
		translated = 1;        /* (or left alone, as its first one was) */
		goto route;
	}

	/* A hairpinned flow's reply is addressed to the local router address:
	 * it is restored below (client and VIP) before routing. */
	hairpin_reply = ip.daddr == FP_HAIRPIN_IP;
	if (!hairpin_reply) {
		rc = fp_ct_service(skb, &ip, &l4, &reason);
		if (rc < 0 && reason == FP_DROP_NO_BACKEND) {
			/* counted as a drop of the original; the client gets ICMP */
			fp_ct_frag_record(&ip, seen.saddr, seen.daddr, seen.sport, seen.dport, reason);
			fp_report(skb, FP_DIR_FROM_POD, reason, &ip, l4.sport, l4.dport,
				  seen.saddr, ip.daddr, l4.dport, NULL);
			return fp_finish(skb, FP_DIR_FROM_POD, reason,
					 fp_reject_icmp(skb, &ip, ICMP_PORT_UNREACH, &reason));
		}
		if (rc < 0)
			return fp_finish_report(skb, FP_DIR_FROM_POD, reason, TC_ACT_SHOT, &ip,
						&seen, &l4, NULL);
		if (rc == 0) {
			translated = 1;
			fp_count(skb->ifindex, FP_DIR_FROM_POD, FP_FWD_SVC, skb->len);
			hairpin = ip.saddr == FP_HAIRPIN_IP;
		} else if (l4.kind == FP_L4_ICMP_ERR) {
			/* a client's error about a reply it got from a VIP */
			rc = fp_ct_related_forward(skb, &ip, &l4);
			if (rc < 0)
				return fp_finish_report(skb, FP_DIR_FROM_POD, FP_DROP_CSUM,
							TC_ACT_SHOT, &ip, &seen, &l4, NULL);
			translated = rc == 0;
		} else {
			fp_ct_forget_reply(&ip, &l4);
			reason = fp_svcnet_check(&ip, &l4);
			if (reason == FP_DROP_SVC_UNKNOWN_PORT) {
				fp_ct_frag_record(&ip, seen.saddr, seen.daddr, seen.sport, seen.dport,
						  reason);
				fp_report(skb, FP_DIR_FROM_POD, reason, &ip, l4.sport, l4.dport,
					  seen.saddr, ip.daddr, l4.dport, NULL);
				return fp_finish(skb, FP_DIR_FROM_POD, reason,
						 fp_reject_icmp(skb, &ip, ICMP_PORT_UNREACH, &reason));
			}
			if (reason)
				return fp_finish_report(skb, FP_DIR_FROM_POD, reason, TC_ACT_SHOT,
							&ip, &seen, &l4, NULL);
			reason = FP_FWD_STACK;
		}
	}

	/* A pod reaching itself through a Service never leaves its netns as
	 * far as policy is concerned. */
	if (!hairpin && !hairpin_reply && fp_policy_enabled() &&
	    fp_policy_judge(skb, FP_DIR_FROM_POD, &ip, &l4, 1, &pv) < 0)
		return fp_finish_report(skb, FP_DIR_FROM_POD, FP_DROP_POLICY, TC_ACT_SHOT, &ip,
					&seen, &l4, &pv);

route:
	h = fp_pod_route_slot();
	if (!h)
		return fp_finish_report(skb, FP_DIR_FROM_POD, FP_DROP_INVALID, TC_ACT_SHOT, &ip,
					&seen, &l4, &pv);
	h->ip = ip;
	h->l4 = l4;
	h->seen = seen;
	h->pv = pv;
	h->eni_ifindex = eni_ifindex;
	h->reason = reason;
	h->translated = translated;
	h->hairpin_reply = hairpin_reply;
	return FP_TAIL_ROUTE;
}

/* The second half of fp_from_pod (see struct fp_pod_route). */
static __always_inline int fp_pod_route_run(struct __sk_buff *skb)
{
	struct fp_pod_route *h;
	struct fp_endpoint *dst;
	struct fp_ipv4 ip;
	struct fp_l4 l4;
	struct fp_seen seen;
	struct fp_verdict pv;
	enum fp_reason reason;
	__u32 eni_ifindex;
	int translated, hairpin_reply, verdict, rc;

	h = fp_pod_route_slot();
	if (!h)
		return fp_finish(skb, FP_DIR_FROM_POD, FP_DROP_INVALID, TC_ACT_SHOT);
	ip = h->ip;
	l4 = h->l4;
	seen = h->seen;
	pv = h->pv;
	eni_ifindex = h->eni_ifindex;
	reason = h->reason;
	translated = h->translated;
	hairpin_reply = h->hairpin_reply;

	if (hairpin_reply && fp_ct_reverse(skb, &ip, &l4) < 0)
		return fp_finish_report(skb, FP_DIR_FROM_POD, FP_DROP_CSUM, TC_ACT_SHOT, &ip,
					&seen, &l4, &pv);
	/* Bandwidth manager (lib/bw.h): the pod's egress limits, by its own
	 * address (a hairpinned or restored packet's source is no longer it) */
	{
		struct fp_ipv4 sent = ip;

		sent.saddr = seen.saddr;
		if (fp_bw_from_pod(skb, &sent, &l4, l4.kind == FP_L4_PORTS, &reason) < 0)
			return fp_finish_report(skb, FP_DIR_FROM_POD, reason, TC_ACT_SHOT, &ip,
						&seen, &l4, &pv);
	}
	if (fp_bypass_match(ip.daddr)) {
		verdict = FP_TC_CONTINUE;
		reason = FP_FWD_BYPASS;
	} else {
		dst = fp_endpoint_lookup(ip.daddr);
		if (dst) {
			/* replies meet their client here (a forward packet just
			 * translated, or a hairpin reply, has nothing to undo) */
			if (!translated && !hairpin_reply && fp_ct_reverse(skb, &ip, &l4) < 0)
				return fp_finish_report(skb, FP_DIR_FROM_POD, FP_DROP_CSUM,
							TC_ACT_SHOT, &ip, &seen, &l4, &pv);
			verdict = fp_redirect_local(skb, &ip, dst, &reason);
		} else {
			__u32 also = 0;

			/* a local backend's reply to a client outside the node:
			 * the frontend (a node or external address) is its source
			 * again, so the node's routing, not the pod's, decides */
			if (!translated && !hairpin_reply) {
				rc = fp_ct_reverse(skb, &ip, &l4);
				if (rc < 0)
					return fp_finish_report(skb, FP_DIR_FROM_POD, FP_DROP_CSUM,
								TC_ACT_SHOT, &ip, &seen, &l4, &pv);
				if (rc > 0) {
					struct fp_config *cfg = fp_config_get();

					also = cfg ? cfg->primary_ifindex : 0;
				}
				/* the node's own association to itself (lib/lo.h) */
				if (rc > 0 && fp_lo_self(&ip)) {
					verdict = fp_lo_deliver(skb, &reason);
					goto report;
				}
			}
			verdict = fp_redirect_fib(skb, &ip, eni_ifindex, also, &reason);
		}
	}
report:
	return fp_finish_report(skb, FP_DIR_FROM_POD, reason, verdict, &ip, &seen, &l4, &pv);
}

int fp_from_pod(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 prev;
	int verdict;

	/* IPv6 has its own program (fp_from_pod6), guards included: handed
	 * over at once, it pays nothing of IPv4's walk (docs/ipv6.md, "IPv6
	 * per-packet cost: the hand-over and what is left"). The Ethernet
	 * header is in the linear part at tc (the stack pulled it), and a
	 * read that could fall back to bpf_skb_load_bytes would fork the
	 * verifier's walk of everything after it. */
	if ((void *)(eth + 1) <= data_end && eth->h_proto == bpf_htons(ETH_P_IPV6))
		return fp_tail_call(skb, FP_TAIL_FROM_POD6, FP_DIR_FROM_POD);
	barrier_var(skb);
	prev = fp_whatif_enter(skb);
	verdict = fp_from_pod_run(skb);
	fp_whatif_exit(prev);
	if (verdict == FP_TAIL_ROUTE)
		verdict = fp_tail_call(skb, FP_TAIL_FROM_POD_ROUTE, FP_DIR_FROM_POD);
	return verdict;
}

int fp_pod_route(struct __sk_buff *skb)
{
	__u32 prev = fp_whatif_enter(skb);
	int verdict = fp_pod_route_run(skb);

	fp_whatif_exit(prev);
	return verdict;
}

static __always_inline int fp_to_pod_run(struct __sk_buff *skb)
{
	struct fp_ipv4 ip = {};
	struct fp_verdict pv = {};
	struct fp_l4 l4 = {};
	enum fp_reason reason = FP_FWD_PASS;
	__be32 saddr, daddr;
	__be16 sport, dport;
	int rc;

	if (fp_parse_ipv4(skb, &ip) != FP_PARSE_IPV4) {
		/* IPv6 has its own program (fp_to_pod6); a fresh ctx read
		 * (see fp_finish) */
		barrier_var(skb);
		if (fp_guard_ethertype(skb) == bpf_htons(ETH_P_IPV6))
			return FP_TAIL_IPV6;
		return FP_TC_CONTINUE;
	}
	fp_parse_l4(skb, &ip, &l4);
	saddr = ip.saddr;
	daddr = ip.daddr;
	sport = l4.sport;
	dport = l4.dport;
	if (l4.kind == FP_L4_LATER_FRAG) {
		rc = fp_ct_frag_follow(skb, &ip, &l4, &reason);
		if (rc > 0 && fp_policy_enabled())
			reason = FP_DROP_FRAG_NO_FIRST;
		else if (rc >= 0 && fp_bw_deliver(skb, &ip, &reason) == 0)
			return FP_TC_CONTINUE;
		fp_report(skb, FP_DIR_TO_POD, reason, &ip, l4.sport, l4.dport, saddr, daddr,
			  l4.dport, NULL);
		return fp_finish(skb, FP_DIR_TO_POD, reason, TC_ACT_SHOT);
	}
	if (fp_policy_enabled() && fp_policy_judge(skb, FP_DIR_TO_POD, &ip, &l4, 0, &pv) < 0) {
		fp_ct_frag_record(&ip, saddr, daddr, sport, dport, FP_DROP_POLICY);
		fp_report(skb, FP_DIR_TO_POD, FP_DROP_POLICY, &ip, sport, dport, saddr, daddr,
			  dport, &pv);
		return fp_finish(skb, FP_DIR_TO_POD, FP_DROP_POLICY, TC_ACT_SHOT);
	}
	/* Bandwidth manager (lib/bw.h): the pod's ingress limits. */
	if (fp_bw_deliver(skb, &ip, &reason) < 0) {
		fp_ct_frag_record(&ip, saddr, daddr, sport, dport, reason);
		fp_report(skb, FP_DIR_TO_POD, reason, &ip, sport, dport, saddr, daddr, dport, NULL);
		return fp_finish(skb, FP_DIR_TO_POD, reason, TC_ACT_SHOT);
	}
	rc = fp_ct_reverse(skb, &ip, &l4);
	if (rc < 0) {
		fp_ct_frag_record(&ip, saddr, daddr, sport, dport, FP_DROP_CSUM);
		return fp_finish(skb, FP_DIR_TO_POD, FP_DROP_CSUM, TC_ACT_SHOT);
	}
	fp_ct_frag_record(&ip, saddr, daddr, sport, dport, reason);
	if (rc > 0)
		fp_count(skb->ifindex, FP_DIR_TO_POD,
			 l4.kind == FP_L4_ICMP_ERR ? FP_FWD_RELATED : FP_FWD_REVNAT, skb->len);
	return FP_TC_CONTINUE;
}

int fp_to_pod(struct __sk_buff *skb)
{
	__u32 prev = fp_whatif_enter(skb);
	int verdict = fp_to_pod_run(skb);

	fp_whatif_exit(prev);
	if (verdict == FP_TAIL_IPV6)
		verdict = fp_tail_call(skb, FP_TAIL_TO_POD6, FP_DIR_TO_POD);
	return verdict;
}

/* An IPv6 packet for a local pod, from a pod or the VPC (fp_from_vpc6),
 * already judged by the caller (the redirect skips the pod's fp_to_pod6):
 * into its netns. */
static __always_inline int fp_deliver_local6(struct __sk_buff *skb, enum fp_dir dir,
					     const struct fp_ipv6 *ip, const struct fp_endpoint *dst)
{
	enum fp_reason reason = FP_FWD_STACK;
	int verdict;

	/* Bandwidth manager (lib/bw.h): the pod's ingress limits, shared
	 * with its IPv4 (the redirect skips fp_to_pod6); not for a packet
	 * whose hop limit expires here, which the stack answers instead */
	if (ip->hop_limit > 1 && fp_bw_deliver6(skb, ip, dst, &reason) < 0) {
		return fp_finish6(skb, dir, reason, TC_ACT_SHOT, ip);
	}
	verdict = fp_redirect_local6(skb, ip, dst, &reason);
	return fp_finish6(skb, dir, reason, verdict, ip);
}

/* ---- IPv6 Services per packet (lib/ct6.h) ----
 *
 * What fp_from_pod6 does for a registered pod's IPv6 packet before its
 * bypass check and forwarding, as fp_from_pod does for IPv4:
 *   - the reply of a hairpinned flow (to FP_HAIRPIN_IP6) gets the VIP as
 *     its source and the pod as its destination, and goes back into it;
 *   - a TCP/UDP packet to an IPv6 frontend is translated to a backend
 *     (conntrack keeps the flow on it; a mid-stream packet conntrack does
 *     not know is dropped), then forwarded like any packet; without a
 *     backend the pod gets ICMPv6 port unreachable;
 *   - a new flow to a live IPv6 ClusterIP's unknown port is rejected, one
 *     to an unallocated address of an IPv6 Service CIDR dropped;
 *   - a reply of a translated flow for a local pod gets its VIP back.
 * Returns a verdict, or FP_WALK_ON to go on with the (rewritten) packet.
 * Drops are reported to the monitor as the other IPv6 drops are (without
 * addresses: the event record holds IPv4's). */
static __always_inline int fp_drop6(struct __sk_buff *skb, enum fp_reason reason,
				    struct fp_ipv6 *ip, int verdict)
{
	return fp_finish6(skb, FP_DIR_FROM_POD, reason, verdict, ip);
}

/* Translation of a new or known flow; what needs its VIP back is left to
 * the caller (*restore), which restores it after NetworkPolicy has judged
 * the packet as it was sent, as for IPv4. */
static __always_inline int fp_from_pod6_service_run(struct __sk_buff *skb, struct fp_ipv6 *ip,
						    struct fp_l4 *l4, int *restore, int *xlated)
{
	enum fp_reason reason = FP_FWD_STACK;
	int rc;

	fp_parse_l4_6(skb, ip, l4);
	if (fp_ip6_is_hairpin(ip->daddr)) {
		*restore = FP_RESTORE6_HAIRPIN;
		return FP_WALK_ON;
	}
	rc = fp_ct6_service(skb, ip, l4, &reason);
	if (rc == 0) {
		fp_count_family(skb->ifindex, FP_DIR_FROM_POD, FP_FWD_SVC, skb->len, FP_FAM_IPV6);
		*xlated = 1;
		return FP_WALK_ON;
	}
	if (rc < 0 && reason == FP_DROP_NO_BACKEND)
		return fp_drop6(skb, reason, ip,
				fp_reject_icmp6(skb, ip, FP_ICMP6_PORT_UNREACH, reason));
	if (rc < 0)
		return fp_drop6(skb, reason, ip, TC_ACT_SHOT);
	if (l4->kind == FP_L4_ICMP_ERR) {
		/* a client's error about a reply it got from a VIP: on to
		 * the backend (nothing to restore then) */
		rc = fp_ct6_related_forward(skb, ip, l4);
		if (rc < 0)
			return fp_drop6(skb, FP_DROP_CSUM, ip, TC_ACT_SHOT);
		if (rc > 0)
			return FP_WALK_ON;
	} else {
		fp_ct6_forget_reply(ip, l4);
		reason = fp_svcnet6_check(ip, l4);
		if (reason == FP_DROP_SVC_UNKNOWN_PORT)
			return fp_drop6(skb, reason, ip,
					fp_reject_icmp6(skb, ip, FP_ICMP6_PORT_UNREACH, reason));
		if (reason)
			return fp_drop6(skb, reason, ip, TC_ACT_SHOT);
	}
	if (fp_endpoint6_lookup(ip->daddr))
		*restore = FP_RESTORE6_LOCAL;
	else if (l4->kind == FP_L4_PORTS)
		/* maybe a local backend's reply to a client outside */
		*restore = FP_RESTORE6_OUTSIDE;
	return FP_WALK_ON;
}

/* The fragments of a datagram get what its first fragment got: its
 * translation (or restoration) is recorded for them (lib/ct6.h), begun
 * here and ended by the caller once the packet is final. */
static __always_inline int fp_from_pod6_service(struct __sk_buff *skb, struct fp_ipv6 *ip,
						struct fp_l4 *l4, int *restore, int *xlated)
{
	if (ip->frag == FP_IP6_LATER_FRAG) {
		if (fp_ct6_frag_follow(skb, ip) < 0)
			return fp_drop6(skb, FP_DROP_CSUM, ip, TC_ACT_SHOT);
		return FP_WALK_ON;
	}
	fp_ct6_frag_begin(ip);
	return fp_from_pod6_service_run(skb, ip, l4, restore, xlated);
}

/* ---- IPv6 established flows in one program ----
 *
 * What fp_from_pod_established is for IPv4: a mid-stream TCP/UDP/SCTP
 * packet of an unfragmented flow, bandwidth manager and what-if off,
 * NetworkPolicy off or the flow admitted already (its fp_ctpol6_v1 entry),
 * to no hairpin address or bypass prefix, has nothing for fp_pod6_route to
 * decide but the reply of a translated flow getting its VIP back and the
 * way out. Done here it saves the second tail call, the
 * second parse and the endpoint lookups fp_pod6_route repeats; the outcome
 * is the one the two halves give. A segment to an IPv6 frontend qualifies
 * too, once fp_from_pod6_service has translated it (FP_WALK_SVC6): then
 * nothing is left to restore and it goes where fp_pod6_route would send
 * it. Returns FP_ONE6_FORWARD (*also: the primary NIC is a way out too),
 * FP_WALK_SVC6, a verdict, or FP_WALK_ON for anything else. */
#define FP_WALK_SVC6 0x7ffd
#define FP_ONE6_FORWARD 0x7ffc

static __always_inline int fp_from_pod6_established(struct __sk_buff *skb, struct fp_ipv6 *ip,
						    struct fp_l4 *l4, int *also)
{
	struct fp_config *cfg = fp_config_get();
	int rc, armed;

	if (ip->frag != FP_IP6_NOT_FRAG)
		return FP_WALK_ON;
	fp_parse_l4_6(skb, ip, l4);
	if (l4->kind != FP_L4_PORTS || l4->opening || fp_ip6_is_hairpin(ip->daddr))
		return FP_WALK_ON;
	if (!cfg || (cfg->flags & FP_CFG_F_BW) || fp_whatif())
		return FP_WALK_ON;
	if (fp_bypass6_match(ip->daddr))
		return FP_WALK_ON;
	/* lookups only where they can hit (fastpath.h FP_MAP_MARK6): no
	 * frontend has an address in an unmarked slot, no reply entry a
	 * source in one */
	armed = fp_mark6_armed();
	if ((!armed || fp_mark6_is(FP_MARK6_FRONTEND + fp_mark6_slot(ip->daddr))) &&
	    fp_ct6_frontend(ip, l4, 0))
		return FP_WALK_SVC6;
	/* with NetworkPolicy on, a flow it admitted already: fp_pod6_route's
	 * judging of such a packet is this lookup (and its refresh), nothing
	 * else; any other packet is judged there */
	if (fp_policy_enabled() && !fp_ct6_policy_seen(ip, l4, bpf_ktime_get_ns()))
		return FP_WALK_ON;
	rc = armed && !fp_mark6_is(FP_MARK6_REPLY_SRC + fp_mark6_slot(ip->saddr)) ? 0 :
		fp_ct6_reverse(skb, ip, l4);
	if (rc < 0)
		return fp_drop6(skb, FP_DROP_CSUM, ip, TC_ACT_SHOT);
	/* a local backend's reply to a client outside: the node's routing
	 * decides, the primary NIC is a way out too (as in fp_pod6_route) */
	*also = rc > 0 ? cfg->primary_ifindex : 0;
	return FP_ONE6_FORWARD;
}

/* The end of the one-program walk: fp_pod6_route's forwarding for an
 * unfragmented packet with policy and bandwidth manager off. */
static __always_inline int fp_from_pod6_forward(struct __sk_buff *skb, struct fp_ipv6 *ip,
						const struct fp_endpoint *src, __u32 also)
{
	enum fp_reason reason = FP_FWD_STACK;
	struct fp_endpoint *dst;
	int verdict;

	dst = fp_endpoint6_lookup(ip->daddr);
	if (dst)
		return fp_deliver_local6(skb, FP_DIR_FROM_POD, ip, dst);
	verdict = fp_redirect_fib6_also(skb, ip, src->eni_ifindex, also, &reason);
	return fp_finish6(skb, FP_DIR_FROM_POD, reason, verdict, ip);
}

/* ---- IPv6 (docs/ipv6.md) ----
 *
 * fp_from_pod6 (reached from fp_from_pod by FP_TAIL_FROM_POD6, first
 * thing for every IPv6 packet):
 *   - the guard (lib/guard.h fp_guard_from_pod6): on a registered veth, a
 *     source other than the endpoint's own IPv6 address, a link-local one
 *     or :: is dropped as spoofed; a source the endpoint lookup the walk
 *     needs anyway places on this very veth is proven without it;
 *   - malformed IPv6 (short, bad length, extension headers past the
 *     packet or more than FP_IP6_EXT_MAX of them) is dropped as invalid;
 *   - neighbour discovery, router solicitation, link-local and multicast
 *     traffic, and what an unspecified source sends, pass to the stack
 *     counted as `passed` (the link's own traffic, like ARP);
 *   - the source must be the endpoint registered on this veth (as for
 *     IPv4 on a veth without a registration: an unknown source goes to the
 *     stack, another local pod's address is dropped as spoofed);
 *   - IPv6 Services per packet (fp_from_pod6_service above: translation,
 *     RELATED ICMPv6 errors and fragments of translated flows, reject and
 *     drop);
 *   - with NetworkPolicy on, a new flow must pass the pod's egress and,
 *     when the destination is a pod of this node, that pod's ingress, after
 *     translation and before a local client's reply gets its VIP back (as
 *     for IPv4); a later fragment follows its first one (lib/policy6.h); a
 *     pod reaching itself through a Service is not judged;
 *   - the pod's egress limits apply, one budget with its IPv4 (lib/bw.h;
 *     a local destination's ingress limits apply at its delivery);
 *   - host-stack bypass prefixes of IPv6 (host_stack_cidrs, service_cidrs)
 *     go to the stack;
 *   - a destination that is a local endpoint is redirected into its netns,
 *     anything else leaves by the pod's ENI when the FIB (AF_INET6)
 *     agrees, or goes to the stack. */
static __always_inline int fp_from_pod6_run(struct __sk_buff *skb)
{
	struct fp_ipv6 ip = {};
	struct fp_l4 l4 = {};
	struct fp_endpoint *src;
	enum fp_reason reason;
	int verdict, one, parsed, restore = 0, xlated = 0;
	__u32 also = 0;

	/* before anything is decided, as in fp_from_pod: the guard, unless
	 * the source's endpoint is the one registered on this veth */
	parsed = fp_parse_ipv6(skb, &ip);
	src = parsed == FP_PARSE_IPV6 ? fp_endpoint6_lookup(ip.saddr) : NULL;
	barrier_var(skb);
	if ((!src || src->host_ifindex != skb->ifindex) && fp_guard_from_pod6(skb, &reason))
		return fp_finish_quiet6(skb, FP_DIR_FROM_POD, reason, TC_ACT_SHOT);
	/* the guard's ctx reads are not to be reused past here (see fp_finish) */
	barrier_var(skb);
	switch (parsed) {
	case FP_PARSE_IPV6:
		break;
	case FP_PARSE_INVALID:
		return fp_finish6(skb, FP_DIR_FROM_POD, FP_DROP_INVALID, TC_ACT_SHOT, &ip);
	default:
		return fp_finish_quiet6(skb, FP_DIR_FROM_POD, FP_FWD_PASS, FP_TC_CONTINUE);
	}
	/* the link's own traffic, as ARP is for IPv4: passed, not to-stack
	 * (to-stack counts pod traffic the fast path hands to the node) */
	if (fp_ip6_is_linklocal(ip.daddr) || fp_ip6_is_multicast(ip.daddr) ||
	    fp_ip6_is_linklocal(ip.saddr) || fp_ip6_is_unspecified(ip.saddr) ||
	    fp_ip6_is_nd(skb, &ip))
		return fp_finish_quiet6(skb, FP_DIR_FROM_POD, FP_FWD_PASS, FP_TC_CONTINUE);
	if (!src)
		return fp_finish6(skb, FP_DIR_FROM_POD, FP_FWD_STACK, FP_TC_CONTINUE, &ip);
	if (src->host_ifindex != skb->ifindex)
		return fp_finish6(skb, FP_DIR_FROM_POD, FP_DROP_SPOOFED, TC_ACT_SHOT, &ip);
	verdict = fp_from_pod6_established(skb, &ip, &l4, &also);
	if (verdict == FP_ONE6_FORWARD)
		return fp_from_pod6_forward(skb, &ip, src, also);
	if (verdict != FP_WALK_ON && verdict != FP_WALK_SVC6)
		return verdict;
	one = verdict == FP_WALK_SVC6;
	/* IPv6 Services per packet */
	verdict = fp_from_pod6_service(skb, &ip, &l4, &restore, &xlated);
	if (verdict != FP_WALK_ON)
		return verdict;
	/* a translated segment of an established flow: nothing of
	 * fp_pod6_route's is left but the bypass check and the way out (a
	 * hairpinned one, sourced from the hairpin address, takes both) */
	if (one && xlated && !restore && !fp_ip6_is_hairpin(ip.saddr) &&
	    (!fp_policy_enabled() || fp_ct6_policy_seen(&ip, &l4, bpf_ktime_get_ns()))) {
		if (fp_bypass6_match(ip.daddr))
			return fp_finish6(skb, FP_DIR_FROM_POD, FP_FWD_BYPASS, FP_TC_CONTINUE, &ip);
		return fp_from_pod6_forward(skb, &ip, src, 0);
	}
	/* the rest in fp_pod6_route (FP_TAIL_FROM_POD6_ROUTE) */
	barrier_var(skb);
	skb->cb[FP_CB_RESTORE6] = restore;
	return FP_TAIL_ROUTE;
}

/* fp_from_pod6's second half, on the packet as translated: the sending
 * pod's egress and a local receiver's ingress policy (judged before a local
 * client's reply gets its VIP back, as for IPv4; a pod reaching itself
 * through a Service is not judged), the VIP restored, the first fragment's
 * record ended, egress limits, then forwarding. */
static __always_inline int fp_pod6_route_run(struct __sk_buff *skb)
{
	struct fp_ipv6 ip = {};
	struct fp_l4 l4 = {};
	struct fp_ep_if *self;
	struct fp_endpoint *src, *dst;
	enum fp_reason reason;
	int verdict, restore;

	barrier_var(skb);
	restore = skb->cb[FP_CB_RESTORE6];
	if (fp_parse_ipv6(skb, &ip) != FP_PARSE_IPV6)
		return fp_finish6(skb, FP_DIR_FROM_POD, FP_DROP_INVALID, TC_ACT_SHOT, &ip);
	/* the sending pod, by the veth it sent on (its source address may be
	 * the hairpin address or a restored VIP by now); the first half
	 * checked that the veth's endpoint sent it */
	barrier_var(skb);
	self = fp_epif_lookup(skb->ifindex);
	src = self && (self->flags & FP_EPIF_F_IP6) ? fp_endpoint6_lookup((__u32 *)self->ip6) : NULL;
	if (!src)
		return fp_finish6(skb, FP_DIR_FROM_POD, FP_DROP_INVALID, TC_ACT_SHOT, &ip);
	if (restore != FP_RESTORE6_HAIRPIN && !fp_ip6_is_hairpin(ip.saddr)) {
		reason = fp_policy6_stage(skb, FP_DIR_FROM_POD, &ip, fp_policy6_pod(ip.saddr));
		if (reason)
			return fp_finish_quiet6(skb, FP_DIR_FROM_POD, reason, TC_ACT_SHOT);
	}
	if (restore) {
		fp_parse_l4_6(skb, &ip, &l4);
		verdict = fp_ct6_reverse(skb, &ip, &l4);
		if (verdict < 0)
			return fp_drop6(skb, FP_DROP_CSUM, &ip, TC_ACT_SHOT);
		/* policy judged this first fragment before its VIP came back;
		 * the fragments after it reach the policy stage restored
		 * (fp_ct6_frag_follow in the first half), so its verdict is
		 * kept under the addresses it leaves with as well (IPv4 keeps
		 * one record, under the arrival, for both) */
		if (verdict > 0 && ip.frag == FP_IP6_FIRST_FRAG && fp_policy_enabled())
			fp_frag6_record(&ip, &l4, FP_FWD_PASS);
		/* a local backend's reply to a client outside: the frontend (a
		 * node or external address) is its source again, so the
		 * node's routing, not the pod's, decides, and the primary NIC
		 * is a way out too */
		if (restore != FP_RESTORE6_OUTSIDE || verdict == 0)
			restore = 0;
	}
	/* the first fragment's record, begun in fp_from_pod6_service */
	if (ip.frag == FP_IP6_FIRST_FRAG)
		fp_ct6_frag_end(fp_frag6_scratch(), &ip);
	reason = FP_FWD_STACK;
	/* Bandwidth manager (lib/bw.h): the pod's egress limits, shared with
	 * its IPv4 (the key is the source endpoint's, whatever the source
	 * address has become) */
	if (fp_bw_from_pod6(skb, &ip, src, &reason) < 0)
		return fp_finish6(skb, FP_DIR_FROM_POD, reason, TC_ACT_SHOT, &ip);
	reason = FP_FWD_STACK;
	if (fp_bypass6_match(ip.daddr))
		return fp_finish6(skb, FP_DIR_FROM_POD, FP_FWD_BYPASS, FP_TC_CONTINUE, &ip);
	dst = fp_endpoint6_lookup(ip.daddr);
	if (dst)
		return fp_deliver_local6(skb, FP_DIR_FROM_POD, &ip, dst);
	if (restore) {
		struct fp_config *cfg = fp_config_get();

		verdict = fp_redirect_fib6_also(skb, &ip, src->eni_ifindex,
						cfg ? cfg->primary_ifindex : 0, &reason);
	} else {
		verdict = fp_redirect_fib6(skb, &ip, src->eni_ifindex, &reason);
	}
	return fp_finish6(skb, FP_DIR_FROM_POD, reason, verdict, &ip);
}

int fp_pod6_route(struct __sk_buff *skb)
{
	__u32 prev = fp_whatif_enter(skb);
	int verdict = fp_pod6_route_run(skb);

	fp_whatif_exit(prev);
	return verdict;
}

int fp_from_pod6(struct __sk_buff *skb)
{
	__u32 prev = fp_whatif_enter(skb);
	int verdict = fp_from_pod6_run(skb);

	fp_whatif_exit(prev);
	if (verdict == FP_TAIL_ROUTE)
		verdict = fp_tail_call(skb, FP_TAIL_FROM_POD6_ROUTE, FP_DIR_FROM_POD);
	return verdict;
}

/* fp_to_pod6 (reached from fp_to_pod by FP_TAIL_TO_POD6): IPv6 the stack
 * delivers to a pod (from the node itself, or routed by it). Malformed
 * IPv6 is dropped; the link's own traffic (neighbour discovery,
 * link-local, multicast, from ::) passes; anything else passes the pod's
 * ingress policy (lib/policy6.h) when NetworkPolicy is on, then its
 * ingress limits; a reply of a translated flow (a backend that is the node
 * itself or reached through the stack), an ICMPv6 error about one, and the
 * later fragments of either get the VIP back, as fp_to_pod does for IPv4. */
static __always_inline int fp_to_pod6_run(struct __sk_buff *skb)
{
	struct fp_ipv6 ip = {};
	struct fp_l4 l4 = {};
	struct fp_endpoint *dst;
	struct fp_frag6_work *first;
	enum fp_reason reason;
	int rc;

	switch (fp_parse_ipv6(skb, &ip)) {
	case FP_PARSE_IPV6:
		break;
	case FP_PARSE_INVALID:
		if (!fp_policy_enabled())
			return FP_TC_CONTINUE;
		return fp_finish6(skb, FP_DIR_TO_POD, FP_DROP_INVALID, TC_ACT_SHOT, &ip);
	default:
		return FP_TC_CONTINUE;
	}
	if (fp_ip6_is_linklocal(ip.daddr) || fp_ip6_is_multicast(ip.daddr) ||
	    fp_ip6_is_linklocal(ip.saddr) || fp_ip6_is_unspecified(ip.saddr) ||
	    fp_ip6_is_nd(skb, &ip))
		return FP_TC_CONTINUE;
	reason = fp_policy6_stage(skb, FP_DIR_TO_POD, &ip, 0);
	if (reason)
		return fp_finish_quiet6(skb, FP_DIR_TO_POD, reason, TC_ACT_SHOT);
	/* Bandwidth manager (lib/bw.h): the pod's ingress limits, one budget
	 * with its IPv4 */
	dst = fp_endpoint6_lookup(ip.daddr);
	if (dst && fp_bw_deliver6(skb, &ip, dst, &reason) < 0)
		return fp_finish6(skb, FP_DIR_TO_POD, reason, TC_ACT_SHOT, &ip);
	/* the VIP back, after policy judged the packet as it arrived (its
	 * later fragments are judged by the same addresses, then follow) */
	if (ip.frag == FP_IP6_LATER_FRAG) {
		rc = fp_ct6_frag_follow(skb, &ip);
	} else {
		first = fp_ct6_frag_begin(&ip);
		fp_parse_l4_6(skb, &ip, &l4);
		rc = fp_ct6_reverse(skb, &ip, &l4);
		if (rc > 0)
			fp_ct6_frag_end(first, &ip);
	}
	if (rc < 0)
		return fp_finish6(skb, FP_DIR_TO_POD, FP_DROP_CSUM, TC_ACT_SHOT, &ip);
	if (rc > 0)
		fp_count_family(skb->ifindex, FP_DIR_TO_POD,
				l4.kind == FP_L4_ICMP_ERR ? FP_FWD_RELATED : FP_FWD_REVNAT, skb->len,
				FP_FAM_IPV6);
	return FP_TC_CONTINUE;
}

int fp_to_pod6(struct __sk_buff *skb)
{
	__u32 prev = fp_whatif_enter(skb);
	int verdict = fp_to_pod6_run(skb);

	fp_whatif_exit(prev);
	return verdict;
}
