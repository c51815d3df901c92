/* IPv6 connection tracking and per-packet Service translation.
 *
 * lib/ct.h's decisions for IPv6 packets of pods, in the IPv6 twin maps
 * (FP_MAP_CT6 established, FP_MAP_CT_NEW6 new and closing): a translated
 * flow has a forward entry (client -> VIP, naming the backend) and a reply
 * entry (backend -> client, naming the VIP); the opening packet of a flow
 * (TCP SYN without ACK, any UDP datagram) picks a backend (fp_lb6_pick), a
 * TCP packet without a forward entry is dropped (FP_DROP_CT_NO_BACKEND),
 * never sent to a new backend mid-stream; a UDP flow whose backend is gone
 * picks again. States, lifetimes and tier moves are IPv4's: fp_ct_step,
 * fp_ct_lifetime and fp_ct_expired are shared, not restated.
 *
 * Differences from IPv4, all from the family:
 *   - no IP header checksum; the TCP/UDP checksum covers the 16-byte
 *     addresses in its pseudo-header and is fixed by one bpf_csum_diff of
 *     the old and new address (bpf_l4_csum_replace with a diff);
 *   - a UDP checksum of zero is invalid in IPv6: a result of zero is
 *     written as 0xffff (BPF_F_MARK_MANGLED_0), never left zero;
 *   - a hairpinned flow (the backend is the client) is sourced from
 *     FP_HAIRPIN_IP6 (hairpin_source_ipv6), a global-scope address: a pod
 *     answers a link-local peer from its own link-local address, which the
 *     reply entry could not match;
 *   - SCTP's CRC32c covers no pseudo-header: an address change leaves it
 *     as it is, a port change updates it as IPv4's does (lib/lb.h);
 *   - a pod's packet to an IPv6 NodePort, external or load-balancer IP
 *     takes the frontend's internal entry like a ClusterIP (the
 *     cluster-wide set), a load-balancer IP's IPv6 source ranges
 *     (FP_MAP_SRC_RANGE6) holding for new flows as for IPv4; traffic from
 *     outside (fp_ct6_service_from with `outside`) takes the external
 *     entry and is SNATed for a backend on another node.
 * ICMPv6 errors quoting a client's translated packet (packet too big,
 * unreachable) are rewritten on their way back to it, and a client's error
 * about a reply is sent on to the backend (RELATED, both ways); the
 * fragments after a translated first fragment follow it (fp_frag6_v1).
 */
#ifndef FP_LIB_CT6_H
#define FP_LIB_CT6_H

#include "lib/ct.h"
#include "lib/lb6.h"
#include "lib/parse6.h"

#ifndef FP_HAIRPIN_IP6_0
#error "the IPv6 hairpin address is a build option (agent/datapath/loader.py, hairpin_source_ipv6)"
#endif

static __always_inline int fp_ip6_eq(const __u32 *a, const __u32 *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3])) == 0;
}

static __always_inline void fp_ip6_hairpin(__u32 *a)
{
	a[0] = FP_HAIRPIN_IP6_0;
	a[1] = FP_HAIRPIN_IP6_1;
	a[2] = FP_HAIRPIN_IP6_2;
	a[3] = FP_HAIRPIN_IP6_3;
}

static __always_inline int fp_ip6_is_hairpin(const __u32 *a)
{
	return a[0] == FP_HAIRPIN_IP6_0 && a[1] == FP_HAIRPIN_IP6_1 &&
	       a[2] == FP_HAIRPIN_IP6_2 && a[3] == FP_HAIRPIN_IP6_3;
}

/* The transport header of an IPv6 packet (after the extension header
 * walk), as fp_parse_l4 reads IPv4's: TCP and UDP ports, TCP flags,
 * ICMPv6 echo identifiers and errors. */
static __always_inline void fp_parse_l4_6(struct __sk_buff *skb, const struct fp_ipv6 *ip,
					  struct fp_l4 *l4)
{
	__u8 b[14];

	l4->sport = 0;
	l4->dport = 0;
	l4->tcp_flags = 0;
	l4->icmp_type = 0;
	l4->opening = 0;
	l4->kind = FP_L4_NONE;
	l4->off = ip->l4_off;
	if (ip->frag == FP_IP6_LATER_FRAG) {
		l4->kind = FP_L4_LATER_FRAG;
		return;
	}
	if (ip->proto == FP_NH_ICMPV6) {
		if (bpf_skb_load_bytes(skb, l4->off, b, 8))
			return;
		l4->icmp_type = b[0];
		if (b[0] == FP_ICMP6_ECHO || b[0] == FP_ICMP6_ECHOREPLY) {
			l4->kind = FP_L4_ECHO;
			if (b[0] == FP_ICMP6_ECHO) {
				__builtin_memcpy(&l4->sport, &b[4], 2);
				l4->opening = 1;
			} else {
				__builtin_memcpy(&l4->dport, &b[4], 2);
			}
		} else if (b[0] >= FP_ICMP6_UNREACH && b[0] <= FP_ICMP6_PARAMPROB) {
			l4->kind = FP_L4_ICMP_ERR;
		}
		return;
	}
	if (ip->proto == IPPROTO_UDP) {
		if (bpf_skb_load_bytes(skb, l4->off, b, 8))
			return;
		l4->opening = 1;
	} else if (ip->proto == IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, l4->off, b, 14))
			return;
		l4->tcp_flags = b[13];
		l4->opening = (b[13] & (FP_TCP_SYN | FP_TCP_ACK)) == FP_TCP_SYN;
	} else if (ip->proto == IPPROTO_SCTP) {
		/* the common header, then the first chunk's type: only an
		 * INIT opens an association */
		if (bpf_skb_load_bytes(skb, l4->off, b, 13))
			return;
		l4->opening = b[12] == FP_SCTP_CHUNK_INIT;
	} else {
		return;
	}
	__builtin_memcpy(&l4->sport, &b[0], 2);
	__builtin_memcpy(&l4->dport, &b[2], 2);
	l4->kind = FP_L4_PORTS;
}

/* SCTP's half of fp_nat6_rewrite: CRC32c covers no pseudo-header, so the
 * address is stored alone; a port change updates the CRC as IPv4's does
 * (fp_sctp_crc_fix_len), over the SCTP packet after the extension headers,
 * unless `crc_later`: the caller fixes it once (fp_sctp6_crc_ports). */
static __always_inline int fp_nat6_rewrite_sctp(struct __sk_buff *skb, struct fp_ipv6 *ip,
						struct fp_l4 *l4, int is_src, const __u32 *new_addr,
						__be16 new_port, int crc_later)
{
	__u32 *addr = is_src ? ip->saddr : ip->daddr;
	__be16 *port = is_src ? &l4->sport : &l4->dport;
	__u32 addr_off = ip->l3_off + (is_src ? offsetof(struct ipv6hdr, saddr)
					      : offsetof(struct ipv6hdr, daddr));
	__u32 port_off = l4->off + (is_src ? 0 : 2);
	__u32 ext = l4->off - ip->l3_off - sizeof(struct ipv6hdr);
	__u32 len = bpf_ntohs(ip->payload_len);

	if (!fp_ip6_eq(addr, new_addr)) {
		if (bpf_skb_store_bytes(skb, addr_off, (void *)new_addr, 16, 0))
			return -1;
		addr[0] = new_addr[0];
		addr[1] = new_addr[1];
		addr[2] = new_addr[2];
		addr[3] = new_addr[3];
	}
	if (*port != new_port) {
		if (!crc_later &&
		    (len < ext ||
		     fp_sctp_crc_fix_len(skb, len - ext, l4->off, port_off, *port, new_port)))
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0))
			return -1;
		*port = new_port;
	}
	return 0;
}

/* Which transports a rewrite is compiled for (fp_nat6_rewrite_any's
 * `sctp`, fp_ct6_reverse_any's `full`), a constant: the verifier walks only
 * those. The node's IPv6 from outside is split by transport so that each
 * program stays within the verifier's budget: fp_vpc6_node compiles TCP
 * and UDP, fp_vpc6_sctp SCTP (its CRC updates); pods' programs both. */
#define FP_NAT6_NO_SCTP   0
#define FP_NAT6_ANY       1
/* the caller has checked that the packet is SCTP, and fixes its CRC once
 * for all the port changes (fp_sctp6_crc_ports) */
#define FP_NAT6_SCTP_ONLY 2

/* Rewrite the source (is_src) or destination address and port of a TCP,
 * UDP or SCTP packet, its checksum fixed for the pseudo-header and the
 * port. `sctp`: FP_NAT6_* (SCTP refused by FP_NAT6_NO_SCTP). */
static __always_inline int fp_nat6_rewrite_any(struct __sk_buff *skb, struct fp_ipv6 *ip,
					       struct fp_l4 *l4, int is_src,
					       const __u32 *new_addr, __be16 new_port, int sctp)
{
	__u32 *addr = is_src ? ip->saddr : ip->daddr;
	__be16 *port = is_src ? &l4->sport : &l4->dport;
	__u32 addr_off = ip->l3_off + (is_src ? offsetof(struct ipv6hdr, saddr)
					      : offsetof(struct ipv6hdr, daddr));
	__u32 port_off = l4->off + (is_src ? 0 : 2);
	__u32 csum_off = l4->off + fp_l4_csum_off(ip->proto);
	__u64 l4flags = ip->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__s64 diff;

	if (sctp == FP_NAT6_SCTP_ONLY || ip->proto == IPPROTO_SCTP) {
		if (sctp == FP_NAT6_NO_SCTP)
			return -1;
		return fp_nat6_rewrite_sctp(skb, ip, l4, is_src, new_addr, new_port,
					    sctp == FP_NAT6_SCTP_ONLY);
	}
	if (!fp_ip6_eq(addr, new_addr)) {
		diff = bpf_csum_diff(addr, 16, (__be32 *)new_addr, 16, 0);
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff, l4flags | BPF_F_PSEUDO_HDR) ||
		    bpf_skb_store_bytes(skb, addr_off, (void *)new_addr, 16, 0))
			return -1;
		addr[0] = new_addr[0];
		addr[1] = new_addr[1];
		addr[2] = new_addr[2];
		addr[3] = new_addr[3];
	}
	if (*port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, *port, new_port, l4flags | sizeof(new_port)) ||
		    bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0))
			return -1;
		*port = new_port;
	}
	return 0;
}

/* The SCTP CRC after the ports went from (osport, odport) to l4's, in one
 * step (fp_sctp_crc_fix_len's arithmetic over the four port bytes): the
 * translation from outside changes up to two ports (DNAT and SNAT, or their
 * reversal), and one walk of the CRC arithmetic instead of one per port is
 * what keeps fp_vpc6_sctp well within the verifier's budget. A zero CRC
 * (left to offload) stays zero. */
static __always_inline int fp_sctp6_crc_ports(struct __sk_buff *skb, const struct fp_ipv6 *ip,
					      const struct fp_l4 *l4, __be16 osport, __be16 odport)
{
	__be16 delta[2] = {osport ^ l4->sport, odport ^ l4->dport};
	__u8 *d = (__u8 *)delta;
	__u32 ext = l4->off - ip->l3_off - sizeof(struct ipv6hdr);
	__u32 len = bpf_ntohs(ip->payload_len);
	__u32 tail, crc, lo, hi, sum;

	if (!delta[0] && !delta[1])
		return 0;
	if (bpf_skb_load_bytes(skb, l4->off + FP_SCTP_CSUM_OFF, &sum, sizeof(sum)))
		return -1;
	if (sum == 0)
		return 0;
	if (len < ext + 4)
		return -1;
	tail = len - ext - 4;
	if (tail > 0xFFFF ||
	    fp_crc32c_power(tail & 0xFF, &lo) ||
	    fp_crc32c_power(256 + (tail >> 8), &hi))
		return -1;
	crc = fp_crc32c_byte0(fp_crc32c_byte0(0, d[0]), d[1]);
	crc = fp_crc32c_byte0(fp_crc32c_byte0(crc, d[2]), d[3]);
	crc = fp_crc32c_mulmod(fp_crc32c_mulmod(lo, hi), crc);
	sum ^= crc;
	return bpf_skb_store_bytes(skb, l4->off + FP_SCTP_CSUM_OFF, &sum, sizeof(sum), 0) ? -1 : 0;
}

static __always_inline int fp_nat6_rewrite(struct __sk_buff *skb, struct fp_ipv6 *ip,
					   struct fp_l4 *l4, int is_src, const __u32 *new_addr,
					   __be16 new_port)
{
	return fp_nat6_rewrite_any(skb, ip, l4, is_src, new_addr, new_port, 1);
}

/* ---- lookups and tiers (lib/ct.h's, for the IPv6 maps) ---- */

static __always_inline struct fp_ct6 *fp_ct6_nat_find(struct fp_ct6_key *key, int *tier,
						      __u64 *now)
{
	struct fp_ct6 *ct = fp_ct6_tier_get(FP_CT_TIER_EST, key);

	*tier = FP_CT_TIER_EST;
	if (ct) {
		*now = bpf_ktime_get_ns();
		if (!fp_ct_expired(ct->last_seen, key->proto, ct->state, *now))
			return ct;
	}
	ct = fp_ct6_tier_get(FP_CT_TIER_NEW, key);
	*tier = FP_CT_TIER_NEW;
	if (ct) {
		if (!*now)
			*now = bpf_ktime_get_ns();
		if (!fp_ct_expired(ct->last_seen, key->proto, ct->state, *now))
			return ct;
	}
	return NULL;
}

static __always_inline void fp_ct6_tier_clear(int tier, struct fp_ct6_key *key)
{
	if (fp_ct6_tier_get(tier, key))
		fp_ct6_tier_del(tier, key);
}

static __always_inline struct fp_ct6 *fp_ct6_nat_any(struct fp_ct6_key *key, int first, int *tier)
{
	struct fp_ct6 *ct = fp_ct6_tier_get(first, key);

	*tier = first;
	if (ct)
		return ct;
	*tier = first == FP_CT_TIER_EST ? FP_CT_TIER_NEW : FP_CT_TIER_EST;
	return fp_ct6_tier_get(*tier, key);
}

/* The other entry of a translated flow (fp_ct_partner). */
static __always_inline void fp_ct6_partner(const struct fp_ct6_key *key, const struct fp_ct6 *ct,
					   struct fp_ct6_key *p)
{
	int hairpin = ct->flags & FP_CT_F_HAIRPIN;

	p->proto = key->proto;
	p->pad = 0;
	if (ct->flags & FP_CT_F_SNAT) {
		/* forward: client -> frontend; reply: backend -> (node, SNAT port) */
		if (key->dir == FP_CT_FORWARD) {
			__builtin_memcpy(p->saddr, ct->nat_addr, 16);
			__builtin_memcpy(p->daddr, ct->peer_addr, 16);
			p->sport = ct->nat_port;
			p->dport = ct->peer_port;
			p->dir = FP_CT_REPLY;
		} else {
			__builtin_memcpy(p->saddr, ct->peer_addr, 16);
			__builtin_memcpy(p->daddr, ct->nat_addr, 16);
			p->sport = ct->peer_port;
			p->dport = ct->nat_port;
			p->dir = FP_CT_FORWARD;
		}
		return;
	}
	if (key->dir == FP_CT_FORWARD) {
		__builtin_memcpy(p->saddr, ct->nat_addr, 16);
		if (hairpin)
			fp_ip6_hairpin((__u32 *)p->daddr);
		else
			__builtin_memcpy(p->daddr, key->saddr, 16);
		p->sport = ct->nat_port;
		p->dport = key->sport;
		p->dir = FP_CT_REPLY;
	} else {
		/* hairpin: the client is the backend itself */
		__builtin_memcpy(p->saddr, hairpin ? key->saddr : key->daddr, 16);
		__builtin_memcpy(p->daddr, ct->nat_addr, 16);
		p->sport = key->dport;
		p->dport = ct->nat_port;
		p->dir = FP_CT_FORWARD;
	}
}

/* fp_ct_close_partner for an IPv6 flow: fp_ct6_partner by masks. */
static __always_inline void fp_ct6_close_partner(const struct fp_ct6_key *key,
						 const struct fp_ct6 *ct, struct fp_ct6_key *p,
						 int reply)
{
	const __u32 *ks = (const __u32 *)key->saddr, *kd = (const __u32 *)key->daddr;
	const __u32 *nat = (const __u32 *)ct->nat_addr, *peer = (const __u32 *)ct->peer_addr;
	__u32 *ps = (__u32 *)p->saddr, *pd = (__u32 *)p->daddr;
	__u32 snat = -(__u32)((ct->flags / FP_CT_F_SNAT) & 1);
	__u32 hp = -(__u32)(ct->flags & FP_CT_F_HAIRPIN);
	__u32 hairpin[4] = {FP_HAIRPIN_IP6_0, FP_HAIRPIN_IP6_1, FP_HAIRPIN_IP6_2, FP_HAIRPIN_IP6_3};
	int i;

	/* opaque to the compiler, or it turns the masks back into branches */
	asm volatile("" : "+r"(snat), "+r"(hp));
	p->proto = key->proto;
	p->pad = 0;
	if (!reply) {
#pragma unroll
		for (i = 0; i < 4; i++) {
			ps[i] = nat[i];
			pd[i] = (peer[i] & snat) | (((hairpin[i] & hp) | (ks[i] & ~hp)) & ~snat);
		}
		p->sport = ct->nat_port;
		p->dport = (ct->peer_port & snat) | (key->sport & ~snat);
		p->dir = FP_CT_REPLY;
	} else {
#pragma unroll
		for (i = 0; i < 4; i++) {
			ps[i] = (peer[i] & snat) | (((ks[i] & hp) | (kd[i] & ~hp)) & ~snat);
			pd[i] = nat[i];
		}
		p->sport = (ct->peer_port & snat) | (key->dport & ~snat);
		p->dport = ct->nat_port;
		p->dir = FP_CT_FORWARD;
	}
}

/* fp_ct_move for the IPv6 tiers. Entries are copied through the per-CPU
 * scratch: two of them do not fit the stack beside the caller's. */
static __always_inline void fp_ct6_move(struct fp_ct6_key *key, struct fp_ct6 *ct, int from,
					struct fp_ct6_key *pkey, struct fp_ct6 *pct, int pfrom,
					int to)
{
	struct fp_ct6_work *w = fp_ct6_work_scratch();

	if (!w)
		return;
	w->entry = *ct;
	if (pct)
		w->reply = *pct;
	if (fp_ct6_tier_put(to, key, &w->entry)) {
		fp_ct_event(FP_CTE_PROMOTE_FULL);
		return;
	}
	if (pct && fp_ct6_tier_put(to, pkey, &w->reply)) {
		fp_ct6_tier_del(to, key);
		fp_ct_event(FP_CTE_PROMOTE_FULL);
		return;
	}
	if (from != to)
		fp_ct6_tier_del(from, key);
	if (pct && pfrom != to)
		fp_ct6_tier_del(pfrom, pkey);
	fp_ct_event(to == FP_CT_TIER_EST ? FP_CTE_PROMOTED : FP_CTE_DEMOTED);
}

/* fp_ct_nat_seen for an IPv6 flow: the state moves (fp_ct_step), both
 * entries are refreshed (at most once a second unless the state changed),
 * and the flow moves between tiers as fp_ct_nat_seen says (a close stays
 * in the established hash and is deleted when it completes). */
static __always_inline void fp_ct6_nat_seen(struct fp_ct6_key *key, struct fp_ct6 *ct, int tier,
					    __u8 tcp, int reply, __u64 now)
{
	/* the partner's key in the scratch's `rev` (callers never hold
	 * anything there across this call) */
	struct fp_ct6_work *w = fp_ct6_work_scratch();
	struct fp_ct6_key *pkey;
	struct fp_ct6 *pct;
	__u8 flags = ct->flags;
	__u8 state = fp_ct_step(key->proto, ct->state, &flags, tcp, reply);
	int ptier = 0, want;

	if (fp_whatif() || !w)
		return;
	pkey = &w->rev;
	if (fp_ct_close_done(&ct->state, &ct->flags, tcp, reply)) {
		/* the partner's key is taken before the first delete (a
		 * deleted element may be reused by another CPU at once) */
		fp_ct6_close_partner(key, ct, pkey, reply);
		fp_ct6_tier_del(FP_CT_TIER_EST, key);
		fp_ct6_tier_del(FP_CT_TIER_EST, pkey);
		return;
	}
	if (state == ct->state && flags == ct->flags) {
		if ((__s64)(now - ct->last_seen) <= (__s64)FP_CT_REFRESH_NS)
			return;
		ct->last_seen = now;
		fp_ct6_partner(key, ct, pkey);
		pct = fp_ct6_nat_any(pkey, tier, &ptier);
		if (pct)
			pct->last_seen = now;
		if (state == FP_CT_ESTABLISHED && tier != FP_CT_TIER_EST)
			fp_ct6_move(key, ct, tier, pkey, pct, ptier, FP_CT_TIER_EST);
		return;
	}
	ct->state = state;
	ct->flags = flags;
	ct->last_seen = now;
	fp_ct6_partner(key, ct, pkey);
	pct = fp_ct6_nat_any(pkey, tier, &ptier);
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
		fp_ct6_move(key, ct, tier, pkey, pct, ptier, want);
}

/* ---- the forward direction ---- */

/* The entry a packet's destination takes (fp_ct_frontend): from outside
 * (`outside`: it arrived on the primary NIC or an ENI), the external one
 * when the frontend has one (the internal entry says FP_SVC_F_SOLE when it
 * has none: one lookup); from a pod, the internal one. */
static __always_inline struct fp_svc4 *fp_ct6_frontend(const struct fp_ipv6 *ip,
						       const struct fp_l4 *l4, int outside)
{
	struct fp_svc4 *svc = fp_service6_lookup(ip->daddr, l4->dport, ip->proto), *ext;

	if (outside && !(svc && (svc->flags & FP_SVC_F_SOLE))) {
		ext = fp_service6_lookup_scope(ip->daddr, l4->dport, ip->proto, FP_SCOPE_EXTERNAL);
		if (ext)
			svc = ext;
	}
	return svc;
}

/* A source port for a flow SNATed to (snat, port) towards (baddr, bport):
 * one whose reply tuple no live flow holds (fp_ct_snat_port). The key in
 * the scratch's `rev` (the new flow's reply key is written after). */
static __always_inline int fp_ct6_snat_port(struct fp_ct6_work *w, const __u32 *snat,
					    const __u32 *baddr, __be16 bport, __u8 proto,
					    __be16 *out)
{
	struct fp_ct6_key *rk = &w->rev;
	__u32 range = FP_SNAT_PORT_MAX - FP_SNAT_PORT_MIN + 1;
	__u32 start = bpf_get_prandom_u32() % range;
	__u64 now = 0;
	int i, tier = 0;

	__builtin_memcpy(rk->saddr, baddr, 16);
	__builtin_memcpy(rk->daddr, snat, 16);
	rk->sport = bport;
	rk->proto = proto;
	rk->dir = FP_CT_REPLY;
	rk->pad = 0;
#pragma unroll
	for (i = 0; i < FP_SNAT_TRIES; i++) {
		__u32 p = start + i;

		if (p >= range)
			p -= range;
		rk->dport = bpf_htons((__u16)(FP_SNAT_PORT_MIN + p));
		if (!fp_ct6_nat_find(rk, &tier, &now)) {
			*out = rk->dport;
			return 0;
		}
	}
	return -1;
}

/* fp_ct_service_from for an IPv6 packet: 0 when translated (ip and l4 then
 * describe the rewritten packet), 1 when its destination is no IPv6
 * frontend, -1 (with *reason) to drop it: FP_DROP_NO_BACKEND (an opening
 * packet and nothing to pick: the caller rejects it), FP_DROP_NO_LOCAL_BACKEND,
 * FP_DROP_SOURCE_RANGE, FP_DROP_SNAT_NO_PORT, FP_DROP_CT_NO_BACKEND,
 * FP_DROP_CSUM, FP_DROP_INVALID. `outside`: it arrived on one of the
 * node's interfaces (fp_from_vpc6), not from a local pod: the frontend's
 * external entry, and a backend on another node gets the flow SNATed to
 * the node's primary IPv6 address (fp_config.node_ip6) and a port of
 * FP_SNAT_PORT_MIN..MAX, so that its reply comes back here. */
#define FP_CT6_OUTSIDE      1    /* `outside`: TCP and UDP (fp_vpc6_node) */
#define FP_CT6_OUTSIDE_SCTP 2    /* `outside`: SCTP (fp_vpc6_sctp) */
/* the node's own packets (fp_to_vpc6_node, fp_lo), FP_CT_FROM_NODE's twin:
 * the inside view, but a backend at the client's own address is the node
 * reaching itself (lib/lo.h), not a pod's hairpin */
#define FP_CT6_FROM_NODE    3
static __always_inline int fp_ct6_service_from(struct __sk_buff *skb, struct fp_ipv6 *ip,
					       struct fp_l4 *l4, enum fp_reason *reason,
					       int outside)
{
	int from_node = outside == FP_CT6_FROM_NODE;
	int nat = !outside || from_node
			  ? FP_NAT6_ANY
			  : (outside == FP_CT6_OUTSIDE_SCTP ? FP_NAT6_SCTP_ONLY : FP_NAT6_NO_SCTP);
	struct fp_svc4 *svc;
	struct fp_ct6_work *w;
	struct fp_ct6 *ct;
	struct fp_backend6 *be;
	__u32 baddr[4], router[4];
	__u32 backend_id = 0;
	__be16 bport, snat_port = 0;
	int tier = 0, hairpin, keep = 0, had_old = 0, snat = 0;
	__u64 now;

	if (from_node)
		outside = 0;
	if (l4->kind != FP_L4_PORTS)
		return 1;
	/* from outside, each program its own transports (FP_NAT6_*) */
	if (outside == FP_CT6_OUTSIDE && ip->proto == IPPROTO_SCTP)
		return 1;
	if (outside == FP_CT6_OUTSIDE_SCTP && ip->proto != IPPROTO_SCTP)
		return 1;
	svc = fp_ct6_frontend(ip, l4, outside);
	if (!svc)
		return 1;
	w = fp_ct6_work_scratch();
	if (!w) {
		*reason = FP_DROP_INVALID;
		return -1;
	}
	__builtin_memset(w, 0, sizeof(*w));
	now = bpf_ktime_get_ns();
	__builtin_memcpy(w->fwd.saddr, ip->saddr, 16);
	__builtin_memcpy(w->fwd.daddr, ip->daddr, 16);
	w->fwd.sport = l4->sport;
	w->fwd.dport = l4->dport;
	w->fwd.proto = ip->proto;
	w->fwd.dir = FP_CT_FORWARD;

	ct = fp_ct6_nat_find(&w->fwd, &tier, &now);
	if (ct) {
		if (ct->svc_id != svc->svc_id)
			keep = 0;          /* the frontend was re-created since */
		else if (!l4->opening)
			keep = 1;          /* mid-stream: wherever it was sent */
		else if (nat != FP_NAT6_SCTP_ONLY && ip->proto == IPPROTO_TCP &&
			 ct->state >= FP_CT_FIN_WAIT)
			keep = 0;          /* a new connection on a closing tuple */
		else
			keep = fp_backend6_lookup(ct->backend_id) != NULL;
		if (!keep) {
			had_old = 1;
			fp_ct6_partner(&w->fwd, ct, &w->old_rev);
		}
	}

	if (keep) {
		__builtin_memcpy(baddr, ct->nat_addr, 16);
		bport = ct->nat_port;
		backend_id = ct->backend_id;
		hairpin = ct->flags & FP_CT_F_HAIRPIN;
		snat = outside && (ct->flags & FP_CT_F_SNAT);
		if (snat) {
			/* the SNAT address in the scratch's `odst` (unused by
			 * translation) */
			__builtin_memcpy(w->odst, ct->peer_addr, 16);
			snat_port = ct->peer_port;
		}
		if (nat != FP_NAT6_SCTP_ONLY && l4->opening && ip->proto == IPPROTO_TCP) {
			/* a retransmitted SYN or a new connection on a live
			 * tuple: the handshake starts again and the reply entry
			 * is written again (see fp_ct_service_from) */
			if (!fp_whatif()) {
				ct->state = FP_CT_NEW;
				ct->flags &= FP_CT_F_HAIRPIN | FP_CT_F_SNAT;
				ct->last_seen = now;
			}
			fp_ct6_partner(&w->fwd, ct, &w->rev);
			w->reply.last_seen = now;
			w->reply.flags = (hairpin ? FP_CT_F_HAIRPIN : 0) | (snat ? FP_CT_F_SNAT : 0);
			w->reply.state = FP_CT_NEW;
			if (snat) {
				__builtin_memcpy(w->reply.peer_addr, ip->saddr, 16);
				w->reply.peer_port = l4->sport;
			}
			__builtin_memcpy(w->reply.nat_addr, ip->daddr, 16);
			w->reply.nat_port = l4->dport;
			w->reply.backend_id = backend_id;
			w->reply.svc_id = svc->svc_id;
			fp_ct6_tier_put(tier, &w->rev, &w->reply);
		} else {
			fp_ct6_nat_seen(&w->fwd, ct, tier, l4->tcp_flags, 0, now);
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
		if ((svc->flags & FP_SVC_F_SRC_RANGE) && !fp_src_range6_ok(svc->svc_id, ip->saddr)) {
			*reason = FP_DROP_SOURCE_RANGE;
			return -1;
		}
		/* affinity remembers 32 bits of the client: its address folded
		 * (within one prefix, distinct addresses stay distinct) */
		be = fp_lb6_pick_flow(svc, ip->saddr[0] ^ ip->saddr[1] ^ ip->saddr[2] ^ ip->saddr[3],
				      outside && (svc->flags & FP_SVC_F_MAGLEV)
					      ? fp_maglev_hash6(ip->saddr, l4->sport, l4->dport,
								ip->proto)
					      : FP_NO_MAGLEV, &backend_id, now);
		if (!be) {
			*reason = FP_DROP_NO_BACKEND;
			return -1;
		}
		__builtin_memcpy(baddr, be->ip, 16);
		bport = be->port;
		hairpin = fp_ip6_eq(baddr, ip->saddr) && !from_node;
		if (outside && !hairpin && !fp_endpoint6_lookup(baddr)) {
			/* the backend is on another node: its reply must come
			 * back through this one, which alone can put the client
			 * back */
			struct fp_config *cfg = fp_config_get();

			if (cfg && !fp_ip6_is_unspecified((__u32 *)cfg->node_ip6)) {
				snat = 1;
				__builtin_memcpy(w->odst, cfg->node_ip6, 16);
				if (fp_ct6_snat_port(w, w->odst, baddr, bport, ip->proto,
						     &snat_port)) {
					*reason = FP_DROP_SNAT_NO_PORT;
					return -1;
				}
			}
		}
		if (had_old) {
			fp_ct6_tier_clear(FP_CT_TIER_EST, &w->old_rev);
			fp_ct6_tier_clear(FP_CT_TIER_NEW, &w->old_rev);
		}
		w->entry.last_seen = now;
		w->entry.flags = (hairpin ? FP_CT_F_HAIRPIN : 0) | (snat ? FP_CT_F_SNAT : 0);
		w->entry.state = FP_CT_NEW;
		__builtin_memcpy(w->entry.nat_addr, baddr, 16);
		w->entry.nat_port = bport;
		w->entry.backend_id = backend_id;
		w->entry.svc_id = svc->svc_id;
		__builtin_memcpy(w->rev.saddr, baddr, 16);
		if (hairpin)
			fp_ip6_hairpin((__u32 *)w->rev.daddr);
		else if (snat)
			__builtin_memcpy(w->rev.daddr, w->odst, 16);
		else
			__builtin_memcpy(w->rev.daddr, ip->saddr, 16);
		w->rev.sport = bport;
		w->rev.dport = snat ? snat_port : l4->sport;
		w->rev.proto = ip->proto;
		w->rev.dir = FP_CT_REPLY;
		if (snat) {
			__builtin_memcpy(w->entry.peer_addr, w->odst, 16);
			w->entry.peer_port = snat_port;
			__builtin_memcpy(w->reply.peer_addr, ip->saddr, 16);
			w->reply.peer_port = l4->sport;
		}
		w->reply.last_seen = now;
		w->reply.flags = w->entry.flags;
		w->reply.state = FP_CT_NEW;
		__builtin_memcpy(w->reply.nat_addr, ip->daddr, 16);
		w->reply.nat_port = l4->dport;
		w->reply.backend_id = backend_id;
		w->reply.svc_id = svc->svc_id;
		/* a new flow starts in the LRU; stale entries of its keys in
		 * the established hash would hide it */
		fp_ct6_tier_clear(FP_CT_TIER_EST, &w->fwd);
		fp_ct6_tier_clear(FP_CT_TIER_EST, &w->rev);
		fp_ct6_tier_put(FP_CT_TIER_NEW, &w->fwd, &w->entry);
		fp_ct6_tier_put(FP_CT_TIER_NEW, &w->rev, &w->reply);
		fp_ct_event(FP_CTE_CREATED);
	}

	fp_decision_nat(svc->svc_id, backend_id, 0, bport);
	if (fp_nat6_rewrite_any(skb, ip, l4, 0, baddr, bport, nat)) {
		*reason = FP_DROP_CSUM;
		return -1;
	}
	if (hairpin) {
		fp_ip6_hairpin(router);
		if (fp_nat6_rewrite_any(skb, ip, l4, 1, router, l4->sport, nat)) {
			*reason = FP_DROP_CSUM;
			return -1;
		}
	} else if (snat) {
		__builtin_memcpy(router, w->odst, 16);
		if (fp_nat6_rewrite_any(skb, ip, l4, 1, router, snat_port, nat)) {
			*reason = FP_DROP_CSUM;
			return -1;
		}
	}
	*reason = FP_FWD_SVC;
	return 0;
}

/* Translation of a pod's IPv6 packet (the in-cluster view: no SNAT). */
static __always_inline int fp_ct6_service(struct __sk_buff *skb, struct fp_ipv6 *ip,
					  struct fp_l4 *l4, enum fp_reason *reason)
{
	return fp_ct6_service_from(skb, ip, l4, reason, 0);
}

/* A new TCP connection straight to a pod may reuse the tuple of an earlier
 * translated one: its SYN retires that flow's reply entry (fp_ct_forget_reply). */
static __always_inline void fp_ct6_forget_reply(const struct fp_ipv6 *ip, const struct fp_l4 *l4)
{
	struct fp_ct6_key key = {};

	if (l4->kind != FP_L4_PORTS || !l4->opening || ip->proto != IPPROTO_TCP)
		return;
	__builtin_memcpy(key.saddr, ip->daddr, 16);
	__builtin_memcpy(key.daddr, ip->saddr, 16);
	key.sport = l4->dport;
	key.dport = l4->sport;
	key.proto = IPPROTO_TCP;
	key.dir = FP_CT_REPLY;
	fp_ct6_tier_clear(FP_CT_TIER_EST, &key);
	fp_ct6_tier_clear(FP_CT_TIER_NEW, &key);
}

/* ---- the reply direction ---- */

/* The packet an ICMPv6 error quotes (RFC 4443: as much of it as fits;
 * its fixed header and its ports are what is read). Only a quote whose
 * transport header follows the fixed header (TCP, UDP or SCTP) is used. Its
 * addresses go to w->q_saddr / q_daddr (the per-CPU scratch: the IPv6
 * program's stack has no room for them). */
struct fp_quote6 {
	__u32 off;             /* HBO: the quoted IPv6 header */
	__be16 sport;          /* NBO */
	__be16 dport;          /* NBO */
	__u8 proto;
};

static __always_inline int fp_ct6_quote(struct __sk_buff *skb, const struct fp_l4 *l4,
					struct fp_quote6 *q, struct fp_ct6_work *w)
{
	__u8 nh[8];
	__be16 p[2];

	if (l4->kind != FP_L4_ICMP_ERR)
		return -1;
	q->off = l4->off + 8;
	if (bpf_skb_load_bytes(skb, q->off, nh, sizeof(nh)) || (nh[0] >> 4) != 6 ||
	    (nh[6] != IPPROTO_TCP && nh[6] != IPPROTO_UDP && nh[6] != IPPROTO_SCTP) ||
	    bpf_skb_load_bytes(skb, q->off + offsetof(struct ipv6hdr, saddr), w->q_saddr, 16) ||
	    bpf_skb_load_bytes(skb, q->off + offsetof(struct ipv6hdr, daddr), w->q_daddr, 16) ||
	    bpf_skb_load_bytes(skb, q->off + sizeof(struct ipv6hdr), p, sizeof(p)))
		return -1;
	q->sport = p[0];
	q->dport = p[1];
	q->proto = nh[6];
	return 0;
}

/* Rewrite an ICMPv6 error about a translated flow: the quoted packet gets
 * (w->new_qsaddr:qsport -> w->new_qdaddr:qdport), the error itself
 * (osrc -> w->odst). Fixed:
 * the quoted TCP/UDP checksum when the quote holds it (its pseudo-header
 * and port changed alike), and the ICMPv6 checksum, which covers the
 * message and a pseudo-header of the outer addresses. A quoted SCTP CRC is
 * left as it is, as IPv4's: the receiver reads a quote's ports, never its
 * CRC. */
static __always_inline int fp_ct6_quote_rewrite(struct __sk_buff *skb, struct fp_ipv6 *ip,
						const struct fp_l4 *l4, const struct fp_quote6 *q,
						struct fp_ct6_work *w, __be16 qsport,
						__be16 qdport, const __u32 *osrc)
{
	__be32 o4 = 0, n4 = 0;
	__u32 csum_word_off = 0, icmp_csum = l4->off + 2;
	__s64 d_q, d_msg, d;
	int i;

	/* the quoted words that change: saddr, daddr, the ports */
#pragma unroll
	for (i = 0; i < 4; i++) {
		w->o[i] = w->q_saddr[i];
		w->o[4 + i] = w->q_daddr[i];
		w->n[i] = w->new_qsaddr[i];
		w->n[4 + i] = w->new_qdaddr[i];
	}
	__builtin_memcpy(&w->o[8], &q->sport, 2);
	__builtin_memcpy((__u8 *)&w->o[8] + 2, &q->dport, 2);
	__builtin_memcpy(&w->n[8], &qsport, 2);
	__builtin_memcpy((__u8 *)&w->n[8] + 2, &qdport, 2);
	d_q = bpf_csum_diff(w->o, sizeof(w->o), w->n, sizeof(w->n), 0);
	d_msg = d_q;
	if (q->proto == IPPROTO_UDP)
		csum_word_off = q->off + sizeof(struct ipv6hdr) + 4;      /* (len, check) */
	else if (q->proto == IPPROTO_TCP && q->off + sizeof(struct ipv6hdr) + 20 <= skb->len)
		csum_word_off = q->off + sizeof(struct ipv6hdr) + 16;     /* (check, urg) */
	if (csum_word_off) {
		int hi = q->proto == IPPROTO_UDP;
		__u16 old16, new16;

		if (bpf_skb_load_bytes(skb, csum_word_off, &o4, 4))
			return -1;
		n4 = o4;
		old16 = hi ? ((__u16 *)&o4)[1] : ((__u16 *)&o4)[0];
		if (!(hi && old16 == 0)) {
			new16 = fp_csum_update(old16, d_q);
			if (hi && new16 == 0)
				new16 = 0xffff;
			if (hi)
				((__u16 *)&n4)[1] = new16;
			else
				((__u16 *)&n4)[0] = new16;
		}
		d_msg = bpf_csum_diff(&o4, 4, &n4, 4, d_q);
	}
	if (bpf_skb_store_bytes(skb, q->off + offsetof(struct ipv6hdr, saddr), w->n, 32, 0) ||
	    bpf_skb_store_bytes(skb, q->off + sizeof(struct ipv6hdr), &w->n[8], 4, 0))
		return -1;
	if (csum_word_off && bpf_skb_store_bytes(skb, csum_word_off, &n4, 4, 0))
		return -1;
	if (bpf_l4_csum_replace(skb, icmp_csum, 0, d_msg, 0))
		return -1;
	if (!fp_ip6_eq(osrc, ip->saddr)) {
		d = bpf_csum_diff(ip->saddr, 16, (__be32 *)osrc, 16, 0);
		if (bpf_l4_csum_replace(skb, icmp_csum, 0, d, BPF_F_PSEUDO_HDR) ||
		    bpf_skb_store_bytes(skb, ip->l3_off + offsetof(struct ipv6hdr, saddr),
					(void *)osrc, 16, 0))
			return -1;
		__builtin_memcpy(ip->saddr, osrc, 16);
	}
	if (!fp_ip6_eq(w->odst, ip->daddr)) {
		d = bpf_csum_diff(ip->daddr, 16, w->odst, 16, 0);
		if (bpf_l4_csum_replace(skb, icmp_csum, 0, d, BPF_F_PSEUDO_HDR) ||
		    bpf_skb_store_bytes(skb, ip->l3_off + offsetof(struct ipv6hdr, daddr), w->odst,
					16, 0))
			return -1;
		__builtin_memcpy(ip->daddr, w->odst, 16);
	}
	return 0;
}

/* An ICMPv6 error (packet too big, unreachable, ...) quoting a client's
 * packet of a translated flow, on its way to the client (RELATED): the
 * quote gets the VIP and Service port back as its destination (hairpin:
 * the client back as its source), the error comes from the VIP when the
 * backend sent it (hairpin: it goes to the client). 1 when rewritten, 0
 * when it belongs to no translated flow, -1 when a rewrite failed. The
 * flow's state does not move. */
static __always_inline int fp_ct6_related_reverse(struct __sk_buff *skb, struct fp_ipv6 *ip,
						  const struct fp_l4 *l4)
{
	struct fp_ct6_work *w = fp_ct6_work_scratch();
	struct fp_quote6 q = {};
	struct fp_ct6_key *key;
	struct fp_ct6 *ct;
	__be16 vport, cport;
	__u64 now = 0;
	int tier = 0, hairpin, snat;

	if (!w || fp_ct6_quote(skb, l4, &q, w))
		return 0;
	/* the quote is the client's packet after DNAT: the flow's reply
	 * entry is its tuple reversed */
	key = &w->fwd;
	__builtin_memcpy(key->saddr, w->q_daddr, 16);
	__builtin_memcpy(key->daddr, w->q_saddr, 16);
	key->sport = q.dport;
	key->dport = q.sport;
	key->proto = q.proto;
	key->dir = FP_CT_REPLY;
	key->pad = 0;
	ct = fp_ct6_nat_find(key, &tier, &now);
	if (!ct)
		return 0;
	__builtin_memcpy(w->new_qdaddr, ct->nat_addr, 16);         /* the VIP */
	vport = ct->nat_port;
	hairpin = ct->flags & FP_CT_F_HAIRPIN;
	snat = !hairpin && (ct->flags & FP_CT_F_SNAT);
	/* SNAT: the quote's source is the node's SNAT address and port, which
	 * get the client's back, and an error sent to that address goes to
	 * the client (IPv4's fp_ct_reverse alike) */
	cport = snat ? ct->peer_port : q.sport;
	__builtin_memcpy(w->new_qsaddr, hairpin ? w->q_daddr : (snat ? ct->peer_addr : w->q_saddr),
			 16);
	__builtin_memcpy(w->odst, (hairpin && fp_ip6_is_hairpin(ip->daddr)) ? w->q_daddr :
			 (snat && fp_ip6_eq(ip->daddr, w->q_saddr) ? ct->peer_addr : ip->daddr),
			 16);
	if (fp_ct6_quote_rewrite(skb, ip, l4, &q, w, cport, vport,
				 fp_ip6_eq(ip->saddr, w->q_daddr) ? w->new_qdaddr : ip->saddr))
		return -1;
	fp_ct_event(FP_CTE_RELATED);
	return 1;
}

/* The other way: an ICMPv6 error from a client about a reply it got from
 * a VIP (its socket closed, say). The quote is the reply as the client saw
 * it (VIP -> client), so the flow's forward entry is that tuple reversed;
 * the error goes to the backend, about the reply as the backend sent it.
 * 1 when rewritten (ip describes the rewritten packet), 0 when it belongs
 * to no translated flow (or a hairpinned one: client and backend are one
 * pod), -1 when a rewrite failed. */
static __always_inline int fp_ct6_related_forward(struct __sk_buff *skb, struct fp_ipv6 *ip,
						  const struct fp_l4 *l4)
{
	struct fp_ct6_work *w = fp_ct6_work_scratch();
	struct fp_quote6 q = {};
	struct fp_ct6_key *key;
	struct fp_ct6 *ct;
	__be16 bport;
	__u64 now = 0;
	int tier = 0;

	if (!w || fp_ct6_quote(skb, l4, &q, w))
		return 0;
	key = &w->fwd;
	__builtin_memcpy(key->saddr, w->q_daddr, 16);
	__builtin_memcpy(key->daddr, w->q_saddr, 16);
	key->sport = q.dport;
	key->dport = q.sport;
	key->proto = q.proto;
	key->dir = FP_CT_FORWARD;
	key->pad = 0;
	ct = fp_ct6_nat_find(key, &tier, &now);
	if (!ct || (ct->flags & FP_CT_F_HAIRPIN))
		return 0;
	__builtin_memcpy(w->new_qsaddr, ct->nat_addr, 16);         /* the backend */
	__builtin_memcpy(w->new_qdaddr, w->q_daddr, 16);
	bport = ct->nat_port;
	__builtin_memcpy(w->odst, fp_ip6_eq(ip->daddr, w->q_saddr) ? w->new_qsaddr : ip->daddr, 16);
	if (fp_ct6_quote_rewrite(skb, ip, l4, &q, w, bport, q.dport, ip->saddr))
		return -1;
	fp_ct_event(FP_CTE_RELATED);
	return 1;
}

/* Put the VIP back on a reply of a translated IPv6 flow (hairpin: the
 * client back as its destination too), or on an ICMPv6 error quoting one of
 * its client's packets. 1 when rewritten, 0 when the packet belongs to no
 * translated flow, -1 when a rewrite failed. */
static __always_inline int fp_ct6_reverse_any(struct __sk_buff *skb, struct fp_ipv6 *ip,
					      struct fp_l4 *l4, int full)
{
	struct fp_ct6_work *w;
	struct fp_ct6_key *key;
	struct fp_ct6 *ct;
	__u32 vip[4], client[4];
	__be16 vport, cport;
	__u64 now = 0;
	int tier = 0, hairpin, snat;

	/* `full`: FP_NAT6_* (fp_vpc6_sctp's SCTP has no ICMPv6 to walk) */
	if (full != FP_NAT6_SCTP_ONLY && l4->kind == FP_L4_ICMP_ERR)
		return fp_ct6_related_reverse(skb, ip, l4);
	if (l4->kind != FP_L4_PORTS || (full == FP_NAT6_NO_SCTP && ip->proto == IPPROTO_SCTP) ||
	    (full == FP_NAT6_SCTP_ONLY && ip->proto != IPPROTO_SCTP))
		return 0;
	/* the key in the scratch's `fwd` (no translation runs on this packet) */
	w = fp_ct6_work_scratch();
	if (!w)
		return 0;
	key = &w->fwd;
	__builtin_memcpy(key->saddr, ip->saddr, 16);
	__builtin_memcpy(key->daddr, ip->daddr, 16);
	key->sport = l4->sport;
	key->dport = l4->dport;
	key->proto = ip->proto;
	key->dir = FP_CT_REPLY;
	key->pad = 0;
	ct = fp_ct6_nat_find(key, &tier, &now);
	if (!ct)
		return 0;
	__builtin_memcpy(vip, ct->nat_addr, 16);
	vport = ct->nat_port;
	hairpin = ct->flags & FP_CT_F_HAIRPIN;
	snat = ct->flags & FP_CT_F_SNAT;
	cport = ct->peer_port;
	if (snat)
		__builtin_memcpy(client, ct->peer_addr, 16);
	/* (the entry may move between tiers here: nothing is read after) */
	fp_ct6_nat_seen(key, ct, tier, l4->tcp_flags, 1, now);
	if (hairpin) {
		/* the client is the backend itself */
		__builtin_memcpy(client, ip->saddr, 16);
		if (fp_nat6_rewrite_any(skb, ip, l4, 0, client, l4->dport, full))
			return -1;
	} else if (snat) {
		/* a reply of a flow this node SNATed: the client back as its
		 * destination */
		if (fp_nat6_rewrite_any(skb, ip, l4, 0, client, cport, full))
			return -1;
	}
	if (fp_nat6_rewrite_any(skb, ip, l4, 1, vip, vport, full))
		return -1;
	return 1;
}

/* `full` 0 (fp_vpc6_node: the reply of a flow this node SNATed, or an
 * ICMPv6 error about one): no SCTP, which that walk does not translate. */
static __always_inline int fp_ct6_reverse(struct __sk_buff *skb, struct fp_ipv6 *ip,
					  struct fp_l4 *l4)
{
	return fp_ct6_reverse_any(skb, ip, l4, 1);
}

/* ---- fragments ---- */

/* A first fragment: its arrival, kept in the per-CPU scratch until it is
 * decided (fp_ct6_frag_end). NULL for anything else. */
static __always_inline struct fp_frag6_work *fp_ct6_frag_begin(const struct fp_ipv6 *ip)
{
	struct fp_frag6_work *r;

	if (ip->frag != FP_IP6_FIRST_FRAG)
		return NULL;
	r = fp_frag6_scratch();
	if (!r)
		return NULL;
	__builtin_memcpy(r->key.saddr, ip->saddr, 16);
	__builtin_memcpy(r->key.daddr, ip->daddr, 16);
	r->key.id = ip->frag_id;
	r->key.proto = ip->proto;
	return r;
}

/* The first fragment leaves as `ip` says: if it was rewritten, the
 * fragments after it will be too. */
static __always_inline void fp_ct6_frag_end(struct fp_frag6_work *r, const struct fp_ipv6 *ip)
{
	if (!r || (fp_ip6_eq((__u32 *)r->key.saddr, ip->saddr) &&
		   fp_ip6_eq((__u32 *)r->key.daddr, ip->daddr)))
		return;
	r->val.first_seen = bpf_ktime_get_ns();
	__builtin_memcpy(r->val.saddr, ip->saddr, 16);
	__builtin_memcpy(r->val.daddr, ip->daddr, 16);
	fp_frag6_put(&r->key, &r->val);
}

/* A fragment after the first takes the addresses its first one left with
 * (no transport header to fix; IPv6 has no header checksum). 1 when
 * rewritten, 0 when there is no record (it goes on as it came), -1 when a
 * rewrite failed. */
static __always_inline int fp_ct6_frag_follow(struct __sk_buff *skb, struct fp_ipv6 *ip)
{
	struct fp_frag6_work *r;
	struct fp_frag6 *f;

	if (ip->frag != FP_IP6_LATER_FRAG)
		return 0;
	r = fp_frag6_scratch();
	if (!r)
		return 0;
	__builtin_memcpy(r->key.saddr, ip->saddr, 16);
	__builtin_memcpy(r->key.daddr, ip->daddr, 16);
	r->key.id = ip->frag_id;
	r->key.proto = ip->proto;
	f = fp_frag6_get(&r->key);
	if (!f || (__s64)(bpf_ktime_get_ns() - f->first_seen) > (__s64)FP_FRAG_LIFETIME_NS)
		return 0;
	__builtin_memcpy(r->val.saddr, f->saddr, 16);
	__builtin_memcpy(r->val.daddr, f->daddr, 16);
	if (bpf_skb_store_bytes(skb, ip->l3_off + offsetof(struct ipv6hdr, saddr), r->val.saddr,
				32, 0))
		return -1;
	__builtin_memcpy(ip->saddr, r->val.saddr, 16);
	__builtin_memcpy(ip->daddr, r->val.daddr, 16);
	fp_ct_event(FP_CTE_FRAG_FOLLOWED);
	return 1;
}

/* kube-proxy's nftables checks (fp_svcnet_check) for an IPv6 packet no
 * frontend took: a new flow to a live ClusterIP's unknown port is
 * FP_DROP_SVC_UNKNOWN_PORT (rejected), one to an unallocated address of an
 * IPv6 Service CIDR FP_DROP_SVC_UNALLOCATED (dropped); 0 otherwise. */
static __always_inline int fp_svcnet6_check(const struct fp_ipv6 *ip, const struct fp_l4 *l4)
{
	int f;

	if (l4->kind == FP_L4_ICMP_ERR || l4->kind == FP_L4_LATER_FRAG)
		return 0;
	if ((l4->kind == FP_L4_PORTS || l4->kind == FP_L4_ECHO) && !l4->opening)
		return 0;
	f = fp_svcnet6_flags(ip->daddr);
	if (f < 0)
		return 0;
	if (f & FP_SVCNET_F_CLUSTER_IP)
		return FP_DROP_SVC_UNKNOWN_PORT;
	if (f & FP_SVCNET_F_RANGE)
		return FP_DROP_SVC_UNALLOCATED;
	return 0;
}

#endif /* FP_LIB_CT6_H */
