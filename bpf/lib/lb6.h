/* IPv6 Service load-balancing: which backend a new flow to an IPv6
 * frontend gets (FP_MAP_SERVICES6 -> the shared slots -> FP_MAP_BACKENDS6).
 *
 * The choice is IPv4's (lib/lb.h fp_lb_pick_flow): ClientIP affinity first
 * (the same fp_lb_affinity_live/_remember), never a draining backend, else
 * Maglev for traffic from outside when the frontend has it, else
 * a random slot. Service and backend ids are one id space over both
 * families, so the slots, the Maglev tables and the affinity map are
 * shared; only the frontend and backend entries, whose addresses are 16
 * bytes, have maps of their own. `client` is what affinity
 * remembers: a 32-bit key (socket-LB passes the netns cookie, as for IPv4).
 */
#ifndef FP_LIB_LB6_H
#define FP_LIB_LB6_H

#include "lib/lb.h"

/* Maglev's flow hash of an IPv6 flow: Bob Jenkins' hash (lookup3) of six
 * words, the client's address as the packet carries it, (client port,
 * frontend port) and the protocol, with IPv4's seed. Each address word is
 * mixed in by itself, so addresses collide only as any 32-bit hash may
 * (a fold of the words by XOR gave every address whose words XOR alike
 * one hash). Every node computes the same; agent/lb/maglev.py flow_hash6
 * is its twin. */
static __always_inline __u64 fp_maglev_hash6(const __be32 *saddr, __be16 sport, __be16 dport,
					     __u8 proto)
{
	__u32 a, b, c;

	a = b = c = 0xdeadbeef + (6 << 2) + FP_MAGLEV_SEED;
	a += saddr[0];
	b += saddr[1];
	c += saddr[2];
	/* lookup3's mix */
	a -= c; a ^= fp_rol32(c, 4);  c += b;
	b -= a; b ^= fp_rol32(a, 6);  a += c;
	c -= b; c ^= fp_rol32(b, 8);  b += a;
	a -= c; a ^= fp_rol32(c, 16); c += b;
	b -= a; b ^= fp_rol32(a, 19); a += c;
	c -= b; c ^= fp_rol32(b, 4);  b += a;
	a += saddr[3];
	b += (__u32)sport | ((__u32)dport << 16);
	c += proto;
	return fp_jhash_final(a, b, c);
}

/* `mhash`: as for fp_lb_pick_flow (fp_maglev_hash6, or FP_NO_MAGLEV). */
static __always_inline struct fp_backend6 *fp_lb6_pick_flow(struct fp_svc4 *svc, __be32 client,
							    __u64 mhash, __u32 *backend_id,
							    __u64 now)
{
	struct fp_backend6 *be = NULL;
	struct fp_aff4 *aff;
	__u32 slot;

	if (svc->count == 0)
		return NULL;
	aff = fp_lb_affinity_live(svc, client, now);
	if (aff) {
		be = fp_backend6_lookup(aff->backend_id);
		if (be && !(be->flags & FP_BE_F_DRAINING)) {
			*backend_id = aff->backend_id;
			aff->last_seen = now;
			return be;
		}
		be = NULL;
	}
	if ((svc->flags & FP_SVC_F_MAGLEV) && mhash != FP_NO_MAGLEV) {
		__u32 bid = fp_maglev_backend(svc->svc_id, (__u32)mhash % FP_MAGLEV_M);

		be = bid ? fp_backend6_lookup(bid) : NULL;
		if (be && !(be->flags & FP_BE_F_DRAINING))
			*backend_id = bid;
		else
			be = NULL;
	}
	if (!be) {
		slot = (bpf_get_prandom_u32() % svc->count) + 1;
		be = fp_slot_backend6(svc->svc_id, slot, backend_id);
	}
	if (be)
		fp_lb_affinity_remember(svc, client, *backend_id, now);
	return be;
}

static __always_inline struct fp_backend6 *fp_lb6_pick(struct fp_svc4 *svc, __be32 client,
						       __u32 *backend_id, __u64 now)
{
	return fp_lb6_pick_flow(svc, client, FP_NO_MAGLEV, backend_id, now);
}

#endif /* FP_LIB_LB6_H */
