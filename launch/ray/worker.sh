#!/bin/bash
# Join a node to the Ray cluster started by launch/ray/head.sh (see there for the whole recipe).
#
#   launch/ray/worker.sh HEAD_HOST:PORT
#
# Environment: RAY_NUM_CPUS (1), RAY_OBJECT_STORE_BYTES (Ray's default), RAY_BIN (ray).
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 HEAD_HOST:PORT" >&2
    exit 2
fi
ADDRESS="$1"
shift
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" RAY_USAGE_STATS_ENABLED=0
args=(start --address "$ADDRESS" --num-cpus "${RAY_NUM_CPUS:-1}" --disable-usage-stats)
if [[ -n "${RAY_OBJECT_STORE_BYTES:-}" ]]; then args+=(--object-store-memory "$RAY_OBJECT_STORE_BYTES"); fi
"${RAY_BIN:-ray}" "${args[@]}" "$@" >/dev/null
echo "joined the ray cluster at $ADDRESS"
