#!/usr/bin/env bash
# The demo: a small character-level transformer trained under `outrider run`,
# with the default sinks (run store, TensorBoard, Prometheus /metrics, offline W&B).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OUTRIDER_RUNS_DIR=${OUTRIDER_RUNS_DIR:-$PWD/outrider-runs}
export WANDB_SILENT=${WANDB_SILENT:-true}
echo "outrider demo: while it trains, Prometheus metrics are at http://127.0.0.1:9400/metrics"
.venv/bin/outrider run -- .venv/bin/python examples/train_charlm.py "$@"
echo
.venv/bin/outrider show latest
echo
echo "Stored in $OUTRIDER_RUNS_DIR/<run id>/: run.json (metadata, accounting), metrics.jsonl (every record),"
echo "tensorboard/ (tensorboard --logdir $OUTRIDER_RUNS_DIR) and wandb/ (offline; wandb sync to upload)."
echo "List runs: .venv/bin/outrider runs    Summarise one: .venv/bin/outrider show latest"
