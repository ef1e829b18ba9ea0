#!/usr/bin/env bash
# Usage: scripts/ensure-package.sh PACKAGE COMMAND [COMMAND...]
# Install the Debian PACKAGE with apt-get unless one of the COMMANDs is already on the PATH.  Exits 0
# when a COMMAND is available afterwards; otherwise 1, having said why (not root, no apt-get, the
# install failed: the last lines of its log), so that the caller decides whether that is fatal.
set -uo pipefail

package=$1
shift
found() { for command in "$@"; do command -v "$command" >/dev/null && return 0; done; return 1; }
say() { echo "ensure-package: $*" >&2; }

found "$@" && exit 0
if [ "$(id -u)" != 0 ]; then
    say "$package is not installed ($*) and this is not root: install it with your package manager"
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    say "$package is not installed ($*) and apt-get is unavailable: install it with your package manager"
    exit 1
fi
log=$(mktemp -t "ensure-$package.XXXXXX.log")
say "installing $package with apt-get (log: $log)"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends "$package" >"$log" 2>&1; then
    # A fresh image often has no package lists yet.
    apt-get update -q >>"$log" 2>&1
    if ! apt-get install -y -q --no-install-recommends "$package" >>"$log" 2>&1; then
        tail -n 5 "$log" >&2
        say "apt-get install $package failed"
        exit 1
    fi
fi
found "$@" || { say "$package installed but none of $* is on the PATH"; exit 1; }
