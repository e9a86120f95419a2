#!/usr/bin/env bash
# Installs Debian's debian-handbook (paragraph-parallel text in six of the demo languages) when this
# machine can; prints why not otherwise. Never fails: the demo corpus is complete without it.
set -u
dir=/usr/share/doc/debian-handbook/html
[ -d "$dir/en-US" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: no apt-get here; the demo corpus will use dataset-build alone (no parallel text)." >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "note: cannot install debian-handbook without root; run 'apt-get install debian-handbook' to add parallel text." >&2
    exit 0
  fi
fi
$sudo apt-get install -y -qq debian-handbook >/dev/null 2>&1 \
  || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq debian-handbook >/dev/null 2>&1; } \
  || echo "note: debian-handbook could not be installed; the demo corpus will use dataset-build alone." >&2
exit 0
