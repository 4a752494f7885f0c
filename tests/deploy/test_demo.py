"""`make demo` (demo/run.py) end to end: real webhook over TLS, Istio's injected pod, the swapped init
container's exact command run by bpfinit-agent on this kernel, HAProxy as the sidecar, real traffic."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _demo_leftovers() -> set[str]:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    cgroups = [p.name for p in Path("/sys/fs/cgroup/unified/bpfinit-tests").glob("bppdemo*")]
    return {n for n in netns if n.startswith("bppdemo")} | set(cgroups)


@pytest.mark.kernel
@pytest.mark.slow
def test_make_demo_proxies_bypasses_and_denies_then_cleans_up():
    before = _demo_leftovers()
    proc = subprocess.run([sys.executable, "-m", "demo.run"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-3000:]
    assert '"command": ["bpfinit-agent", "setup"]' in out              # the swap, shown
    assert "--egress-allow 172.20.0.0/16:9092" in out                    # from the sample policy
    assert "validator on excludeOutboundIPRanges=0.0.0.0/0: allowed=False" in out
    assert "-> OK service saw a request" in out                          # proxied through HAProxy
    assert "-> OK kafka saw a request" in out                            # excluded CIDR, allowed
    assert "-> ERROR 1 Operation not permitted" in out                   # kernel egress guard
    assert "DENIED" in out and "REDIRECTED" in out                       # counters / observed flows
    assert "proxied, bypassed and denied exactly as the policy says" in out
    assert _demo_leftovers() <= before, "the demo left network namespaces or cgroups behind"
