/* Socket-LB: cgroup sock_addr hooks (connect4, sendmsg4, recvmsg4,
 * getpeername4), attached to a cgroup v2 directory.
 *
 * A connect() or an unconnected sendmsg() to a service frontend is sent to
 * a backend before any packet exists, so the flow needs no per-packet
 * translation and no conntrack at all. recvmsg() and getpeername() show the
 * application the VIP it asked for. In host-namespace-only mode (the
 * DataPath V2 default) sockets of pods are left alone: their traffic is
 * translated per packet on their veth, so service meshes still see the VIP.
 * In the all-sockets mode, pods that opted out (annotation
 * fastpath.io/socket-lb: disabled on the Pod or its Namespace, their netns
 * listed in FP_MAP_SOCKLB_SKIP) get that per-packet treatment too.
 * ClientIP affinity here is per network namespace (the socket's source
 * address is not known yet at connect time).
 */
#include <linux/net.h>
#include "lib/lb.h"

#define FP_SOCK_SKIP 1      /* sock_addr verdict 1 = let the call proceed */

static __always_inline int fp_sock_applies(struct bpf_sock_addr *ctx)
{
	struct fp_config *cfg = fp_config_get();

	if (!cfg || !(cfg->flags & FP_CFG_F_SOCKLB))
		return 0;
	if (cfg->flags & FP_CFG_F_SOCKLB_HOSTNS)
		return bpf_get_netns_cookie(ctx) == cfg->host_netns_cookie;
	/* all sockets, except those of opted-out pods */
	return !fp_socklb_skipped(bpf_get_netns_cookie(ctx));
}

/* The core, free of the hook context so it can be reasoned about alone:
 * translate (vip, port, proto) for the socket `cookie` of netns `nscookie`.
 * Returns 1 and fills *addr/*port when translated. */
static __always_inline int fp_sock_translate(__u64 cookie, __u64 nscookie, __u8 proto,
					     __be32 *addr, __be16 *port)
{
	struct fp_svc4 *svc = fp_service_lookup(*addr, *port, proto);
	struct fp_sockrev4_key rkey = {};
	struct fp_sockrev4 rval = {};
	struct fp_backend4 *be;
	__u32 backend_id = 0;

	if (!svc)
		return 0;
	be = fp_lb_pick(svc, (__be32)nscookie, &backend_id, bpf_ktime_get_ns());
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

static __always_inline int fp_sock_forward(struct bpf_sock_addr *ctx, __u8 proto)
{
	__be32 addr = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;
	int rc;

	if (!fp_sock_applies(ctx))
		return FP_SOCK_SKIP;
	rc = fp_sock_translate(bpf_get_socket_cookie(ctx), bpf_get_netns_cookie(ctx), proto,
			       &addr, &port);
	if (rc < 0)
		return 0;            /* no backend: the call fails (ECONNREFUSED/EPERM) */
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
	return fp_sock_forward(ctx, ctx->protocol);
}

int fp_sock_send4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_UDP)
		return FP_SOCK_SKIP;
	return fp_sock_forward(ctx, IPPROTO_UDP);
}

int fp_sock_recv4(struct bpf_sock_addr *ctx)
{
	return fp_sock_reverse(ctx);
}

int fp_sock_peer4(struct bpf_sock_addr *ctx)
{
	return fp_sock_reverse(ctx);
}
