/* IPv6 Service load-balancing: which backend a new flow to an IPv6
 * frontend gets (FP_MAP_SERVICES6 -> the shared slots -> FP_MAP_BACKENDS6).
 *
 * The choice is IPv4's (lib/lb.h fp_lb_pick_flow): ClientIP affinity first
 * (the same fp_lb_affinity_live/_remember), never a draining backend, else
 * a random slot. Service and backend ids are one id space over both
 * families, so the slots, the Maglev tables and the affinity map are
 * shared; only the frontend and backend entries, whose addresses are 16
 * bytes, have maps of their own. `client` is what affinity
 * remembers: a 32-bit key (socket-LB passes the netns cookie, as for IPv4).
 */
#ifndef FP_LIB_LB6_H
#define FP_LIB_LB6_H

#include "lib/lb.h"

static __always_inline struct fp_backend6 *fp_lb6_pick(struct fp_svc4 *svc, __be32 client,
						       __u32 *backend_id, __u64 now)
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
	slot = (bpf_get_prandom_u32() % svc->count) + 1;
	be = fp_slot_backend6(svc->svc_id, slot, backend_id);
	if (be)
		fp_lb_affinity_remember(svc, client, *backend_id, now);
	return be;
}

#endif /* FP_LIB_LB6_H */
