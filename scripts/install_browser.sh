#!/usr/bin/env bash
# Debian's chromium: the report test opens the HTML report in a real headless browser.
exec "$(dirname "$0")/apt_install.sh" chromium /usr/bin/chromium \
  "the headless-browser check of the HTML report is skipped"
