"""Whose socket it is, the way iptables' `-m owner` decides: the compile flags that let the BPF hooks read it.

iptables compares the fsuid/fsgid of the credentials the socket's file was opened with. The hooks follow
the same pointers (sock_addr context -> sock -> socket -> file -> f_cred; the creating task's cred in
cgroup/sock_create) at the running kernel's field offsets, which come from its BTF because bcc compiles
against whatever headers the node has. Without BTF, or when the kernel refuses the helpers that read
(kernel lockdown in confidentiality mode), the hooks use the calling task's real ids instead: the same
for every socket that one process creates and connects under one identity (bpf/common.h).
"""
from __future__ import annotations

from pathlib import Path

# -D name -> (struct, member path) in the running kernel's BTF
OFFSETS = {
    "BI_SA_KERN_SK_OFF": ("bpf_sock_addr_kern", "sk"),
    "BI_SK_SOCKET_OFF": ("sock", "sk_socket"),
    "BI_SOCKET_FILE_OFF": ("socket", "file"),
    "BI_FILE_CRED_OFF": ("file", "f_cred"),
    "BI_CRED_FSUID_OFF": ("cred", "fsuid"),
    "BI_CRED_FSGID_OFF": ("cred", "fsgid"),
    "BI_TASK_CRED_OFF": ("task_struct", "cred"),
}
# (program type, attach type, helper) the exact form calls; lockdown in confidentiality mode removes
# bpf_probe_read_kernel, and the verifier then says so
HELPERS = (("cgroup_sock_addr", "inet4_connect", "probe_read_kernel"),
           ("cgroup_sock", "inet_sock_create", "probe_read_kernel"),
           ("cgroup_sock", "inet_sock_create", "get_current_task"))
FROM_FILE = "the socket file's fsuid/fsgid, as iptables -m owner"
FROM_TASK = "the calling task's real uid/gid"


def missing_helper(probe=None) -> str | None:
    """The first helper of HELPERS the kernel refuses (a sentence), or None."""
    from initagent import bpfsys
    if probe is None:
        from initagent.doctor import probe_helper as probe
    for ptype, attach, helper in HELPERS:
        found = probe(bpfsys.PROG_TYPE[ptype], bpfsys.ATTACH[attach], bpfsys.HELPER[helper])
        if found.available is False:
            return f"bpf_{helper} unavailable in {ptype} programs ({found.detail})"
    return None


def owner_cflags(btf_path: Path | None = None, probe=None) -> tuple[list[str], str]:
    """(compile flags, one line saying which owner the hooks match and, when not the file's, why)."""
    from initagent import kbtf
    try:
        btf = kbtf.load(btf_path)
        flags = [f"-D{name}={btf.offset(struct, member)}" for name, (struct, member) in OFFSETS.items()]
    except kbtf.BtfError as err:
        return [], f"{FROM_TASK} (no kernel BTF offsets: {err})"
    missing = missing_helper(probe)
    if missing:
        return [], f"{FROM_TASK} ({missing})"
    return ["-DBI_OWNER_FROM_FILE=1", *flags], FROM_FILE
