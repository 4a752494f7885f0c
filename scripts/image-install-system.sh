#!/usr/bin/env bash
# Installs the pinned Debian packages of one image stage (scripts/image-packages.lock).
#   image-install-system.sh build|runtime   install what is missing or at another version (Dockerfile)
#   image-install-system.sh --check STAGE   change nothing; compare this machine with the lock (CI):
#       a locked package that is NOT INSTALLED fails (exit 1): the image recipe would be incomplete;
#       a package at ANOTHER VERSION is reported loudly on stderr but does not fail (exit 0). CI machines
#       install today's Debian versions (scripts/install-system-deps.sh), and a Debian point release
#       moving a package is not a product failure. Refresh the lock when you see the report.
#   image-install-system.sh --check --strict STAGE   version drift fails too (before a release build)
#   image-install-system.sh --lock          rewrite the lock's versions from this machine (maintainers)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
lock="$here/image-packages.lock"

# The version of an installed package, or nothing. A removed package whose config files remain still has
# a version in dpkg's database, so the status must say "install ok installed".
installed_version() {
  local status
  status="$(dpkg-query -W -f='${Status}|${Version}' "$1" 2>/dev/null || true)"
  case "$status" in
    'install ok installed|'*) echo "${status#*|}" ;;
  esac
}

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
strict=false
if [ "${1:-}" = "--check" ]; then check=true; shift; fi
if $check && [ "${1:-}" = "--strict" ]; then strict=true; shift; fi
stage="${1:-}"
case "$stage" in
  build|runtime) ;;
  *) echo "usage: $0 [--check [--strict]] build|runtime | --lock" >&2; exit 2 ;;
esac

want=()
missing=()
drift=()
while read -r s pkg ver; do
  [ "$s" = "$stage" ] || continue
  have="$(installed_version "$pkg")"
  if [ -z "$have" ]; then
    want+=("$pkg=$ver")
    missing+=("$pkg: locked $ver, NOT INSTALLED")
  elif [ "$have" != "$ver" ]; then
    want+=("$pkg=$ver")
    drift+=("$pkg: locked $ver, installed $have")
  fi
done < <(grep -v -e '^#' -e '^$' "$lock")

if $check; then
  if [ "${#drift[@]}" -gt 0 ]; then
    if $strict; then level=ERROR; else level=WARNING; fi
    {
      printf '##########\n'
      printf 'image-install-system: %s: VERSION DRIFT from %s (%s stage):\n' "$level" "$lock" "$stage"
      printf '  %s\n' "${drift[@]}"
      echo "  the image would install the locked versions; this machine runs others (e.g. a Debian point release)."
      echo "  refresh the lock with scripts/image-install-system.sh --lock on an up-to-date builder, and rebuild"
      $strict || echo "  (not a failure: only missing packages fail --check; --check --strict fails on drift too)"
      printf '##########\n'
    } >&2
  fi
  if [ "${#missing[@]}" -gt 0 ]; then
    printf 'image-install-system: ERROR: packages of the %s stage are missing on this machine:\n' "$stage" >&2
    printf '  %s\n' "${missing[@]}" >&2
    echo "  install them (scripts/install-system-deps.sh) or fix $lock" >&2
    exit 1
  fi
  if [ "${#drift[@]}" -gt 0 ]; then
    $strict && exit 1
    echo "image-install-system: $stage stage: every locked package is installed (${#drift[@]} at another version, see stderr)"
    exit 0
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
