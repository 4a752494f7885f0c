"""Per-pod setup time: cold (first pod on the node: compile + pin) and warm (open pins, write config,
attach). Wall time of the whole `bpfinit-agent setup` process (the venv's console script, what the
kubelet waits for), and the agent's own figure (from its output, which excludes interpreter start-up and
imports). Each setup gets a fresh netns + cgroup. Run as root: `.venv/bin/python bench/setup_time.py`.
Conditions (load average before/after, interpreter start-up alone) are recorded with the results: on a
2-core machine shared with other work, the medians move by several ms with the load.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.podenv import TEST_CGROUP_PARENT, _unique, bpffs_mount  # noqa: E402

PY = sys.executable
AGENT = Path(PY).parent / "bpfinit-agent"       # console script installed by `pip install -e .`
COMMAND = [str(AGENT)] if AGENT.exists() else [PY, "-m", "initagent.cli"]
COLD_RUNS = 3
WARM_RUNS = 30
# PYTHONPATH: the agent of this tree, whichever tree the venv's editable install points at
ENV = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "PYTHONPATH": str(REPO)}


def one_setup(bpffs: Path, parts: str) -> tuple[float, float]:
    name = _unique("bst")
    cg = TEST_CGROUP_PARENT / name
    subprocess.run(["ip", "netns", "add", name], check=True)
    TEST_CGROUP_PARENT.mkdir(exist_ok=True)
    cg.mkdir()
    try:
        t = time.perf_counter()
        r = subprocess.run([*COMMAND, "setup", "-p", "15001", "-z", "15006", "-u", "1337", "-m",
                            "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020", "--cgroup", str(cg),
                            "--bpffs", str(bpffs), "--netns", f"/run/netns/{name}"], cwd=REPO, capture_output=True,
                           text=True, env=dict(ENV, BPFINIT_PARTS=parts))
        wall = time.perf_counter() - t
        assert r.returncode == 0, r.stderr
        internal = float(re.search(r"in (\d+) ms", r.stdout).group(1)) / 1000
        return wall, internal
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def interpreter_start_ms(runs: int = 20) -> float:
    """Median wall time of the same interpreter doing nothing (`-c pass`): the floor under every setup."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([PY, "-c", "pass"], check=True, env=ENV)
        times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times), 1)


def main() -> int:
    results = {"conditions": {"kernel": platform.release(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                              "command": " ".join(Path(c).name for c in COMMAND) + " setup",
                              "loadavg_before": loadavg(), "interpreter_start_ms_median": interpreter_start_ms(),
                              "note": "wall = whole CLI process incl. interpreter start; internal = agent's own "
                                      "timer (parse..attach)"}}
    for label, parts in (("core", "connect.c,sockops.c,getsockopt.c"), ("all_parts", "")):
        cold, warm = [], []
        try:
            for _ in range(COLD_RUNS):
                with bpffs_mount() as bpffs:
                    cold.append(one_setup(bpffs, parts))
                    if not warm:
                        warm = [one_setup(bpffs, parts) for _ in range(WARM_RUNS)]
        except AssertionError as err:
            results[label] = {"error": str(err).splitlines()[-1][:300]}
            print(f"{label}: failed: {results[label]['error']}")
            continue
        results[label] = {
            "cold_wall_s_median": round(statistics.median(w for w, _ in cold), 3),
            "cold_internal_s_median": round(statistics.median(i for _, i in cold), 3),
            "warm_wall_ms_median": round(1000 * statistics.median(w for w, _ in warm), 1),
            "warm_internal_ms_median": round(1000 * statistics.median(i for _, i in warm), 1),
            "warm_wall_ms_p90": round(1000 * sorted(w for w, _ in warm)[int(0.9 * len(warm)) - 1], 1),
            "warm_wall_ms_min": round(1000 * min(w for w, _ in warm), 1),
            "cold_runs": COLD_RUNS, "warm_runs": WARM_RUNS}
        print(label, json.dumps(results[label]))
    results["conditions"]["loadavg_after"] = loadavg()
    (REPO / "bench" / "results" / "setup_time.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
