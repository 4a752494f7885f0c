"""Subprocesses (the HTTPS server, `bpfinit-webhook audit`, ...) must run this checkout's code.

The venv's editable install maps `webhook`/`initagent` to whichever checkout it was installed from
(e.g. another git worktree). pytest itself imports from the rootdir, but a subprocess started with
another cwd would silently exercise the other checkout. Putting the rootdir first on PYTHONPATH makes
both sides agree (a no-op in the checkout the venv was installed from).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1])
_current = os.environ.get("PYTHONPATH", "")
if REPO not in _current.split(os.pathsep):
    os.environ["PYTHONPATH"] = REPO + (os.pathsep + _current if _current else "")
