/* bpfinit: helpers shared by every hook. bpfinit.c includes this after maps.h and events.h, so the
 * helpers may use the maps and record() (verdict/reason/dir numbers live in events.h). */
#ifndef BPFINIT_COMMON_H
#define BPFINIT_COMMON_H

#define AF_INET   2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOCK_DGRAM  2
#define SOL_IP     0
#define SOL_IPV6  41
#define SO_ORIGINAL_DST 80

#define LOOPBACK4_BE    0x0100007fu   /* 127.0.0.1, network order on a little-endian host */
#define PASSTHROUGH4_BE 0x0600007fu   /* 127.0.0.6 */

/* ::ffff:a.b.c.d (network order words): IPv4 through an AF_INET6 socket. */
static __always_inline int is_v4_mapped(const __u32 *a)
{
    return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

/* An address from words already loaded from a ctx (load them unconditionally: a load inside an if/else
 * on the family makes clang load through a selected ctx pointer, which the verifier rejects). */
static __always_inline void addr_from_words(__u32 *dst, __u32 family, __u32 a4,
                                            __u32 w0, __u32 w1, __u32 w2, __u32 w3)
{
    if (family == AF_INET) {
        dst[0] = a4;
        return;
    }
    dst[0] = w0;
    dst[1] = w1;
    dst[2] = w2;
    dst[3] = w3;
}

/* ------------------------------------------------------------------ per-pod lists (maps.h) */

/* Longest-prefix match of a full address in the pod's CIDR list `kind` (IPv4 in dst[0]). */
static __always_inline __u32 *cidr_lookup(int v6, __u32 pod_idx, __u32 kind, const __u32 *dst)
{
    if (!v6) {
        struct cidr4_key k4 = {};
        k4.prefixlen = 64 + 32;
        k4.pod_idx_be = bpf_htonl(pod_idx);
        k4.kind_be = bpf_htonl(kind);
        k4.addr_be = dst[0];
        return cidr4.lookup(&k4);
    }
    struct cidr6_key k6 = {};
    k6.prefixlen = 64 + 128;
    k6.pod_idx_be = bpf_htonl(pod_idx);
    k6.kind_be = bpf_htonl(kind);
    k6.addr_be[0] = dst[0];
    k6.addr_be[1] = dst[1];
    k6.addr_be[2] = dst[2];
    k6.addr_be[3] = dst[3];
    return cidr6.lookup(&k6);
}

/* Is `value` in the pod's exact-match list `kind` (ids, ports, interface indexes)? */
static __always_inline int id_member(__u32 pod_idx, __u32 kind, __u32 value)
{
    struct id_key k = {};
    k.pod_idx = pod_idx;
    k.kind = kind;
    k.value = value;
    return pod_ids.lookup(&k) != 0;
}

/* istio's owner-group rule (step 10): outside the include list, or inside the exclude list, bypasses. */
static __always_inline int owner_group_bypass(const struct pod_cfg *cfg, __u32 gid)
{
    int member = id_member(cfg->pod_idx, ID_OWNER_GROUP, gid);
    return (cfg->flags & CFG_OWNER_INCLUDE) ? !member : member;
}

/* ------------------------------------------------------------------ sock_addr hooks (connect, sendmsg) */

/* Remember where a socket we redirect was going (orig_by_sock): getpeername.c shows it to the app,
 * sockops.c publishes it for the proxy's SO_ORIGINAL_DST. `kind` is ORIG_* (maps.h). */
static __always_inline void remember_orig_dst(struct bpf_sock *sk, int v6, const __u32 *dst, __u16 port_be,
                                              __u16 kind, __u32 pod_idx)
{
    if (!sk)
        return;
    struct orig_dst *od = orig_by_sock.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!od)
        return;
    od->family = v6 ? AF_INET6 : AF_INET;
    od->addr_be[0] = dst[0];
    od->addr_be[1] = dst[1];
    od->addr_be[2] = dst[2];
    od->addr_be[3] = dst[3];
    od->port_be = port_be;
    od->redirected = kind;
    od->pod_idx = pod_idx;
}

/* The destination the application asked for, into dst (network order, IPv4 in dst[0]). Returns 1 for
 * IPv6 proper, 0 for IPv4, including IPv4 through an AF_INET6 socket (then *mapped = 1): the iptables
 * rules, not the ip6tables ones, apply to it. `hook6` must be a constant: the verifier rejects any
 * access to user_ip6 in a *4 hook (and user_ip4 in a *6 hook), even on a dead path. */
static __always_inline int sock_addr_dst(struct bpf_sock_addr *ctx, const int hook6, __u32 *dst, int *mapped)
{
    *mapped = 0;
    if (!hook6) {
        dst[0] = ctx->user_ip4;
        return 0;
    }
    dst[0] = ctx->user_ip6[0];
    dst[1] = ctx->user_ip6[1];
    dst[2] = ctx->user_ip6[2];
    dst[3] = ctx->user_ip6[3];
    if (!is_v4_mapped(dst))
        return 1;
    *mapped = 1;
    dst[0] = dst[3];
    dst[2] = 0;
    dst[3] = 0;
    return 0;
}

/* Send the socket to a loopback port of its own family: 127.0.0.1, ::1, or ::ffff:127.0.0.1 for IPv4 on
 * an AF_INET6 socket. Volatile stores: clang must not merge two 32-bit ctx stores (verifier). */
static __always_inline void sock_addr_to_loopback(struct bpf_sock_addr *ctx, const int hook6, int mapped,
                                                  __u16 port)
{
    if (!hook6) {
        *(volatile __u32 *)&ctx->user_ip4 = LOOPBACK4_BE;
    } else {
        *(volatile __u32 *)&ctx->user_ip6[0] = 0;
        *(volatile __u32 *)&ctx->user_ip6[1] = 0;
        *(volatile __u32 *)&ctx->user_ip6[2] = mapped ? bpf_htonl(0x0000ffff) : 0;
        *(volatile __u32 *)&ctx->user_ip6[3] = mapped ? LOOPBACK4_BE : bpf_htonl(1);
    }
    *(volatile __u32 *)&ctx->user_port = bpf_htons(port);
}

/* ------------------------------------------------------------------ egress guard (connect.c, dns.c) */

#define GUARD_DNS_PORT 53
#define GUARD_TCP_ESTABLISHED 1   /* bpf_sock.state of a connected UDP socket too */

/* Is dst:dport in the pod's --egress-allow list? The CIDR LPM gives the port-set id of the most specific
 * listed CIDR (its set already holds the ports of every containing rule), a second LPM the port. */
static __always_inline int egress_listed(__u32 pod_idx, int v6, const __u32 *dst, __u16 dport)
{
    __u32 *set = cidr_lookup(v6, pod_idx, CIDR_EGRESS, dst);
    if (!set)
        return 0;
    struct port_key pk = {};
    pk.prefixlen = 64 + 16;
    pk.pod_idx_be = bpf_htonl(pod_idx);
    pk.set_be = bpf_htonl(*set);
    pk.port_be = bpf_htons(dport);
    return egress_ports.lookup(&pk) != 0;
}

/* What the guard lets through whatever the list says: destinations that stay in the pod (127/8, ::1,
 * the pod's own addresses, and the unspecified address, which the kernel delivers locally) and DNS to
 * the resolv.conf nameservers (CIDR_DNS_SERVER rows exist whenever the guard is on). */
static __always_inline int egress_permitted(const struct pod_cfg *cfg, int v6, const __u32 *dst, __u16 dport)
{
    __u32 idx = cfg->pod_idx;
    if (dst[0] == 0 && (!v6 || (dst[1] == 0 && dst[2] == 0 && dst[3] == 0)))
        return 1;
    if (cidr_lookup(v6, idx, CIDR_LOCAL, dst))
        return 1;
    if (dport == GUARD_DNS_PORT && cidr_lookup(v6, idx, CIDR_DNS_SERVER, dst))
        return 1;
    return egress_listed(idx, v6, dst, dport);
}

/* The proxy's own traffic (-u / -g members) is never checked: it is the mesh's egress. */
static __always_inline int is_proxy_identity(__u32 pod_idx, __u32 uid, __u32 gid)
{
    return id_member(pod_idx, ID_PROXY_UID, uid) || id_member(pod_idx, ID_PROXY_GID, gid);
}

/* One DENIED decision (count + sampled event), with the destination as the lookups saw it: IPv4 for
 * v4-mapped addresses on AF_INET6 sockets, as the TCP path reports them. */
static __always_inline void record_egress_denied(void *ctx, __u64 cookie, __u32 pod_idx, int v6,
                                                 const __u32 *dst, __u16 dport, __u8 l4_proto,
                                                 __u32 uid, __u32 gid)
{
#if defined(BPFINIT_EVENTS_HELPERS)
    struct flow_tuple t;
    flow_zero(&t);
    t.family = v6 ? AF_INET6 : AF_INET;
    t.l4_proto = l4_proto;
    t.dst_port = t.orig_dst_port = dport;
    t.uid = uid;
    t.gid = gid;
    t.orig_dst_addr[0] = t.dst_addr[0] = dst[0];
    t.orig_dst_addr[1] = t.dst_addr[1] = v6 ? dst[1] : 0;
    t.orig_dst_addr[2] = t.dst_addr[2] = v6 ? dst[2] : 0;
    t.orig_dst_addr[3] = t.dst_addr[3] = v6 ? dst[3] : 0;
    record(ctx, cookie, pod_idx, DIR_OUTBOUND, VERDICT_DENIED, REASON_EGRESS_POLICY, &t);
#endif
}

/* A send to the peer the UDP socket is connected to: connect4/6 already decided it. The kernel runs
 * sendmsg hooks only for sends with an address, but an AF_INET6 socket connected to a v4-mapped peer
 * goes through udp_sendmsg with the peer as address on EVERY send; without this, each such send would
 * be decided (and a denial counted) again. */
static __always_inline int sent_to_connected_peer(struct bpf_sock_addr *ctx, const int hook6)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk || sk->state != GUARD_TCP_ESTABLISHED)
        return 0;
    if ((__u16)sk->dst_port != (__u16)ctx->user_port)
        return 0;
    if (!hook6)
        return sk->dst_ip4 == ctx->user_ip4;
    return sk->dst_ip6[0] == ctx->user_ip6[0] && sk->dst_ip6[1] == ctx->user_ip6[1] &&
           sk->dst_ip6[2] == ctx->user_ip6[2] && sk->dst_ip6[3] == ctx->user_ip6[3];
}

/* ------------------------------------------------------------------ whose socket (iptables -m owner) */

/* iptables' owner match compares the fsuid/fsgid of the credentials the socket's FILE was opened with
 * (sk->sk_socket->file->f_cred), not the ids of the task calling connect()/sendmsg() now. They differ
 * after a setuid between socket() and connect(), for a socket handed to another process, and in a setuid
 * binary (fsuid follows the euid; bpf_get_current_uid_gid() gives the real ids). The agent passes the
 * running kernel's field offsets, from its BTF (initagent/owner.py), and these helpers follow the same
 * pointers. Without the offsets (no BTF, or lockdown forbids reading kernel memory), or if a read fails,
 * the calling task's real ids stand in. Both return gid << 32 | uid in init_user_ns, the form
 * bpf_get_current_uid_gid() has. */
#ifdef BI_OWNER_FROM_FILE
static __always_inline int bi_cred_fs_ids(__u64 cred, __u64 *ids)
{
    __u32 fsuid = 0, fsgid = 0;
    if (!cred || bpf_probe_read_kernel(&fsuid, sizeof(fsuid), (void *)(cred + BI_CRED_FSUID_OFF)) < 0 ||
        bpf_probe_read_kernel(&fsgid, sizeof(fsgid), (void *)(cred + BI_CRED_FSGID_OFF)) < 0)
        return 0;
    *ids = (__u64)fsgid << 32 | fsuid;
    return 1;
}

static __always_inline int bi_read_ptr(__u64 *out, __u64 from, __u32 offset)
{
    return from && bpf_probe_read_kernel(out, sizeof(*out), (void *)(from + offset)) == 0 && *out;
}
#endif

/* The owner of the socket a sock_addr hook (connect, sendmsg) runs for. The hook's kernel context
 * (struct bpf_sock_addr_kern) starts with the struct sock pointer. */
static __always_inline __u64 socket_owner_ids(struct bpf_sock_addr *ctx)
{
#ifdef BI_OWNER_FROM_FILE
    __u64 sk = 0, sock = 0, file = 0, cred = 0, ids = 0;
    if (bpf_probe_read_kernel(&sk, sizeof(sk), (void *)((char *)ctx + BI_SA_KERN_SK_OFF)) == 0 &&
        bi_read_ptr(&sock, sk, BI_SK_SOCKET_OFF) && bi_read_ptr(&file, sock, BI_SOCKET_FILE_OFF) &&
        bi_read_ptr(&cred, file, BI_FILE_CRED_OFF) && bi_cred_fs_ids(cred, &ids))
        return ids;
#endif
    return bpf_get_current_uid_gid();
}

/* The owner a socket being created (cgroup/sock_create) will have: its file is opened right after this
 * hook, with the creating task's current credentials. */
static __always_inline __u64 creator_owner_ids(void)
{
#ifdef BI_OWNER_FROM_FILE
    __u64 cred = 0, ids = 0;
    if (bi_read_ptr(&cred, bpf_get_current_task(), BI_TASK_CRED_OFF) && bi_cred_fs_ids(cred, &ids))
        return ids;
#endif
    return bpf_get_current_uid_gid();
}

/* The socket's owner as a subject of the egress guard: its pod's config when the guard is on for that pod
 * and the owner (`ug`, from the helpers above) is not the proxy (the proxy's own traffic is the mesh's
 * egress), else NULL. */
static __always_inline struct pod_cfg *guard_subject(__u64 cookie, __u64 ug, __u32 *uid, __u32 *gid)
{
    struct pod_cfg *cfg = pod_by_netns.lookup(&cookie);
    if (!cfg || !(cfg->flags & CFG_EGRESS_GUARD))
        return 0;
    *uid = (__u32)ug;
    *gid = (__u32)(ug >> 32);
    if (is_proxy_identity(cfg->pod_idx, *uid, *gid))
        return 0;
    return cfg;
}

/* The guard for one UDP datagram sent with an address (sendmsg4/6). UDP is never captured (DNS aside,
 * which the caller handled), so every such send bypasses the proxy. Returns 1 to let it go, 0 for EPERM
 * (after recording the denial). */
static __always_inline int udp_send_guard(struct bpf_sock_addr *ctx, const struct pod_cfg *cfg, __u64 cookie,
                                          const int hook6)
{
    if (!(cfg->flags & CFG_EGRESS_GUARD))
        return 1;
    if (sent_to_connected_peer(ctx, hook6))
        return 1;
    __u64 ug = socket_owner_ids(ctx);
    __u32 uid = (__u32)ug, gid = (__u32)(ug >> 32);
    if (is_proxy_identity(cfg->pod_idx, uid, gid))
        return 1;
    __u32 dst[4] = {};
    int mapped;
    int v6 = sock_addr_dst(ctx, hook6, dst, &mapped);
    __u16 dport = bpf_ntohs((__u16)ctx->user_port);
    if (egress_permitted(cfg, v6, dst, dport))
        return 1;
    record_egress_denied(ctx, cookie, cfg->pod_idx, v6, dst, dport, 17, uid, gid);
    return 0;
}

/* ------------------------------------------------------------------ decision recording (events.h) */
/* Used by sk_lookup.c, dns.c and accel.c. Without the observability helpers they compile to nothing. */
#if defined(BPFINIT_EVENTS_HELPERS)
#define BI_TUPLE(t) struct flow_tuple t
#define BI_FLOW(fn, t, ctx) fn(&(t), ctx)
#define BI_SET_DST_PORT(t, port) ((t).dst_port = (port))
#define BI_SET_DST4(t, a, port) flow_set_dst4(&(t), a, port)
#define BI_SET_DST6_LO(t, port) do { __u32 lo6_[4] = {0, 0, 0, bpf_htonl(1)}; flow_set_dst6(&(t), lo6_, port); } while (0)
#define BI_RECORD(ctx, pod_idx, dir, verdict, reason, t) record(ctx, 0, pod_idx, dir, verdict, reason, &(t))
/* sock_addr hooks: the wrapper that matches the (constant) hook family */
#define BI_FLOW_SOCK_ADDR(t, ctx, hook6) \
    do { if (!(hook6)) flow_from_sock_addr4(&(t), ctx); else flow_from_sock_addr6(&(t), ctx); } while (0)

/* flow_from_sock_ops with volatile ctx loads: in an if/else on the family clang otherwise loads through
 * one selected ctx pointer ("dereference of modified ctx ptr", seen on this kernel with bcc 0.26). */
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
#else
#define BI_TUPLE(t) int t = 0
#define BI_FLOW(fn, t, ctx) do { (void)(t); } while (0)
#define BI_SET_DST_PORT(t, port) do { (void)(t); } while (0)
#define BI_SET_DST4(t, a, port) do { (void)(t); } while (0)
#define BI_SET_DST6_LO(t, port) do { (void)(t); } while (0)
#define BI_RECORD(ctx, pod_idx, dir, verdict, reason, t) do { (void)(t); } while (0)
#define BI_FLOW_SOCK_ADDR(t, ctx, hook6) do { (void)(t); } while (0)
#endif

#endif
