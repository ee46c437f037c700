#!/usr/bin/env bash
# Test infrastructure for the multi-node launch tests, on one machine pretending to be several.
#
#   tools/ci_infra.sh start   install what is missing (apt-get) and start, bound to loopback only:
#                             sshd on 127.0.0.1 and 127.0.0.2 (root, a test key), pdsh, munge,
#                             a single-node SLURM (slurmctld + slurmd), Open MPI
#   tools/ci_infra.sh stop    stop the services this script started
#   tools/ci_infra.sh status  print what is running
#
# Idempotent: `start` twice starts nothing new. Everything lives under $DPO_DS_INFRA_DIR
# (default /tmp/dpo_ds_infra); $DPO_DS_INFRA_DIR/infra.env tells the tests where to find it
# (tests/test_launchers.py, tests/test_faults.py). Needs root (apt-get, sshd, munged).
set -euo pipefail

DIR=${DPO_DS_INFRA_DIR:-/tmp/dpo_ds_infra}
SSH_PORT=${DPO_DS_SSH_PORT:-2222}
PACKAGES=(openssh-server openssh-client pdsh munge slurm-wlm openmpi-bin libopenmpi-dev)

say() { echo "ci_infra: $*"; }

is_running() {  # pid file
    [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_missing() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        say "installing ${missing[*]}"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    else
        say "packages already installed"
    fi
}

start_sshd() {
    local d=$DIR/ssh
    mkdir -p "$d" /run/sshd
    chmod 700 "$d"
    [[ -f $d/host_ed25519 ]] || ssh-keygen -q -t ed25519 -N "" -f "$d/host_ed25519"
    [[ -f $d/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N "" -C dpo_ds-test -f "$d/id_ed25519"
    cp "$d/id_ed25519.pub" "$d/authorized_keys"
    cat >"$d/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
ListenAddress 127.0.0.2
HostKey $d/host_ed25519
PidFile $d/sshd.pid
AuthorizedKeysFile $d/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
X11Forwarding no
AllowTcpForwarding no
PermitUserEnvironment no
EOF
    if is_running "$d/sshd.pid"; then
        say "sshd already running (pid $(cat "$d/sshd.pid"))"
    else
        /usr/sbin/sshd -f "$d/sshd_config" -E "$d/sshd.log"
        say "sshd started on 127.0.0.1:$SSH_PORT and 127.0.0.2:$SSH_PORT (key $d/id_ed25519)"
    fi
}

start_munge() {
    mkdir -p /run/munge "$DIR/munge"
    chown munge:munge /run/munge "$DIR/munge"
    [[ -f /etc/munge/munge.key ]] || { /usr/sbin/mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; \
                                       chown munge:munge /etc/munge/munge.key; }
    if is_running "$DIR/munge/munged.pid"; then
        say "munged already running (pid $(cat "$DIR/munge/munged.pid"))"
    else
        # Unix socket only; no network.
        runuser -u munge -- /usr/sbin/munged --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
            --socket=/run/munge/munge.socket.2
        say "munged started"
    fi
}

start_slurm() {
    local d=$DIR/slurm node
    node=$(hostname -s)
    mkdir -p "$d/state" "$d/spool" "$d/log"
    # The node as slurmd sees it (CPUs, sockets, memory), renamed to this host and addressed on loopback.
    local hw
    hw=$(slurmd -C | head -1 | sed -e "s/^NodeName=[^ ]*//" -e "s/RealMemory=[0-9]*//")
    cat >"$d/slurm.conf" <<EOF
ClusterName=dpo-ds-ci
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits this long before it starts again (default 120 s).
AuthInfo=cred_expire=10
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation=$d/state
SlurmdSpoolDir=$d/spool
SlurmctldPidFile=$d/slurmctld.pid
SlurmdPidFile=$d/slurmd.pid
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$d/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
NodeName=$node NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=ci Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$d/slurm.conf
    if is_running "$d/slurmctld.pid"; then
        say "slurmctld already running (pid $(cat "$d/slurmctld.pid"))"
    else
        slurmctld -f "$d/slurm.conf"
        say "slurmctld started (127.0.0.1:6817)"
    fi
    if is_running "$d/slurmd.pid"; then
        say "slurmd already running (pid $(cat "$d/slurmd.pid"))"
    else
        slurmd -f "$d/slurm.conf" -N "$node"
        say "slurmd started (node $node, 127.0.0.1:6818)"
    fi
    for _ in $(seq 30); do
        sinfo -h -o %T 2>/dev/null | grep -qE "^idle|^mixed|^alloc" && break
        sleep 1
    done
    scontrol update nodename="$node" state=resume 2>/dev/null || true
    say "slurm: $(sinfo -h -o '%P %D %T %c' 2>&1 | head -1)"
}

# DeepSpeed's CPU backend leaves a ~70 MB /dev/shm workspace per rank and run (RAM, on tmpfs).
# dpo_ds unlinks its own (engine.init_distributed); this removes those left by older runs or
# other programs, unless a live process still maps them.
clean_shm() {
    local f n=0
    for f in /dev/shm/deepspeed_allreduce_buffer_*; do
        [[ -e $f ]] || continue
        grep -qsF "$f" /proc/[0-9]*/maps && continue
        rm -f "$f" && n=$((n + 1))
    done
    say "removed $n stale DeepSpeed shared-memory workspaces"
}

start() {
    [[ $(id -u) == 0 ]] || { say "must run as root (apt-get, sshd, munged)"; exit 1; }
    install_missing
    clean_shm
    mkdir -p "$DIR"
    start_sshd
    start_munge
    start_slurm
    cat >"$DIR/infra.env" <<EOF
DPO_DS_SSH_PORT=$SSH_PORT
DPO_DS_SSH_KEY=$DIR/ssh/id_ed25519
SLURM_CONF=$DIR/slurm/slurm.conf
EOF
    say "mpirun: $(command -v mpirun || echo missing)"
    say "wrote $DIR/infra.env (the tests read it); for a shell: export SLURM_CONF=$DIR/slurm/slurm.conf"
}

stop_pid() {  # name, pid file
    if is_running "$2"; then
        local pid
        pid=$(cat "$2")
        kill "$pid"
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        say "stopped $1 (pid $pid)"
    else
        say "$1 was not running"
    fi
    rm -f "$2"
}

stop() {
    if [[ -f $DIR/slurm/slurm.conf ]]; then
        SLURM_CONF=$DIR/slurm/slurm.conf scancel --user=root 2>/dev/null || true
    fi
    stop_pid slurmd "$DIR/slurm/slurmd.pid"
    stop_pid slurmctld "$DIR/slurm/slurmctld.pid"
    stop_pid munged "$DIR/munge/munged.pid"
    stop_pid sshd "$DIR/ssh/sshd.pid"
    rm -f "$DIR/infra.env"
    clean_shm
}

status() {
    for f in ssh/sshd.pid munge/munged.pid slurm/slurmctld.pid slurm/slurmd.pid; do
        if is_running "$DIR/$f"; then say "$(basename "$f" .pid): running (pid $(cat "$DIR/$f"))"
        else say "$(basename "$f" .pid): not running"; fi
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
