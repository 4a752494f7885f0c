#!/usr/bin/env bash
# System packages bpfinit needs, from Debian. Used by `make setup`, CI and the Dockerfile.
#   --runtime : only what the image needs at run time (bcc, headers, iproute2)
#   (default) : runtime + what the tests and benchmarks use (HAProxy, iptables, wrk, hey, dig, kubectl,
#               nginx-light as the benchmark's --app nginx)
set -euo pipefail
want=runtime-and-test
[ "${1:-}" = "--runtime" ] && want=runtime

runtime_pkgs=(python3 python3-venv python3-pip python3-bpfcc linux-headers-amd64 iproute2 ca-certificates)
test_pkgs=(haproxy iptables wrk hey dnsutils libcap2-bin procps make kubectl bpftool nginx-light)

pkgs=("${runtime_pkgs[@]}")
[ "$want" = runtime-and-test ] && pkgs+=("${test_pkgs[@]}")

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Packages installed for tests must not start services on the host (nginx would listen on :80):
  # a policy-rc.d that refuses every start, for the install only, unless one is already there.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
