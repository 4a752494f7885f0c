"""The Dockerfile, tested without a container engine: scripts/image-build-check.sh lints it and runs its
RUN scripts, in order, on this machine in a scratch root (see scripts/image_build_check.py)."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import image_build_check as ibc  # noqa: E402


def _runs(text):
    return [rest for instr, rest in ibc.parse_dockerfile(text) if instr == "RUN"]


def test_dockerfile_lints_clean():
    problems = ibc.lint(ibc.parse_dockerfile((REPO / "Dockerfile").read_text()))
    assert problems == []


def test_every_run_step_is_one_script_under_scripts():
    runs = _runs((REPO / "Dockerfile").read_text())
    assert len(runs) >= 4
    for rest in runs:
        tokens = shlex.split(rest)
        assert ibc.SCRIPT_RE.match(tokens[0]), rest
        assert (REPO / "scripts" / Path(tokens[0]).name).is_file(), rest
        assert not set(tokens) & ibc.SHELL_GLUE, rest


def test_lint_catches_what_it_must(tmp_path):
    bad = """FROM debian:latest AS build
RUN apt-get update && apt-get install -y curl
RUN scripts/no-such-script.sh
COPY nothing-here/ /x/
FROM ubuntu:24.04
USER root
"""
    problems = "\n".join(ibc.lint(ibc.parse_dockerfile(bad)))
    for needle in ("FROM debian:latest", "every RUN must call one scripts/", "no-such-script.sh does not exist",
                   "COPY nothing-here/", "FROM ubuntu:24.04", "lacks labels", "numeric non-root uid", "no CMD"):
        assert needle in problems, needle


def test_continuations_and_comments_are_parsed():
    text = "# c\nFROM debian:12.11-slim AS a\nENV A=1 \\\n    B=2\n# mid\nRUN scripts/x.sh \\\n  --flag\n"
    assert ibc.parse_dockerfile(text) == [("FROM", "debian:12.11-slim AS a"), ("ENV", "A=1 B=2"),
                                          ("RUN", "scripts/x.sh --flag")]


@pytest.mark.slow
def test_ci_runs_exactly_the_dockerfile_steps_and_the_result_works(tmp_path):
    record_path = tmp_path / "record.json"
    proc = subprocess.run([str(REPO / "scripts/image-build-check.sh"), "--record", str(record_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(record_path.read_text())
    runs = _runs((REPO / "Dockerfile").read_text())
    assert record["dockerfile_runs"] == runs
    executed = [s for s in record["steps"] if "run" in s]
    assert [s["run"] for s in executed] == runs, "CI ran a different set or order of steps"
    for step in executed:
        assert step["returncode"] == 0
        tokens = shlex.split(step["run"])
        expected = [Path(tokens[0]).name, *tokens[1:]]
        if expected[0] == "image-install-system.sh":   # verify-only on the CI machine, same stage argument
            expected = [expected[0], "--check", *expected[1:]]
        assert step["executed"] == expected
    exercised = [s["exercise"] for s in record["steps"] if "exercise" in s]
    assert ["bpfinit-webhook", "--help"] in exercised and ["bpfinit-agent", "--help"] in exercised
    assert all(s["returncode"] == 0 for s in record["steps"] if "exercise" in s and s["exercise"][0] != "bpfinit-agent")


def _install_system_with_lock(tmp_path, lock_text: str):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "image-install-system.sh").write_bytes((REPO / "scripts/image-install-system.sh").read_bytes())
    (scripts / "image-install-system.sh").chmod(0o755)
    (scripts / "image-packages.lock").write_text(lock_text)

    def run(*args):
        return subprocess.run([str(scripts / "image-install-system.sh"), *args], capture_output=True, text=True,
                              timeout=60)
    return run


def test_install_system_check_reports_version_drift_loudly_without_failing(tmp_path):
    """CI installs today's Debian versions: a point release moving a package must not turn CI red."""
    run = _install_system_with_lock(tmp_path, "runtime python3 0.0-not-this-one\nruntime iproute2 0.0-old\n")
    proc = run("--check", "runtime")
    assert proc.returncode == 0, proc.stderr
    assert "VERSION DRIFT" in proc.stderr and "WARNING" in proc.stderr
    assert "python3: locked 0.0-not-this-one, installed 3." in proc.stderr
    assert "iproute2: locked 0.0-old" in proc.stderr and "--lock" in proc.stderr
    assert "2 at another version" in proc.stdout
    strict = run("--check", "--strict", "runtime")
    assert strict.returncode == 1 and "ERROR: VERSION DRIFT" in strict.stderr


def test_install_system_check_fails_clearly_on_a_missing_package(tmp_path):
    run = _install_system_with_lock(tmp_path, "runtime python3 0.0-not-this-one\n"
                                              "runtime bpfinit-test-no-such-package 1.0-1\n")
    proc = run("--check", "runtime")
    assert proc.returncode == 1
    assert "bpfinit-test-no-such-package: locked 1.0-1, NOT INSTALLED" in proc.stderr
    assert "VERSION DRIFT" in proc.stderr                    # the drift is still reported alongside
    bad = run("nonsense")
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_install_system_check_passes_on_this_machine_for_the_real_lock():
    for stage in ("build", "runtime"):
        proc = subprocess.run([str(REPO / "scripts/image-install-system.sh"), "--check", stage],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


def test_add_user_is_idempotent_and_refuses_conflicts(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tmp_path / "etc/group").write_text("root:x:0:\n")
    script = str(REPO / "scripts/image-add-user.sh")
    env = {"BPFINIT_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for _ in range(2):
        assert subprocess.run([script], env=env, capture_output=True, timeout=30).returncode == 0
    assert (tmp_path / "etc/passwd").read_text().count("bpfinit:x:65532:65532:") == 1
    assert (tmp_path / "etc/group").read_text().count("bpfinit:x:65532:") == 1
    (tmp_path / "etc/passwd").write_text("other:x:65532:65532::/:/bin/sh\n")
    proc = subprocess.run([script], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "taken" in proc.stderr
