/* Connection tracking: the one place that knows flows.
 *
 * Translated flows (per-packet Service translation) have a forward entry
 * (client -> VIP, naming the backend) and a reply entry (backend -> client,
 * naming the VIP); flows NetworkPolicy admitted have one policy entry; the
 * first fragment of a datagram leaves a record for the fragments after it.
 * fastpath.h says which map holds what and why there are four of them.
 *
 * What this header decides:
 *   - which packets may pick a backend: the opening packet of a flow (a TCP
 *     SYN without ACK, an SCTP INIT, any UDP datagram). A TCP or SCTP
 *     packet without a forward entry is dropped (FP_DROP_CT_NO_BACKEND),
 *     never sent to a new backend mid-stream; its flow's backend stays what
 *     the entry says even after the backend left the Service. A UDP flow
 *     whose backend is gone from the backends map picks again.
 *   - TCP state (SYN, SYN-ACK, the completing ACK, FINs, RST) and each
 *     state's lifetime: an entry past it is absent here and for the agent.
 *   - the tiers: a translated flow moves to the established hash when it is
 *     established; when the hash is full it stays in the LRU and
 *     FP_CTE_PROMOTE_FULL counts it. A TCP close stays where the flow is
 *     and is deleted from the hash by the ACK of its second FIN; a RST
 *     moves it back to the LRU.
 *   - reverse translation (fp_ct_reverse, the only one): replies, hairpin
 *     replies, and ICMP errors quoting a client's packet (RELATED), whose
 *     outer and quoted headers are rewritten with every checksum fixed; and
 *     the other way, a client's error about a reply goes to the backend
 *     (fp_ct_related_forward).
 *   - RELATED for policy: an ICMP error quoting an admitted flow passes.
 *   - ICMP echo is tracked by its identifier (struct fp_l4).
 *   - fragments: later fragments follow their first one's record.
 *   - traffic from outside the node (fp_ct_service_from with `outside`):
 *     the frontend's external entry first, Maglev when it says so, and a
 *     backend on another node gets the flow with the node's address as its
 *     source (SNAT, FP_CT_F_SNAT: the port comes from FP_SNAT_PORT_MIN..MAX,
 *     the reply tuple it makes must be free), so the reply comes back
 *     through this node, which puts the client back (fp_ct_reverse).
 *
 * Cost: a packet of an established translated flow makes one conntrack
 * lookup (the established hash) in each direction; its entry is written at
 * most once a second (refresh) and on a state change.
 */
#ifndef FP_LIB_CT_H
#define FP_LIB_CT_H

#include <uapi/linux/in.h>
#include "lib/parse.h"
#include "lib/lb.h"

#if !defined(FP_CT_TCP_SYN_S) || !defined(FP_CT_TCP_ESTABLISHED_S) || \
    !defined(FP_CT_TCP_FIN_S) || !defined(FP_CT_TCP_CLOSE_S) || !defined(FP_CT_OTHER_S)
#error "conntrack lifetimes are build options (agent/datapath/loader.py, from agent/config.py)"
#endif

#define FP_CT_REFRESH_NS FP_NSEC_PER_SEC

/* ---- lifetimes and state ---- */

static __always_inline __u64 fp_ct_lifetime(__u8 proto, __u8 state)
{
	if (proto != IPPROTO_TCP)
		return FP_CT_OTHER_S * FP_NSEC_PER_SEC;
	if (state == FP_CT_NEW || state == FP_CT_SYN_RECV)
		return FP_CT_TCP_SYN_S * FP_NSEC_PER_SEC;
	if (state == FP_CT_ESTABLISHED)
		return FP_CT_TCP_ESTABLISHED_S * FP_NSEC_PER_SEC;
	if (state == FP_CT_FIN_WAIT)
		return FP_CT_TCP_FIN_S * FP_NSEC_PER_SEC;
	return FP_CT_TCP_CLOSE_S * FP_NSEC_PER_SEC;
}

/* Signed: another CPU may have stamped the entry after `now` was read. */
static __always_inline int fp_ct_expired(__u64 last_seen, __u8 proto, __u8 state, __u64 now)
{
	return (__s64)(now - last_seen) > (__s64)fp_ct_lifetime(proto, state);
}

/* The state after a packet of a flow, sent by its originator (reply = 0)
 * or by the other end (reply = 1). `tcp` is the TCP flags byte. */
static __always_inline __u8 fp_ct_step(__u8 proto, __u8 state, __u8 *flags, __u8 tcp, int reply)
{
	if (proto != IPPROTO_TCP)
		return reply && state == FP_CT_NEW ? FP_CT_ESTABLISHED : state;
	if (tcp & FP_TCP_RST)
		return FP_CT_CLOSED;
	if (tcp & FP_TCP_FIN) {
		*flags |= reply ? FP_CT_F_FIN_REPLY : FP_CT_F_FIN_ORIG;
		if (state == FP_CT_CLOSED)
			return FP_CT_CLOSED;
		if ((*flags & (FP_CT_F_FIN_ORIG | FP_CT_F_FIN_REPLY)) ==
		    (FP_CT_F_FIN_ORIG | FP_CT_F_FIN_REPLY)) {
			/* the second FIN: its sender's peer ACKs it last */
			if (reply)
				*flags |= FP_CT_F_FIN2_REPLY;
			return FP_CT_CLOSED;
		}
		return FP_CT_FIN_WAIT;
	}
	if (state == FP_CT_NEW && reply &&
	    (tcp & (FP_TCP_SYN | FP_TCP_ACK)) == (FP_TCP_SYN | FP_TCP_ACK))
		return FP_CT_SYN_RECV;
	if (state == FP_CT_SYN_RECV && !reply && (tcp & (FP_TCP_SYN | FP_TCP_ACK)) == FP_TCP_ACK)
		return FP_CT_ESTABLISHED;
	return state;
}

/* Whether a packet of a flow closed by its FINs (state FP_CT_CLOSED, both
 * FIN flags) completes the close: no FIN, RST or SYN, sent by the end that
 * did not send the second FIN (its ACK of that FIN). The other end's ACK of
 * the first FIN, which a simultaneous close sends after its own FIN, does
 * not. Every packet of a translated flow asks, and each path here is one
 * more the verifier walks through the rest of the program: the answer is
 * arithmetic, not branches (with branches fp_from_vpc passed the
 * verifier's 1,000,000 instructions), on the entry as stored (volatile,
 * the shape whose walks docs/benchmarks.md reports). */
static __always_inline __u64 fp_ct_close_done(const volatile __u8 *state_p,
					      const volatile __u8 *flags_p, __u8 tcp, int reply)
{
	__u64 state = *state_p, flags = *flags_p;
	__u64 closed = ((state ^ FP_CT_CLOSED) - 1) >> 63;
	__u64 fins = (flags >> 1) & (flags >> 2) & 1;       /* FIN_ORIG and FIN_REPLY */
	__u64 quiet = ((__u64)(tcp & (FP_TCP_FIN | FP_TCP_RST | FP_TCP_SYN)) - 1) >> 63;
	__u64 acker = ((flags >> 5) ^ (__u64)reply) & 1;    /* FIN2_REPLY vs. the sender */

	return closed & fins & quiet & acker;
}
_Static_assert(FP_CT_F_FIN_ORIG == 1 << 1 && FP_CT_F_FIN_REPLY == 1 << 2 &&
	       FP_CT_F_FIN2_REPLY == 1 << 5, "fp_ct_close_done's shifts");

/* ---- translated flows: lookup, tiers ---- */

/* The live entry of `key` and the tier holding it, or NULL. The
 * established hash is asked first: that is where long flows are. */
static __always_inline struct fp_ct4 *fp_ct_nat_get(struct fp_ct4_key *key, int *tier, __u64 now)
{
	struct fp_ct4 *ct = fp_ct_est_get(key);

	*tier = FP_CT_TIER_EST;
	if (ct && !fp_ct_expired(ct->last_seen, key->proto, ct->state, now))
		return ct;
	ct = fp_ct_new_get(key);
	*tier = FP_CT_TIER_NEW;
	if (ct && !fp_ct_expired(ct->last_seen, key->proto, ct->state, now))
		return ct;
	return NULL;
}

/* fp_ct_nat_get for a lookup that mostly misses (every packet between two
 * pods asks whether it is a translated flow's reply): the clock is read
 * only when an entry is found, into *now (0: not read yet). */
static __always_inline struct fp_ct4 *fp_ct_nat_find(struct fp_ct4_key *key, int *tier,
						     __u64 *now)
{
	struct fp_ct4 *ct = fp_ct_est_get(key);

	*tier = FP_CT_TIER_EST;
	if (ct) {
		*now = fp_now();
		if (!fp_ct_expired(ct->last_seen, key->proto, ct->state, *now))
			return ct;
	}
	ct = fp_ct_new_get(key);
	*tier = FP_CT_TIER_NEW;
	if (ct) {
		if (!*now)
			*now = fp_now();
		if (!fp_ct_expired(ct->last_seen, key->proto, ct->state, *now))
			return ct;
	}
	return NULL;
}

static __always_inline int fp_ct_key_eq(const struct fp_ct4_key *a, const struct fp_ct4_key *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	return x[0] == y[0] && x[1] == y[1];
}

/* Remove `key` from a tier if it is there. The keys a new flow clears
 * are almost always absent, and a lookup costs less than deleting an
 * absent key (which takes the bucket's lock). */
static __always_inline void fp_ct_tier_clear(int tier, struct fp_ct4_key *key)
{
	if (fp_ct_tier_get(tier, key))
		fp_ct_tier_del(tier, key);
}

/* Either tier, expired or not (for the partner of an entry being updated),
 * asking `first` first: a flow's two entries live in the same tier, so the
 * partner's is almost always the entry's own (one lookup, not two while a
 * flow is new or closing). */
static __always_inline struct fp_ct4 *fp_ct_nat_any(struct fp_ct4_key *key, int first, int *tier)
{
	struct fp_ct4 *ct = fp_ct_tier_get(first, key);

	*tier = first;
	if (ct)
		return ct;
	*tier = first == FP_CT_TIER_EST ? FP_CT_TIER_NEW : FP_CT_TIER_EST;
	return fp_ct_tier_get(*tier, key);
}

/* The other entry of a translated flow. */
static __always_inline void fp_ct_partner(const struct fp_ct4_key *key, const struct fp_ct4 *ct,
					  struct fp_ct4_key *p)
{
	int hairpin = ct->flags & FP_CT_F_HAIRPIN;

	p->proto = key->proto;
	p->pad = 0;
	if (ct->flags & FP_CT_F_SNAT) {
		/* forward: client -> frontend; reply: backend -> (node, SNAT port) */
		if (key->dir == FP_CT_FORWARD) {
			p->saddr = ct->nat_addr;
			p->daddr = ct->peer_addr;
			p->sport = ct->nat_port;
			p->dport = ct->peer_port;
			p->dir = FP_CT_REPLY;
		} else {
			p->saddr = ct->peer_addr;
			p->daddr = ct->nat_addr;
			p->sport = ct->peer_port;
			p->dport = ct->nat_port;
			p->dir = FP_CT_FORWARD;
		}
		return;
	}
	if (key->dir == FP_CT_FORWARD) {
		p->saddr = ct->nat_addr;
		p->daddr = hairpin ? FP_HAIRPIN_IP : key->saddr;
		p->sport = ct->nat_port;
		p->dport = key->sport;
		p->dir = FP_CT_REPLY;
	} else {
		/* hairpin: the client is the backend itself */
		p->saddr = hairpin ? key->saddr : key->daddr;
		p->daddr = ct->nat_addr;
		p->sport = key->dport;
		p->dport = ct->nat_port;
		p->dir = FP_CT_FORWARD;
	}
}

/* fp_ct_partner for the close of a flow (fp_ct_nat_seen), with `reply`
 * saying which entry `key` is: the same keys, chosen by masks rather than
 * branches, so the verifier walks the close as one path (with branches it
 * walked fp_from_vpc past its limit). */
static __always_inline void fp_ct_close_partner(const struct fp_ct4_key *key,
						const struct fp_ct4 *ct, struct fp_ct4_key *p,
						int reply)
{
	__u32 snat = -(__u32)((ct->flags / FP_CT_F_SNAT) & 1);
	__u32 hp = -(__u32)(ct->flags & FP_CT_F_HAIRPIN);

	/* opaque to the compiler, or it turns the masks back into branches */
	asm volatile("" : "+r"(snat), "+r"(hp));
	p->proto = key->proto;
	p->pad = 0;
	if (!reply) {
		/* SNAT: backend -> (node, SNAT port); hairpin: backend ->
		 * router; else backend -> client */
		p->saddr = ct->nat_addr;
		p->daddr = (ct->peer_addr & snat) |
			   ((((__u32)FP_HAIRPIN_IP & hp) | (key->saddr & ~hp)) & ~snat);
		p->sport = ct->nat_port;
		p->dport = (ct->peer_port & snat) | (key->sport & ~snat);
		p->dir = FP_CT_REPLY;
	} else {
		/* SNAT: the client as it came; hairpin: the backend is the client */
		p->saddr = (ct->peer_addr & snat) |
			   (((key->saddr & hp) | (key->daddr & ~hp)) & ~snat);
		p->daddr = ct->nat_addr;
		p->sport = (ct->peer_port & snat) | (key->dport & ~snat);
		p->dport = ct->nat_port;
		p->dir = FP_CT_FORWARD;
	}
}

/* Move a flow's two entries from their tier to `to`. Written to the new
 * tier first and deleted from the old one after, so a packet on another
 * CPU finds the flow in one of them throughout. A full established hash
 * refuses: the flow stays where it is. */
static __always_inline void fp_ct_move(struct fp_ct4_key *key, struct fp_ct4 *ct, int from,
				       struct fp_ct4_key *pkey, struct fp_ct4 *pct, int pfrom, int to)
{
	struct fp_ct4 a = *ct, b = {};

	if (pct)
		b = *pct;
	if (fp_ct_tier_put(to, key, &a)) {
		fp_ct_event(FP_CTE_PROMOTE_FULL);
		return;
	}
	if (pct && fp_ct_tier_put(to, pkey, &b)) {
		fp_ct_tier_del(to, key);
		fp_ct_event(FP_CTE_PROMOTE_FULL);
		return;
	}
	if (from != to)
		fp_ct_tier_del(from, key);
	if (pct && pfrom != to)
		fp_ct_tier_del(pfrom, pkey);
	fp_ct_event(to == FP_CT_TIER_EST ? FP_CTE_PROMOTED : FP_CTE_DEMOTED);
}

/* A packet of a translated flow went by (reply: from the backend). Moves
 * the state, refreshes both entries (at most once a second unless the
 * state changed), and moves the flow between tiers: into the established
 * hash when established; a TCP flow closing there stays there (its state
 * written in place) until the packet that completes its close
 * (fp_ct_close_done), which deletes both entries, or a RST, which moves it
 * to the LRU for the close lifetime (stray packets after a reset still
 * find it; a RST after both FINs leaves the closed flow where it is, to
 * its close lifetime). Callers read nothing of `ct` after this. */
static __always_inline void fp_ct_nat_seen(struct fp_ct4_key *key, struct fp_ct4 *ct, int tier,
					   __u8 tcp, int reply, __u64 now)
{
	struct fp_ct4_key pkey = {};
	struct fp_ct4 *pct;
	__u8 flags = ct->flags;
	__u8 state = fp_ct_step(key->proto, ct->state, &flags, tcp, reply);
	int ptier = 0, want;

	if (fp_whatif())
		return;
	if (fp_ct_close_done(&ct->state, &ct->flags, tcp, reply)) {
		/* the partner's key is taken before the first delete (a
		 * deleted element may be reused by another CPU at once) */
		fp_ct_close_partner(key, ct, &pkey, reply);
		fp_ct_tier_del(FP_CT_TIER_EST, key);
		fp_ct_tier_del(FP_CT_TIER_EST, &pkey);
		return;
	}
	if (state == ct->state && flags == ct->flags) {
		if ((__s64)(now - ct->last_seen) <= (__s64)FP_CT_REFRESH_NS)
			return;
		ct->last_seen = now;
		fp_ct_partner(key, ct, &pkey);
		pct = fp_ct_nat_any(&pkey, tier, &ptier);
		if (pct)
			pct->last_seen = now;
		/* established, but left in the LRU map when the established
		 * one was full: try again, once a second at most */
		if (state == FP_CT_ESTABLISHED && tier != FP_CT_TIER_EST)
			fp_ct_move(key, ct, tier, &pkey, pct, ptier, FP_CT_TIER_EST);
		return;
	}
	ct->state = state;
	ct->flags = flags;
	ct->last_seen = now;
	fp_ct_partner(key, ct, &pkey);
	pct = fp_ct_nat_any(&pkey, tier, &ptier);
	if (pct) {
		pct->state = state;
		pct->flags = flags;
		pct->last_seen = now;
	}
	want = tier;
	if (state == FP_CT_ESTABLISHED)
		want = FP_CT_TIER_EST;
	else if (state == FP_CT_CLOSED && (tcp & FP_TCP_RST))
		want = FP_CT_TIER_NEW;
	if (want != tier || (pct && ptier != want))
		fp_ct_move(key, ct, tier, &pkey, pct, ptier, want);
}

/* ---- the forward direction: Service translation ---- */

/* The service entry a packet to (daddr, dport, proto) uses: traffic from
 * outside takes the frontend's external entry (its own backends, Maglev)
 * when it has one, else the one entry the frontend has for everyone. The
 * internal entry is asked first: one marked FP_SVC_F_SOLE (the usual
 * NodePort) says there is no external entry to look for. */
static __always_inline struct fp_svc4 *fp_ct_frontend(const struct fp_ipv4 *ip,
						      const struct fp_l4 *l4, int outside)
{
	struct fp_svc4 *svc = fp_service_lookup(ip->daddr, l4->dport, ip->proto), *ext;

	if (outside && !(svc && (svc->flags & FP_SVC_F_SOLE))) {
		ext = fp_service_lookup_scope(ip->daddr, l4->dport, ip->proto, FP_SCOPE_EXTERNAL);
		if (ext)
			svc = ext;
	}
	return svc;
}

/* A source port for a flow SNATed to (snat, port) towards (baddr, bport):
 * one whose reply tuple no live flow holds. -1 after FP_SNAT_TRIES tries. */
static __always_inline int fp_ct_snat_port(__be32 snat, __be32 baddr, __be16 bport, __u8 proto,
					   __u64 now, __be16 *out)
{
	struct fp_ct4_key rk = {};
	__u32 range = FP_SNAT_PORT_MAX - FP_SNAT_PORT_MIN + 1;
	__u32 start = bpf_get_prandom_u32() % range;
	int i, tier = 0;

	rk.saddr = baddr;
	rk.daddr = snat;
	rk.sport = bport;
	rk.proto = proto;
	rk.dir = FP_CT_REPLY;
#pragma unroll
	for (i = 0; i < FP_SNAT_TRIES; i++) {
		__u32 p = start + i;

		if (p >= range)
			p -= range;
		rk.dport = bpf_htons((__u16)(FP_SNAT_PORT_MIN + p));
		if (!fp_ct_nat_get(&rk, &tier, now)) {
			*out = rk.dport;
			return 0;
		}
	}
	return -1;
}

/* The reply entry of a new (or restarted) translated flow, keyed by the
 * backend's tuple back to the client: it names the frontend to put back as
 * the source and, with SNAT, the client to put back as the destination. */
static __always_inline void fp_ct_reply_entry(struct fp_ct4 *reply, const struct fp_ipv4 *ip,
					      const struct fp_l4 *l4, int hairpin, int snat,
					      __u32 backend_id, __u32 svc_id, __u64 now)
{
	reply->last_seen = now;
	reply->flags = (hairpin ? FP_CT_F_HAIRPIN : 0) | (snat ? FP_CT_F_SNAT : 0);
	reply->state = FP_CT_NEW;
	reply->nat_addr = ip->daddr;
	reply->nat_port = l4->dport;
	reply->backend_id = backend_id;
	reply->svc_id = svc_id;
	if (snat) {
		reply->peer_addr = ip->saddr;
		reply->peer_port = l4->sport;
	}
}

/* DNAT a packet addressed to a frontend (and SNAT it, for a flow from
 * outside to a backend on another node). Returns 0 when translated (ip and
 * l4 then describe the rewritten packet), 1 when the destination is not a
 * service, and -1 (with *reason) when the packet must be dropped:
 * FP_DROP_NO_BACKEND (an opening packet, nothing to pick: the caller
 * rejects it), FP_DROP_NO_LOCAL_BACKEND (endpoints exist, none for these
 * clients here), FP_DROP_SOURCE_RANGE (loadBalancerSourceRanges),
 * FP_DROP_SNAT_NO_PORT, FP_DROP_CT_NO_BACKEND (a mid-stream packet of a
 * flow conntrack does not know), FP_DROP_CSUM.
 * `outside`: the packet arrived on one of the node's interfaces (the
 * primary NIC or an ENI), not from a local pod. */
/* fp_ct_service_from's `outside` for the node's own packets (fp_to_vpc_node,
 * fp_lo): the inside view as for a pod, but a backend at the client's own
 * address is the node reaching itself (lib/lo.h), not a pod's hairpin. */
#define FP_CT_FROM_NODE 2

static __always_inline int fp_ct_service_from(struct __sk_buff *skb, struct fp_ipv4 *ip,
					      struct fp_l4 *l4, enum fp_reason *reason, int outside)
{
	struct fp_svc4 *svc;
	struct fp_ct4_key *fwd, *rev, *old_rev;
	struct fp_ct4 *ct, *entry, *reply;
	struct fp_ct_work *w;
	struct fp_backend4 *be;
	__u32 backend_id = 0;
	__be32 baddr, snat_addr = 0;
	__be16 bport, snat_port = 0;
	int tier = 0, hairpin, keep = 0, had_old = 0, snat = 0;
	__u64 now;

	int from_node = outside == FP_CT_FROM_NODE;

	if (from_node)
		outside = 0;
	if (l4->kind != FP_L4_PORTS)
		return 1;
	svc = fp_ct_frontend(ip, l4, outside);
	if (!svc)
		return 1;
	w = fp_ct_work_scratch();
	if (!w) {
		*reason = FP_DROP_INVALID;
		return -1;
	}
	__builtin_memset(w, 0, sizeof(*w));
	fwd = &w->fwd;
	rev = &w->rev;
	old_rev = &w->old_rev;
	entry = &w->entry;
	reply = &w->reply;
	now = fp_now();
	fwd->saddr = ip->saddr;
	fwd->daddr = ip->daddr;
	fwd->sport = l4->sport;
	fwd->dport = l4->dport;
	fwd->proto = ip->proto;
	fwd->dir = FP_CT_FORWARD;

	ct = fp_ct_nat_get(fwd, &tier, now);
	if (ct) {
		if (ct->svc_id != svc->svc_id)
			keep = 0;          /* the frontend was re-created since */
		else if (!l4->opening)
			keep = 1;          /* mid-stream: wherever it was sent */
		else if (ip->proto == IPPROTO_TCP && ct->state >= FP_CT_FIN_WAIT)
			keep = 0;          /* a new connection on a closing tuple */
		else
			keep = fp_backend_lookup(ct->backend_id) != NULL;
		if (!keep) {
			had_old = 1;
			fp_ct_partner(fwd, ct, old_rev);
		}
	}

	if (keep) {
		baddr = ct->nat_addr;
		bport = ct->nat_port;
		backend_id = ct->backend_id;
		hairpin = ct->flags & FP_CT_F_HAIRPIN;
		snat = ct->flags & FP_CT_F_SNAT;
		snat_addr = ct->peer_addr;
		snat_port = ct->peer_port;
		if (l4->opening && ip->proto == IPPROTO_TCP) {
			/* A retransmitted SYN, or a new connection on the tuple
			 * of a live one: the handshake starts again, and the
			 * reply entry is written again (a direct SYN on the
			 * backend's tuple in between retires it), or the SYN-ACK
			 * would reach the client from the backend, not the VIP. */
			if (!fp_whatif()) {
				ct->state = FP_CT_NEW;
				ct->flags &= FP_CT_F_HAIRPIN | FP_CT_F_SNAT;
				ct->last_seen = now;
			}
			fp_ct_partner(fwd, ct, rev);
			fp_ct_reply_entry(reply, ip, l4, hairpin, snat, backend_id, svc->svc_id, now);
			fp_ct_tier_put(tier, rev, reply);
		} else {
			fp_ct_nat_seen(fwd, ct, tier, l4->tcp_flags, 0, now);
		}
	} else {
		if (!l4->opening) {
			*reason = FP_DROP_CT_NO_BACKEND;
			return -1;
		}
		if (svc->flags & FP_SVC_F_DROP) {
			*reason = FP_DROP_NO_LOCAL_BACKEND;
			return -1;
		}
		if ((svc->flags & FP_SVC_F_SRC_RANGE) && !fp_src_range_ok(svc->svc_id, ip->saddr)) {
			*reason = FP_DROP_SOURCE_RANGE;
			return -1;
		}
		be = fp_lb_pick_flow(svc, ip->saddr,
				     outside && (svc->flags & FP_SVC_F_MAGLEV)
					     ? fp_maglev_hash(ip->saddr, l4->sport, l4->dport, ip->proto)
					     : FP_NO_MAGLEV, &backend_id, now);
		if (!be) {
			*reason = FP_DROP_NO_BACKEND;
			return -1;
		}
		baddr = be->ip;
		bport = be->port;
		hairpin = baddr == ip->saddr && !from_node;
		if (outside && !hairpin && !fp_endpoint_lookup(baddr)) {
			/* the backend is on another node: its reply must come back
			 * through this one, which alone can put the client back */
			struct fp_config *cfg = fp_config_get();

			if (cfg && cfg->node_ip4) {
				snat = 1;
				snat_addr = cfg->node_ip4;
				if (fp_ct_snat_port(snat_addr, baddr, bport, ip->proto, now, &snat_port)) {
					*reason = FP_DROP_SNAT_NO_PORT;
					return -1;
				}
			}
		}
		rev->saddr = baddr;
		rev->daddr = hairpin ? FP_HAIRPIN_IP : (snat ? snat_addr : ip->saddr);
		rev->sport = bport;
		rev->dport = snat ? snat_port : l4->sport;
		rev->proto = ip->proto;
		rev->dir = FP_CT_REPLY;
		/* the old flow on this tuple: its reply entry may name another
		 * backend, and its forward one another tier. From outside, when
		 * its reply key is the new one (the same backend again, as a
		 * client reusing its port mostly gets), the clearing and writing
		 * of that key below do it. (Not from pods: fp_from_pod's verifier
		 * walk passes its limit with the test.) */
		if (had_old && (!outside || !fp_ct_key_eq(old_rev, rev))) {
			fp_ct_tier_clear(FP_CT_TIER_EST, old_rev);
			fp_ct_tier_clear(FP_CT_TIER_NEW, old_rev);
		}
		entry->last_seen = now;
		entry->flags = (hairpin ? FP_CT_F_HAIRPIN : 0) | (snat ? FP_CT_F_SNAT : 0);
		entry->state = FP_CT_NEW;
		entry->nat_addr = baddr;
		entry->nat_port = bport;
		entry->backend_id = backend_id;
		entry->svc_id = svc->svc_id;
		entry->peer_addr = snat_addr;
		entry->peer_port = snat_port;
		fp_ct_reply_entry(reply, ip, l4, hairpin, snat, backend_id, svc->svc_id, now);
		/* A new flow starts in the LRU; stale entries of the same keys
		 * in the established hash (expired, not yet collected) would
		 * hide it from lookups. */
		fp_ct_tier_clear(FP_CT_TIER_EST, fwd);
		fp_ct_tier_clear(FP_CT_TIER_EST, rev);
		fp_ct_tier_put(FP_CT_TIER_NEW, fwd, entry);
		fp_ct_tier_put(FP_CT_TIER_NEW, rev, reply);
		fp_ct_event(FP_CTE_CREATED);
	}

	if (fp_nat_rewrite(skb, ip, l4, 0, ip->daddr, baddr, l4->dport, bport)) {
		*reason = FP_DROP_CSUM;
		return -1;
	}
	ip->daddr = baddr;
	l4->dport = bport;
	if (hairpin) {
		__be32 router = FP_HAIRPIN_IP;

		if (fp_nat_rewrite(skb, ip, l4, 1, ip->saddr, router, l4->sport, l4->sport)) {
			*reason = FP_DROP_CSUM;
			return -1;
		}
		ip->saddr = router;
	} else if (snat) {
		if (fp_nat_rewrite(skb, ip, l4, 1, ip->saddr, snat_addr, l4->sport, snat_port)) {
			*reason = FP_DROP_CSUM;
			return -1;
		}
		ip->saddr = snat_addr;
		l4->sport = snat_port;
	}
	fp_decision_nat(svc->svc_id, backend_id, ip->daddr, l4->dport);
	*reason = FP_FWD_SVC;
	return 0;
}

/* Translation of a pod's packet (the in-cluster view: no SNAT, no Maglev). */
static __always_inline int fp_ct_service(struct __sk_buff *skb, struct fp_ipv4 *ip,
					 struct fp_l4 *l4, enum fp_reason *reason)
{
	return fp_ct_service_from(skb, ip, l4, reason, 0);
}

/* A new TCP connection that is not translated (its SYN goes straight to a
 * pod) may reuse the 4-tuple of an earlier translated one; the reply entry
 * of that old flow would turn the new flow's SYN-ACK into one "from the VIP"
 * and the connection would hang. The SYN retires it. */
static __always_inline void fp_ct_forget_reply(const struct fp_ipv4 *ip, const struct fp_l4 *l4)
{
	struct fp_ct4_key key = {};

	if (l4->kind != FP_L4_PORTS || !l4->opening || ip->proto != IPPROTO_TCP)
		return;
	key.saddr = ip->daddr;
	key.daddr = ip->saddr;
	key.sport = l4->dport;
	key.dport = l4->sport;
	key.proto = IPPROTO_TCP;
	key.dir = FP_CT_REPLY;
	fp_ct_tier_clear(FP_CT_TIER_EST, &key);
	fp_ct_tier_clear(FP_CT_TIER_NEW, &key);
}

/* ---- ICMP errors: the packet they quote ---- */

struct fp_quote {
	__u32 off;             /* HBO: the quoted IPv4 header */
	__u32 l4_off;          /* HBO: the quoted transport header */
	__be32 saddr;          /* NBO */
	__be32 daddr;          /* NBO */
	__be16 sport;          /* NBO; quoted ICMP echo: as in struct fp_l4 */
	__be16 dport;          /* NBO */
	__u8 proto;
};

/* The tuple of the packet an ICMP error quotes (RFC 792: its IP header and
 * at least 8 bytes after it). -1 when there is none to use. */
static __always_inline int fp_ct_quote(struct __sk_buff *skb, const struct fp_l4 *l4,
				       struct fp_quote *q)
{
	struct iphdr qh;
	__be16 w[3];

	if (l4->kind != FP_L4_ICMP_ERR)
		return -1;
	q->off = l4->off + 8;
	if (bpf_skb_load_bytes(skb, q->off, &qh, sizeof(qh)))
		return -1;
	if (qh.version != 4 || qh.ihl < 5 || (qh.frag_off & bpf_htons(FP_IP_OFFSET)))
		return -1;
	q->l4_off = q->off + qh.ihl * 4;
	q->saddr = qh.saddr;
	q->daddr = qh.daddr;
	q->proto = qh.protocol;
	q->sport = 0;
	q->dport = 0;
	if (bpf_skb_load_bytes(skb, q->l4_off, w, sizeof(w)))
		return -1;
	if (qh.protocol == IPPROTO_TCP || qh.protocol == IPPROTO_UDP ||
	    qh.protocol == IPPROTO_SCTP) {
		q->sport = w[0];
		q->dport = w[1];
		return 0;
	}
	if (qh.protocol == IPPROTO_ICMP) {
		__u8 type = ((__u8 *)w)[0];

		if (type == FP_ICMP_ECHO) {
			q->sport = w[2];
			return 0;
		}
		if (type == FP_ICMP_ECHOREPLY) {
			q->dport = w[2];
			return 0;
		}
	}
	return -1;
}

static __always_inline __u16 fp_csum_reduce(__u64 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* A ones' complement checksum field after data it covers changed by
 * `diff` (a bpf_csum_diff() result). */
static __always_inline __u16 fp_csum_update(__u16 check, __s64 diff)
{
	__u64 s = (__u16)~check;

	s += (__u32)diff;
	return (__u16)~fp_csum_reduce(s);
}

/* The tuple of the packet an ICMP error quotes, reversed: the key of the
 * entry for the other direction of the quoted packet's flow (the caller
 * sets key->dir). */
static __always_inline void fp_ct_quote_key(struct fp_ct4_key *key, const struct fp_quote *q)
{
	key->saddr = q->daddr;
	key->daddr = q->saddr;
	key->sport = q->dport;
	key->dport = q->sport;
	key->proto = q->proto;
}

/* Rewrite the packet an ICMP error quotes to (qsrc:qsport -> qdst:qdport),
and the error's own addresses to (osrc -> odst). Fixed: the quoted IP
header checksum, the quoted TCP/UDP checksum when the quote holds it (a
zero UDP checksum stays zero), the ICMP checksum and the outer IP header
checksum. The quoted SCTP CRC is left as is: the receiver reads the ports
of an SCTP quote, never checks its CRC. */
static __always_inline int fp_ct_quote_rewrite(struct __sk_buff *skb, struct fp_ipv4 *ip,
					       const struct fp_l4 *l4, const struct fp_quote *q,
					       __be32 qsrc, __be32 qdst, __be16 qsport,
					       __be16 qdport, __be32 osrc, __be32 odst)
{
	/* the quoted words that can change: saddr, daddr, (ttl, protocol,
	 * check), the ports, and the word holding the L4 checksum */
	__be32 o[5] = {}, n[5] = {};
	__u32 csum_word_off = 0;
	__s64 d_addr, d_l4, d_icmp;
	__u16 check;

	o[0] = q->saddr;
	o[1] = q->daddr;
	n[0] = qsrc;
	n[1] = qdst;
	if (bpf_skb_load_bytes(skb, q->off + 8, &o[2], 4) ||
	    bpf_skb_load_bytes(skb, q->l4_off, &o[3], 4))
		return -1;
	n[2] = o[2];
	__builtin_memcpy((__u8 *)&n[3], &qsport, 2);
	__builtin_memcpy((__u8 *)&n[3] + 2, &qdport, 2);
	d_addr = bpf_csum_diff(&o[0], 8, &n[0], 8, 0);
	check = fp_csum_update(((__u16 *)&o[2])[1], d_addr);
	((__u16 *)&n[2])[1] = check;

	if (q->proto == IPPROTO_UDP)
		csum_word_off = q->l4_off + 4;
	else if (q->proto == IPPROTO_TCP && q->l4_off + 20 <= skb->len)
		csum_word_off = q->l4_off + 16;
	if (csum_word_off) {
		__u16 l4sum;
		int hi = q->proto == IPPROTO_UDP;  /* UDP: (len, check); TCP: (check, urg) */

		if (bpf_skb_load_bytes(skb, csum_word_off, &o[4], 4))
			return -1;
		n[4] = o[4];
		l4sum = hi ? ((__u16 *)&o[4])[1] : ((__u16 *)&o[4])[0];
		if (!(q->proto == IPPROTO_UDP && l4sum == 0)) {
			d_l4 = bpf_csum_diff(&o[3], 4, &n[3], 4, d_addr);
			l4sum = fp_csum_update(l4sum, d_l4);
			if (q->proto == IPPROTO_UDP && l4sum == 0)
				l4sum = 0xffff;
			if (hi)
				((__u16 *)&n[4])[1] = l4sum;
			else
				((__u16 *)&n[4])[0] = l4sum;
		}
	}
	d_icmp = bpf_csum_diff(o, sizeof(o), n, sizeof(n), 0);
	if (bpf_skb_store_bytes(skb, q->off + 8, &n[2], 4, 0) ||
	    bpf_skb_store_bytes(skb, q->off + 12, &n[0], 8, 0) ||
	    bpf_skb_store_bytes(skb, q->l4_off, &n[3], 4, 0))
		return -1;
	if (csum_word_off && bpf_skb_store_bytes(skb, csum_word_off, &n[4], 4, 0))
		return -1;
	if (bpf_l4_csum_replace(skb, l4->off + 2, 0, d_icmp, 0))
		return -1;

	if (osrc != ip->saddr) {
		if (bpf_l3_csum_replace(skb, ip->l3_off + offsetof(struct iphdr, check),
					ip->saddr, osrc, 4) ||
		    bpf_skb_store_bytes(skb, ip->l3_off + offsetof(struct iphdr, saddr), &osrc, 4, 0))
			return -1;
		ip->saddr = osrc;
	}
	if (odst != ip->daddr) {
		if (bpf_l3_csum_replace(skb, ip->l3_off + offsetof(struct iphdr, check),
					ip->daddr, odst, 4) ||
		    bpf_skb_store_bytes(skb, ip->l3_off + offsetof(struct iphdr, daddr), &odst, 4, 0))
			return -1;
		ip->daddr = odst;
	}
	return 0;
}

/* An ICMP error from a client about a reply it got from a VIP (its socket
 * closed, say): the quote is the reply as the client saw it, so the flow's
 * forward entry is that tuple reversed. The error goes to the backend, about
 * the reply as the backend sent it. Returns 0 when translated (ip describes
 * the rewritten packet), 1 when it belongs to no translated flow, -1 when a
 * rewrite failed. (Hairpinned flows are left alone: client and backend are
 * one pod.) */
static __always_inline int fp_ct_related_forward(struct __sk_buff *skb, struct fp_ipv4 *ip,
						 const struct fp_l4 *l4)
{
	struct fp_ct4_key key = {};
	struct fp_quote q = {};
	struct fp_ct4 *ct;
	int tier = 0, snat;
	__be32 backend, caddr;
	__be16 bport, cport;

	if (fp_ct_quote(skb, l4, &q))
		return 1;
	fp_ct_quote_key(&key, &q);
	key.dir = FP_CT_FORWARD;
	ct = fp_ct_nat_get(&key, &tier, fp_now());
	if (!ct || (ct->flags & FP_CT_F_HAIRPIN))
		return 1;
	backend = ct->nat_addr;
	bport = ct->nat_port;
	/* SNAT: the backend sent its reply to the node's SNAT address and
	 * port, and the error must come from there too */
	snat = ct->flags & FP_CT_F_SNAT;
	caddr = snat ? ct->peer_addr : q.daddr;
	cport = snat ? ct->peer_port : q.dport;
	if (fp_ct_quote_rewrite(skb, ip, l4, &q, backend, caddr, bport, cport,
				snat ? ct->peer_addr : ip->saddr,
				ip->daddr == q.saddr ? backend : ip->daddr))
		return -1;
	fp_ct_event(FP_CTE_RELATED);
	return 0;
}

/* ---- the reply direction: reverse translation ---- */

/* Put the VIP back on a packet of a translated flow's reply direction: a
 * reply from the backend (hairpin, SNAT: also the client as destination), or an
 * ICMP error quoting one of the client's packets. Returns 1 when the packet
 * was rewritten, 0 when it belongs to no translated flow, -1 when a rewrite
 * failed. Replies move the flow's state; errors do not. */
static __always_inline int fp_ct_reverse(struct __sk_buff *skb, struct fp_ipv4 *ip,
					 struct fp_l4 *l4)
{
	struct fp_ct4_key key = {};
	struct fp_ct4 *ct;
	struct fp_quote q = {};
	__u64 now = 0;
	__be32 vip, client;
	__be16 vport, cport;
	int tier = 0, hairpin, snat;

	if (l4->kind == FP_L4_ICMP_ERR) {
		if (fp_ct_quote(skb, l4, &q))
			return 0;
		/* the quote is the client's packet after DNAT: the flow's
		 * reply entry is its tuple reversed */
		fp_ct_quote_key(&key, &q);
	} else if (l4->kind == FP_L4_PORTS) {
		key.saddr = ip->saddr;
		key.daddr = ip->daddr;
		key.sport = l4->sport;
		key.dport = l4->dport;
		key.proto = ip->proto;
	} else {
		return 0;
	}
	key.dir = FP_CT_REPLY;
	ct = fp_ct_nat_find(&key, &tier, &now);
	if (!ct)
		return 0;
	vip = ct->nat_addr;
	vport = ct->nat_port;
	hairpin = ct->flags & FP_CT_F_HAIRPIN;
	snat = ct->flags & FP_CT_F_SNAT;
	client = ct->peer_addr;
	cport = ct->peer_port;
	if (l4->kind == FP_L4_ICMP_ERR) {
		/* The quote is the client's packet after DNAT: it gets the VIP
		 * and Service port back as its destination (hairpin: the client
		 * back as its source; SNAT: the client's address and port back
		 * as its source); the error comes from the VIP when the backend
		 * sent it (hairpin: it goes to the client; SNAT: an error sent to
		 * the node's SNAT address goes to the client). */
		if (fp_ct_quote_rewrite(skb, ip, l4, &q,
					hairpin ? q.daddr : (snat ? client : q.saddr), vip,
					snat ? cport : q.sport, vport,
					ip->saddr == q.daddr ? vip : ip->saddr,
					hairpin && ip->daddr == FP_HAIRPIN_IP ? q.daddr :
					(snat && ip->daddr == q.saddr ? client : ip->daddr)))
			return -1;
		fp_ct_event(FP_CTE_RELATED);
		return 1;
	}
	/* (the entry may move between tiers here: nothing is read after) */
	fp_ct_nat_seen(&key, ct, tier, l4->tcp_flags, 1, now);
	if (hairpin) {
		/* the client is the backend itself */
		client = ip->saddr;
		if (fp_nat_rewrite(skb, ip, l4, 0, ip->daddr, client, l4->dport, l4->dport))
			return -1;
		ip->daddr = client;
	} else if (snat) {
		/* the reply reached the node's SNAT address: the client again */
		if (fp_nat_rewrite(skb, ip, l4, 0, ip->daddr, client, l4->dport, cport))
			return -1;
		ip->daddr = client;
		l4->dport = cport;
	}
	if (fp_nat_rewrite(skb, ip, l4, 1, ip->saddr, vip, l4->sport, vport))
		return -1;
	ip->saddr = vip;
	l4->sport = vport;
	return 1;
}

/* ---- flows NetworkPolicy admitted ---- */

/* The policy key of a tuple: lower (address, port) end first, so one entry
 * serves both directions. Returns 1 when the tuple was swapped (its source
 * is the key's daddr end). */
static __always_inline int fp_ct_policy_key(struct fp_ct4_key *key, __be32 saddr, __be32 daddr,
					    __be16 sport, __be16 dport, __u8 proto)
{
	int swap = saddr > daddr || (saddr == daddr && sport > dport);

	key->saddr = swap ? daddr : saddr;
	key->daddr = swap ? saddr : daddr;
	key->sport = swap ? dport : sport;
	key->dport = swap ? sport : dport;
	key->proto = proto;
	key->dir = FP_CT_POLICY;
	key->pad = 0;
	return swap;
}

/* Whether the packet belongs to an admitted flow; if so its state moves
 * and the entry is refreshed. A TCP SYN on an established or closing
 * entry is a new connection and must be judged again. */
static __always_inline int fp_ct_policy_seen(const struct fp_ipv4 *ip, const struct fp_l4 *l4,
					     __u64 now)
{
	struct fp_ct4_key key = {};
	struct fp_ctpol4 *ct;
	int swap = fp_ct_policy_key(&key, ip->saddr, ip->daddr, l4->sport, l4->dport, ip->proto);
	int reply;
	__u8 flags, state;

	ct = fp_ctpol_get(&key);
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
		/* a coarse refresh keeps the entry's cache line mostly read-only */
		ct->last_seen = now;
	}
	return 1;
}

/* Remember a flow policy just admitted. ICMP is remembered only for an
 * echo request (its reply then matches by identifier); an error or an
 * unsolicited reply admits only itself. */
static __always_inline void fp_ct_policy_admit(const struct fp_ipv4 *ip, const struct fp_l4 *l4,
					       __u64 now)
{
	struct fp_ct4_key key = {};
	struct fp_ctpol4 val = {};
	int swap;

	if (ip->proto == IPPROTO_ICMP && !(l4->kind == FP_L4_ECHO && l4->opening))
		return;
	swap = fp_ct_policy_key(&key, ip->saddr, ip->daddr, l4->sport, l4->dport, ip->proto);
	val.last_seen = now;
	val.flags = swap ? FP_CT_F_ORIG_HIGH : 0;
	/* a TCP flow first seen mid-stream (admitted before enforcement was
	 * on, or its entry lost) is taken as established */
	val.state = ip->proto == IPPROTO_TCP && !l4->opening ? FP_CT_ESTABLISHED : FP_CT_NEW;
	fp_ctpol_put(&key, &val);
}

/* An ICMP error quoting a packet of an admitted flow (RELATED). */
static __always_inline int fp_ct_policy_related(struct __sk_buff *skb, const struct fp_l4 *l4,
						__u64 now)
{
	struct fp_ct4_key key = {};
	struct fp_quote q = {};
	struct fp_ctpol4 *ct;

	if (fp_ct_quote(skb, l4, &q))
		return 0;
	fp_ct_policy_key(&key, q.saddr, q.daddr, q.sport, q.dport, q.proto);
	ct = fp_ctpol_get(&key);
	return ct && !fp_ct_expired(ct->last_seen, q.proto, ct->state, now);
}

/* ---- fragments ---- */

/* A fragment after the first takes what its first one got: the same
 * addresses (the IP header checksum fixed; there is no L4 header to fix)
 * and the same verdict. Returns 0 when the packet may go on (rewritten),
 * 1 when there is no record, -1 to drop it with *reason. l4's ports are
 * set to the first fragment's, for reports. */
static __always_inline int fp_ct_frag_follow(struct __sk_buff *skb, struct fp_ipv4 *ip,
					     struct fp_l4 *l4, enum fp_reason *reason)
{
	struct fp_frag4_key key = {};
	struct fp_frag4 *f;
	__be32 saddr, daddr;
	__u64 now = fp_now();

	key.saddr = ip->saddr;
	key.daddr = ip->daddr;
	key.id = ip->id;
	key.proto = ip->proto;
	f = fp_frag_get(&key);
	if (!f || (__s64)(now - f->first_seen) > (__s64)FP_FRAG_LIFETIME_NS)
		return 1;
	l4->sport = f->sport;
	l4->dport = f->dport;
	if (f->reason >= FP_REASON_DROP_MIN) {
		*reason = f->reason;
		return -1;
	}
	saddr = f->saddr;
	daddr = f->daddr;
	if (daddr != ip->daddr) {
		if (bpf_l3_csum_replace(skb, ip->l3_off + offsetof(struct iphdr, check),
					ip->daddr, daddr, 4) ||
		    bpf_skb_store_bytes(skb, ip->l3_off + offsetof(struct iphdr, daddr), &daddr, 4, 0))
			goto bad;
		ip->daddr = daddr;
	}
	if (saddr != ip->saddr) {
		if (bpf_l3_csum_replace(skb, ip->l3_off + offsetof(struct iphdr, check),
					ip->saddr, saddr, 4) ||
		    bpf_skb_store_bytes(skb, ip->l3_off + offsetof(struct iphdr, saddr), &saddr, 4, 0))
			goto bad;
		ip->saddr = saddr;
	}
	fp_ct_event(FP_CTE_FRAG_FOLLOWED);
	return 0;
bad:
	*reason = FP_DROP_CSUM;
	return -1;
}

/* After a first fragment was decided: what the rest of its datagram gets.
 * `arrived_*` are its addresses as it arrived, `ip` as it leaves. */
static __always_inline void fp_ct_frag_record(const struct fp_ipv4 *ip, __be32 arrived_saddr,
					      __be32 arrived_daddr, __be16 sport, __be16 dport,
					      enum fp_reason reason)
{
	struct fp_frag4_key key = {};
	struct fp_frag4 val = {};

	if (!fp_ip_first_fragment(ip))
		return;
	key.saddr = arrived_saddr;
	key.daddr = arrived_daddr;
	key.id = ip->id;
	key.proto = ip->proto;
	val.first_seen = fp_now();
	val.saddr = ip->saddr;
	val.daddr = ip->daddr;
	val.sport = sport;
	val.dport = dport;
	val.reason = reason;
	fp_frag_put(&key, &val);
}

#endif /* FP_LIB_CT_H */
