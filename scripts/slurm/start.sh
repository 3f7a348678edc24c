#!/usr/bin/env bash
# Start a private SLURM cluster on this host: munged, slurmctld and one `slurmd -N nX` per fake
# node, all state/logs/sockets under $SLURM_STATE_DIR. Prints the SLURM_CONF to export.
#   SLURM_STATE_DIR   (default /tmp/beamhub-slurm)   SLURM_NODES (4)   SLURM_NODE_CPUS (1)
#   SLURM_NODE_MEM_MB (1000)   SLURMCTLD_PORT (6817)  SLURMD_PORT (first node's port, 17001)
#   SLURM_CRED_EXPIRE (5: seconds a requeued job waits before it may run again)
# Needs root (munged runs as the munge user, the SLURM daemons as root). Stop with stop.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
state="${SLURM_STATE_DIR:-/tmp/beamhub-slurm}"
nodes="${SLURM_NODES:-4}"
ctld_port="${SLURMCTLD_PORT:-6817}"
slurmd_port="${SLURMD_PORT:-17001}"
python="${BEAMHUB_PYTHON:-$repo/.venv/bin/python}"
[ -x "$python" ] || python=python3

for bin in munged slurmctld slurmd scontrol; do
    command -v "$bin" >/dev/null || { echo "start.sh: $bin not installed (apt-get install slurmctld slurmd slurm-client munge)" >&2; exit 3; }
done
if [ -f "$state/run/slurmctld.pid" ] && kill -0 "$(cat "$state/run/slurmctld.pid")" 2>/dev/null; then
    echo "start.sh: a cluster already runs in $state (stop it with stop.sh)" >&2; exit 4
fi
# on any failure below, stop whatever was started
trap 'rc=$?; [ $rc -ne 0 ] && SLURM_STATE_DIR="$state" bash "$here/stop.sh"; exit $rc' EXIT
install -d -m 0755 "$state" "$state/ctld" "$state/spool" "$state/run" "$state/log"
install -d -m 0755 -o munge -g munge "$state/munge"

# munge: a private daemon and socket, so nothing system-wide is touched
key=/etc/munge/munge.key
if [ ! -s "$key" ]; then
    install -d -m 0700 -o munge -g munge /etc/munge
    dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
    chown munge:munge "$key"; chmod 0400 "$key"
fi
runuser -u munge -- munged --socket="$state/munge/munge.socket" --key-file="$key" \
    --pid-file="$state/munge/munged.pid" --log-file="$state/munge/munged.log" \
    --seed-file="$state/munge/munged.seed"

partitions="$(cd "$repo" && "$python" -m kernels.slurm partitions)"
last_port=$((slurmd_port + nodes - 1))
conf="$state/slurm.conf"
sed -e "s#@STATE@#$state#g" -e "s#@CTLD_PORT@#$ctld_port#g" -e "s#@SLURMD_PORT@#$slurmd_port#g" \
    -e "s#@SLURMD_PORT_LAST@#$last_port#g" -e "s#@NODES@#$nodes#g" \
    -e "s#@CPUS@#${SLURM_NODE_CPUS:-1}#g" -e "s#@MEM_MB@#${SLURM_NODE_MEM_MB:-1000}#g" \
    -e "s#@CRED_EXPIRE@#${SLURM_CRED_EXPIRE:-5}#g" \
    "$here/slurm.conf.in" | awk -v parts="$partitions" '$0 == "@PARTITIONS@" { print parts; next } { print }' >"$conf"
touch "$state/cgroup.conf"
export SLURM_CONF="$conf"

slurmctld -i -f "$conf"
for i in $(seq 1 "$nodes"); do
    slurmd -N "n$i" -f "$conf"
done

# ready = every node idle (or at least up) in sinfo
deadline=$((SECONDS + 30))
while :; do
    up="$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 !~ /(down|unk|drain|fail|not_responding|\*)/' | sort -u | wc -l || true)"
    [ "$up" -ge "$nodes" ] && break
    if [ $SECONDS -ge $deadline ]; then
        echo "start.sh: nodes not up after 30 s; see $state/log/" >&2
        sinfo -N >&2 || true
        exit 5
    fi
    sleep 0.2
done
echo "SLURM_CONF=$conf"
