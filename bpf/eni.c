/* Programs on the node's interfaces to the VPC: the ENIs (eth1..ethN) and
 * the primary NIC (eth0), tc hooks.
 *
 * fp_from_vpc (tc ingress):
 *   - IPv4 claiming a local pod's address as its source is dropped as
 *     spoofed first (lib/guard.h);
 *   - IPv4 for a local endpoint passes the pod's ingress policy (when
 *     NetworkPolicy is on), gets its VIP back if it is a reply of a
 *     translated flow (or an ICMP error about one), and is redirected
 *     straight into the pod's netns; a fragment after the first follows
 *     its first one;
 *   - anything else is for the node: a reply of a flow this node SNATed
 *     (or an ICMP error about one) gets its client back and is routed to
 *     it; a new flow to a frontend (NodePort, external or load-balancer IP,
 *     hostPort, ClusterIP) is translated with this node's view of outside
 *     traffic (externalTrafficPolicy, Maglev, source ranges; SNAT to the
 *     node's address for a backend on another node) and sent to a local
 *     pod or out again by the FIB's device; a frontend without endpoints
 *     answers ICMP port unreachable out the interface the packet came in
 *     on; a new flow to a ClusterIP's unknown port is rejected, one to an
 *     unallocated Service CIDR address dropped;
 *   - the rest (the node's own traffic, ARP, ...) goes to the stack unchanged.
 * fp_to_vpc (tc egress): the node's own packets that socket-LB left
 * untranslated because kube-proxy would drop them (a frontend whose traffic
 * policy leaves this node nothing, a load-balancer IP the source may not
 * reach, an unallocated Service address) are dropped here, and counted;
 * everything else goes through. The node's own SCTP to a Service is
 * translated there (fp_to_vpc_node, IPv6 fp_to_vpc6_node: socket-LB
 * leaves SCTP sockets alone), and so are its TCP and UDP while socket-LB
 * is off (fp_node_pkt_lb).
 * fp_to_vpc also paces what limited pods send (lib/bw.h: an EDT timestamp
 * for fq, or the pod's HTB class).
 * fp_lo (tc egress of the node's lo): the node's SCTP to its own addresses,
 * translated as fp_to_vpc_node does (see its section at the end).
 */
#include "lib/fwd.h"
#include "lib/fwd6.h"
#include "lib/icmp.h"
#include "lib/policy.h"
#include "lib/event6.h"
#include "lib/guard.h"
#include "lib/bw.h"
#include "lib/ct6.h"
#include "lib/lo.h"

/* socket-LB off (the agent's socket_lb: false, FP_CFG_F_SOCKLB clear): no
 * connect() hook translates the node's TCP and UDP, so the node's
 * interfaces and lo do, per packet, as they always do its SCTP. The agent
 * sets the flag only while its cgroup programs are attached. */
static __always_inline int fp_node_pkt_lb(void)
{
	struct fp_config *cfg = fp_config_get();

	return cfg && !(cfg->flags & FP_CFG_F_SOCKLB);
}

struct fp_arrival {
	__u32 ifindex;         /* HBO: where it arrived */
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
};

static __always_inline int fp_vpc_done(struct __sk_buff *skb, enum fp_reason reason, int verdict,
				       const struct fp_ipv4 *ip, const struct fp_l4 *l4,
				       const struct fp_arrival *a, const struct fp_verdict *pv)
{
	/* a fresh ctx access: the verifier refuses a ctx field's address the
	 * compiler would otherwise keep in a register across the walk */
	barrier_var(skb);
	fp_count(a->ifindex, FP_DIR_FROM_VPC, reason, skb->len);
	fp_report(skb, FP_DIR_FROM_VPC, reason, ip, a->sport, l4->dport, a->saddr, a->daddr,
		  a->dport, pv);
	if (verdict != TC_ACT_REDIRECT)
		fp_test_record(0, FP_RD_NONE, 0, reason);
	return verdict;
}

/* Deliver a packet that now goes to `ip->daddr`: a local pod (after its
 * ingress policy), or out again where the FIB says. */
static __always_inline int fp_vpc_deliver(struct __sk_buff *skb, struct fp_ipv4 *ip,
					  struct fp_l4 *l4, enum fp_reason *reason,
					  struct fp_verdict *pv)
{
	struct fp_endpoint *dst = fp_endpoint_lookup(ip->daddr);

	barrier_var(skb);
	if (!dst)
		return fp_redirect_fib(skb, ip, FP_ANY_DEVICE, 0, reason);
	if (fp_policy_enabled() &&
	    fp_policy_judge(skb, FP_DIR_FROM_VPC, ip, l4, 0, pv) < 0) {
		*reason = FP_DROP_POLICY;
		return TC_ACT_SHOT;
	}
	return fp_redirect_local(skb, ip, dst, reason);
}

/* A packet for the node itself, not for one of its pods. */
static __always_inline int fp_from_vpc_node(struct __sk_buff *skb, struct fp_ipv4 *ip,
					    struct fp_arrival *a)
{
	struct fp_verdict pv = {};
	struct fp_l4 l4 = {};
	enum fp_reason reason = FP_FWD_STACK;
	int rc, verdict = FP_TC_CONTINUE, deliver = 0, record = 1;

	fp_parse_l4(skb, ip, &l4);
	a->sport = l4.sport;
	a->dport = l4.dport;
	if (l4.kind == FP_L4_LATER_FRAG) {
		rc = fp_ct_frag_follow(skb, ip, &l4, &reason);
		a->sport = l4.sport;
		a->dport = l4.dport;
		if (rc > 0)                     /* the node's own datagram */
			return fp_vpc_done(skb, FP_FWD_STACK, FP_TC_CONTINUE, ip, &l4, a, &pv);
		record = 0;
		if (rc < 0) {
			verdict = TC_ACT_SHOT;
			goto done;
		}
		deliver = 1;
		goto out;
	}

	/* the reply of a flow this node SNATed (its destination port is one
	 * SNAT hands out), or an error about one; nothing else can be */
	rc = 0;
	if (l4.kind == FP_L4_ICMP_ERR ||
	    (l4.kind == FP_L4_PORTS && bpf_ntohs(l4.dport) >= FP_SNAT_PORT_MIN) ||
	    /* or a reply to the node's own SCTP client (fp_to_vpc_node), on
	     * whatever port the node's stack gave it */
	    (l4.kind == FP_L4_PORTS && ip->proto == IPPROTO_SCTP) ||
	    /* ... and to its TCP and UDP clients while socket-LB is off */
	    (l4.kind == FP_L4_PORTS && fp_node_pkt_lb()))
		rc = fp_ct_reverse(skb, ip, &l4);
	if (rc < 0) {
		reason = FP_DROP_CSUM;
		verdict = TC_ACT_SHOT;
		goto done;
	}
	if (rc > 0) {
		fp_count(a->ifindex, FP_DIR_FROM_VPC,
			 l4.kind == FP_L4_ICMP_ERR ? FP_FWD_RELATED : FP_FWD_REVNAT, skb->len);
		/* the reply to the node's own association with one of its own
		 * addresses (fp_lo): only lo takes it (lib/lo.h) */
		if (fp_lo_self(ip)) {
			verdict = fp_lo_deliver(skb, &reason);
			goto done;
		}
		deliver = 1;
		goto out;
	}

	rc = fp_ct_service_from(skb, ip, &l4, &reason, 1);
	if (rc == 0) {
		fp_count(a->ifindex, FP_DIR_FROM_VPC, FP_FWD_SVC, skb->len);
		deliver = 1;
		goto out;
	}
	if (rc > 0) {
		/* no frontend: kube-proxy's checks of the Service CIDRs */
		reason = fp_svcnet_check(ip, &l4);
		if (!reason)                    /* the node's own traffic */
			return fp_vpc_done(skb, FP_FWD_STACK, FP_TC_CONTINUE, ip, &l4, a, &pv);
	}
	if (reason == FP_DROP_NO_BACKEND || reason == FP_DROP_SVC_UNKNOWN_PORT) {
		fp_ct_frag_record(ip, a->saddr, a->daddr, a->sport, a->dport, reason);
		fp_report(skb, FP_DIR_FROM_VPC, reason, ip, l4.sport, l4.dport, a->saddr,
			  ip->daddr, l4.dport, NULL);
		fp_count(a->ifindex, FP_DIR_FROM_VPC, reason, skb->len);
		barrier_var(skb);
		return fp_reject_icmp_dev(skb, ip, ICMP_PORT_UNREACH, reason, 0);
	}
	verdict = TC_ACT_SHOT;
	goto done;
out:
	if (deliver)
		verdict = fp_vpc_deliver(skb, ip, &l4, &reason, &pv);
done:
	if (record)
		fp_ct_frag_record(ip, a->saddr, a->daddr, a->sport, a->dport, reason);
	return fp_vpc_done(skb, reason, verdict, ip, &l4, a, &pv);
}

static __always_inline int fp_from_vpc_run(struct __sk_buff *skb)
{
	struct fp_ipv4 ip = {};
	struct fp_arrival a = {};
	struct fp_endpoint *dst;
	struct fp_verdict pv = {};
	struct fp_l4 l4 = {};
	enum fp_reason reason = FP_FWD_STACK;
	int verdict = FP_TC_CONTINUE, rc;

	if (fp_guard_from_vpc(skb, &reason)) {
		fp_count(skb->ifindex, FP_DIR_FROM_VPC, reason, skb->len);
		fp_test_record(0, FP_RD_NONE, 0, reason);
		return TC_ACT_SHOT;
	}
	barrier_var(skb);

	a.ifindex = skb->ifindex;
	switch (fp_parse_ipv4(skb, &ip)) {
	case FP_PARSE_OTHER:
		/* IPv6 has its own program (fp_from_vpc6) */
		if (fp_guard_ethertype(skb) == bpf_htons(ETH_P_IPV6))
			return FP_TAIL_IPV6;
		return FP_TC_CONTINUE;
	case FP_PARSE_INVALID:
		return fp_vpc_done(skb, FP_DROP_INVALID, TC_ACT_SHOT, &ip, &l4, &a, &pv);
	}

	/* the redirect may restore a VIP as source: report the arrival */
	a.saddr = ip.saddr;
	a.daddr = ip.daddr;
	dst = fp_endpoint_lookup(ip.daddr);
	if (!dst)
		return fp_from_vpc_node(skb, &ip, &a);
	fp_parse_l4(skb, &ip, &l4);
	a.sport = l4.sport;
	a.dport = l4.dport;
	if (l4.kind == FP_L4_LATER_FRAG) {
		rc = fp_ct_frag_follow(skb, &ip, &l4, &reason);
		a.sport = l4.sport;
		a.dport = l4.dport;
		if (rc < 0 || (rc > 0 && fp_policy_enabled())) {
			if (rc > 0)
				reason = FP_DROP_FRAG_NO_FIRST;
			return fp_vpc_done(skb, reason, TC_ACT_SHOT, &ip, &l4, &a, &pv);
		}
		verdict = fp_redirect_local(skb, &ip, dst, &reason);
		return fp_vpc_done(skb, reason, verdict, &ip, &l4, &a, &pv);
	}
	if (fp_policy_enabled() &&
	    fp_policy_judge(skb, FP_DIR_FROM_VPC, &ip, &l4, 0, &pv) < 0) {
		reason = FP_DROP_POLICY;
		verdict = TC_ACT_SHOT;
		goto done;
	}
	/* a new connection straight to the pod may reuse the tuple a flow
	 * through a NodePort had: that flow's reply entry must not turn this
	 * one's SYN-ACK into one from the NodePort */
	fp_ct_forget_reply(&ip, &l4);
	if (fp_ct_reverse(skb, &ip, &l4) < 0) {
		reason = FP_DROP_CSUM;
		verdict = TC_ACT_SHOT;
		goto done;
	}
	verdict = fp_redirect_local(skb, &ip, dst, &reason);
done:
	fp_ct_frag_record(&ip, a.saddr, a.daddr, a.sport, a.dport, reason);
	return fp_vpc_done(skb, reason, verdict, &ip, &l4, &a, &pv);
}

int fp_from_vpc(struct __sk_buff *skb)
{
	__u32 prev = fp_whatif_enter(skb);
	int verdict = fp_from_vpc_run(skb);

	fp_whatif_exit(prev);
	if (verdict == FP_TAIL_IPV6)
		verdict = fp_tail_call(skb, FP_TAIL_FROM_VPC6, FP_DIR_FROM_VPC);
	return verdict;
}

/* ---- IPv6 (docs/ipv6.md) ----
 *
 * fp_from_vpc6 (reached from fp_from_vpc by FP_TAIL_FROM_VPC6):
 *   - a local pod's IPv6 address as source is dropped as spoofed (the
 *     IPv6 half of lib/guard.h's fp_guard_from_vpc);
 *   - malformed IPv6 is dropped as invalid;
 *   - neighbour discovery, link-local and multicast go to the stack;
 *   - IPv6 for a local endpoint passes the pod's ingress policy (when
 *     NetworkPolicy is on; a later fragment follows its first one,
 *     lib/policy6.h), then gets its VIP back if it is a remote backend's
 *     reply of a translated flow, an ICMPv6 error about one, or a later
 *     fragment of either (lib/ct6.h), and is redirected straight into the
 *     pod's netns; anything else is the node's (fp_from_vpc6_node above:
 *     IPv6 Services from outside, SNAT replies), else the stack;
 *   - the pod's ingress limits apply before delivery, one budget with its
 *     IPv4 (lib/bw.h, in pod.c fp_deliver_local6). */
/* IPv6 for the node itself, not for one of its pods (fp_from_vpc_node's
 * twin): a reply of a flow this node SNATed, or an ICMPv6 error about
 * one, gets its client back and is routed to it; a new flow to an IPv6 frontend (NodePort, external or
 * load-balancer IP, ClusterIP) is translated with this node's view of
 * outside traffic (externalTrafficPolicy, source ranges; SNAT to the
 * node's primary IPv6 address for a backend on another node) and sent to
 * a local pod (after its ingress policy) or out again by the FIB's
 * device; a frontend without endpoints answers ICMPv6 port unreachable
 * out of the interface the packet came in on; a ClusterIP's unknown port
 * is rejected, an unallocated Service CIDR address dropped; anything else
 * is the node's own traffic: the stack.
 * `sctp` (a constant) compiles one half: 0 everything but SCTP
 * (fp_vpc6_node: TCP, UDP, ICMPv6 errors, later fragments), 1 SCTP that
 * is no later fragment (fp_vpc6_sctp), whose CRC updates the other half's
 * verifier budget has no room for. */
static __always_inline int fp_from_vpc6_node(struct __sk_buff *skb, struct fp_ipv6 *ip, int sctp)
{
	struct fp_frag6_work *first;
	struct fp_endpoint *dst;
	struct fp_l4 l4 = {};
	enum fp_reason reason = FP_FWD_STACK, counted;
	__be16 osport, odport;
	int rc, verdict;

	if (!sctp && ip->frag == FP_IP6_LATER_FRAG) {
		rc = fp_ct6_frag_follow(skb, ip);
		if (rc < 0)
			return fp_finish6(skb, FP_DIR_FROM_VPC, FP_DROP_CSUM, TC_ACT_SHOT, ip);
		if (rc == 0)                    /* the node's own datagram */
			return fp_finish6(skb, FP_DIR_FROM_VPC, FP_FWD_STACK, FP_TC_CONTINUE, ip);
		goto deliver;
	}
	first = fp_ct6_frag_begin(ip);
	fp_parse_l4_6(skb, ip, &l4);
	/* SCTP: the CRC is fixed once, after the translation (fp_sctp6_crc_ports) */
	osport = l4.sport;
	odport = l4.dport;
	/* the reply of a flow this node SNATed (its destination port is one
	 * SNAT hands out), or an ICMPv6 error about one */
	if ((!sctp && l4.kind == FP_L4_ICMP_ERR) ||
	    (l4.kind == FP_L4_PORTS && bpf_ntohs(l4.dport) >= FP_SNAT_PORT_MIN) ||
	    /* SCTP: also a reply to the node's own client (fp_to_vpc6_node) */
	    (sctp && l4.kind == FP_L4_PORTS) ||
	    /* ... and TCP and UDP while socket-LB is off */
	    (!sctp && l4.kind == FP_L4_PORTS && fp_node_pkt_lb())) {
		rc = fp_ct6_reverse_any(skb, ip, &l4, sctp ? FP_NAT6_SCTP_ONLY : FP_NAT6_NO_SCTP);
		if (rc < 0)
			return fp_finish6(skb, FP_DIR_FROM_VPC, FP_DROP_CSUM, TC_ACT_SHOT, ip);
		if (rc > 0) {
			counted = l4.kind == FP_L4_ICMP_ERR ? FP_FWD_RELATED : FP_FWD_REVNAT;
			goto translated;
		}
	}
	rc = fp_ct6_service_from(skb, ip, &l4, &reason,
				 sctp ? FP_CT6_OUTSIDE_SCTP : FP_CT6_OUTSIDE);
	if (rc == 0) {
		counted = FP_FWD_SVC;
		goto translated;
	}
	if (rc > 0) {
		/* no frontend: kube-proxy's checks of the Service CIDRs */
		reason = fp_svcnet6_check(ip, &l4);
		if (!reason)                    /* the node's own traffic */
			return fp_finish6(skb, FP_DIR_FROM_VPC, FP_FWD_STACK, FP_TC_CONTINUE, ip);
	}
	if (reason == FP_DROP_NO_BACKEND || reason == FP_DROP_SVC_UNKNOWN_PORT) {
		fp_report6(skb, FP_DIR_FROM_VPC, reason, ip);
		barrier_var(skb);
		fp_count_family(skb->ifindex, FP_DIR_FROM_VPC, reason, skb->len, FP_FAM_IPV6);
		return fp_reject_icmp6_dev(skb, ip, FP_ICMP6_PORT_UNREACH, reason, 1);
	}
	return fp_finish6(skb, FP_DIR_FROM_VPC, reason, TC_ACT_SHOT, ip);
translated:
	/* one call site: the CRC arithmetic is walked once */
	if (sctp && fp_sctp6_crc_ports(skb, ip, &l4, osport, odport))
		return fp_finish6(skb, FP_DIR_FROM_VPC, FP_DROP_CSUM, TC_ACT_SHOT, ip);
	fp_count_family(skb->ifindex, FP_DIR_FROM_VPC, counted, skb->len, FP_FAM_IPV6);
	fp_ct6_frag_end(first, ip);
deliver:
	dst = fp_endpoint6_lookup(ip->daddr);
	if (!dst) {
		verdict = fp_redirect_fib6(skb, ip, FP_ANY_DEVICE, &reason);
		return fp_finish6(skb, FP_DIR_FROM_VPC, reason, verdict, ip);
	}
	reason = fp_policy6_stage(skb, FP_DIR_FROM_VPC, ip, 0);
	if (reason)
		return fp_finish_quiet6(skb, FP_DIR_FROM_VPC, reason, TC_ACT_SHOT);
	return fp_deliver_local6(skb, FP_DIR_FROM_VPC, ip, dst);
}

static __always_inline int fp_from_vpc6_run(struct __sk_buff *skb)
{
	struct fp_ipv6 ip = {};
	struct fp_endpoint *dst;
	enum fp_reason reason;

	switch (fp_parse_ipv6(skb, &ip)) {
	case FP_PARSE_IPV6:
		break;
	case FP_PARSE_INVALID:
		return fp_finish6(skb, FP_DIR_FROM_VPC, FP_DROP_INVALID, TC_ACT_SHOT, &ip);
	default:
		return FP_TC_CONTINUE;
	}
	if (fp_endpoint6_lookup(ip.saddr))
		return fp_finish6(skb, FP_DIR_FROM_VPC, FP_DROP_SPOOFED, TC_ACT_SHOT, &ip);
	if (fp_ip6_is_linklocal(ip.daddr) || fp_ip6_is_multicast(ip.daddr) ||
	    fp_ip6_is_nd(skb, &ip))
		return FP_TC_CONTINUE;
	dst = fp_endpoint6_lookup(ip.daddr);
	if (!dst)                       /* the node's: fp_vpc6_node, SCTP fp_vpc6_sctp */
		return ip.proto == IPPROTO_SCTP && ip.frag != FP_IP6_LATER_FRAG ? FP_TAIL_SCTP6
										: FP_TAIL_ROUTE;
	reason = fp_policy6_stage(skb, FP_DIR_FROM_VPC, &ip, 0);
	if (reason)
		return fp_finish_quiet6(skb, FP_DIR_FROM_VPC, reason, TC_ACT_SHOT);
	/* a remote backend's reply to a local client (or an ICMPv6
	 * error about the client's packet, or a later fragment of either) gets
	 * its VIP back */
	if (ip.frag == FP_IP6_LATER_FRAG) {
		if (fp_ct6_frag_follow(skb, &ip) < 0)
			return fp_finish6(skb, FP_DIR_FROM_VPC, FP_DROP_CSUM, TC_ACT_SHOT, &ip);
	} else {
		struct fp_frag6_work *first = fp_ct6_frag_begin(&ip);
		struct fp_l4 l4 = {};

		fp_parse_l4_6(skb, &ip, &l4);
		if (fp_ct6_reverse(skb, &ip, &l4) < 0)
			return fp_finish6(skb, FP_DIR_FROM_VPC, FP_DROP_CSUM, TC_ACT_SHOT, &ip);
		fp_ct6_frag_end(first, &ip);
	}
	return fp_deliver_local6(skb, FP_DIR_FROM_VPC, &ip, dst);
}

int fp_from_vpc6(struct __sk_buff *skb)
{
	__u32 prev = fp_whatif_enter(skb);
	int verdict = fp_from_vpc6_run(skb);

	fp_whatif_exit(prev);
	if (verdict == FP_TAIL_ROUTE)
		verdict = fp_tail_call(skb, FP_TAIL_FROM_VPC6_NODE, FP_DIR_FROM_VPC);
	else if (verdict == FP_TAIL_SCTP6)
		verdict = fp_tail_call(skb, FP_TAIL_FROM_VPC6_SCTP, FP_DIR_FROM_VPC);
	return verdict;
}

/* fp_from_vpc6's IPv6 for the node (slot FP_TAIL_FROM_VPC6_NODE): parsed
 * again, then fp_from_vpc6_node. */
static __always_inline int fp_vpc6_node_run(struct __sk_buff *skb)
{
	struct fp_ipv6 ip = {};

	barrier_var(skb);
	if (fp_parse_ipv6(skb, &ip) != FP_PARSE_IPV6)
		return fp_finish6(skb, FP_DIR_FROM_VPC, FP_DROP_INVALID, TC_ACT_SHOT, &ip);
	return fp_from_vpc6_node(skb, &ip, 0);
}

int fp_vpc6_node(struct __sk_buff *skb)
{
	__u32 prev = fp_whatif_enter(skb);
	int verdict = fp_vpc6_node_run(skb);

	fp_whatif_exit(prev);
	return verdict;
}

/* fp_from_vpc6's SCTP for the node (slot FP_TAIL_FROM_VPC6_SCTP): parsed
 * again, then fp_from_vpc6_node's SCTP half. fp_from_vpc6 sends nothing
 * else here; anything else would be walked by no translation, so it is
 * dropped rather than left to the stack half-judged. */
static __always_inline int fp_vpc6_sctp_run(struct __sk_buff *skb)
{
	struct fp_ipv6 ip = {};

	barrier_var(skb);
	if (fp_parse_ipv6(skb, &ip) != FP_PARSE_IPV6 || ip.proto != IPPROTO_SCTP ||
	    ip.frag == FP_IP6_LATER_FRAG)
		return fp_finish6(skb, FP_DIR_FROM_VPC, FP_DROP_INVALID, TC_ACT_SHOT, &ip);
	return fp_from_vpc6_node(skb, &ip, 1);
}

int fp_vpc6_sctp(struct __sk_buff *skb)
{
	__u32 prev = fp_whatif_enter(skb);
	int verdict = fp_vpc6_sctp_run(skb);

	fp_whatif_exit(prev);
	return verdict;
}

/* fp_to_vpc_node's IPv6 twin: the node's own SCTP to an IPv6 frontend,
 * translated with socket-LB's view for the node (the inside entry, source
 * ranges by the packet's source, no SNAT); replies get the frontend back in
 * fp_from_pod6 / fp_pod6_route (a local backend) or fp_vpc6_sctp (a remote
 * one). Returns 1 when the destination is no frontend, else the verdict.
 * `q`: fp_lo's, the packet as the node sent it (lib/lo.h fp_lo6_quote),
 * as in fp_to_vpc_node; NULL on the node's interfaces. */
static __always_inline int fp_to_vpc6_node(struct __sk_buff *skb, struct fp_ipv6 *ip,
					   struct fp_l4 *l4, struct fp_icmp6_work *q, int frags)
{
	struct fp_frag6_work *first;
	struct fp_endpoint *dst;
	struct bpf_fib_lookup fib = {};
	enum fp_reason reason = FP_FWD_SVC;
	int rc, verdict;

	/* `frags` (a constant; the node's interfaces, not lo, which leaves
	 * fragments alone): a later fragment takes the addresses its first
	 * one left with (lib/ct6.h), the first one's decision recorded */
	if (frags && ip->frag == FP_IP6_LATER_FRAG) {
		rc = fp_ct6_frag_follow(skb, ip);
		if (rc < 0)
			return fp_finish6(skb, FP_DIR_TO_VPC, FP_DROP_CSUM, TC_ACT_SHOT, ip);
		if (rc == 0)
			return 1;
		rc = 0;
	} else {
		first = frags ? fp_ct6_frag_begin(ip) : NULL;
		rc = fp_ct6_service_from(skb, ip, l4, &reason, FP_CT6_FROM_NODE);
		if (rc > 0)
			return 1;
		if (frags && rc == 0)
			fp_ct6_frag_end(first, ip);
	}
	barrier_var(skb);
	if (rc < 0) {
		if (reason != FP_DROP_NO_BACKEND)
			return fp_finish6(skb, FP_DIR_TO_VPC, reason, TC_ACT_SHOT, ip);
		/* no endpoint anywhere: ICMPv6 port unreachable into the node's
		 * own stack, as for IPv4 */
		fp_report6(skb, FP_DIR_TO_VPC, reason, ip);
		barrier_var(skb);
		fp_count_family(skb->ifindex, FP_DIR_TO_VPC, reason, skb->len, FP_FAM_IPV6);
		return fp_reject_icmp6_dev(skb, ip, FP_ICMP6_PORT_UNREACH, reason,
					   FP_ICMP_TO_STACK);
	}
	fp_count_family(skb->ifindex, FP_DIR_TO_VPC, FP_FWD_SVC, skb->len, FP_FAM_IPV6);
	/* a backend at the node's own address (a host-network pod): back into
	 * the node's stack through lo, as for IPv4 (lib/lo.h). IPv6 input
	 * would take it on any device, but the FIB has no way out for a local
	 * address, and on an interface's egress it would leave the node. */
	if (fp_lo6_self(ip))
		return fp_lo_deliver(skb, &reason);
	dst = fp_endpoint6_lookup(ip->daddr);
	if (dst) {
		__u8 pod_mac[ETH_ALEN], host_mac[ETH_ALEN];

		if (q && fp_lo6_too_big(skb, dst->host_ifindex, q, ip, &verdict))
			return verdict;
		__builtin_memcpy(pod_mac, dst->pod_mac, ETH_ALEN);
		__builtin_memcpy(host_mac, dst->host_mac, ETH_ALEN);
		if (fp_set_macs(skb, pod_mac, host_mac))
			return fp_finish6(skb, FP_DIR_TO_VPC, FP_DROP_INVALID, TC_ACT_SHOT, ip);
		fp_test_record(dst->host_ifindex, FP_RD_PLAIN, 0, FP_FWD_LOCAL);
		return bpf_redirect(dst->host_ifindex, 0);
	}
	fib.family = AF_INET6;
	fib.flowinfo = ip->flowinfo & bpf_htonl(0x0FFFFFFF);
	fib.l4_protocol = ip->proto;
	__builtin_memcpy(fib.ipv6_src, ip->saddr, 16);
	__builtin_memcpy(fib.ipv6_dst, ip->daddr, 16);
	fib.ifindex = skb->ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	/* (FRAG_NEEDED as in fp_to_vpc_node) */
	if (q && (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH ||
		  rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) &&
	    fib.ifindex != skb->ifindex && fp_lo6_too_big(skb, fib.ifindex, q, ip, &verdict))
		return verdict;
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (fp_set_macs(skb, fib.dmac, fib.smac))
			return fp_finish6(skb, FP_DIR_TO_VPC, FP_DROP_INVALID, TC_ACT_SHOT, ip);
		if (fib.ifindex == skb->ifindex) {
			fp_test_record(0, FP_RD_NONE, 0, FP_FWD_SVC);
			return FP_TC_CONTINUE;
		}
		fp_test_record(fib.ifindex, FP_RD_PLAIN, 0, FP_FWD_ENI);
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		struct bpf_redir_neigh nh = {};

		nh.nh_family = AF_INET6;
		__builtin_memcpy(nh.ipv6_nh, fib.ipv6_dst, 16);
		fp_test_record(fib.ifindex, FP_RD_NEIGH, 0, FP_FWD_ENI);
		return fp_bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
	}
	fp_test_record(0, FP_RD_NONE, 0, FP_FWD_FIB_MISS);
	return FP_TC_CONTINUE;
}

/* The node's own new IPv6 flows that kube-proxy would drop, as
 * below for IPv4: socket-LB left them untranslated (a frontend whose
 * traffic policy leaves this node nothing, an IPv6 load-balancer IP whose
 * source ranges the socket's source is outside of), or they go to an
 * unallocated IPv6 Service address or a live IPv6 ClusterIP's unknown
 * port. */
static __always_inline int fp_to_vpc6_run(struct __sk_buff *skb)
{
	struct fp_ipv6 ip = {};
	struct fp_l4 l4 = {};
	struct fp_svc4 *svc;
	int reason = 0, looked = 0;

	/* fresh ctx accesses: the IPv4 parse's registers are not reused */
	barrier_var(skb);
	if (fp_parse_ipv6(skb, &ip) != FP_PARSE_IPV6)
		return FP_TC_CONTINUE;
	fp_parse_l4_6(skb, &ip, &l4);
	/* TCP and UDP only while socket-LB is off, as for IPv4, a later
	 * fragment following its first one */
	if ((l4.kind == FP_L4_PORTS || ip.frag == FP_IP6_LATER_FRAG) &&
	    (ip.proto == IPPROTO_SCTP || fp_node_pkt_lb())) {
		int rc = fp_to_vpc6_node(skb, &ip, &l4, NULL, 1);

		if (rc != 1)
			return rc;
		looked = 1;
	}
	if (!l4.opening)
		return FP_TC_CONTINUE;
	svc = l4.kind == FP_L4_PORTS && !looked
		      ? fp_service6_lookup(ip.daddr, l4.dport, ip.proto) : NULL;
	if (svc) {
		if (svc->flags & FP_SVC_F_DROP)
			reason = FP_DROP_NO_LOCAL_BACKEND;
		else if ((svc->flags & FP_SVC_F_SRC_RANGE) &&
			 !fp_src_range6_ok(svc->svc_id, ip.saddr))
			reason = FP_DROP_SOURCE_RANGE;
	} else {
		reason = fp_svcnet6_check(&ip, &l4);
	}
	if (!reason)
		return FP_TC_CONTINUE;
	return fp_finish6(skb, FP_DIR_TO_VPC, reason, TC_ACT_SHOT, &ip);
}

/* ---- the node's own SCTP (and, socket-LB off, TCP and UDP) to Services,
 * per packet ----
 *
 * Socket-LB leaves SCTP sockets alone (sock.c), so a node process's SCTP
 * association to a ClusterIP, external or load-balancer IP leaves with the
 * frontend as destination; kube-proxy's OUTPUT chain would DNAT it, and
 * this does here, on the way out of the interface the node's route picked.
 * With socket-LB off the node's TCP connections and UDP datagrams leave
 * the same way and get the same walk (fp_node_pkt_lb).
 * The view is socket-LB's for the node's sockets (the frontend's internal
 * entry: traffic policies as for a client inside the cluster, source
 * ranges by the packet's source, no SNAT): only an opening packet (an
 * INIT, a SYN, any UDP datagram) picks a backend;
 * conntrack (lib/ct.h) keeps the association on it, and its reply entry
 * restores the frontend in fp_from_pod (a local backend) or
 * fp_from_vpc_node (a remote one). Returns 1 when the destination is no
 * frontend (the caller goes on), else the tc verdict. `q`: fp_lo's, the
 * packet as the node sent it, for the path MTU check (lib/lo.h); NULL on
 * the node's interfaces, whose MTU the stack already sized the packet by. */
static __always_inline int fp_to_vpc_node(struct __sk_buff *skb, struct fp_ipv4 *ip,
					  struct fp_l4 *l4, const struct fp_lo_quote *q)
{
	struct fp_endpoint *dst;
	enum fp_reason reason = FP_FWD_SVC;
	__be32 saddr = ip->saddr, daddr = ip->daddr;
	__be16 dport = l4->dport;
	int rc, verdict;

	if (!q && l4->kind == FP_L4_LATER_FRAG) {
		/* (the node's interfaces only: lo leaves fragments alone) a
		 * later fragment of a datagram whose first one was decided here
		 * takes its addresses, or its drop */
		rc = fp_ct_frag_follow(skb, ip, l4, &reason);
		if (rc > 0)
			return 1;
		dport = l4->dport;
	} else {
		rc = fp_ct_service_from(skb, ip, l4, &reason, FP_CT_FROM_NODE);
		if (rc > 0)
			return 1;
		if (!q)
			fp_ct_frag_record(ip, saddr, daddr, l4->sport, dport, reason);
	}
	barrier_var(skb);
	fp_count(skb->ifindex, FP_DIR_TO_VPC, rc == 0 ? FP_FWD_SVC : reason, skb->len);
	if (rc < 0) {
		fp_report(skb, FP_DIR_TO_VPC, reason, ip, l4->sport, dport, saddr, daddr, dport,
			  NULL);
		/* no endpoint anywhere: the error goes into the node's own stack,
		 * which ends the association as under kube-proxy's reject (once,
		 * for the first fragment) */
		if (reason == FP_DROP_NO_BACKEND && l4->kind != FP_L4_LATER_FRAG)
			return fp_reject_icmp_dev(skb, ip, ICMP_PORT_UNREACH, reason,
						  FP_ICMP_TO_STACK);
		fp_test_record(0, FP_RD_NONE, 0, reason);
		return TC_ACT_SHOT;
	}
	/* a backend at the node's own address (a host-network pod): back into
	 * the node's stack, through lo (lib/lo.h) */
	if (fp_lo_self(ip))
		return fp_lo_deliver(skb, &reason);
	/* a local backend: into its veth, whose egress program (fp_to_pod)
	 * judges it as anything else the node sends the pod
	 * (bpf_redirect_peer works from an ingress hook only) */
	dst = fp_endpoint_lookup(ip->daddr);
	if (dst) {
		__u8 pod_mac[ETH_ALEN], host_mac[ETH_ALEN];

		if (q && fp_lo_too_big(skb, dst->host_ifindex, q, ip, l4, daddr, dport, &verdict))
			return verdict;
		__builtin_memcpy(pod_mac, dst->pod_mac, ETH_ALEN);
		__builtin_memcpy(host_mac, dst->host_mac, ETH_ALEN);
		if (fp_set_macs(skb, pod_mac, host_mac))
			goto invalid;
		fp_test_record(dst->host_ifindex, FP_RD_PLAIN, 0, FP_FWD_LOCAL);
		return bpf_redirect(dst->host_ifindex, 0);
	}
	{
		/* (a scope of its own: its stack is the fragments' record's,
		 * BPF's 512 bytes) */
		struct bpf_fib_lookup fib = {};

		/* elsewhere: by the neighbour (and interface) the FIB names for the
		 * backend, which need not be the frontend's; the node's own packet
		 * keeps its TTL. No route: the stack's choice stands. */
		fib.family = AF_INET;
		fib.tos = ip->tos;
		fib.l4_protocol = ip->proto;
		/* no length: the node's stack sized the packet (a GSO one too, whose
		 * total length is not what the link carries) */
		fib.tot_len = 0;
		fib.ipv4_src = ip->saddr;
		fib.ipv4_dst = ip->daddr;
		fib.ifindex = skb->ifindex;
		rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
		/* (a packet longer than the device's MTU makes the lookup answer
		 * FRAG_NEEDED, the device named) */
		if (q && (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH ||
			  rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) &&
		    fib.ifindex != skb->ifindex &&
		    fp_lo_too_big(skb, fib.ifindex, q, ip, l4, daddr, dport, &verdict))
			return verdict;
		if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
			if (fp_set_macs(skb, fib.dmac, fib.smac))
				goto invalid;
			if (fib.ifindex == skb->ifindex) {
				fp_test_record(0, FP_RD_NONE, fib.ipv4_dst, FP_FWD_SVC);
				return FP_TC_CONTINUE;
			}
			fp_test_record(fib.ifindex, FP_RD_PLAIN, fib.ipv4_dst, FP_FWD_ENI);
			return bpf_redirect(fib.ifindex, 0);
		}
		if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
			struct bpf_redir_neigh nh = {};

			nh.nh_family = AF_INET;
			nh.ipv4_nh = fib.ipv4_dst;
			fp_test_record(fib.ifindex, FP_RD_NEIGH, fib.ipv4_dst, FP_FWD_ENI);
			return fp_bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
		}
		fp_test_record(0, FP_RD_NONE, 0, FP_FWD_FIB_MISS);
		return FP_TC_CONTINUE;
	}
invalid:
	fp_count(skb->ifindex, FP_DIR_TO_VPC, FP_DROP_INVALID, skb->len);
	fp_test_record(0, FP_RD_NONE, 0, FP_DROP_INVALID);
	return TC_ACT_SHOT;
}

/* The node's own new flows that kube-proxy would drop (see the top). */
static __always_inline int fp_to_vpc_run(struct __sk_buff *skb)
{
	struct fp_ipv4 ip = {};
	struct fp_l4 l4 = {};
	struct fp_svc4 *svc;
	int reason = 0, looked = 0;

	if (fp_parse_ipv4(skb, &ip) != FP_PARSE_IPV4) {
		barrier_var(skb);
		if (fp_guard_ethertype(skb) == bpf_htons(ETH_P_IPV6))
			return fp_to_vpc6_run(skb);
		return FP_TC_CONTINUE;
	}
	fp_parse_l4(skb, &ip, &l4);
	/* TCP and UDP only while socket-LB is off (with it on, the sockets
	 * did it, and pods' packets redirected here pay no lookup); a later
	 * fragment follows its first one */
	if ((l4.kind == FP_L4_PORTS || l4.kind == FP_L4_LATER_FRAG) &&
	    (ip.proto == IPPROTO_SCTP || fp_node_pkt_lb())) {
		int rc = fp_to_vpc_node(skb, &ip, &l4, NULL);

		if (rc != 1)
			return rc;
		looked = 1;             /* no frontend: not asked again below */
	}
	if (!l4.opening)
		return FP_TC_CONTINUE;
	svc = l4.kind == FP_L4_PORTS && !looked ? fp_service_lookup(ip.daddr, l4.dport, ip.proto)
						: NULL;
	if (svc) {
		if (svc->flags & FP_SVC_F_DROP)
			reason = FP_DROP_NO_LOCAL_BACKEND;
		else if ((svc->flags & FP_SVC_F_SRC_RANGE) &&
			 !fp_src_range_ok(svc->svc_id, ip.saddr))
			reason = FP_DROP_SOURCE_RANGE;
	} else {
		reason = fp_svcnet_check(&ip, &l4);
	}
	if (!reason)
		return FP_TC_CONTINUE;
	fp_count(skb->ifindex, FP_DIR_TO_VPC, reason, skb->len);
	fp_report(skb, FP_DIR_TO_VPC, reason, &ip, l4.sport, l4.dport, ip.saddr, ip.daddr,
		  l4.dport, NULL);
	fp_test_record(0, FP_RD_NONE, 0, reason);
	return TC_ACT_SHOT;
}

int fp_to_vpc(struct __sk_buff *skb)
{
	__u32 prev = fp_whatif_enter(skb);
	int verdict = fp_to_vpc_run(skb);
	enum fp_reason reason;

	/* Bandwidth manager (lib/bw.h): pace the pod that sends. */
	if (verdict == FP_TC_CONTINUE && fp_bw_to_vpc(skb, &reason) < 0) {
		int six = fp_guard_ethertype(skb) == bpf_htons(ETH_P_IPV6);

		fp_count_family(skb->ifindex, FP_DIR_TO_VPC, reason, skb->len,
				six ? FP_FAM_IPV6 : FP_FAM_IPV4);
		verdict = TC_ACT_SHOT;
	}
	fp_whatif_exit(prev);
	return verdict;
}

/* ---- the node's SCTP to itself (tc egress of lo) ----
 *
 * A node process's association to one of the node's own addresses (a
 * NodePort, a hostPort, an external or load-balancer IP the node holds)
 * never reaches an interface: it goes out of lo and straight back in. Here
 * it gets fp_to_vpc_node's translation (socket-LB's view for the node):
 * a backend pod of this node by its veth, a remote one by the FIB's way
 * out, one at the node's own address back in through lo, none at all an
 * ICMP port unreachable into the node's stack. A reply that passes here (a
 * backend at the node's own address answering) gets its frontend back; the
 * replies of pods and remote backends get it in fp_from_pod / fp_pod_route
 * and fp_from_vpc, which hand them to lo's ingress (lib/lo.h).
 * lo carries everything the node says to itself: anything but SCTP (and,
 * socket-LB off, TCP and UDP, which connect() then leaves to this walk;
 * IPv6: or an extension header first) is let through after two loads and
 * a few compares. */
#ifdef FP_TEST
/* test builds take TCP the same way, both families, socket-LB on or off:
 * this kernel has no SCTP, and the vm-tests (vm-tests/test_node_self.py,
 * test_node_self6.py) prove the delivery of the replies into the node's
 * own socket and the path MTU answer with real TCP through these very
 * programs */
#define FP_LO_PROTO(p) ((p) == IPPROTO_SCTP || (p) == IPPROTO_TCP || \
			((p) == IPPROTO_UDP && fp_node_pkt_lb()))
#else
/* TCP and UDP too while socket-LB is off (fp_node_pkt_lb); with it on,
 * they cost lo one config lookup more than other protocols */
#define FP_LO_PROTO(p) ((p) == IPPROTO_SCTP || \
			(((p) == IPPROTO_TCP || (p) == IPPROTO_UDP) && fp_node_pkt_lb()))
#endif
/* IPv6: the node's SCTP may follow extension headers (a socket's sticky
 * hop-by-hop or destination options), which fp_lo6_run walks as the
 * node's interfaces do. A fragment header first is let through: a
 * fragment is not translated (fp_lo6_run). */
#define FP_LO6_FIRST(nh) (FP_LO_PROTO(nh) || (nh) == FP_NH_HOP || (nh) == FP_NH_DSTOPTS)

/* fp_lo's outcome of its reply lookup `rc` (the fp_ct*_reverse result):
 * 0 when nothing was restored (the caller goes on), else 1 with *verdict:
 * a reply that got its frontend back goes on up lo, one whose checksum
 * could not be fixed is dropped. Counted and recorded either way. */
static __always_inline int fp_lo_restored(struct __sk_buff *skb, int rc, __u8 family,
					  int *verdict)
{
	if (rc < 0) {
		fp_count_family(skb->ifindex, FP_DIR_TO_VPC, FP_DROP_CSUM, skb->len, family);
		fp_test_record(0, FP_RD_NONE, 0, FP_DROP_CSUM);
		*verdict = TC_ACT_SHOT;
		return 1;
	}
	if (rc > 0) {
		fp_count_family(skb->ifindex, FP_DIR_TO_VPC, FP_FWD_REVNAT, skb->len, family);
		fp_test_record(0, FP_RD_NONE, 0, FP_FWD_REVNAT);
		*verdict = FP_TC_CONTINUE;
		return 1;
	}
	return 0;
}

/* fp_lo's IPv6: the node's SCTP to an IPv6 address it holds, translated as
 * fp_to_vpc6_node does. The replies of pods and remote backends need no
 * turn through lo: the node's IPv6 input takes a packet from its own
 * address on any device, so the restored reply goes to the stack where it
 * arrives (fp_from_pod6, fp_vpc6_sctp). A backend at the node's own
 * address answers by lo: its reply gets the frontend back here first, as
 * in fp_lo_run. */
static __always_inline int fp_lo6_run(struct __sk_buff *skb)
{
	struct fp_ipv6 ip = {};
	struct fp_l4 l4 = {};
	__be16 osport, odport;
	int rc, verdict;

	barrier_var(skb);
	/* (a fragment is not translated: its CRC covers bytes it lacks) */
	if (fp_parse_ipv6(skb, &ip) != FP_PARSE_IPV6 || ip.frag != FP_IP6_NOT_FRAG)
		return FP_TC_CONTINUE;
	fp_parse_l4_6(skb, &ip, &l4);
	if (!FP_LO_PROTO(ip.proto) || l4.kind != FP_L4_PORTS)
		return FP_TC_CONTINUE;
	osport = l4.sport;
	odport = l4.dport;
	/* (only a backend at the node's own address answers by lo) SCTP:
	 * its CRC fixed once after; TCP and UDP: no SCTP walk */
	if (ip.proto == IPPROTO_SCTP) {
		rc = fp_ct6_reverse_any(skb, &ip, &l4, FP_NAT6_SCTP_ONLY);
		if (rc > 0 && fp_sctp6_crc_ports(skb, &ip, &l4, osport, odport))
			rc = -1;
	} else {
		rc = fp_ct6_reverse_any(skb, &ip, &l4, FP_NAT6_NO_SCTP);
	}
	barrier_var(skb);
	if (fp_lo_restored(skb, rc, FP_FAM_IPV6, &verdict))
		return verdict;
	/* before the translation rewrites it */
	rc = fp_to_vpc6_node(skb, &ip, &l4, fp_lo6_quote(skb, &ip), 0);
	return rc == 1 ? FP_TC_CONTINUE : rc;
}

/* fp_lo's IPv4 half. Its locals live in this scope only, so that the
 * IPv6 half's stack does not sit on top of them (BPF's 512 bytes). */
static __always_inline int fp_lo4_run(struct __sk_buff *skb)
{
	struct fp_ipv4 ip = {};
	struct fp_l4 l4 = {};
	struct fp_lo_quote q;
	int rc, verdict;

	barrier_var(skb);
	/* a fragment is not translated, as in IPv6 (fp_lo6_run) */
	if (fp_parse_ipv4(skb, &ip) != FP_PARSE_IPV4 ||
	    (ip.frag_off & bpf_htons(FP_IP_MF | FP_IP_OFFSET)))
		return FP_TC_CONTINUE;
	fp_parse_l4(skb, &ip, &l4);
	if (l4.kind != FP_L4_PORTS)
		return FP_TC_CONTINUE;
	rc = fp_ct_reverse(skb, &ip, &l4);
	barrier_var(skb);
	if (fp_lo_restored(skb, rc, FP_FAM_IPV4, &verdict))
		return verdict;
	/* before the translation rewrites it (on failure the helper zeroes
	 * q: a packet that short fits any way out) */
	bpf_skb_load_bytes(skb, ip.l3_off, q.b, sizeof(q.b));
	rc = fp_to_vpc_node(skb, &ip, &l4, &q);
	return rc == 1 ? FP_TC_CONTINUE : rc;
}

static __always_inline int fp_lo_run(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = data + ETH_HLEN;

	if ((void *)(iph + 1) > data_end)
		return FP_TC_CONTINUE;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6h = data + ETH_HLEN;

		if ((void *)(ip6h + 1) > data_end || !FP_LO6_FIRST(ip6h->nexthdr))
			return FP_TC_CONTINUE;
		return fp_lo6_run(skb);
	}
	if (eth->h_proto != bpf_htons(ETH_P_IP) || !FP_LO_PROTO(iph->protocol))
		return FP_TC_CONTINUE;
	return fp_lo4_run(skb);
}

int fp_lo(struct __sk_buff *skb)
{
	__u32 prev = fp_whatif_enter(skb);
	int verdict = fp_lo_run(skb);

	fp_whatif_exit(prev);
	return verdict;
}
