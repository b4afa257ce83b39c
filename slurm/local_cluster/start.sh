#!/usr/bin/env bash
# Install (once) and start a single-node Slurm cluster on this Debian machine, by hand (no systemd):
# munged, MariaDB, slurmdbd, slurmctld, slurmd, each in its own session, its PID recorded in
# $STATE/pids/NAME.pid so that stop.sh ends exactly these processes. Needs root and apt-get.
# Idempotent: packages already installed are not reinstalled, daemons already running are kept.
#
#   slurm/local_cluster/start.sh        # ~30 s the first time on a fresh machine, ~5 s after
#   slurm/local_cluster/stop.sh
#
# Accounting (slurmdbd + MariaDB) is not optional here: without it sacct is disabled, and submitit
# can neither tell a job's state nor notice that a job was cancelled.
set -euo pipefail

STATE=${BATON_SLURM_STATE:-/var/lib/baton-slurm}
CLUSTER=${BATON_SLURM_CLUSTER:-baton}
PIDS=$STATE/pids
LOGS=/var/log/slurm
DB_PASS=baton-slurmdbd
PACKAGES="munge slurmctld slurmd slurm-client slurmdbd mariadb-server"

die() { echo "start.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (it installs packages and runs the Slurm daemons)"
[ -f /etc/debian_version ] || die "needs a Debian machine (apt packages: $PACKAGES)"

alive() {  # alive NAME: the recorded process of NAME still runs
  local f=$PIDS/$1.pid
  [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll COMMAND until it succeeds
  local limit=$1 what=$2; shift 2
  local t=0
  until "$@" >/dev/null 2>&1; do
    t=$((t + 1))
    [ $t -le $((limit * 5)) ] || die "$what not ready after ${limit}s (logs in $LOGS)"
    sleep 0.2
  done
}

launch() {  # launch NAME COMMAND...: run COMMAND in its own session, in the background, record its PID
  local name=$1; shift
  if alive "$name"; then return 0; fi
  setsid "$@" </dev/null >>"$LOGS/$name.out" 2>&1 &
  echo $! >"$PIDS/$name.pid"
}

# --- packages (once) ---------------------------------------------------------------------------
missing=""
for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  command -v apt-get >/dev/null || die "apt-get not found; install$missing by hand"
  echo "installing$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

mkdir -p "$PIDS" "$LOGS" /run/munge /run/mysqld /run/slurm /var/spool/slurmctld /var/spool/slurmd
chown munge:munge /run/munge
chown mysql:mysql /run/mysqld

# --- munge -----------------------------------------------------------------------------------
[ -s /etc/munge/munge.key ] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
launch munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
wait_for 20 munged sh -c 'munge -n | unmunge'

# --- MariaDB, a database and a user for slurmdbd -----------------------------------------------
[ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
launch mariadb /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 --socket=/run/mysqld/mysqld.sock
wait_for 60 MariaDB mariadb -e 'SELECT 1'
mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

# --- configuration ----------------------------------------------------------------------------
host=$(hostname -s)
mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
cat >/etc/slurm/slurmdbd.conf <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
CONF
chmod 600 /etc/slurm/slurmdbd.conf
# At least 4 CPUs even on a 2-core machine (config_overrides): a 2-task job and a 1-task job can
# run side by side, so tests wait less for each other; they are tiny.
cpus=$(( $(nproc) > 4 ? $(nproc) : 4 ))
new_conf=$(mktemp)
cat >"$new_conf" <<CONF
# written by baton's slurm/local_cluster/start.sh: one node, this machine
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# short credential lifetime: a requeued job starts in seconds instead of ~2 minutes
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
SchedulerType=sched/backfill
# schedule every 2 s (default 30-60 s): a requeued job, held for cred_expire, restarts promptly
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
if ! cmp -s "$new_conf" /etc/slurm/slurm.conf; then
  mv "$new_conf" /etc/slurm/slurm.conf
  chmod 644 /etc/slurm/slurm.conf
  if alive slurmctld; then  # running with an older configuration: restart the Slurm daemons
    for name in slurmd slurmctld; do kill -TERM "$(cat "$PIDS/$name.pid")"; done
    for name in slurmd slurmctld; do
      for _ in $(seq 75); do alive "$name" || break; sleep 0.2; done
      rm -f "$PIDS/$name.pid"
    done
  fi
else
  rm -f "$new_conf"
fi

# --- slurmdbd, the cluster in accounting, slurmctld, slurmd --------------------------------------
launch slurmdbd /usr/sbin/slurmdbd -D
wait_for 60 slurmdbd sacctmgr -n list cluster
sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
launch slurmctld /usr/sbin/slurmctld -D -i
wait_for 60 slurmctld scontrol ping
launch slurmd /usr/sbin/slurmd -D
idle() { sinfo -h -o %T | grep -Eq '^(idle|mixed|allocated)'; }
if ! (wait_for 20 "slurmd" idle) 2>/dev/null; then
  scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
  wait_for 40 "node $host (sinfo -h -o %T: $(sinfo -h -o %T))" idle
fi
wait_for 30 "cluster $CLUSTER in accounting" sh -c "sacctmgr -n -P list cluster format=cluster | grep -qx $CLUSTER"
echo "slurm cluster '$CLUSTER' up on $host: $(sinfo -h -o '%P %D %T %c CPUs')"
