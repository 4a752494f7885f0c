/* SPDX-License-Identifier: Apache-2.0 */
/*
 * bpf/dns.c — DNS capture without NAT (owner: inbound+DNS engineer). Needs sk_lookup.c first (BI_RECORD).
 *
 * istio-iptables with --redirect-dns sends UDP and TCP port 53 to the resolv.conf nameservers (to any
 * destination with --capture-all-dns) to the agent's DNS proxy on 15053, after the -o and proxy uid/gid
 * RETURNs. Here, with no NAT rule anywhere:
 *   - UDP sendto/sendmsg: cgroup/sendmsg4|6 rewrites the destination to 127.0.0.1|::1 : <dns_port>;
 *   - UDP and TCP connect: bi_dns_connect4|6(), called by connect.c after istio's rules 1-10;
 *   - replies: cgroup/recvmsg4|6 shows the proxy's answers as coming from the server the application
 *     addressed (resolvers such as glibc drop answers from an unexpected source).
 * The agent sets CFG_DNS_CAPTURE only when istio would program DNS rules (a nameserver was found or
 * --capture-all-dns) and port 53 is not in -o.
 */

/* Decision recording (bpf/events.h). Without the observability helpers it compiles to nothing. */
#ifndef BI_RECORD
#if defined(BPFINIT_EVENTS_HELPERS)
#define BI_TUPLE(t) struct flow_tuple t
#define BI_FLOW(fn, t, ctx) fn(&(t), ctx)
#define BI_SET_DST_PORT(t, port) ((t).dst_port = (port))
#define BI_SET_DST4(t, a, port) flow_set_dst4(&(t), a, port)
#define BI_SET_DST6_LO(t, port) do { __u32 lo6_[4] = {0, 0, 0, bpf_htonl(1)}; flow_set_dst6(&(t), lo6_, port); } while (0)
#define BI_RECORD(ctx, pod_idx, dir, verdict, reason, t) record(ctx, 0, pod_idx, dir, verdict, reason, &(t))
#else
#define BI_TUPLE(t) int t = 0
#define BI_FLOW(fn, t, ctx) do { (void)(t); } while (0)
#define BI_SET_DST_PORT(t, port) do { (void)(t); } while (0)
#define BI_SET_DST4(t, a, port) do { (void)(t); } while (0)
#define BI_SET_DST6_LO(t, port) do { (void)(t); } while (0)
#define BI_RECORD(ctx, pod_idx, dir, verdict, reason, t) do { (void)(t); } while (0)
#endif
#endif

/* flow_from_sock_ops with volatile ctx loads: in an if/else on the family clang otherwise loads through
 * one selected ctx pointer ("dereference of modified ctx ptr", seen on this kernel with bcc 0.26). */
#if defined(BPFINIT_EVENTS_HELPERS) && !defined(BI_FLOW_SOCKOPS_DEFINED)
#define BI_FLOW_SOCKOPS_DEFINED
static __always_inline void bi_flow_from_sock_ops(struct flow_tuple *t, struct bpf_sock_ops *skops)
{
    flow_zero(t);
    __u32 family = *(volatile __u32 *)&skops->family;
    t->family = family;
    t->l4_proto = 6;
    t->src_port = (__u16)*(volatile __u32 *)&skops->local_port;
    t->dst_port = (__u16)bpf_ntohl(*(volatile __u32 *)&skops->remote_port);
    if (family == AF_INET) {
        t->src_addr[0] = *(volatile __u32 *)&skops->local_ip4;
        t->dst_addr[0] = *(volatile __u32 *)&skops->remote_ip4;
    } else {
        t->src_addr[0] = *(volatile __u32 *)&skops->local_ip6[0];
        t->src_addr[1] = *(volatile __u32 *)&skops->local_ip6[1];
        t->src_addr[2] = *(volatile __u32 *)&skops->local_ip6[2];
        t->src_addr[3] = *(volatile __u32 *)&skops->local_ip6[3];
        t->dst_addr[0] = *(volatile __u32 *)&skops->remote_ip6[0];
        t->dst_addr[1] = *(volatile __u32 *)&skops->remote_ip6[1];
        t->dst_addr[2] = *(volatile __u32 *)&skops->remote_ip6[2];
        t->dst_addr[3] = *(volatile __u32 *)&skops->remote_ip6[3];
    }
    t->orig_dst_port = t->dst_port;
    t->orig_dst_addr[0] = t->dst_addr[0];
    t->orig_dst_addr[1] = t->dst_addr[1];
    t->orig_dst_addr[2] = t->dst_addr[2];
    t->orig_dst_addr[3] = t->dst_addr[3];
}
#endif

static __always_inline int bi_dns_is_proxy(__u32 pod_idx)
{
    __u64 ug = bpf_get_current_uid_gid();
    struct id_key k = {};
    k.pod_idx = pod_idx;
    k.kind = ID_PROXY_UID;
    k.value = (__u32)ug;
    if (pod_ids.lookup(&k))
        return 1;
    k.kind = ID_PROXY_GID;
    k.value = (__u32)(ug >> 32);
    return pod_ids.lookup(&k) != 0;
}

static __always_inline int bi_dns_server4(__u32 pod_idx, __u32 addr_be)
{
    struct cidr4_key k = {};
    k.prefixlen = 64 + 32;
    k.pod_idx_be = bpf_htonl(pod_idx);
    k.kind_be = bpf_htonl(CIDR_DNS_SERVER);
    k.addr_be = addr_be;
    return cidr4.lookup(&k) != 0;
}

static __always_inline int bi_dns_server6(__u32 pod_idx, const __u32 *addr_be)
{
    struct cidr6_key k = {};
    k.prefixlen = 64 + 128;
    k.pod_idx_be = bpf_htonl(pod_idx);
    k.kind_be = bpf_htonl(CIDR_DNS_SERVER);
    k.addr_be[0] = addr_be[0];
    k.addr_be[1] = addr_be[1];
    k.addr_be[2] = addr_be[2];
    k.addr_be[3] = addr_be[3];
    return cidr6.lookup(&k) != 0;
}

/* istio's ISTIO_OUTPUT rules before the DNS ones, for UDP (TCP gets them from connect.c's
 * outbound_decide): -c NIC (route), proxy uid/gid (all protocols), owner groups. -o 53 switches DNS
 * capture off in the agent. Returns the bypass reason, or -1 when DNS capture applies. */
static __always_inline int bi_dns_udp_bypass(struct pod_cfg *cfg, int v6, const __u32 *dst)
{
    __u32 idx = cfg->pod_idx;
    __u32 *via;
    if (!v6) {
        struct cidr4_key k4 = {};
        k4.prefixlen = 96;
        k4.pod_idx_be = bpf_htonl(idx);
        k4.kind_be = bpf_htonl(CIDR_ROUTE);
        k4.addr_be = dst[0];
        via = cidr4.lookup(&k4);
    } else {
        struct cidr6_key k6 = {};
        k6.prefixlen = 192;
        k6.pod_idx_be = bpf_htonl(idx);
        k6.kind_be = bpf_htonl(CIDR_ROUTE);
        k6.addr_be[0] = dst[0];
        k6.addr_be[1] = dst[1];
        k6.addr_be[2] = dst[2];
        k6.addr_be[3] = dst[3];
        via = cidr6.lookup(&k6);
    }
    if (via && *via)
        return REASON_INTERFACE;
    if (bi_dns_is_proxy(idx))
        return REASON_PROXY_UID;
    __u64 ug = bpf_get_current_uid_gid();
    struct id_key g = {};
    g.pod_idx = idx;
    g.kind = ID_OWNER_GROUP;
    g.value = (__u32)(ug >> 32);
    int member = pod_ids.lookup(&g) != 0;
    if ((cfg->flags & CFG_OWNER_INCLUDE) ? !member : member)
        return REASON_OWNER_GROUP;
    return -1;
}

/* Is this port-53 destination one istio's ISTIO_OUTPUT_DNS chain would redirect? */
static __always_inline int bi_dns_server_match(struct pod_cfg *cfg, int v6, const __u32 *dst)
{
    if (cfg->flags & CFG_CAPTURE_ALL_DNS)
        return 1;
    return v6 ? bi_dns_server6(cfg->pod_idx, dst) : bi_dns_server4(cfg->pod_idx, dst[0]);
}

/* Remember the server the socket addressed (for recvmsg) and rewrite to the DNS proxy. */
static __always_inline void bi_dns_rewrite(struct bpf_sock_addr *ctx, struct pod_cfg *cfg, int v6,
                                           int mapped, const __u32 *dst, const int hook6)
{
    struct bi_dns_orig orig = {};
    orig.addr[0] = dst[0];
    orig.addr[1] = dst[1];
    orig.addr[2] = dst[2];
    orig.addr[3] = dst[3];
    orig.port = (__u16)ctx->user_port;
    orig.via_port = bpf_htons(cfg->dns_port);
    orig.family = v6 ? AF_INET6 : AF_INET;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    bi_dns_orig.update(&cookie, &orig);
    if (!hook6) {                               /* constant: a v4 hook may not touch user_ip6 */
        *(volatile __u32 *)&ctx->user_ip4 = bpf_htonl(0x7f000001);
    } else {
        *(volatile __u32 *)&ctx->user_ip6[0] = 0;
        *(volatile __u32 *)&ctx->user_ip6[1] = 0;
        *(volatile __u32 *)&ctx->user_ip6[2] = mapped ? bpf_htonl(0xffff) : 0;
        *(volatile __u32 *)&ctx->user_ip6[3] = mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
    }
    *(volatile __u32 *)&ctx->user_port = bpf_htons(cfg->dns_port);
}

/* UDP sendmsg/connect, both families. v4-mapped destinations on AF_INET6 sockets follow the IPv4 rules. */
static __always_inline void bi_dns_udp(struct bpf_sock_addr *ctx, const int hook6)
{
    if (ctx->user_port != bpf_htons(53))
        return;                                 /* cheapest test first: every UDP send runs this */
    __u64 ns = bpf_get_netns_cookie(ctx);
    struct pod_cfg *cfg = pod_by_netns.lookup(&ns);
    if (!cfg || !(cfg->flags & CFG_DNS_CAPTURE))
        return;
    __u32 dst[4] = {};
    int v6 = 0, mapped = 0;
    if (!hook6) {
        dst[0] = ctx->user_ip4;
    } else {
        dst[0] = ctx->user_ip6[0];
        dst[1] = ctx->user_ip6[1];
        dst[2] = ctx->user_ip6[2];
        dst[3] = ctx->user_ip6[3];
        if (dst[0] == 0 && dst[1] == 0 && dst[2] == bpf_htonl(0xffff)) {
            mapped = 1;
            dst[0] = dst[3];
            dst[3] = 0;
            dst[2] = 0;
        } else {
            if (!(cfg->flags & CFG_IPV6))
                return;                         /* no ip6tables rules for an IPv4 pod */
            v6 = 1;
        }
    }
    BI_TUPLE(t);
    if (!hook6)
        BI_FLOW(flow_from_sock_addr4, t, ctx);
    else
        BI_FLOW(flow_from_sock_addr6, t, ctx);
    int why = bi_dns_udp_bypass(cfg, v6, dst);
    if (why >= 0) {
        BI_RECORD(ctx, cfg->pod_idx, DIR_DNS, VERDICT_BYPASSED, why, t);
        return;
    }
    if (!bi_dns_server_match(cfg, v6, dst))
        return;
    bi_dns_rewrite(ctx, cfg, v6, mapped, dst, hook6);
    if (v6)
        BI_SET_DST6_LO(t, cfg->dns_port);
    else
        BI_SET_DST4(t, bpf_htonl(0x7f000001), cfg->dns_port);
    BI_RECORD(ctx, cfg->pod_idx, DIR_DNS, VERDICT_REDIRECTED, REASON_DNS, t);
}

/* TCP and UDP connect: connect.c's outbound_connect calls these at istio's step 11, after its rules
 * 1-10 (-c, -o, passthrough source, proxy uid/gid, owner groups) and before 12-15 (loopback, -x, -q,
 * -i). Returns 1 when it redirected the socket to the DNS proxy. */
static __always_inline int bi_dns_connect(struct bpf_sock_addr *ctx, const int v6)
{
    if (ctx->user_port != bpf_htons(53))
        return 0;
    __u64 ns = bpf_get_netns_cookie(ctx);
    struct pod_cfg *cfg = pod_by_netns.lookup(&ns);
    if (!cfg || !(cfg->flags & CFG_DNS_CAPTURE))
        return 0;
    __u32 dst[4] = {};
    if (v6) {
        dst[0] = ctx->user_ip6[0];
        dst[1] = ctx->user_ip6[1];
        dst[2] = ctx->user_ip6[2];
        dst[3] = ctx->user_ip6[3];
    } else {
        dst[0] = ctx->user_ip4;
    }
    if (!bi_dns_server_match(cfg, v6, dst))
        return 0;
    BI_TUPLE(t);
    if (v6)
        BI_FLOW(flow_from_sock_addr6, t, ctx);
    else
        BI_FLOW(flow_from_sock_addr4, t, ctx);
    bi_dns_rewrite(ctx, cfg, v6, 0, dst, v6);
    if (v6)
        BI_SET_DST6_LO(t, cfg->dns_port);
    else
        BI_SET_DST4(t, bpf_htonl(0x7f000001), cfg->dns_port);
    BI_RECORD(ctx, cfg->pod_idx, DIR_DNS, VERDICT_REDIRECTED, REASON_DNS, t);
    return 1;
}

static __always_inline int bi_dns_connect4(struct bpf_sock_addr *ctx, __u32 pod_idx)
{
    return bi_dns_connect(ctx, 0);
}

static __always_inline int bi_dns_connect6(struct bpf_sock_addr *ctx, __u32 pod_idx)
{
    return bi_dns_connect(ctx, 1);
}

int bpfinit_sendmsg4(struct bpf_sock_addr *ctx)
{
    bi_dns_udp(ctx, 0);
    return 1;
}

int bpfinit_sendmsg6(struct bpf_sock_addr *ctx)
{
    bi_dns_udp(ctx, 1);
    return 1;
}

/* Replies: a datagram from the DNS proxy on a socket we redirected shows the original server. */
int bpfinit_recvmsg4(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip4 != bpf_htonl(0x7f000001))
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct bi_dns_orig *o = bi_dns_orig.lookup(&cookie);
    if (!o || o->family != AF_INET || (__u16)ctx->user_port != o->via_port)
        return 1;
    *(volatile __u32 *)&ctx->user_ip4 = o->addr[0];
    *(volatile __u32 *)&ctx->user_port = o->port;
    return 1;
}

int bpfinit_recvmsg6(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct bi_dns_orig *o = bi_dns_orig.lookup(&cookie);
    if (!o || (__u16)ctx->user_port != o->via_port)
        return 1;
    if (o->family == AF_INET6 && ctx->user_ip6[2] == 0 && ctx->user_ip6[3] == bpf_htonl(1)) {
        *(volatile __u32 *)&ctx->user_ip6[0] = o->addr[0];
        *(volatile __u32 *)&ctx->user_ip6[1] = o->addr[1];
        *(volatile __u32 *)&ctx->user_ip6[2] = o->addr[2];
        *(volatile __u32 *)&ctx->user_ip6[3] = o->addr[3];
        *(volatile __u32 *)&ctx->user_port = o->port;
    } else if (o->family == AF_INET && ctx->user_ip6[2] == bpf_htonl(0xffff) &&
               ctx->user_ip6[3] == bpf_htonl(0x7f000001)) {
        *(volatile __u32 *)&ctx->user_ip6[3] = o->addr[0];         /* v4-mapped socket: ::ffff:<server> */
        *(volatile __u32 *)&ctx->user_port = o->port;
    }
    return 1;
}
