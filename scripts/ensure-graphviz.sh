#!/usr/bin/env bash
# Install Graphviz (`dot`) for `make docs` when it is missing: the workflow graphs of the documentation
# are drawn by Nipype's write_graph, which calls `dot`.  Unlike the test helpers, this fails when `dot`
# stays missing (not root, no apt-get, or the install failed), saying why: the docs cannot be built
# without it.  Install it yourself with your package manager (Debian/Ubuntu: apt-get install graphviz).
set -uo pipefail

if command -v dot >/dev/null; then
    exit 0
fi
say() { echo "ensure-graphviz: $*" >&2; }
if [ "$(id -u)" != 0 ]; then
    say "Graphviz (dot) is not installed and this is not root: install the graphviz package, then rerun"
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    say "Graphviz (dot) is not installed and apt-get is unavailable: install Graphviz, then rerun"
    exit 1
fi
log=$(mktemp -t ensure-graphviz.XXXXXX.log)
say "installing graphviz with apt-get (log: $log)"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends graphviz >"$log" 2>&1; then
    # A fresh image often has no package lists yet.
    apt-get update -q >>"$log" 2>&1
    if ! apt-get install -y -q --no-install-recommends graphviz >>"$log" 2>&1; then
        tail -n 5 "$log" >&2
        say "apt-get install graphviz failed"
        exit 1
    fi
fi
command -v dot >/dev/null || { say "graphviz installed but dot is not on the PATH"; exit 1; }
exit 0
