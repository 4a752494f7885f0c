"""`bpfinit-agent doctor`: real bpf(2) feature probes on this kernel, their precise "missing" messages
(fed with ids past the kernel's last helper / program type / map type), the JSON shape, least privilege,
cleanup and run time."""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import time
from pathlib import Path

import pytest

from initagent import bpfsys, cgroup, doctor, loader
from tests.agent.conftest import REPO, run_agent

KEYS = {"check", "group", "required", "status", "ok", "detail"}
THREE_CAPS = "-all,+bpf,+net_admin,+perfmon"


def _kernel_enum_value(name: str) -> int:
    """First id past the kernel's last one (e.g. __BPF_FUNC_MAX_ID), read from the running kernel's BTF."""
    out = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux", "format", "raw"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    m = re.search(rf"'{name}' val=(\d+)", out)
    assert m, f"{name} not in the kernel BTF"
    return int(m.group(1))


def _doctor(bpffs: str, *extra: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return run_agent(["doctor", "--bpffs", bpffs, *extra], timeout=60, prefix=prefix)


# ---------------------------------------------------------------- whole command on this kernel
@pytest.mark.kernel
def test_everything_required_passes_here_within_two_seconds(bpffs):
    started = time.monotonic()
    result = _doctor(bpffs, "--json")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert elapsed < 2.0, f"doctor took {elapsed:.2f}s"
    checks = json.loads(result.stdout)
    assert [c for c in checks if c["status"] == "missing"] == []
    by_name = {c["check"]: c for c in checks}
    # every program the loader knows, each map type the build declares, every helper row, both links: ok
    for spec in loader.PROGRAMS:
        if not (loader.BPF_DIR / spec.part).exists():
            continue
        subject = spec.prog_type if spec.prog_type == spec.attach_type else f"{spec.prog_type}/{spec.attach_type}"
        assert by_name[f"program {subject}"]["status"] == "ok", by_name[f"program {subject}"]
    for mtype in ("hash", "lpm_trie", "lru_hash", "percpu_hash", "lru_percpu_hash", "array", "percpu_array",
                  "sockhash", "sk_storage"):
        assert by_name[f"map {mtype}"]["status"] == "ok"
    assert by_name["event buffer"]["detail"].startswith("BPF ring buffer")   # 6.x: no perf fallback
    assert by_name["accel queue bound"]["status"] == "ok", by_name["accel queue bound"]   # kernel BTF here
    helper_checks = [c for c in checks if c["group"] == "helpers"]
    assert len(helper_checks) >= 20 and all(c["status"] == "ok" for c in helper_checks), helper_checks
    for name in ("helper bpf_get_netns_cookie in cgroup_sock_addr", "helper bpf_get_netns_cookie in sock_ops",
                 "helper bpf_get_netns_cookie in cgroup_sockopt", "helper bpf_sk_assign in sk_lookup",
                 "helper bpf_map_lookup_elem in sk_lookup", "helper bpf_sk_storage_get in cgroup_sock_addr",
                 "helper bpf_get_current_uid_gid in cgroup_sock_addr", "helper bpf_msg_redirect_hash in sk_msg",
                 "helper bpf_sock_hash_update in sock_ops", "helper bpf_ringbuf_reserve in cgroup_sock_addr",
                 "sk_lookup listener steering", "sk_storage at connect"):
        assert by_name[name]["status"] == "ok", by_name.get(name)
    assert by_name["cgroup link"]["detail"] == "created on a scratch cgroup"
    assert by_name["sk_lookup link"]["detail"] == "created in a scratch netns"

    text = _doctor(bpffs)
    assert text.returncode == 0
    assert text.stdout.strip().splitlines()[-1].startswith("no required feature missing")
    assert "[MISSING]" not in text.stdout


@pytest.mark.kernel
def test_json_shape(bpffs):
    checks = json.loads(_doctor(bpffs, "--json").stdout)
    assert isinstance(checks, list) and checks
    names = [c["check"] for c in checks]
    assert len(names) == len(set(names)), "check names are unique"
    for c in checks:
        assert set(c) == KEYS, c
        assert isinstance(c["check"], str) and isinstance(c["detail"], str) and c["detail"]
        assert isinstance(c["required"], bool) and isinstance(c["ok"], bool)
        assert c["status"] in ("ok", "missing", "warning")
        assert c["ok"] == (c["status"] != "missing")
    assert {c["group"] for c in checks} == {"host", "program types", "maps", "helpers", "links"}
    sk_msg = next(c for c in checks if c["check"] == "program sk_msg/sk_msg_verdict")
    assert sk_msg["required"] is False          # acceleration is optional
    sk_lookup = next(c for c in checks if c["check"] == "program sk_lookup")
    assert sk_lookup["required"] is True


@pytest.mark.kernel
def test_bpffs_missing_fails_with_the_fix(tmp_path):
    result = run_agent(["doctor", "--bpffs", str(tmp_path)], timeout=60)
    assert result.returncode == 1
    assert f"[MISSING] bpffs: {tmp_path} is not a bpf mount (mount -t bpf bpf {tmp_path})" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == \
        "bpfinit cannot run here: 1 required feature(s) missing (bpffs)"


# ---------------------------------------------------------------- the probes themselves, past the kernel's ends
@pytest.mark.kernel
def test_helper_past_the_last_one_is_missing_with_the_verifier_reason():
    past_last = _kernel_enum_value("__BPF_FUNC_MAX_ID")
    probe = doctor.probe_helper(bpfsys.PROG_TYPE["cgroup_sock_addr"], bpfsys.ATTACH["inet4_connect"], past_last)
    assert probe == doctor.Probe(False, f"helper #{past_last} unavailable (verifier: invalid func unknown#{past_last})")
    check = doctor._from_probe("helper x", probe, "helpers", f"helper #{past_last} in cgroup_sock_addr programs",
                               "outbound capture", True, "9.9")
    assert check["status"] == "missing" and check["ok"] is False
    assert check["detail"] == (f"helper #{past_last} in cgroup_sock_addr programs missing: outbound capture "
                               f"impossible (kernel >= 9.9; helper #{past_last} unavailable (verifier: invalid "
                               f"func unknown#{past_last}))")
    # a real helper that exists is found: the last one below the end is known to the verifier
    assert doctor.probe_helper(bpfsys.PROG_TYPE["cgroup_sock_addr"], bpfsys.ATTACH["inet4_connect"],
                               bpfsys.HELPER["get_netns_cookie"]).available is True


@pytest.mark.kernel
def test_helper_not_allowed_for_the_program_type_is_missing():
    probe = doctor.probe_helper(bpfsys.PROG_TYPE["cgroup_sock_addr"], bpfsys.ATTACH["inet4_connect"],
                                bpfsys.HELPER["sk_assign"])
    assert probe == doctor.Probe(False, "helper #124 unavailable (verifier: program of this type cannot use "
                                        "helper bpf_sk_assign#124)")
    probe = doctor.probe_helper(bpfsys.PROG_TYPE["sock_ops"], bpfsys.ATTACH["sock_ops"],
                                bpfsys.HELPER["msg_redirect_hash"])
    assert probe.available is False and "cannot use helper bpf_msg_redirect_hash#71" in probe.detail


@pytest.mark.kernel
def test_program_type_past_the_last_one_and_wrong_attach_type_are_missing():
    past_last = _kernel_enum_value("__MAX_BPF_PROG_TYPE")
    probe = doctor.probe_prog_type(past_last, 0)
    assert probe == doctor.Probe(False, f"program type {past_last} with attach type 0 rejected (Invalid argument)")
    check = doctor._from_probe("program sk_lookup", probe, "program types", "sk_lookup", "inbound capture",
                               True, "5.9")
    assert check["detail"] == (f"sk_lookup missing: inbound capture impossible (kernel >= 5.9; program type "
                               f"{past_last} with attach type 0 rejected (Invalid argument))")
    wrong = doctor.probe_prog_type(bpfsys.PROG_TYPE["sk_lookup"], bpfsys.ATTACH["inet4_connect"])
    assert wrong.available is False and "rejected" in wrong.detail
    assert doctor.probe_prog_type(bpfsys.PROG_TYPE["sk_lookup"], bpfsys.ATTACH["sk_lookup"]).available is True


@pytest.mark.kernel
def test_map_type_past_the_last_one_and_bad_sk_storage_are_missing():
    past_last = _kernel_enum_value("__MAX_BPF_MAP_TYPE")
    assert doctor.probe_map_type(past_last, 4, 4) == \
        doctor.Probe(False, f"map type {past_last} rejected (Invalid argument)")
    # an LPM trie without BPF_F_NO_PREALLOC is refused: the probe uses the flags the build uses
    assert doctor.probe_map_type(bpfsys.MAP_TYPE["lpm_trie"], 8, 4, 1, 0).available is False
    # SK_STORAGE needs BTF for its value: without it the kernel refuses, with ours it accepts
    assert doctor.probe_map_type(bpfsys.MAP_TYPE["sk_storage"], 4, 8, 0, bpfsys.BPF_F_NO_PREALLOC).available is False
    assert doctor.probe_sk_storage_map().available is True


@pytest.mark.kernel
def test_optional_feature_missing_is_a_warning_not_a_failure():
    probe = doctor.probe_helper(bpfsys.PROG_TYPE["sk_msg"], bpfsys.ATTACH["sk_msg_verdict"],
                                _kernel_enum_value("__BPF_FUNC_MAX_ID"))
    check = doctor._from_probe("helper y", probe, "helpers", "bpf_msg_redirect_hash in sk_msg programs",
                               "sockmap acceleration (--accelerate)", False, None)
    assert check["status"] == "warning" and check["ok"] is True and check["required"] is False
    assert check["detail"].startswith("bpf_msg_redirect_hash in sk_msg programs missing: sockmap acceleration "
                                      "(--accelerate) unavailable (helper #")
    rendered = doctor.render([check])
    assert rendered.splitlines()[0].startswith("[WARN] helper y: ")
    assert rendered.splitlines()[-1] == "no required feature missing (0 ok, 1 warning(s))"


# ---------------------------------------------------------------- privilege and cleanup
@pytest.mark.kernel
def test_without_privilege_says_so_instead_of_blaming_the_kernel(bpffs):
    result = _doctor(bpffs, prefix=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                    "--inh-caps=-all", "--bounding-set=-all"])
    assert result.returncode == 1, result.stdout + result.stderr
    assert ("[MISSING] bpf(2) probes: not permitted to load programs (Operation not permitted): program types, "
            "maps and helpers were not probed (needs root or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, and bpf(2) "
            "allowed by seccomp)" in result.stdout)
    assert "program sk_lookup" not in result.stdout


@pytest.mark.kernel
def test_three_capabilities_probe_everything_but_the_scratch_links(bpffs):
    """The agent's least-privilege set proves every program type, map and helper; the scratch cgroup and
    netns need more, so those two are reported as not verified (warnings), not as missing."""
    result = _doctor(bpffs, "--json", prefix=["setpriv", f"--bounding-set={THREE_CAPS}",
                                              f"--inh-caps={THREE_CAPS}"])
    checks = {c["check"]: c for c in json.loads(result.stdout)}
    assert result.returncode == 0, result.stdout
    assert all(c["status"] == "ok" for c in checks.values() if c["group"] in ("program types", "maps", "helpers"))
    assert checks["sk_lookup link"]["status"] == "warning"
    assert "not verified (unshare(CLONE_NEWNET): Operation not permitted)" in checks["sk_lookup link"]["detail"]
    assert checks["cgroup link"]["status"] in ("ok", "warning")


@pytest.mark.kernel
def test_probes_leave_no_cgroup_netns_child_or_fd_behind():
    root = cgroup.v2_root()
    fds_before = len(os.listdir("/proc/self/fd"))
    zombies_before = _zombie_children()
    assert doctor.probe_cgroup_link(root) == doctor.Probe(True, "created on a scratch cgroup")
    assert doctor.probe_sk_lookup_link() == doctor.Probe(True, "created in a scratch netns")
    checks = doctor.kernel_feature_checks(root)
    assert all(c["status"] == "ok" for c in checks), [c for c in checks if c["status"] != "ok"]
    assert list(root.glob(f"bpfinit-doctor-{os.getpid()}-*")) == []
    assert len(os.listdir("/proc/self/fd")) <= fds_before      # every probe fd closed
    assert _zombie_children() <= zombies_before                  # the netns children were reaped


def _zombie_children() -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            found.add(int(stat.parent.name))
    return found


# ---------------------------------------------------------------- the tables follow bpf/
_METHOD_HELPER = {"lookup": "map_lookup_elem", "update": "map_update_elem", "delete": "map_delete_elem",
                  "sk_storage_get": "sk_storage_get", "sock_hash_update": "sock_hash_update",
                  "msg_redirect_hash": "msg_redirect_hash"}
_BYTE_ORDER = {"htonl", "htons", "ntohl", "ntohs"}


def test_helper_table_covers_every_helper_each_part_calls():
    listed: dict[str, set[str]] = {}
    for part, _ptype, helpers in doctor.HELPER_NEEDS:
        listed.setdefault(part, set()).update(helpers)
    for part in {spec.part for spec in loader.PROGRAMS}:
        source = (REPO / "bpf" / part)
        if not source.exists():
            continue
        text = source.read_text()
        used = {h for h in re.findall(r"\bbpf_([a-z0-9_]+)\(", text) if h not in _BYTE_ORDER}
        used |= {_METHOD_HELPER[m] for m in re.findall(r"\.(\w+)\(", text) if m in _METHOD_HELPER}
        if re.search(r"\b(record|BI_RECORD|record_egress_denied)\(", text):
            used.add(doctor.EVENTS)
        assert used <= listed.get(part, set()), f"{part} calls {sorted(used - listed.get(part, set()))}"
        assert part in doctor.PART_PURPOSE
    for _part, ptype, helpers in doctor.HELPER_NEEDS:
        assert ptype in bpfsys.PROG_TYPE
        assert all(h == doctor.EVENTS or h in bpfsys.HELPER for h in helpers)


def test_btf_blob_is_well_formed():
    blob = doctor.local_storage_btf()
    magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = \
        struct.unpack_from("=HBBIIIII", blob)
    assert (magic, version, hdr_len) == (0xEB9F, 1, 24)
    assert len(blob) == hdr_len + str_off + str_len and type_off == 0 and type_len == str_off
    assert blob[hdr_len + str_off:].split(b"\0")[1:3] == [b"int", b"bpfinit_probe_val"]
