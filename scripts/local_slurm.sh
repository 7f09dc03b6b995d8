#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, without systemd: try a SLURM sweep on a laptop
# before the cluster, and run the SLURM tests. It installs nothing; it needs Debian's slurm-wlm and
# munge packages (sudo apt-get install slurm-wlm munge).
#
#   eval "$(sudo scripts/local_slurm.sh start)"  # munged, slurmctld, slurmd; exports SLURM_CONF
#   sinfo                                        # partition "local", this machine's node, idle
#   python train.py -m hydra/launcher=slurm hydra.launcher.partition=local ...
#   sudo scripts/local_slurm.sh status           # what runs
#   sudo scripts/local_slurm.sh stop             # cancels the jobs left, stops the daemons
#
# The daemons run as root (slurmd starts each job as the user who submitted it); any user can
# submit.
# Everything (config, munge key and socket, state, spool, logs) lives in LOCAL_SLURM_DIR
# (default: $TMPDIR/local_slurm). Messages go to stderr; stdout gets only the `export` line(s).
# Environment: LOCAL_SLURM_DIR, LOCAL_SLURM_PORT (slurmctld's port, slurmd uses the next one;
# default 6817), LOCAL_SLURM_TIMEOUT (seconds to wait for the node to be idle, default 60).
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-${TMPDIR:-/tmp}/local_slurm}
PORT=${LOCAL_SLURM_PORT:-6817}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}
CONF=$DIR/slurm.conf
PATH=$PATH:/usr/sbin:/sbin # the daemons, for users whose PATH lacks them
MUNGE_SOCKET=$DIR/munge/munge.socket.2
export SLURM_CONF=$CONF

say() { echo "local_slurm: $*" >&2; }
die() {
	say "error: $*"
	exit 1
}

# pid of a daemon from its pid file, if that process still runs and is that daemon
running() {
	local pid
	[[ -f $DIR/$1.pid ]] && pid=$(<"$DIR/$1.pid") && [[ -n $pid ]] &&
		[[ $(ps -p "$pid" -o comm= 2>/dev/null) == "$1" ]] && echo "$pid"
}

check_installed() {
	# slurmd starts each job as the user who submitted it: that needs root
	[[ $(id -u) == 0 ]] || die "the daemons run as root (slurmd starts jobs as their users): sudo $0 start"
	local missing=()
	for cmd in munged slurmctld slurmd sinfo squeue sbatch scancel scontrol; do
		command -v "$cmd" >/dev/null || missing+=("$cmd")
	done
	if ((${#missing[@]})); then
		die "${missing[*]} not found: install Debian's packages with 'sudo apt-get install slurm-wlm munge'"
	fi
}

write_config() {
	# This machine's node line as slurmd measures it (cores, sockets, memory).
	local node mem cpus
	node=$(slurmd -C | head -n 1)
	mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
	cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
	cat >"$CONF" <<EOF
# Written by scripts/local_slurm.sh: a single-node cluster for tests, no accounting, no cgroups.
ClusterName=local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it runs again (default 120 s); a step must
# start within it, which takes a second on one machine
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=15
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# a job without a memory request gets its share per core, so that 1-core jobs run side by side
DefMemPerCPU=$((mem / cpus))
# look at pending jobs every 2 s, not 60 (a requeued job waits for a pass once cred_expire is over)
SchedulerParameters=sched_interval=2
# a cancelled job gets SIGKILL this many seconds after SIGTERM (default 30)
KillWait=5
ReturnToService=2
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

# idle, mix, alloc, down, ... or nothing while slurmctld does not answer
node_state() { sinfo -h -N -o %t 2>/dev/null | head -n 1 || true; }

start() {
	check_installed
	mkdir -p "$DIR"/{munge,state,spool,log}
	chmod 755 "$DIR/munge" # clients reach the socket; the key itself is 0600
	if [[ -n $(running slurmctld) && -n $(running slurmd) && -n $(running munged) ]]; then
		say "already running in $DIR"
		echo "export SLURM_CONF=$CONF"
		return
	fi
	local port
	for port in "$PORT" "$((PORT + 1))"; do # another cluster would answer our clients instead
		if [[ -z $(running slurmctld) ]] && (: </dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
			die "port $port is taken (another SLURM?): set LOCAL_SLURM_PORT to a free pair of ports"
		fi
	done
	write_config
	if [[ -z $(running munged) ]]; then
		[[ -f $DIR/munge/munge.key ]] ||
			(umask 077 && head -c 1024 /dev/urandom >"$DIR/munge/munge.key")
		# --force: munged otherwise refuses a socket under a folder that not all may enter (pytest's
		# temporary folders are 0700); only root's clients can reach it there, and that is enough.
		munged --force --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
			--pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" \
			--seed-file="$DIR/munge/munged.seed" ||
			die "munged did not start; see $DIR/log/munged.log"
	fi
	[[ -n $(running slurmctld) ]] || slurmctld -f "$CONF" ||
		die "slurmctld did not start; see $DIR/log/slurmctld.log"
	[[ -n $(running slurmd) ]] || slurmd -f "$CONF" ||
		die "slurmd did not start; see $DIR/log/slurmd.log"
	local waited=0 state=""
	while state=$(node_state) && [[ ! $state =~ ^(idle|mix|alloc) ]]; do
		((waited++ < TIMEOUT)) ||
			die "the node is '${state:-unreachable}' after ${TIMEOUT} s; see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
		sleep 1
	done
	say "node $(hostname -s) is $state: munged, slurmctld and slurmd run in $DIR"
	echo "export SLURM_CONF=$CONF"
}

stop() {
	if [[ -n $(running slurmctld) && -n $(squeue -h -o %i 2>/dev/null) ]]; then
		say "cancelling the jobs left: $(squeue -h -o %i | tr '\n' ' ')"
		scancel --partition=local 2>/dev/null || true
		# their processes get SIGKILL after KillWait (5 s): stopping slurmd first would orphan them
		for _ in $(seq 30); do
			[[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
			sleep 0.5
		done
	fi
	local name pid stopped=0
	for name in slurmd slurmctld munged; do
		pid=$(running "$name") || continue
		stopped=$((stopped + 1))
		kill "$pid"
		for _ in $(seq 50); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.2
		done
		if kill -0 "$pid" 2>/dev/null; then
			say "$name (pid $pid) ignored SIGTERM for 10 s: killing it"
			kill -9 "$pid"
		fi
		say "stopped $name (pid $pid)"
	done
	((stopped)) || say "nothing runs in $DIR"
}

status() {
	local name pid up=0
	for name in munged slurmctld slurmd; do
		if pid=$(running "$name"); then
			say "$name runs (pid $pid)"
			up=$((up + 1))
		else
			say "$name does not run"
		fi
	done
	if ((up == 3)); then
		sinfo >&2
		echo "export SLURM_CONF=$CONF"
	fi
}

case ${1:-} in
start | stop | status) "$1" ;;
*)
	echo "usage: $0 start|stop|status   (files in LOCAL_SLURM_DIR, now $DIR)" >&2
	exit 2
	;;
esac
