/* SPDX-License-Identifier: Apache-2.0 */
/*
 * bpf/dns.c — DNS capture without NAT (owner: inbound+DNS engineer). Shared helpers: common.h.
 *
 * istio-iptables with --redirect-dns sends UDP and TCP port 53 to the resolv.conf nameservers (to any
 * destination with --capture-all-dns) to the agent's DNS proxy on 15053, after the -o and proxy uid/gid
 * RETURNs. Here, with no NAT rule anywhere:
 *   - UDP sendto/sendmsg: cgroup/sendmsg4|6 rewrites the destination to 127.0.0.1|::1 : <dns_port>
 *     (the same hooks then apply the egress guard to every other UDP datagram: common.h);
 *   - UDP and TCP connect: bi_dns_connect(), called by connect.c after istio's rules 1-10;
 *   - replies: cgroup/recvmsg4|6 shows the proxy's answers as coming from the server the application
 *     addressed (resolvers such as glibc drop answers from an unexpected source).
 * The agent sets CFG_DNS_CAPTURE only when istio would program DNS rules (a nameserver was found or
 * --capture-all-dns) and port 53 is not in -o.
 */

/* istio's ISTIO_OUTPUT rules before the DNS ones, for UDP (TCP gets them from connect.c's
 * outbound_decide_early): -c NIC (route), proxy uid/gid (all protocols), owner groups. -o 53 switches
 * DNS capture off in the agent. Returns the bypass reason, or -1 when DNS capture applies. */
static __always_inline int bi_dns_udp_bypass(struct bpf_sock_addr *ctx, struct pod_cfg *cfg, int v6,
                                             const __u32 *dst)
{
    __u32 idx = cfg->pod_idx;
    __u32 *via = cidr_lookup(v6, idx, CIDR_ROUTE, dst);
    if (via && *via)
        return REASON_INTERFACE;
    __u64 ug = socket_owner_ids(ctx);
    __u32 gid = (__u32)(ug >> 32);
    if (id_member(idx, ID_PROXY_UID, (__u32)ug) || id_member(idx, ID_PROXY_GID, gid))
        return REASON_PROXY_UID;
    if (owner_group_bypass(cfg, gid))
        return REASON_OWNER_GROUP;
    return -1;
}

/* Is this port-53 destination one istio's ISTIO_OUTPUT_DNS chain would redirect? */
static __always_inline int bi_dns_server_match(struct pod_cfg *cfg, int v6, const __u32 *dst)
{
    if (cfg->flags & CFG_CAPTURE_ALL_DNS)
        return 1;
    return cidr_lookup(v6, cfg->pod_idx, CIDR_DNS_SERVER, dst) != 0;
}

/* Remember the server the socket addressed (for recvmsg), rewrite to the DNS proxy and record it. */
static __always_inline void bi_dns_redirect(struct bpf_sock_addr *ctx, struct pod_cfg *cfg, int v6,
                                            int mapped, const __u32 *dst, const int hook6)
{
    BI_TUPLE(t);
    BI_FLOW_SOCK_ADDR(t, ctx, hook6);         /* before the rewrite: what the application asked for */
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
    sock_addr_to_loopback(ctx, hook6, mapped, cfg->dns_port);
    if (v6)
        BI_SET_DST6_LO(t, cfg->dns_port);
    else
        BI_SET_DST4(t, LOOPBACK4_BE, cfg->dns_port);
    BI_RECORD(ctx, cfg->pod_idx, DIR_DNS, VERDICT_REDIRECTED, REASON_DNS, t);
}

#define BI_DNS_NOT_DNS    (-1)   /* not port 53, or DNS capture off: nothing to do here */
#define BI_DNS_REDIRECTED (-2)   /* sent to the DNS proxy (recorded) */

/* UDP sendmsg, both families. v4-mapped destinations on AF_INET6 sockets follow the IPv4 rules. Returns
 * BI_DNS_REDIRECTED, BI_DNS_NOT_DNS, or the reason istio's rules let this DNS datagram bypass capture
 * (the caller records that once the egress guard had its say, so a denied datagram counts once). */
static __always_inline int bi_dns_udp(struct bpf_sock_addr *ctx, struct pod_cfg *cfg, const int hook6)
{
    if (ctx->user_port != bpf_htons(53) || !(cfg->flags & CFG_DNS_CAPTURE))
        return BI_DNS_NOT_DNS;
    __u32 dst[4] = {};
    int mapped;
    int v6 = sock_addr_dst(ctx, hook6, dst, &mapped);
    if (v6 && !(cfg->flags & CFG_IPV6))
        return BI_DNS_NOT_DNS;                  /* no ip6tables rules for an IPv4 pod */
    int why = bi_dns_udp_bypass(ctx, cfg, v6, dst);
    if (why >= 0)
        return why;
    if (!bi_dns_server_match(cfg, v6, dst))
        return BI_DNS_NOT_DNS;
    bi_dns_redirect(ctx, cfg, v6, mapped, dst, hook6);
    return BI_DNS_REDIRECTED;
}

/* sendmsg4 / sendmsg6: runs for every UDP datagram sent WITH an address (sendto, sendmsg with a name).
 * DNS capture first (istio's rule 11), then the egress guard (connect.c's rules for UDP: common.h). */
static __always_inline int bi_udp_sendmsg(struct bpf_sock_addr *ctx, const int hook6)
{
    __u64 ns = bpf_get_netns_cookie(ctx);
    struct pod_cfg *cfg = pod_by_netns.lookup(&ns);
    if (!cfg)
        return 1;
    int dns = bi_dns_udp(ctx, cfg, hook6);
    if (dns == BI_DNS_REDIRECTED)
        return 1;
    if (!udp_send_guard(ctx, cfg, ns, hook6))
        return 0;                               /* EPERM, DENIED recorded */
    if (dns >= 0) {
        BI_TUPLE(t);
        BI_FLOW_SOCK_ADDR(t, ctx, hook6);
        BI_RECORD(ctx, cfg->pod_idx, DIR_DNS, VERDICT_BYPASSED, dns, t);
    }
    return 1;
}

/* TCP and UDP connect: connect.c's outbound_connect calls these at istio's step 11, after its rules
 * 1-10 (-c, -o, passthrough source, proxy uid/gid, owner groups) and before 12-15 (loopback, -x, -q,
 * -i). IPv4 servers through an AF_INET6 socket follow the IPv4 rules. Returns 1 when it redirected the
 * socket to the DNS proxy. */
static __always_inline int bi_dns_connect(struct bpf_sock_addr *ctx, const int hook6)
{
    struct bpf_sock *sk = ctx->sk;   /* one load: see connect.c */
    if (ctx->user_port != bpf_htons(53))
        return 0;
    __u64 ns = bpf_get_netns_cookie(ctx);
    struct pod_cfg *cfg = pod_by_netns.lookup(&ns);
    if (!cfg || !(cfg->flags & CFG_DNS_CAPTURE))
        return 0;
    __u32 dst[4] = {};
    int mapped;
    int v6 = sock_addr_dst(ctx, hook6, dst, &mapped);
    if (!bi_dns_server_match(cfg, v6, dst))
        return 0;
    /* a connected socket: getpeername() shows the server (and the DNS proxy may ask SO_ORIGINAL_DST) */
    remember_orig_dst(sk, v6, dst, bpf_htons(53), ORIG_DNS, cfg->pod_idx);
    bi_dns_redirect(ctx, cfg, v6, mapped, dst, hook6);
    return 1;
}

int bpfinit_sendmsg4(struct bpf_sock_addr *ctx)
{
    return bi_udp_sendmsg(ctx, 0);
}

int bpfinit_sendmsg6(struct bpf_sock_addr *ctx)
{
    return bi_udp_sendmsg(ctx, 1);
}

/* Replies: a datagram from the DNS proxy on a socket we redirected shows the original server. */
int bpfinit_recvmsg4(struct bpf_sock_addr *ctx)
{
    if (ctx->user_ip4 != LOOPBACK4_BE)
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
               ctx->user_ip6[3] == LOOPBACK4_BE) {
        *(volatile __u32 *)&ctx->user_ip6[3] = o->addr[0];         /* v4-mapped socket: ::ffff:<server> */
        *(volatile __u32 *)&ctx->user_port = o->port;
    }
    return 1;
}
