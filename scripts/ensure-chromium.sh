#!/usr/bin/env bash
# Install Debian's `chromium` for the report test (tests/test_report.py opens report.html in headless
# Chromium) when it is missing.  Never fails the build: without root or apt, or when the install fails,
# it says why and exits 0, and the test skips with that reason.
set -uo pipefail

if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
    exit 0
fi
say() { echo "ensure-chromium: $*" >&2; }
if [ "$(id -u)" != 0 ]; then
    say "chromium is not installed and this is not root: the headless-browser report test will skip"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    say "chromium is not installed and apt-get is unavailable: the headless-browser report test will skip"
    exit 0
fi
log=$(mktemp -t ensure-chromium.XXXXXX.log)
say "installing chromium with apt-get (log: $log)"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends chromium >"$log" 2>&1; then
    # A fresh image often has no package lists yet.
    apt-get update -q >>"$log" 2>&1
    if ! apt-get install -y -q --no-install-recommends chromium >>"$log" 2>&1; then
        tail -n 5 "$log" >&2
        say "apt-get install chromium failed: the headless-browser report test will skip"
    fi
fi
exit 0
