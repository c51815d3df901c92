/* fastpath's datapath contract: every map layout, enum and reason code.
 *
 * This header is the single source of truth shared by the BPF programs and
 * the Python agent. Python never restates a layout: it takes struct layouts
 * from bcc's generated ctypes for each table, and it reads the enums and
 * X-macro lists below by parsing this file (agent/bpfdefs.py). When you
 * change a struct here, bump the version suffix of every map that uses it
 * (FP_MAP_* below), so that a new agent never reuses an old pinned map.
 *
 * Byte order is stated on every multi-byte field: NBO (network) or HBO (host).
 */
#ifndef FASTPATH_H
#define FASTPATH_H

#include <linux/types.h>

/* Pinned map names (kernel limit: 15 characters). The suffix is the layout
 * version; the name before it is the map's lineage. A pinned map whose
 * layout (BTF fingerprint: field names, offsets and sizes, recursively) or
 * size differs from what the agent compiled, or an older version of the
 * same lineage, is migrated field by field by name into the new map
 * (agent/datapath/btf.py reads the layouts, agent/conntrack/migrate.py
 * plans the conntrack maps' entries), never reused as it is. */
#define FP_MAP_ENDPOINTS  fp_ep4_v1
#define FP_MAP_COUNTERS   fp_cnt_v2
#define FP_MAP_BYPASS     fp_bypass4_v1
#define FP_MAP_DECISION   fp_decision_v1
#define FP_MAP_SERVICES   fp_svc4_v2
#define FP_MAP_SLOTS      fp_slot4_v1
#define FP_MAP_BACKENDS   fp_be4_v1
#define FP_MAP_CT         fp_ct4_v3
#define FP_MAP_CT_NEW     fp_ctnew4_v2
#define FP_MAP_CT_POLICY  fp_ctpol4_v1
#define FP_MAP_FRAG       fp_frag4_v1
#define FP_MAP_CT_STATS   fp_ctstat_v1
#define FP_MAP_AFFINITY   fp_aff4_v1
#define FP_MAP_SOCKREV    fp_sockrev4_v1
#define FP_MAP_CONFIG     fp_cfg_v5
#define FP_MAP_MONITOR    fp_monitor_v1
#define FP_MAP_EVENTS     fp_events_v1
#define FP_MAP_IPCACHE    fp_ipcache4_v1
#define FP_MAP_POLICY_EP  fp_polep4_v1
#define FP_MAP_POLICY     fp_pol4_v1
#define FP_MAP_POLICY_CNT fp_polcnt_v1
#define FP_MAP_SOCKLB_SKIP fp_sklbskip_v1
#define FP_MAP_CRC32C     fp_crc32c_v1
#define FP_MAP_MAGLEV     fp_maglev4_v1
#define FP_MAP_SRC_RANGE  fp_srcrng4_v1
#define FP_MAP_SVCNET     fp_svcnet4_v1
#define FP_MAP_EP_IFINDEX fp_epif_v1
/* IPv6 twins of the IPv4 maps (docs/ipv6.md): own maps with 16-byte keys,
 * so the IPv4 keys, lookups and hot path stay exactly as they are. */
#define FP_MAP_ENDPOINTS6 fp_ep6_v1
#define FP_MAP_BYPASS6    fp_bypass6_v1
/* IPv6 Services (v6svc): frontends and backends of IPv6 ClusterIPs, the
 * IPv6 Service ranges and ClusterIPs, and socket-LB's reverse entries of
 * IPv6 sockets. Slots, Maglev tables and affinity stay shared: service and
 * backend ids are one id space over both families. */
#define FP_MAP_SERVICES6  fp_svc6_v1
#define FP_MAP_BACKENDS6  fp_be6_v1
#define FP_MAP_SVCNET6    fp_svcnet6_v1
#define FP_MAP_SOCKREV6   fp_sockrev6_v1
/* IPv6 node-facing Services: loadBalancerSourceRanges of IPv6
 * load-balancer frontends (struct fp_srcrange6_key). */
#define FP_MAP_SRC_RANGE6 fp_srcrng6_v1
/* Programs reached by tail call (FP_TAIL_* below). Pinned: attached
 * programs keep reaching them while the agent restarts (a prog array
 * forgets its programs once no file or pin refers to it); the agent writes
 * every slot at each start, before it attaches anything. */
#define FP_MAP_TAILS      fp_tails_v1
/* What fp_from_pod hands fp_pod_route (pod.c: struct fp_pod_route), one
 * slot per CPU. Pinned, so every generation of programs shares it: while
 * the agent restarts or upgrades, the fp_from_pod still attached tail-calls
 * the fp_pod_route the new agent put in FP_MAP_TAILS, and both must meet
 * in the same map. Its bytes are pod.c's struct: change that layout and
 * this version changes. */
#define FP_MAP_POD_ROUTE  fp_podroute_v1
/* Bandwidth manager (lib/bw.h): per-pod limits, their state, tracked
 * connections of connection-limited pods, per-pod counters. */
#define FP_MAP_BW          fp_bw4_v1
#define FP_MAP_BW_STATE    fp_bwst4_v1
#define FP_MAP_BW_FLOWS    fp_bwflow4_v1
#define FP_MAP_BW_COUNTERS fp_bwcnt_v1
/* Bandwidth for IPv6 (v6bw): the limits, state and counters above serve
 * both families (one budget per pod); only connections keep IPv6 tuples,
 * in their twin map. */
#define FP_MAP_BW_FLOWS6   fp_bwflow6_v1

/* Pod endpoints on this node, keyed by pod IPv4 address. Filled by the agent
 * (CNI ADD or restore); read by every program to find local destinations. */
struct fp_endpoint_key {
	__be32 ip4;            /* NBO */
};

#define FP_EP_F_REGISTERED   (1U << 0)  /* entry is complete and usable */

/* Pod endpoints by their global IPv6 address (FP_MAP_ENDPOINTS6), with the
 * same value as the IPv4 map: a dual-stack pod has one entry in each. */
struct fp_endpoint6_key {
	__u8 ip6[16];          /* NBO: the pod's IPv6 address */
};
_Static_assert(sizeof(struct fp_endpoint6_key) == 16, "fp_endpoint6_key layout");

/* IPv6 prefixes (the host-stack bypass's IPv6 twin, FP_MAP_BYPASS6). */
struct fp_lpm6_key {
	__u32 prefixlen;       /* HBO */
	__u8 addr[16];         /* NBO: IPv6 address */
};
_Static_assert(sizeof(struct fp_lpm6_key) == 20, "fp_lpm6_key layout");

struct fp_endpoint {
	__u32 host_ifindex;    /* HBO: host-side cali* veth */
	__u32 eni_ifindex;     /* HBO: ENI the pod's policy routing uses; 0 = unknown */
	__u8  pod_mac[6];      /* pod's eth0 */
	__u8  host_mac[6];     /* host-side veth */
	__u32 flags;           /* HBO: FP_EP_F_* */
	__u32 ep_id;           /* HBO: agent-assigned endpoint id, stable per pod */
};
_Static_assert(sizeof(struct fp_endpoint) == 28, "fp_endpoint layout");

/* Code lists are X-macros, X(C name, value, label): one list gives the C
 * enum (FP_ENUM_ENTRY) and, read by agent/model/bpfdefs.py, the labels the
 * agent and the CLI print. */
#define FP_ENUM_ENTRY(name, val, label) name = val,

/* Where a packet was seen; part of the counter key and of monitor events. */
#define FP_DIRS(X)                 \
	X(FP_DIR_FROM_POD, 0, "from-pod") \
	X(FP_DIR_TO_POD,   1, "to-pod")   \
	X(FP_DIR_FROM_VPC, 2, "from-vpc") \
	X(FP_DIR_TO_VPC,   3, "to-vpc")

/* Every verdict has a reason; the label is also the metric label.
 * Codes < 100 are forwarding outcomes, codes >= 100 are drops. */
#define FP_REASONS(X)                                          \
	X(FP_FWD_LOCAL,        0, "redirected-local")          \
	X(FP_FWD_ENI,          1, "redirected-eni")            \
	X(FP_FWD_STACK,        2, "to-stack")                  \
	X(FP_FWD_BYPASS,       3, "to-stack-bypass")           \
	X(FP_FWD_FIB_MISS,     4, "to-stack-fib")              \
	X(FP_FWD_TTL,          5, "to-stack-ttl")              \
	X(FP_FWD_PASS,         6, "passed")                    \
	X(FP_FWD_SVC,          7, "service-translated")        \
	X(FP_FWD_REVNAT,       8, "service-reply-restored")    \
	X(FP_FWD_AUDIT,        9, "policy-audit-would-deny")   \
	X(FP_FWD_RELATED,     10, "related-icmp-restored")     \
	X(FP_FWD_BW_UNTRACKED, 20, "connection-untracked")    \
	X(FP_DROP_INVALID,   100, "dropped-invalid-packet")    \
	X(FP_DROP_SPOOFED,   101, "dropped-source-spoofed")    \
	X(FP_DROP_REDIRECT,  102, "dropped-redirect-failed")   \
	X(FP_DROP_NO_BACKEND, 103, "dropped-service-no-backend") \
	X(FP_DROP_CSUM,      104, "dropped-checksum-update") \
	X(FP_DROP_POLICY,    105, "dropped-policy-denied")     \
	X(FP_DROP_IPV6_UNJUDGED, 106, "dropped-ipv6-not-judged") \
	X(FP_DROP_CT_NO_BACKEND, 107, "dropped-ct-no-backend") \
	X(FP_DROP_FRAG_NO_FIRST, 108, "dropped-fragment-without-first") \
	X(FP_DROP_NO_LOCAL_BACKEND, 109, "dropped-service-no-local-backend") \
	X(FP_DROP_SOURCE_RANGE, 110, "dropped-source-range")       \
	X(FP_DROP_SVC_UNALLOCATED, 111, "dropped-service-unallocated") \
	X(FP_DROP_SVC_UNKNOWN_PORT, 112, "dropped-service-unknown-port") \
	X(FP_DROP_SNAT_NO_PORT, 113, "dropped-snat-no-port") \
	X(FP_DROP_NO_TAIL_CALL, 114, "dropped-tail-call-missing") \
	X(FP_DROP_FRAG_NEEDED, 115, "dropped-fragmentation-needed") \
	X(FP_DROP_BW_EGRESS,  120, "dropped-bandwidth-egress") \
	X(FP_DROP_BW_INGRESS, 121, "dropped-bandwidth-ingress") \
	X(FP_DROP_BW_HORIZON, 122, "dropped-bandwidth-horizon") \
	X(FP_DROP_PPS_EGRESS, 123, "dropped-packet-rate-egress") \
	X(FP_DROP_PPS_INGRESS, 124, "dropped-packet-rate-ingress") \
	X(FP_DROP_CONN_EGRESS, 125, "dropped-connection-limit-egress") \
	X(FP_DROP_CONN_INGRESS, 126, "dropped-connection-limit-ingress")

enum fp_dir { FP_DIRS(FP_ENUM_ENTRY) };
enum fp_reason { FP_REASONS(FP_ENUM_ENTRY) };

#define FP_REASON_DROP_MIN 100

/* The address family a counter counts (fp_counter_key.family): the IPv6
 * programs and every IPv6 frame count as ipv6, everything else the IPv4
 * programs see (IPv4, ARP) as ipv4. 0 is ipv4 so that counters of the
 * release before the split (the byte was padding, always 0) carry over. */
#define FP_FAMILIES(X)            \
	X(FP_FAM_IPV4, 0, "ipv4") \
	X(FP_FAM_IPV6, 1, "ipv6")

enum fp_family { FP_FAMILIES(FP_ENUM_ENTRY) };

/* Per-CPU packet/byte counters per (interface, direction, reason, family). */
struct fp_counter_key {
	__u32 ifindex;         /* HBO */
	__u16 reason;          /* HBO: enum fp_reason */
	__u8  dir;             /* enum fp_dir */
	__u8  family;          /* enum fp_family */
};
_Static_assert(sizeof(struct fp_counter_key) == 8, "fp_counter_key layout");

struct fp_counter {
	__u64 packets;
	__u64 bytes;
};

/* Destinations that must always reach the host stack (node-local DNS and
 * the like): an LPM trie of IPv4 prefixes. */
struct fp_lpm4_key {
	__u32 prefixlen;       /* HBO */
	__be32 addr;           /* NBO */
};

/* Service load-balancing (per packet). A frontend (VIP, port, protocol)
 * names a service id and how many backend slots it has; slots 1..count map
 * to backend ids; backends hold the real address. The agent writes them in
 * the order backends -> slots -> service entry (and the reverse on removal),
 * so a packet that sees a service entry always finds its slots and backends.
 * IPv4 maps carry the "4" in their names; IPv6 gets its own maps. */
struct fp_svc4_key {
	__be32 vip;            /* NBO */
	__be16 port;           /* NBO */
	__u8 proto;            /* IPPROTO_* */
	__u8 scope;            /* FP_SCOPE_*: which clients the entry is for */
};
_Static_assert(sizeof(struct fp_svc4_key) == 8, "fp_svc4_key layout");

/* An internal entry serves this node's own sockets and pods, and traffic
 * from outside when the frontend has no external entry; an external entry
 * serves only traffic arriving on the node's interfaces (the primary NIC
 * and the ENIs), which takes it when there is one (externalTrafficPolicy
 * Local, Maglev; FP_SVC_F_SOLE says there is none). agent/lb/compile.py
 * SCOPE_* are these values. */
#define FP_SCOPE_INTERNAL 0
#define FP_SCOPE_EXTERNAL 1

#define FP_SVC_F_AFFINITY  (1U << 0)  /* sessionAffinity: ClientIP */
#define FP_SVC_F_REJECT    (1U << 1)  /* no usable endpoint anywhere: reject, never black-hole */
#define FP_SVC_F_LOCAL     (1U << 2)  /* a Local traffic policy applied */
#define FP_SVC_F_EXTERNAL  (1U << 3)  /* a node-facing frontend (ExternalIP, LoadBalancer
				       * IP, NodePort, hostPort) */
#define FP_SVC_F_DROP      (1U << 4)  /* endpoints exist, but the traffic policy leaves
				       * none for this entry's clients here: drop */
#define FP_SVC_F_MAGLEV    (1U << 5)  /* new flows choose by the Maglev table */
#define FP_SVC_F_SRC_RANGE (1U << 6)  /* loadBalancerSourceRanges: other sources dropped */
#define FP_SVC_F_NODEPORT  (1U << 7)  /* a NodePort (kind, for inspection) */
#define FP_SVC_F_HOSTPORT  (1U << 8)  /* a pod's hostPort (kind, for inspection) */
#define FP_SVC_F_SOLE      (1U << 9)  /* a node-facing frontend's only entry (internal, no
				       * external one): traffic from outside takes it
				       * without asking for an external entry first */

struct fp_svc4 {
	__u32 svc_id;          /* HBO */
	__u16 count;           /* HBO: backend slots 1..count */
	__u16 flags;           /* HBO: FP_SVC_F_* */
	__u32 affinity_timeout; /* HBO: seconds, with FP_SVC_F_AFFINITY */
};
_Static_assert(sizeof(struct fp_svc4) == 12, "fp_svc4 layout");

/* IPv6 frontends (FP_MAP_SERVICES6): the same value as IPv4's (struct
 * fp_svc4), so the service id, slots, flags and affinity read alike. */
struct fp_svc6_key {
	__u8 vip[16];          /* NBO */
	__be16 port;           /* NBO */
	__u8 proto;            /* IPPROTO_* */
	__u8 scope;            /* FP_SCOPE_* */
};
_Static_assert(sizeof(struct fp_svc6_key) == 20, "fp_svc6_key layout");

/* Service address ranges (kube-proxy's nftables-mode checks): an LPM trie
 * of IPv4 prefixes (struct fp_lpm4_key) -> __u32 FP_SVCNET_F_* flags. A new
 * flow to an address here that is no frontend is rejected when the address
 * is a live ClusterIP (an unknown port or protocol), dropped when it lies in
 * a Service CIDR but is no ClusterIP (unallocated); a ClusterIP of a Service
 * fastpath does not translate (another proxy's) is here with no flag. */
#define FP_SVCNET_F_CLUSTER_IP (1U << 0)
#define FP_SVCNET_F_RANGE      (1U << 1)

struct fp_slot_key {
	__u32 svc_id;          /* HBO */
	__u32 slot;            /* HBO: 1..count */
};

struct fp_slot {
	__u32 backend_id;      /* HBO */
};

/* A terminating backend (its pod is going away) stays in the backends map
 * for the flows already on it; slots never name it and affinity skips it,
 * so no new connection chooses it. */
#define FP_BE_F_DRAINING (1U << 0)

struct fp_backend4 {
	__be32 ip;             /* NBO */
	__be16 port;           /* NBO */
	__u8 proto;
	__u8 flags;            /* FP_BE_F_* */
};
_Static_assert(sizeof(struct fp_backend4) == 8, "fp_backend4 layout");

/* IPv6 backends (FP_MAP_BACKENDS6), keyed by backend id like IPv4's: a slot
 * of an IPv6 frontend names a backend id found here. */
struct fp_backend6 {
	__u8 ip[16];           /* NBO */
	__be16 port;           /* NBO */
	__u8 proto;
	__u8 flags;            /* FP_BE_F_* */
};
_Static_assert(sizeof(struct fp_backend6) == 20, "fp_backend6 layout");

/* Maglev: for a frontend with FP_SVC_F_MAGLEV, a new flow takes entry
 * fp_maglev_hash(flow) % FP_MAGLEV_M of its table (the same backends on
 * every node for a flow; agent/lb/maglev.py builds the table). Keyed by
 * service id (__u32 HBO). FP_MAGLEV_M is a build option (the prime
 * maglev_table_size of agent/config), so the value's size is too. */
#ifndef FP_MAGLEV_M
#define FP_MAGLEV_M 1021
#endif

struct fp_maglev {
	__u32 backend_ids[FP_MAGLEV_M];  /* HBO */
};

/* loadBalancerSourceRanges: an LPM trie keyed by the frontend's service id
 * (matched exactly, the first 32 bits of the prefix) then the source
 * prefix. A frontend with FP_SVC_F_SRC_RANGE drops (FP_DROP_SOURCE_RANGE)
 * a new flow whose source has no match. Value: __u8, unused. */
#define FP_SRC_RANGE_FIXED_BITS 32

struct fp_srcrange4_key {
	__u32 prefixlen;       /* HBO: 32 + the source prefix length */
	__u32 svc_id;          /* HBO */
	__be32 addr;           /* NBO */
};
_Static_assert(sizeof(struct fp_srcrange4_key) == 12, "fp_srcrange4_key layout");

/* The IPv6 twin (FP_MAP_SRC_RANGE6): the same service id first, then an
 * IPv6 source prefix. An IPv6 load-balancer frontend's ranges are its
 * Service's IPv6 prefixes (agent/lb/compile.py: each family its own). */
struct fp_srcrange6_key {
	__u32 prefixlen;       /* HBO: 32 + the source prefix length */
	__u32 svc_id;          /* HBO */
	__u8 addr[16];         /* NBO */
};
_Static_assert(sizeof(struct fp_srcrange6_key) == 24, "fp_srcrange6_key layout");

/* Connection tracking (bpf/lib/ct.h owns it; agent/conntrack/ is its agent
 * side). Four maps, so that one kind of state can never evict another:
 *
 *   FP_MAP_CT         hash (never evicts): translated flows that are
 *                     established (TCP: the handshake completed; other
 *                     protocols: a reply was seen), and their TCP closes.
 *                     Removed when the close completes (the ACK of the
 *                     second FIN), on a RST (moved to FP_MAP_CT_NEW), when
 *                     idle past their state's lifetime (the agent's GC), or
 *                     by the agent's purge.
 *   FP_MAP_CT_NEW     LRU: translated flows that are new or half-open,
 *                     established ones the hash could not take (full:
 *                     counted as FP_CTE_PROMOTE_FULL) and their closes,
 *                     reset flows.
 *                     A SYN flood or thousands of reset flows evict only
 *                     each other here.
 *   FP_MAP_CT_POLICY  LRU: flows NetworkPolicy admitted (one entry per flow,
 *                     keyed by the tuple after translation, lower
 *                     (address, port) end first, dir FP_CT_POLICY).
 *   FP_MAP_FRAG       LRU: what the first fragment of a datagram decided,
 *                     for the fragments after it (struct fp_frag4).
 *
 * A translated flow has two entries with the same value layout: the
 * forward one (dir FP_CT_FORWARD, the client's tuple towards the VIP)
 * names the backend; the reply one (dir FP_CT_REPLY, the backend's tuple
 * back to the client) names the VIP to put back as source. Both always
 * live in the same map and carry the flow's state; a packet refreshes its
 * own entry and, at most once a second, its partner, so a flow is idle
 * only when both directions are.
 *
 * An entry older than its state's lifetime is absent for the datapath as
 * for the agent. Lifetimes are build options set from agent/config.py
 * (conntrack_tcp_*_timeout, conntrack_idle_timeout), in seconds:
 * FP_CT_TCP_SYN_S, FP_CT_TCP_ESTABLISHED_S, FP_CT_TCP_FIN_S,
 * FP_CT_TCP_CLOSE_S, FP_CT_OTHER_S. */
#define FP_CT_FORWARD 0
#define FP_CT_REPLY   1
#define FP_CT_POLICY  2

/* fp_ct4.flags and fp_ctpol4.flags */
#define FP_CT_F_HAIRPIN   (1U << 0)  /* a pod reaching itself through a Service:
				      * its source is replaced by the local
				      * router address (FP_HAIRPIN_IP), because a
				      * pod drops packets whose source is its own IP */
#define FP_CT_F_FIN_ORIG  (1U << 1)  /* the flow's originator sent a FIN */
#define FP_CT_F_FIN_REPLY (1U << 2)  /* the other end sent a FIN */
#define FP_CT_F_SNAT      (1U << 4)  /* a flow from outside sent to a backend on
				      * another node: its source was replaced by
				      * (peer_addr, peer_port), so the reply comes
				      * back through this node */
#define FP_CT_F_ORIG_HIGH (1U << 3)  /* policy entries: the originator is the
				      * key's (daddr, dport) end */
#define FP_CT_F_FIN2_REPLY (1U << 5) /* the FIN that closed the flow (the
				      * second) came from the other end: the
				      * close completes with the originator's
				      * ACK of it (lib/ct.h fp_ct_close_done) */

/* Flow states. TCP follows the handshake and the FINs; other protocols
 * are FP_CT_NEW until a reply is seen, then FP_CT_ESTABLISHED. */
#define FP_CT_STATES(X)                          \
	X(FP_CT_NEW,         0, "new")           \
	X(FP_CT_SYN_RECV,    1, "syn-recv")      \
	X(FP_CT_ESTABLISHED, 2, "established")   \
	X(FP_CT_FIN_WAIT,    3, "fin-wait")      \
	X(FP_CT_CLOSED,      4, "closed")

enum fp_ct_state { FP_CT_STATES(FP_ENUM_ENTRY) };

struct fp_ct4_key {
	__be32 saddr;          /* NBO */
	__be32 daddr;          /* NBO */
	__be16 sport;          /* NBO; ICMP echo: the identifier at the requester's end */
	__be16 dport;          /* NBO */
	__u8 proto;
	__u8 dir;              /* FP_CT_FORWARD / FP_CT_REPLY / FP_CT_POLICY */
	__u16 pad;
};
_Static_assert(sizeof(struct fp_ct4_key) == 16, "fp_ct4_key layout");

/* With FP_CT_F_SNAT, peer_addr/peer_port are the SNAT in force: on the
 * forward entry the source the flow leaves with (the node's address and a
 * port of FP_SNAT_PORT_MIN..MAX), on the reply entry the client the reply
 * goes back to. */
struct fp_ct4 {
	__u64 last_seen;       /* HBO: fp_now() (lib/lb.h) of the last refresh (coarse, ~1 s) */
	__be32 nat_addr;       /* NBO: forward: backend IP; reply: VIP */
	__be16 nat_port;       /* NBO */
	__u8 flags;            /* FP_CT_F_* */
	__u8 state;            /* enum fp_ct_state */
	__u32 backend_id;      /* HBO */
	__u32 svc_id;          /* HBO */
	__be32 peer_addr;      /* NBO: with FP_CT_F_SNAT (see above) */
	__be16 peer_port;      /* NBO */
	__u16 pad;
};
_Static_assert(sizeof(struct fp_ct4) == 32, "fp_ct4 layout");

/* Source ports SNAT may give a flow (their own range, above Linux's default
 * ephemeral ports, 32768-60999, so no socket of the node shares a tuple with
 * a translated flow), and how many it tries before giving up on a flow. */
#define FP_SNAT_PORT_MIN 61000
#define FP_SNAT_PORT_MAX 65535
#define FP_SNAT_TRIES    8

struct fp_ctpol4 {
	__u64 last_seen;       /* HBO: as in fp_ct4 */
	__u8 flags;            /* FP_CT_F_* */
	__u8 state;            /* enum fp_ct_state */
	__u16 pad;
	__u32 pad2;
};
_Static_assert(sizeof(struct fp_ctpol4) == 16, "fp_ctpol4 layout");

/* Fragments: the first fragment of a datagram (offset 0, MF set) is judged
 * and translated like any packet, and what it got is kept under its
 * arrival (source, destination, protocol, IP id): the later fragments,
 * which carry no ports, get the same addresses and the same verdict. A
 * later fragment with no record (its first one not seen, or more than
 * FP_FRAG_LIFETIME_NS ago) is dropped (FP_DROP_FRAG_NO_FIRST) wherever its
 * ports would matter. */
#define FP_FRAG_MAX 8192
#define FP_FRAG_LIFETIME_NS (30ULL * 1000000000ULL)  /* Linux's ipfrag_time */

struct fp_frag4_key {
	__be32 saddr;          /* NBO: as the fragments arrive */
	__be32 daddr;          /* NBO */
	__be16 id;             /* NBO: IP identification */
	__u8 proto;
	__u8 pad;
};
_Static_assert(sizeof(struct fp_frag4_key) == 12, "fp_frag4_key layout");

struct fp_frag4 {
	__u64 first_seen;      /* HBO: ns */
	__be32 saddr;          /* NBO: the source the fragments leave with */
	__be32 daddr;          /* NBO: the destination they leave with */
	__be16 sport;          /* NBO: the first fragment's ports, as it arrived */
	__be16 dport;          /* NBO */
	__u16 reason;          /* HBO: enum fp_reason of the first fragment (a drop drops them all) */
	__u16 pad;
};
_Static_assert(sizeof(struct fp_frag4) == 24, "fp_frag4 layout");

/* Conntrack events, per-CPU counters (an array of __u64 indexed by these);
 * the agent exports them as fastpath_conntrack_events_total{event}. */
#define FP_CT_EVENTS(X)                                      \
	X(FP_CTE_CREATED,      0, "created")                 \
	X(FP_CTE_PROMOTED,     1, "promoted")                \
	X(FP_CTE_PROMOTE_FULL, 2, "promotion-failed-full")   \
	X(FP_CTE_DEMOTED,      3, "demoted")                 \
	X(FP_CTE_RELATED,      4, "related-icmp")            \
	X(FP_CTE_FRAG_FOLLOWED, 5, "fragment-followed")

enum fp_ct_event { FP_CT_EVENTS(FP_ENUM_ENTRY) };
#define FP_CTE_COUNT 8

/* ClientIP session affinity: (service, client) -> backend, last use. */
struct fp_aff4_key {
	__u32 svc_id;          /* HBO */
	__be32 client;         /* NBO */
};

struct fp_aff4 {
	__u64 last_seen;       /* HBO: ns */
	__u32 backend_id;      /* HBO */
	__u32 pad;
};

/* Socket-LB: what a connected socket's peer really is. Keyed by socket
 * cookie and the backend the socket was sent to, so recvmsg/getpeername can
 * show the application the VIP it asked for. */
struct fp_sockrev4_key {
	__u64 cookie;          /* HBO: bpf_get_socket_cookie() */
	__be32 addr;           /* NBO: backend */
	__be16 port;           /* NBO */
	__u16 pad;
};
_Static_assert(sizeof(struct fp_sockrev4_key) == 16, "fp_sockrev4_key layout");

struct fp_sockrev4 {
	__be32 vip;            /* NBO */
	__be16 vport;          /* NBO */
	__u16 pad;
};

/* Socket-LB's reverse entries of IPv6 sockets (FP_MAP_SOCKREV6). An
 * IPv4-mapped socket (::ffff:a.b.c.d) translated through the IPv4 maps
 * keeps its entry in FP_MAP_SOCKREV, under the IPv4 backend. */
struct fp_sockrev6_key {
	__u64 cookie;          /* HBO: bpf_get_socket_cookie() */
	__u8 addr[16];         /* NBO: backend */
	__be16 port;           /* NBO */
	__u16 pad;
	__u32 pad2;
};
_Static_assert(sizeof(struct fp_sockrev6_key) == 32, "fp_sockrev6_key layout");

struct fp_sockrev6 {
	__u8 vip[16];          /* NBO */
	__be16 vport;          /* NBO */
	__u16 pad;
};
_Static_assert(sizeof(struct fp_sockrev6) == 20, "fp_sockrev6 layout");

/* Runtime settings the programs read (one entry), written by the agent. */
#define FP_CFG_F_SOCKLB          (1U << 0)  /* socket-LB on */
#define FP_CFG_F_SOCKLB_HOSTNS   (1U << 1)  /* ... for the host netns only */
#define FP_CFG_F_POLICY          (1U << 2)  /* NetworkPolicy checks on (mode default/always) */
#define FP_CFG_F_BW              (1U << 3)  /* bandwidth manager on and some pod limited (lib/bw.h) */
#define FP_CFG_F_BW_EDT          (1U << 4)  /* ... traffic to the VPC paced by EDT (fq on the ENIs);
					     * without it, by the ENIs' HTB classes */

/* fp_monitor.events: which events besides drops go to the ring buffer.
 * Drops are always reported; `fastpath monitor` sets these while it runs.
 * A map of its own, apart from fp_config: the monitor is another process,
 * and a read-modify-write of a shared entry by two processes can lose the
 * other's change (an agent's policy flag, say). */
#define FP_MON_EV_TRACE          (1U << 0)  /* every forwarding decision */
#define FP_MON_EV_POLICY         (1U << 1)  /* policy verdicts of new flows */

struct fp_monitor {
	__u32 events;            /* HBO: FP_MON_EV_* */
};

/* node_ip4 is the source of Service traffic SNATed on its way to a backend
 * on another node, and of the node's unbound sockets. Written by the agent
 * alone (agent/datapath/maps.py ConfigMap, under one lock). */
struct fp_config {
	__u64 host_netns_cookie; /* HBO: the node's netns, for host-only socket-LB */
	__u32 flags;             /* HBO: FP_CFG_F_* */
	__be32 node_ip4;         /* NBO: the node's primary address (SNAT source) */
	__u32 primary_ifindex;   /* HBO: the node's primary NIC (eth0) */
	/* v5: the node's primary IPv6 address (zero: none), the source
	 * of SNATed IPv6 Service traffic and of the node's unbound IPv6
	 * sockets (their loadBalancerSourceRanges check) */
	__u8 node_ip6[16];       /* NBO */
	__u32 pad;
};
_Static_assert(sizeof(struct fp_config) == 40, "fp_config layout");

/* Socket-LB opt-out: network namespaces (pods annotated
 * fastpath.io/socket-lb: disabled, or in such a namespace) whose sockets
 * socket-LB leaves alone even when it translates all sockets; their
 * traffic is translated per packet, so a service mesh sidecar sees the VIP.
 * Key: the netns cookie (HBO, bpf_get_netns_cookie()). */
struct fp_socklb_skip {
	__u32 flags;           /* HBO: FP_SOCKLB_SKIP_* (why it is listed) */
};

#define FP_SOCKLB_SKIP_POD        (1U << 0)  /* the Pod's annotation */
#define FP_SOCKLB_SKIP_NAMESPACE  (1U << 1)  /* its Namespace's annotation */

/* NetworkPolicy (agent/policy compiles these; README "NetworkPolicy").
 *
 * ipcache: LPM trie, IPv4 prefix (struct fp_lpm4_key) -> peer identity
 * (__u32 HBO). A miss is FP_ID_WORLD.
 * policy endpoints: pod IPv4 -> per direction, whether it is isolated
 * (enforced or audited) and the lowest deciding policy id.
 * rules: LPM trie keyed by (pod, identity, direction) exactly, then
 * protocol and destination port as the prefix; looked up with the peer's
 * identity and with FP_ID_ANY. */
#define FP_ID_ANY    0
#define FP_ID_HOST   1
#define FP_ID_WORLD  2

#define FP_POL_INGRESS 0
#define FP_POL_EGRESS  1

#define FP_POL_F_ENFORCED (1U << 0)  /* default deny: only rules admit */
#define FP_POL_F_AUDIT    (1U << 1)  /* would-be default deny: misses reported, forwarded */

struct fp_pol_dir {
	__u32 flags;           /* HBO: FP_POL_F_* */
	__u32 policy_id;       /* HBO: lowest deciding policy id */
};

struct fp_pol_ep {
	struct fp_pol_dir dir[2];  /* [FP_POL_INGRESS], [FP_POL_EGRESS] */
};
_Static_assert(sizeof(struct fp_pol_ep) == 16, "fp_pol_ep layout");

/* Bits of a rule key matched exactly before protocol and port. */
#define FP_POL_FIXED_BITS 72

struct fp_pol_key {
	__u32 prefixlen;       /* HBO: 72 (any protocol) or 80 + port prefix */
	__be32 ep_ip4;         /* NBO: the pod the rule belongs to */
	__be32 identity;       /* NBO: peer identity, FP_ID_ANY = any peer */
	__u8 dir;              /* FP_POL_INGRESS / FP_POL_EGRESS */
	__u8 proto;            /* IPPROTO_* */
	__be16 dport;          /* NBO */
};
_Static_assert(sizeof(struct fp_pol_key) == 16, "fp_pol_key layout");

#define FP_RULE_F_AUDIT (1U << 0)  /* the rule belongs to an audited direction */

struct fp_pol_rule {
	__u32 policy_id;       /* HBO: lowest id of the policies admitting the key */
	__u32 flags;           /* HBO: FP_RULE_F_* */
	__u64 flows;           /* HBO: new flows admitted by this entry */
};
_Static_assert(sizeof(struct fp_pol_rule) == 16, "fp_pol_rule layout");

/* Per-policy verdict counters (new flows), per CPU. */
#define FP_PV_ALLOW      0
#define FP_PV_DENY       1
#define FP_PV_AUDIT_DENY 2

struct fp_polcnt_key {
	__u32 policy_id;       /* HBO */
	__u8 dir;              /* FP_POL_INGRESS / FP_POL_EGRESS */
	__u8 verdict;          /* FP_PV_* */
	__u16 pad;
};
_Static_assert(sizeof(struct fp_polcnt_key) == 8, "fp_polcnt_key layout");

/* Events to `fastpath monitor`: a ring buffer of struct fp_event. */
#define FP_EVENT_TYPES(X)                     \
	X(FP_EV_DROP,   1, "drop")           \
	X(FP_EV_TRACE,  2, "trace")          \
	X(FP_EV_POLICY, 3, "policy-verdict")

enum fp_event_type { FP_EVENT_TYPES(FP_ENUM_ENTRY) };

#define FP_EVENTS_BYTES (256 * 1024)

#define FP_EV_F_NAT     (1U << 0)  /* nat_daddr/nat_dport hold the service translation */
#define FP_EV_F_INGRESS (1U << 1)  /* policy verdict of the destination's ingress (else egress) */
#define FP_EV_F_IPV6    (1U << 2)  /* an IPv6 packet: the record is a struct fp_event6 */

struct fp_event {
	__u64 ts_ns;           /* HBO: bpf_ktime_get_ns() (CLOCK_MONOTONIC) */
	__u32 ifindex;         /* HBO */
	__u16 reason;          /* HBO: enum fp_reason */
	__u8 dir;              /* enum fp_dir */
	__u8 type;             /* enum fp_event_type */
	__be32 saddr;          /* NBO: as the packet arrived */
	__be32 daddr;          /* NBO: as the packet arrived (a VIP if translated) */
	__be16 sport;          /* NBO */
	__be16 dport;          /* NBO */
	__u8 proto;
	__u8 flags;            /* FP_EV_F_* */
	__u16 pad;
	__be32 nat_daddr;      /* NBO: backend, with FP_EV_F_NAT */
	__be16 nat_dport;      /* NBO */
	__u16 pad2;
	__u32 policy_id;       /* HBO: deciding policy (0: none) */
	__u32 peer_id;         /* HBO: peer identity of a policy verdict */
};
_Static_assert(sizeof(struct fp_event) == 48, "fp_event layout");

/* An IPv6 packet's event (bpf/lib/event6.h): the IPv4 record, flagged
 * FP_EV_F_IPV6 with its IPv4 addresses 0, then the IPv6 addresses. A reader
 * decodes the common record first and, by the flag, the rest. */
struct fp_event6 {
	struct fp_event ev;
	__u8 saddr6[16];       /* NBO: as the packet arrived */
	__u8 daddr6[16];       /* NBO: as the packet arrived */
	__u8 nat_daddr6[16];   /* NBO: backend, with FP_EV_F_NAT */
};
_Static_assert(sizeof(struct fp_event6) == 96, "fp_event6 layout");

/* What a program decided for one packet. BPF_PROG_TEST_RUN does not perform
 * redirects, so programs record their decisions here: always in test builds
 * (FP_TEST), and in production for packets marked FP_WHATIF_MARK, the
 * packets `fastpath trace` runs through the live programs. A what-if packet
 * changes no state: no conntrack, affinity, counter or event is written. */
#define FP_WHATIF_MARK 0xfa570001U
/* Constants for the incremental SCTP checksum (CRC32c) update after a port
 * rewrite, written by the agent at load (agent/datapath/maps.py): powers
 * x^(8k) modulo the Castagnoli polynomial, bit-reflected. Index k (0..255):
 * x^(8k); index 256 + k: x^(8 * 256 * k). Array of __u32 values. */
#define FP_CRC32C_POWERS 512

#define FP_REDIRECT_KINDS(X)             \
	X(FP_RD_NONE,  0, "none")         \
	X(FP_RD_PLAIN, 1, "redirect")     \
	X(FP_RD_PEER,  2, "redirect-peer") \
	X(FP_RD_NEIGH, 3, "redirect-neigh") \
	X(FP_RD_INGRESS, 4, "redirect-ingress")

enum fp_redirect_kind { FP_REDIRECT_KINDS(FP_ENUM_ENTRY) };

#define FP_PV_NONE 0xff    /* fp_decision.pv[]: this direction was not checked */

struct fp_decision {
	__u32 ifindex;         /* HBO: redirect target */
	__u32 kind;            /* HBO: enum fp_redirect_kind */
	__be32 nexthop;        /* NBO: neighbour the redirect resolves, if any */
	__u32 reason;          /* HBO: last reason counted */
	__u32 svc_id;          /* HBO: service translation (0: none) */
	__u32 backend_id;      /* HBO */
	__be32 nat_daddr;      /* NBO */
	__be16 nat_dport;      /* NBO */
	__u8 pv[2];            /* FP_PV_* per FP_POL_INGRESS/EGRESS, FP_PV_NONE if unchecked */
	__u32 policy_id[2];    /* HBO: deciding policy per direction */
	__u32 peer_id[2];      /* HBO: peer identity per direction */
};
_Static_assert(sizeof(struct fp_decision) == 48, "fp_decision layout");

/* Which endpoint a registered host veth belongs to, keyed by the veth's
 * ifindex (__u32 HBO). The endpoints map is keyed by address, so it cannot
 * tell a packet whose source is unknown from one of an unknown pod; this one
 * can: the agent writes it with the endpoint, before fastpath's programs are
 * attached to the veth (agent/datapath/maps.py), and the guards of
 * bpf/lib/guard.h drop whatever a registered veth sends from another source
 * (dropped-source-spoofed) before anything else looks at the packet. */
#define FP_EPIF_F_IP6 (1U << 0)   /* ip6 holds the pod's global IPv6 address */
/* ip4 is an IPv6-only pod's endpoint key (agent/model/endpoint.py
 * ENDPOINT_KEYS), not an address: the per-pod maps know the pod by it, the
 * guard lets no IPv4 or ARP from the veth through. */
#define FP_EPIF_F_KEY (1U << 1)

struct fp_ep_if {
	__be32 ip4;            /* NBO: the endpoint's IPv4 address */
	__u32 flags;           /* HBO: FP_EPIF_F_* */
	__u8 ip6[16];          /* NBO: its IPv6 address, with FP_EPIF_F_IP6 */
};
_Static_assert(sizeof(struct fp_ep_if) == 24, "fp_ep_if layout");

/* ---- Bandwidth manager (bpf/lib/bw.h; agent/bandwidth, docs/bandwidth.md) ----
 *
 * Per-pod limits keyed by pod IPv4 (__be32, NBO). The agent writes
 * struct fp_bw (limits, never touched by the programs); the programs keep
 * struct fp_bw_state (buckets and connection counts, never written by the
 * agent after it creates the entry). Rates are enforced as virtual times
 * ("tat": the time at which the bucket would be full again): a packet of
 * cost c is admitted when max(tat, now) + c - now <= burst, or when the
 * bucket is full (tat <= now), which lets a packet larger than the burst
 * through into debt instead of stalling its flow; admitting it advances
 * tat by c. Egress to the VPC is not policed but paced: the ENI's egress
 * program stamps skb->tstamp with max(tat, now) for fq (EDT), or names the
 * pod's HTB class in skb->priority (kernels without fq). */
#define FP_BW_HORIZON_NS      2000000000  /* 2 s. EDT: later departures are dropped (fq on
					   * the ENIs uses the same horizon) */
#define FP_BW_HTB_MAJOR       0xfa57  /* handle of fastpath's root qdisc on the ENIs */

#define FP_BW_F_CONNS         (1U << 0)  /* a connection limit is set: track the pod's TCP flows */

struct fp_bw {
	__u64 egress_rate;          /* HBO: bytes/s; 0 = unlimited */
	__u64 egress_burst_ns;      /* HBO: bucket depth as time at egress_rate */
	__u64 ingress_rate;         /* HBO: bytes/s; 0 = unlimited */
	__u64 ingress_burst_ns;     /* HBO */
	__u64 egress_pkt_ns;        /* HBO: cost of one packet (1e9 / pps); 0 = unlimited */
	__u64 egress_pkt_burst_ns;  /* HBO */
	__u64 ingress_pkt_ns;       /* HBO */
	__u64 ingress_pkt_burst_ns; /* HBO */
	__u64 egress_conns_reaped;  /* HBO: flows the agent removed idle (it alone writes this) */
	__u64 ingress_conns_reaped; /* HBO */
	__u32 egress_max_conns;     /* HBO: 0 = unlimited */
	__u32 ingress_max_conns;    /* HBO */
	__u32 htb_class;            /* HBO: skb->priority (FP_BW_HTB_MAJOR:minor) of the pod's HTB class */
	__u32 conn_gen;             /* HBO: generation of the pod's connection counts */
	__u32 flags;                /* HBO: FP_BW_F_* */
	__u32 pad;
};
_Static_assert(sizeof(struct fp_bw) == 104, "fp_bw layout");

struct fp_bw_state {
	__u64 egress_tat;           /* HBO: ns, CLOCK_MONOTONIC (bytes: EDT and same-node bucket) */
	__u64 ingress_tat;          /* HBO */
	__u64 egress_pkt_tat;       /* HBO */
	__u64 ingress_pkt_tat;      /* HBO */
	__u64 egress_conns_opened;  /* HBO: atomically counted by the programs */
	__u64 egress_conns_closed;  /* HBO */
	__u64 ingress_conns_opened; /* HBO */
	__u64 ingress_conns_closed; /* HBO */
	__u32 conn_gen;             /* HBO: fp_bw.conn_gen the counts belong to */
	__u32 pad;
};
_Static_assert(sizeof(struct fp_bw_state) == 72, "fp_bw_state layout");

/* A TCP connection counted against a pod's connection limit, keyed by the
 * tuple its SYN carried (initiator first). */
struct fp_bw_flow_key {
	__be32 saddr;               /* NBO: initiator */
	__be32 daddr;               /* NBO: responder */
	__be16 sport;               /* NBO */
	__be16 dport;               /* NBO */
};
_Static_assert(sizeof(struct fp_bw_flow_key) == 12, "fp_bw_flow_key layout");

/* Each field has one writer at a time and is written with a plain store
 * (no read-modify-write): a pod address set means "counted against it". */
struct fp_bw_flow {
	__u64 last_seen;            /* HBO: ns, refreshed at most once a second */
	__be32 egress_pod;          /* NBO: the initiator, when counted against its limit; else 0 */
	__be32 ingress_pod;         /* NBO: the responder, when counted against its limit; else 0 */
	__u32 egress_gen;           /* HBO: conn_gen of egress_pod when counted */
	__u32 ingress_gen;          /* HBO */
	__u8 established;           /* the responder answered (SYN-ACK seen) */
	__u8 fin_ini;               /* FIN seen from the initiator */
	__u8 fin_rsp;               /* FIN seen from the responder */
	__u8 pad[5];
};
_Static_assert(sizeof(struct fp_bw_flow) == 32, "fp_bw_flow layout");

/* Per-CPU counters per limited pod: what passed (reason FP_FWD_PASS) and
 * each drop reason, by direction (FP_DIR_FROM_POD: egress, FP_DIR_TO_POD:
 * ingress). */
struct fp_bwcnt_key {
	__be32 ip4;                 /* NBO: the pod */
	__u16 reason;               /* HBO: enum fp_reason */
	__u8 dir;                   /* enum fp_dir */
	__u8 pad;
};
_Static_assert(sizeof(struct fp_bwcnt_key) == 8, "fp_bwcnt_key layout");

/* An IPv6 TCP connection counted against a pod's connection limit
 * (FP_MAP_BW_FLOWS6, the twin of FP_MAP_BW_FLOWS): keyed by the tuple its
 * SYN carried, with the same value (its pods are their 32-bit keys). */
struct fp_bw_flow6_key {
	__u8 saddr[16];             /* NBO: initiator */
	__u8 daddr[16];             /* NBO: responder */
	__be16 sport;               /* NBO */
	__be16 dport;               /* NBO */
};
_Static_assert(sizeof(struct fp_bw_flow6_key) == 36, "fp_bw_flow6_key layout");

/* Slots of FP_MAP_TAILS. A walk that continues in another program returns
 * FP_TAIL_ROUTE to its entry point, which tail-calls the slot. The second
 * program's layout of the hand-over (pod.c: struct fp_pod_route, carried in
 * FP_MAP_POD_ROUTE) is part of the slot's contract: change it, and both
 * maps' versions change too. */
#define FP_TAIL_FROM_POD_ROUTE 0
/* IPv6 has programs of its own (bpf/pod.c fp_from_pod6, bpf/eni.c
 * fp_from_vpc6): the IPv4 programs hand an IPv6 packet over by tail call
 * (fp_from_pod first thing, fp_from_pod6 guarding it; fp_from_vpc and
 * fp_to_pod after their guards, by returning FP_TAIL_IPV6). Nothing is
 * handed over: the IPv6 program parses the packet itself. */
#define FP_TAIL_FROM_POD6      1
#define FP_TAIL_FROM_VPC6      2
/* fp_from_pod6's second half (bpf/pod.c fp_pod6_route): policy, the VIP
 * restored, limits and forwarding, after Service translation (one program
 * for both exceeds the verifier's budget). It parses the packet again; the
 * hand-over is one word, skb->cb[FP_CB_RESTORE6]: which restoration the
 * first half found due (FP_RESTORE6_*). */
#define FP_TAIL_FROM_POD6_ROUTE 4
#define FP_CB_RESTORE6         0
#define FP_RESTORE6_LOCAL      1   /* a translated flow's reply for a local pod */
#define FP_RESTORE6_HAIRPIN    2   /* the reply of a hairpinned flow */
/* a local backend's reply to a client outside the node (a NodePort,
 * external or load-balancer IP): its frontend back, then routed by the
 * node (it may leave by the primary NIC, which owns that address) */
#define FP_RESTORE6_OUTSIDE    3
/* fp_from_vpc6's IPv6 for the node itself (bpf/eni.c fp_vpc6_node:
 * Services from outside, SNAT replies), a program of its own for the
 * verifier's budget. It parses the packet again; nothing is handed over. */
#define FP_TAIL_FROM_VPC6_NODE 5
/* SCTP from outside to the node (bpf/eni.c fp_vpc6_sctp: IPv6 Services
 * from outside and SNAT replies, for SCTP): its CRC updates walked beside
 * TCP's and UDP's took the verifier past its budget. fp_from_vpc6 chooses
 * it for an SCTP packet (not a later fragment) by returning FP_TAIL_SCTP6;
 * it parses the packet again, nothing is handed over. */
#define FP_TAIL_FROM_VPC6_SCTP 6
#define FP_TAIL_SCTP6          0x7ffd   /* not a tc verdict */
#define FP_TAIL_MAX            7
#define FP_TAIL_ROUTE          0x7fff   /* not a tc verdict */
#define FP_TAIL_IPV6           0x7ffe   /* not a tc verdict */

#define FP_POD_ROUTE_BYTES     96

/* A value of FP_MAP_POD_ROUTE: opaque here, pod.c's struct fp_pod_route. */
struct fp_pod_route_slot {
	__u8 bytes[FP_POD_ROUTE_BYTES];
};
_Static_assert(sizeof(struct fp_pod_route_slot) == FP_POD_ROUTE_BYTES, "fp_pod_route_slot layout");

/* ---- IPv6 NetworkPolicy (docs/networkpolicy.md "IPv6") ----
 *
 * Maps of their own beside the IPv4 ones (docs/ipv6.md's design rule):
 *   FP_MAP_IPCACHE6   LPM trie, IPv6 prefix (struct fp_lpm6_key) -> peer
 *                     identity (__u32 HBO), in the same identity space as
 *                     FP_MAP_IPCACHE; a miss is FP_ID_WORLD.
 *   FP_MAP_CT_POLICY6 LRU: IPv6 flows NetworkPolicy admitted, one entry per
 *                     flow, lower (address, port) end first, value
 *                     struct fp_ctpol4 (state and lifetimes as IPv4's).
 *   FP_MAP_POLFRAG6   LRU: the policy verdict of an IPv6 datagram's first
 *                     fragment, for the fragments after it (translated
 *                     datagrams' addresses are FP_MAP_FRAG6's, below).
 * The isolation and rules of a pod stay in FP_MAP_POLICY_EP / FP_MAP_POLICY,
 * keyed by the pod's 32-bit key (its IPv4 address today), which the IPv6
 * programs find from the packet's pod (lib/policy6.h: fp_policy6_pod). */
#define FP_MAP_IPCACHE6    fp_ipcache6_v1
#define FP_MAP_CT_POLICY6  fp_ctpol6_v1
#define FP_MAP_POLFRAG6    fp_polfrag6_v1

struct fp_ctpol6_key {
	__u8 saddr[16];        /* NBO: the lower (address, port) end */
	__u8 daddr[16];        /* NBO */
	__be16 sport;          /* NBO; ICMPv6 echo: the identifier at the requester's end */
	__be16 dport;          /* NBO */
	__u8 proto;
	__u8 pad[3];
};
_Static_assert(sizeof(struct fp_ctpol6_key) == 40, "fp_ctpol6_key layout");

struct fp_frag6_key {
	__u8 saddr[16];        /* NBO */
	__u8 daddr[16];        /* NBO */
	__be32 id;             /* NBO: the fragment header's identification */
	__u8 proto;
	__u8 pad[3];
};
_Static_assert(sizeof(struct fp_frag6_key) == 40, "fp_frag6_key layout");

/* Keyed by struct fp_frag6_key: the first fragment's policy verdict. */
struct fp_polfrag6 {
	__u64 first_seen;      /* HBO: ns */
	__be16 sport;          /* NBO: the first fragment's ports */
	__be16 dport;          /* NBO */
	__u16 reason;          /* HBO: enum fp_reason of the first fragment */
	__u16 pad;
};
_Static_assert(sizeof(struct fp_polfrag6) == 16, "fp_polfrag6 layout");

/* IPv6 the stack delivers to a pod: fp_to_pod hands it to fp_to_pod6
 * (bpf/pod.c), which judges the pod's ingress policy. */
#define FP_TAIL_TO_POD6        3

/* ---- IPv6 conntrack (bpf/lib/ct6.h; docs/conntrack.md) ----
 *
 * Translated IPv6 flows (pods' IPv6 packets to an IPv6 ClusterIP) in twin
 * maps of FP_MAP_CT / FP_MAP_CT_NEW, with the same two tiers, the same
 * forward and reply entries, the same states and lifetimes (fp_ct_step,
 * fp_ct_lifetime, fp_ct_expired serve both families) and the same sizes
 * (conntrack_map_size, conntrack_new_map_size: each family has its own
 * maps of that size). Hairpinned IPv6 flows are sourced from
 * FP_HAIRPIN_IP6 (a build option: hairpin_source_ipv6). */
#define FP_MAP_CT6        fp_ct6_v1
#define FP_MAP_CT_NEW6    fp_ctnew6_v1

struct fp_ct6_key {
	__u8 saddr[16];        /* NBO */
	__u8 daddr[16];        /* NBO */
	__be16 sport;          /* NBO; ICMPv6 echo: the identifier at the requester's end */
	__be16 dport;          /* NBO */
	__u8 proto;
	__u8 dir;              /* FP_CT_FORWARD / FP_CT_REPLY */
	__u16 pad;
};
_Static_assert(sizeof(struct fp_ct6_key) == 40, "fp_ct6_key layout");

/* fp_ct4's fields with 16-byte addresses; peer_* is kept for SNAT as in
 * fp_ct4 (no IPv6 flow is SNATed yet: it is always zero). */
struct fp_ct6 {
	__u64 last_seen;       /* HBO: as in fp_ct4 */
	__u8 nat_addr[16];     /* NBO: forward: backend IP; reply: VIP */
	__be16 nat_port;       /* NBO */
	__u8 flags;            /* FP_CT_F_* */
	__u8 state;            /* enum fp_ct_state */
	__u32 backend_id;      /* HBO */
	__u32 svc_id;          /* HBO */
	__u8 peer_addr[16];    /* NBO */
	__be16 peer_port;      /* NBO */
	__u16 pad;
};
_Static_assert(sizeof(struct fp_ct6) == 56, "fp_ct6 layout");

/* Fragments of translated IPv6 flows: the first fragment (it carries the
 * ports) is translated like any packet, and the addresses it left with are
 * kept under its arrival (source, destination, fragment header's
 * identification, protocol), for the fragments after it. Only translated
 * (or restored) datagrams leave a record; a later fragment without one
 * goes on as it came. Lifetime and size as IPv4's (FP_FRAG_LIFETIME_NS,
 * FP_FRAG_MAX). */
#define FP_MAP_FRAG6      fp_frag6_v1

/* keyed by struct fp_frag6_key (above) */

struct fp_frag6 {
	__u64 first_seen;      /* HBO: ns */
	__u8 saddr[16];        /* NBO: the source the fragments leave with */
	__u8 daddr[16];        /* NBO: the destination they leave with */
};
_Static_assert(sizeof(struct fp_frag6) == 40, "fp_frag6 layout");

/* IPv6 address marks (FP_MAP_MARK6, docs/ipv6.md "IPv6 per-packet cost:
 * lookups only where they can hit"): one byte per slot of two regions,
 * slot = fp_mark6_slot(address) (bpf/maps.c; agent/datapath/maps.py
 * computes the same). Set to 1, never cleared:
 *   FP_MARK6_REPLY_SRC + slot: before an IPv6 conntrack reply entry whose
 *     source (the backend) hashes there is written (the datapath, in
 *     fp_ct6_tier_put);
 *   FP_MARK6_FRONTEND + slot: before an IPv6 frontend whose address hashes
 *     there is written (the agent, agent/datapath/maps.py LbMaps).
 * The agent marks what it did not see written (entries of older programs,
 * entries a migration carries over) before it arms the map: while
 * FP_MARK6_ARMED is 0 (a map just made, or disarmed by an agent about to
 * carry entries over) nothing is skipped. Under an armed map, a packet
 * whose source's reply slot is 0 is the reply of no translated flow, and
 * one whose destination's frontend slot is 0 is to no frontend. Another
 * FP_MARK6_BITS is another layout: bump the version. */
#define FP_MAP_MARK6       fp_mark6_v1
#define FP_MARK6_BITS      12
#define FP_MARK6_MULT      2654435761U   /* Knuth's multiplicative hash */
/* plain numbers: the agent reads them from this file */
#define FP_MARK6_REPLY_SRC 0
#define FP_MARK6_FRONTEND  4096          /* the slots of one region */
#define FP_MARK6_ARMED     8192
_Static_assert(FP_MARK6_FRONTEND == 1U << FP_MARK6_BITS &&
	       FP_MARK6_ARMED == 2 * FP_MARK6_FRONTEND, "FP_MARK6 regions");

#endif /* FASTPATH_H */
