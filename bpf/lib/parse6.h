/* Packet parsing for IPv6: Ethernet + the fixed header, then the extension
 * headers walked to the transport header.
 *
 * The walk is bounded (FP_IP6_EXT_MAX headers): hop-by-hop options,
 * routing, destination options and AH are stepped over by their length
 * fields; the fragment header records the datagram's identification and
 * whether this is its first fragment, and a fragment after the first ends
 * the walk (what follows it is payload, not a header). A packet with more
 * extension headers than the bound, or whose headers run past its end, is
 * malformed: callers drop it as dropped-invalid-packet rather than forward
 * what they could not judge. IPv6 has no header checksum: forwarding only
 * decrements the hop limit.
 */
#ifndef FP_LIB_PARSE6_H
#define FP_LIB_PARSE6_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include "lib/parse.h"

#ifndef ETH_P_IPV6
#define ETH_P_IPV6 0x86DD
#endif

#define FP_IP6_EXT_MAX 8

#define FP_NH_HOP      0
#define FP_NH_ROUTING  43
#define FP_NH_FRAGMENT 44
#define FP_NH_AH       51
#define FP_NH_NONE     59
#define FP_NH_DSTOPTS  60
#define FP_NH_ICMPV6   58

#define FP_ICMP6_UNREACH      1
#define FP_ICMP6_PKT_TOOBIG   2
#define FP_ICMP6_TIMXCEED     3
#define FP_ICMP6_PARAMPROB    4
#define FP_ICMP6_ECHO         128
#define FP_ICMP6_ECHOREPLY    129
#define FP_ICMP6_ND_FIRST     133   /* router solicitation */
#define FP_ICMP6_ND_LAST      137   /* redirect */

/* fp_ipv6.frag */
#define FP_IP6_NOT_FRAG   0
#define FP_IP6_FIRST_FRAG 1
#define FP_IP6_LATER_FRAG 2

struct fp_ipv6 {
	__u32 l3_off;          /* HBO: offset of the fixed header */
	__u32 l4_off;          /* HBO: offset of the transport header (after the walk) */
	__u32 saddr[4];        /* NBO */
	__u32 daddr[4];        /* NBO */
	__be32 flowinfo;       /* NBO: version, traffic class, flow label */
	__be32 frag_id;        /* NBO: the fragment header's identification */
	__be16 payload_len;    /* NBO */
	__u8 proto;            /* the transport protocol (the walk's last next header) */
	__u8 hop_limit;
	__u8 frag;             /* FP_IP6_*_FRAG */
	__u8 ext_count;        /* extension headers walked */
	__u16 pad;
};

static __always_inline int fp_ip6_is_linklocal(const __u32 *a)
{
	const __u8 *b = (const __u8 *)a;

	return b[0] == 0xfe && (b[1] & 0xc0) == 0x80;
}

static __always_inline int fp_ip6_is_multicast(const __u32 *a)
{
	return ((const __u8 *)a)[0] == 0xff;
}

static __always_inline int fp_ip6_is_unspecified(const __u32 *a)
{
	return (a[0] | a[1] | a[2] | a[3]) == 0;
}

/* Walk the extension headers from `off`, where header `nh` starts.
 * Returns 0 with ip->proto / l4_off / frag set, or -1 if malformed. */
static __always_inline int fp_ip6_walk(struct __sk_buff *skb, struct fp_ipv6 *ip, __u32 off,
				       __u8 nh)
{
	__u8 b[8];
	int i;

#pragma unroll
	for (i = 0; i < FP_IP6_EXT_MAX; i++) {
		if (nh == FP_NH_HOP || nh == FP_NH_ROUTING || nh == FP_NH_DSTOPTS) {
			if (bpf_skb_load_bytes(skb, off, b, 2))
				return -1;
			nh = b[0];
			off += ((__u32)b[1] + 1) * 8;
		} else if (nh == FP_NH_AH) {
			if (bpf_skb_load_bytes(skb, off, b, 2))
				return -1;
			nh = b[0];
			off += ((__u32)b[1] + 2) * 4;
		} else if (nh == FP_NH_FRAGMENT) {
			__be16 fo;

			if (bpf_skb_load_bytes(skb, off, b, 8))
				return -1;
			nh = b[0];
			__builtin_memcpy(&fo, &b[2], 2);
			__builtin_memcpy(&ip->frag_id, &b[4], 4);
			off += 8;
			ip->ext_count++;
			if (fo & bpf_htons(0xFFF8)) {
				/* a later fragment: no header follows */
				ip->frag = FP_IP6_LATER_FRAG;
				ip->proto = nh;
				ip->l4_off = off;
				return 0;
			}
			if (fo & bpf_htons(1))
				ip->frag = FP_IP6_FIRST_FRAG;
			continue;
		} else {
			ip->proto = nh;
			ip->l4_off = off;
			return 0;
		}
		ip->ext_count++;
	}
	/* the bound is reached: only a transport header may follow */
	if (nh == FP_NH_HOP || nh == FP_NH_ROUTING || nh == FP_NH_DSTOPTS ||
	    nh == FP_NH_AH || nh == FP_NH_FRAGMENT)
		return -1;
	ip->proto = nh;
	ip->l4_off = off;
	return 0;
}

static __always_inline int fp_parse_ipv6(struct __sk_buff *skb, struct fp_ipv6 *out)
{
	struct ipv6hdr h;
	__be16 proto;

	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto, sizeof(proto)))
		return skb->len < ETH_HLEN ? FP_PARSE_INVALID : FP_PARSE_OTHER;
	if (proto != bpf_htons(ETH_P_IPV6))
		return FP_PARSE_OTHER;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &h, sizeof(h)))
		return FP_PARSE_INVALID;
	if (h.version != 6)
		return FP_PARSE_INVALID;
	/* a jumbogram (payload length 0) is no pod's traffic */
	if (bpf_ntohs(h.payload_len) == 0 ||
	    bpf_ntohs(h.payload_len) > skb->len - ETH_HLEN - sizeof(h))
		return FP_PARSE_INVALID;
	out->l3_off = ETH_HLEN;
	__builtin_memcpy(out->saddr, &h.saddr, 16);
	__builtin_memcpy(out->daddr, &h.daddr, 16);
	__builtin_memcpy(&out->flowinfo, &h, 4);
	out->payload_len = h.payload_len;
	out->hop_limit = h.hop_limit;
	out->frag = FP_IP6_NOT_FRAG;
	out->ext_count = 0;
	out->frag_id = 0;
	if (fp_ip6_walk(skb, out, ETH_HLEN + sizeof(h), h.nexthdr))
		return FP_PARSE_INVALID;
	/* headers past the payload: the walk read other bytes than the header's */
	if (out->l4_off > ETH_HLEN + sizeof(h) + bpf_ntohs(h.payload_len))
		return FP_PARSE_INVALID;
	return FP_PARSE_IPV6;
}

/* Neighbour discovery and router solicitation/advertisement: the stack's. */
static __always_inline int fp_ip6_is_nd(struct __sk_buff *skb, const struct fp_ipv6 *ip)
{
	__u8 type;

	if (ip->proto != FP_NH_ICMPV6 || ip->frag == FP_IP6_LATER_FRAG)
		return 0;
	if (bpf_skb_load_bytes(skb, ip->l4_off, &type, 1))
		return 0;
	return type >= FP_ICMP6_ND_FIRST && type <= FP_ICMP6_ND_LAST;
}

#endif /* FP_LIB_PARSE6_H */
