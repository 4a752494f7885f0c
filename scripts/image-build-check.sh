#!/usr/bin/env bash
# CI check of the Dockerfile (no container engine here): lint it, then run its RUN scripts, in order,
# in a scratch root on this machine and exercise the result. See scripts/image_build_check.py.
#   image-build-check.sh [--lint-only] [--record FILE] [--keep]
set -euo pipefail
cd "$(dirname "$0")/.."
exec /usr/bin/python3 scripts/image_build_check.py "$@"
