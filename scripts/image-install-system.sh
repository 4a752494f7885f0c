#!/usr/bin/env bash
# Installs the pinned Debian packages of one image stage (scripts/image-packages.lock).
#   image-install-system.sh build|runtime   install what is missing or at another version (Dockerfile)
#   image-install-system.sh --check STAGE   change nothing; fail if this machine differs from the lock (CI)
#   image-install-system.sh --lock          rewrite the lock's versions from this machine (maintainers)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
lock="$here/image-packages.lock"

installed_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }

if [ "${1:-}" = "--lock" ]; then
  tmp="$(mktemp)"
  while IFS= read -r line; do
    case "$line" in
      ''|'#'*) echo "$line" ;;
      *) read -r stage pkg _ <<<"$line"
         ver="$(installed_version "$pkg")"
         [ -n "$ver" ] || { echo "image-install-system: $pkg is not installed here; cannot lock it" >&2; exit 1; }
         echo "$stage $pkg $ver" ;;
    esac
  done <"$lock" >"$tmp"
  mv "$tmp" "$lock"
  exit 0
fi

check=false
if [ "${1:-}" = "--check" ]; then check=true; shift; fi
stage="${1:-}"
case "$stage" in
  build|runtime) ;;
  *) echo "usage: $0 [--check] build|runtime | --lock" >&2; exit 2 ;;
esac

want=()
bad=()
while read -r s pkg ver; do
  [ "$s" = "$stage" ] || continue
  have="$(installed_version "$pkg")"
  if [ "$have" != "$ver" ]; then
    want+=("$pkg=$ver")
    bad+=("$pkg: locked $ver, installed ${have:-nothing}")
  fi
done < <(grep -v -e '^#' -e '^$' "$lock")

if $check; then
  if [ "${#bad[@]}" -gt 0 ]; then
    printf 'image-install-system: this machine differs from %s (%s stage):\n' "$lock" "$stage" >&2
    printf '  %s\n' "${bad[@]}" >&2
    echo "  refresh the lock with scripts/image-install-system.sh --lock (and rebuild the image)" >&2
    exit 1
  fi
  echo "image-install-system: $stage stage matches the lock"
  exit 0
fi

if [ "${#want[@]}" -eq 0 ]; then
  echo "image-install-system: $stage stage already installed at the locked versions"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${want[@]}"
# An image layer must not carry apt's lists or caches.
if [ "${BPFINIT_IN_IMAGE_BUILD:-}" = 1 ]; then
  apt-get clean
  rm -rf /var/lib/apt/lists/*
fi
