/* fastpath's maps and their typed accessors (bcc dialect).
 *
 * bcc rewrites map method calls (m.lookup(&k)) only in the main source text,
 * never inside #included headers. The loader (agent/datapath/loader.py)
 * therefore puts this file first in the text it compiles, followed by the
 * attach-point files (pod.c, eni.c, ...); helpers in lib/ only call the
 * accessor functions below and never touch a map symbol.
 *
 * Map names are written as their FP_MAP_* macros; the loader substitutes
 * the real names (bcc cannot call methods through a macro).
 *
 * Every map is pinned under FP_PIN_ROOT (a build option from the agent
 * configuration), so a restarted agent reuses maps and keeps state.
 * Sizes (FP_*_MAX) are build options too; see agent/config.py for defaults.
 */
#define FP__STR(x) #x
#define FP_STR(x) FP__STR(x)
#define FP_PIN(name) FP_PIN_ROOT "/" FP_STR(name)

/* Local pod endpoints: the destination table of every redirect. */
BPF_TABLE_PINNED("hash", struct fp_endpoint_key, struct fp_endpoint,
		 FP_MAP_ENDPOINTS, FP_EP_MAX, FP_PIN(FP_MAP_ENDPOINTS));

/* Verdict counters, per CPU so the hot path needs no atomics. */
BPF_TABLE_PINNED("percpu_hash", struct fp_counter_key, struct fp_counter,
		 FP_MAP_COUNTERS, FP_COUNTERS_MAX, FP_PIN(FP_MAP_COUNTERS));

/* Host-stack bypass prefixes (node-local DNS etc). */
BPF_TABLE_PINNED("lpm_trie", struct fp_lpm4_key, __u8,
		 FP_MAP_BYPASS, FP_BYPASS_MAX, FP_PIN(FP_MAP_BYPASS), BPF_F_NO_PREALLOC);

/* Service frontends, their backend slots, and backends. */
BPF_TABLE_PINNED("hash", struct fp_svc4_key, struct fp_svc4,
		 FP_MAP_SERVICES, FP_SVC_MAX, FP_PIN(FP_MAP_SERVICES));
BPF_TABLE_PINNED("hash", struct fp_slot_key, struct fp_slot,
		 FP_MAP_SLOTS, FP_SLOT_MAX, FP_PIN(FP_MAP_SLOTS));
BPF_TABLE_PINNED("hash", __u32, struct fp_backend4,
		 FP_MAP_BACKENDS, FP_BE_MAX, FP_PIN(FP_MAP_BACKENDS));

/* Maglev tables, by service id; allocated as frontends ask for one. */
BPF_TABLE_PINNED("hash", __u32, struct fp_maglev,
		 FP_MAP_MAGLEV, FP_SVC_MAX, FP_PIN(FP_MAP_MAGLEV), BPF_F_NO_PREALLOC);

/* loadBalancerSourceRanges, by service id and source prefix. */
BPF_TABLE_PINNED("lpm_trie", struct fp_srcrange4_key, __u8,
		 FP_MAP_SRC_RANGE, FP_SRC_RANGE_MAX, FP_PIN(FP_MAP_SRC_RANGE), BPF_F_NO_PREALLOC);

/* Service CIDRs and ClusterIPs (FP_SVCNET_F_*), for kube-proxy's reject/drop:
 * one /32 per Service with a ClusterIP, translated or not (a Service has at
 * least one frontend, other proxies' Services none), and the CIDRs; twice
 * the frontends is room for both, and costs nothing until used. */
BPF_TABLE_PINNED("lpm_trie", struct fp_lpm4_key, __u32,
		 FP_MAP_SVCNET, 2 * FP_SVC_MAX, FP_PIN(FP_MAP_SVCNET), BPF_F_NO_PREALLOC);

/* Conntrack (see fastpath.h): established translated flows in a hash that
 * nothing evicts, allocated as flows arrive; new and closing ones in an
 * LRU; flows NetworkPolicy admitted in an LRU of their own; fragments. */
BPF_TABLE_PINNED("hash", struct fp_ct4_key, struct fp_ct4,
		 FP_MAP_CT, FP_CT_MAX, FP_PIN(FP_MAP_CT));
BPF_TABLE_PINNED("lru_hash", struct fp_ct4_key, struct fp_ct4,
		 FP_MAP_CT_NEW, FP_CT_NEW_MAX, FP_PIN(FP_MAP_CT_NEW));
BPF_TABLE_PINNED("lru_hash", struct fp_ct4_key, struct fp_ctpol4,
		 FP_MAP_CT_POLICY, FP_CT_POLICY_MAX, FP_PIN(FP_MAP_CT_POLICY));
BPF_TABLE_PINNED("lru_hash", struct fp_frag4_key, struct fp_frag4,
		 FP_MAP_FRAG, FP_FRAG_MAX, FP_PIN(FP_MAP_FRAG));
BPF_TABLE_PINNED("percpu_array", __u32, __u64,
		 FP_MAP_CT_STATS, FP_CTE_COUNT, FP_PIN(FP_MAP_CT_STATS));

/* ClientIP affinity. */
BPF_TABLE_PINNED("lru_hash", struct fp_aff4_key, struct fp_aff4,
		 FP_MAP_AFFINITY, FP_AFF_MAX, FP_PIN(FP_MAP_AFFINITY));

/* Socket-LB reverse translation for recvmsg/getpeername. */
BPF_TABLE_PINNED("lru_hash", struct fp_sockrev4_key, struct fp_sockrev4,
		 FP_MAP_SOCKREV, FP_SOCKREV_MAX, FP_PIN(FP_MAP_SOCKREV));

/* Runtime settings (one entry). */
BPF_TABLE_PINNED("array", __u32, struct fp_config, FP_MAP_CONFIG, 1, FP_PIN(FP_MAP_CONFIG));

/* Which events `fastpath monitor` wants (one entry, written by monitors only). */
BPF_TABLE_PINNED("array", __u32, struct fp_monitor, FP_MAP_MONITOR, 1, FP_PIN(FP_MAP_MONITOR));

/* Network namespaces whose sockets socket-LB leaves alone (opt-out);
 * one entry per pod at most, so sized like the endpoints map. */
BPF_TABLE_PINNED("hash", __u64, struct fp_socklb_skip, FP_MAP_SOCKLB_SKIP, FP_EP_MAX,
		 FP_PIN(FP_MAP_SOCKLB_SKIP));

/* Decisions of test and what-if packets (see struct fp_decision). */
BPF_TABLE_PINNED("array", __u32, struct fp_decision, FP_MAP_DECISION, 1, FP_PIN(FP_MAP_DECISION));

/* NetworkPolicy: peer identities, per-pod isolation, rules, verdict counters. */
BPF_TABLE_PINNED("lpm_trie", struct fp_lpm4_key, __u32,
		 FP_MAP_IPCACHE, FP_IPCACHE_MAX, FP_PIN(FP_MAP_IPCACHE), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __be32, struct fp_pol_ep,
		 FP_MAP_POLICY_EP, FP_EP_MAX, FP_PIN(FP_MAP_POLICY_EP));
BPF_TABLE_PINNED("lpm_trie", struct fp_pol_key, struct fp_pol_rule,
		 FP_MAP_POLICY, FP_POLICY_MAX, FP_PIN(FP_MAP_POLICY), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("percpu_hash", struct fp_polcnt_key, struct fp_counter,
		 FP_MAP_POLICY_CNT, FP_POLCNT_MAX, FP_PIN(FP_MAP_POLICY_CNT));

/* Events for `fastpath monitor`. bcc 0.26 has no pinned form of
 * BPF_RINGBUF_OUTPUT, so its table type is spelled out here with the pin
 * path in the section name, as BPF_TABLE_PINNED does for other maps.
 * ringbuf_reserve returns the record type: that puts struct fp_event in
 * the programs' BTF (a type only locals use is left out of it), where the
 * CLI reads the record's layout; a ring buffer map carries no BTF. */
struct FP_MAP_EVENTS_table_t {
	int key;
	__u32 leaf;
	int (*ringbuf_output)(void *, __u64, __u64);
	struct fp_event *(*ringbuf_reserve)(__u64);
	/* never called (bcc knows no such method): it puts struct fp_event6,
	 * the IPv6 record, in the BTF beside struct fp_event */
	struct fp_event6 *(*ringbuf_reserve6)(__u64);
	void (*ringbuf_discard)(void *, __u64);
	void (*ringbuf_submit)(void *, __u64);
	__u32 max_entries;
};
__attribute__((section("maps/ringbuf:" FP_PIN(FP_MAP_EVENTS))))
struct FP_MAP_EVENTS_table_t FP_MAP_EVENTS = { .max_entries = FP_EVENTS_BYTES };

/* Whether the packet being processed on this CPU is a what-if packet: the
 * tc programs set it on entry and restore it on exit (see fp_whatif_enter),
 * and every state-changing accessor below checks it. */
BPF_PERCPU_ARRAY(fp_whatif_cpu, __u32, 1);

/* A new flow's entries and keys, built in a per-CPU scratch map rather
 * than on the stack: the programs that translate Services also hold
 * policy, conntrack's reverse translation and the bandwidth checks in
 * their 512-byte frame. tc programs do not nest on a CPU. */
struct fp_ct_work {
	struct fp_ct4_key fwd;
	struct fp_ct4_key rev;
	struct fp_ct4_key old_rev;
	struct fp_ct4 entry;
	struct fp_ct4 reply;
};

BPF_PERCPU_ARRAY(fp_ct_work_cpu, struct fp_ct_work, 1);

static __always_inline struct fp_ct_work *fp_ct_work_scratch(void)
{
	__u32 zero = 0;

	return fp_ct_work_cpu.lookup(&zero);
}

/* Programs reached by tail call (fastpath.h: FP_TAIL_*). */
BPF_TABLE_PINNED("prog", __u32, __u32, FP_MAP_TAILS, FP_TAIL_MAX, FP_PIN(FP_MAP_TAILS));
BPF_TABLE_PINNED("percpu_array", __u32, struct fp_pod_route_slot, FP_MAP_POD_ROUTE, 1,
		 FP_PIN(FP_MAP_POD_ROUTE));

/* Returns only when the slot is empty. */
static __always_inline void fp_tail_jump(struct __sk_buff *skb, __u32 slot)
{
	FP_MAP_TAILS.call(skb, slot);
}

/* Powers of x for the SCTP CRC32c update (constants, see fastpath.h). */
BPF_TABLE_PINNED("array", __u32, __u32, FP_MAP_CRC32C, FP_CRC32C_POWERS, FP_PIN(FP_MAP_CRC32C));

/* Registered host veths: ifindex -> the endpoint's addresses (anti-spoofing);
 * one entry per endpoint, so sized like the endpoints map. */
BPF_TABLE_PINNED("hash", __u32, struct fp_ep_if, FP_MAP_EP_IFINDEX, FP_EP_MAX,
		 FP_PIN(FP_MAP_EP_IFINDEX));

static __always_inline struct fp_endpoint *fp_endpoint_lookup(__be32 ip4)
{
	struct fp_endpoint_key key = { .ip4 = ip4 };
	struct fp_endpoint *ep = FP_MAP_ENDPOINTS.lookup(&key);

	/* A half-written entry must never be used: the agent sets
	 * FP_EP_F_REGISTERED only in a complete value. */
	if (ep && (ep->flags & FP_EP_F_REGISTERED))
		return ep;
	return NULL;
}

static __always_inline int fp_bypass_match(__be32 ip4)
{
	struct fp_lpm4_key key = { .prefixlen = 32, .addr = ip4 };

	return FP_MAP_BYPASS.lookup(&key) != NULL;
}

static __always_inline int fp_whatif(void)
{
	__u32 zero = 0;
	__u32 *on = fp_whatif_cpu.lookup(&zero);

	return on && *on;
}

/* Returns the previous state, to give back to fp_whatif_exit. */
static __always_inline __u32 fp_whatif_enter(struct __sk_buff *skb)
{
	__u32 zero = 0, prev = 0;
	__u32 *on = fp_whatif_cpu.lookup(&zero);

	if (on) {
		prev = *on;
		*on = skb->mark == FP_WHATIF_MARK;
	}
	return prev;
}

static __always_inline void fp_whatif_exit(__u32 prev)
{
	__u32 zero = 0;
	__u32 *on = fp_whatif_cpu.lookup(&zero);

	if (on)
		*on = prev;
}

static __always_inline struct fp_decision *fp_decision_rec(void)
{
	__u32 zero = 0;

#ifndef FP_TEST
	if (!fp_whatif())
		return NULL;
#endif
	return FP_MAP_DECISION.lookup(&zero);
}

static __always_inline void fp_count_family(__u32 ifindex, enum fp_dir dir,
					    enum fp_reason reason, __u32 bytes, __u8 family)
{
	struct fp_counter_key key = { .ifindex = ifindex, .reason = reason, .dir = dir,
				      .family = family };
	struct fp_counter *c;

	if (fp_whatif())
		return;
	c = FP_MAP_COUNTERS.lookup(&key);
	if (!c) {
		struct fp_counter zero = {};

		FP_MAP_COUNTERS.insert(&key, &zero);
		c = FP_MAP_COUNTERS.lookup(&key);
		if (!c)
			return;
	}
	c->packets += 1;
	c->bytes += bytes;
}

/* An IPv4 program's count (IPv4, ARP); IPv6 counts with FP_FAM_IPV6. */
static __always_inline void fp_count(__u32 ifindex, enum fp_dir dir,
				     enum fp_reason reason, __u32 bytes)
{
	fp_count_family(ifindex, dir, reason, bytes, FP_FAM_IPV4);
}

static __always_inline struct fp_svc4 *fp_service_lookup(__be32 vip, __be16 port, __u8 proto)
{
	struct fp_svc4_key key = { .vip = vip, .port = port, .proto = proto };

	return FP_MAP_SERVICES.lookup(&key);
}

static __always_inline struct fp_backend4 *fp_backend_lookup(__u32 backend_id)
{
	return FP_MAP_BACKENDS.lookup(&backend_id);
}

static __always_inline struct fp_backend4 *fp_slot_backend(__u32 svc_id, __u32 slot, __u32 *backend_id)
{
	struct fp_slot_key key = { .svc_id = svc_id, .slot = slot };
	struct fp_slot *s = FP_MAP_SLOTS.lookup(&key);

	if (!s)
		return NULL;
	*backend_id = s->backend_id;
	return FP_MAP_BACKENDS.lookup(&s->backend_id);
}

/* ---- IPv6 address marks (fastpath.h FP_MAP_MARK6) ---- */

BPF_TABLE_PINNED("array", __u32, __u8, FP_MAP_MARK6, FP_MARK6_ARMED + 1, FP_PIN(FP_MAP_MARK6));

static __always_inline __u32 fp_mark6_slot(const void *addr)
{
	const __u32 *a = addr;

	return ((a[0] ^ a[1] ^ a[2] ^ a[3]) * FP_MARK6_MULT) >> (32 - FP_MARK6_BITS);
}

/* `region` + slot: FP_MARK6_REPLY_SRC or FP_MARK6_FRONTEND */
static __always_inline void fp_mark6_set(__u32 idx)
{
	__u8 *b = FP_MAP_MARK6.lookup(&idx);

	if (b && !*b)
		*b = 1;
}

static __always_inline int fp_mark6_armed(void)
{
	__u32 armed = FP_MARK6_ARMED;
	__u8 *on = FP_MAP_MARK6.lookup(&armed);

	return on && *on;
}

/* 0 only when the slot is unmarked: under an armed map, nothing hashing
 * there can be found (the lookup it stands for would miss) */
static __always_inline int fp_mark6_is(__u32 idx)
{
	__u8 *b = FP_MAP_MARK6.lookup(&idx);

	return !b || *b;
}

/* ---- conntrack (callers: lib/ct.h only) ---- */

#define FP_CT_TIER_EST 1       /* FP_MAP_CT */
#define FP_CT_TIER_NEW 2       /* FP_MAP_CT_NEW */

static __always_inline struct fp_ct4 *fp_ct_est_get(struct fp_ct4_key *key)
{
	return FP_MAP_CT.lookup(key);
}

static __always_inline struct fp_ct4 *fp_ct_new_get(struct fp_ct4_key *key)
{
	return FP_MAP_CT_NEW.lookup(key);
}

static __always_inline struct fp_ct4 *fp_ct_tier_get(int tier, struct fp_ct4_key *key)
{
	return tier == FP_CT_TIER_EST ? fp_ct_est_get(key) : fp_ct_new_get(key);
}

/* Write an entry into a tier: 0, or the map's error (-E2BIG: the
 * established hash is full). A what-if packet writes nothing. */
static __always_inline int fp_ct_tier_put(int tier, struct fp_ct4_key *key, struct fp_ct4 *val)
{
	if (fp_whatif())
		return 0;
	if (tier == FP_CT_TIER_EST)
		return FP_MAP_CT.update(key, val);
	return FP_MAP_CT_NEW.update(key, val);
}

static __always_inline void fp_ct_tier_del(int tier, struct fp_ct4_key *key)
{
	if (fp_whatif())
		return;
	if (tier == FP_CT_TIER_EST)
		FP_MAP_CT.delete(key);
	else
		FP_MAP_CT_NEW.delete(key);
}

static __always_inline struct fp_ctpol4 *fp_ctpol_get(struct fp_ct4_key *key)
{
	return FP_MAP_CT_POLICY.lookup(key);
}

static __always_inline void fp_ctpol_put(struct fp_ct4_key *key, struct fp_ctpol4 *val)
{
	if (!fp_whatif())
		FP_MAP_CT_POLICY.update(key, val);
}

static __always_inline struct fp_frag4 *fp_frag_get(struct fp_frag4_key *key)
{
	return FP_MAP_FRAG.lookup(key);
}

static __always_inline void fp_frag_put(struct fp_frag4_key *key, struct fp_frag4 *val)
{
	if (!fp_whatif())
		FP_MAP_FRAG.update(key, val);
}

static __always_inline void fp_ct_event(__u32 event)
{
	__u64 *n;

	if (fp_whatif())
		return;
	n = FP_MAP_CT_STATS.lookup(&event);
	if (n)
		*n += 1;
}

static __always_inline struct fp_aff4 *fp_affinity_lookup(struct fp_aff4_key *key)
{
	return FP_MAP_AFFINITY.lookup(key);
}

static __always_inline void fp_affinity_put(struct fp_aff4_key *key, struct fp_aff4 *val)
{
	if (!fp_whatif())
		FP_MAP_AFFINITY.update(key, val);
}

static __always_inline struct fp_config *fp_config_get(void)
{
	__u32 zero = 0;

	return FP_MAP_CONFIG.lookup(&zero);
}

static __always_inline __u32 fp_events_wanted(void)
{
	__u32 zero = 0;
	struct fp_monitor *mon = FP_MAP_MONITOR.lookup(&zero);

	return mon ? mon->events : 0;
}

static __always_inline void fp_sockrev_put(struct fp_sockrev4_key *key, struct fp_sockrev4 *val)
{
	FP_MAP_SOCKREV.update(key, val);
}

static __always_inline struct fp_sockrev4 *fp_sockrev_lookup(struct fp_sockrev4_key *key)
{
	return FP_MAP_SOCKREV.lookup(key);
}

static __always_inline void fp_test_record(__u32 ifindex, enum fp_redirect_kind kind,
					   __be32 nexthop, enum fp_reason reason)
{
	struct fp_decision *rec = fp_decision_rec();

	if (rec) {
		rec->ifindex = ifindex;
		rec->kind = kind;
		rec->nexthop = nexthop;
		rec->reason = reason;
	}
}

static __always_inline void fp_decision_nat(__u32 svc_id, __u32 backend_id,
					    __be32 addr, __be16 port)
{
	struct fp_decision *rec = fp_decision_rec();

	if (rec) {
		rec->svc_id = svc_id;
		rec->backend_id = backend_id;
		rec->nat_daddr = addr;
		rec->nat_dport = port;
	}
}

static __always_inline void fp_decision_policy(__u8 dir, __u8 verdict, __u32 policy_id,
					       __u32 peer_id)
{
	struct fp_decision *rec = fp_decision_rec();

	if (rec && dir < 2) {
		rec->pv[dir] = verdict;
		rec->policy_id[dir] = policy_id;
		rec->peer_id[dir] = peer_id;
	}
}

/* ---- NetworkPolicy ---- */

static __always_inline __u32 fp_identity_of(__be32 addr)
{
	struct fp_lpm4_key key = { .prefixlen = 32, .addr = addr };
	__u32 *id = FP_MAP_IPCACHE.lookup(&key);

	return id ? *id : FP_ID_WORLD;
}

static __always_inline struct fp_pol_ep *fp_policy_ep(__be32 ip4)
{
	return FP_MAP_POLICY_EP.lookup(&ip4);
}

static __always_inline struct fp_pol_rule *fp_policy_rule(struct fp_pol_key *key)
{
	return FP_MAP_POLICY.lookup(key);
}

static __always_inline void fp_policy_count(__u32 policy_id, __u8 dir, __u8 verdict, __u32 bytes)
{
	struct fp_polcnt_key key = { .policy_id = policy_id, .dir = dir, .verdict = verdict };
	struct fp_counter *c;

	if (fp_whatif())
		return;
	c = FP_MAP_POLICY_CNT.lookup(&key);
	if (!c) {
		struct fp_counter zero = {};

		FP_MAP_POLICY_CNT.insert(&key, &zero);
		c = FP_MAP_POLICY_CNT.lookup(&key);
		if (!c)
			return;
	}
	c->packets += 1;
	c->bytes += bytes;
}

/* Ring buffer events. Reserve-and-submit: when the buffer is full (nobody
 * reading, or a reader too slow) the event is lost, never the packet. */
static __always_inline struct fp_event *fp_event_reserve(void)
{
	if (fp_whatif())
		return NULL;
	return FP_MAP_EVENTS.ringbuf_reserve(sizeof(struct fp_event));
}

static __always_inline void fp_event_submit(struct fp_event *ev)
{
	FP_MAP_EVENTS.ringbuf_submit(ev, 0);
}

/* An IPv6 packet's record (struct fp_event6, bpf/lib/event6.h). */
static __always_inline struct fp_event6 *fp_event6_reserve(void)
{
	if (fp_whatif())
		return NULL;
	return (struct fp_event6 *)FP_MAP_EVENTS.ringbuf_reserve(sizeof(struct fp_event6));
}

static __always_inline void fp_event6_submit(struct fp_event6 *ev)
{
	FP_MAP_EVENTS.ringbuf_submit(ev, 0);
}

static __always_inline int fp_socklb_skipped(__u64 netns_cookie)
{
	return FP_MAP_SOCKLB_SKIP.lookup(&netns_cookie) != NULL;
}

static __always_inline int fp_crc32c_power(__u32 idx, __u32 *out)
{
	__u32 *v = FP_MAP_CRC32C.lookup(&idx);

	if (!v)
		return -1;
	*out = *v;
	return 0;
}

/* ---- node-facing Services ---- */

static __always_inline struct fp_svc4 *fp_service_lookup_scope(__be32 vip, __be16 port,
								__u8 proto, __u8 scope)
{
	struct fp_svc4_key key = { .vip = vip, .port = port, .proto = proto, .scope = scope };

	return FP_MAP_SERVICES.lookup(&key);
}

/* Whether `saddr` may reach the frontend of `svc_id` (its loadBalancerSourceRanges). */
static __always_inline int fp_src_range_ok(__u32 svc_id, __be32 saddr)
{
	struct fp_srcrange4_key key = {
		.prefixlen = FP_SRC_RANGE_FIXED_BITS + 32, .svc_id = svc_id, .addr = saddr,
	};

	return FP_MAP_SRC_RANGE.lookup(&key) != NULL;
}

/* FP_SVCNET_F_* of the Service address range holding `addr`; -1 when none does. */
static __always_inline int fp_svcnet_flags(__be32 addr)
{
	struct fp_lpm4_key key = { .prefixlen = 32, .addr = addr };
	__u32 *f = FP_MAP_SVCNET.lookup(&key);

	return f ? (int)*f : -1;
}

/* Entry `idx` of the Maglev table of `svc_id`: a backend id, 0 if none. */
static __always_inline __u32 fp_maglev_backend(__u32 svc_id, __u32 idx)
{
	struct fp_maglev *t = FP_MAP_MAGLEV.lookup(&svc_id);

	/* the verifier cannot follow a modulo: keep the compiler from
	 * dropping a bound it thinks the caller's `% FP_MAGLEV_M` implies */
	asm volatile("" : "+r"(idx));
	if (!t || idx >= FP_MAGLEV_M)
		return 0;
	return t->backend_ids[idx];
}

static __always_inline struct fp_ep_if *fp_epif_lookup(__u32 ifindex)
{
	return FP_MAP_EP_IFINDEX.lookup(&ifindex);
}

/* ---- IPv6 (docs/ipv6.md) ---- */

/* Local pod endpoints by IPv6 address; one entry per dual-stack pod. */
BPF_TABLE_PINNED("hash", struct fp_endpoint6_key, struct fp_endpoint,
		 FP_MAP_ENDPOINTS6, FP_EP_MAX, FP_PIN(FP_MAP_ENDPOINTS6));

/* Host-stack bypass prefixes of IPv6 (node-local DNS, untranslated Service
 * CIDRs); sized like the IPv4 trie. */
BPF_TABLE_PINNED("lpm_trie", struct fp_lpm6_key, __u8,
		 FP_MAP_BYPASS6, FP_BYPASS_MAX, FP_PIN(FP_MAP_BYPASS6), BPF_F_NO_PREALLOC);

static __always_inline int fp_bypass6_match(const __u32 *ip6)
{
	struct fp_lpm6_key key = { .prefixlen = 128 };

	__builtin_memcpy(key.addr, ip6, 16);
	return FP_MAP_BYPASS6.lookup(&key) != NULL;
}

static __always_inline struct fp_endpoint *fp_endpoint6_lookup(const __u32 *ip6)
{
	struct fp_endpoint6_key key;
	struct fp_endpoint *ep;

	__builtin_memcpy(key.ip6, ip6, 16);
	ep = FP_MAP_ENDPOINTS6.lookup(&key);
	if (ep && (ep->flags & FP_EP_F_REGISTERED))
		return ep;
	return NULL;
}

/* ---- Bandwidth manager (lib/bw.h) ---- */

/* Per-pod limits, written by the agent; one entry per limited pod. */
BPF_TABLE_PINNED("hash", __be32, struct fp_bw, FP_MAP_BW, FP_EP_MAX, FP_PIN(FP_MAP_BW));
/* Per-pod buckets and connection counts, kept by the programs. */
BPF_TABLE_PINNED("hash", __be32, struct fp_bw_state, FP_MAP_BW_STATE, FP_EP_MAX,
		 FP_PIN(FP_MAP_BW_STATE));
/* TCP connections of connection-limited pods. A plain hash, not an LRU:
 * an evicted entry would never give its count back; a full map admits new
 * connections uncounted (FP_FWD_BW_UNTRACKED) until the agent's sweep of
 * idle entries makes room. */
BPF_TABLE_PINNED("hash", struct fp_bw_flow_key, struct fp_bw_flow, FP_MAP_BW_FLOWS,
		 FP_BW_FLOWS_MAX, FP_PIN(FP_MAP_BW_FLOWS));
/* What each limited pod sent and received, and what was dropped, by reason. */
BPF_TABLE_PINNED("percpu_hash", struct fp_bwcnt_key, struct fp_counter, FP_MAP_BW_COUNTERS,
		 FP_BWCNT_MAX, FP_PIN(FP_MAP_BW_COUNTERS), BPF_F_NO_PREALLOC);

static __always_inline struct fp_bw *fp_bw_limits(__be32 ip4)
{
	return FP_MAP_BW.lookup(&ip4);
}

/* The pod's state; created when missing (the agent creates it with the
 * limits, but a layout migration may have emptied the state map). */
static __always_inline struct fp_bw_state *fp_bw_state_of(__be32 ip4, __u32 conn_gen)
{
	struct fp_bw_state *st = FP_MAP_BW_STATE.lookup(&ip4);

	if (!st) {
		struct fp_bw_state zero = { .conn_gen = conn_gen };

		FP_MAP_BW_STATE.insert(&ip4, &zero);
		st = FP_MAP_BW_STATE.lookup(&ip4);
	}
	return st;
}

/* Another pod's state, never created (closing a flow it was counted for). */
static __always_inline struct fp_bw_state *fp_bw_state_lookup(__be32 ip4)
{
	return FP_MAP_BW_STATE.lookup(&ip4);
}

static __always_inline struct fp_bw_flow *fp_bw_flow_lookup(struct fp_bw_flow_key *key)
{
	return FP_MAP_BW_FLOWS.lookup(key);
}

/* 0 when inserted, < 0 when the map is full or the entry exists. */
static __always_inline int fp_bw_flow_insert(struct fp_bw_flow_key *key, struct fp_bw_flow *val)
{
	return FP_MAP_BW_FLOWS.insert(key, val);
}

/* 0 when this call removed the entry: the caller then owns its counts. */
static __always_inline int fp_bw_flow_delete(struct fp_bw_flow_key *key)
{
	return FP_MAP_BW_FLOWS.delete(key);
}

static __always_inline void fp_bw_count(__be32 ip4, enum fp_dir dir, enum fp_reason reason,
					__u32 bytes)
{
	struct fp_bwcnt_key key = { .ip4 = ip4, .reason = reason, .dir = dir };
	struct fp_counter *c = FP_MAP_BW_COUNTERS.lookup(&key);

	if (!c) {
		struct fp_counter zero = {};

		FP_MAP_BW_COUNTERS.insert(&key, &zero);
		c = FP_MAP_BW_COUNTERS.lookup(&key);
		if (!c)
			return;
	}
	c->packets += 1;
	c->bytes += bytes;
}

/* ---- IPv6 Services (v6svc; docs/ipv6.md) ---- */

/* Sized like their IPv4 twins: services_map_size and backends_map_size
 * bound each family on its own (agent/lb/capacity.py counts per family). */
BPF_TABLE_PINNED("hash", struct fp_svc6_key, struct fp_svc4,
		 FP_MAP_SERVICES6, FP_SVC_MAX, FP_PIN(FP_MAP_SERVICES6));
BPF_TABLE_PINNED("hash", __u32, struct fp_backend6,
		 FP_MAP_BACKENDS6, FP_BE_MAX, FP_PIN(FP_MAP_BACKENDS6));
/* IPv6 Service CIDRs and ClusterIPs (FP_SVCNET_F_*), as FP_MAP_SVCNET. */
BPF_TABLE_PINNED("lpm_trie", struct fp_lpm6_key, __u32,
		 FP_MAP_SVCNET6, 2 * FP_SVC_MAX, FP_PIN(FP_MAP_SVCNET6), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct fp_sockrev6_key, struct fp_sockrev6,
		 FP_MAP_SOCKREV6, FP_SOCKREV_MAX, FP_PIN(FP_MAP_SOCKREV6));

static __always_inline struct fp_svc4 *fp_service6_lookup(const __u32 *vip, __be16 port,
							   __u8 proto)
{
	struct fp_svc6_key key = { .port = port, .proto = proto };

	__builtin_memcpy(key.vip, vip, 16);
	return FP_MAP_SERVICES6.lookup(&key);
}

/* ---- IPv6 node-facing Services ---- */

/* Sized like the IPv4 ranges (source_ranges_map_size; agent/lb/capacity.py
 * counts both families' prefixes against it). */
BPF_TABLE_PINNED("lpm_trie", struct fp_srcrange6_key, __u8,
		 FP_MAP_SRC_RANGE6, FP_SRC_RANGE_MAX, FP_PIN(FP_MAP_SRC_RANGE6), BPF_F_NO_PREALLOC);

static __always_inline struct fp_svc4 *fp_service6_lookup_scope(const __u32 *vip, __be16 port,
								 __u8 proto, __u8 scope)
{
	struct fp_svc6_key key = { .port = port, .proto = proto, .scope = scope };

	__builtin_memcpy(key.vip, vip, 16);
	return FP_MAP_SERVICES6.lookup(&key);
}

/* Whether `saddr` may reach the IPv6 frontend of `svc_id` (its IPv6
 * loadBalancerSourceRanges). */
static __always_inline int fp_src_range6_ok(__u32 svc_id, const __u32 *saddr)
{
	struct fp_srcrange6_key key = {
		.prefixlen = FP_SRC_RANGE_FIXED_BITS + 128, .svc_id = svc_id,
	};

	__builtin_memcpy(key.addr, saddr, 16);
	return FP_MAP_SRC_RANGE6.lookup(&key) != NULL;
}

static __always_inline struct fp_backend6 *fp_backend6_lookup(__u32 backend_id)
{
	return FP_MAP_BACKENDS6.lookup(&backend_id);
}

static __always_inline struct fp_backend6 *fp_slot_backend6(__u32 svc_id, __u32 slot,
							     __u32 *backend_id)
{
	struct fp_slot_key key = { .svc_id = svc_id, .slot = slot };
	struct fp_slot *s = FP_MAP_SLOTS.lookup(&key);

	if (!s)
		return NULL;
	*backend_id = s->backend_id;
	return FP_MAP_BACKENDS6.lookup(&s->backend_id);
}

static __always_inline int fp_svcnet6_flags(const __u32 *addr)
{
	struct fp_lpm6_key key = { .prefixlen = 128 };
	__u32 *f;

	__builtin_memcpy(key.addr, addr, 16);
	f = FP_MAP_SVCNET6.lookup(&key);
	return f ? (int)*f : -1;
}

static __always_inline void fp_sockrev6_put(struct fp_sockrev6_key *key, struct fp_sockrev6 *val)
{
	FP_MAP_SOCKREV6.update(key, val);
}

static __always_inline struct fp_sockrev6 *fp_sockrev6_lookup(struct fp_sockrev6_key *key)
{
	return FP_MAP_SOCKREV6.lookup(key);
}

/* ---- Bandwidth manager for IPv6 (v6bw; lib/bw.h) ---- */

/* IPv6 TCP connections of connection-limited pods: the twin of
 * FP_MAP_BW_FLOWS, sized like it (each family its own capacity). */
BPF_TABLE_PINNED("hash", struct fp_bw_flow6_key, struct fp_bw_flow, FP_MAP_BW_FLOWS6,
		 FP_BW_FLOWS_MAX, FP_PIN(FP_MAP_BW_FLOWS6));

static __always_inline struct fp_bw_flow *fp_bw_flow6_lookup(struct fp_bw_flow6_key *key)
{
	return FP_MAP_BW_FLOWS6.lookup(key);
}

static __always_inline int fp_bw_flow6_insert(struct fp_bw_flow6_key *key, struct fp_bw_flow *val)
{
	return FP_MAP_BW_FLOWS6.insert(key, val);
}

static __always_inline int fp_bw_flow6_delete(struct fp_bw_flow6_key *key)
{
	return FP_MAP_BW_FLOWS6.delete(key);
}

/* ---- IPv6 NetworkPolicy (lib/policy6.h) ---- */

/* Sized like their IPv4 twins: ipcache_map_size bounds each family on its
 * own (agent/policy/capacity.py counts per family). */
BPF_TABLE_PINNED("lpm_trie", struct fp_lpm6_key, __u32,
		 FP_MAP_IPCACHE6, FP_IPCACHE_MAX, FP_PIN(FP_MAP_IPCACHE6), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct fp_ctpol6_key, struct fp_ctpol4,
		 FP_MAP_CT_POLICY6, FP_CT_POLICY_MAX, FP_PIN(FP_MAP_CT_POLICY6));
BPF_TABLE_PINNED("lru_hash", struct fp_frag6_key, struct fp_polfrag6,
		 FP_MAP_POLFRAG6, FP_FRAG_MAX, FP_PIN(FP_MAP_POLFRAG6));

static __always_inline __u32 fp_identity6_of(const __u32 *addr)
{
	struct fp_lpm6_key key = { .prefixlen = 128 };
	__u32 *id;

	__builtin_memcpy(key.addr, addr, 16);
	id = FP_MAP_IPCACHE6.lookup(&key);
	return id ? *id : FP_ID_WORLD;
}

static __always_inline struct fp_ctpol4 *fp_ctpol6_get(struct fp_ctpol6_key *key)
{
	return FP_MAP_CT_POLICY6.lookup(key);
}

static __always_inline void fp_ctpol6_put(struct fp_ctpol6_key *key, struct fp_ctpol4 *val)
{
	if (!fp_whatif())
		FP_MAP_CT_POLICY6.update(key, val);
}

static __always_inline struct fp_polfrag6 *fp_polfrag6_get(struct fp_frag6_key *key)
{
	return FP_MAP_POLFRAG6.lookup(key);
}

static __always_inline void fp_polfrag6_put(struct fp_frag6_key *key, struct fp_polfrag6 *val)
{
	if (!fp_whatif())
		FP_MAP_POLFRAG6.update(key, val);
}

/* ---- IPv6 conntrack (lib/ct6.h, fastpath.h) ---- */

/* The IPv4 conntrack tiers' twins, of the same sizes. */
BPF_TABLE_PINNED("hash", struct fp_ct6_key, struct fp_ct6,
		 FP_MAP_CT6, FP_CT_MAX, FP_PIN(FP_MAP_CT6));
BPF_TABLE_PINNED("lru_hash", struct fp_ct6_key, struct fp_ct6,
		 FP_MAP_CT_NEW6, FP_CT_NEW_MAX, FP_PIN(FP_MAP_CT_NEW6));

/* A new IPv6 flow's keys and entries (as fp_ct_work: off the stack). */
struct fp_ct6_work {
	struct fp_ct6_key fwd;
	struct fp_ct6_key rev;
	struct fp_ct6_key old_rev;
	struct fp_ct6 entry;
	struct fp_ct6 reply;
	/* an ICMPv6 error's rewrite (lib/ct6.h fp_ct6_related_*): the quoted
	 * addresses, the new ones, the error's new destination, the quoted
	 * words before and after */
	__u32 q_saddr[4];
	__u32 q_daddr[4];
	__u32 new_qsaddr[4];
	__u32 new_qdaddr[4];
	__u32 odst[4];
	__be32 o[9];
	__be32 n[9];
};

BPF_PERCPU_ARRAY(fp_ct6_work_cpu, struct fp_ct6_work, 1);

static __always_inline struct fp_ct6_work *fp_ct6_work_scratch(void)
{
	__u32 zero = 0;

	return fp_ct6_work_cpu.lookup(&zero);
}

/* Fragments of translated IPv6 flows (fastpath.h), and a record being
 * built or looked up, off the stack. */
BPF_TABLE_PINNED("lru_hash", struct fp_frag6_key, struct fp_frag6,
		 FP_MAP_FRAG6, FP_FRAG_MAX, FP_PIN(FP_MAP_FRAG6));

struct fp_frag6_work {
	struct fp_frag6_key key;
	struct fp_frag6 val;
};

BPF_PERCPU_ARRAY(fp_frag6_work_cpu, struct fp_frag6_work, 1);

static __always_inline struct fp_frag6_work *fp_frag6_scratch(void)
{
	__u32 zero = 0;

	return fp_frag6_work_cpu.lookup(&zero);
}

static __always_inline struct fp_frag6 *fp_frag6_get(struct fp_frag6_key *key)
{
	return FP_MAP_FRAG6.lookup(key);
}

static __always_inline void fp_frag6_put(struct fp_frag6_key *key, struct fp_frag6 *val)
{
	if (!fp_whatif())
		FP_MAP_FRAG6.update(key, val);
}

/* An ICMPv6 error being built (lib/icmp6.h), off the IPv6 program's stack:
 * raw bytes here, its layout is icmp6.h's (asserted there). */
#define FP_ICMP6_SCRATCH_BYTES 192

struct fp_icmp6_scratch {
	__u8 bytes[FP_ICMP6_SCRATCH_BYTES];
};

BPF_PERCPU_ARRAY(fp_icmp6_cpu, struct fp_icmp6_scratch, 1);

static __always_inline void *fp_icmp6_scratch(void)
{
	__u32 zero = 0;

	return fp_icmp6_cpu.lookup(&zero);
}

static __always_inline struct fp_ct6 *fp_ct6_tier_get(int tier, struct fp_ct6_key *key)
{
	if (tier == FP_CT_TIER_EST)
		return FP_MAP_CT6.lookup(key);
	return FP_MAP_CT_NEW6.lookup(key);
}

static __always_inline int fp_ct6_tier_put(int tier, struct fp_ct6_key *key, struct fp_ct6 *val)
{
	if (fp_whatif())
		return 0;
	if (key->dir == FP_CT_REPLY)
		fp_mark6_set(FP_MARK6_REPLY_SRC + fp_mark6_slot(key->saddr));
	if (tier == FP_CT_TIER_EST)
		return FP_MAP_CT6.update(key, val);
	return FP_MAP_CT_NEW6.update(key, val);
}

static __always_inline void fp_ct6_tier_del(int tier, struct fp_ct6_key *key)
{
	if (fp_whatif())
		return;
	if (tier == FP_CT_TIER_EST)
		FP_MAP_CT6.delete(key);
	else
		FP_MAP_CT_NEW6.delete(key);
}

/* Loaded alone by the agent to read the programs' BTF, which declares every
 * map's layout (agent/datapath/loader.py, _compiled). It touches no map, so
 * it loads even while a map of an older layout is still pinned at a map's
 * name, which is what the agent is about to find out. Never attached. */
int fp_btf_probe(struct __sk_buff *skb)
{
	return -1;      /* TC_ACT_UNSPEC */
}
