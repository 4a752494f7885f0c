/* SPDX-License-Identifier: Apache-2.0 */
/*
 * bpf/accel.c — optional sockmap acceleration between the application and its proxy (owner: inbound
 * engineer). Off by default; initagent/accel.py turns it on per pod (BI_F_ACCEL) only after a kernel
 * gate and a start-up self-test.
 *
 * sockops (ACTIVE/PASSIVE_ESTABLISHED, called from sockops.c) inserts only app<->proxy loopback sockets:
 * one end is the proxy's <-p>/<-z> port, or the inbound passthrough source 127.0.0.6/::6. Every socket
 * in the map pays for sk_msg on each sendmsg, so nothing else goes in. sk_msg then hands the bytes
 * straight to the peer socket's receive queue; a miss returns SK_PASS (normal TCP path), never a drop.
 */

static __always_inline int bi_is_passthrough(__u32 family, const __u32 *a)
{
    if (family == AF_INET)
        return a[0] == bpf_htonl(0x7f000006);
    return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == bpf_htonl(6);
}

static __always_inline void bi_sockops_established(struct bpf_sock_ops *skops, struct pod_cfg *cfg)
{
    if (!(cfg->flags & CFG_ACCELERATE))
        return;
    struct bi_sock_key key = {};
    key.family = skops->family;
    key.lport = skops->local_port;                    /* host order */
    key.rport = bpf_ntohl(skops->remote_port);        /* network order in the high 16 bits */
    /* Unconditional loads: an if/else makes clang load through a selected ctx pointer, which the
     * verifier rejects. */
    __u32 l4 = skops->local_ip4, r4 = skops->remote_ip4;
    __u32 l0 = skops->local_ip6[0], l1 = skops->local_ip6[1], l2 = skops->local_ip6[2], l3 = skops->local_ip6[3];
    __u32 r0 = skops->remote_ip6[0], r1 = skops->remote_ip6[1], r2 = skops->remote_ip6[2], r3 = skops->remote_ip6[3];
    if (key.family != AF_INET && key.family != AF_INET6)
        return;
    addr_from_words(key.local, key.family, l4, l0, l1, l2, l3);
    addr_from_words(key.remote, key.family, r4, r0, r1, r2, r3);
    if (key.family == AF_INET) {
        /* loopback only: both ends in this netns (127/8, or the pod IP talking to itself) */
        if ((bpf_ntohl(r4) >> 24) != 127 && r4 != l4)
            return;
    } else {
        int same = l0 == r0 && l1 == r1 && l2 == r2 && l3 == r3;
        int lo = r0 == 0 && r1 == 0 && r2 == 0 && r3 == bpf_htonl(1);
        if (!same && !lo && !bi_is_passthrough(AF_INET6, key.remote))
            return;
    }
    __u32 p = cfg->proxy_port, z = cfg->inbound_capture_port;
    int outbound = key.lport == p || key.rport == p;
    int inbound = key.lport == z || key.rport == z ||
                  bi_is_passthrough(key.family, key.local) || bi_is_passthrough(key.family, key.remote);
    if (!outbound && !inbound)
        return;
    long rc = bi_accel_socks.sock_hash_update(skops, &key, BPF_NOEXIST);   /* (bcc: keep as a statement) */
    if (rc == 0) {
        BI_TUPLE(t);
        BI_FLOW(bi_flow_from_sock_ops, t, skops);
        BI_RECORD(skops, cfg->pod_idx, outbound ? DIR_OUTBOUND : DIR_INBOUND, VERDICT_REDIRECTED, REASON_ACCEL, t);
    }
}

int bpfinit_sk_msg(struct sk_msg_md *msg)
{
    struct bi_sock_key peer = {};
    __u32 l4 = msg->local_ip4, r4 = msg->remote_ip4;
    __u32 l0 = msg->local_ip6[0], l1 = msg->local_ip6[1], l2 = msg->local_ip6[2], l3 = msg->local_ip6[3];
    __u32 r0 = msg->remote_ip6[0], r1 = msg->remote_ip6[1], r2 = msg->remote_ip6[2], r3 = msg->remote_ip6[3];
    peer.family = msg->family;
    peer.lport = bpf_ntohl(msg->remote_port);
    peer.rport = msg->local_port;
    addr_from_words(peer.local, peer.family, r4, r0, r1, r2, r3);   /* the peer's local end is our remote */
    addr_from_words(peer.remote, peer.family, l4, l0, l1, l2, l3);
    bi_accel_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
    return SK_PASS;   /* redirected if the peer is in the map; otherwise the normal path, never a drop */
}

/* sockops.c calls this first for every callback (BPFINIT_SOCKOPS_HOOK): the inbound listener
 * registration (sk_lookup.c) and the acceleration insert. Other ops return at once. */
static __always_inline void bi_sockops_hook(struct bpf_sock_ops *skops)
{
    __u32 op = skops->op;
    if (op != BPF_SOCK_OPS_TCP_LISTEN_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
        op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
        return;
    __u64 ns = bpf_get_netns_cookie(skops);
    struct pod_cfg *cfg = pod_by_netns.lookup(&ns);
    if (!cfg)
        return;
    if (op == BPF_SOCK_OPS_TCP_LISTEN_CB)
        bi_sockops_listen(skops, cfg);
    else
        bi_sockops_established(skops, cfg);
}
#define BPFINIT_SOCKOPS_HOOK(skops) bi_sockops_hook(skops)
