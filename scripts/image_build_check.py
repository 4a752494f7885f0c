#!/usr/bin/env python3
"""Test the Dockerfile without a container engine (run by scripts/image-build-check.sh, CI and tests).

1. Lint: multi-stage from a pinned Debian image; every RUN is exactly one `scripts/<name>.sh [args]`
   (no shell glue), each script exists, is executable and parses; COPY sources exist; the final stage
   has OCI labels, a numeric non-root USER and a CMD; pyproject declares both entry points.
2. Run: the Dockerfile's steps, in order, on this machine inside a scratch root that stands for the
   image filesystem: COPY copies the repo's files there, RUN runs the same script with the same
   arguments and the Dockerfile's ENV. Two deliberate differences, both stated in the record:
   - `image-install-system.sh STAGE` runs as `--check STAGE`: CI must not up/downgrade this machine's
     packages, so it verifies the machine already has exactly the locked versions (idempotence);
   - scripts see BPFINIT_ROOT=<scratch root> (only image-add-user.sh reads it), and pip may use its cache.
   Then the result is exercised: both entry points start from the scratch venv, bcc imports, the
   manifests render, and the image user exists with the USER uid.
Writes a JSON record of what ran (`--record FILE`), which tests compare with the Dockerfile.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT_RE = re.compile(r"^(?:/opt/bpfinit/)?scripts/[a-z0-9][a-z0-9-]*\.sh$")
PINNED_TAG_RE = re.compile(r"^[a-z0-9./-]+(:[A-Za-z0-9._-]*\d+\.\d+[A-Za-z0-9._-]*|@sha256:[0-9a-f]{64})$")
SHELL_GLUE = {"&&", "||", ";", "|", ">", ">>", "<", "&"}
REQUIRED_LABELS = ("org.opencontainers.image.title", "org.opencontainers.image.version",
                   "org.opencontainers.image.licenses", "org.opencontainers.image.source")


class CheckError(Exception):
    pass


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs; comments dropped, backslash continuations joined."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        instr, _, rest = buf.partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    return out


def _resolve_args(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def _env_pairs(rest: str) -> dict[str, str]:
    pairs = {}
    for token in shlex.split(rest):
        key, sep, value = token.partition("=")
        if sep:
            pairs[key] = value
    return pairs


def lint(instructions: list[tuple[str, str]]) -> list[str]:
    problems = []
    global_args: dict[str, str] = {}
    stages = []
    for instr, rest in instructions:
        if instr == "ARG" and not stages:
            key, _, default = rest.partition("=")
            global_args[key] = default
        elif instr == "FROM":
            image = _resolve_args(rest.split()[0], global_args)
            stages.append({"image": image, "labels": {}, "user": None, "cmd": None})
            if not PINNED_TAG_RE.match(image) or not image.startswith("debian:"):
                problems.append(f"FROM {image}: use a Debian image pinned to a version (e.g. debian:12.11-slim)")
        elif instr == "RUN":
            tokens = shlex.split(rest)
            if not tokens or not SCRIPT_RE.match(tokens[0]):
                problems.append(f"RUN {rest}: every RUN must call one scripts/<name>.sh")
                continue
            if SHELL_GLUE & set(tokens) or "`" in rest or "$(" in rest:
                problems.append(f"RUN {rest}: no shell glue; put the logic in the script")
            script = REPO / "scripts" / Path(tokens[0]).name
            if not script.is_file():
                problems.append(f"RUN {rest}: {script.relative_to(REPO)} does not exist")
            elif not os.access(script, os.X_OK):
                problems.append(f"RUN {rest}: {script.relative_to(REPO)} is not executable")
            elif subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode != 0:
                problems.append(f"RUN {rest}: {script.relative_to(REPO)} has a bash syntax error")
        elif instr == "COPY" and "--from=" not in rest:
            sources = shlex.split(rest)[:-1]
            for src in sources:
                if not glob.glob(str(REPO / src)):
                    if "*" not in src:
                        problems.append(f"COPY {src}: no such file in the repository")
            if not any(glob.glob(str(REPO / s)) for s in sources):
                problems.append(f"COPY {rest}: matches nothing")
        elif instr == "LABEL" and stages:
            stages[-1]["labels"].update(_env_pairs(rest))
        elif instr == "USER" and stages:
            stages[-1]["user"] = rest
        elif instr == "CMD" and stages:
            stages[-1]["cmd"] = rest
    if len(stages) < 2:
        problems.append("the Dockerfile must be multi-stage (build + runtime)")
    if stages:
        final = stages[-1]
        missing = [label for label in REQUIRED_LABELS if label not in final["labels"]]
        if missing:
            problems.append(f"final stage lacks labels {missing}")
        user = (final["user"] or "").split(":")[0]
        if not user.isdigit() or int(user) == 0:
            problems.append(f"final stage USER must be a numeric non-root uid, not {final['user']!r}")
        if not final["cmd"]:
            problems.append("final stage has no CMD")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("scripts", {})
    for entry in ("bpfinit-webhook", "bpfinit-agent"):
        if entry not in scripts:
            problems.append(f"pyproject.toml does not declare the {entry} entry point")
    return problems


def _copy_into(root: Path, workdir: str, rest: str) -> None:
    parts = shlex.split(rest)
    sources, dest = parts[:-1], parts[-1]
    dest_path = Path(dest if dest.startswith("/") else f"{workdir}/{dest}")
    target = root / dest_path.relative_to("/")
    matched = [m for s in sources for m in glob.glob(str(REPO / s))]
    dir_dest = dest.endswith("/") or len(matched) > 1
    for src in matched:
        src_path = Path(src)
        if src_path.is_dir():
            # Docker copies the directory's contents into dest; .dockerignore keeps caches out.
            shutil.copytree(src_path, target, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            out = target / src_path.name if dir_dest else target
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src_path, out)


def run_steps(instructions, root: Path, record: list[dict]) -> None:
    """Execute the Dockerfile's steps in `root` (one scratch root for both stages: the only
    cross-stage copy is /opt/bpfinit -> /opt/bpfinit, the same path)."""
    (root / "etc").mkdir(parents=True, exist_ok=True)
    for name in ("passwd", "group"):        # the Debian base image's account files
        shutil.copy2(f"/etc/{name}", root / "etc" / name)
    env_base = {k: v for k, v in os.environ.items() if k not in ("PIP_NO_CACHE_DIR",)}
    stage_env: dict[str, str] = {}
    workdir = "/"
    stage = None
    for instr, rest in instructions:
        if instr == "FROM":
            stage = rest.split()[-1]
            stage_env, workdir = {}, "/"
        elif instr == "ENV":
            stage_env.update({k: v for k, v in _env_pairs(rest).items() if k != "PATH"})
        elif instr == "WORKDIR":
            workdir = rest
            (root / rest.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif instr == "COPY":
            if "--from=" in rest:
                parts = [p for p in shlex.split(rest) if not p.startswith("--from=")]
                record.append({"stage": stage, "copy_from": parts, "note": "same path in one scratch root"})
                continue
            _copy_into(root, workdir, rest)
        elif instr == "RUN":
            tokens = shlex.split(rest)
            script = tokens[0]
            script_path = root / (script.lstrip("/") if script.startswith("/") else f"{workdir.lstrip('/')}/{script}")
            args = tokens[1:]
            if Path(script).name == "image-install-system.sh":
                args = ["--check", *args]
            env = {**env_base, **{k: v for k, v in stage_env.items() if k != "PIP_NO_CACHE_DIR"},
                   "BPFINIT_ROOT": str(root)}
            cwd = root / workdir.lstrip("/")
            started = time.monotonic()
            proc = subprocess.run([str(script_path), *args], cwd=cwd, env=env, capture_output=True, text=True,
                                  timeout=900)
            record.append({"stage": stage, "run": rest, "executed": [Path(script).name, *args],
                           "returncode": proc.returncode, "seconds": round(time.monotonic() - started, 1)})
            if proc.returncode != 0:
                raise CheckError(f"RUN {rest} failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            if Path(script).name == "image-install-system.sh" and proc.stderr.strip():
                sys.stderr.write(proc.stderr)   # lock drift: reported loudly, not a failure (see the script)
            if Path(script).name == "image-add-user.sh":
                before = (root / "etc/passwd").read_bytes()
                again = subprocess.run([str(script_path), *args], cwd=cwd, env=env, capture_output=True, text=True,
                                       timeout=60)
                if again.returncode != 0 or (root / "etc/passwd").read_bytes() != before:
                    raise CheckError("image-add-user.sh is not idempotent")


def exercise(root: Path, instructions, record: list[dict]) -> None:
    app = root / "opt/bpfinit"
    venv_bin = app / ".venv/bin"
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "PYTHONDONTWRITEBYTECODE": "1"}
    # bpfinit-agent must start and answer without a traceback (its exit code is the agent's business).
    checks = [
        ["bpfinit-webhook", "--help"],
        ["bpfinit-agent", "--help"],
        [str(venv_bin / "python"), "-c", "import bcc, webhook.app, webhook.render, initagent.cli"],
        ["bpfinit-webhook", "manifests", "--certs=builtin", "-o", str(root / "tmp-manifests.yaml")],
    ]
    for cmd in checks:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
        record.append({"exercise": cmd[:2], "returncode": proc.returncode})
        if "Traceback" in proc.stderr or (proc.returncode != 0 and cmd[0] != "bpfinit-agent"):
            raise CheckError(f"in the built tree, {' '.join(cmd[:3])} failed:\n{proc.stderr[-2000:]}")
    user = [rest for instr, rest in instructions if instr == "USER"][-1].split(":")[0]
    entries = [line.split(":") for line in (root / "etc/passwd").read_text().splitlines()]
    if not any(e[2] == user and e[6].endswith("nologin") for e in entries if len(e) >= 7):
        raise CheckError(f"no nologin account with the USER uid {user} in the image's /etc/passwd")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dockerfile", default=str(REPO / "Dockerfile"))
    ap.add_argument("--lint-only", action="store_true")
    ap.add_argument("--record", default=None, help="write a JSON record of the steps run here")
    ap.add_argument("--keep", action="store_true", help="keep the scratch root (for debugging)")
    args = ap.parse_args(argv)
    instructions = parse_dockerfile(Path(args.dockerfile).read_text())
    problems = lint(instructions)
    record: dict = {"dockerfile_runs": [rest for instr, rest in instructions if instr == "RUN"], "steps": [],
                    "lint_problems": problems}
    status = 0
    if problems:
        print("image-build-check: Dockerfile lint failed:\n  " + "\n  ".join(problems), file=sys.stderr)
        status = 1
    elif not args.lint_only:
        root = Path(tempfile.mkdtemp(prefix="bpfinit-image-"))
        try:
            run_steps(instructions, root, record["steps"])
            exercise(root, instructions, record["steps"])
            print(f"image-build-check: {len(record['dockerfile_runs'])} RUN steps ran and the result works")
        except CheckError as exc:
            print(f"image-build-check: {exc}", file=sys.stderr)
            status = 1
        finally:
            if args.keep:
                print(f"image-build-check: scratch root kept at {root}", file=sys.stderr)
            else:
                shutil.rmtree(root, ignore_errors=True)
    else:
        print("image-build-check: Dockerfile lint passed")
    if args.record:
        Path(args.record).write_text(json.dumps(record, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
