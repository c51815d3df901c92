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

/* Translated flows; LRU so the table can never fill up and refuse new flows. */
BPF_TABLE_PINNED("lru_hash", struct fp_ct4_key, struct fp_ct4,
		 FP_MAP_CT, FP_CT_MAX, FP_PIN(FP_MAP_CT));

/* ClientIP affinity. */
BPF_TABLE_PINNED("lru_hash", struct fp_aff4_key, struct fp_aff4,
		 FP_MAP_AFFINITY, FP_AFF_MAX, FP_PIN(FP_MAP_AFFINITY));

/* Socket-LB reverse translation for recvmsg/getpeername. */
BPF_TABLE_PINNED("lru_hash", struct fp_sockrev4_key, struct fp_sockrev4,
		 FP_MAP_SOCKREV, FP_SOCKREV_MAX, FP_PIN(FP_MAP_SOCKREV));

/* Runtime settings (one entry). */
BPF_TABLE_PINNED("array", __u32, struct fp_config, FP_MAP_CONFIG, 1, FP_PIN(FP_MAP_CONFIG));

/* Network namespaces whose sockets socket-LB leaves alone (opt-out);
 * one entry per pod at most, so sized like the endpoints map. */
BPF_TABLE_PINNED("hash", __u64, struct fp_socklb_skip, FP_MAP_SOCKLB_SKIP, FP_EP_MAX,
		 FP_PIN(FP_MAP_SOCKLB_SKIP));

#ifdef FP_TEST
/* Test builds record their redirect decisions (see struct fp_testrec). */
BPF_ARRAY(FP_MAP_TESTREC, struct fp_testrec, 1);
#endif

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

static __always_inline void fp_count(__u32 ifindex, enum fp_dir dir,
				     enum fp_reason reason, __u32 bytes)
{
	struct fp_counter_key key = { .ifindex = ifindex, .reason = reason, .dir = dir };
	struct fp_counter *c = FP_MAP_COUNTERS.lookup(&key);

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

static __always_inline struct fp_ct4 *fp_ct_lookup(struct fp_ct4_key *key)
{
	return FP_MAP_CT.lookup(key);
}

static __always_inline void fp_ct_delete(struct fp_ct4_key *key)
{
	FP_MAP_CT.delete(key);
}

static __always_inline void fp_ct_put(struct fp_ct4_key *key, struct fp_ct4 *val)
{
	FP_MAP_CT.update(key, val);
}

static __always_inline struct fp_aff4 *fp_affinity_lookup(struct fp_aff4_key *key)
{
	return FP_MAP_AFFINITY.lookup(key);
}

static __always_inline void fp_affinity_put(struct fp_aff4_key *key, struct fp_aff4 *val)
{
	FP_MAP_AFFINITY.update(key, val);
}

static __always_inline struct fp_config *fp_config_get(void)
{
	__u32 zero = 0;

	return FP_MAP_CONFIG.lookup(&zero);
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
#ifdef FP_TEST
	int zero = 0;
	struct fp_testrec *rec = FP_MAP_TESTREC.lookup(&zero);

	if (rec) {
		rec->ifindex = ifindex;
		rec->kind = kind;
		rec->nexthop = nexthop;
		rec->reason = reason;
	}
#endif
}

static __always_inline int fp_socklb_skipped(__u64 netns_cookie)
{
	return FP_MAP_SOCKLB_SKIP.lookup(&netns_cookie) != NULL;
}
