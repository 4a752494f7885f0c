/* bpfinit: every map, in one place. Layouts here are mirrored by initagent/podconfig.py (ctypes):
 * change both together. Sections are owned by different parts; keep them marked.
 * Ports are host order unless the name ends in _be. */
#ifndef BPFINIT_MAPS_H
#define BPFINIT_MAPS_H

#include "events.h"   /* types half (verdicts, reasons, flow_tuple); helpers come after BPFINIT_MAPS_DONE */

/* ===== core (agent / outbound; owner: init agent core) ===== */

/* pod_cfg.flags */
#define CFG_INCLUDE_ALL          (1u << 0)  /* -i '*' */
#define CFG_INCLUDE_HAS_LOOPBACK (1u << 1)  /* a -i CIDR is loopback: no `-o lo ! --uid-owner -j RETURN` rules */
#define CFG_OWNER_INCLUDE        (1u << 2)  /* ISTIO_OUTBOUND_OWNER_GROUPS is a list: only those gids are captured */
#define CFG_IPV6                 (1u << 3)  /* the pod is "IPv6" for istio (ip6tables rules exist) */
#define CFG_EGRESS_GUARD         (1u << 4)  /* --egress-allow present */
#define CFG_DNS_CAPTURE          (1u << 5)  /* DNS capture effective (owner: DNS) */
#define CFG_CAPTURE_ALL_DNS      (1u << 6)  /* --capture-all-dns (owner: DNS) */
#define CFG_ACCELERATE           (1u << 7)  /* sockmap acceleration (owner: accel) */
#define CFG_INBOUND_ALL          (1u << 8)  /* -b '*' (owner: inbound) */
#define CFG_INBOUND_LIST         (1u << 9)  /* -b list (owner: inbound) */
#define CFG_ACCEL_POD_TO_POD     (1u << 10) /* --accelerate-pod-to-pod: also between pods on this node (owner: accel) */

struct pod_cfg {
    __u32 pod_idx;
    __u32 flags;
    __u16 proxy_port;            /* -p */
    __u16 inbound_capture_port;  /* -z */
    __u16 inbound_tunnel_port;   /* -e */
    __u16 dns_port;              /* 15053 */
    __u32 first_uid;             /* first -u, host (init_user_ns) id; 0xffffffff = empty list */
    __u32 first_gid;             /* first -g, host id */
    __u32 loopback4_addr_be;     /* ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR */
    __u32 loopback4_mask_be;
    __u32 reserved[8];           /* room for the other parts without an ABI break */
};

/* netns cookie -> config. Programs return at once for netns without an entry. */
BPF_F_TABLE("hash", __u64, struct pod_cfg, pod_by_netns, 16384, BPF_F_NO_PREALLOC);

/* pod_idx -> who the pod is (for status and gc). */
struct pod_info {
    __u64 netns_cookie;
    __u64 cgroup_id;        /* inode of the pod cgroup v2 dir */
    __u64 netns_ino;
    __u64 created_ns;       /* CLOCK_REALTIME at setup */
    __u32 setup_pid;
    __u32 committed;        /* 1 once pod_by_netns points at this idx */
    __u8  config_hash[16];  /* digest of the effective config (idempotent re-runs) */
};
BPF_F_TABLE("hash", __u32, struct pod_info, pod_registry, 16384, BPF_F_NO_PREALLOC);

/* CIDR lists: LPM tries keyed {prefixlen, pod_idx, kind, addr}; prefixlen = 64 + CIDR length. */
#define CIDR_LOCAL    1   /* addresses that route via lo: 127/8, ::1, the pod's own addresses */
#define CIDR_EXCLUDE  2   /* -x */
#define CIDR_INCLUDE  3   /* -i */
#define CIDR_ROUTE    4   /* main-table routes; value 1 = through a -c excluded interface */
#define CIDR_EGRESS   5   /* --egress-allow; value = port-set id */
/* kinds >= 16 are free for the other parts */

struct cidr4_key {
    __u32 prefixlen;
    __u32 pod_idx_be;
    __u32 kind_be;
    __u32 addr_be;
};
struct cidr6_key {
    __u32 prefixlen;
    __u32 pod_idx_be;
    __u32 kind_be;
    __u32 addr_be[4];
};
BPF_F_TABLE("lpm_trie", struct cidr4_key, __u32, cidr4, 1048576, BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct cidr6_key, __u32, cidr6, 1048576, BPF_F_NO_PREALLOC);

/* Exact-match lists: {pod_idx, kind, value} -> u32 (1). */
#define ID_PROXY_UID     1   /* -u (host id) */
#define ID_PROXY_GID     2   /* -g (host id) */
#define ID_OWNER_GROUP   3   /* owner groups (include or exclude list, see CFG_OWNER_INCLUDE) */
#define PORT_OUT_EXCLUDE 4   /* -o */
#define PORT_OUT_INCLUDE 5   /* -q */
/* kinds >= 16 are free for the other parts */
struct id_key {
    __u32 pod_idx;
    __u32 kind;
    __u32 value;
};
BPF_F_TABLE("hash", struct id_key, __u32, pod_ids, 1048576, BPF_F_NO_PREALLOC);

/* Egress guard port sets: LPM over {pod_idx, set_id, port}; prefixlen = 64 + bits of the port block. */
struct port_key {
    __u32 prefixlen;
    __u32 pod_idx_be;
    __u32 set_be;
    __u16 port_be;
    __u16 pad;
};
BPF_F_TABLE("lpm_trie", struct port_key, __u32, egress_ports, 1048576, BPF_F_NO_PREALLOC);

/* Original destination of a redirected socket (set in connect4/6, and by dns.c for TCP/connected-UDP DNS). */
#define ORIG_OUTBOUND 1      /* to <-p> */
#define ORIG_HAIRPIN  2      /* the proxy's own hairpin to <-z> */
#define ORIG_INBOUND  3      /* sk_lookup-steered (only in getsockopt's answer, never stored) */
#define ORIG_DNS      4      /* to the DNS proxy */
struct orig_dst {
    __u32 family;        /* AF_INET / AF_INET6 */
    __u32 addr_be[4];    /* v4 in [0] */
    __u16 port_be;
    __u16 redirected;    /* ORIG_* (0: not redirected) */
    __u32 pod_idx;
};
BPF_SK_STORAGE(orig_by_sock, struct orig_dst);

/* 4-tuple as the proxy's accepted socket sees it -> original destination (written at sockops
 * TCP_CONNECT_CB, read by getsockopt SO_ORIGINAL_DST). */
struct tuple_key {
    __u64 netns_cookie;
    __u32 family;
    __u32 local_be[4];   /* proxy side (127.0.0.1 / ::1) */
    __u32 remote_be[4];  /* app side */
    __u16 local_port;    /* host order */
    __u16 remote_port;   /* host order */
};
BPF_TABLE("lru_hash", struct tuple_key, struct orig_dst, orig_by_tuple, 65536);

/* ===== end core ===== */

/* ===== inbound / DNS (owner: inbound+DNS engineer) ===== */
/* pod_cfg.flags bits of this section */
#define CFG_VIRT_IFACES          (1u << 16) /* -k present: register the <-p> listener for -k arrivals too */
/* pod_ids kinds of this section */
#define PORT_IN_INCLUDE  16  /* -b list */
#define PORT_IN_EXCLUDE  17  /* -d (with -b '*') */
#define IFACE_EXCLUDE    18  /* -c: ifindex never captured inbound */
#define IFACE_VIRT       19  /* -k: ifindex treated as outbound */
/* cidr4/cidr6 kinds of this section */
#define CIDR_DNS_SERVER  16  /* resolv.conf nameservers (/32, /128) */

/* sk_lookup has no netns-cookie helper (verified on 6.18: "program of this type cannot use helper
 * bpf_get_netns_cookie"), so inbound finds the pod by the destination address: pod IPs are unique on a
 * node. Key: family + address (IPv4 in addr[0]); value: the pod's netns cookie for pod_by_netns. */
struct bi_addr_key {
    __u32 family;
    __u32 addr[4];
};
#define BI_ADDR_VIRT_TO_PROXY 1u   /* -k arrivals for this address go to <-p> (address is in -i) */
struct bi_addr_val {
    __u64 netns_cookie;
    __u32 pod_idx;
    __u32 flags;
};
BPF_F_TABLE("hash", struct bi_addr_key, struct bi_addr_val, bi_pod_addrs, 65536, BPF_F_NO_PREALLOC);

/* The proxy's listeners, registered by sockops at TCP_LISTEN_CB, keyed {pod_idx, slot} (pod_idx is
 * random up to 2^31, so a SOCKHASH, not an array-like SOCKMAP). bcc's BPF_SOCKHASH has no lookup
 * method, so the table struct is spelled out with one. */
#define BI_SLOT_INBOUND 0      /* <-z> */
#define BI_SLOT_PROXY   1      /* <-p> (for -k arrivals) */
#define BI_SLOT_V6      2      /* + for AF_INET6 listeners */
#define BI_MAX_PODS     16384
struct bi_listener_key {
    __u32 pod_idx;
    __u32 slot;
};
struct bi_listeners_table_t {
    struct bi_listener_key key;
    int leaf;
    int *(*lookup)(struct bi_listener_key *);
    int (*update)(struct bi_listener_key *, int *);
    int (*delete)(struct bi_listener_key *);
    int (*sock_hash_update)(void *, void *, __u64);
    __u32 max_entries;
};
__attribute__((section("maps/sockhash")))
struct bi_listeners_table_t bi_listeners = { .max_entries = 4 * BI_MAX_PODS };
BPF_ANNOTATE_KV_PAIR(bi_listeners, struct bi_listener_key, int);

/* DNS: per redirected socket (cookie), the server the application addressed, so recvmsg can show the
 * DNS proxy's replies as coming from it. */
struct bi_dns_orig {
    __u32 addr[4];             /* network order, IPv4 in [0] */
    __u16 port;                /* network order */
    __u16 via_port;            /* network order: the DNS proxy port used instead */
    __u32 family;
};
BPF_TABLE("lru_hash", __u64, struct bi_dns_orig, bi_dns_orig, 65536);
/* ===== end inbound / DNS ===== */

/* ===== acceleration (owner: inbound+DNS engineer) ===== */
/* Accelerated sockets, keyed by their netns and their own 4-tuple (local end first). The map is node-wide
 * and every pod has its own port space, so two pods' loopback connections can share a 4-tuple: without the
 * netns cookie one pod's bytes could be redirected into another pod's socket. A pod-to-pod connection's
 * peer is keyed by the other pod's netns (bi_pod_addrs gives it from the peer's address). */
struct bi_sock_key {
    __u64 netns_cookie;
    __u32 local[4];
    __u32 remote[4];
    __u32 lport;               /* host order */
    __u32 rport;               /* host order */
    __u32 family;
    __u32 _pad;                /* explicit: keys are zero-initialised and hashed whole */
};
BPF_SOCKHASH(bi_accel_socks, struct bi_sock_key, 65536);
/* Per accelerated socket, created by sockops before the socket enters the sockhash. tcp_sent: set once sk_msg let one of its messages take the TCP path (its peer
 * was not in the map yet). From then on it never redirects: bytes redirected later would land in the
 * peer's psock queue, which the reader drains before its TCP receive queue, so they would overtake the
 * earlier ones. pod_peer: a pod-to-pod socket (1: it connected, 2: it was accepted; for the events), which
 * redirects only to the socket whose initial sequence
 * numbers mirror its own (peer_snd0/peer_rcv0, from its handshake): a transparent middlebox that keeps
 * both addresses (TPROXY) has its own sequence numbers, so its far side never matches. */
struct bi_accel_state {
    __u32 tcp_sent;
    __u32 pod_peer;
    __u32 peer_snd0;           /* the peer's snd_nxt at ESTABLISHED = our rcv_nxt then */
    __u32 peer_rcv0;           /* the peer's rcv_nxt at ESTABLISHED = our snd_nxt then */
};
BPF_SK_STORAGE(bi_accel_tcp_path, struct bi_accel_state);
/* Each accelerated socket's kernel address and its sequence numbers at ESTABLISHED, under its sockhash key.
 * sk_msg reads how much the peer holds unread (sk_rmem_alloc, at the offset the agent found in the
 * kernel's BTF): it can look a socket up in the sockhash but has no bpf_sk_release for the reference, so
 * the address is kept here and only ever read with bpf_probe_read_kernel. Written with the sockhash entry;
 * an LRU bounds it. */
struct bi_accel_sk_info {
    __u64 addr;
    __u32 snd0;                /* snd_nxt at ESTABLISHED */
    __u32 rcv0;                /* rcv_nxt at ESTABLISHED */
};
BPF_TABLE("lru_hash", struct bi_sock_key, struct bi_accel_sk_info, bi_accel_sk_addr, 65536);
/* ===== end acceleration ===== */

/* ===== observability (owner: observability engineer; types and the record() helper: events.h) =====
 * User space reads these through their pins: initagent/obsmaps.py (counters, observe, exporter, identity). */
#ifndef BPFINIT_OBS_MAPS_DECLARED
#define BPFINIT_OBS_MAPS_DECLARED
/* Exact per-pod decision counters {pod_idx, dir, verdict, reason} -> u64, summed over CPUs in user space.
 * Created on first use (no prealloc: only combinations a pod hits cost memory). identity.register()
 * clears a pod_idx's counters when the index is reused; gc clears them when the pod is gone. */
BPF_F_TABLE("percpu_hash", struct obs_counter_key, __u64, obs_counters, 65536, BPF_F_NO_PREALLOC);

/* Node-wide decision events. 256 pages = 1 MiB = ~10,000 events (96 bytes + 8-byte ring header). */
#ifdef BPFINIT_EVENTS_PERFBUF
BPF_PERF_OUTPUT(obs_events);
#else
BPF_RINGBUF_OUTPUT(obs_events, 256);
#endif

/* Node-wide event accounting: emitted / lost (buffer full) / suppressed (rate limit) / counter map full. */
BPF_PERCPU_ARRAY(obs_stats, __u64, OBS_STAT__COUNT);

/* [0]: event switch and rate limit, written by user space; all-zero means defaults. */
BPF_ARRAY(obs_config, struct obs_config, 1);

/* Per-pod per-CPU rate-limit buckets keyed by pod_idx (pod_idx values are sparse, hence a hash; LRU so a
 * forgotten pod can never exhaust it). */
BPF_TABLE("lru_percpu_hash", __u32, struct obs_bucket, obs_bucket, BPFINIT_MAX_PODS);

/* pod_idx -> identity (namespace, pod, labels), written by initagent/identity.py at setup. */
BPF_F_TABLE("hash", __u32, struct obs_identity, obs_identity, BPFINIT_MAX_PODS, BPF_F_NO_PREALLOC);
#endif
/* ===== end observability ===== */

#define BPFINIT_MAPS_DONE
#endif
