/* SPDX-License-Identifier: Apache-2.0 */
/*
 * bpf/sk_lookup.c — inbound capture without NAT (owner: inbound engineer).
 *
 * One sk_lookup program, linked into every pod netns (BPF_LINK_CREATE, pinned per pod). For a TCP SYN
 * that arrives from outside the pod on a captured port it selects the proxy's <-z> listener (registered
 * into bi_listeners by sockops at TCP_LISTEN_CB), so the accepted socket keeps the original destination
 * as its local address: no conntrack, no rewrite. Semantics follow istio-iptables' nat PREROUTING:
 *   -c NIC          : never captured
 *   -k NIC          : treated as outbound: to <-p> when the destination is in -i, else not captured
 *   -e port (15008) : never captured
 *   -b '*' minus -d, or the -b list
 *   IPv6            : only for pods istio calls "IPv6" (CFG_IPV6); otherwise ip6tables has no rules
 * Locally originated connections (pod -> own IP, loopback) never see nat PREROUTING in iptables either,
 * so they pass here; the proxy's hairpin to its own pod IP is handled at connect time (connect4/6).
 * Captured but nobody listens on <-z> => SK_DROP, which the kernel answers with a RST: the connection
 * is refused and never reaches the application unproxied.
 */

/* The event tuple from addresses already loaded (the ctx loads are volatile in the program; see
 * bi_flow_from_sock_ops in common.h). BI_TUPLE/BI_RECORD and friends: common.h. */
#if defined(BPFINIT_EVENTS_HELPERS) && !defined(BI_FLOW_LOOKUP)
static __always_inline void bi_flow_from_lookup(struct flow_tuple *t, struct bpf_sk_lookup *ctx,
                                                const struct bi_addr_key *src, const struct bi_addr_key *dst)
{
    flow_zero(t);
    t->family = src->family;
    t->l4_proto = 6;
    t->src_port = bpf_ntohs((__u16)ctx->remote_port);
    t->dst_port = (__u16)ctx->local_port;
    t->orig_dst_port = t->dst_port;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        t->src_addr[i] = src->addr[i];
        t->dst_addr[i] = dst->addr[i];
        t->orig_dst_addr[i] = dst->addr[i];
    }
}
#define BI_FLOW_LOOKUP(t, ctx, src, dst) bi_flow_from_lookup(&(t), ctx, src, dst)
#elif !defined(BI_FLOW_LOOKUP)
#define BI_FLOW_LOOKUP(t, ctx, src, dst) do { (void)(t); } while (0)
#endif

static __always_inline int bi_is_loopback(const struct bi_addr_key *k)
{
    if (k->family == AF_INET)
        return (bpf_ntohl(k->addr[0]) >> 24) == 127;
    /* ::1 and ::6 (Envoy's v6 passthrough source) */
    return k->addr[0] == 0 && k->addr[1] == 0 && k->addr[2] == 0 &&
           (k->addr[3] == bpf_htonl(1) || k->addr[3] == bpf_htonl(6));
}

/* Select the pod's listener for `slot`; v4 traffic may also go to a dual-stack v6 listener. */
static __always_inline long bi_assign_listener(struct bpf_sk_lookup *ctx, __u32 pod_idx, __u32 slot)
{
    long err = -1;
    struct bi_listener_key key = {};
    key.pod_idx = pod_idx;
    key.slot = slot + (ctx->family == AF_INET6 ? BI_SLOT_V6 : 0);
    struct bpf_sock *sk = (struct bpf_sock *)bi_listeners.lookup(&key);
    if (sk) {
        err = bpf_sk_assign(ctx, sk, 0);
        bpf_sk_release(sk);
    }
    if (err && ctx->family == AF_INET) {
        key.slot = slot + BI_SLOT_V6;
        sk = (struct bpf_sock *)bi_listeners.lookup(&key);
        if (sk) {
            err = bpf_sk_assign(ctx, sk, 0);   /* fails for IPV6_V6ONLY listeners */
            bpf_sk_release(sk);
        }
    }
    return err;
}

int bpfinit_sk_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->protocol != 6)   /* IPPROTO_TCP */
        return SK_PASS;

    struct bi_addr_key dst = {}, src = {};
    __u32 family = ctx->family;
    dst.family = family;
    src.family = family;
    /* volatile loads: see bi_flow_from_sock_ops */
    if (family == AF_INET) {
        dst.addr[0] = *(volatile __u32 *)&ctx->local_ip4;
        src.addr[0] = *(volatile __u32 *)&ctx->remote_ip4;
    } else {
        dst.addr[0] = *(volatile __u32 *)&ctx->local_ip6[0];
        dst.addr[1] = *(volatile __u32 *)&ctx->local_ip6[1];
        dst.addr[2] = *(volatile __u32 *)&ctx->local_ip6[2];
        dst.addr[3] = *(volatile __u32 *)&ctx->local_ip6[3];
        src.addr[0] = *(volatile __u32 *)&ctx->remote_ip6[0];
        src.addr[1] = *(volatile __u32 *)&ctx->remote_ip6[1];
        src.addr[2] = *(volatile __u32 *)&ctx->remote_ip6[2];
        src.addr[3] = *(volatile __u32 *)&ctx->remote_ip6[3];
    }
    struct bi_addr_val *pod = bi_pod_addrs.lookup(&dst);
    if (!pod)
        return SK_PASS;                       /* not a pod address (loopback, other): not ours */
    __u32 pod_idx = pod->pod_idx;
    __u32 addr_flags = pod->flags;
    __u64 cookie = pod->netns_cookie;

    /* Locally originated: source is loopback or one of this pod's own addresses. */
    if (bi_is_loopback(&src))
        return SK_PASS;
    struct bi_addr_val *from = bi_pod_addrs.lookup(&src);
    if (from && from->pod_idx == pod_idx)
        return SK_PASS;

    struct pod_cfg *cfg = pod_by_netns.lookup(&cookie);
    if (!cfg || cfg->pod_idx != pod_idx)
        return SK_PASS;
    /* istio programs no ip6tables rules for a pod that is not "IPv6" (contract §1.5): its v6 inbound
     * reaches the app directly there, so it must here too (the proxy may not even listen on v6). */
    if (family == AF_INET6 && !(cfg->flags & CFG_IPV6))
        return SK_PASS;

    BI_TUPLE(t);
    BI_FLOW_LOOKUP(t, ctx, &src, &dst);
    __u32 port = ctx->local_port;             /* host order */
    __u32 slot = BI_SLOT_INBOUND;
    __u16 target = cfg->inbound_capture_port;

    if (id_member(pod_idx, IFACE_EXCLUDE, ctx->ingress_ifindex)) {
        BI_RECORD(ctx, pod_idx, DIR_INBOUND, VERDICT_BYPASSED, REASON_INTERFACE, t);
        return SK_PASS;
    }
    if (id_member(pod_idx, IFACE_VIRT, ctx->ingress_ifindex)) {
        if (!(addr_flags & BI_ADDR_VIRT_TO_PROXY)) {
            BI_RECORD(ctx, pod_idx, DIR_INBOUND, VERDICT_BYPASSED, REASON_INTERFACE, t);
            return SK_PASS;
        }
        slot = BI_SLOT_PROXY;                 /* istio: -i <nic> [-d cidr] -j ISTIO_REDIRECT */
        target = cfg->proxy_port;
    } else {
        if (!(cfg->flags & (CFG_INBOUND_ALL | CFG_INBOUND_LIST))) {
            BI_RECORD(ctx, pod_idx, DIR_INBOUND, VERDICT_BYPASSED, REASON_NOT_INCLUDED, t);
            return SK_PASS;
        }
        if (port == cfg->inbound_tunnel_port) {
            BI_RECORD(ctx, pod_idx, DIR_INBOUND, VERDICT_BYPASSED, REASON_TUNNEL_PORT, t);
            return SK_PASS;
        }
        if (cfg->flags & CFG_INBOUND_ALL) {
            if (id_member(pod_idx, PORT_IN_EXCLUDE, port)) {
                BI_RECORD(ctx, pod_idx, DIR_INBOUND, VERDICT_BYPASSED, REASON_EXCLUDED_PORT, t);
                return SK_PASS;
            }
        } else if (!id_member(pod_idx, PORT_IN_INCLUDE, port)) {
            BI_RECORD(ctx, pod_idx, DIR_INBOUND, VERDICT_BYPASSED, REASON_NOT_INCLUDED, t);
            return SK_PASS;
        }
    }

    BI_SET_DST_PORT(t, target);
    if (bi_assign_listener(ctx, pod_idx, slot) != 0) {
        BI_RECORD(ctx, pod_idx, DIR_INBOUND, VERDICT_REFUSED, REASON_PROXY_NOT_LISTENING, t);
        return SK_DROP;                       /* kernel sends RST: refused, never delivered unproxied */
    }
    BI_RECORD(ctx, pod_idx, slot == BI_SLOT_PROXY ? DIR_OUTBOUND : DIR_INBOUND,
           slot == BI_SLOT_PROXY ? VERDICT_REDIRECTED : VERDICT_CAPTURED,
           slot == BI_SLOT_PROXY ? REASON_INTERFACE : REASON_NONE, t);
    return SK_PASS;
}

/* sockops, BPF_SOCK_OPS_TCP_LISTEN_CB (called from sockops.c): register the pod's <-z> (and, with -k,
 * <-p>) listener. A later listener on the same port replaces the earlier one; a closed listener leaves
 * the map by itself, so a dead proxy means "refused", never "bypassed". */
static __always_inline void bi_sockops_listen(struct bpf_sock_ops *skops, struct pod_cfg *cfg)
{
    __u32 port = skops->local_port;          /* host order */
    __u32 slot;
    if (port == cfg->inbound_capture_port)
        slot = BI_SLOT_INBOUND;
    else if (port == cfg->proxy_port && (cfg->flags & CFG_VIRT_IFACES))
        slot = BI_SLOT_PROXY;
    else
        return;
    if (skops->family == AF_INET6)
        slot += BI_SLOT_V6;
    struct bi_listener_key key = {};
    key.pod_idx = cfg->pod_idx;
    key.slot = slot;
    long rc = bi_listeners.sock_hash_update(skops, &key, BPF_ANY);   /* (bcc: keep as a statement) */
    if (rc != 0) {
        BI_TUPLE(t);
        BI_FLOW(bi_flow_from_sock_ops, t, skops);
        BI_RECORD(skops, cfg->pod_idx, DIR_INBOUND, VERDICT_REFUSED, REASON_INTERNAL_ERROR, t);
    }
}

/* getsockopt.c fallback (BPFINIT_GETSOCKOPT_FALLBACK): a socket of a bpfinit pod with no outbound
 * record. sk_lookup steering keeps the original destination as the accepted socket's local address,
 * which is exactly what conntrack answers for an accepted socket (the original-direction destination),
 * so SO_ORIGINAL_DST = local address. Only when the kernel itself found nothing. (For a socket the app
 * connected itself conntrack would answer the remote end; nothing asks that of a client socket.) */
static __always_inline int bi_inbound_orig_dst(struct bpf_sockopt *ctx, const struct tuple_key *k,
                                               struct orig_dst *out)
{
    if (ctx->retval == 0)
        return 0;
    __u64 ns = k->netns_cookie;
    struct pod_cfg *cfg = pod_by_netns.lookup(&ns);
    if (!cfg)
        return 0;
    /* conntrack answers for every connection of the pod, captured or not (e.g. straight to <-z> from
     * outside), but istio's IPv4 pods have no ip6tables nat, so no v6 conntrack and no answer */
    if (k->family == AF_INET6 && !(cfg->flags & CFG_IPV6))
        return 0;
    out->family = k->family;
    out->addr_be[0] = k->local_be[0];
    out->addr_be[1] = k->local_be[1];
    out->addr_be[2] = k->local_be[2];
    out->addr_be[3] = k->local_be[3];
    out->port_be = bpf_htons(k->local_port);
    out->redirected = ORIG_INBOUND;
    out->pod_idx = cfg->pod_idx;
    return 1;
}
#define BPFINIT_GETSOCKOPT_FALLBACK(ctx, k, out) bi_inbound_orig_dst(ctx, k, out)
