#!/usr/bin/env bash
# The demo: a small character-level transformer trained under `outrider run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OUTRIDER_RUNS_DIR=${OUTRIDER_RUNS_DIR:-$PWD/outrider-runs}
.venv/bin/outrider run -- .venv/bin/python examples/train_charlm.py "$@"
echo
.venv/bin/outrider show latest
echo
echo "Stored in $OUTRIDER_RUNS_DIR/<run id>/: run.json (metadata, accounting) and metrics.jsonl (every record)."
echo "List runs: .venv/bin/outrider runs    Summarise one: .venv/bin/outrider show latest"
