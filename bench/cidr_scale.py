"""Connect cost vs number of exclusion CIDRs (-x): bpfinit (LPM trie) vs istio-iptables rules (same run).

A pod connects CONNECTS times (sequential connect+close) to a cluster address that is captured; the
connection is redirected to a local accept-and-close listener on 15001. Each of N /32 exclusions is a
non-matching `-d CIDR -j RETURN` rule for iptables and an LPM entry for bpfinit. Reports connections/s
(median of REPEATS) and the ratio to N=0, plus the kernel's own per-run cost of connect4
(BPF_ENABLE_STATS run_time_ns / run_cnt), which machine load does not distort the way throughput is. Run as root: `.venv/bin/python bench/cidr_scale.py`.
"""
from __future__ import annotations

import ipaddress
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from initagent import bpfsys, loader  # noqa: E402
from tests.podenv import Pod, bpffs_mount  # noqa: E402

PY = sys.executable
COUNTS = tuple(int(x) for x in os.environ.get("BPFINIT_BENCH_COUNTS", "0,100,1000,10000").split(","))
CONNECTS = 3000
REPEATS = 5
TARGET = "10.77.0.5"

SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 15001)); s.listen(4096); print("READY", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""
CLIENT = r"""
import socket, sys, time
n = int(sys.argv[2]); t = time.perf_counter()
for _ in range(n):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.connect((sys.argv[1], 8080)); s.close()
print(n / (time.perf_counter() - t))
"""


def cidrs(n: int) -> list[str]:
    base = int(ipaddress.IPv4Address("100.64.0.0"))
    return [f"{ipaddress.IPv4Address(base + i * 4)}/32" for i in range(n)]


def iptables_rules(excludes: list[str]) -> str:
    lines = ["*nat", ":ISTIO_REDIRECT - [0:0]", ":ISTIO_OUTPUT - [0:0]",
             "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001", "-A OUTPUT -j ISTIO_OUTPUT",
             "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
             "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j RETURN",
             "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
             "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
             "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN"]
    lines += [f"-A ISTIO_OUTPUT -d {c} -j RETURN" for c in excludes]
    lines += ["-A ISTIO_OUTPUT -j ISTIO_REDIRECT", "COMMIT", ""]
    return "\n".join(lines)


def one_sample(pod) -> float:
    r = pod.run([PY, "-c", CLIENT, TARGET, str(CONNECTS)], uid=1000, gid=1000, timeout=300)
    assert r.returncode == 0, r.stderr
    return float(r.stdout)


def main() -> int:
    results = {"conditions": {"kernel": platform.release(), "connects_per_sample": CONNECTS, "repeats": REPEATS,
                              "iptables": subprocess.run(["iptables", "-V"], capture_output=True, text=True).stdout.strip(),
                              "method": "sequential connect+close from a pod (python), redirected to a local "
                                        "accept-and-close listener on 15001; bpfinit and iptables pods measured "
                                        "alternately, median of repeats"},
               "bpfinit": {}, "iptables": {}, "connect4_ns_per_run": {}}
    with bpffs_mount() as bpffs:
        for n in COUNTS:
            excludes = cidrs(n)
            with Pod("scbp") as bpf_pod, Pod("scip") as ipt_pod:
                for pod in (bpf_pod, ipt_pod):
                    pod.cluster.add_address(TARGET)
                    server = pod.popen([PY, "-c", SERVER], uid=1337, gid=1337)
                    assert server.stdout.readline().strip() == "READY"
                r = subprocess.run(["ip", "netns", "exec", ipt_pod.name, "iptables-restore", "--noflush"],
                                   input=iptables_rules(excludes), capture_output=True, text=True)
                assert r.returncode == 0, r.stderr
                # 10,000 CIDRs exceed the kernel's 128 KiB limit for one exec argument (as they would for
                # istio-init), so the argv goes through a file into cli.main()
                argv = ["setup", "-i", "*", "-x", ",".join(excludes), "--cgroup", str(bpf_pod.cgroup),
                        "--bpffs", str(bpffs), "--netns", bpf_pod.netns_path]
                argv_file = Path(f"/tmp/bpfinit-bench-argv-{os.getpid()}.json")
                argv_file.write_text(json.dumps(argv))
                try:
                    r = subprocess.run([PY, "-c", "import json,sys; from initagent import cli; "
                                        f"sys.exit(cli.main(json.load(open({str(argv_file)!r}))))"],
                                       cwd=REPO, capture_output=True, text=True,
                                       env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": str(REPO)})
                finally:
                    argv_file.unlink()
                assert r.returncode == 0, r.stderr
                # interleave the two so machine noise hits both alike
                samples = {"bpfinit": [], "iptables": []}
                prog_fd = bpfsys.obj_get(str(loader.builds(bpffs)[0] / "progs" / "bpfinit_connect4"))
                stats_fd = bpfsys.enable_run_time_stats()
                ns0, cnt0 = bpfsys.prog_run_stats(prog_fd)
                for _ in range(REPEATS):
                    samples["bpfinit"].append(one_sample(bpf_pod))
                    samples["iptables"].append(one_sample(ipt_pod))
                ns1, cnt1 = bpfsys.prog_run_stats(prog_fd)
                os.close(stats_fd)
                os.close(prog_fd)
                per_run = (ns1 - ns0) / max(1, cnt1 - cnt0)
                results["connect4_ns_per_run"][str(n)] = round(per_run, 1)
                print(f"connect4 N={n:6d}: {per_run:7.0f} ns/run over {cnt1 - cnt0} runs", flush=True)
                for mode, values in samples.items():
                    results[mode][str(n)] = round(statistics.median(values), 1)
                    print(f"{mode:9s} N={n:6d}: {statistics.median(values):8.0f} conn/s  {[round(v) for v in values]}",
                          flush=True)
                subprocess.run([PY, "-m", "initagent.cli", "cleanup", "--bpffs", str(bpffs), "--netns",
                                bpf_pod.netns_path], cwd=REPO, capture_output=True,
                               env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": str(REPO)})
    for mode in ("bpfinit", "iptables", "connect4_ns_per_run"):
        base = results[mode]["0"]
        results[mode + "_ratio_vs_0"] = {k: round(v / base, 3) for k, v in results[mode].items()}
    results["conditions"]["load_average_at_end"] = os.getloadavg()
    results["conditions"]["order"] = list(COUNTS)
    suffix = "" if list(COUNTS) == sorted(COUNTS) else "_desc"   # run both orders to expose drift
    out = REPO / "bench" / "results" / f"cidr_scale{suffix}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k.endswith("ratio_vs_0")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
