"""initagent/owner.py: the owner the BPF hooks match is the socket file's (as iptables -m owner) when the
kernel's BTF gives the offsets and the kernel allows the reads; otherwise the calling task's, said why.
The behaviour itself is checked against iptables in test_differential.py (sockets used under another identity
than their creator's, setuid programs). Needs the kernel's BTF and bpftool, as CI's machine has."""
from __future__ import annotations

import re
import subprocess

import pytest

from initagent import doctor, owner
from initagent.doctor import Probe


def available(*_args):
    return Probe(True, "available")


def test_without_btf_the_calling_task_stands_in(tmp_path):
    flags, mode = owner.owner_cflags(btf_path=tmp_path / "no-such-btf", probe=available)
    assert flags == []
    assert mode.startswith(owner.FROM_TASK) and "no kernel BTF offsets" in mode and "no-such-btf" in mode


def test_a_refused_helper_means_the_calling_task_too():
    def lockdown(_ptype, _attach, helper_id):
        return Probe(False, "verifier: unknown func") if helper_id == 113 else Probe(True, "available")
    flags, mode = owner.owner_cflags(probe=lockdown)
    assert flags == []
    assert mode == f"{owner.FROM_TASK} (bpf_probe_read_kernel unavailable in cgroup_sock_addr programs " \
                   "(verifier: unknown func))"


def test_offsets_come_from_the_running_kernel():
    flags, mode = owner.owner_cflags(probe=available)
    assert mode == owner.FROM_FILE and flags[0] == "-DBI_OWNER_FROM_FILE=1"
    offsets = dict(f[2:].split("=") for f in flags[1:])
    assert set(offsets) == set(owner.OFFSETS)
    # bpftool's own reading of the same BTF, for two of them
    dump = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "raw"],
                          capture_output=True, text=True, check=True).stdout
    for struct_name, member, name in (("cred", "fsgid", "BI_CRED_FSGID_OFF"), ("file", "f_cred", "BI_FILE_CRED_OFF")):
        block = re.search(rf"^\[\d+\] STRUCT '{struct_name}' size=\d+ vlen=\d+\n((?:\t.*\n)+)", dump, re.M).group(1)
        bits = int(re.search(rf"'{member}' type_id=\d+ bits_offset=(\d+)", block).group(1))
        assert int(offsets[name]) == bits // 8


@pytest.mark.kernel
def test_doctor_reports_the_exact_owner_match():
    check = doctor.owner_match_check()
    assert check["status"] == "ok" and check["detail"] == owner.FROM_FILE, check
