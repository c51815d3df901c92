/* Bandwidth manager: per-pod rate, packet-rate and connection limits.
 *
 * Where each limit is enforced (docs/bandwidth.md says the same for users):
 *
 *   pod --from-pod--> [egress packet rate, egress connections]
 *        |-- to a pod of this node (redirect_peer, no qdisc on the way):
 *        |     [egress token bucket] then that pod's delivery checks
 *        '-- to the VPC, by redirect or through the stack: the ENI's egress
 *              program [egress pacing: EDT timestamp for fq, or the pod's
 *              HTB class], then the ENI's root qdisc holds the packet
 *   delivery into a pod (fp_redirect_local for redirects, fp_to_pod for
 *   the stack path): [ingress packet rate, ingress token bucket, ingress
 *   connections]
 *
 * The rules behind every bucket are in fastpath.h (struct fp_bw). Limits
 * apply only to pods with an entry in the limits map, and only while the
 * agent has set FP_CFG_F_BW (the kernel supports the mechanism and some
 * pod is limited): an unlimited pod costs one config read then, one hash
 * lookup per hook when some pod is limited. What-if packets (`fastpath
 * trace`) are never limited and change no bucket.
 *
 * Entry points, one call each: fp_bw_from_pod (pod.c), fp_bw_deliver
 * (fwd.h fp_redirect_local, pod.c fp_to_pod), fp_bw_to_vpc (eni.c).
 * IPv6 (docs/ipv6.md): one budget per pod, not per family. A pod's IPv6
 * packets are limited against the state of its 32-bit key, found by
 * fp_bw_key_of_ep alone: fp_bw_from_pod6 (pod.c fp_from_pod6),
 * fp_bw_deliver6 (pod.c fp_deliver_local6 and fp_to_pod6), and
 * fp_bw_to_vpc paces both families. A connection limit
 * counts both families' connections; IPv6 ones are kept in their twin map
 * (FP_MAP_BW_FLOWS6), the IPv4 walk never looks at it.
 * Connection counting opens a flow on a new TCP SYN and closes it on RST
 * or on FINs from both ends (fp_bw_flow_opened / fp_bw_flow_closed): the
 * conntrack rewrite may call these from its own "flow created / closed"
 * points instead of the flag tests below.
 */
#ifndef FP_LIB_BW_H
#define FP_LIB_BW_H

#include <uapi/linux/in.h>
#include "lib/parse.h"
#include "lib/parse6.h"
#include "lib/lb.h"

#define FP_TCP_FIN 0x01
#define FP_TCP_SYN 0x02
#define FP_TCP_RST 0x04
#define FP_TCP_ACK 0x10

/* Flows refresh their last_seen at most this often (a write per packet
 * would make the entry's cache line bounce between CPUs). */
#define FP_BW_REFRESH_NS FP_NSEC_PER_SEC

static __always_inline __u32 fp_bw_cfg(void)
{
	struct fp_config *cfg = fp_config_get();

	if (!cfg || !(cfg->flags & FP_CFG_F_BW) || fp_whatif())
		return 0;
	return cfg->flags;
}

/* Admit a packet of `cost` ns into a bucket of depth `burst` ns whose
 * virtual time is *tat (see struct fp_bw). Concurrent CPUs each add their
 * own cost atomically, so no admitted packet goes uncharged. */
static __always_inline int fp_bw_admit(__u64 *tat, __u64 now, __u64 cost, __u64 burst)
{
	__u64 t = *(volatile __u64 *)tat;

	if (t > now) {
		if (t - now + cost > burst)
			return 0;
		__sync_fetch_and_add(tat, cost);
		return 1;
	}
	/* full bucket: even a packet costlier than the burst goes, into debt */
	*tat = now + cost;
	return 1;
}

static __always_inline __u64 fp_bw_byte_cost(__u32 len, __u64 rate)
{
	return (__u64)len * FP_NSEC_PER_SEC / rate;
}

/* Wire packets of this skb: a GSO super-packet counts as its segments. */
static __always_inline __u32 fp_bw_segs(struct __sk_buff *skb)
{
	__u32 segs = skb->gso_segs;

	return segs ? segs : 1;
}

static __always_inline int fp_bw_tcp_flags(struct __sk_buff *skb, const struct fp_ipv4 *ip,
					   const struct fp_l4 *l4)
{
	__u8 flags;

	if (ip->proto != IPPROTO_TCP || bpf_skb_load_bytes(skb, l4->off + 13, &flags, 1))
		return -1;
	return flags;
}

/* ---- connections ---- */

/* A tracked connection's map by family (`six`: the IPv6 twin). Callers
 * pass a constant: the inlined IPv4 walk keeps its own map alone. */
static __always_inline struct fp_bw_flow *fp_bw_flowx_lookup(void *key, int six)
{
	return six ? fp_bw_flow6_lookup(key) : fp_bw_flow_lookup(key);
}

static __always_inline int fp_bw_flowx_insert(void *key, struct fp_bw_flow *val, int six)
{
	return six ? fp_bw_flow6_insert(key, val) : fp_bw_flow_insert(key, val);
}

static __always_inline int fp_bw_flowx_delete(void *key, int six)
{
	return six ? fp_bw_flow6_delete(key) : fp_bw_flow_delete(key);
}

/* The pod's current count in one direction. */
static __always_inline __s64 fp_bw_conns(const struct fp_bw *lim, const struct fp_bw_state *st,
					 int ingress)
{
	if (ingress)
		return (__s64)(st->ingress_conns_opened - st->ingress_conns_closed -
			       lim->ingress_conns_reaped);
	return (__s64)(st->egress_conns_opened - st->egress_conns_closed -
		       lim->egress_conns_reaped);
}

/* Give a closed flow's counts back to the pods it was counted for. */
static __always_inline void fp_bw_flow_closed(const struct fp_bw_flow *f)
{
	struct fp_bw_state *st;

	if (f->egress_pod) {
		st = fp_bw_state_lookup(f->egress_pod);
		if (st && st->conn_gen == f->egress_gen)
			__sync_fetch_and_add(&st->egress_conns_closed, 1);
	}
	if (f->ingress_pod) {
		st = fp_bw_state_lookup(f->ingress_pod);
		if (st && st->conn_gen == f->ingress_gen)
			__sync_fetch_and_add(&st->ingress_conns_closed, 1);
	}
}

/* Delete the flow and, when this call removed it, give its counts back
 * (whoever deletes an entry owns its counts: the programs here, the
 * agent's idle sweep otherwise). */
static __always_inline void fp_bw_flow_close(void *key, struct fp_bw_flow *f, int six)
{
	struct fp_bw_flow copy = *f;

	if (fp_bw_flowx_delete(key, six) == 0)
		fp_bw_flow_closed(&copy);
}

/* A new connection (its SYN) to count against `pod` (the initiator when
 * !ingress, the responder when ingress). Returns 0 to pass, -1 when the
 * limit is reached, 1 when it passes uncounted (the flows map is full). */
static __always_inline int fp_bw_flow_opened(void *key, int six, __be32 pod,
					     const struct fp_bw *lim, struct fp_bw_state *st,
					     int ingress, __u64 now)
{
	__u32 max = ingress ? lim->ingress_max_conns : lim->egress_max_conns;
	struct fp_bw_flow *f = fp_bw_flowx_lookup(key, six);

	if (!max || st->conn_gen != lim->conn_gen)
		return 0;
	if (f && (ingress ? f->ingress_pod : f->egress_pod))
		return 0;                   /* a retransmitted SYN */
	if (fp_bw_conns(lim, st, ingress) >= (__s64)max) {
		/* The initiator's side may have been counted by this very
		 * SYN on its way here (same node): give that back, or a SYN
		 * the destination keeps refusing would hold its count. */
		if (f && !f->established)
			fp_bw_flow_close(key, f, six);
		return -1;
	}
	if (f) {
		/* the generation first: a set address means "counted" */
		if (ingress) {
			f->ingress_gen = lim->conn_gen;
			f->ingress_pod = pod;
		} else {
			f->egress_gen = lim->conn_gen;
			f->egress_pod = pod;
		}
	} else {
		struct fp_bw_flow nf = {};

		nf.last_seen = now;
		if (ingress) {
			nf.ingress_pod = pod;
			nf.ingress_gen = lim->conn_gen;
		} else {
			nf.egress_pod = pod;
			nf.egress_gen = lim->conn_gen;
		}
		if (fp_bw_flowx_insert(key, &nf, six) != 0)
			/* another CPU's copy of this SYN won, or the map is full */
			return fp_bw_flowx_lookup(key, six) ? 0 : 1;
	}
	if (ingress)
		__sync_fetch_and_add(&st->ingress_conns_opened, 1);
	else
		__sync_fetch_and_add(&st->egress_conns_opened, 1);
	return 0;
}

/* The flow a packet belongs to, in either direction; *from_ini says
 * whether the packet travels as the SYN did. */
static __always_inline struct fp_bw_flow *fp_bw_flow_of(const struct fp_ipv4 *ip,
							const struct fp_l4 *l4,
							struct fp_bw_flow_key *key, int *from_ini)
{
	struct fp_bw_flow *f;

	key->saddr = ip->saddr;
	key->daddr = ip->daddr;
	key->sport = l4->sport;
	key->dport = l4->dport;
	f = fp_bw_flow_lookup(key);
	*from_ini = 1;
	if (f)
		return f;
	key->saddr = ip->daddr;
	key->daddr = ip->saddr;
	key->sport = l4->dport;
	key->dport = l4->sport;
	*from_ini = 0;
	return fp_bw_flow_lookup(key);
}

/* What a RST, a FIN or the responder's SYN-ACK does to the connection
 * `f` it belongs to (`key` found it; `from_ini`: sent by the initiator). */
static __always_inline void fp_bw_flow_seen(void *key, int six, struct fp_bw_flow *f, int flags,
					    int from_ini)
{
	if (flags & FP_TCP_RST) {
		fp_bw_flow_close(key, f, six);
		return;
	}
	if ((flags & FP_TCP_SYN) && !from_ini)
		f->established = 1;
	if (flags & FP_TCP_FIN) {
		/* mark ours, then look at theirs (either end may close: one
		 * delete wins). Two FINs crossing on two CPUs can miss each
		 * other's mark; the agent's idle sweep closes those. */
		if (from_ini)
			f->fin_ini = 1;
		else
			f->fin_rsp = 1;
		asm volatile("" ::: "memory");
		if (f->fin_ini && f->fin_rsp)
			fp_bw_flow_close(key, f, six);
	}
}

/* Connection accounting for one TCP packet seen at a conn-limited pod's
 * hook (`ingress`: being delivered to `pod`). Returns -1 to drop. */
static __always_inline int fp_bw_conn_track(struct __sk_buff *skb, const struct fp_ipv4 *ip,
					    const struct fp_l4 *l4, __be32 pod,
					    const struct fp_bw *lim, struct fp_bw_state *st,
					    int ingress, __u64 now, enum fp_reason *untracked)
{
	struct fp_bw_flow_key key = {};
	struct fp_bw_flow *f;
	int flags = fp_bw_tcp_flags(skb, ip, l4), from_ini, rc;

	if (flags < 0)
		return 0;
	if ((flags & (FP_TCP_SYN | FP_TCP_ACK | FP_TCP_RST)) == FP_TCP_SYN) {
		key.saddr = ip->saddr;
		key.daddr = ip->daddr;
		key.sport = l4->sport;
		key.dport = l4->dport;
		rc = fp_bw_flow_opened(&key, 0, pod, lim, st, ingress, now);
		if (rc > 0)
			*untracked = FP_FWD_BW_UNTRACKED;
		return rc < 0 ? -1 : 0;
	}
	if (flags & (FP_TCP_RST | FP_TCP_FIN | FP_TCP_SYN)) {
		f = fp_bw_flow_of(ip, l4, &key, &from_ini);
		if (f)
			fp_bw_flow_seen(&key, 0, f, flags, from_ini);
		return 0;
	}
	/* the pod's own traffic keeps its flows from looking idle */
	if (!ingress) {
		f = fp_bw_flow_of(ip, l4, &key, &from_ini);
		if (f && now - f->last_seen > FP_BW_REFRESH_NS)
			f->last_seen = now;
	}
	return 0;
}

/* ---- the buckets, for both families ---- */

/* The egress packet rate, and the byte bucket for a destination on this
 * node (redirected past every qdisc, so policed here; what goes to the
 * VPC is paced at the ENI instead). Returns -1 to drop (*reason set). */
static __always_inline int fp_bw_egress_admit(struct __sk_buff *skb, const struct fp_bw *lim,
					      struct fp_bw_state *st, __u64 now, int local_dst,
					      enum fp_reason *reason)
{
	if (lim->egress_pkt_ns &&
	    !fp_bw_admit(&st->egress_pkt_tat, now, fp_bw_segs(skb) * lim->egress_pkt_ns,
			 lim->egress_pkt_burst_ns)) {
		*reason = FP_DROP_PPS_EGRESS;
		return -1;
	}
	if (local_dst && lim->egress_rate &&
	    !fp_bw_admit(&st->egress_tat, now, fp_bw_byte_cost(skb->len, lim->egress_rate),
			 lim->egress_burst_ns)) {
		*reason = FP_DROP_BW_EGRESS;
		return -1;
	}
	return 0;
}

/* The ingress packet rate and byte bucket of a delivery into the pod. */
static __always_inline int fp_bw_ingress_admit(struct __sk_buff *skb, const struct fp_bw *lim,
					       struct fp_bw_state *st, __u64 now,
					       enum fp_reason *reason)
{
	if (lim->ingress_pkt_ns &&
	    !fp_bw_admit(&st->ingress_pkt_tat, now, fp_bw_segs(skb) * lim->ingress_pkt_ns,
			 lim->ingress_pkt_burst_ns)) {
		*reason = FP_DROP_PPS_INGRESS;
		return -1;
	}
	if (lim->ingress_rate &&
	    !fp_bw_admit(&st->ingress_tat, now, fp_bw_byte_cost(skb->len, lim->ingress_rate),
			 lim->ingress_burst_ns)) {
		*reason = FP_DROP_BW_INGRESS;
		return -1;
	}
	return 0;
}

/* ---- IPv6: the pod's key ---- */

/* The key of a local endpoint's limits and state: the one place an IPv6
 * packet finds its pod's budget, so that both families share it. A
 * dual-stack pod's key is its IPv4 address (its veth's registration); an
 * IPv6-only pod's is its endpoint key there (FP_EPIF_F_KEY). 0: no key (no
 * limits). */
static __always_inline __be32 fp_bw_key_of_ep(const struct fp_endpoint *ep)
{
	struct fp_ep_if *self = fp_epif_lookup(ep->host_ifindex);

	return self ? self->ip4 : 0;
}

static __always_inline __be32 fp_bw_key6(const __u32 *ip6)
{
	struct fp_endpoint *ep = fp_endpoint6_lookup(ip6);

	return ep ? fp_bw_key_of_ep(ep) : 0;
}

/* ---- entry points ---- */

/* A packet the pod sends (fp_from_pod), after service translation and
 * policy. Returns 0 to go on, -1 to drop (*reason set). */
static __always_inline int fp_bw_from_pod(struct __sk_buff *skb, const struct fp_ipv4 *ip,
					  const struct fp_l4 *l4, int has_l4,
					  enum fp_reason *reason)
{
	enum fp_reason counted = FP_FWD_PASS;
	struct fp_bw_state *st;
	struct fp_bw *lim;
	int local_dst;
	__u64 now;

	if (!fp_bw_cfg())
		return 0;
	lim = fp_bw_limits(ip->saddr);
	if (!lim)
		return 0;
	st = fp_bw_state_of(ip->saddr, lim->conn_gen);
	if (!st)
		return 0;
	/* to a pod of this node: redirected past every qdisc, so policed here */
	local_dst = fp_endpoint_lookup(ip->daddr) != NULL;
	now = bpf_ktime_get_ns();
	if (fp_bw_egress_admit(skb, lim, st, now, local_dst, reason) < 0)
		goto drop;
	if (has_l4 && (lim->flags & FP_BW_F_CONNS) &&
	    fp_bw_conn_track(skb, ip, l4, ip->saddr, lim, st, 0, now, &counted) < 0) {
		*reason = FP_DROP_CONN_EGRESS;
		goto drop;
	}
	/* traffic to the VPC is counted where it leaves (fp_bw_to_vpc) */
	if (local_dst || counted != FP_FWD_PASS)
		fp_bw_count(ip->saddr, FP_DIR_FROM_POD, counted, skb->len);
	return 0;
drop:
	fp_bw_count(ip->saddr, FP_DIR_FROM_POD, *reason, skb->len);
	return -1;
}

/* A packet about to be delivered into the pod ip->daddr, by redirect or
 * by the stack. Returns 0 to deliver, -1 to drop (*reason set). */
static __always_inline int fp_bw_deliver(struct __sk_buff *skb, const struct fp_ipv4 *ip,
					 enum fp_reason *reason)
{
	enum fp_reason counted = FP_FWD_PASS;
	struct fp_bw_state *st;
	struct fp_bw *lim;
	struct fp_l4 l4 = {};
	__u64 now;

	if (!fp_bw_cfg())
		return 0;
	lim = fp_bw_limits(ip->daddr);
	if (!lim)
		return 0;
	st = fp_bw_state_of(ip->daddr, lim->conn_gen);
	if (!st)
		return 0;
	now = bpf_ktime_get_ns();
	if (fp_bw_ingress_admit(skb, lim, st, now, reason) < 0)
		goto drop;
	if ((lim->flags & FP_BW_F_CONNS) && fp_parse_l4(skb, ip, &l4) == 0 &&
	    fp_bw_conn_track(skb, ip, &l4, ip->daddr, lim, st, 1, now, &counted) < 0) {
		*reason = FP_DROP_CONN_INGRESS;
		goto drop;
	}
	fp_bw_count(ip->daddr, FP_DIR_TO_POD, counted, skb->len);
	return 0;
drop:
	fp_bw_count(ip->daddr, FP_DIR_TO_POD, *reason, skb->len);
	return -1;
}

/* The key of the local pod an IPv6 packet leaving by an ENI comes from;
 * 0 for anything else (the node's own, IPv4, too short). Only the source
 * address is read: the ENI's egress pacing needs nothing else. */
static __always_inline __be32 fp_bw_vpc_key6(struct __sk_buff *skb)
{
	__u32 saddr[4];
	__be16 proto;

	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)) ||
	    proto != bpf_htons(ETH_P_IPV6) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, saddr), saddr,
			       sizeof(saddr)))
		return 0;
	return fp_bw_key6(saddr);
}

/* A packet leaving the node by an ENI (fp_to_vpc): pace the pod it comes
 * from. EDT: the departure time goes into skb->tstamp and fq on the ENI
 * holds the packet until then; a departure beyond the horizon is dropped
 * here (fq would drop it too). HTB: the pod's class goes into
 * skb->priority, which the ENI's HTB root classifies by. Returns 0 to go
 * on, -1 to drop (*reason set). */
static __always_inline int fp_bw_to_vpc(struct __sk_buff *skb, enum fp_reason *reason)
{
	struct fp_ipv4 ip = {};
	struct fp_bw_state *st;
	struct fp_bw *lim;
	__u32 cfg = fp_bw_cfg();
	__u64 now, start, cost, t;
	int parsed;

	if (!cfg)
		return 0;
	parsed = fp_parse_ipv4(skb, &ip);
	if (parsed == FP_PARSE_OTHER)
		ip.saddr = fp_bw_vpc_key6(skb);    /* 0 unless a limited pod's IPv6 */
	else if (parsed != FP_PARSE_IPV4)
		return 0;
	if (!ip.saddr)
		return 0;
	lim = fp_bw_limits(ip.saddr);
	if (!lim || !lim->egress_rate)
		return 0;
	if (!(cfg & FP_CFG_F_BW_EDT)) {
		if (lim->htb_class)
			skb->priority = lim->htb_class;
		fp_bw_count(ip.saddr, FP_DIR_FROM_POD, FP_FWD_PASS, skb->len);
		return 0;
	}
	st = fp_bw_state_of(ip.saddr, lim->conn_gen);
	if (!st)
		return 0;
	now = bpf_ktime_get_ns();
	t = *(volatile __u64 *)&st->egress_tat;
	start = t > now ? t : now;
	/* a departure time the sender's own pacing (TCP) chose is kept */
	if (skb->tstamp > start)
		start = skb->tstamp;
	if (start - now > FP_BW_HORIZON_NS) {
		*reason = FP_DROP_BW_HORIZON;
		fp_bw_count(ip.saddr, FP_DIR_FROM_POD, *reason, skb->len);
		return -1;
	}
	cost = fp_bw_byte_cost(skb->len, lim->egress_rate);
	if (t > now)
		__sync_fetch_and_add(&st->egress_tat, cost);
	else
		st->egress_tat = start + cost;
	if (start > now)
		skb->tstamp = start;
	fp_bw_count(ip.saddr, FP_DIR_FROM_POD, FP_FWD_PASS, skb->len);
	return 0;
}

/* ---- IPv6 connections (FP_MAP_BW_FLOWS6) ---- */

/* fp_bw_flow_of for an IPv6 tuple. */
static __always_inline struct fp_bw_flow *fp_bw_flow6_of(const struct fp_ipv6 *ip,
							 const __be16 *ports,
							 struct fp_bw_flow6_key *key, int *from_ini)
{
	struct fp_bw_flow *f;

	__builtin_memcpy(key->saddr, ip->saddr, 16);
	__builtin_memcpy(key->daddr, ip->daddr, 16);
	key->sport = ports[0];
	key->dport = ports[1];
	f = fp_bw_flow6_lookup(key);
	*from_ini = 1;
	if (f)
		return f;
	__builtin_memcpy(key->saddr, ip->daddr, 16);
	__builtin_memcpy(key->daddr, ip->saddr, 16);
	key->sport = ports[1];
	key->dport = ports[0];
	*from_ini = 0;
	return fp_bw_flow6_lookup(key);
}

/* fp_bw_conn_track for an IPv6 packet: the same counts, against the same
 * pod state, with the connection in the IPv6 twin map. */
static __always_inline int fp_bw_conn_track6(struct __sk_buff *skb, const struct fp_ipv6 *ip,
					     __be32 pod, const struct fp_bw *lim,
					     struct fp_bw_state *st, int ingress, __u64 now,
					     enum fp_reason *untracked)
{
	struct fp_bw_flow6_key key = {};
	struct fp_bw_flow *f;
	__be16 ports[2];
	__u8 flags;
	int from_ini, rc;

	if (ip->proto != IPPROTO_TCP || ip->frag == FP_IP6_LATER_FRAG ||
	    bpf_skb_load_bytes(skb, ip->l4_off, ports, sizeof(ports)) ||
	    bpf_skb_load_bytes(skb, ip->l4_off + 13, &flags, 1))
		return 0;
	if ((flags & (FP_TCP_SYN | FP_TCP_ACK | FP_TCP_RST)) == FP_TCP_SYN) {
		__builtin_memcpy(key.saddr, ip->saddr, 16);
		__builtin_memcpy(key.daddr, ip->daddr, 16);
		key.sport = ports[0];
		key.dport = ports[1];
		rc = fp_bw_flow_opened(&key, 1, pod, lim, st, ingress, now);
		if (rc > 0)
			*untracked = FP_FWD_BW_UNTRACKED;
		return rc < 0 ? -1 : 0;
	}
	flags &= FP_TCP_RST | FP_TCP_FIN | FP_TCP_SYN;
	/* the pod's own traffic keeps its flows from looking idle */
	if (!flags && ingress)
		return 0;
	f = fp_bw_flow6_of(ip, ports, &key, &from_ini);
	if (!f)
		return 0;
	if (flags)
		fp_bw_flow_seen(&key, 1, f, flags, from_ini);
	else if (now - f->last_seen > FP_BW_REFRESH_NS)
		f->last_seen = now;
	return 0;
}

/* ---- IPv6 entry points (the pod's key: fp_bw_key_of_ep) ---- */

/* An IPv6 packet the pod `src` sends (fp_from_pod6): its egress packet
 * rate, and its byte bucket when the destination is a pod of this node.
 * Returns 0 to go on, -1 to drop (*reason set). */
static __always_inline int fp_bw_from_pod6(struct __sk_buff *skb, const struct fp_ipv6 *ip,
					   const struct fp_endpoint *src, enum fp_reason *reason)
{
	enum fp_reason counted = FP_FWD_PASS;
	struct fp_bw_state *st;
	struct fp_bw *lim;
	int local_dst;
	__be32 pod;
	__u64 now;

	if (!fp_bw_cfg())
		return 0;
	pod = fp_bw_key_of_ep(src);
	lim = pod ? fp_bw_limits(pod) : NULL;
	if (!lim)
		return 0;
	st = fp_bw_state_of(pod, lim->conn_gen);
	if (!st)
		return 0;
	local_dst = fp_endpoint6_lookup(ip->daddr) != NULL;
	now = bpf_ktime_get_ns();
	if (fp_bw_egress_admit(skb, lim, st, now, local_dst, reason) < 0)
		goto drop;
	if ((lim->flags & FP_BW_F_CONNS) &&
	    fp_bw_conn_track6(skb, ip, pod, lim, st, 0, now, &counted) < 0) {
		*reason = FP_DROP_CONN_EGRESS;
		goto drop;
	}
	/* traffic to the VPC is counted where it leaves (fp_bw_to_vpc) */
	if (local_dst || counted != FP_FWD_PASS)
		fp_bw_count(pod, FP_DIR_FROM_POD, counted, skb->len);
	return 0;
drop:
	fp_bw_count(pod, FP_DIR_FROM_POD, *reason, skb->len);
	return -1;
}

/* An IPv6 packet about to be delivered into the pod `dst`, by redirect
 * (fp_deliver_local6) or by the stack (fp_to_pod6). Returns 0 to
 * deliver, -1 to drop (*reason set). */
static __always_inline int fp_bw_deliver6(struct __sk_buff *skb, const struct fp_ipv6 *ip,
					  const struct fp_endpoint *dst, enum fp_reason *reason)
{
	enum fp_reason counted = FP_FWD_PASS;
	struct fp_bw_state *st;
	struct fp_bw *lim;
	__be32 pod;
	__u64 now;

	if (!fp_bw_cfg())
		return 0;
	pod = fp_bw_key_of_ep(dst);
	lim = pod ? fp_bw_limits(pod) : NULL;
	if (!lim)
		return 0;
	st = fp_bw_state_of(pod, lim->conn_gen);
	if (!st)
		return 0;
	now = bpf_ktime_get_ns();
	if (fp_bw_ingress_admit(skb, lim, st, now, reason) < 0)
		goto drop;
	if ((lim->flags & FP_BW_F_CONNS) &&
	    fp_bw_conn_track6(skb, ip, pod, lim, st, 1, now, &counted) < 0) {
		*reason = FP_DROP_CONN_INGRESS;
		goto drop;
	}
	fp_bw_count(pod, FP_DIR_TO_POD, counted, skb->len);
	return 0;
drop:
	fp_bw_count(pod, FP_DIR_TO_POD, *reason, skb->len);
	return -1;
}

#endif /* FP_LIB_BW_H */
