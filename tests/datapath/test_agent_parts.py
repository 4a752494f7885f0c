"""The agent's inbound/DNS/accel parts through the real `bpfinit-agent setup`: Istio's validator,
the acceleration gate/self-test fallback, and unsupported configs refused clearly."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from initagent import accel
from initagent.flags import parse
from tests.datapath import agentrun
from tests.podenv import Pod, bpffs_mount

PY = sys.executable


@pytest.mark.kernel
def test_run_validation_passes_when_redirection_preserves_original_dst():
    with bpffs_mount() as bpffs, Pod("val") as pod:
        res = agentrun.setup(pod, bpffs, agentrun.TEMPLATE_ARGS + ["--run-validation"])
        assert res.returncode == 0, res.stderr
        assert "validation passed: 127.0.0.6:15002" in res.stdout and "SO_ORIGINAL_DST port 15002" in res.stdout


@pytest.mark.kernel
def test_run_validation_fails_with_126_when_nothing_redirects():
    # -o 15002: the excluded-port RETURN comes before the hairpin rule, so nothing carries
    # 127.0.0.6:15002 to a listener: Istio's validator fails the same way with these rules.
    with bpffs_mount() as bpffs, Pod("val2") as pod:
        args = agentrun.TEMPLATE_ARGS + ["-o", "15002"]
        res = agentrun.setup(pod, bpffs, args + ["--run-validation", "--probe-timeout", "1s"])
        assert res.returncode == 126, (res.returncode, res.stdout, res.stderr)
        assert "validation failed" in res.stderr


@pytest.mark.kernel
def test_cni_validation_mode_runs_inside_the_pod_only():
    """istio-validation's `--skip-rule-apply --run-validation` probes the capture it finds. Capture follows
    the pod's cgroup as well as its netns, so pointed at a pod from outside (--network-namespace) it must
    refuse, not probe the wrong place; inside the pod, naming its own netns, it passes."""
    with bpffs_mount() as bpffs, Pod("valcni") as pod:
        res = agentrun.setup(pod, bpffs)
        assert res.returncode == 0, res.stderr
        args = ["-m", "initagent.cli", "setup", *agentrun.TEMPLATE_ARGS, "--skip-rule-apply", "--run-validation",
                "--probe-timeout", "1s", "--network-namespace", pod.netns_path]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(agentrun.REPO)}
        outside = subprocess.run([sys.executable, *args], cwd=agentrun.REPO, env=env, capture_output=True,
                                 text=True, timeout=60)
        assert outside.returncode == 2, (outside.stdout, outside.stderr)
        assert "probes from inside the pod" in outside.stderr and "Traceback" not in outside.stderr
        inside = pod.run([sys.executable, *args], env=env, timeout=60)
        assert inside.returncode == 0, (inside.stdout, inside.stderr)
        assert "validation passed: 127.0.0.6:15002" in inside.stdout


def setup_fresh_pod(extra_args: list[str], env: dict | None = None):
    """The real `bpfinit-agent setup` with the template args + `extra_args` in a new pod; must succeed.
    Returns (stdout, stdout + stderr)."""
    with bpffs_mount() as bpffs, Pod("acc") as pod:
        res = agentrun.setup(pod, bpffs, agentrun.TEMPLATE_ARGS + extra_args, env)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout, res.stdout + res.stderr


@pytest.mark.kernel
def test_accelerate_falls_back_and_says_so_when_splice_stalls():
    """On this machine's kernel, splice(2) does not see sk_msg-redirected data: the self-test catches it."""
    _, out = setup_fresh_pod(["--accelerate"])
    if "acceleration on" in out:          # a kernel without the splice problem
        assert "received with splice(2)" in out
    else:
        assert "acceleration self-test failed" in out and "running without acceleration" in out, out
        assert "splice(2) stalled" in out, out


@pytest.mark.kernel
def test_backpressure_part_passes_because_sk_msg_bounds_what_a_peer_holds():
    """With splice waived, the backpressure part decides. The kernel alone never stops the writer
    (test_accel_backpressure.py), but bpf/accel.c's bound does, at the offset taken from the kernel's BTF."""
    stdout, out = setup_fresh_pod(["--accelerate", "--accelerate-skip-splice-check", "--accelerate-skip-waitall-check"])
    assert "acceleration on" in stdout and "backpressure after" in stdout, out


@pytest.mark.kernel
def test_accelerate_falls_back_and_says_so_when_msg_waitall_is_ignored():
    """With splice waived, MSG_WAITALL decides: on this machine's kernel a MSG_WAITALL read on an
    accelerated socket returns what the redirected queue holds, and the self-test catches it."""
    _, out = setup_fresh_pod(["--accelerate", "--accelerate-skip-splice-check"])
    if "acceleration on" in out:          # a kernel whose tcp_bpf honours MSG_WAITALL and SO_RCVLOWAT
        assert "MSG_WAITALL and SO_RCVLOWAT honoured" in out, out
    else:
        assert "acceleration self-test failed: recv(MSG_WAITALL) of 256 KiB returned" in out, out
        assert "running without acceleration" in out, out


@pytest.mark.kernel
@pytest.mark.parametrize("flags, env", [
    # what the bpfinit.io/accelerate-skip-{splice,backpressure,waitall}-check annotations become
    (["--accelerate-skip-splice-check", "--accelerate-skip-backpressure-check", "--accelerate-skip-waitall-check"], {}),
    ([], {"BPFINIT_ACCEL_SKIP_SPLICE_CHECK": "1", "BPFINIT_ACCEL_SKIP_BACKPRESSURE_CHECK": "true",
          "BPFINIT_ACCEL_SKIP_WAITALL_CHECK": "1"}),
], ids=["flag", "env"])
def test_accelerate_with_every_check_waived_turns_on_and_says_so(flags, env):
    stdout, out = setup_fresh_pod(["--accelerate", *flags], env)
    assert "acceleration on" in stdout, out
    for waived in ("splice(2)", "backpressure", "MSG_WAITALL / SO_RCVLOWAT"):
        assert f"{waived} NOT checked: waived by the operator" in stdout, out


def _listener() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    return srv


def test_backpressure_check_passes_on_plain_tcp():
    """The check itself against plain loopback TCP (no BPF here): the writer meets EAGAIN within TCP's
    buffers, far below the limit."""
    with _listener() as srv:
        ok, why = accel.backpressure_holds(srv, srv.getsockname()[1], time.monotonic() + 5,
                                           require_acceleration=False)
    assert ok, why
    queued_kib = int(why.split()[2])
    assert 0 < queued_kib * 1024 <= accel.tcp_queue_max() < accel.backpressure_limit()


def test_min_reads_check_passes_on_plain_tcp():
    """The MSG_WAITALL / SO_RCVLOWAT check itself against plain loopback TCP (no BPF here): both honoured."""
    with _listener() as srv:
        ok, why = accel.min_reads_hold(srv, srv.getsockname()[1], time.monotonic() + 5,
                                       require_acceleration=False)
    assert ok and why == "MSG_WAITALL and SO_RCVLOWAT honoured", why


def test_self_test_fails_when_bytes_cross_lo():
    """Without BPF the self-test's connection is plain TCP: its bytes cross lo, so it is not accelerated,
    and the backpressure connection is refused for the same reason (it would prove nothing)."""
    with _listener() as probe:
        port = probe.getsockname()[1]
    ok, why = accel.self_test(port, check_splice=False, check_backpressure=False)
    assert not ok and "was not accelerated" in why and "crossed lo" in why, why
    with _listener() as srv:
        ok, why = accel.backpressure_holds(srv, srv.getsockname()[1], time.monotonic() + 5)
    assert not ok and "backpressure connection was not accelerated" in why, why
    with _listener() as srv:
        ok, why = accel.min_reads_hold(srv, srv.getsockname()[1], time.monotonic() + 5)
    assert not ok and "MSG_WAITALL connection was not accelerated" in why, why


@pytest.mark.kernel
def test_splice_check_waiver_without_accelerate_is_silent():
    stdout, out = setup_fresh_pod(["--accelerate-skip-splice-check"])
    assert "pod configured" in stdout, out
    assert "splice" not in out and "accelerat" not in out, out


def test_kernel_gate():
    assert accel.kernel_gate("6.18.44")[0]
    assert accel.kernel_gate("5.15.0-91-generic")[0]
    assert not accel.kernel_gate("5.10.0-26-amd64")[0]   # no netns cookie in sk_msg: pods could collide
    ok, why = accel.kernel_gate("5.4.0")
    assert not ok and "older" in why
    assert not accel.kernel_gate("weird")[0]


def test_tproxy_and_virt_with_include_are_refused_with_a_reason():
    assert any("TPROXY" in r and "conntrack" in r for r in parse(["-m", "TPROXY", "-b", "*"], {}).unsupported)
    assert parse(["-k", "eth1", "-b", "*"], {}).unsupported == ()
    assert any("-k with -i" in r for r in parse(["-k", "eth1", "-i", "*"], {}).unsupported)
