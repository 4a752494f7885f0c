/* cgroup/getpeername4 + cgroup/getpeername6: getpeername() fidelity for redirected connections.
 * Included by bpfinit.c after maps.h/common.h and connect.c.
 *
 * istio-iptables REDIRECTs with conntrack NAT, so an app that connected to 10.96.0.10:8080 still sees
 * that address as its peer. connect4/6 rewrite the destination itself to 127.0.0.1:<-p> (or <-z> for
 * the proxy's hairpin), so without this hook getpeername() would show the proxy. connect.c keeps the
 * original destination per socket (orig_by_sock); here it is put back into the answer.
 *
 * The answer is rewritten only while the socket's real peer is still the redirect target: a socket
 * whose redirected connect failed and which then connected elsewhere keeps its stale entry, and must
 * see its true peer. Sockets without an entry (everything not redirected, the proxy's own sockets,
 * its accepted sockets: sk storage is not cloned on accept) return at once. DNS that dns.c sent to the
 * DNS proxy over TCP (or connected UDP) shows its server too (ORIG_DNS). */

/* Is this the loopback address connect.c redirected to (127.0.0.1, ::1, ::ffff:127.0.0.1)? */
static __always_inline int gp_peer_is_redirect_target(const int hook6, const __u32 *peer)
{
    if (!hook6)
        return peer[0] == LOOPBACK4_BE;
    if (is_v4_mapped(peer))
        return peer[3] == LOOPBACK4_BE;
    return peer[0] == 0 && peer[1] == 0 && peer[2] == 0 && peer[3] == bpf_htonl(1);
}

/* Write `addr`:`port_be` (family `family`) as the peer. Volatile stores: clang must not merge two 32-bit
 * ctx stores (verifier). */
static __always_inline void gp_write_peer(struct bpf_sock_addr *ctx, const int hook6, __u32 family,
                                          const __u32 *addr, __u16 port_be)
{
    if (!hook6) {
        if (family != AF_INET)
            return;   /* cannot happen on an AF_INET socket; never write a wrong address */
        *(volatile __u32 *)&ctx->user_ip4 = addr[0];
    } else if (family == AF_INET) {
        /* an AF_INET6 socket that connected to a v4-mapped address */
        *(volatile __u32 *)&ctx->user_ip6[0] = 0;
        *(volatile __u32 *)&ctx->user_ip6[1] = 0;
        *(volatile __u32 *)&ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
        *(volatile __u32 *)&ctx->user_ip6[3] = addr[0];
    } else {
        *(volatile __u32 *)&ctx->user_ip6[0] = addr[0];
        *(volatile __u32 *)&ctx->user_ip6[1] = addr[1];
        *(volatile __u32 *)&ctx->user_ip6[2] = addr[2];
        *(volatile __u32 *)&ctx->user_ip6[3] = addr[3];
    }
    *(volatile __u32 *)&ctx->user_port = port_be;
}

/* `hook6` is a constant (the verifier's per-hook ctx rules). Always returns 1: never fails the call. */
static __always_inline int getpeername_hook(struct bpf_sock_addr *ctx, const int hook6)
{
    struct bpf_sock *sk = ctx->sk;   /* one load: see connect.c */
    if (!sk)
        return 1;
    __u32 peer[4] = {};
    if (!hook6) {
        peer[0] = ctx->user_ip4;
    } else {
        peer[0] = ctx->user_ip6[0];
        peer[1] = ctx->user_ip6[1];
        peer[2] = ctx->user_ip6[2];
        peer[3] = ctx->user_ip6[3];
    }
    if (!gp_peer_is_redirect_target(hook6, peer))
        return 1;   /* most calls: a real peer, nothing of ours */
    struct orig_dst *od = orig_by_sock.sk_storage_get(sk, 0, 0);
    if (!od || !od->redirected)
        return 1;
    __u64 cookie = bpf_get_netns_cookie(ctx);
    struct pod_cfg *cfg = pod_by_netns.lookup(&cookie);
    if (!cfg || cfg->pod_idx != od->pod_idx)
        return 1;
    __u16 target = od->redirected == ORIG_HAIRPIN ? cfg->inbound_capture_port :
                   od->redirected == ORIG_DNS ? cfg->dns_port : cfg->proxy_port;
    if ((__u16)ctx->user_port == bpf_htons(target))
        gp_write_peer(ctx, hook6, od->family, od->addr_be, od->port_be);
    return 1;
}

int bpfinit_getpeername4(struct bpf_sock_addr *ctx)
{
    return getpeername_hook(ctx, 0);
}

int bpfinit_getpeername6(struct bpf_sock_addr *ctx)
{
    return getpeername_hook(ctx, 1);
}
