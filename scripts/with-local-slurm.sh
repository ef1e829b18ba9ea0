#!/usr/bin/env bash
# with-local-slurm.sh COMMAND...: run COMMAND with the local SLURM cluster of local-slurm.sh up.
#
# Starts the cluster first (installing SLURM when missing); when that is impossible (not root, no
# apt, a daemon that will not start) it says why and runs COMMAND anyway: the SLURM tests then skip
# with the reason.  A cluster this script started is stopped when COMMAND ends, whether it passed,
# failed or was interrupted; one that was already running is left running.  Exits with COMMAND's status.
set -u
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if "$here/local-slurm.sh" status >/dev/null 2>&1; then
    echo "with-local-slurm: local SLURM already running; left running afterwards"
else
    trap '"$here/local-slurm.sh" stop' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    start=$SECONDS
    if "$here/local-slurm.sh" start; then
        echo "with-local-slurm: local SLURM up in $((SECONDS - start)) s"
    else
        echo "with-local-slurm: local SLURM not available (exit $?): its tests will be skipped, saying why"
    fi
fi
"$@"
