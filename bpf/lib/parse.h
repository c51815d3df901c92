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
#include <uapi/linux/in.h>

enum fp_parse_result {
	FP_PARSE_IPV4 = 0,
	FP_PARSE_OTHER = 1,    /* not IPv4: the stack handles it */
	FP_PARSE_INVALID = 2,  /* claims to be IPv4 but cannot be */
	FP_PARSE_IPV6 = 3,     /* lib/parse6.h: IPv6 we understand */
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
	__be16 frag_off;       /* NBO: flags and fragment offset, as in the header */
	__be16 id;             /* NBO: identification (fragments of one datagram share it) */
};

#define FP_IP_MF     0x2000    /* more fragments (host order of frag_off) */
#define FP_IP_OFFSET 0x1FFF    /* fragment offset, in 8-byte units */

/* A fragment after the first: no L4 header, no ports. */
static __always_inline int fp_ip_later_fragment(const struct fp_ipv4 *ip)
{
	return (ip->frag_off & bpf_htons(FP_IP_OFFSET)) != 0;
}

/* The first fragment of a datagram that has more. */
static __always_inline int fp_ip_first_fragment(const struct fp_ipv4 *ip)
{
	return (ip->frag_off & bpf_htons(FP_IP_MF | FP_IP_OFFSET)) == bpf_htons(FP_IP_MF);
}

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
	out->frag_off = ip->frag_off;
	out->id = ip->id;
	return FP_PARSE_IPV4;
}

/* What a packet carries above IPv4, parsed once per packet. */
#define FP_L4_NONE       0   /* no ports: other protocols, other ICMP types */
#define FP_L4_PORTS      1   /* TCP, UDP, SCTP: the only or first fragment */
#define FP_L4_ECHO       2   /* ICMP echo request or reply: the identifier as a port */
#define FP_L4_ICMP_ERR   3   /* ICMP unreachable, time exceeded, parameter problem */
#define FP_L4_LATER_FRAG 4   /* a fragment after the first: nothing to parse */

#define FP_TCP_FIN 0x01
#define FP_TCP_SYN 0x02
#define FP_TCP_RST 0x04
#define FP_TCP_ACK 0x10

#define FP_ICMP_ECHOREPLY   0
#define FP_ICMP_UNREACH     3
#define FP_ICMP_ECHO        8
#define FP_ICMP_TIMXCEED    11
#define FP_ICMP_PARAMPROB   12
#define FP_SCTP_CHUNK_INIT  1

struct fp_l4 {
	__be16 sport;          /* NBO; ICMP echo: the identifier at the requester's end, 0 at the other */
	__be16 dport;          /* NBO */
	__u32 off;             /* HBO: offset of the L4 header */
	__u8 kind;             /* FP_L4_* */
	__u8 tcp_flags;        /* TCP: the header's flags byte */
	__u8 icmp_type;
	__u8 opening;          /* may start a flow: TCP SYN without ACK, SCTP INIT, any
				* UDP datagram, ICMP echo request */
};

/* Read in place when this much of the transport header is linear: TCP's
 * flags byte is its 14th (a shorter UDP datagram is read by the helper). */
#define FP_L4_DIRECT_BYTES 14

/* Parse the transport header. Returns 0 when the packet has ports (TCP,
 * UDP or SCTP), -1 otherwise; l4->kind says what it is in every case. */
static __always_inline int fp_parse_l4(struct __sk_buff *skb, const struct fp_ipv4 *ip,
				       struct fp_l4 *l4)
{
	__be16 ports[2];
	__u8 b[2];

	l4->sport = 0;
	l4->dport = 0;
	l4->tcp_flags = 0;
	l4->icmp_type = 0;
	l4->opening = 0;
	l4->kind = FP_L4_NONE;
	l4->off = ip->l3_off + ip->ihl_bytes;
	if (fp_ip_later_fragment(ip)) {
		l4->kind = FP_L4_LATER_FRAG;
		return -1;
	}
	if (ip->proto == IPPROTO_ICMP) {
		if (bpf_skb_load_bytes(skb, l4->off, b, 2))
			return -1;
		l4->icmp_type = b[0];
		if (b[0] == FP_ICMP_ECHO || b[0] == FP_ICMP_ECHOREPLY) {
			__be16 id;

			if (bpf_skb_load_bytes(skb, l4->off + 4, &id, 2))
				return -1;
			l4->kind = FP_L4_ECHO;
			if (b[0] == FP_ICMP_ECHO) {
				l4->sport = id;
				l4->opening = 1;
			} else {
				l4->dport = id;
			}
		} else if (b[0] == FP_ICMP_UNREACH || b[0] == FP_ICMP_TIMXCEED ||
			   b[0] == FP_ICMP_PARAMPROB) {
			l4->kind = FP_L4_ICMP_ERR;
		}
		return -1;
	}
	if (ip->proto != IPPROTO_TCP && ip->proto != IPPROTO_UDP && ip->proto != IPPROTO_SCTP)
		return -1;
	{
		/* in place when the header is in the linear part (almost
		 * always): the helper calls were a tenth of a short walk */
		void *data = (void *)(long)skb->data;
		void *data_end = (void *)(long)skb->data_end;
		__u32 off = l4->off & 0xff;     /* (at most 14 + 60: a bound the verifier sees) */
		__u8 *h = data + off;

		if ((void *)(h + FP_L4_DIRECT_BYTES) <= data_end) {
			l4->sport = *(__be16 *)h;
			l4->dport = *(__be16 *)(h + 2);
			if (ip->proto == IPPROTO_TCP) {
				l4->tcp_flags = h[13];
				l4->opening = (h[13] & (FP_TCP_SYN | FP_TCP_ACK)) == FP_TCP_SYN;
			} else if (ip->proto == IPPROTO_SCTP) {
				l4->opening = h[12] == FP_SCTP_CHUNK_INIT;
			} else {
				l4->opening = 1;
			}
			l4->kind = FP_L4_PORTS;
			return 0;
		}
	}
	if (bpf_skb_load_bytes(skb, l4->off, ports, sizeof(ports)))
		return -1;
	l4->sport = ports[0];
	l4->dport = ports[1];
	if (ip->proto == IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, l4->off + 13, b, 1))
			return -1;
		l4->tcp_flags = b[0];
		l4->opening = (b[0] & (FP_TCP_SYN | FP_TCP_ACK)) == FP_TCP_SYN;
	} else if (ip->proto == IPPROTO_SCTP) {
		if (bpf_skb_load_bytes(skb, l4->off + 12, b, 1))
			return -1;
		l4->opening = b[0] == FP_SCTP_CHUNK_INIT;
	} else {
		l4->opening = 1;
	}
	l4->kind = FP_L4_PORTS;
	return 0;
}

#endif /* FP_LIB_PARSE_H */
