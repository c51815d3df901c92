/* NetworkPolicy for IPv6: lib/policy.h's checks on IPv6 packets.
 *
 * The semantics are IPv4's: a flow already admitted (FP_MAP_CT_POLICY6,
 * either direction) passes, so does an ICMPv6 error quoting a packet of
 * one (RELATED); a new flow is checked at the source pod's egress and at
 * the destination pod's ingress, each by lib/policy.h's fp_policy_check on
 * the pod's 32-bit key with the peer's identity from FP_MAP_IPCACHE6. A
 * later fragment takes its first fragment's verdict (FP_MAP_POLFRAG6).
 *
 * The pod's key is found from its IPv6 address by one helper,
 * fp_policy6_pod: the 32-bit key of its veth's registration, the pod's
 * IPv4 address or an IPv6-only pod's endpoint key (FP_EPIF_F_KEY).
 *
 * What the programs leave unjudged: neighbour discovery (ICMPv6 133-137),
 * link-local and multicast traffic, which the link itself needs and no
 * policy names (the callers pass them before judging).
 */
#ifndef FP_LIB_POLICY6_H
#define FP_LIB_POLICY6_H

#include "lib/parse6.h"
#include "lib/policy.h"
#include "lib/event6.h"

#ifndef IPPROTO_SCTP
#define IPPROTO_SCTP 132
#endif

/* The policy key of the local pod holding IPv6 address `ip6`; 0 when it
 * is no pod of this node. */
static __always_inline __be32 fp_policy6_pod(const __u32 *ip6)
{
	struct fp_endpoint *ep = fp_endpoint6_lookup(ip6);
	struct fp_ep_if *self;

	if (!ep)
		return 0;
	self = fp_epif_lookup(ep->host_ifindex);
	return self ? self->ip4 : 0;
}

/* The transport header of an IPv6 packet, as fp_parse_l4 reads IPv4's. */
static __always_inline void fp_parse6_l4(struct __sk_buff *skb, const struct fp_ipv6 *ip,
					 struct fp_l4 *l4)
{
	__u8 b[14];

	__builtin_memset(l4, 0, sizeof(*l4));
	l4->kind = FP_L4_NONE;
	l4->off = ip->l4_off;
	if (ip->frag == FP_IP6_LATER_FRAG) {
		l4->kind = FP_L4_LATER_FRAG;
		return;
	}
	if (ip->proto == FP_NH_ICMPV6) {
		if (bpf_skb_load_bytes(skb, ip->l4_off, b, 8))
			return;
		l4->icmp_type = b[0];
		if (b[0] == FP_ICMP6_ECHO || b[0] == FP_ICMP6_ECHOREPLY) {
			__be16 id;

			__builtin_memcpy(&id, &b[4], 2);
			l4->kind = FP_L4_ECHO;
			if (b[0] == FP_ICMP6_ECHO) {
				l4->sport = id;
				l4->opening = 1;
			} else {
				l4->dport = id;
			}
		} else if (b[0] >= FP_ICMP6_UNREACH && b[0] <= FP_ICMP6_PARAMPROB) {
			l4->kind = FP_L4_ICMP_ERR;
		}
		return;
	}
	if (ip->proto != IPPROTO_TCP && ip->proto != IPPROTO_UDP && ip->proto != IPPROTO_SCTP)
		return;
	if (bpf_skb_load_bytes(skb, ip->l4_off, b, 4))
		return;
	__builtin_memcpy(&l4->sport, &b[0], 2);
	__builtin_memcpy(&l4->dport, &b[2], 2);
	if (ip->proto == IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, ip->l4_off + 13, b, 1))
			return;
		l4->tcp_flags = b[0];
		l4->opening = (b[0] & (FP_TCP_SYN | FP_TCP_ACK)) == FP_TCP_SYN;
	} else if (ip->proto == IPPROTO_SCTP) {
		if (bpf_skb_load_bytes(skb, ip->l4_off + 12, b, 1))
			return;
		l4->opening = b[0] == FP_SCTP_CHUNK_INIT;
	} else {
		l4->opening = 1;
	}
	l4->kind = FP_L4_PORTS;
}

/* Whether IPv6 address a orders before b (any total order serves: both
 * directions of a flow must build the same key). */
static __always_inline int fp_ip6_lower(const __u32 *a, const __u32 *b)
{
	if (a[0] != b[0])
		return bpf_ntohl(a[0]) < bpf_ntohl(b[0]);
	if (a[1] != b[1])
		return bpf_ntohl(a[1]) < bpf_ntohl(b[1]);
	if (a[2] != b[2])
		return bpf_ntohl(a[2]) < bpf_ntohl(b[2]);
	return bpf_ntohl(a[3]) < bpf_ntohl(b[3]);
}

static __always_inline int fp_ip6_equal(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* The policy key of a tuple, lower (address, port) end first (as
 * fp_ct_policy_key). Returns 1 when the tuple was swapped. */
static __always_inline int fp_ct6_policy_key(struct fp_ctpol6_key *key, const __u32 *saddr,
					     const __u32 *daddr, __be16 sport, __be16 dport,
					     __u8 proto)
{
	int swap = fp_ip6_lower(daddr, saddr) ||
		   (fp_ip6_equal(saddr, daddr) && sport > dport);

	__builtin_memcpy(key->saddr, swap ? daddr : saddr, 16);
	__builtin_memcpy(key->daddr, swap ? saddr : daddr, 16);
	key->sport = swap ? dport : sport;
	key->dport = swap ? sport : dport;
	key->proto = proto;
	key->pad[0] = key->pad[1] = key->pad[2] = 0;
	return swap;
}

static __always_inline int fp_ct6_policy_seen(const struct fp_ipv6 *ip, const struct fp_l4 *l4,
					      __u64 now)
{
	struct fp_ctpol6_key key;
	struct fp_ctpol4 *ct;
	int swap = fp_ct6_policy_key(&key, ip->saddr, ip->daddr, l4->sport, l4->dport, ip->proto);
	int reply;
	__u8 flags, state;

	ct = fp_ctpol6_get(&key);
	if (!ct || fp_ct_expired(ct->last_seen, ip->proto, ct->state, now))
		return 0;
	if (ip->proto == IPPROTO_TCP && l4->opening && ct->state >= FP_CT_ESTABLISHED)
		return 0;
	if (fp_whatif())
		return 1;
	reply = swap != !!(ct->flags & FP_CT_F_ORIG_HIGH);
	flags = ct->flags;
	state = fp_ct_step(ip->proto, ct->state, &flags, l4->tcp_flags, reply);
	if (state != ct->state || flags != ct->flags) {
		ct->state = state;
		ct->flags = flags;
		ct->last_seen = now;
	} else if ((__s64)(now - ct->last_seen) > (__s64)FP_CT_REFRESH_NS) {
		ct->last_seen = now;
	}
	return 1;
}

/* Remember a flow just admitted; ICMPv6 only for an echo request. */
static __always_inline void fp_ct6_policy_admit(const struct fp_ipv6 *ip, const struct fp_l4 *l4,
						__u64 now)
{
	struct fp_ctpol6_key key;
	struct fp_ctpol4 val = {};
	int swap;

	if (ip->proto == FP_NH_ICMPV6 && !(l4->kind == FP_L4_ECHO && l4->opening))
		return;
	swap = fp_ct6_policy_key(&key, ip->saddr, ip->daddr, l4->sport, l4->dport, ip->proto);
	val.last_seen = now;
	val.flags = swap ? FP_CT_F_ORIG_HIGH : 0;
	val.state = ip->proto == IPPROTO_TCP && !l4->opening ? FP_CT_ESTABLISHED : FP_CT_NEW;
	fp_ctpol6_put(&key, &val);
}

/* An ICMPv6 error (types 1-4) quoting a packet of an admitted flow: the
 * quoted fixed header follows the error's 8 bytes, its transport header
 * right after it (an error quoting extension headers is not RELATED). */
static __always_inline int fp_ct6_policy_related(struct __sk_buff *skb, const struct fp_l4 *l4,
						 __u64 now)
{
	struct fp_ctpol6_key key;
	struct ipv6hdr qh;
	struct fp_ctpol4 *ct;
	__u32 qs[4], qd[4];
	__be16 w[3];
	__be16 sport = 0, dport = 0;
	__u32 off = l4->off + 8;

	if (bpf_skb_load_bytes(skb, off, &qh, sizeof(qh)) || qh.version != 6)
		return 0;
	if (bpf_skb_load_bytes(skb, off + sizeof(qh), w, sizeof(w)))
		return 0;
	if (qh.nexthdr == IPPROTO_TCP || qh.nexthdr == IPPROTO_UDP ||
	    qh.nexthdr == IPPROTO_SCTP) {
		sport = w[0];
		dport = w[1];
	} else if (qh.nexthdr == FP_NH_ICMPV6) {
		__u8 type = ((__u8 *)w)[0];

		if (type == FP_ICMP6_ECHO)
			sport = w[2];
		else if (type == FP_ICMP6_ECHOREPLY)
			dport = w[2];
		else
			return 0;
	} else {
		return 0;
	}
	__builtin_memcpy(qs, &qh.saddr, 16);
	__builtin_memcpy(qd, &qh.daddr, 16);
	fp_ct6_policy_key(&key, qs, qd, sport, dport, qh.nexthdr);
	ct = fp_ctpol6_get(&key);
	return ct && !fp_ct_expired(ct->last_seen, qh.nexthdr, ct->state, now);
}

/* ---- fragments ---- */

static __always_inline void fp_frag6_key_of(struct fp_frag6_key *key, const struct fp_ipv6 *ip)
{
	__builtin_memcpy(key->saddr, ip->saddr, 16);
	__builtin_memcpy(key->daddr, ip->daddr, 16);
	key->id = ip->frag_id;
	key->proto = ip->proto;
	key->pad[0] = key->pad[1] = key->pad[2] = 0;
}

/* A later fragment: its first fragment's verdict. Returns 0 to let it go
 * on, 1 when there is no record, -1 to drop it with *reason. */
static __always_inline int fp_frag6_follow(const struct fp_ipv6 *ip, struct fp_l4 *l4,
					   enum fp_reason *reason)
{
	struct fp_frag6_key key;
	struct fp_polfrag6 *f;
	__u64 now = bpf_ktime_get_ns();

	fp_frag6_key_of(&key, ip);
	f = fp_polfrag6_get(&key);
	if (!f || (__s64)(now - f->first_seen) > (__s64)FP_FRAG_LIFETIME_NS)
		return 1;
	l4->sport = f->sport;
	l4->dport = f->dport;
	if (f->reason >= FP_REASON_DROP_MIN) {
		*reason = f->reason;
		return -1;
	}
	fp_ct_event(FP_CTE_FRAG_FOLLOWED);
	return 0;
}

/* After a first fragment was judged: what the rest of its datagram gets. */
static __always_inline void fp_frag6_record(const struct fp_ipv6 *ip, const struct fp_l4 *l4,
					    enum fp_reason reason)
{
	struct fp_frag6_key key;
	struct fp_polfrag6 val = {};

	if (ip->frag != FP_IP6_FIRST_FRAG)
		return;
	fp_frag6_key_of(&key, ip);
	val.first_seen = bpf_ktime_get_ns();
	val.sport = l4->sport;
	val.dport = l4->dport;
	val.reason = reason;
	fp_polfrag6_put(&key, &val);
}

/* A policy event for an IPv6 packet: a struct fp_event6 (lib/event6.h),
 * with its addresses, ports, protocol, policy and peer. */
static __always_inline void fp_policy6_event(struct __sk_buff *skb, enum fp_dir where,
					     enum fp_reason reason, enum fp_event_type type,
					     const struct fp_ipv6 *ip, const struct fp_l4 *l4,
					     __u8 pol_dir, __u32 policy_id, __u32 peer)
{
	__u32 ifindex = skb->ifindex;
	struct fp_event6 *ev;

	barrier_var(ifindex);
	ev = fp_event6_reserve();
	if (!ev)
		return;
	fp_event6_head(ev, ifindex, reason, where, type);
	ev->ev.sport = l4->sport;
	ev->ev.dport = l4->dport;
	ev->ev.proto = ip->proto;
	if (pol_dir == FP_POL_INGRESS)
		ev->ev.flags |= FP_EV_F_INGRESS;
	ev->ev.policy_id = policy_id;
	ev->ev.peer_id = peer;
	__builtin_memcpy(ev->saddr6, ip->saddr, 16);
	__builtin_memcpy(ev->daddr6, ip->daddr, 16);
	fp_event6_submit(ev);
}

/* Judge an IPv6 packet (lib/policy.h's fp_policy_judge). `src_pod`: the
 * source pod's key when its egress is to be checked here, else 0. Returns
 * 0 to let it pass, -1 to drop it (v says which check decided). */
static __always_inline int fp_policy6_judge(struct __sk_buff *skb, enum fp_dir where,
					    const struct fp_ipv6 *ip, const struct fp_l4 *l4,
					    __be32 src_pod, struct fp_verdict *v)
{
	__u64 now = bpf_ktime_get_ns();
	__u32 eg_id = 0, in_id = 0, eg_peer = 0, in_peer = 0;
	__be16 dport = l4->kind == FP_L4_PORTS ? l4->dport : 0;
	int eg = FP_PV_NONE, in = FP_PV_NONE;
	__be32 dst_pod;

	v->policy_id = 0;
	v->peer_id = 0;
	v->dir = FP_POL_EGRESS;

	if (fp_ct6_policy_seen(ip, l4, now))
		return 0;
	if (l4->kind == FP_L4_ICMP_ERR && fp_ct6_policy_related(skb, l4, now))
		return 0;

	if (src_pod) {
		eg_peer = fp_identity6_of(ip->daddr);
		eg = fp_policy_check(src_pod, FP_POL_EGRESS, eg_peer, ip->proto, dport, &eg_id);
		fp_decision_policy(FP_POL_EGRESS, eg, eg_id, eg_peer);
	}
	dst_pod = fp_policy6_pod(ip->daddr);
	if (dst_pod) {
		in_peer = fp_identity6_of(ip->saddr);
		in = fp_policy_check(dst_pod, FP_POL_INGRESS, in_peer, ip->proto, dport, &in_id);
		fp_decision_policy(FP_POL_INGRESS, in, in_id, in_peer);
	}

	if (eg != FP_PV_NONE)
		fp_policy_count(eg_id, FP_POL_EGRESS, eg, skb->len);
	if (in != FP_PV_NONE && eg != FP_PV_DENY)
		fp_policy_count(in_id, FP_POL_INGRESS, in, skb->len);

	if (eg == FP_PV_DENY) {
		v->policy_id = eg_id;
		v->peer_id = eg_peer;
		v->dir = FP_POL_EGRESS;
		return -1;
	}
	if (in == FP_PV_DENY) {
		v->policy_id = in_id;
		v->peer_id = in_peer;
		v->dir = FP_POL_INGRESS;
		return -1;
	}
	if (eg == FP_PV_AUDIT_DENY || in == FP_PV_AUDIT_DENY) {
		__u8 d = eg == FP_PV_AUDIT_DENY ? FP_POL_EGRESS : FP_POL_INGRESS;

		v->dir = d;
		v->policy_id = d == FP_POL_EGRESS ? eg_id : in_id;
		v->peer_id = d == FP_POL_EGRESS ? eg_peer : in_peer;
		fp_count(skb->ifindex, where, FP_FWD_AUDIT, skb->len);
		fp_policy6_event(skb, where, FP_FWD_AUDIT, FP_EV_POLICY, ip, l4, d, v->policy_id,
				 v->peer_id);
	} else if ((fp_events_wanted() & FP_MON_EV_POLICY) &&
		   (eg == FP_PV_ALLOW || in == FP_PV_ALLOW)) {
		__u8 d = in == FP_PV_ALLOW ? FP_POL_INGRESS : FP_POL_EGRESS;

		fp_policy6_event(skb, where, FP_FWD_PASS, FP_EV_POLICY, ip, l4, d,
				 d == FP_POL_INGRESS ? in_id : eg_id,
				 d == FP_POL_INGRESS ? in_peer : eg_peer);
	}
	fp_ct6_policy_admit(ip, l4, now);
	return 0;
}

/* The whole policy stage of an IPv6 packet, for the IPv6 programs: a
 * later fragment follows its first (none recorded: dropped), anything else
 * is judged and a first fragment's verdict recorded. Returns 0 to let the
 * packet go on, or a drop reason (already reported to the monitor). */
static __always_inline enum fp_reason fp_policy6_stage(struct __sk_buff *skb, enum fp_dir where,
						       const struct fp_ipv6 *ip, __be32 src_pod)
{
	struct fp_verdict v = {};
	enum fp_reason reason = FP_FWD_PASS;
	struct fp_l4 l4;
	int rc;

	if (!fp_policy_enabled())
		return 0;
	fp_parse6_l4(skb, ip, &l4);
	if (l4.kind == FP_L4_LATER_FRAG) {
		rc = fp_frag6_follow(ip, &l4, &reason);
		if (rc == 0)
			return 0;
		if (rc > 0)
			reason = FP_DROP_FRAG_NO_FIRST;
		fp_policy6_event(skb, where, reason, FP_EV_DROP, ip, &l4, FP_POL_EGRESS, 0, 0);
		return reason;
	}
	if (fp_policy6_judge(skb, where, ip, &l4, src_pod, &v) < 0) {
		fp_frag6_record(ip, &l4, FP_DROP_POLICY);
		fp_policy6_event(skb, where, FP_DROP_POLICY, FP_EV_DROP, ip, &l4, v.dir,
				 v.policy_id, v.peer_id);
		return FP_DROP_POLICY;
	}
	fp_frag6_record(ip, &l4, FP_FWD_PASS);
	return 0;
}

#endif /* FP_LIB_POLICY6_H */
