#!/usr/bin/env bash
# Stop the cluster started by start.sh: cancel its jobs, then end each daemon by the PID it recorded
# (SIGTERM, then SIGKILL after 15 s), in the reverse order of starting. Nothing else is touched.
set -uo pipefail

STATE=${BATON_SLURM_STATE:-/var/lib/baton-slurm}
PIDS=$STATE/pids

if [ -f "$PIDS/slurmctld.pid" ] && kill -0 "$(cat "$PIDS/slurmctld.pid")" 2>/dev/null; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// }" ]; then
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

for name in slurmd slurmctld slurmdbd mariadb munged; do
  f=$PIDS/$name.pid
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "stop.sh: $name (PID $pid) ignored SIGTERM for 15 s: SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
  fi
  rm -f "$f"
done
echo "slurm cluster stopped"
