/* SPDX-License-Identifier: Apache-2.0 */
/*
 * bpf/events.h — what bpfinit's programs record about every capture decision.
 *
 * HOW TO CALL (datapath authors read this):
 *
 *   struct flow_tuple t;
 *   flow_from_sock_addr4(&t, ctx);                // connect4/sendmsg4/recvmsg4 (…6 for the v6 hooks; also
 *                                                 // flow_from_sk_lookup, flow_from_sock_ops): fills family,
 *                                                 // l4, src, dst, orig_dst
 *   t.uid = uid; t.gid = gid;                     // optional, when the hook knows them (else "unknown")
 *   ... decide ...
 *   flow_set_dst4(&t, new_ip4_be, new_port_host);  // only when you rewrote the destination (REDIRECTED);
 *                                                 // orig_dst keeps what the application asked for
 *   record(ctx, netns_cookie, cfg->pod_idx, DIR_OUTBOUND, VERDICT_REDIRECTED, REASON_NONE, &t);
 *
 *  - Call record() exactly once per decision that the pod's config made (redirect, capture, each bypass
 *    reason, deny, refuse, DNS capture, accel hit). Do NOT call it for sockets of netns that are not
 *    bpfinit pods (no pod_cfg): those are not ours to count.
 *  - The per-pod counter {pod_idx, dir, verdict, reason} is always bumped exactly; the ring-buffer
 *    event is rate limited per pod (token bucket, per CPU), so a busy pod cannot flood the node.
 *    Events dropped because the buffer was full are counted in obs_stats[OBS_STAT_LOST], events
 *    held back by the rate limit in obs_stats[OBS_STAT_SUPPRESSED] and, per pod, in the next event's
 *    `suppressed` field. Nothing is lost silently.
 *  - netns_cookie: bpf_get_netns_cookie(ctx) where the hook has it; pass 0 where it does not (sk_lookup):
 *    user space names the pod from pod_idx (identity map), the cookie is only a cross-check.
 *  - record() is __always_inline: it costs no BPF-to-BPF call and no argument-count limit. Its stack
 *    use is under 40 bytes (the event is reserved in the ring buffer, not built on the stack).
 *  - Ports in struct flow_tuple/flow_event are HOST byte order; addresses are network byte order
 *    (IPv4 in addr[0], rest zero). The flow_from_* helpers do the per-context conversions (see
 *    datapath-measurements.md "each context stores ports differently").
 *  - Reasons: REASON_NONE for the normal outcome (REDIRECTED by default rules, CAPTURED inbound port).
 *    BYPASSED always names why (excluded_cidr, proxy_uid, ...). DENIED uses REASON_EGRESS_POLICY (REASON_SOCKET_TYPE for a refused socket()),
 *    REFUSED uses REASON_PROXY_NOT_LISTENING. DNS capture: DIR_DNS + VERDICT_REDIRECTED + REASON_DNS.
 *    Sockmap acceleration hit: VERDICT_REDIRECTED + REASON_ACCEL; a connection that leaves it for TCP for
 *    good: VERDICT_REDIRECTED + REASON_ACCEL_TCP_PATH (its bytes still reach the proxy). Add new reasons at the END of the
 *    list and to REASON_NAMES in initagent/obsmaps.py (user space decodes by number; a test checks).
 *
 * BUILD NOTES
 *  - bcc 0.26 rewrites map method calls (map.lookup(), .ringbuf_reserve(), ...) ONLY in the main source
 *    text, not in #included files (verified: an included helper compiles to "unknown opcode 8d").
 *    So the loader must expand local `#include "x.h"`/`"x.c"` textually before handing text to bcc.
 *  - Ring buffer needs kernel >= 5.8. Compile with -DBPFINIT_EVENTS_PERFBUF to use a perf buffer
 *    instead; the loader adds it by itself (initagent/observe.py event_cflags()), `doctor` reports it.
 *  - Include order: maps.h includes this file's type half; the helper half appears once maps.h has
 *    been fully read (BPFINIT_MAPS_DONE, defined at the very end of maps.h). Including events.h again
 *    afterwards (bpfinit.c, connect.c, ...) is what makes record() available.
 */

/* ------------------------------------------------------------------ types (shared with user space) */
#ifndef BPFINIT_EVENTS_TYPES
#define BPFINIT_EVENTS_TYPES

/* Mirrored in initagent/obsmaps.py: numbers are ABI, only ever append.
 * Plain macros, spelled exactly like bpf/common.h's, so either header may come first (identical macro
 * redefinitions are legal C). Defining REASON_DEFINED makes common.h skip its own reason list. */
#define DIR_UNKNOWN  0
#define DIR_OUTBOUND 1
#define DIR_INBOUND  2
#define DIR_DNS      3

#define VERDICT_UNKNOWN    0
#define VERDICT_REDIRECTED 1   /* outbound (or DNS) sent to the proxy */
#define VERDICT_CAPTURED   2   /* inbound steered to the proxy's inbound listener */
#define VERDICT_BYPASSED   3   /* left alone on purpose; reason says why */
#define VERDICT_DENIED     4   /* egress guard: EPERM */
#define VERDICT_REFUSED    5   /* would be captured but the proxy is not listening: refused, never bypassed */

#define REASON_DEFINED 1
#define REASON_NONE           0   /* the normal outcome, no special rule involved */
#define REASON_EXCLUDED_IFACE 1   /* -c excludeInterfaces / -k kube virt interfaces */
#define REASON_EXCLUDED_PORT  2   /* -o / -d (excludeOutboundPorts / excludeInboundPorts) */
#define REASON_PASSTHROUGH_SRC 3  /* from 127.0.0.6 / ::6 (inbound passthrough) */
#define REASON_PROXY_UID      4   /* -u: the proxy's own traffic */
#define REASON_PROXY_GID      5   /* -g */
#define REASON_LOOPBACK       6   /* loopback destination / loopback CIDR rules */
#define REASON_OWNER_GROUP    7   /* ISTIO_OUTBOUND_OWNER_GROUPS(_EXCLUDE) */
#define REASON_LOCAL_DST      8   /* destination is local to the pod (own address, routed via lo) */
#define REASON_EXCLUDED_CIDR  9   /* -x / excludeOutboundIPRanges */
#define REASON_INCLUDED_PORT  10  /* redirected because of -q includeOutboundPorts */
#define REASON_INCLUDED_CIDR  11  /* redirected because of -i includeOutboundIPRanges */
#define REASON_NOT_INCLUDED   12  /* not in -i CIDRs / -q ports / -b inbound ports */
#define REASON_HAIRPIN        13  /* proxy connecting to its own pod IP: sent to the inbound port */
#define REASON_EGRESS_DENIED  14  /* bypass destination outside the pod's egress allow-list */
#define REASON_IPV6_OFF       15  /* IPv6 traffic of a pod istio would not program ip6tables for */
#define REASON_DNS            16  /* DNS sent to the proxy's DNS port (15053) */
#define REASON_PROXY_NOT_LISTENING 17 /* capture target has no listener yet */
#define REASON_ACCEL          18  /* sockmap acceleration hit */
#define REASON_TUNNEL_PORT    19  /* -e inbound tunnel port (15008), never captured */
#define REASON_PROTOCOL       20  /* protocol not captured (e.g. non-DNS UDP) */
#define REASON_INTERNAL_ERROR 21  /* a map operation failed; the decision taken is in verdict */
#define REASON_SOCKET_TYPE    22  /* egress guard: socket() of a kind no connect/sendmsg hook sees (raw, UDP-Lite, SCTP...) */
#define REASON_ACCEL_TCP_PATH 23  /* an app<->proxy connection left acceleration for TCP (order, full peer, Fast Open) */
#define REASON__COUNT         24
/* Synonyms (same numbers) so both spellings in use compile. */
#define REASON_INTERFACE          REASON_EXCLUDED_IFACE
#define REASON_PASSTHROUGH_SOURCE REASON_PASSTHROUGH_SRC
#define REASON_EGRESS_POLICY      REASON_EGRESS_DENIED
#define REASON_PROXY_HAIRPIN      REASON_HAIRPIN

/* What the datapath knows about one decision. Filled by the flow_from_* helpers. */
struct flow_tuple {
    __u8  family;          /* AF_INET (2) / AF_INET6 (10) */
    __u8  l4_proto;        /* IPPROTO_TCP (6) / IPPROTO_UDP (17); socket_type and ping denials: the socket's protocol */
    __u16 src_port;        /* host order; 0 when not yet bound */
    __u16 dst_port;        /* host order: where the traffic actually goes after the decision */
    __u16 orig_dst_port;   /* host order: what the application/peer addressed */
    __u32 uid;             /* FLOW_ID_UNKNOWN unless the hook knows it */
    __u32 gid;
    __u32 src_addr[4];     /* network order; IPv4 in [0] */
    __u32 dst_addr[4];
    __u32 orig_dst_addr[4];
};

#define FLOW_ID_UNKNOWN 0xffffffffu

/* Own names so events.h needs no libc/uapi socket headers (values are the Linux ABI). */
#define OBS_AF_INET 2
#define OBS_AF_INET6 10
#define OBS_IPPROTO_TCP 6
#define OBS_IPPROTO_UDP 17

/* One ring-buffer record. 96 bytes, no implicit padding (user space reads it with a fixed layout). */
struct flow_event {
    __u64 ts_ns;           /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u64 netns_cookie;
    __u32 pod_idx;
    __u8  dir;             /* DIR_* */
    __u8  verdict;         /* VERDICT_* */
    __u8  reason;          /* REASON_* */
    __u8  l4_proto;
    __u8  family;
    __u8  version;         /* FLOW_EVENT_VERSION */
    __u16 src_port;
    __u16 dst_port;
    __u16 orig_dst_port;
    __u32 suppressed;      /* this pod's events held back by the rate limit on this CPU since its last event */
    __u32 uid;
    __u32 gid;
    __u32 _pad;
    __u32 src_addr[4];
    __u32 dst_addr[4];
    __u32 orig_dst_addr[4];
};

#define FLOW_EVENT_VERSION 1

/* Per-pod counter key: one u64 per {pod, dir, verdict, reason} (PERCPU_HASH, summed in user space). */
struct obs_counter_key {
    __u32 pod_idx;
    __u8  dir;
    __u8  verdict;
    __u8  reason;
    __u8  _pad;
};

/* obs_config[0], written by user space (initagent/observe.py set_event_config). Zero = defaults. */
struct obs_config {
    __u32 flags;           /* OBS_F_EVENTS_OFF: counters only */
    __u32 rate_per_sec;    /* events per pod per CPU per second; 0 = default; OBS_RATE_UNLIMITED */
    __u32 burst;           /* bucket depth; 0 = default */
    __u32 _pad;
};

#define OBS_F_EVENTS_OFF 1u
#define OBS_RATE_UNLIMITED 0xffffffffu
#define OBS_DEFAULT_RATE 200u      /* per pod per CPU: ~25 KB/s of events at most from one busy pod-CPU */
#define OBS_DEFAULT_BURST 400u

/* Per-pod, per-CPU rate-limit state (GCRA: one timestamp is the whole bucket), keyed by pod_idx. */
struct obs_bucket {
    __u64 tat_ns;          /* theoretical arrival time of the next conforming event */
    __u32 suppressed;      /* held back since the last emitted event */
    __u32 _pad;
};

/* obs_stats indexes (PERCPU_ARRAY of u64, node-wide). */
enum obs_stat {
    OBS_STAT_EMITTED = 0,
    OBS_STAT_LOST = 1,           /* ring/perf buffer full: event dropped (counters still exact) */
    OBS_STAT_SUPPRESSED = 2,     /* held back by the per-pod rate limit */
    OBS_STAT_COUNTER_FULL = 3,   /* obs_counters full: a counter could not be created */
    OBS_STAT__COUNT = 4,
};

/* Pod identity registered by the agent at setup (downward API); never read by programs, only by
 * observe/status/exporter. Strings are NUL-terminated UTF-8; labels is a JSON object, truncated flag set
 * when it did not fit. */
#define OBS_ID_NAMESPACE_LEN 64
#define OBS_ID_NAME_LEN 256
#define OBS_ID_LABELS_LEN 1024
struct obs_identity {
    __u64 netns_cookie;
    __u32 flags;           /* OBS_ID_F_LABELS_TRUNCATED */
    __u32 _pad;
    char namespace_[OBS_ID_NAMESPACE_LEN];
    char name[OBS_ID_NAME_LEN];
    char labels[OBS_ID_LABELS_LEN];
};
#define OBS_ID_F_LABELS_TRUNCATED 1u

#ifndef BPFINIT_MAX_PODS
#define BPFINIT_MAX_PODS 16384    /* = pod_by_netns / BI_MAX_PODS capacity */
#endif

/* User space (initagent/obsmaps.py) reads these with fixed layouts. */
_Static_assert(sizeof(struct flow_event) == 96, "flow_event layout is ABI");
_Static_assert(sizeof(struct obs_counter_key) == 8, "obs_counter_key layout is ABI");
_Static_assert(sizeof(struct obs_identity) == 1360, "obs_identity layout is ABI");
_Static_assert(sizeof(struct obs_config) == 16, "obs_config layout is ABI");

/* common.h's placeholder record() must not be defined once this header exists. */
#define BPFINIT_HAVE_RECORD 1

#endif /* BPFINIT_EVENTS_TYPES */

/* ------------------------------------------------------------------ helpers (need the maps) */
#if defined(BPFINIT_MAPS_DONE) && !defined(BPFINIT_EVENTS_HELPERS)
#define BPFINIT_EVENTS_HELPERS

static __always_inline void flow_zero(struct flow_tuple *t)
{
    __builtin_memset(t, 0, sizeof(*t));
    t->uid = FLOW_ID_UNKNOWN;
    t->gid = FLOW_ID_UNKNOWN;
}

/* connect/sendmsg/recvmsg: destination as the application asked for it. `is6` must be a constant: the
 * verifier rejects any access to user_ip6 in a *4 hook (and user_ip4 in a *6 hook), even on a dead path,
 * so use the flow_from_sock_addr4/6 wrappers that match the hook. */
static __always_inline void flow_from_sock_addr_(struct flow_tuple *t, struct bpf_sock_addr *ctx, const int is6)
{
    flow_zero(t);
    t->family = is6 ? OBS_AF_INET6 : OBS_AF_INET;
    t->l4_proto = ctx->protocol;
    t->dst_port = bpf_ntohs((__u16)ctx->user_port);      /* user_port: network order, low 16 bits */
    if (!is6) {
        t->dst_addr[0] = ctx->user_ip4;
    } else {
        t->dst_addr[0] = ctx->user_ip6[0];
        t->dst_addr[1] = ctx->user_ip6[1];
        t->dst_addr[2] = ctx->user_ip6[2];
        t->dst_addr[3] = ctx->user_ip6[3];
    }
    t->orig_dst_port = t->dst_port;
    t->orig_dst_addr[0] = t->dst_addr[0];
    t->orig_dst_addr[1] = t->dst_addr[1];
    t->orig_dst_addr[2] = t->dst_addr[2];
    t->orig_dst_addr[3] = t->dst_addr[3];
    /* The source is known only if the socket is already bound (rare at connect time). */
    struct bpf_sock *sk = ctx->sk;
    if (sk) {
        t->src_port = (__u16)sk->src_port;                /* host order */
        if (!is6) {
            t->src_addr[0] = sk->src_ip4;
        } else {
            t->src_addr[0] = sk->src_ip6[0];
            t->src_addr[1] = sk->src_ip6[1];
            t->src_addr[2] = sk->src_ip6[2];
            t->src_addr[3] = sk->src_ip6[3];
        }
    }
}

/* connect4, sendmsg4, recvmsg4 */
static __always_inline void flow_from_sock_addr4(struct flow_tuple *t, struct bpf_sock_addr *ctx)
{
    flow_from_sock_addr_(t, ctx, 0);
}

/* connect6, sendmsg6, recvmsg6 */
static __always_inline void flow_from_sock_addr6(struct flow_tuple *t, struct bpf_sock_addr *ctx)
{
    flow_from_sock_addr_(t, ctx, 1);
}

/* sk_lookup: an inbound packet looking for a listener. src = remote peer, dst = local address. */
static __always_inline void flow_from_sk_lookup(struct flow_tuple *t, struct bpf_sk_lookup *ctx)
{
    flow_zero(t);
    t->family = ctx->family;
    t->l4_proto = ctx->protocol;
    t->src_port = bpf_ntohs((__u16)ctx->remote_port);     /* remote_port: network order */
    t->dst_port = (__u16)ctx->local_port;                 /* local_port: host order */
    if (t->family == OBS_AF_INET) {
        t->src_addr[0] = ctx->remote_ip4;
        t->dst_addr[0] = ctx->local_ip4;
    } else {
        t->src_addr[0] = ctx->remote_ip6[0];
        t->src_addr[1] = ctx->remote_ip6[1];
        t->src_addr[2] = ctx->remote_ip6[2];
        t->src_addr[3] = ctx->remote_ip6[3];
        t->dst_addr[0] = ctx->local_ip6[0];
        t->dst_addr[1] = ctx->local_ip6[1];
        t->dst_addr[2] = ctx->local_ip6[2];
        t->dst_addr[3] = ctx->local_ip6[3];
    }
    t->orig_dst_port = t->dst_port;
    t->orig_dst_addr[0] = t->dst_addr[0];
    t->orig_dst_addr[1] = t->dst_addr[1];
    t->orig_dst_addr[2] = t->dst_addr[2];
    t->orig_dst_addr[3] = t->dst_addr[3];
}

/* sockops: src = local end, dst = remote end (TCP only). */
static __always_inline void flow_from_sock_ops(struct flow_tuple *t, struct bpf_sock_ops *skops)
{
    flow_zero(t);
    t->family = skops->family;
    t->l4_proto = OBS_IPPROTO_TCP;
    t->src_port = (__u16)skops->local_port;               /* host order */
    t->dst_port = (__u16)bpf_ntohl(skops->remote_port);   /* network order in the high 16 bits */
    if (t->family == OBS_AF_INET) {
        t->src_addr[0] = skops->local_ip4;
        t->dst_addr[0] = skops->remote_ip4;
    } else {
        /* barrier: without it clang loads both branches' first field through one selected ctx pointer,
         * which the verifier rejects ("dereference of modified ctx ptr") */
        asm volatile("" ::: "memory");
        t->src_addr[0] = skops->local_ip6[0];
        t->src_addr[1] = skops->local_ip6[1];
        t->src_addr[2] = skops->local_ip6[2];
        t->src_addr[3] = skops->local_ip6[3];
        t->dst_addr[0] = skops->remote_ip6[0];
        t->dst_addr[1] = skops->remote_ip6[1];
        t->dst_addr[2] = skops->remote_ip6[2];
        t->dst_addr[3] = skops->remote_ip6[3];
    }
    t->orig_dst_port = t->dst_port;
    t->orig_dst_addr[0] = t->dst_addr[0];
    t->orig_dst_addr[1] = t->dst_addr[1];
    t->orig_dst_addr[2] = t->dst_addr[2];
    t->orig_dst_addr[3] = t->dst_addr[3];
}

/* After a rewrite: where the traffic now goes (orig_dst keeps the application's choice). */
static __always_inline void flow_set_dst4(struct flow_tuple *t, __u32 addr_be, __u16 port_host)
{
    t->dst_addr[0] = addr_be;
    t->dst_addr[1] = 0;
    t->dst_addr[2] = 0;
    t->dst_addr[3] = 0;
    t->dst_port = port_host;
}

static __always_inline void flow_set_dst6(struct flow_tuple *t, const __u32 *addr_be, __u16 port_host)
{
    t->dst_addr[0] = addr_be[0];
    t->dst_addr[1] = addr_be[1];
    t->dst_addr[2] = addr_be[2];
    t->dst_addr[3] = addr_be[3];
    t->dst_port = port_host;
}

static __always_inline void obs_stat_add(__u32 idx)
{
    __u64 *v = obs_stats.lookup(&idx);
    if (v)
        *v += 1;                        /* per-CPU slot: no atomic needed */
}

/* Exact per-pod counter. PERCPU_HASH: lookup, else create; a lost creation race just retries the lookup. */
static __always_inline void obs_count(__u32 pod_idx, __u8 dir, __u8 verdict, __u8 reason)
{
    struct obs_counter_key key = {};
    key.pod_idx = pod_idx;
    key.dir = dir;
    key.verdict = verdict;
    key.reason = reason;
    __u64 *v = obs_counters.lookup(&key);
    if (v) {
        *v += 1;
        return;
    }
    __u64 one = 1;
    if (obs_counters.insert(&key, &one) == 0)
        return;
    v = obs_counters.lookup(&key);      /* another CPU created it meanwhile */
    if (v)
        *v += 1;
    else
        obs_stat_add(OBS_STAT_COUNTER_FULL);
}

/* Rate limit (GCRA, per pod per CPU). Returns 1 to emit; *held gets the count held back before this one. */
static __always_inline int obs_admit(__u32 pod_idx, __u64 now, __u32 *held)
{
    __u32 zero = 0;
    __u32 rate = OBS_DEFAULT_RATE, burst = OBS_DEFAULT_BURST;
    struct obs_config *cfg = obs_config.lookup(&zero);
    if (cfg) {
        if (cfg->flags & OBS_F_EVENTS_OFF)
            return 0;
        if (cfg->rate_per_sec)
            rate = cfg->rate_per_sec;
        if (cfg->burst)
            burst = cfg->burst;
    }
    struct obs_bucket *b = obs_bucket.lookup(&pod_idx);
    if (!b) {                           /* first event of this pod: start with a full bucket */
        struct obs_bucket fresh = {};
        obs_bucket.insert(&pod_idx, &fresh);
        b = obs_bucket.lookup(&pod_idx);
        if (!b)
            return 0;
    }
    *held = b->suppressed;
    if (rate == OBS_RATE_UNLIMITED) {
        b->suppressed = 0;
        return 1;
    }
    __u64 interval = 1000000000ull / rate;
    __u64 tolerance = interval * burst;
    __u64 tat = b->tat_ns;
    if (tat > now + tolerance) {        /* bucket empty */
        b->suppressed += 1;
        obs_stat_add(OBS_STAT_SUPPRESSED);
        return 0;
    }
    b->tat_ns = (tat > now ? tat : now) + interval;
    b->suppressed = 0;
    return 1;
}

/* Copy the tuple into the event: plain stores, so the verifier sees bounded writes into the reservation. */
static __always_inline void obs_fill(struct flow_event *e, __u64 now, __u64 netns_cookie, __u32 pod_idx,
                                     __u8 dir, __u8 verdict, __u8 reason, const struct flow_tuple *t, __u32 held)
{
    e->ts_ns = now;
    e->netns_cookie = netns_cookie;
    e->pod_idx = pod_idx;
    e->dir = dir;
    e->verdict = verdict;
    e->reason = reason;
    e->l4_proto = t->l4_proto;
    e->family = t->family;
    e->version = FLOW_EVENT_VERSION;
    e->src_port = t->src_port;
    e->dst_port = t->dst_port;
    e->orig_dst_port = t->orig_dst_port;
    e->suppressed = held;
    e->uid = t->uid;
    e->gid = t->gid;
    e->_pad = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        e->src_addr[i] = t->src_addr[i];
        e->dst_addr[i] = t->dst_addr[i];
        e->orig_dst_addr[i] = t->orig_dst_addr[i];
    }
}

/*
 * THE call: count the decision exactly, then (rate limited) emit an event.
 * ctx is the program's context (only the perf-buffer fallback uses it).
 */
static __always_inline void obs_record_(void *ctx, const int has_ctx, __u64 netns_cookie, __u32 pod_idx,
                                        __u8 dir, __u8 verdict, __u8 reason, const struct flow_tuple *t)
{
    obs_count(pod_idx, dir, verdict, reason);

    __u64 now = bpf_ktime_get_ns();
    __u32 held = 0;
    if (!obs_admit(pod_idx, now, &held))
        return;

#ifdef BPFINIT_EVENTS_PERFBUF
    if (!has_ctx) {             /* constant: folded away */
        obs_stat_add(OBS_STAT_LOST);
        return;
    }
    struct flow_event e = {};
    obs_fill(&e, now, netns_cookie, pod_idx, dir, verdict, reason, t, held);
    if (obs_events.perf_submit(ctx, &e, sizeof(e)) < 0) {
        obs_stat_add(OBS_STAT_LOST);
        return;
    }
#else
    struct flow_event *e = obs_events.ringbuf_reserve(sizeof(struct flow_event));
    if (!e) {
        obs_stat_add(OBS_STAT_LOST);
        return;
    }
    obs_fill(e, now, netns_cookie, pod_idx, dir, verdict, reason, t, held);
    obs_events.ringbuf_submit(e, 0);
#endif
    obs_stat_add(OBS_STAT_EMITTED);
}

static __always_inline void obs_record(void *ctx, __u64 netns_cookie, __u32 pod_idx,
                                       __u8 dir, __u8 verdict, __u8 reason, const struct flow_tuple *t)
{
    obs_record_(ctx, 1, netns_cookie, pod_idx, dir, verdict, reason, t);
}

/* The public name. (A macro so that a stale placeholder `record` macro elsewhere cannot shadow it.) */
#undef record
#define record obs_record

#endif /* helpers */
