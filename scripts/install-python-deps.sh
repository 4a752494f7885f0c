#!/usr/bin/env bash
# Creates .venv from Debian's python3 (so Debian's bcc is importable) and installs bpfinit into it.
#   --runtime : without the test extras (used by the Dockerfile)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="[test]"
[ "${1:-}" = "--runtime" ] && extras=""
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e ".${extras}"
