"""Run many probe connects from one process (a pod identity): argv[1] = JSON list of [host, port, src|null].
Prints one JSON list of outcomes (tests/probe.py's format). Bounded: each connect has a 2 s timeout."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from probe import connect  # noqa: E402

probes = json.loads(sys.argv[1])
print(json.dumps([connect(host, port, src, 2.0) for host, port, src in probes[:500]]), flush=True)
