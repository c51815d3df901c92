/* The IPv6 programs' exits: count by family and tell the monitor, with the
 * packet's IPv6 addresses.
 *
 * fp_finish6 is the end of an IPv6 walk that has parsed its packet: the
 * counter (family ipv6), a struct fp_event6 for a drop (always) or a
 * forwarding decision (while a monitor asks for trace events), and the
 * decision record of test and what-if runs. fp_finish_quiet6 is the end of
 * one with nothing to report: the link's own traffic (neighbour discovery,
 * link-local, multicast), which the IPv4 programs pass without an event as
 * they pass ARP.
 *
 * Self-contained: map accessors of maps.c only; the callers' frames gain
 * nothing (the record is built in ring buffer memory).
 */
#ifndef FP_LIB_EVENT6_H
#define FP_LIB_EVENT6_H

#include "lib/parse6.h"

/* Transport ports of a TCP, UDP or SCTP packet (0 for anything else and
 * for fragments after the first, which carry none). */
static __always_inline __u32 fp_ports6(struct __sk_buff *skb, const struct fp_ipv6 *ip)
{
	__u32 ports = 0;

	if (ip->frag == FP_IP6_LATER_FRAG ||
	    (ip->proto != IPPROTO_TCP && ip->proto != IPPROTO_UDP && ip->proto != IPPROTO_SCTP))
		return 0;
	if (bpf_skb_load_bytes(skb, ip->l4_off, &ports, sizeof(ports)))
		return 0;
	return ports;
}

/* The head every IPv6 record starts with, in ring buffer memory (no
 * frame): zeroed, stamped, flagged IPv6; the rest is the caller's. */
static __always_inline void fp_event6_head(struct fp_event6 *ev, __u32 ifindex,
					   enum fp_reason reason, enum fp_dir dir, __u8 type)
{
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->ev.ts_ns = bpf_ktime_get_ns();
	ev->ev.ifindex = ifindex;
	ev->ev.reason = reason;
	ev->ev.dir = dir;
	ev->ev.type = type;
	ev->ev.flags = FP_EV_F_IPV6;
}

static __always_inline void fp_report6(struct __sk_buff *skb, enum fp_dir dir,
				       enum fp_reason reason, const struct fp_ipv6 *ip)
{
	int drop = reason >= FP_REASON_DROP_MIN;
	struct fp_event6 *ev;
	__u32 ifindex, ports;

	if (!drop && !(fp_events_wanted() & FP_MON_EV_TRACE))
		return;
	/* read before reserving (see fp_policy_event), from a fresh ctx
	 * pointer: the verifier refuses a ctx field's address the compiler
	 * would otherwise keep across the caller's walk */
	barrier_var(skb);
	ifindex = skb->ifindex;
	ports = fp_ports6(skb, ip);
	barrier_var(ifindex);
	barrier_var(ports);
	ev = fp_event6_reserve();
	if (!ev)
		return;
	fp_event6_head(ev, ifindex, reason, dir, drop ? FP_EV_DROP : FP_EV_TRACE);
	__builtin_memcpy(&ev->ev.sport, &ports, sizeof(ports));   /* sport, dport */
	ev->ev.proto = ip->proto;
	__builtin_memcpy(ev->saddr6, ip->saddr, 16);
	__builtin_memcpy(ev->daddr6, ip->daddr, 16);
	fp_event6_submit(ev);
}

static __always_inline int fp_finish_quiet6(struct __sk_buff *skb, enum fp_dir dir,
					    enum fp_reason reason, int verdict)
{
	barrier_var(skb);
	fp_count_family(skb->ifindex, dir, reason, skb->len, FP_FAM_IPV6);
	if (verdict != TC_ACT_REDIRECT)
		fp_test_record(0, FP_RD_NONE, 0, reason);
	return verdict;
}

static __always_inline int fp_finish6(struct __sk_buff *skb, enum fp_dir dir,
				      enum fp_reason reason, int verdict,
				      const struct fp_ipv6 *ip)
{
	fp_report6(skb, dir, reason, ip);
	return fp_finish_quiet6(skb, dir, reason, verdict);
}

/* A drop the guards decide before any parsing (lib/guard.h), in the IPv4
 * programs at their stack limit: the addresses go straight from the packet
 * into the record, through no frame. */
static __always_inline void fp_guard_event6(struct __sk_buff *skb, enum fp_dir dir,
					    enum fp_reason reason)
{
	__u32 ifindex = skb->ifindex;
	struct fp_event6 *ev;

	barrier_var(ifindex);
	ev = fp_event6_reserve();
	if (!ev)
		return;
	fp_event6_head(ev, ifindex, reason, dir, FP_EV_DROP);
	/* next header: the transport protocol when no extension header comes first */
	bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, nexthdr), &ev->ev.proto, 1);
	bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct ipv6hdr, saddr), ev->saddr6, 32);
	fp_event6_submit(ev);
}

#endif /* FP_LIB_EVENT6_H */
