/* SPDX-License-Identifier: Apache-2.0 */
/*
 * bpf/accel.c — optional sockmap acceleration between the application and its proxy (owner: inbound
 * engineer). Off by default; initagent/accel.py turns it on per pod (BI_F_ACCEL) only after a kernel
 * gate and a start-up self-test.
 *
 * sockops (ACTIVE/PASSIVE_ESTABLISHED, called from sockops.c) inserts two kinds of sockets:
 *  - app<->proxy loopback sockets: one end is the proxy's <-p>/<-z> port, or the inbound passthrough
 *    source 127.0.0.6/::6;
 *  - with --accelerate-pod-to-pod in both pods, connections between two pods on this node: the
 *    sidecar-to-sidecar hop, which then skips both pods' stacks, the veth pair and the node's path between
 *    them (the CNI's datapath, policy, shaping and capture see the handshake, not the bytes: hence opt-in).
 * Every socket in the map pays for sk_msg on each sendmsg, so nothing else goes in. sk_msg then hands the
 * bytes straight to the peer socket's receive queue; a miss returns SK_PASS (normal TCP path), never a drop.
 */

static __always_inline int bi_is_passthrough(__u32 family, const __u32 *a)
{
    if (family == AF_INET)
        return a[0] == bpf_htonl(0x7f000006);
    return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == bpf_htonl(6);
}

/* The key of one end: its own 4-tuple. An IPv4 connection on a dual-stack (AF_INET6) socket, as every
 * `bind :::port` app accepts, is keyed as IPv4, so it meets its AF_INET peer (the proxy) in the map. */
static __always_inline int bi_sock_key_fill(struct bi_sock_key *key, __u64 netns_cookie, __u32 family,
                                            __u32 lport, __u32 rport,
                                            __u32 l4, __u32 l0, __u32 l1, __u32 l2, __u32 l3,
                                            __u32 r4, __u32 r0, __u32 r1, __u32 r2, __u32 r3)
{
    key->netns_cookie = netns_cookie;
    key->lport = lport;
    key->rport = rport;
    if (family == AF_INET6 && l0 == 0 && l1 == 0 && l2 == bpf_htonl(0xffff) &&
        r0 == 0 && r1 == 0 && r2 == bpf_htonl(0xffff)) {
        family = AF_INET;
        l4 = l3;
        r4 = r3;
    }
    if (family != AF_INET && family != AF_INET6)
        return -1;
    key->family = family;
    addr_from_words(key->local, family, l4, l0, l1, l2, l3);
    addr_from_words(key->remote, family, r4, r0, r1, r2, r3);
    return 0;
}

/* Both ends are in this netns, so the connection runs over lo: either end on 127/8 or ::1 (the inbound
 * proxy dials the pod IP from 127.0.0.6), the passthrough source, or the pod IP talking to itself. */
static __always_inline int bi_on_loopback(const struct bi_sock_key *key)
{
    if (key->family == AF_INET)
        return (bpf_ntohl(key->remote[0]) >> 24) == 127 || (bpf_ntohl(key->local[0]) >> 24) == 127 ||
               key->remote[0] == key->local[0];
    const __u32 *l = key->local, *r = key->remote;
    int same = l[0] == r[0] && l[1] == r[1] && l[2] == r[2] && l[3] == r[3];
    int lo = (r[0] == 0 && r[1] == 0 && r[2] == 0 && r[3] == bpf_htonl(1)) ||
             (l[0] == 0 && l[1] == 0 && l[2] == 0 && l[3] == bpf_htonl(1));
    return same || lo || bi_is_passthrough(AF_INET6, r) || bi_is_passthrough(AF_INET6, l);
}

#if defined(BPFINIT_EVENTS_HELPERS)
/* A flow for the acceleration's events from a sockhash key: the socket's own key (its local end is the
 * source), or, from sk_msg, its peer's key (the peer's remote end is the source). */
static __always_inline void bi_flow_from_key(struct flow_tuple *t, const struct bi_sock_key *key, int peer)
{
    flow_zero(t);
    t->family = key->family;
    t->l4_proto = OBS_IPPROTO_TCP;
    t->src_port = peer ? key->rport : key->lport;
    t->dst_port = t->orig_dst_port = peer ? key->lport : key->rport;
    for (int i = 0; i < 4; i++) {
        t->src_addr[i] = peer ? key->remote[i] : key->local[i];
        t->dst_addr[i] = t->orig_dst_addr[i] = peer ? key->local[i] : key->remote[i];
    }
}
static __always_inline void bi_flow_from_own_key(struct flow_tuple *t, const struct bi_sock_key *key)
{
    bi_flow_from_key(t, key, 0);
}
static __always_inline void bi_flow_from_peer_key(struct flow_tuple *t, const struct bi_sock_key *key)
{
    bi_flow_from_key(t, key, 1);
}
#endif

/* The pod that owns a non-loopback peer address, if it is another pod on this node that accelerates to
 * other pods too (--accelerate-pod-to-pod): its netns cookie, else 0. */
static __always_inline __u64 bi_accel_pod_peer_netns(const struct bi_sock_key *key, const __u32 *peer_addr)
{
    struct bi_addr_key a = {};
    a.family = key->family;
    a.addr[0] = peer_addr[0]; a.addr[1] = peer_addr[1]; a.addr[2] = peer_addr[2]; a.addr[3] = peer_addr[3];
    struct bi_addr_val *pod = bi_pod_addrs.lookup(&a);
    if (!pod)
        return 0;
    __u64 ns = pod->netns_cookie;
    __u32 idx = pod->pod_idx;
    if (ns == key->netns_cookie)
        return 0;
    struct pod_cfg *cfg = pod_by_netns.lookup(&ns);
    if (!cfg || cfg->pod_idx != idx || !(cfg->flags & CFG_ACCELERATE) || !(cfg->flags & CFG_ACCEL_POD_TO_POD))
        return 0;
    return ns;
}

static __always_inline void bi_sockops_established(struct bpf_sock_ops *skops, struct pod_cfg *cfg)
{
    if (!(cfg->flags & CFG_ACCELERATE))
        return;
    struct bi_sock_key key = {};
    /* Unconditional loads: an if/else makes clang load through a selected ctx pointer, which the
     * verifier rejects. Ports: local in host order, remote in network order in the high 16 bits. */
    __u32 l4 = skops->local_ip4, r4 = skops->remote_ip4;
    __u32 l0 = skops->local_ip6[0], l1 = skops->local_ip6[1], l2 = skops->local_ip6[2], l3 = skops->local_ip6[3];
    __u32 r0 = skops->remote_ip6[0], r1 = skops->remote_ip6[1], r2 = skops->remote_ip6[2], r3 = skops->remote_ip6[3];
    __u32 snd0 = skops->snd_nxt, rcv0 = skops->rcv_nxt;
    if (bi_sock_key_fill(&key, bpf_get_netns_cookie(skops), skops->family, skops->local_port,
                         bpf_ntohl(skops->remote_port),
                         l4, l0, l1, l2, l3, r4, r0, r1, r2, r3) < 0)
        return;
    int outbound, pod_peer = 0;
    if (bi_on_loopback(&key)) {
        __u32 p = cfg->proxy_port, z = cfg->inbound_capture_port;
        outbound = key.lport == p || key.rport == p;
        int inbound = key.lport == z || key.rport == z ||
                      bi_is_passthrough(key.family, key.local) || bi_is_passthrough(key.family, key.remote);
        if (!outbound && !inbound)
            return;
    } else {
        if (!(cfg->flags & CFG_ACCEL_POD_TO_POD) || !bi_accel_pod_peer_netns(&key, key.remote))
            return;
        pod_peer = 1;
        outbound = skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB;
    }
    /* Bytes already went by TCP (TCP Fast Open data in the SYN): redirecting the later ones would let
     * them overtake those, so this connection stays on TCP (its peer's sk_msg then misses, see below). */
    if (skops->data_segs_out || skops->data_segs_in) {
        BI_TUPLE(t);
        BI_FLOW(bi_flow_from_own_key, t, &key);
        BI_RECORD(skops, cfg->pod_idx, outbound ? DIR_OUTBOUND : DIR_INBOUND, VERDICT_REDIRECTED,
                  REASON_ACCEL_TCP_PATH, t);
        return;
    }
    /* The state exists before the socket enters the map, so sk_msg can always pin it to TCP on a miss (an
     * allocation there, in atomic context, could fail and leave a later redirect free to overtake). */
    struct bpf_sock *sk = skops->sk;
    if (!sk)
        return;
    struct bi_accel_state *st = bi_accel_tcp_path.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!st)
        return;
    if (pod_peer) {
        /* what the peer's handshake must have recorded: our rcv_nxt is its snd_nxt and vice versa */
        st->pod_peer = outbound ? 1 : 2;
        st->peer_snd0 = rcv0;
        st->peer_rcv0 = snd0;
    }
    long rc = bi_accel_socks.sock_hash_update(skops, &key, BPF_NOEXIST);   /* (bcc: keep as a statement) */
    if (rc == 0) {
        struct bi_accel_sk_info info = {};
        info.addr = (__u64)skops->sk;
        info.snd0 = snd0;
        info.rcv0 = rcv0;
        bi_accel_sk_addr.update(&key, &info);
        BI_TUPLE(t);
        BI_FLOW(bi_flow_from_sock_ops, t, skops);
        BI_RECORD(skops, cfg->pod_idx, outbound ? DIR_OUTBOUND : DIR_INBOUND, VERDICT_REDIRECTED, REASON_ACCEL, t);
    }
}

/* The kernel queues redirected bytes on the peer without checking its receive buffer (it counts them in
 * sk_rmem_alloc but charges only the global TCP limit; cilium#6431): a writer would never block, and an app
 * could park any amount of kernel memory in its proxy's socket. So a message that would leave the peer
 * holding more than BI_ACCEL_QUEUE_MAX unread takes the TCP path instead, and with it the rest of the
 * connection: TCP's window sees the same sk_rmem_alloc, closes, and the writer blocks as it would
 * without acceleration. Without the offset (no kernel BTF) there is no bound here, and the agent's
 * self-test finds out. */
#define BI_ACCEL_QUEUE_MAX (8 << 20)   /* per receiving socket; TCP's own default ceiling is 6 MiB */
static __always_inline int bi_peer_has_room(struct bi_accel_sk_info *info, __u32 size)
{
#ifdef BI_SK_RMEM_ALLOC_OFF
    if (!info)
        return 0;
    int unread = 0;
    if (bpf_probe_read_kernel(&unread, sizeof(unread), (void *)(info->addr + BI_SK_RMEM_ALLOC_OFF)) < 0)
        return 0;
    return unread >= 0 && (__u64)unread + size <= BI_ACCEL_QUEUE_MAX;
#else
    return 1;
#endif
}

/* Whether this message may be redirected to `peer` (filled with our netns): a loopback peer needs room;
 * a pod-to-pod peer is keyed by its own pod's netns, and must be the socket our handshake met. */
static __always_inline int bi_may_redirect(struct bi_sock_key *peer, struct bi_accel_state *st, __u32 size)
{
    if (bi_on_loopback(peer)) {
#ifdef BI_SK_RMEM_ALLOC_OFF
        return bi_peer_has_room(bi_accel_sk_addr.lookup(peer), size);
#else
        return 1;
#endif
    }
    if (!st || !st->pod_peer)
        return 0;
    __u64 ns = bi_accel_pod_peer_netns(peer, peer->local);
    if (!ns)
        return 0;
    peer->netns_cookie = ns;
    struct bi_accel_sk_info *info = bi_accel_sk_addr.lookup(peer);
    if (!info || info->snd0 != st->peer_snd0 || info->rcv0 != st->peer_rcv0)
        return 0;
    return bi_peer_has_room(info, size);
}

int bpfinit_sk_msg(struct sk_msg_md *msg)
{
    struct bpf_sock *sk = msg->sk;
    if (!sk)
        return SK_PASS;
    struct bi_accel_state *st = bi_accel_tcp_path.sk_storage_get(sk, 0, 0);
    if (st && st->tcp_sent)
        return SK_PASS;        /* some bytes went by TCP: keep the order, stay on TCP */
    struct bi_sock_key peer = {};
    __u32 size = msg->size;
    __u32 l4 = msg->local_ip4, r4 = msg->remote_ip4;
    __u32 l0 = msg->local_ip6[0], l1 = msg->local_ip6[1], l2 = msg->local_ip6[2], l3 = msg->local_ip6[3];
    __u32 r0 = msg->remote_ip6[0], r1 = msg->remote_ip6[1], r2 = msg->remote_ip6[2], r3 = msg->remote_ip6[3];
    __u64 own_ns = bpf_get_netns_cookie(msg);
    /* the peer's key: its local end is our remote one; same netns for loopback (never another pod's
     * socket), the owning pod's netns for a pod-to-pod peer */
    if (bi_sock_key_fill(&peer, own_ns, msg->family, bpf_ntohl(msg->remote_port), msg->local_port,
                         r4, r0, r1, r2, r3, l4, l0, l1, l2, l3) == 0 &&
        bi_may_redirect(&peer, st, size) &&
        bi_accel_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS) == SK_PASS)
        return SK_PASS;   /* redirected into the peer's receive queue */
    /* A miss (the peer's PASSIVE_ESTABLISHED has not run yet, e.g. behind TCP_DEFER_ACCEPT, or it is gone,
     * or it is not the socket our handshake met) or a peer holding too much unread: this message takes the
     * normal path, never a drop, and so does every later one. (sockops created the state with the entry;
     * creating it here covers a socket put in the map by an older program.) */
    if (!st)
        st = bi_accel_tcp_path.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (st)
        st->tcp_sent = 1;
    struct pod_cfg *cfg = pod_by_netns.lookup(&own_ns);
    if (cfg && peer.family) {
        int outbound = st && st->pod_peer ? st->pod_peer == 1
                                          : peer.lport == cfg->proxy_port || peer.rport == cfg->proxy_port;
        BI_TUPLE(t);
        BI_FLOW(bi_flow_from_peer_key, t, &peer);
        BI_RECORD(msg, cfg->pod_idx, outbound ? DIR_OUTBOUND : DIR_INBOUND, VERDICT_REDIRECTED,
                  REASON_ACCEL_TCP_PATH, t);
    }
    return SK_PASS;
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
