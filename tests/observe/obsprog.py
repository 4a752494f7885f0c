"""A tiny bcc program of our own that includes bpf/maps.h + bpf/events.h and emits known events.

It lets the observability user space be tested on the real kernel before (and independently of) the
datapath: a cgroup connect4/connect6 program looks the destination port up in `obs_script`
(port -> what to record) and calls the real `record()` helper with a real `bpf_sock_addr` context,
then allows (or denies with EPERM) the connect as the script says. Maps are pinned the way the loader
pins them: <bpffs>/bpfinit/<hash>/maps/<map name>.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BPF_DIR = REPO / "bpf"
HEADERS_AMD64 = "/usr/src/linux-headers-6.1.0-56-amd64"
HEADERS_COMMON = "/usr/src/linux-headers-6.1.0-56-common"

OBS_MAPS = ("obs_counters", "obs_events", "obs_stats", "obs_config", "obs_bucket", "obs_identity")

TEST_PROGRAM = r"""
#ifndef BPFINIT_MAX_PODS
#define BPFINIT_MAX_PODS 4096
#endif
#include "maps.h"
#include "events.h"

struct obs_script_entry {
    __u32 pod_idx;
    __u8 dir, verdict, reason, deny;
};
/* destination port -> what to record; ports not in the script are ignored (not a pod decision). */
BPF_HASH(obs_script, __u16, struct obs_script_entry, 256);

static __always_inline int obs_test_connect(struct bpf_sock_addr *ctx, const int is6)
{
    __u16 port = bpf_ntohs((__u16)ctx->user_port);
    struct obs_script_entry *s = obs_script.lookup(&port);
    if (!s)
        return 1;
    struct flow_tuple t;
    if (is6)
        flow_from_sock_addr6(&t, ctx);
    else
        flow_from_sock_addr4(&t, ctx);
    __u64 ug = bpf_get_current_uid_gid();
    t.uid = (__u32)ug;
    t.gid = (__u32)(ug >> 32);
    if (s->verdict == VERDICT_REDIRECTED && !is6) {
        /* behave like the datapath: send it to 127.0.0.1:(port+1) and remember the original */
        __u16 to = port + 1;
        ctx->user_ip4 = bpf_htonl(0x7f000001);
        ctx->user_port = bpf_htons(to);
        flow_set_dst4(&t, bpf_htonl(0x7f000001), to);
    }
    record(ctx, bpf_get_netns_cookie(ctx), s->pod_idx, s->dir, s->verdict, s->reason, &t);
    return s->deny ? 0 : 1;
}

int obs_test_connect4(struct bpf_sock_addr *ctx) { return obs_test_connect(ctx, 0); }
int obs_test_connect6(struct bpf_sock_addr *ctx) { return obs_test_connect(ctx, 1); }
"""

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)".*$', re.M)


def expand_includes(text: str, base: Path, depth: int = 0) -> str:
    """Inline local #include "x" textually: bcc only rewrites map methods in the main source text.

    Headers are include-guarded (maps.h and events.h include each other on purpose), so expanding every
    occurrence is correct; the depth bound only stops a cycle without guards.
    """
    if depth > 8:
        raise RuntimeError("#include nesting deeper than 8: missing include guard?")

    def repl(m: re.Match) -> str:
        path = (base / m.group(1)).resolve()
        return expand_includes(path.read_text(), path.parent, depth + 1)

    return _INCLUDE.sub(repl, text)


def bcc_cflags(extra: list[str] = ()) -> list[str]:
    os.environ.setdefault("BCC_KERNEL_SOURCE", HEADERS_COMMON)
    a = HEADERS_AMD64
    return [f"-I{a}/arch/x86/include/generated", f"-I{a}/include",
            f"-I{a}/arch/x86/include/generated/uapi", f"-I{a}/include/generated/uapi", *extra]


class ObsTestProgram:
    """Compile, load, attach to a cgroup and pin the observability maps like the loader does."""

    def __init__(self, bpffs: Path, cgroup: Path, perfbuf: bool = False, hash_name: str = "obstest0000000000"):
        from bcc import BPF, BPFAttachType
        self.BPF = BPF
        defines = ["-DBPFINIT_EVENTS_PERFBUF"] if perfbuf else []
        text = expand_includes(TEST_PROGRAM, BPF_DIR)
        self.bpf = BPF(text=text.encode(), cflags=bcc_cflags(defines))
        self.cgroup_fd = os.open(str(cgroup), os.O_RDONLY | os.O_DIRECTORY)
        self.fns = []
        for name, at in ((b"obs_test_connect4", BPFAttachType.CGROUP_INET4_CONNECT),
                         (b"obs_test_connect6", BPFAttachType.CGROUP_INET6_CONNECT)):
            fn = self.bpf.load_func(name, BPF.CGROUP_SOCK_ADDR, attach_type=at)
            BPF.attach_func(fn, self.cgroup_fd, at, 2)  # BPF_F_ALLOW_MULTI
            self.fns.append((fn, at))
        self.pin_dir = Path(bpffs) / "bpfinit" / hash_name
        (self.pin_dir / "maps").mkdir(parents=True, exist_ok=True)
        from bcc.libbcc import lib
        from initagent.obsmaps import obj_pin
        for name in OBS_MAPS:
            obj_pin(lib.bpf_table_fd(self.bpf.module, name.encode()), self.pin_dir / "maps" / name)

    def script(self, port: int, pod_idx: int, dir: int, verdict: int, reason: int, deny: bool = False):
        table = self.bpf[b"obs_script"]
        key = table.Key(port)
        leaf = table.Leaf(pod_idx, dir, verdict, reason, 1 if deny else 0)
        table[key] = leaf

    def close(self):
        for fn, at in self.fns:
            try:
                self.BPF.detach_func(fn, self.cgroup_fd, at)
            except Exception:
                pass
        os.close(self.cgroup_fd)
        self.bpf.cleanup()
