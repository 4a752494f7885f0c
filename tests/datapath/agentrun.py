"""Run the real `bpfinit-agent setup` for a tests.podenv Pod (in its cgroup, entering its netns)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEMPLATE_ARGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
                 "-b", "*", "-d", "15090,15021,15020"]


def setup(pod, bpffs, args=None, env_extra=None, timeout=180) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin:/usr/sbin:/sbin"), "PYTHONPATH": str(REPO)}
    env.update(env_extra or {})
    cgroup = pod.cgroup

    def enter_cgroup():
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    cmd = [sys.executable, "-m", "initagent.cli", "setup", *(TEMPLATE_ARGS if args is None else args),
           "--netns", pod.netns_path, "--cgroup", str(cgroup), "--bpffs", str(bpffs)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=enter_cgroup)
