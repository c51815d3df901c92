/* IPv6 forwarding without the host stack: lib/fwd.h's twin.
 *
 * The same two ways out: bpf_redirect_peer() into a local pod's netns, or
 * bpf_fib_lookup(AF_INET6) by the pod's policy routing (Terway's
 * `from <podIPv6> lookup <eni table>` rules) and out of the ENI it names,
 * bpf_redirect() with the FIB's MACs or bpf_redirect_neigh() when the
 * kernel must resolve the neighbour. As a router does, the hop limit is
 * decremented (IPv6 has no header checksum to update), and a packet whose
 * hop limit would expire goes to the stack, which answers with ICMPv6 time
 * exceeded.
 */
#ifndef FP_LIB_FWD6_H
#define FP_LIB_FWD6_H

#include "lib/fwd.h"
#include "lib/parse6.h"

#ifndef AF_INET6
#define AF_INET6 10
#endif

static __always_inline int fp_hop_limit_dec(struct __sk_buff *skb, const struct fp_ipv6 *ip)
{
	__u8 hl = ip->hop_limit - 1;

	return bpf_skb_store_bytes(skb, ip->l3_off + offsetof(struct ipv6hdr, hop_limit), &hl,
				   1, 0);
}

static __always_inline int fp_redirect_local6(struct __sk_buff *skb, const struct fp_ipv6 *ip,
					      const struct fp_endpoint *dst,
					      enum fp_reason *reason)
{
	__u8 pod_mac[ETH_ALEN], host_mac[ETH_ALEN];
	__u32 ifindex = dst->host_ifindex;
	int ret;

	if (ip->hop_limit <= 1) {
		*reason = FP_FWD_TTL;
		return FP_TC_CONTINUE;
	}
	__builtin_memcpy(pod_mac, dst->pod_mac, ETH_ALEN);
	__builtin_memcpy(host_mac, dst->host_mac, ETH_ALEN);
	if (fp_hop_limit_dec(skb, ip) || fp_set_macs(skb, pod_mac, host_mac)) {
		*reason = FP_DROP_INVALID;
		return TC_ACT_SHOT;
	}
	ret = bpf_redirect_peer(ifindex, 0);
	if (ret != TC_ACT_REDIRECT) {
		*reason = FP_DROP_REDIRECT;
		return TC_ACT_SHOT;
	}
	*reason = FP_FWD_LOCAL;
	fp_test_record(ifindex, FP_RD_PEER, 0, FP_FWD_LOCAL);
	return ret;
}

/* Send where the FIB says if that is `want` (FP_ANY_DEVICE: anywhere) or
 * `also` (0: nothing else), otherwise to the stack. The decision record
 * has no room for an IPv6 next hop: it records the device and the kind of
 * redirect. */
static __always_inline int fp_redirect_fib6_also(struct __sk_buff *skb, const struct fp_ipv6 *ip,
						 __u32 want, __u32 also, enum fp_reason *reason)
{
	struct bpf_fib_lookup fib = {};
	int rc, ret;

	fib.family = AF_INET6;
	fib.flowinfo = ip->flowinfo & bpf_htonl(0x0FFFFFFF);
	fib.l4_protocol = ip->proto;
	fib.tot_len = 0;
	__builtin_memcpy(fib.ipv6_src, ip->saddr, 16);
	__builtin_memcpy(fib.ipv6_dst, ip->daddr, 16);
	fib.ifindex = skb->ifindex;

	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) ||
	    !(want == FP_ANY_DEVICE || (want && fib.ifindex == want) ||
	      (also && fib.ifindex == also))) {
		*reason = FP_FWD_FIB_MISS;
		return FP_TC_CONTINUE;
	}
	if (ip->hop_limit <= 1) {
		*reason = FP_FWD_TTL;
		return FP_TC_CONTINUE;
	}
	if (fp_hop_limit_dec(skb, ip)) {
		*reason = FP_DROP_INVALID;
		return TC_ACT_SHOT;
	}
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (fp_set_macs(skb, fib.dmac, fib.smac)) {
			*reason = FP_DROP_INVALID;
			return TC_ACT_SHOT;
		}
		ret = bpf_redirect(fib.ifindex, 0);
		fp_test_record(fib.ifindex, FP_RD_PLAIN, 0, FP_FWD_ENI);
	} else {
		struct bpf_redir_neigh nh = {};

		nh.nh_family = AF_INET6;
		__builtin_memcpy(nh.ipv6_nh, fib.ipv6_dst, 16);
		ret = fp_bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
		fp_test_record(fib.ifindex, FP_RD_NEIGH, 0, FP_FWD_ENI);
	}
	if (ret != TC_ACT_REDIRECT) {
		*reason = FP_DROP_REDIRECT;
		return TC_ACT_SHOT;
	}
	*reason = FP_FWD_ENI;
	return ret;
}

static __always_inline int fp_redirect_fib6(struct __sk_buff *skb, const struct fp_ipv6 *ip,
					    __u32 want, enum fp_reason *reason)
{
	return fp_redirect_fib6_also(skb, ip, want, 0, reason);
}

#endif /* FP_LIB_FWD6_H */
