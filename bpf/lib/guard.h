/* Guards: what every packet must pass before anything else looks at it.
 *
 * Anti-spoofing (fp_guard_from_pod, before fp_from_pod decides anything;
 * fp_guard_from_pod6 for IPv6, first thing in fp_from_pod6; a packet whose
 * source the endpoints map (IPv4 or IPv6) already places on this very veth
 * is proven without it, which spares the hot path a lookup). On a
 * registered pod veth (an entry of FP_MAP_EP_IFINDEX, written before any of
 * fastpath's programs is attached to the veth), the source must be that
 * endpoint's own address, in every family:
 *   IPv4  the endpoint's IPv4 address (none for an IPv6-only pod, whose
 *         registration holds an endpoint key, FP_EPIF_F_KEY: all dropped);
 *   ARP   the sender's protocol address is the endpoint's IPv4 address, or
 *         0.0.0.0 (an address probe);
 *   IPv6  the endpoint's IPv6 address, a link-local address (fe80::/10,
 *         which no router forwards) or :: (duplicate address detection).
 * Anything else is dropped as dropped-source-spoofed, so a forged packet
 * never reaches conntrack, service translation, policy or the node's stack.
 * Other ethertypes are left to the stack as before (it forwards none of
 * them from a veth). A veth without a registration keeps pod.c's own
 * check: an unknown source goes to the stack, another local pod's address
 * is dropped.
 *
 * Anti-spoofing from the VPC (fp_guard_from_vpc, first thing fp_from_vpc
 * does; fp_from_vpc6 for IPv6): a packet arriving on an ENI whose source is
 * a pod of this node (its IPv4 or its IPv6 address) is dropped as
 * dropped-source-spoofed: the VPC never delivers a node its own pods'
 * packets.
 *
 * NetworkPolicy is judged for both families (IPv6 by lib/policy6.h in the
 * IPv6 programs), so the guards no longer hold back an isolated pod's IPv6
 * (the interim rule, dropped-ipv6-not-judged, is retired).
 *
 * These are self-contained on purpose: plain loads (bpf_skb_load_bytes),
 * map accessors of maps.c, and their own event; a caller only counts the
 * drop with the reason given back.
 */
#ifndef FP_LIB_GUARD_H
#define FP_LIB_GUARD_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include "lib/event6.h"

#ifndef ETH_P_ARP
#define ETH_P_ARP 0x0806
#endif
#ifndef ETH_P_IPV6
#define ETH_P_IPV6 0x86DD
#endif

#define FP_ARP_SPA_OFF  (ETH_HLEN + 14)  /* Ethernet/IPv4 ARP: sender protocol address */
#define FP_IP4_SADDR_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define FP_IP6_SADDR_OFF (ETH_HLEN + offsetof(struct ipv6hdr, saddr))

static __always_inline void fp_guard_event(struct __sk_buff *skb, enum fp_dir dir,
					   enum fp_reason reason, __be32 saddr, __be32 daddr,
					   __u8 proto)
{
	/* read before reserving (see fp_policy_event) */
	__u32 ifindex = skb->ifindex;
	struct fp_event *ev;

	asm volatile("" : "+r"(ifindex));
	ev = fp_event_reserve();
	if (!ev)
		return;
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ts_ns = bpf_ktime_get_ns();
	ev->ifindex = ifindex;
	ev->reason = reason;
	ev->dir = dir;
	ev->type = FP_EV_DROP;
	ev->saddr = saddr;
	ev->daddr = daddr;
	ev->proto = proto;
	fp_event_submit(ev);
}

static __always_inline __be16 fp_guard_ethertype(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__be16 proto = 0;

	/* read in place when the header is in the linear part (almost
	 * always): a helper call per read is a tenth of a walk's cost */
	if ((void *)(eth + 1) <= data_end)
		return eth->h_proto;
	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)))
		return 0;
	return proto;
}

/* An IPv6 source a registered endpoint may use. */
static __always_inline int fp_guard_ip6_source_ok(const struct fp_ep_if *self,
						  const __u32 *saddr)
{
	const __u8 *b = (const __u8 *)saddr;
	const __u32 *own = (const __u32 *)self->ip6;

	if (b[0] == 0xfe && (b[1] & 0xc0) == 0x80)
		return 1;                       /* link-local */
	if ((saddr[0] | saddr[1] | saddr[2] | saddr[3]) == 0)
		return 1;                       /* unspecified (DAD) */
	return (self->flags & FP_EPIF_F_IP6) && saddr[0] == own[0] && saddr[1] == own[1] &&
	       saddr[2] == own[2] && saddr[3] == own[3];
}

/* The first check of fp_from_pod. Returns 0 to carry on, or 1 to drop the
 * packet with *reason (already reported to the monitor; the caller counts). */
static __always_inline int fp_guard_from_pod(struct __sk_buff *skb, enum fp_reason *reason)
{
	struct fp_ep_if *self = fp_epif_lookup(skb->ifindex);
	__be16 proto;
	__be32 ip4;

	if (!self)
		return 0;
	ip4 = self->ip4;
	proto = fp_guard_ethertype(skb);
	if (proto == bpf_htons(ETH_P_IP)) {
		void *data = (void *)(long)skb->data;
		void *data_end = (void *)(long)skb->data_end;
		__be32 saddr, daddr = 0;

		if (data + FP_IP4_SADDR_OFF + sizeof(saddr) <= data_end)
			saddr = *(__be32 *)(data + FP_IP4_SADDR_OFF);
		/* too short to hold a source: fp_parse_ipv4 drops it as invalid */
		else if (bpf_skb_load_bytes(skb, FP_IP4_SADDR_OFF, &saddr, sizeof(saddr)))
			return 0;
		/* an IPv6-only pod's key is no source address */
		if (saddr == ip4 && !(self->flags & FP_EPIF_F_KEY))
			return 0;
		bpf_skb_load_bytes(skb, FP_IP4_SADDR_OFF + 4, &daddr, sizeof(daddr));
		*reason = FP_DROP_SPOOFED;
		fp_guard_event(skb, FP_DIR_FROM_POD, *reason, saddr, daddr, 0);
		return 1;
	}
	if (proto == bpf_htons(ETH_P_ARP)) {
		__be32 spa;

		if (bpf_skb_load_bytes(skb, FP_ARP_SPA_OFF, &spa, sizeof(spa)))
			return 0;
		/* (nor an ARP probe: it has no IPv4 address to probe for) */
		if ((spa == ip4 || spa == 0) && !(self->flags & FP_EPIF_F_KEY))
			return 0;
		*reason = FP_DROP_SPOOFED;
		fp_guard_event(skb, FP_DIR_FROM_POD, *reason, spa, 0, 0);
		return 1;
	}
	return 0;
}

/* fp_guard_from_pod's IPv6 twin, run by fp_from_pod6 (fp_from_pod hands
 * IPv6 over before its own guard): the same drops, the same events. */
static __always_inline int fp_guard_from_pod6(struct __sk_buff *skb, enum fp_reason *reason)
{
	struct fp_ep_if *self = fp_epif_lookup(skb->ifindex);
	__u32 saddr[4];

	if (!self)
		return 0;
	if (bpf_skb_load_bytes(skb, FP_IP6_SADDR_OFF, saddr, sizeof(saddr)))
		*reason = FP_DROP_INVALID;
	else if (!fp_guard_ip6_source_ok(self, saddr))
		*reason = FP_DROP_SPOOFED;
	else
		return 0;
	fp_guard_event6(skb, FP_DIR_FROM_POD, *reason);
	return 1;
}

/* The first check of fp_from_vpc: a local pod's address as source. The
 * IPv6 twin of this check is the first thing fp_from_vpc6 does (bpf/eni.c),
 * so that the IPv4 program carries none of it. */
static __always_inline int fp_guard_from_vpc(struct __sk_buff *skb, enum fp_reason *reason)
{
	__be32 saddr, daddr = 0;

	if (fp_guard_ethertype(skb) != bpf_htons(ETH_P_IP))
		return 0;
	if (bpf_skb_load_bytes(skb, FP_IP4_SADDR_OFF, &saddr, sizeof(saddr)))
		return 0;
	if (!fp_endpoint_lookup(saddr))
		return 0;
	bpf_skb_load_bytes(skb, FP_IP4_SADDR_OFF + 4, &daddr, sizeof(daddr));
	*reason = FP_DROP_SPOOFED;
	fp_guard_event(skb, FP_DIR_FROM_VPC, *reason, saddr, daddr, 0);
	return 1;
}

#endif /* FP_LIB_GUARD_H */
