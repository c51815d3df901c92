/* Forwarding without the host stack.
 *
 * Local delivery: bpf_redirect_peer() hands the packet straight to the pod's
 * eth0 in its netns (skipping the backlog queue and the host veth's egress
 * hook), with the MACs the pod would see from the stack.
 * Towards the VPC: bpf_fib_lookup() follows the node's policy routing (the
 * `from <podIP> lookup <eni table>` rules Terway installs), and the packet
 * leaves by the ENI it names, via bpf_redirect() when the neighbour is known
 * or bpf_redirect_neigh() when the kernel must resolve it.
 * Either way the TTL is decremented as a router would; packets whose TTL
 * would expire go to the stack so it can answer with ICMP time exceeded.
 */
#ifndef FP_LIB_FWD_H
#define FP_LIB_FWD_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <linux/socket.h>
#include "lib/parse.h"
#include "lib/bw.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* bcc 0.26 declares bpf_redirect_neigh with the pre-5.11 three-argument
 * prototype; the kernel helper takes (ifindex, params, plen, flags). */
static long (*fp_bpf_redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params,
				     int plen, __u64 flags) = (void *)BPF_FUNC_redirect_neigh;

/* tc verdict for "not mine to decide": the next filter (or the stack) runs. */
#define FP_TC_CONTINUE TC_ACT_UNSPEC

static __always_inline int fp_ttl_dec(struct __sk_buff *skb, const struct fp_ipv4 *ip)
{
	/* ttl and protocol share one 16-bit word of the header checksum. */
	__u32 off = ip->l3_off + offsetof(struct iphdr, ttl);
	__be16 old_word, new_word;
	__u8 new_ttl = ip->ttl - 1;

	if (bpf_skb_load_bytes(skb, off, &old_word, sizeof(old_word)))
		return -1;
	new_word = old_word;
	((__u8 *)&new_word)[0] = new_ttl;
	if (bpf_l3_csum_replace(skb, ip->l3_off + offsetof(struct iphdr, check),
				old_word, new_word, sizeof(new_word)))
		return -1;
	return bpf_skb_store_bytes(skb, off, &new_ttl, 1, 0);
}

static __always_inline int fp_set_macs(struct __sk_buff *skb, __u8 *dst, __u8 *src)
{
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), dst, ETH_ALEN, 0))
		return -1;
	return bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), src, ETH_ALEN, 0);
}

/* fp_ttl_dec and fp_set_macs in place, when the headers are in the linear
 * part (fp_parse_ipv4 pulled them there; a rewrite since keeps them): four
 * helper calls were a sixth of a local delivery's cost. The checksum is
 * adjusted as a router does for a TTL one lower (RFC 1624). */
static __always_inline int fp_ttl_dec_set_macs(struct __sk_buff *skb, const struct fp_ipv4 *ip,
					       __u8 *dmac, __u8 *smac)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = data + ETH_HLEN;
	__u32 check;

	if (ip->l3_off != ETH_HLEN || (void *)(iph + 1) > data_end || iph->ttl != ip->ttl)
		return fp_ttl_dec(skb, ip) || fp_set_macs(skb, dmac, smac);
	check = iph->check;
	check += bpf_htons(0x0100);
	iph->check = (__sum16)(check + (check >= 0xFFFF));
	iph->ttl = ip->ttl - 1;
	__builtin_memcpy(eth->h_dest, dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, smac, ETH_ALEN);
	return 0;
}

/* Deliver to a pod on this node. Returns the tc verdict; *reason is set.
 * Callers restore a translated flow's VIP first (fp_ct_reverse): delivery
 * is where replies meet their client, whichever way they came. */
static __always_inline int fp_redirect_local(struct __sk_buff *skb, struct fp_ipv4 *ip,
					     const struct fp_endpoint *dst, enum fp_reason *reason)
{
	__u8 pod_mac[ETH_ALEN], host_mac[ETH_ALEN];
	int ret;

	if (ip->ttl <= 1) {
		*reason = FP_FWD_TTL;
		return FP_TC_CONTINUE;
	}
	/* Bandwidth manager (lib/bw.h): the destination's ingress limits. */
	if (fp_bw_deliver(skb, ip, reason) < 0)
		return TC_ACT_SHOT;
	/* Copy before writing the packet: the map value stays valid, but keep
	 * the helper arguments on the stack as the verifier prefers. */
	__builtin_memcpy(pod_mac, dst->pod_mac, ETH_ALEN);
	__builtin_memcpy(host_mac, dst->host_mac, ETH_ALEN);
	if (fp_ttl_dec_set_macs(skb, ip, pod_mac, host_mac)) {
		*reason = FP_DROP_INVALID;
		return TC_ACT_SHOT;
	}
	ret = bpf_redirect_peer(dst->host_ifindex, 0);
	if (ret != TC_ACT_REDIRECT) {
		*reason = FP_DROP_REDIRECT;
		return TC_ACT_SHOT;
	}
	*reason = FP_FWD_LOCAL;
	fp_test_record(dst->host_ifindex, FP_RD_PEER, 0, FP_FWD_LOCAL);
	return ret;
}

/* Send towards the VPC by the ENI the pod's policy routing selects.
 * `eni_ifindex` is the pod's ENI; any other FIB answer goes to the stack so
 * that fastpath never takes a path the node's routing would not.
 * The lookup is given the length of the packet, or of each segment a GSO
 * packet becomes (fp_fib_len), and checks it against the route's MTU. A
 * packet too big for it goes to the stack, which fragments it or answers
 * "fragmentation needed" (path MTU). */
#define FP_ANY_DEVICE 0xFFFFFFFFU

/* The length the FIB checks: the IP packet's, or for a GSO packet (a pod's
 * TCP hands 64 KB ones to its veth) that of one of its segments. Given no
 * length, the kernel checks only the device's MTU and lets any GSO packet
 * through, whatever its segments: on a narrower ENI they would be cut to
 * the pod's MSS and lost beyond it, and the pod would never learn the MTU. */
static __always_inline __u16 fp_fib_len(struct __sk_buff *skb, const struct fp_ipv4 *ip)
{
	__u32 seg = skb->gso_size;
	__u8 doff;

	if (!seg)
		return bpf_ntohs(ip->tot_len);
	if (ip->proto == IPPROTO_UDP)
		return ip->ihl_bytes + sizeof(struct udphdr) + seg;
	if (ip->proto == IPPROTO_TCP &&
	    !bpf_skb_load_bytes(skb, ip->l3_off + ip->ihl_bytes + 12, &doff, 1))
		return ip->ihl_bytes + (doff >> 4) * 4 + seg;
	return bpf_ntohs(ip->tot_len);
}

/* Send where the FIB says, if that is `want` or `also` (FP_ANY_DEVICE:
 * wherever it is); otherwise to the stack. */
static __always_inline int fp_redirect_fib(struct __sk_buff *skb, const struct fp_ipv4 *ip,
					   __u32 want, __u32 also, enum fp_reason *reason)
{
	struct bpf_fib_lookup fib = {};
	int rc, ret;

	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->proto;
	fib.tot_len = fp_fib_len(skb, ip);
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	fib.ifindex = skb->ifindex;

	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) ||
	    !(want == FP_ANY_DEVICE || (want && fib.ifindex == want) ||
	      (also && fib.ifindex == also))) {
		*reason = FP_FWD_FIB_MISS;
		return FP_TC_CONTINUE;
	}
	if (ip->ttl <= 1) {
		*reason = FP_FWD_TTL;
		return FP_TC_CONTINUE;
	}
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (fp_ttl_dec_set_macs(skb, ip, fib.dmac, fib.smac)) {
			*reason = FP_DROP_INVALID;
			return TC_ACT_SHOT;
		}
		ret = bpf_redirect(fib.ifindex, 0);
		fp_test_record(fib.ifindex, FP_RD_PLAIN, fib.ipv4_dst, FP_FWD_ENI);
	} else {
		struct bpf_redir_neigh nh = {};

		if (fp_ttl_dec(skb, ip)) {
			*reason = FP_DROP_INVALID;
			return TC_ACT_SHOT;
		}
		nh.nh_family = AF_INET;
		nh.ipv4_nh = fib.ipv4_dst;
		ret = fp_bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
		fp_test_record(fib.ifindex, FP_RD_NEIGH, fib.ipv4_dst, FP_FWD_ENI);
	}
	if (ret != TC_ACT_REDIRECT) {
		*reason = FP_DROP_REDIRECT;
		return TC_ACT_SHOT;
	}
	*reason = FP_FWD_ENI;
	return ret;
}

static __always_inline int fp_redirect_vpc(struct __sk_buff *skb, const struct fp_ipv4 *ip,
					   __u32 eni_ifindex, enum fp_reason *reason)
{
	return fp_redirect_fib(skb, ip, eni_ifindex, 0, reason);
}

#endif /* FP_LIB_FWD_H */
