/* NetworkPolicy checks and the events that report them.
 *
 * A packet is judged on its real addresses, after service translation. A
 * flow that is already admitted (conntrack's policy entry, lib/ct.h)
 * passes without rule lookups, and so does an ICMP error quoting a packet
 * of an admitted flow (RELATED); a new flow is checked at the source pod's
 * egress and at the destination pod's ingress, each check being:
 *
 *   isolation = policy_endpoints[pod].dir[d]      (absent: not isolated)
 *   rule = rules[pod, peer identity, d, proto, dport]
 *          or rules[pod, FP_ID_ANY, d, proto, dport]   (longest prefix)
 *
 * so its cost does not depend on the number of policies, pods or CIDRs.
 * The Python twin of these lookups is agent/policy/lookup.py; the BPF tests
 * hold the two to the same answers.
 */
#ifndef FP_LIB_POLICY_H
#define FP_LIB_POLICY_H

#include "lib/parse.h"
#include "lib/ct.h"

#ifndef barrier_var
#define barrier_var(var) asm volatile("" : "+r"(var))
#endif

/* What the policy stage learned about a packet, for counters and events. */
struct fp_verdict {
	__u32 policy_id;       /* deciding policy of a drop or audit report */
	__u32 peer_id;         /* peer identity of that check */
	__u8 dir;              /* FP_POL_INGRESS / FP_POL_EGRESS of that check */
};

static __always_inline int fp_policy_enabled(void)
{
	struct fp_config *cfg = fp_config_get();

	return cfg && (cfg->flags & FP_CFG_F_POLICY);
}

/* One direction at one pod: FP_PV_ALLOW, FP_PV_DENY or FP_PV_AUDIT_DENY;
 * FP_PV_NONE when the pod is not isolated in that direction. */
static __always_inline int fp_policy_check(__be32 pod, __u8 dir, __u32 peer, __u8 proto,
					   __be16 dport, __u32 *policy_id)
{
	struct fp_pol_ep *ep = fp_policy_ep(pod);
	struct fp_pol_key key = {};
	struct fp_pol_rule *rule;
	__u32 flags, deciding;

	*policy_id = 0;
	if (!ep)
		return FP_PV_NONE;
	if (dir == FP_POL_INGRESS) {
		flags = ep->dir[FP_POL_INGRESS].flags;
		deciding = ep->dir[FP_POL_INGRESS].policy_id;
	} else {
		flags = ep->dir[FP_POL_EGRESS].flags;
		deciding = ep->dir[FP_POL_EGRESS].policy_id;
	}
	if (!(flags & (FP_POL_F_ENFORCED | FP_POL_F_AUDIT)))
		return FP_PV_NONE;

	key.prefixlen = FP_POL_FIXED_BITS + 8 + 16;
	key.ep_ip4 = pod;
	key.identity = bpf_htonl(peer);
	key.dir = dir;
	key.proto = proto;
	key.dport = dport;
	rule = fp_policy_rule(&key);
	if (!rule) {
		key.identity = bpf_htonl(FP_ID_ANY);
		rule = fp_policy_rule(&key);
	}
	if (rule) {
		*policy_id = rule->policy_id;
		if (!fp_whatif())
			__sync_fetch_and_add(&rule->flows, 1);
		return FP_PV_ALLOW;
	}
	*policy_id = deciding;
	return (flags & FP_POL_F_ENFORCED) ? FP_PV_DENY : FP_PV_AUDIT_DENY;
}

static __always_inline void fp_event_fill(struct fp_event *ev, __u32 ifindex,
					  enum fp_event_type type, enum fp_dir dir,
					  enum fp_reason reason, const struct fp_ipv4 *ip,
					  __be16 sport, __be16 dport)
{
	ev->ts_ns = bpf_ktime_get_ns();
	ev->ifindex = ifindex;
	ev->reason = reason;
	ev->dir = dir;
	ev->type = type;
	ev->saddr = ip->saddr;
	ev->daddr = ip->daddr;
	ev->sport = sport;
	ev->dport = dport;
	ev->proto = ip->proto;
	ev->flags = 0;
	ev->pad = 0;
	ev->nat_daddr = 0;
	ev->nat_dport = 0;
	ev->pad2 = 0;
	ev->policy_id = 0;
	ev->peer_id = 0;
}

static __always_inline void fp_policy_event(struct __sk_buff *skb, enum fp_dir where,
					    enum fp_reason reason, const struct fp_ipv4 *ip,
					    __be16 sport, __be16 dport, __u8 pol_dir,
					    __u32 policy_id, __u32 peer)
{
	/* read before reserving: the verifier refuses a ctx load through a
	 * pointer the compiler would otherwise offset while holding the buffer */
	__u32 ifindex = skb->ifindex;
	struct fp_event *ev;

	barrier_var(ifindex);
	ev = fp_event_reserve();
	if (!ev)
		return;
	fp_event_fill(ev, ifindex, FP_EV_POLICY, where, reason, ip, sport, dport);
	ev->flags = pol_dir == FP_POL_INGRESS ? FP_EV_F_INGRESS : 0;
	ev->policy_id = policy_id;
	ev->peer_id = peer;
	fp_event_submit(ev);
}

/* Judge a packet (already translated). Returns 0 to let it pass, -1 to drop
 * it (v says which check and policy decided). `check_egress`: the source is
 * a pod of this node whose egress has not been checked on the way here.
 * Rules see the destination port of TCP, UDP and SCTP; anything else is
 * looked up with port 0 (ICMP is admitted only by rules without ports, as
 * Kubernetes defines). */
static __always_inline int fp_policy_judge(struct __sk_buff *skb, enum fp_dir where,
					   const struct fp_ipv4 *ip, const struct fp_l4 *l4,
					   int check_egress, struct fp_verdict *v)
{
	__u64 now = fp_now();
	__u32 eg_id = 0, in_id = 0, eg_peer = 0, in_peer = 0;
	__be16 sport = l4->sport, dport = l4->kind == FP_L4_PORTS ? l4->dport : 0;
	int eg = FP_PV_NONE, in;
	__u32 events;

	v->policy_id = 0;
	v->peer_id = 0;
	v->dir = FP_POL_EGRESS;

	/* an admitted flow, in either direction, or an error about one */
	if (fp_ct_policy_seen(ip, l4, now))
		return 0;
	if (l4->kind == FP_L4_ICMP_ERR && fp_ct_policy_related(skb, l4, now))
		return 0;

	/* A new flow. */
	if (check_egress) {
		eg_peer = fp_identity_of(ip->daddr);
		eg = fp_policy_check(ip->saddr, FP_POL_EGRESS, eg_peer, ip->proto, dport, &eg_id);
		fp_decision_policy(FP_POL_EGRESS, eg, eg_id, eg_peer);
	}
	in_peer = fp_identity_of(ip->saddr);
	in = fp_policy_check(ip->daddr, FP_POL_INGRESS, in_peer, ip->proto, dport, &in_id);
	fp_decision_policy(FP_POL_INGRESS, in, in_id, in_peer);

	if (eg != FP_PV_NONE)
		fp_policy_count(eg_id, FP_POL_EGRESS, eg, skb->len);
	if (in != FP_PV_NONE && eg != FP_PV_DENY)
		fp_policy_count(in_id, FP_POL_INGRESS, in, skb->len);

	if (eg == FP_PV_DENY || (in == FP_PV_DENY)) {
		if (eg == FP_PV_DENY) {
			v->policy_id = eg_id;
			v->peer_id = eg_peer;
			v->dir = FP_POL_EGRESS;
		} else {
			v->policy_id = in_id;
			v->peer_id = in_peer;
			v->dir = FP_POL_INGRESS;
		}
		return -1;
	}

	events = fp_events_wanted();
	if (eg == FP_PV_AUDIT_DENY || in == FP_PV_AUDIT_DENY) {
		/* forwarded, but reported: counted under its own reason and
		 * always sent to the monitor, like a drop */
		__u8 d = eg == FP_PV_AUDIT_DENY ? FP_POL_EGRESS : FP_POL_INGRESS;

		v->dir = d;
		v->policy_id = d == FP_POL_EGRESS ? eg_id : in_id;
		v->peer_id = d == FP_POL_EGRESS ? eg_peer : in_peer;
		fp_count(skb->ifindex, where, FP_FWD_AUDIT, skb->len);
		fp_policy_event(skb, where, FP_FWD_AUDIT, ip, sport, dport, d, v->policy_id,
				v->peer_id);
	} else if ((events & FP_MON_EV_POLICY) && (eg == FP_PV_ALLOW || in == FP_PV_ALLOW)) {
		__u8 d = in == FP_PV_ALLOW ? FP_POL_INGRESS : FP_POL_EGRESS;

		fp_policy_event(skb, where, FP_FWD_PASS, ip, sport, dport, d,
				d == FP_POL_INGRESS ? in_id : eg_id,
				d == FP_POL_INGRESS ? in_peer : eg_peer);
	}

	fp_ct_policy_admit(ip, l4, now);
	return 0;
}

/* A drop or (when asked for) a forwarding decision, to the monitor: the
 * tuple as the packet arrived (orig_*, sport), and where a service
 * translation sent it (ip->daddr, dport) when that differs. A reply whose
 * source the delivery path put back to the VIP is reported as it arrived,
 * from the backend. */
static __always_inline void fp_report(struct __sk_buff *skb, enum fp_dir dir,
				      enum fp_reason reason, const struct fp_ipv4 *ip,
				      __be16 sport, __be16 dport, __be32 orig_saddr,
				      __be32 orig_daddr, __be16 orig_dport,
				      const struct fp_verdict *v)
{
	__u32 ifindex = skb->ifindex;
	struct fp_event *ev;
	int drop = reason >= FP_REASON_DROP_MIN;

	if (!drop && !(fp_events_wanted() & FP_MON_EV_TRACE))
		return;
	barrier_var(ifindex);
	ev = fp_event_reserve();
	if (!ev)
		return;
	fp_event_fill(ev, ifindex, drop ? FP_EV_DROP : FP_EV_TRACE, dir, reason, ip, sport, dport);
	ev->saddr = orig_saddr;
	if (orig_daddr != ip->daddr || orig_dport != dport) {
		/* translated: report what the client sent, and where it went */
		ev->daddr = orig_daddr;
		ev->dport = orig_dport;
		ev->nat_daddr = ip->daddr;
		ev->nat_dport = dport;
		ev->flags |= FP_EV_F_NAT;
	}
	if (v) {
		ev->policy_id = v->policy_id;
		ev->peer_id = v->peer_id;
		if (v->dir == FP_POL_INGRESS)
			ev->flags |= FP_EV_F_INGRESS;
	}
	fp_event_submit(ev);
}

#endif /* FP_LIB_POLICY_H */
