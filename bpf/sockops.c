/* sockops: at TCP_CONNECT_CB of a redirected socket (the 4-tuple is chosen, the SYN not yet sent), publish
 * its original destination under the 4-tuple the proxy's accepted socket will see. Not later: with TCP Fast
 * Open the proxy's listener queues the child at the SYN, and the proxy may accept() and ask SO_ORIGINAL_DST
 * before the app's ACTIVE_ESTABLISHED (tests/datapath/test_fastopen.py holds the SYN-ACK back to show it).
 * Everything else returns at once. */

static __always_inline void tuple_from_skops(struct bpf_sock_ops *skops, struct tuple_key *k)
{
    k->netns_cookie = bpf_get_netns_cookie(skops);
    /* the proxy's local side is our remote side */
    k->local_port = (__u16)bpf_ntohl(skops->remote_port);
    k->remote_port = (__u16)skops->local_port;
    if (skops->family == AF_INET) {
        k->family = AF_INET;
        k->local_be[0] = skops->remote_ip4;
        k->remote_be[0] = skops->local_ip4;
        return;
    }
    __u32 r0 = skops->remote_ip6[0], r1 = skops->remote_ip6[1], r2 = skops->remote_ip6[2], r3 = skops->remote_ip6[3];
    __u32 l0 = skops->local_ip6[0], l1 = skops->local_ip6[1], l2 = skops->local_ip6[2], l3 = skops->local_ip6[3];
    if (r0 == 0 && r1 == 0 && r2 == bpf_htonl(0x0000ffff)) {
        k->family = AF_INET;   /* v4-mapped: the proxy sees an IPv4 connection */
        k->local_be[0] = r3;
        /* the IPv4 source: a v4-mapped socket's local IPv6 address is only filled in after tcp_connect() */
        k->remote_be[0] = skops->local_ip4;
        return;
    }
    k->family = AF_INET6;
    k->local_be[0] = r0; k->local_be[1] = r1; k->local_be[2] = r2; k->local_be[3] = r3;
    k->remote_be[0] = l0; k->remote_be[1] = l1; k->remote_be[2] = l2; k->remote_be[3] = l3;
}

int bpfinit_sockops(struct bpf_sock_ops *skops)
{
#ifdef BPFINIT_SOCKOPS_HOOK
    BPFINIT_SOCKOPS_HOOK(skops);   /* other parts (inbound LISTEN_CB, accel) hook in here */
#endif
    if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
        return 1;
    struct bpf_sock *sk = skops->sk;
    if (!sk)
        return 1;
    struct tuple_key k = {};
    struct orig_dst *od = orig_by_sock.sk_storage_get(sk, 0, 0);
    if (!od || !od->redirected) {
        /* A direct (unredirected) connection could reuse a 4-tuple of an old redirected one:
         * forget any stale answer so the proxy never gets a wrong original destination. */
        __u16 rport = (__u16)bpf_ntohl(skops->remote_port);
        __u64 cookie = bpf_get_netns_cookie(skops);
        struct pod_cfg *cfg = pod_by_netns.lookup(&cookie);
        if (cfg && (rport == cfg->proxy_port || rport == cfg->inbound_capture_port)) {
            tuple_from_skops(skops, &k);
            orig_by_tuple.delete(&k);
        }
        return 1;
    }
    tuple_from_skops(skops, &k);
    struct orig_dst val = *od;
    orig_by_tuple.update(&k, &val);
    return 1;
}
