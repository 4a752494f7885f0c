"""tests/sidecar.py's configs are ones HAProxy accepts (`haproxy -c`), listening where the helper waits.
The configs run for real, with traffic, in tests/agent/test_e2e_haproxy.py, tests/datapath/test_e2e.py,
tests/observe/test_datapath_kernel.py, bench/datapath.py and the demo."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.sidecar import _bound_ports, sidecar_config

VARIANTS = {
    "tcp outbound (e2e, observe, demo)": (sidecar_config(), (15001,)),
    "http both ways, stamped (datapath e2e)":
        (sidecar_config(inbound_port=15006, http=True, stamp_headers=True), (15001, 15006)),
    "bench mesh": (sidecar_config(inbound_port=15006, http=True, inbound_ipv6=False, reuse_upstream=True,
                                  maxconn=8000), (15001, 15006)),
    "bench floor": (sidecar_config(inbound_port=15006, http=True, outbound_server="10.250.0.3:15006",
                                   inbound_server="127.0.0.1:8080", inbound_source=None, inbound_ipv6=False,
                                   reuse_upstream=True), (15001, 15006)),
    "other ports": (sidecar_config(proxy_port=16001, inbound_port=16006), (16001, 16006)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_haproxy_accepts_the_config(name, tmp_path):
    assert shutil.which("haproxy"), "haproxy is missing (scripts/install-system-deps.sh)"
    config, ports = VARIANTS[name]
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(config)
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert _bound_ports(config) == ports


def test_original_destination_unless_addressed_explicitly():
    transparent = sidecar_config(inbound_port=15006)
    assert transparent.count("server orig 0.0.0.0\n") == 2 and "source 127.0.0.6" in transparent
    floor = VARIANTS["bench floor"][0]
    assert "server orig 10.250.0.3:15006" in floor and "server orig 127.0.0.1:8080" in floor
    assert "source" not in floor and "0.0.0.0\n" not in floor
    assert "X-Out-Orig-Dst" in VARIANTS["http both ways, stamped (datapath e2e)"][0]
    assert "http-reuse never" not in VARIANTS["bench mesh"][0]
