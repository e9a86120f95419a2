#!/usr/bin/env bash
# apt_install.sh PACKAGE PRESENT_IF WHAT_WITHOUT: installs a Debian package when this machine can (root or
# password-less sudo, apt-get present); otherwise prints why not and what is missing without it. Never
# fails: everything that uses these packages works (or is skipped, saying so) without them.
set -u
package=$1 present_if=$2 without=$3
[ -e "$present_if" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: no apt-get here, so no $package: $without" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "note: cannot install $package without root (run 'apt-get install $package'): $without" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -qq "$package" >/dev/null 2>&1 \
  || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq "$package" >/dev/null 2>&1; } \
  || echo "note: $package could not be installed: $without" >&2
exit 0
