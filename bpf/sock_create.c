/* cgroup/sock_create (BPF_CGROUP_INET_SOCK_CREATE) and the ping-socket connect guard: the egress guard's
 * socket-type half. Included by bpfinit.c after maps.h/events.h/common.h.
 *
 * The guard's destination checks live in the connect and sendmsg hooks, which the kernel runs only for
 * TCP (also MPTCP: its first subflow is a TCP socket that runs connect4/6, verified on 6.18), UDP and
 * ping sockets. Every other AF_INET/AF_INET6 socket (SOCK_RAW, UDP-Lite whose connect runs no hook, SCTP,
 * L2TP/IP, ...) could reach any destination unseen, so with the guard on its creation is refused:
 * socket() fails with EPERM and one DENIED/socket_type decision is recorded (l4 = the protocol asked
 * for; for SOCK_RAW that is the raw protocol, so "socket_type TCP" means a raw TCP socket).
 *
 * Ping sockets (SOCK_DGRAM + IPPROTO_ICMP/ICMPV6) run connect4/6 but never sendmsg4/6 (verified), so
 * only connected ping sockets can be checked: connect.c hands them to ping_connect_guard below.
 * ICMP has no port, so a destination is allowed only by an item without a port limit (see
 * icmp_listed). Their sendto() stays the documented gap. */

#define SC_SOCK_RAW       3
#define SC_IPPROTO_ICMP   1
#define SC_IPPROTO_TCP    6
#define SC_IPPROTO_UDP    17
#define SC_IPPROTO_ICMPV6 58
#define SC_IPPROTO_MPTCP  262
#define SC_L4_UNKNOWN     255   /* flow_tuple.l4_proto is a u8: protocols above 255 are shown as 255 */

/* The socket kinds whose traffic the connect/sendmsg hooks see. The kernel has already resolved
 * protocol 0 to TCP/UDP when this hook runs; 0 is accepted anyway, as socket() itself accepts it. */
static __always_inline int sock_kind_guarded_elsewhere(__u32 type, __u32 protocol)
{
    if (type == SOCK_STREAM)
        return protocol == SC_IPPROTO_TCP || protocol == 0 || protocol == SC_IPPROTO_MPTCP;
    if (type == SOCK_DGRAM)
        return protocol == SC_IPPROTO_UDP || protocol == 0 ||
               protocol == SC_IPPROTO_ICMP || protocol == SC_IPPROTO_ICMPV6;
    return 0;
}

int bpfinit_sock_create(struct bpf_sock *ctx)
{
    /* ordinary sockets first, before any map lookup: this runs on every socket() in the pod */
    __u32 family = ctx->family, type = ctx->type, protocol = ctx->protocol;
    if ((family != AF_INET && family != AF_INET6) || sock_kind_guarded_elsewhere(type, protocol))
        return 1;
    __u64 cookie = bpf_get_netns_cookie(ctx);
    __u32 uid, gid;
    struct pod_cfg *cfg = guard_subject(cookie, creator_owner_ids(), &uid, &gid);
    if (!cfg)
        return 1;
#if defined(BPFINIT_EVENTS_HELPERS)
    struct flow_tuple t;
    flow_zero(&t);
    t.family = family;
    t.l4_proto = protocol > 255 ? SC_L4_UNKNOWN : protocol;
    t.uid = uid;
    t.gid = gid;
    record(ctx, cookie, cfg->pod_idx, DIR_OUTBOUND, VERDICT_DENIED, REASON_SOCKET_TYPE, &t);
#endif
    return 0;   /* EPERM from socket() */
}

/* ICMP to dst is allowed by an allow-list item without a port limit (CIDR alone, or :0-65535) that
 * contains it. The CIDR LPM gives the most specific listed CIDR's port set, which already holds the
 * ranges of every containing item; a full-range item is stored as one /0 port block, and an LPM lookup
 * whose key prefix stops before the port bits matches only such a block. */
static __always_inline int icmp_listed(__u32 pod_idx, int v6, const __u32 *dst)
{
    __u32 *set = cidr_lookup(v6, pod_idx, CIDR_EGRESS, dst);
    if (!set)
        return 0;
    struct port_key pk = {};
    pk.prefixlen = 64;   /* pod_idx + set id only: no port bits */
    pk.pod_idx_be = bpf_htonl(pod_idx);
    pk.set_be = bpf_htonl(*set);
    return egress_ports.lookup(&pk) != 0;
}

/* connect() of a ping socket under the guard (called by connect.c's connect4/6 for SOCK_DGRAM sockets that
 * are neither UDP nor UDP-Lite; `hook6` is its constant hook family). ICMP is never captured: every echo
 * bypasses the proxy.
 * Exempt as elsewhere: sockets the proxy's uid/gid owns, destinations in the pod, the unspecified address. */
static __always_inline int ping_connect_guard(struct bpf_sock_addr *ctx, const int hook6)
{
    if (ctx->type != SOCK_DGRAM)
        return 1;
    __u32 protocol = ctx->protocol;
    if (protocol != SC_IPPROTO_ICMP && protocol != SC_IPPROTO_ICMPV6)
        return 1;
    __u64 cookie = bpf_get_netns_cookie(ctx);
    __u32 uid, gid;
    struct pod_cfg *cfg = guard_subject(cookie, socket_owner_ids(ctx), &uid, &gid);
    if (!cfg)
        return 1;
    __u32 dst[4] = {};
    int mapped;
    int v6 = sock_addr_dst(ctx, hook6, dst, &mapped);
    if (dst[0] == 0 && (!v6 || (dst[1] == 0 && dst[2] == 0 && dst[3] == 0)))
        return 1;
    if (cidr_lookup(v6, cfg->pod_idx, CIDR_LOCAL, dst))
        return 1;
    if (icmp_listed(cfg->pod_idx, v6, dst))
        return 1;
    record_egress_denied(ctx, cookie, cfg->pod_idx, v6, dst, 0, (__u8)protocol, uid, gid);
    return 0;   /* EPERM from connect() */
}
