/* bpfinit: small helpers shared by every hook (verdict/reason/dir numbers live in events.h). */
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

static __always_inline int is_v4_mapped(const __u32 *a)
{
    return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

#endif
