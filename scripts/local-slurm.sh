#!/usr/bin/env bash
# A private single-node SLURM cluster on this machine, for tests and trials.
#
#   scripts/local-slurm.sh start    install (if missing), configure, start; wait until the node is idle
#   scripts/local-slurm.sh stop     cancel its jobs, stop exactly the daemons it started (pid files)
#   scripts/local-slurm.sh status   exit 0 when it runs (prints the SLURM_CONF to use), else 1 and why
#   scripts/local-slurm.sh env      print `export SLURM_CONF=...` (for eval)
#
# Everything lives in one folder: $LOCAL_SLURM_DIR (default: <repo>/.slurm): slurm.conf, a private
# munge key and socket, state, spool, logs and pid files.  Its own ports ($LOCAL_SLURM_PORT and the
# next one; default 16817/16818) and munge socket keep it apart from any other SLURM on the machine.
# Client commands find it through SLURM_CONF:  export SLURM_CONF=$LOCAL_SLURM_DIR/etc/slurm.conf
#
# Debian/Ubuntu only (apt): `start` installs slurm-wlm and munge when they are missing, with a
# temporary /usr/sbin/policy-rc.d so that the packages do not start their own services.  Needs root.
# `start` twice is harmless; `stop` never kills by name.
#
# Exit codes (tests skip on anything but 0, quoting the message):
#   0  done / running          1  status: not running      2  usage
#   10 not root                11 SLURM/munge missing and cannot be installed (no apt-get, apt failed)
#   12 a daemon did not start, or the node did not become idle (log tail printed)
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${LOCAL_SLURM_DIR:-$REPO/.slurm}
PORT=${LOCAL_SLURM_PORT:-16817}
CLUSTER=inrlddmm-local
CONF=$DIR/etc/slurm.conf
MUNGE_DIR=$DIR/munge
SOCKET=$MUNGE_DIR/munge.socket
PIDS=$DIR/run
LOGS=$DIR/log
ERROR_FILE=$DIR/last-error
IDLE_TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}

EX_NOT_RUNNING=1 EX_USAGE=2 EX_NOT_ROOT=10 EX_INSTALL=11 EX_START=12

say() { echo "local-slurm: $*"; }

# fail CODE MESSAGE: print, remember the reason for `status` (and the tests), exit.
fail() {
    local code=$1; shift
    echo "local-slurm: $*" >&2
    if [ -d "$DIR" ]; then printf '%s\n' "$*" > "$ERROR_FILE"; fi
    exit "$code"
}

# alive NAME: the daemon NAME (munged, slurmctld, slurmd) runs under the pid its pid file names.
# The process name is checked too, so a recycled pid is never taken for (or killed as) ours.
alive() {
    local pidfile=$PIDS/$1.pid pid
    [ "$1" = munged ] && pidfile=$MUNGE_DIR/munged.pid
    [ -s "$pidfile" ] || return 1
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

pid_of() {
    if [ "$1" = munged ]; then cat "$MUNGE_DIR/munged.pid"; else cat "$PIDS/$1.pid"; fi
}

node_name() { hostname -s; }

# node_state: sinfo's state of our node (idle, mix, alloc, down*, drain, ...), empty when unreachable.
node_state() {
    SLURM_CONF=$CONF timeout 10 sinfo -h -N -n "$(node_name)" -o %t 2>/dev/null | head -n 1
}

running() {
    alive munged && alive slurmctld && alive slurmd && [ -n "$(node_state)" ]
}

log_tail() {
    local file
    for file in "$@"; do
        [ -s "$file" ] && { echo "--- last lines of $file:"; tail -n 15 "$file"; }
    done
    return 0
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && command -v mungekey >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null || fail $EX_INSTALL "slurm-wlm/munge are not installed and apt-get is" \
        "unavailable: install SLURM and munge by hand"
    say "installing slurm-wlm and munge with apt-get (about a minute)"
    # The packages' maintainer scripts would start slurmctld/slurmd/munge through invoke-rc.d, which
    # fails (no slurm.conf yet) and is not wanted: a policy-rc.d exiting 101 forbids it.  A policy-rc.d
    # already present (e.g. Docker's) is left alone.
    local policy=/usr/sbin/policy-rc.d ours=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# written by local-slurm.sh during apt-get; removed afterwards\nexit 101\n' > "$policy"
        chmod 755 "$policy"
        ours=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    local status=0
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends slurm-wlm munge > "$DIR/apt.log" 2>&1; then
        apt-get update -q >> "$DIR/apt.log" 2>&1
        apt-get install -y -q --no-install-recommends slurm-wlm munge >> "$DIR/apt.log" 2>&1 || status=$?
    fi
    if [ -n "$ours" ]; then rm -f "$policy"; trap - EXIT; fi
    if [ "$status" != 0 ]; then
        tail -n 20 "$DIR/apt.log" >&2
        fail $EX_INSTALL "apt-get install slurm-wlm munge failed (exit $status; log in $DIR/apt.log)"
    fi
    say "installed $(dpkg-query -W -f '${Package} ${Version}' slurm-wlm) and munge"
}

# Host name resolution and a cgroup filesystem (slurmd 22.05 will not start without one, even with
# proctrack/linuxproc and task/none).  What is changed here is recorded and undone by `stop`.
prepare_host() {
    local host
    host=$(node_name)
    if ! getent hosts "$host" >/dev/null; then
        echo "127.0.0.1 $host # local-slurm.sh $DIR" >> /etc/hosts
        echo "$host" > "$DIR/added-hosts-entry"
        say "added '127.0.0.1 $host' to /etc/hosts"
    fi
    if ! mountpoint -q /sys/fs/cgroup; then
        mkdir -p /sys/fs/cgroup
        mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null || mount -t tmpfs cgroup_root /sys/fs/cgroup \
            || fail $EX_START "no cgroup filesystem at /sys/fs/cgroup and mounting one failed"
        touch "$DIR/mounted-cgroup"
        say "mounted a cgroup filesystem at /sys/fs/cgroup"
    fi
}

write_config() {
    local host cpus mem_mb
    host=$(node_name)
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$DIR/etc" "$DIR/state" "$DIR/spool" "$PIDS" "$LOGS"
    cat > "$CONF.new" <<EOF
# Written by scripts/local-slurm.sh: a private single-node cluster (see that script).
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Enforce each job's --mem as a cluster does (a study must survive a job killed for memory): without
# cgroups, sample the job's processes every second and kill a job over its limit.
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/builtin
# Start a job as soon as it is submitted (the default waits for the next scheduling pass), cancel
# jobs whose dependency can never be met (SLURMGraph after a failed node), forget finished jobs fast.
SchedulerParameters=batch_sched_delay=0,kill_invalid_depend
SchedulerTimeSlice=5
MinJobAge=2
KillWait=2
CompleteWait=0
MessageTimeout=10
MailProg=/bin/true
SlurmdTimeout=60
InactiveLimit=0
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.new" "$CONF"
    printf 'export SLURM_CONF=%s\n' "$CONF" > "$DIR/env"
}

start_munged() {
    alive munged && return 0
    id munge >/dev/null 2>&1 || fail $EX_START "user 'munge' does not exist (is the munge package installed?)"
    # munged wants its socket folder owned by itself (or root) and world-executable, not world-writable.
    mkdir -p "$MUNGE_DIR"
    chown munge:munge "$MUNGE_DIR"
    chmod 0755 "$MUNGE_DIR"
    if [ ! -s "$MUNGE_DIR/munge.key" ]; then
        mungekey --create --keyfile="$MUNGE_DIR/munge.key" >/dev/null 2>&1 \
            || dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1 count=1024 status=none
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 0600 "$MUNGE_DIR/munge.key"
    rm -f "$SOCKET" "$SOCKET.lock"
    runuser -u munge -- munged --socket="$SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" > "$LOGS/munged.out" 2>&1 \
        || { cat "$LOGS/munged.out" >&2; log_tail "$MUNGE_DIR/munged.log" >&2; fail $EX_START "munged did not start"; }
    local i
    for i in $(seq 50); do
        if alive munged && munge -n -S "$SOCKET" 2>/dev/null | unmunge -S "$SOCKET" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    log_tail "$MUNGE_DIR/munged.log" >&2
    fail $EX_START "munged started but does not answer on $SOCKET"
}

start_slurm_daemon() {  # NAME
    alive "$1" && return 0
    rm -f "$PIDS/$1.pid"
    "$1" -f "$CONF" > "$LOGS/$1.out" 2>&1 \
        || { cat "$LOGS/$1.out" >&2; log_tail "$LOGS/$1.log" >&2; fail $EX_START "$1 did not start"; }
    local i
    for i in $(seq 100); do
        alive "$1" && return 0
        sleep 0.1
    done
    cat "$LOGS/$1.out" >&2
    log_tail "$LOGS/$1.log" >&2
    fail $EX_START "$1 exited right after starting (see $LOGS/$1.log)"
}

wait_idle() {
    local host state i
    host=$(node_name)
    for i in $(seq $((IDLE_TIMEOUT * 2))); do
        state=$(node_state)
        case "$state" in
            idle|mix|alloc|comp*) return 0 ;;
            down*|drain*|drng*|fail*)
                # e.g. left down by an earlier run, or "Not responding" before slurmd registered
                SLURM_CONF=$CONF scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 ;;
        esac
        alive slurmctld || break
        alive slurmd || break
        sleep 0.5
    done
    log_tail "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2
    fail $EX_START "node $host is not idle after ${IDLE_TIMEOUT}s (state: '${state:-no answer}')"
}

cmd_start() {
    mkdir -p "$DIR" 2>/dev/null  # first, so that a failure can be recorded for `status`
    [ "$(id -u)" = 0 ] || fail $EX_NOT_ROOT "needs root (it installs packages, runs the daemons as root); uid $(id -u)"
    chmod 0755 "$DIR"
    rm -f "$ERROR_FILE"
    if running; then
        say "already running ($(node_name): $(node_state)); export SLURM_CONF=$CONF"
        return 0
    fi
    local t0=$SECONDS
    install_packages
    prepare_host
    # The configuration is rewritten only while the controller is down (it would not read it anyway).
    alive slurmctld || write_config
    start_munged
    start_slurm_daemon slurmctld
    start_slurm_daemon slurmd
    wait_idle
    say "running in $((SECONDS - t0)) s: node $(node_name) $(node_state), ports $PORT/$((PORT + 1))"
    say "use it with: export SLURM_CONF=$CONF"
}

# stop_daemon NAME: SIGTERM the pid of NAME's pid file, then SIGKILL after 10 s.
stop_daemon() {
    alive "$1" || { [ "$1" = munged ] || rm -f "$PIDS/$1.pid"; return 0; }
    local pid i
    pid=$(pid_of "$1")
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]; then
        say "$1 ($pid) ignored SIGTERM for 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null
    fi
    say "stopped $1 ($pid)"
}

cmd_stop() {
    [ -d "$DIR" ] || { say "nothing to stop ($DIR does not exist)"; return 0; }
    [ "$(id -u)" = 0 ] || fail $EX_NOT_ROOT "needs root to stop the daemons; not root"
    if alive slurmctld; then
        # This cluster's own jobs only (SLURM_CONF points at it): their processes would outlive slurmd.
        local jobs i
        jobs=$(SLURM_CONF=$CONF timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
        if [ -n "${jobs// /}" ]; then
            say "cancelling jobs $jobs"
            SLURM_CONF=$CONF scancel $jobs 2>/dev/null
            for i in $(seq 50); do
                [ -z "$(SLURM_CONF=$CONF timeout 10 squeue -h -o %i 2>/dev/null)" ] && break
                sleep 0.2
            done
        fi
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
    if [ -f "$DIR/mounted-cgroup" ]; then
        umount /sys/fs/cgroup 2>/dev/null && say "unmounted /sys/fs/cgroup"
        rm -f "$DIR/mounted-cgroup"
    fi
    if [ -f "$DIR/added-hosts-entry" ]; then
        local marker="# local-slurm.sh $DIR"
        grep -vF "$marker" /etc/hosts > /etc/hosts.local-slurm && cat /etc/hosts.local-slurm > /etc/hosts
        rm -f /etc/hosts.local-slurm "$DIR/added-hosts-entry"
    fi
    return 0
}

cmd_status() {
    if running; then
        say "running: node $(node_name) $(node_state), ports $PORT/$((PORT + 1)), folder $DIR"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    local why="not running"
    [ -d "$DIR" ] || why="not running ($DIR does not exist: run scripts/local-slurm.sh start)"
    if [ -d "$DIR" ]; then
        local name missing=""
        for name in munged slurmctld slurmd; do alive "$name" || missing="$missing $name"; done
        [ -n "$missing" ] && why="not running (daemons down:$missing)" || why="not running (sinfo does not answer)"
        [ -s "$ERROR_FILE" ] && why="$why; last start failed: $(cat "$ERROR_FILE")"
    fi
    echo "local-slurm: $why"
    return $EX_NOT_RUNNING
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env   (folder: \$LOCAL_SLURM_DIR, default $REPO/.slurm)" >&2
       exit $EX_USAGE ;;
esac
