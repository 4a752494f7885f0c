/* cgroup/getsockopt: answer SO_ORIGINAL_DST (SOL_IP/80, SOL_IPV6/80) for the proxy's accepted socket of a
 * redirected connection, as conntrack would. Anything else returns at once, untouched (never write
 * optlen for other options: big-buffer callers such as iptables-legacy depend on it). */

struct sa_in4 {
    __u16 family;
    __u16 port_be;
    __u32 addr_be;
    __u8 zero[8];
};
struct sa_in6 {
    __u16 family;
    __u16 port_be;
    __u32 flowinfo;
    __u32 addr_be[4];
    __u32 scope_id;
};

int bpfinit_getsockopt(struct bpf_sockopt *ctx)
{
    if (ctx->optname != SO_ORIGINAL_DST)
        return 1;
    if (ctx->level != SOL_IP && ctx->level != SOL_IPV6)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    struct tuple_key k = {};
    k.netns_cookie = bpf_get_netns_cookie(ctx);
    k.local_port = (__u16)sk->src_port;
    k.remote_port = bpf_ntohs((__u16)sk->dst_port);
    if (sk->family == AF_INET) {
        k.family = AF_INET;
        k.local_be[0] = sk->src_ip4;
        k.remote_be[0] = sk->dst_ip4;
    } else {
        __u32 s0 = sk->src_ip6[0], s1 = sk->src_ip6[1], s2 = sk->src_ip6[2], s3 = sk->src_ip6[3];
        __u32 d0 = sk->dst_ip6[0], d1 = sk->dst_ip6[1], d2 = sk->dst_ip6[2], d3 = sk->dst_ip6[3];
        if (s0 == 0 && s1 == 0 && s2 == bpf_htonl(0x0000ffff)) {
            k.family = AF_INET;
            k.local_be[0] = s3;
            k.remote_be[0] = d3;
        } else {
            k.family = AF_INET6;
            k.local_be[0] = s0; k.local_be[1] = s1; k.local_be[2] = s2; k.local_be[3] = s3;
            k.remote_be[0] = d0; k.remote_be[1] = d1; k.remote_be[2] = d2; k.remote_be[3] = d3;
        }
    }
    struct orig_dst *od = orig_by_tuple.lookup(&k);
#ifdef BPFINIT_GETSOCKOPT_FALLBACK
    struct orig_dst inbound_od = {};   /* inbound (sk_lookup.c): the local address is the original dst */
    if (!od && BPFINIT_GETSOCKOPT_FALLBACK(ctx, &k, &inbound_od))
        od = &inbound_od;
#endif
    if (!od)
        return 1;
    void *optval = ctx->optval;
    void *optval_end = ctx->optval_end;
    if (ctx->level == SOL_IP) {
        if (od->family != AF_INET)
            return 1;
        struct sa_in4 *sa = optval;
        if ((void *)(sa + 1) > optval_end)
            return 1;
        sa->family = AF_INET;
        sa->port_be = od->port_be;
        sa->addr_be = od->addr_be[0];
        __builtin_memset(sa->zero, 0, sizeof(sa->zero));
        ctx->optlen = sizeof(*sa);
    } else {
        if (od->family != AF_INET6)
            return 1;
        struct sa_in6 *sa = optval;
        if ((void *)(sa + 1) > optval_end)
            return 1;
        sa->family = AF_INET6;
        sa->port_be = od->port_be;
        sa->flowinfo = 0;
        sa->addr_be[0] = od->addr_be[0];
        sa->addr_be[1] = od->addr_be[1];
        sa->addr_be[2] = od->addr_be[2];
        sa->addr_be[3] = od->addr_be[3];
        sa->scope_id = 0;
        ctx->optlen = sizeof(*sa);
    }
    /* keep clang from merging the two 32-bit ctx stores into one 64-bit store (verifier rejects it) */
    asm volatile("" ::: "memory");
    ctx->retval = 0;
    return 1;
}
