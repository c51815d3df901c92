/* Socket-LB: cgroup sock_addr hooks (connect4, sendmsg4, recvmsg4,
 * getpeername4 and their IPv6 twins connect6, sendmsg6, recvmsg6,
 * getpeername6), attached to a cgroup v2 directory.
 *
 * A connect() or an unconnected sendmsg() to a service frontend is sent to
 * a backend before any packet exists, so the flow needs no per-packet
 * translation and no conntrack at all. recvmsg() and getpeername() show the
 * application the VIP it asked for. In host-namespace-only mode (the
 * DataPath V2 default) sockets of pods are left alone: their traffic is
 * translated per packet on their veth, so service meshes still see the VIP.
 * In the all-sockets mode, pods that opted out (annotation
 * fastpath.io/socket-lb: disabled on the Pod or its Namespace, their netns
 * listed in FP_MAP_SOCKLB_SKIP) get that per-packet treatment too. In
 * every mode, loopback frontends (a NodePort when nodeport_addresses
 * covers 127.0.0.1, a hostPort without hostIP) serve the node's sockets
 * only: a pod's 127.0.0.1 is its own.
 * ClientIP affinity here is per network namespace (the socket's source
 * address is not known yet at connect time).
 *
 * Refused (connect() or sendmsg() fails with ECONNREFUSED, as the client of
 * a rejecting kube-proxy rule sees it): a frontend with no endpoint at all,
 * and an unknown port of a live ClusterIP. Left untranslated, so that the
 * packet path drops it as kube-proxy would and counts it: a frontend whose
 * traffic policy leaves this node nothing (FP_SVC_F_DROP), and a
 * load-balancer frontend the socket's source may not reach (its
 * loadBalancerSourceRanges; the source is the socket's bound address, or
 * the node's primary address, which an unbound socket gets on its way out).
 */
#include <linux/net.h>
#include "lib/lb.h"
#include "lib/lb6.h"

#define FP_SOCK_SKIP 1      /* sock_addr verdict 1 = let the call proceed */
#define FP_ECONNREFUSED 111

#ifdef FP_HAVE_SET_RETVAL
/* Linux 5.18+: the errno a cgroup hook's refusal returns to the caller. */
static long (*fp_bpf_set_retval)(int retval) = (void *)BPF_FUNC_set_retval;
#endif

/* The verdict that makes connect()/sendmsg() fail with ECONNREFUSED (EPERM
 * on kernels without bpf_set_retval, where a refusing hook has no choice). */
static __always_inline int fp_sock_refuse(void)
{
#ifdef FP_HAVE_SET_RETVAL
	fp_bpf_set_retval(-FP_ECONNREFUSED);
#endif
	return 0;
}

/* Whether socket-LB serves this call; *netns gets the socket's netns cookie. */
static __always_inline int fp_sock_applies(struct bpf_sock_addr *ctx, __be32 daddr, __u64 *netns)
{
	struct fp_config *cfg = fp_config_get();

	if (!cfg || !(cfg->flags & FP_CFG_F_SOCKLB))
		return 0;
	*netns = bpf_get_netns_cookie(ctx);
	/* 127.0.0.0/8 is every network namespace's own: frontends there
	 * (NodePorts and hostPorts on the loopback) are the node's, and a
	 * pod's localhost stays the pod's */
	if ((bpf_ntohl(daddr) >> 24) == 127 || (cfg->flags & FP_CFG_F_SOCKLB_HOSTNS))
		return *netns == cfg->host_netns_cookie;
	/* all sockets, except those of opted-out pods */
	return !fp_socklb_skipped(*netns);
}

/* The source a socket's packets will carry: its bound address, else the
 * node's primary address (what routing gives an unbound socket towards an
 * address outside the node). */
static __always_inline __be32 fp_sock_source(struct bpf_sock_addr *ctx, int sendmsg)
{
	struct bpf_sock *sk = ctx->sk;
	struct fp_config *cfg;

	if (sendmsg && ctx->msg_src_ip4)
		return ctx->msg_src_ip4;
	if (sk && sk->src_ip4)
		return sk->src_ip4;
	cfg = fp_config_get();
	return cfg ? cfg->node_ip4 : 0;
}

/* The core, free of the hook context so it can be reasoned about alone:
 * translate (vip, port, proto) for the socket `cookie` of netns `nscookie`
 * whose packets would carry source `src`. Returns 1 and fills *addr/*port
 * when translated, 0 when left alone, -1 when the call must be refused. */
static __always_inline int fp_sock_translate(__u64 cookie, __u64 nscookie, __u8 proto,
					     __be32 src, __be32 *addr, __be16 *port)
{
	struct fp_svc4 *svc = fp_service_lookup(*addr, *port, proto);
	struct fp_sockrev4_key rkey = {};
	struct fp_sockrev4 rval = {};
	struct fp_backend4 *be;
	__u32 backend_id = 0;

	if (!svc) {
		int net = fp_svcnet_flags(*addr);

		/* a live ClusterIP, a port none of its Services has */
		return net > 0 && (net & FP_SVCNET_F_CLUSTER_IP) ? -1 : 0;
	}
	if (svc->flags & FP_SVC_F_DROP)
		return 0;
	if ((svc->flags & FP_SVC_F_SRC_RANGE) && !fp_src_range_ok(svc->svc_id, src))
		return 0;
	/* the clock is only read for ClientIP affinity (a connect's cost) */
	be = fp_lb_pick(svc, (__be32)nscookie, &backend_id,
			(svc->flags & FP_SVC_F_AFFINITY) ? bpf_ktime_get_ns() : 0);
	if (!be)
		return -1;
	rkey.cookie = cookie;
	rkey.addr = be->ip;
	rkey.port = be->port;
	rval.vip = *addr;
	rval.vport = *port;
	fp_sockrev_put(&rkey, &rval);
	*addr = be->ip;
	*port = be->port;
	return 1;
}

static __always_inline int fp_sock_forward(struct bpf_sock_addr *ctx, __u8 proto, int sendmsg)
{
	__be32 addr = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;
	__u64 netns = 0;
	int rc;

	if (!fp_sock_applies(ctx, addr, &netns))
		return FP_SOCK_SKIP;
	rc = fp_sock_translate(bpf_get_socket_cookie(ctx), netns, proto,
			       fp_sock_source(ctx, sendmsg), &addr, &port);
	if (rc < 0)
		return fp_sock_refuse();
	if (rc > 0) {
		ctx->user_ip4 = addr;
		ctx->user_port = port;
	}
	return FP_SOCK_SKIP;
}

static __always_inline int fp_sock_reverse(struct bpf_sock_addr *ctx)
{
	struct fp_sockrev4_key key = {};
	struct fp_sockrev4 *rev;

	key.cookie = bpf_get_socket_cookie(ctx);
	key.addr = ctx->user_ip4;
	key.port = (__be16)ctx->user_port;
	rev = fp_sockrev_lookup(&key);
	if (rev) {
		ctx->user_ip4 = rev->vip;
		ctx->user_port = rev->vport;
	}
	return FP_SOCK_SKIP;
}

/* TCP and UDP sockets only: an SCTP socket (SOCK_STREAM or SOCK_SEQPACKET,
 * possibly multi-homed) is left to the per-packet path. */
int fp_sock_conn4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return FP_SOCK_SKIP;
	return fp_sock_forward(ctx, ctx->protocol, 0);
}

int fp_sock_send4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_UDP)
		return FP_SOCK_SKIP;
	return fp_sock_forward(ctx, IPPROTO_UDP, 1);
}

int fp_sock_recv4(struct bpf_sock_addr *ctx)
{
	return fp_sock_reverse(ctx);
}

int fp_sock_peer4(struct bpf_sock_addr *ctx)
{
	return fp_sock_reverse(ctx);
}

/* ---- IPv6 sockets ----
 *
 * An IPv6 frontend is translated through the IPv6 maps exactly as above
 * (same verdicts, affinity per network namespace, the reverse entry in
 * FP_MAP_SOCKREV6). An IPv4-mapped destination (::ffff:a.b.c.d, an IPv6
 * socket talking IPv4) is an IPv4 frontend: it goes through the IPv4 maps
 * and its reverse entry, and the backend is written back mapped. The kernel
 * runs the IPv6 hooks for such sockets on connect(), recvmsg() and
 * getpeername(); an unconnected sendmsg() to a mapped address reaches the
 * IPv4 sendmsg hook (udpv6_sendmsg hands it to udp_sendmsg), which is
 * handled above. Loopback (::1, like 127.0.0.0/8) is the node's only. */

#define FP_V4MAPPED_WORD 0xffff0000U  /* ::ffff:0:0/96's third word, as stored (LE host) */

static __always_inline int fp_v4mapped(const __u32 *ip6)
{
	return ip6[0] == 0 && ip6[1] == 0 && ip6[2] == FP_V4MAPPED_WORD;
}

static __always_inline int fp_sock_applies6(struct bpf_sock_addr *ctx, const __u32 *ip6,
					    __u64 *netns)
{
	struct fp_config *cfg = fp_config_get();
	int loopback = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == bpf_htonl(1);

	if (!cfg || !(cfg->flags & FP_CFG_F_SOCKLB))
		return 0;
	*netns = bpf_get_netns_cookie(ctx);
	if (loopback || (cfg->flags & FP_CFG_F_SOCKLB_HOSTNS))
		return *netns == cfg->host_netns_cookie;
	return !fp_socklb_skipped(*netns);
}

/* The IPv6 source a socket's packets will carry: its bound address, else
 * the node's primary IPv6 address (fp_config.node_ip6; what routing gives
 * an unbound socket towards an address outside the node). */
static __always_inline void fp_sock_source6(struct bpf_sock_addr *ctx, int sendmsg, __u32 *src)
{
	struct bpf_sock *sk = ctx->sk;
	struct fp_config *cfg;

	if (sendmsg) {
		src[0] = ctx->msg_src_ip6[0];
		src[1] = ctx->msg_src_ip6[1];
		src[2] = ctx->msg_src_ip6[2];
		src[3] = ctx->msg_src_ip6[3];
		if (src[0] | src[1] | src[2] | src[3])
			return;
	}
	if (sk) {
		src[0] = sk->src_ip6[0];
		src[1] = sk->src_ip6[1];
		src[2] = sk->src_ip6[2];
		src[3] = sk->src_ip6[3];
		if (src[0] | src[1] | src[2] | src[3])
			return;
	}
	cfg = fp_config_get();
	if (cfg)
		__builtin_memcpy(src, cfg->node_ip6, 16);
}

static __always_inline int fp_sock_translate6(__u64 cookie, __u64 nscookie, __u8 proto,
					      const __u32 *src, __u32 *addr, __be16 *port)
{
	struct fp_svc4 *svc = fp_service6_lookup(addr, *port, proto);
	struct fp_sockrev6_key rkey = {};
	struct fp_sockrev6 rval = {};
	struct fp_backend6 *be;
	__u32 backend_id = 0;

	if (!svc) {
		int net = fp_svcnet6_flags(addr);

		return net > 0 && (net & FP_SVCNET_F_CLUSTER_IP) ? -1 : 0;
	}
	/* left untranslated for the packet path to drop and count, as IPv4 */
	if (svc->flags & FP_SVC_F_DROP)
		return 0;
	if ((svc->flags & FP_SVC_F_SRC_RANGE) && !fp_src_range6_ok(svc->svc_id, src))
		return 0;
	be = fp_lb6_pick(svc, (__be32)nscookie, &backend_id,
			 (svc->flags & FP_SVC_F_AFFINITY) ? bpf_ktime_get_ns() : 0);
	if (!be)
		return -1;
	rkey.cookie = cookie;
	__builtin_memcpy(rkey.addr, be->ip, 16);
	rkey.port = be->port;
	__builtin_memcpy(rval.vip, addr, 16);
	rval.vport = *port;
	fp_sockrev6_put(&rkey, &rval);
	__builtin_memcpy(addr, be->ip, 16);
	*port = be->port;
	return 1;
}

static __always_inline int fp_sock_forward6(struct bpf_sock_addr *ctx, __u8 proto, int sendmsg)
{
	__u32 ip6[4], src[4] = {};
	__be16 port = (__be16)ctx->user_port;
	__u64 netns = 0;
	int rc;

	ip6[0] = ctx->user_ip6[0];
	ip6[1] = ctx->user_ip6[1];
	ip6[2] = ctx->user_ip6[2];
	ip6[3] = ctx->user_ip6[3];
	if (fp_v4mapped(ip6)) {
		__be32 addr = ip6[3];
		struct bpf_sock *sk = ctx->sk;
		struct fp_config *cfg = fp_config_get();
		__be32 src = sk && sk->src_ip4 ? sk->src_ip4 : (cfg ? cfg->node_ip4 : 0);

		if (!fp_sock_applies(ctx, addr, &netns))
			return FP_SOCK_SKIP;
		rc = fp_sock_translate(bpf_get_socket_cookie(ctx), netns, proto, src, &addr, &port);
		if (rc < 0)
			return fp_sock_refuse();
		if (rc > 0) {
			ctx->user_ip6[3] = addr;
			ctx->user_port = port;
		}
		return FP_SOCK_SKIP;
	}
	if (!fp_sock_applies6(ctx, ip6, &netns))
		return FP_SOCK_SKIP;
	fp_sock_source6(ctx, sendmsg, src);
	rc = fp_sock_translate6(bpf_get_socket_cookie(ctx), netns, proto, src, ip6, &port);
	if (rc < 0)
		return fp_sock_refuse();
	if (rc > 0) {
		ctx->user_ip6[0] = ip6[0];
		ctx->user_ip6[1] = ip6[1];
		ctx->user_ip6[2] = ip6[2];
		ctx->user_ip6[3] = ip6[3];
		ctx->user_port = port;
	}
	return FP_SOCK_SKIP;
}

static __always_inline int fp_sock_reverse6(struct bpf_sock_addr *ctx)
{
	__u32 ip6[4];

	ip6[0] = ctx->user_ip6[0];
	ip6[1] = ctx->user_ip6[1];
	ip6[2] = ctx->user_ip6[2];
	ip6[3] = ctx->user_ip6[3];
	if (fp_v4mapped(ip6)) {
		struct fp_sockrev4_key key = {};
		struct fp_sockrev4 *rev;

		key.cookie = bpf_get_socket_cookie(ctx);
		key.addr = ip6[3];
		key.port = (__be16)ctx->user_port;
		rev = fp_sockrev_lookup(&key);
		if (rev) {
			ctx->user_ip6[3] = rev->vip;
			ctx->user_port = rev->vport;
		}
	} else {
		struct fp_sockrev6_key key = {};
		struct fp_sockrev6 *rev;

		key.cookie = bpf_get_socket_cookie(ctx);
		__builtin_memcpy(key.addr, ip6, 16);
		key.port = (__be16)ctx->user_port;
		rev = fp_sockrev6_lookup(&key);
		if (rev) {
			__u32 vip[4];

			__builtin_memcpy(vip, rev->vip, 16);
			ctx->user_ip6[0] = vip[0];
			ctx->user_ip6[1] = vip[1];
			ctx->user_ip6[2] = vip[2];
			ctx->user_ip6[3] = vip[3];
			ctx->user_port = rev->vport;
		}
	}
	return FP_SOCK_SKIP;
}

int fp_sock_conn6(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return FP_SOCK_SKIP;
	return fp_sock_forward6(ctx, ctx->protocol, 0);
}

int fp_sock_send6(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_UDP)
		return FP_SOCK_SKIP;
	return fp_sock_forward6(ctx, IPPROTO_UDP, 1);
}

int fp_sock_recv6(struct bpf_sock_addr *ctx)
{
	return fp_sock_reverse6(ctx);
}

int fp_sock_peer6(struct bpf_sock_addr *ctx)
{
	return fp_sock_reverse6(ctx);
}
