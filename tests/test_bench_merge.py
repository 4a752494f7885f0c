"""bench/datapath.py --merge pools only like with like: the same proxy mode, the same vCPU idle mode (runs
taken with --poll-idle, --kernel-haltpoll or --idle-spin never mix with the headline runs), the same server app
and the same CPU placement (--pin-pods)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def datapath():
    spec = importlib.util.spec_from_file_location("bench_datapath", REPO / "bench" / "datapath.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def window(rps: float) -> dict:
    return {"rps": rps, "avg_ms": 0.2, "p50_ms": 0.2, "p99_ms": 0.5, "host_cpu_us_per_req": 30.0,
            "proxy_cpu_us_per_req": 18.0, "host_busy_cores": 1.7, "errors": 0,
            "lo_bytes_per_req": {"client": 228.0, "server": 228.0}, "server_eth_bytes_per_req": 149.0}


def result_file(tmp_path: Path, name: str, rps: float, **extra) -> str:
    run = {c: {m: window(rps * (2 if c == "E_bpfinit_accel_pod_to_pod" else 1)) for m in ("keepalive", "close", "1conn")}
           for c in ("A_nomesh", "F_floor", "B_iptables", "E_bpfinit_accel_pod_to_pod")}
    body = {"machine": {"kernel": "k", "cpus": 2}, "runs": 1, "duration_s": 5, "proxy_mode": "tcp",
            "started": 1.0, "raw": [run], **extra}
    path = tmp_path / name
    path.write_text(json.dumps(body))
    return str(path)


def test_merge_pools_runs_of_one_idle_mode(datapath, tmp_path):
    out = tmp_path / "out"
    a = result_file(tmp_path, "a.json", 100.0)                       # before idle modes existed: "halt"
    b = result_file(tmp_path, "b.json", 200.0, idle_mode="halt")
    assert datapath.merge([a, b], out) == 0
    merged = json.loads(next(out.glob("datapath-merged-*.json")).read_text())
    assert merged["idle_mode"] == "halt" and merged["runs"] == 2
    assert merged["summary"]["B_iptables"]["keepalive"]["rps"] == 150.0
    assert merged["ratios"]["E_bpfinit_accel_pod_to_pod"]["keepalive"]["vs_B_iptables"] == 2.0


@pytest.mark.parametrize("other", [{"idle_mode": "poll"}, {"idle_mode": "haltpoll"}, {"idle_spin": True},
                                   {"proxy_mode": "http"}, {"app": "nginx"}, {"pinned": True}],
                         ids=["poll", "haltpoll", "spin", "http", "nginx", "pinned"])
def test_merge_refuses_to_mix(datapath, tmp_path, capsys, other):
    a = result_file(tmp_path, "a.json", 100.0)
    b = result_file(tmp_path, "b.json", 100.0, **other)
    assert datapath.merge([a, b], tmp_path / "out") == 2
    assert "cannot pool" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_merged_poll_runs_keep_their_own_name(datapath, tmp_path):
    out = tmp_path / "out"
    files = [result_file(tmp_path, f"{i}.json", 100.0, idle_mode="poll") for i in range(2)]
    assert datapath.merge(files, out) == 0
    assert [p.name.startswith("datapath-merged-poll-") for p in out.glob("*.json")] == [True]


def test_merged_nginx_runs_keep_their_own_name(datapath, tmp_path):
    out = tmp_path / "out"
    files = [result_file(tmp_path, f"{i}.json", 100.0, app="nginx") for i in range(2)]
    assert datapath.merge(files, out) == 0
    assert [p.name.startswith("datapath-merged-nginx-") for p in out.glob("*.json")] == [True]
    assert json.loads(next(out.glob("*.json")).read_text())["app"] == "nginx"


def test_merged_pinned_runs_keep_their_own_name(datapath, tmp_path):
    out = tmp_path / "out"
    files = [result_file(tmp_path, f"{i}.json", 100.0, app="nginx", pinned=True) for i in range(2)]
    assert datapath.merge(files, out) == 0
    assert [p.name.startswith("datapath-merged-nginx-pinned-") for p in out.glob("*.json")] == [True]
    assert json.loads(next(out.glob("*.json")).read_text())["pinned"] is True


def test_ratios_of_a_subset_use_the_references_it_measured(datapath):
    run = {c: {m: window(rps) for m in ("keepalive", "close")}
           for c, rps in (("B_iptables", 100.0), ("E_bpfinit_accel_pod_to_pod", 170.0))}
    ratios = datapath.summarize([run])["ratios"]
    assert ratios["E_bpfinit_accel_pod_to_pod"]["keepalive"] == {"vs_B_iptables": 1.7}
