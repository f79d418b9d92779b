#!/bin/bash
# Start the head node of a Ray cluster that hosts ebmscale's global replay buffer (an alternative
# to the default embedded mode, needed when training spans several nodes).
#
#   launch/ray/head.sh                 # on the first node; prints the address workers join
#   launch/ray/worker.sh HEAD:6379     # on every other node
#   accelerate launch ... -m ebmscale.cli train ... buffer.ray_address=auto   # on every node
#   ray stop                           # on every node, after training
#
# Quiet and self-contained: no dashboard, no usage statistics, no token file in $HOME. Shard
# actors ask for no CPU, so one CPU per node is plenty. Environment: RAY_PORT (6379),
# RAY_NUM_CPUS (1), RAY_OBJECT_STORE_BYTES (Ray's default: 30% of RAM), RAY_BIN (ray).
set -euo pipefail
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" RAY_USAGE_STATS_ENABLED=0
PORT="${RAY_PORT:-6379}"
args=(start --head --port "$PORT" --num-cpus "${RAY_NUM_CPUS:-1}" --include-dashboard=false --disable-usage-stats)
if [[ -n "${RAY_OBJECT_STORE_BYTES:-}" ]]; then args+=(--object-store-memory "$RAY_OBJECT_STORE_BYTES"); fi
"${RAY_BIN:-ray}" "${args[@]}" "$@" >/dev/null
echo "ray head running at $(hostname -i 2>/dev/null | awk '{print $1}'):$PORT (join with launch/ray/worker.sh HOST:$PORT)"
