/* bpfinit: every kernel program, compiled by bcc as ONE unit so the maps are shared.
 * The loader (initagent/loader.py) pins each program and map under <bpffs>/bpfinit/<hash>/. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/ptrace.h>

#include "maps.h"
#if __has_include("events.h")
#include "events.h"   /* again: its helper half (record()) now that maps.h is complete */
#endif
#include "common.h"   /* shared helpers: after the maps and record() they use */

/* Parts owned by other engineers are included when present; they may define the hook macros
 * (BPFINIT_DNS_TCP_CONNECT_HOOK, BPFINIT_SOCKOPS_HOOK) before the core hooks below. */
#if __has_include("dns.c")
#include "dns.c"
#endif
#if __has_include("sk_lookup.c")
#include "sk_lookup.c"
#endif
#if __has_include("accel.c")
#include "accel.c"
#endif

#if __has_include("sock_create.c")
#include "sock_create.c"   /* egress guard: socket kinds no connect/sendmsg hook sees; ping connects */
#endif
#include "connect.c"
#include "sockops.c"
#include "getsockopt.c"
#if __has_include("getpeername.c")
#include "getpeername.c"   /* getpeername() shows the original destination of redirected sockets */
#endif
