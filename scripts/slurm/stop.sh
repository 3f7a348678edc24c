#!/usr/bin/env bash
# Stop the private SLURM cluster that start.sh started in $SLURM_STATE_DIR: cancel its jobs,
# then stop slurmd/slurmctld/munged by their pid files (nothing else on the host is touched).
set -uo pipefail
state="${SLURM_STATE_DIR:-/tmp/beamhub-slurm}"
export SLURM_CONF="$state/slurm.conf"
if [ -f "$state/run/slurmctld.pid" ] && kill -0 "$(cat "$state/run/slurmctld.pid")" 2>/dev/null; then
    scancel --quiet --user="$(id -un)" 2>/dev/null || true
    deadline=$((SECONDS + 8))
    while [ -n "$(squeue -h -t R,CG -o %i 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do
        sleep 0.2
    done
fi
pids=()
for f in "$state"/run/slurmd-*.pid "$state/run/slurmctld.pid" "$state/munge/munged.pid"; do
    [ -f "$f" ] || continue
    pid="$(cat "$f")"
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
done
deadline=$((SECONDS + 10))
for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null; do
        if [ $SECONDS -ge $deadline ]; then kill -KILL "$pid" 2>/dev/null; break; fi
        sleep 0.1
    done
done
exit 0
