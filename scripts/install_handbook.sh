#!/usr/bin/env bash
# Debian's debian-handbook: paragraph-parallel text in six of the demo languages (optional).
exec "$(dirname "$0")/apt_install.sh" debian-handbook /usr/share/doc/debian-handbook/html/en-US \
  "the demo corpus will use dataset-build alone (no parallel text)"
