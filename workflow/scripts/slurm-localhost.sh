#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, for CI and for trying the workflow's SLURM profile.
#
#   workflow/scripts/slurm-localhost.sh up       # install (apt, as root) if needed, configure, start, wait
#   workflow/scripts/slurm-localhost.sh install  # apt-get install slurm-wlm slurmdbd munge mariadb-server
#   workflow/scripts/slurm-localhost.sh start    # configure + start munged, mariadbd, slurmdbd, slurmctld, slurmd
#   workflow/scripts/slurm-localhost.sh stop     # stop them again (reverse order, by pid file)
#   workflow/scripts/slurm-localhost.sh status   # sinfo + sacct reachability
#
# Debian 12 (bookworm) packages, no systemd: every daemon is started by hand. Accounting goes through
# slurmdbd + a local MariaDB (socket only), because snakemake-executor-plugin-slurm asks `sacct` for job
# states. The node declares SLURM_FAKE_GPUS (default 2) count-only GPUs: gres.conf needs a character
# device per GPU, so each is a symlink to /dev/null; jobs get CUDA_VISIBLE_DEVICES but no real GPU.
set -euo pipefail

FAKE_GPUS="${SLURM_FAKE_GPUS:-2}"
CLUSTER=smoothsal
RUN=/run/smoothsal-slurm       # pid files, fake GPU devices
STATE=/var/lib/smoothsal-slurm # controller/node state, MariaDB data
LOGS=/var/log/smoothsal-slurm
HOST="$(hostname -s)"

log() { echo "slurm-localhost: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons)"; }

install() {
    need_root
    if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v munged >/dev/null \
        && command -v mariadbd >/dev/null; then
        log "already installed: $(slurmctld -V)"
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d 101: the packages' postinst scripts must not try to start services (no systemd here)
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends slurm-wlm slurmdbd munge mariadb-server mariadb-client \
        >/dev/null || { rm -f /usr/sbin/policy-rc.d; die "apt-get install failed"; }
    rm -f /usr/sbin/policy-rc.d
    log "installed: $(slurmctld -V)"
}

configure() {
    mkdir -p "$RUN" "$STATE"/{slurmctld,slurmd,mysql} "$LOGS" /etc/slurm /run/munge /run/mysqld
    local cpus mem gres_line=""
    cpus="$(nproc)"
    mem="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)" # MB, 10 % margin
    : >/etc/slurm/gres.conf
    echo "AutoDetect=off" >>/etc/slurm/gres.conf
    for ((i = 0; i < FAKE_GPUS; i++)); do
        ln -sf /dev/null "$RUN/gpu$i"
        echo "Name=gpu File=$RUN/gpu$i" >>/etc/slurm/gres.conf
    done
    [ "$FAKE_GPUS" -gt 0 ] && gres_line="Gres=gpu:$FAKE_GPUS"
    cat >/etc/slurm/slurm.conf <<CONF
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
MinJobAge=300
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem $gres_line State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    cat >/etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
CONF
    chmod 600 /etc/slurm/slurmdbd.conf
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown -R munge:munge /etc/munge /run/munge
    chmod 0400 /etc/munge/munge.key
    if [ ! -d "$STATE/mysql/mysql" ]; then
        mariadb-install-db --user=mysql --datadir="$STATE/mysql" --auth-root-authentication-method=socket \
            >"$LOGS/mariadb-install.log" 2>&1 || die "mariadb-install-db failed, see $LOGS/mariadb-install.log"
    fi
    chown -R mysql:mysql "$STATE/mysql" /run/mysqld
}

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() { # seconds, description, command...
    local n=$1 what=$2
    shift 2
    for ((i = 0; i < n * 4; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    die "timed out after ${n}s waiting for $what (logs: $LOGS)"
}

start() {
    need_root
    command -v slurmctld >/dev/null || die "SLURM is not installed: run '$0 install' first"
    configure
    running /run/munge/munged.pid || runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    wait_for 10 munged munge -n
    if ! running /run/mysqld/mysqld.pid; then
        touch "$LOGS/mariadb.log" && chown mysql:mysql "$LOGS/mariadb.log"
        # detached, and holding none of the caller's file descriptors (a pipe left open would hang CI)
        setsid mariadbd --user=mysql --datadir="$STATE/mysql" --skip-networking --socket=/run/mysqld/mysqld.sock \
            --pid-file=/run/mysqld/mysqld.pid --log-error="$LOGS/mariadb.log" </dev/null >/dev/null 2>&1 &
    fi
    wait_for 30 mariadbd mariadb -e 'SELECT 1'
    running "$RUN/slurmdbd.pid" || slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    running "$RUN/slurmctld.pid" || slurmctld
    running "$RUN/slurmd.pid" || slurmd
    wait_for 60 "the node to be idle" bash -c "sinfo -h -N -o %T | grep -qx idle"
    wait_for 60 "a test job (srun true)" timeout 20 srun -N1 -n1 true
    log "up: $(sinfo -h -N -o '%N %T cpus=%c mem=%m gres=%G')"
}

stop_pid() { # pidfile name
    local pidfile=$1 name=$2 pid
    running "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid="$(cat "$pidfile")"
    kill "$pid"
    for ((i = 0; i < 80; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && { log "$name ($pid) did not stop: SIGKILL"; kill -9 "$pid"; }
    rm -f "$pidfile"
}

stop() {
    need_root
    stop_pid "$RUN/slurmd.pid" slurmd
    stop_pid "$RUN/slurmctld.pid" slurmctld
    stop_pid "$RUN/slurmdbd.pid" slurmdbd
    stop_pid /run/mysqld/mysqld.pid mariadbd
    stop_pid /run/munge/munged.pid munged
    log "stopped"
}

status() {
    sinfo -h -N -o '%N %T cpus=%c mem=%m gres=%G' || die "slurmctld is not answering (start it: $0 start)"
    sacct -n -X -S now-1minutes >/dev/null || die "sacct fails: slurmdbd is not answering (start it: $0 start)"
    log "up"
}

case "${1:-}" in
    install) install ;;
    start) start ;;
    up) install && start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 install|start|up|stop|status" >&2; exit 2 ;;
esac
