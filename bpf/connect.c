/* cgroup/connect4 + cgroup/connect6: outbound TCP capture with istio-iptables' ISTIO_OUTPUT order
 * (istio-capture-contract.md §1.4), and the egress guard for TCP and UDP connects (UDP sendto/sendmsg:
 * dns.c with common.h). Included by bpfinit.c after maps.h/common.h. */

#define ACT_BYPASS   0
#define ACT_REDIRECT 1   /* ISTIO_REDIRECT: to 127.0.0.1:<-p> */
#define ACT_HAIRPIN  2   /* ISTIO_IN_REDIRECT: to 127.0.0.1:<-z> */
#define ACT_DENY     3   /* egress guard: EPERM */

#define IPPROTO_TCP_NUM 6
#define IPPROTO_UDP_NUM 17
#define IPPROTO_UDPLITE_NUM 136   /* UDP for the guard (its connect runs no cgroup hook on 6.18, its sendto does) */
#define NO_ID 0xffffffffu   /* pod_cfg.first_uid/first_gid when the list is empty */
#define DNS_PORT 53

struct out_req {
    int v6;               /* lookup family: 0 = IPv4 (also v4-mapped on AF_INET6 sockets) */
    __u32 dst[4];         /* network order; v4 in dst[0] */
    __u16 dport;          /* host order */
    __u32 uid;
    __u32 gid;
    int src_passthrough;  /* bound to 127.0.0.6 / ::6 */
};

/* The loopback CIDR of rule 12 / the `! -d` of rule 9a: ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR, or ::1/128. */
static __always_inline int in_loopback_cidr(const struct pod_cfg *cfg, const struct out_req *r)
{
    if (!r->v6)
        return (r->dst[0] & cfg->loopback4_mask_be) == cfg->loopback4_addr_be;
    return r->dst[0] == 0 && r->dst[1] == 0 && r->dst[2] == 0 && r->dst[3] == bpf_htonl(1);
}

/* Rule 9 for one id list (-u then -g): the ids are evaluated in order in iptables; see agent.md for why
 * "first id + membership" reproduces the sequence exactly. Returns -1 when no rule matched. */
static __always_inline int owner_rules(const struct pod_cfg *cfg, const struct out_req *r, int is_lo,
                                       __u32 kind, __u32 first, __u32 id, int *reason)
{
    if (first == NO_ID)
        return -1;   /* an empty -u/-g list adds no rules at all */
    int dns = (cfg->flags & CFG_DNS_CAPTURE) != 0;
    /* 9a: hairpin; the uid variant also skips 53 when DNS capture is on */
    int hairpin_ok = is_lo && !in_loopback_cidr(cfg, r) && r->dport != cfg->inbound_tunnel_port &&
                     !(dns && kind == ID_PROXY_UID && r->dport == DNS_PORT);
    if (!(cfg->flags & CFG_INCLUDE_HAS_LOOPBACK)) {
        if (is_lo) {
            /* 9a(first) may hairpin; 9b(first) returns every other id over lo (TCP/53 excepted with DNS) */
            if (id == first && hairpin_ok) {
                *reason = REASON_PROXY_HAIRPIN;
                return ACT_HAIRPIN;
            }
            if (id != first && dns && r->dport == DNS_PORT) {
                /* 9b does not match TCP/53 with DNS capture on: fall through to 9c and later ids */
            } else {
                *reason = (id == first) ? (kind == ID_PROXY_UID ? REASON_PROXY_UID : REASON_PROXY_GID)
                                        : REASON_LOOPBACK;
                return ACT_BYPASS;
            }
        }
    }
    if (id_member(cfg->pod_idx, kind, id)) {
        if (hairpin_ok) {
            *reason = REASON_PROXY_HAIRPIN;
            return ACT_HAIRPIN;
        }
        *reason = kind == ID_PROXY_UID ? REASON_PROXY_UID : REASON_PROXY_GID;
        return ACT_BYPASS;
    }
    return -1;
}

/* Rules 1-10 (everything before DNS); -1 = no decision yet. */
static __always_inline int outbound_decide_early(const struct pod_cfg *cfg, const struct out_req *r, int *reason)
{
    __u32 idx = cfg->pod_idx;
    int is_lo = cidr_lookup(r->v6, idx, CIDR_LOCAL, r->dst) != 0;

    /* 1. -c: `OUTPUT -o <nic> -j RETURN`, before ISTIO_OUTPUT. Local destinations route via lo. */
    if (!is_lo) {
        __u32 *via_excluded = cidr_lookup(r->v6, idx, CIDR_ROUTE, r->dst);
        if (via_excluded && *via_excluded) {
            *reason = REASON_INTERFACE;
            return ACT_BYPASS;
        }
    }
    /* 7. -o ports */
    if (id_member(idx, PORT_OUT_EXCLUDE, r->dport)) {
        *reason = REASON_EXCLUDED_PORT;
        return ACT_BYPASS;
    }
    /* 8. -o lo -s 127.0.0.6 / ::6 */
    if (is_lo && r->src_passthrough) {
        *reason = REASON_PASSTHROUGH_SOURCE;
        return ACT_BYPASS;
    }
    /* 9. proxy uid rules, then gid rules */
    int act = owner_rules(cfg, r, is_lo, ID_PROXY_UID, cfg->first_uid, r->uid, reason);
    if (act >= 0)
        return act;
    act = owner_rules(cfg, r, is_lo, ID_PROXY_GID, cfg->first_gid, r->gid, reason);
    if (act >= 0)
        return act;
    /* 10. owner groups (the socket owner's fsgid, as iptables; see agent.md for supplementary groups) */
    if (owner_group_bypass(cfg, r->gid)) {
        *reason = REASON_OWNER_GROUP;
        return ACT_BYPASS;
    }
    return -1;
}

/* Rules 12-15, after DNS (rule 11, dns.c) had its say. */
static __always_inline int outbound_decide_late(const struct pod_cfg *cfg, const struct out_req *r, int *reason)
{
    __u32 idx = cfg->pod_idx;
    /* 12. loopback CIDR */
    if (in_loopback_cidr(cfg, r)) {
        *reason = REASON_LOOPBACK;
        return ACT_BYPASS;
    }
    /* 13. -x (applies to any -i) */
    if (cidr_lookup(r->v6, idx, CIDR_EXCLUDE, r->dst)) {
        *reason = REASON_EXCLUDED_CIDR;
        return ACT_BYPASS;
    }
    /* 14. -q */
    if (id_member(idx, PORT_OUT_INCLUDE, r->dport)) {
        *reason = REASON_NONE;
        return ACT_REDIRECT;
    }
    /* 15. -i */
    if ((cfg->flags & CFG_INCLUDE_ALL) || cidr_lookup(r->v6, idx, CIDR_INCLUDE, r->dst)) {
        *reason = REASON_NONE;
        return ACT_REDIRECT;
    }
    *reason = REASON_NOT_INCLUDED;
    return ACT_BYPASS;
}

/* Egress guard for a TCP connect: bypasses that leave the pod outside the proxy must be in the
 * allow-list. The reason tells a bypass from the proxy's own traffic; local destinations (e.g. 127.0.0.1
 * with an -o port, where rule 7 comes before the loopback rule 12) and DNS to the resolv.conf
 * nameservers are let through by egress_permitted (common.h). */
static __always_inline int egress_allowed(const struct pod_cfg *cfg, const struct out_req *r, int reason)
{
    if (!(cfg->flags & CFG_EGRESS_GUARD))
        return 1;
    if (reason != REASON_INTERFACE && reason != REASON_EXCLUDED_PORT && reason != REASON_EXCLUDED_CIDR &&
        reason != REASON_NOT_INCLUDED && reason != REASON_OWNER_GROUP)
        return 1;
    return egress_permitted(cfg, r->v6, r->dst, r->dport);
}

/* Egress guard for traffic istio never captures (UDP other than DNS, IPv6 of an IPv4 pod): all of it
 * bypasses the proxy, so only the proxy's own traffic and egress_permitted destinations pass. */
static __always_inline int uncaptured_allowed(const struct pod_cfg *cfg, const struct out_req *r)
{
    if (!(cfg->flags & CFG_EGRESS_GUARD))
        return 1;
    return is_proxy_identity(cfg->pod_idx, r->uid, r->gid) || egress_permitted(cfg, r->v6, r->dst, r->dport);
}

static __always_inline void fill_ids(struct bpf_sock_addr *ctx, struct out_req *r)
{
    __u64 ug = socket_owner_ids(ctx);   /* the socket's owner, as iptables -m owner sees it (common.h) */
    r->uid = (__u32)ug;
    r->gid = (__u32)(ug >> 32);
}

static __always_inline void emit(void *ctx, __u64 cookie, const struct pod_cfg *cfg, const struct out_req *r,
                                 int verdict, int reason, int act, __u8 l4_proto)
{
    struct flow_tuple t;
    flow_zero(&t);
    t.family = r->v6 ? AF_INET6 : AF_INET;
    t.l4_proto = l4_proto;
    t.orig_dst_port = r->dport;
    t.dst_port = r->dport;
    t.uid = r->uid;
    t.gid = r->gid;
    t.orig_dst_addr[0] = t.dst_addr[0] = r->dst[0];
    t.orig_dst_addr[1] = t.dst_addr[1] = r->dst[1];
    t.orig_dst_addr[2] = t.dst_addr[2] = r->dst[2];
    t.orig_dst_addr[3] = t.dst_addr[3] = r->dst[3];
    if (verdict == VERDICT_REDIRECTED) {
        __u16 to = act == ACT_HAIRPIN ? cfg->inbound_capture_port : cfg->proxy_port;
        if (r->v6) {
            __u32 lo6[4] = {0, 0, 0, bpf_htonl(1)};
            flow_set_dst6(&t, lo6, to);
        } else {
            flow_set_dst4(&t, LOOPBACK4_BE, to);
        }
    }
    record(ctx, cookie, cfg->pod_idx, DIR_OUTBOUND, verdict, reason, &t);
}

/* The whole outbound decision for one connect. Returns ACT_*; -1 = DNS redirected it (dns.c). */
static __always_inline int outbound_connect(struct bpf_sock_addr *ctx, const struct pod_cfg *cfg,
                                            const struct out_req *r, int is6, int *reason)
{
    int act = outbound_decide_early(cfg, r, reason);
    if (act < 0) {
#if __has_include("dns.c")
        /* 11. DNS (TCP here; UDP connect too, below): redirected to the DNS proxy by dns.c */
        if (bi_dns_connect(ctx, is6))   /* is6: the hook's family; v4-mapped servers follow the v4 rules */
            return -1;
#endif
        if (ctx->type == SOCK_STREAM)   /* ISTIO_REDIRECT is TCP only */
            act = outbound_decide_late(cfg, r, reason);
    }
    if (ctx->type != SOCK_STREAM) {
        /* rules 1-10 ran for UDP only to give DNS istio's order; the rest of UDP is never captured */
        if (!uncaptured_allowed(cfg, r)) {
            *reason = REASON_EGRESS_POLICY;
            return ACT_DENY;
        }
        return ACT_BYPASS;
    }
    if (act == ACT_BYPASS && !egress_allowed(cfg, r, *reason)) {
        *reason = REASON_EGRESS_POLICY;
        return ACT_DENY;
    }
    return act;
}

/* Carry out the decision: EPERM, leave alone, or rewrite the destination to the proxy. */
static __always_inline int apply_decision(struct bpf_sock_addr *ctx, struct bpf_sock *sk, __u64 cookie,
                                          const struct pod_cfg *cfg, const struct out_req *r, __u16 port_be,
                                          int act, int reason, const int is6, int mapped)
{
    if (act < 0)
        return 1;   /* dns.c redirected it */
    if (act == ACT_DENY) {
        emit(ctx, cookie, cfg, r, VERDICT_DENIED, reason, act, ctx->type == SOCK_STREAM ? IPPROTO_TCP_NUM
                                                                                      : IPPROTO_UDP_NUM);
        return 0;   /* EPERM */
    }
    if (act == ACT_BYPASS) {
        if (ctx->type == SOCK_STREAM)   /* UDP bypasses are not counted: only its denials (guard) are */
            emit(ctx, cookie, cfg, r, VERDICT_BYPASSED, reason, act, IPPROTO_TCP_NUM);
        return 1;
    }
    remember_orig_dst(sk, r->v6, r->dst, port_be, act == ACT_HAIRPIN ? ORIG_HAIRPIN : ORIG_OUTBOUND, cfg->pod_idx);
    sock_addr_to_loopback(ctx, is6, mapped, act == ACT_HAIRPIN ? cfg->inbound_capture_port : cfg->proxy_port);
    emit(ctx, cookie, cfg, r, VERDICT_REDIRECTED, reason, act, IPPROTO_TCP_NUM);
    return 1;
}

/* Bound to the inbound passthrough source (127.0.0.6, ::6, or ::ffff:127.0.0.6)? */
static __always_inline int bound_to_passthrough(struct bpf_sock *sk, const int is6, int mapped)
{
    if (!sk)
        return 0;
    if (!is6)
        return sk->src_ip4 == PASSTHROUGH4_BE;
    __u32 src[4] = {sk->src_ip6[0], sk->src_ip6[1], sk->src_ip6[2], sk->src_ip6[3]};
    if (mapped)
        return is_v4_mapped(src) && src[3] == PASSTHROUGH4_BE;
    return src[0] == 0 && src[1] == 0 && src[2] == 0 && src[3] == bpf_htonl(6);
}

/* connect4 / connect6; `is6` is a constant (the verifier's per-hook ctx rules). */
static __always_inline int outbound_hook(struct bpf_sock_addr *ctx, const int is6)
{
    if (ctx->type != SOCK_STREAM && ctx->type != SOCK_DGRAM)
        return 1;
    /* ICMP ping sockets are SOCK_DGRAM too and run this hook on connect (not on sendto): istio's rules do
     * not treat them as UDP; the guard checks them apart (sock_create.c) */
    if (ctx->type == SOCK_DGRAM && ctx->protocol != IPPROTO_UDP_NUM && ctx->protocol != IPPROTO_UDPLITE_NUM)
#if __has_include("sock_create.c")
        return ping_connect_guard(ctx, is6);
#else
        return 1;
#endif
    __u64 cookie = bpf_get_netns_cookie(ctx);
    struct pod_cfg *cfg = pod_by_netns.lookup(&cookie);
    if (!cfg)
        return 1;
    /* one load of ctx->sk: clang otherwise keeps &ctx->sk and loads through it ("modified ctx ptr") */
    struct bpf_sock *sk = ctx->sk;
    struct out_req r = {};
    int mapped;
    r.v6 = sock_addr_dst(ctx, is6, r.dst, &mapped);
    __u16 port_be = (__u16)ctx->user_port;
    r.dport = bpf_ntohs(port_be);
    fill_ids(ctx, &r);
    if (r.v6 && !(cfg->flags & CFG_IPV6)) {
        /* istio programs no ip6tables rules for an IPv4 pod: its IPv6 traffic bypasses the proxy */
        if (uncaptured_allowed(cfg, &r))
            return 1;
        emit(ctx, cookie, cfg, &r, VERDICT_DENIED, REASON_EGRESS_POLICY, ACT_DENY,
             ctx->type == SOCK_STREAM ? IPPROTO_TCP_NUM : IPPROTO_UDP_NUM);
        return 0;    /* EPERM */
    }
    r.src_passthrough = bound_to_passthrough(sk, is6, mapped);
    int reason = REASON_NONE;
    int act = outbound_connect(ctx, cfg, &r, is6, &reason);
    return apply_decision(ctx, sk, cookie, cfg, &r, port_be, act, reason, is6, mapped);
}

int bpfinit_connect4(struct bpf_sock_addr *ctx)
{
    return outbound_hook(ctx, 0);
}

int bpfinit_connect6(struct bpf_sock_addr *ctx)
{
    return outbound_hook(ctx, 1);
}
