/* Packet parsing for tc programs: Ethernet + IPv4 header, validated.
 *
 * The result says whether the packet is IPv4 we understand, something we
 * leave to the stack (ARP, IPv6, ...), or malformed. Malformed IPv4 is never
 * forwarded by fastpath: callers drop it with FP_DROP_INVALID.
 */
#ifndef FP_LIB_PARSE_H
#define FP_LIB_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>

enum fp_parse_result {
	FP_PARSE_IPV4 = 0,
	FP_PARSE_OTHER = 1,    /* not IPv4: the stack handles it */
	FP_PARSE_INVALID = 2,  /* claims to be IPv4 but cannot be */
};

struct fp_ipv4 {
	__u32 l3_off;          /* HBO: offset of the IPv4 header */
	__be32 saddr;          /* NBO */
	__be32 daddr;          /* NBO */
	__be16 tot_len;        /* NBO */
	__u8 proto;
	__u8 ttl;
	__u8 tos;
	__u8 ihl_bytes;
};

static __always_inline int fp_parse_ipv4(struct __sk_buff *skb, struct fp_ipv4 *out)
{
	const __u32 need = ETH_HLEN + sizeof(struct iphdr);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;

	if (data + ETH_HLEN > data_end)
		return skb->len < ETH_HLEN ? FP_PARSE_INVALID : FP_PARSE_OTHER;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return FP_PARSE_OTHER;

	if (data + need > data_end) {
		/* Headers may sit in paged data; only a short packet is invalid. */
		if (skb->len < need)
			return FP_PARSE_INVALID;
		if (bpf_skb_pull_data(skb, need))
			return FP_PARSE_INVALID;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		if (data + need > data_end)
			return FP_PARSE_INVALID;
	}
	ip = data + ETH_HLEN;
	if (ip->version != 4 || ip->ihl < 5)
		return FP_PARSE_INVALID;
	if (bpf_ntohs(ip->tot_len) < ip->ihl * 4 ||
	    bpf_ntohs(ip->tot_len) > skb->len - ETH_HLEN)
		return FP_PARSE_INVALID;

	out->l3_off = ETH_HLEN;
	out->saddr = ip->saddr;
	out->daddr = ip->daddr;
	out->tot_len = ip->tot_len;
	out->proto = ip->protocol;
	out->ttl = ip->ttl;
	out->tos = ip->tos;
	out->ihl_bytes = ip->ihl * 4;
	return FP_PARSE_IPV4;
}

#endif /* FP_LIB_PARSE_H */
