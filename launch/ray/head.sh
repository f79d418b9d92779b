#!/bin/bash
# Start the head node of a Ray cluster that hosts ebmscale's global replay buffer (an alternative
# to the default embedded mode, needed when training spans several nodes).
#
#   launch/ray/head.sh                 # on the first node; prints the address workers join
#   launch/ray/worker.sh HEAD:6379     # on every other node
#   accelerate launch ... -m ebmscale.cli train ... buffer.ray_address=auto   # on every node
#   ray stop                           # on every node, after training
#
# Token authentication: a fresh random token for this cluster goes into the 0600 file
# $RAY_AUTH_TOKEN_PATH (default ./.ray_auth_token; put it on the filesystem every node shares, or
# pass RAY_AUTH_TOKEN instead). worker.sh and ebmscale read the same variable (ebmscale also finds
# ./.ray_auth_token by itself); a client without the token is refused. Nothing goes to $HOME.
# Quiet: no dashboard, no usage statistics. Shard actors ask for no CPU, so one CPU per node is
# plenty. Environment: RAY_PORT (6379), RAY_NUM_CPUS (1), RAY_OBJECT_STORE_BYTES (Ray's default:
# 30% of RAM), RAY_NODE_IP (Ray's guess), RAY_START_ARGS (more
# `ray start` options, e.g. ports), RAY_BIN (ray).
set -euo pipefail
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0
if [[ -z "${RAY_AUTH_TOKEN:-}" ]]; then
    export RAY_AUTH_TOKEN_PATH="${RAY_AUTH_TOKEN_PATH:-$PWD/.ray_auth_token}"
    (umask 077
     mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
     od -vAn -N32 -tx1 /dev/urandom | tr -d ' \n' > "$RAY_AUTH_TOKEN_PATH.tmp.$$"
     mv -f "$RAY_AUTH_TOKEN_PATH.tmp.$$" "$RAY_AUTH_TOKEN_PATH")
fi
PORT="${RAY_PORT:-6379}"
args=(start --head --port "$PORT" --num-cpus "${RAY_NUM_CPUS:-1}" --include-dashboard=false --disable-usage-stats)
if [[ -n "${RAY_OBJECT_STORE_BYTES:-}" ]]; then args+=(--object-store-memory "$RAY_OBJECT_STORE_BYTES"); fi
if [[ -n "${RAY_NODE_IP:-}" ]]; then args+=(--node-ip-address "$RAY_NODE_IP"); fi
# shellcheck disable=SC2206 - extra `ray start` options, split on spaces (e.g. ports to use)
args+=(${RAY_START_ARGS:-})
HOST="${RAY_NODE_IP:-$(hostname -i 2>/dev/null | awk '{print $1}')}"
echo "ray head starting at $HOST:$PORT (join with launch/ray/worker.sh $HOST:$PORT; token: ${RAY_AUTH_TOKEN_PATH:-\$RAY_AUTH_TOKEN})"
"${RAY_BIN:-ray}" "${args[@]}" "$@" >/dev/null
