#!/usr/bin/env bash
# Launch a torchrun job with an outrider agent beside it.
#
#   deploy/torchrun/launch.sh train.py --your --args
#
# Single node: `outrider run` starts the agent, gives every rank
# OUTRIDER_ENDPOINT and OUTRIDER_RUN_ID (probe.init() reads them), forwards
# signals, and exits with torchrun's status once the agent has stored the last
# records. The agent's prometheus sink serves http://127.0.0.1:9400/metrics.
#
# Environment (all optional):
#   NPROC_PER_NODE   processes on this node (default: one per visible GPU, else 1)
#   RUN_ID           the run's id (default: a new timestamped one)
#   OUTRIDER_CONFIG  agent config (YAML); `outrider config --default` prints one
#   OUTRIDER_SINKS   sinks to enable, e.g. `prometheus,tensorboard`, or `none`
#   OUTRIDER_RUNS_DIR  where runs are stored (default ./outrider-runs)
#   OUTRIDER, TORCHRUN  the commands to use (default: from PATH)
#
# Multi-node: run this script on every node with the same RUN_ID and torchrun's
# rendezvous options instead of --standalone, e.g.
#
#   RUN_ID=exp42 NNODES=2 RDZV_ENDPOINT=node0:29500 deploy/torchrun/launch.sh train.py
#
# Each node then has its own agent (storing its own ranks, serving its own
# /metrics); list every node's :9400 as a Prometheus target. Sharing RUN_ID
# keeps the nodes' runs under one name in the store and in the `run` label.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 TRAIN_SCRIPT [ARGS...]" >&2
    exit 2
fi

OUTRIDER=${OUTRIDER:-outrider}
TORCHRUN=${TORCHRUN:-torchrun}

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=1
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
        if [[ "${gpus:-0}" -gt 0 ]]; then
            NPROC_PER_NODE=$gpus
        fi
    fi
fi

outrider_args=()
if [[ -n "${RUN_ID:-}" ]]; then
    outrider_args+=(--run-id "$RUN_ID")
fi

torchrun_args=(--nproc-per-node "$NPROC_PER_NODE")
if [[ -n "${NNODES:-}" ]]; then
    : "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the rendezvous for a multi-node run}"
    torchrun_args+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT"
                    --rdzv-id "${RUN_ID:?set RUN_ID for a multi-node run}")
else
    torchrun_args+=(--standalone)
fi

exec "$OUTRIDER" run "${outrider_args[@]}" -- "$TORCHRUN" "${torchrun_args[@]}" "$@"
