#!/bin/bash
# Join a node to the Ray cluster started by launch/ray/head.sh (see there for the whole recipe).
#
#   launch/ray/worker.sh HEAD_HOST:PORT
#
# Needs the cluster's token: RAY_AUTH_TOKEN_PATH (default ./.ray_auth_token, as head.sh wrote it)
# or RAY_AUTH_TOKEN. Environment: RAY_NUM_CPUS (1), RAY_OBJECT_STORE_BYTES (Ray's default),
# RAY_NODE_IP (Ray's guess), RAY_START_ARGS (more
# `ray start` options, e.g. ports), RAY_BIN (ray).
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 HEAD_HOST:PORT" >&2
    exit 2
fi
ADDRESS="$1"
shift
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
    export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$PWD/.ray_auth_token}"
    if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
        echo "$0: no cluster token at $RAY_AUTH_TOKEN_PATH (set RAY_AUTH_TOKEN_PATH to the file launch/ray/head.sh wrote)" >&2
        exit 2
    fi
fi
args=(start --address "$ADDRESS" --num-cpus "${RAY_NUM_CPUS:-1}" --disable-usage-stats)
if [[ -n "${RAY_OBJECT_STORE_BYTES:-}" ]]; then args+=(--object-store-memory "$RAY_OBJECT_STORE_BYTES"); fi
if [[ -n "${RAY_NODE_IP:-}" ]]; then args+=(--node-ip-address "$RAY_NODE_IP"); fi
# shellcheck disable=SC2206 - extra `ray start` options, split on spaces (e.g. ports to use)
args+=(${RAY_START_ARGS:-})
"${RAY_BIN:-ray}" "${args[@]}" "$@" >/dev/null
echo "joined the ray cluster at $ADDRESS"
