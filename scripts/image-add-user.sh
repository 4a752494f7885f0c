#!/usr/bin/env bash
# Adds the image's non-root user `bpfinit` (uid/gid 65532, no login, no home) to ROOT/etc (default /).
# Idempotent: an existing entry with the same uid is left alone; a conflicting one is an error.
set -euo pipefail
root="${BPFINIT_ROOT:-/}"
uid=65532
name=bpfinit
passwd="$root/etc/passwd"
group="$root/etc/group"
[ -f "$passwd" ] && [ -f "$group" ] || { echo "image-add-user: no $passwd or $group" >&2; exit 1; }

existing="$(awk -F: -v n="$name" '$1 == n { print $3 }' "$passwd")"
if [ -n "$existing" ]; then
  [ "$existing" = "$uid" ] || { echo "image-add-user: user $name exists with uid $existing, want $uid" >&2; exit 1; }
else
  if awk -F: -v u="$uid" '$3 == u { found = 1 } END { exit !found }' "$passwd"; then
    echo "image-add-user: uid $uid is taken by another user" >&2; exit 1
  fi
  echo "$name:x:$uid:$uid:bpfinit webhook:/nonexistent:/usr/sbin/nologin" >>"$passwd"
fi
if ! awk -F: -v n="$name" '$1 == n { found = 1 } END { exit !found }' "$group"; then
  echo "$name:x:$uid:" >>"$group"
fi
echo "image-add-user: $name ($uid) present in $root"
