#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a .venv with torch and outrider (editable) in it.
# OUTRIDER_TORCH_SPEC picks the torch build: the default pin takes the local CPU wheel on
# the project's CI machines; on a GPU box use e.g. OUTRIDER_TORCH_SPEC='torch>=2.2,<3'.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${OUTRIDER_TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
