#!/usr/bin/env bash
# Several JAX processes on this machine, joined by jax.distributed on 127.0.0.1 -- the same
# code path as a multi-host pod or cluster, for trying a sharded launch without one.
#
#   launch/local_multihost.sh NUM_PROCESSES DEVICES_PER_PROCESS -- --config=configs/shapes.py:runlocal --workdir=/tmp/mh
#
# Each process sees DEVICES_PER_PROCESS simulated CPU devices; the mesh spans all of them
# (config.mesh), each process reads its own shard of the data, and process 0 writes the
# logs and the report. Checkpoints are written jointly (Orbax).
set -euo pipefail
n=${1:?number of processes}; d=${2:?devices per process}; shift 2
[ "${1:-}" = "--" ] && shift
port=${CMHN_COORDINATOR_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$d" JAX_PLATFORMS=cpu \
    python -m cmhn_jax.main --coordinator_address="127.0.0.1:$port" --num_processes="$n" \
      --process_id="$i" "$@" > >(sed "s/^/[$i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
