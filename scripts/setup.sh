#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: a .venv with torch and outrider (editable) in it.
# OUTRIDER_TORCH_SPEC picks the torch build: the default pin takes the local CPU wheel on
# the project's CI machines; on a GPU box use e.g. OUTRIDER_TORCH_SPEC='torch>=2.2,<3'.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${OUTRIDER_TORCH_SPEC:-torch==2.13.0}
LOG=.venv-setup.log

quiet() {  # run a set-up step; show its output only when it fails
  if ! "$@" >>"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "set-up failed: $*" >&2
    exit 1
  fi
}

: >"$LOG"
[ -x .venv/bin/python ] || quiet "$PY" -m venv .venv
quiet .venv/bin/python -m pip install --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  quiet .venv/bin/python -m pip install "$TORCH_SPEC"
fi
quiet .venv/bin/python -m pip install -e ".[dev]"
# Byte-compile outrider's own modules: an editable install leaves them as source, and where
# PYTHONDONTWRITEBYTECODE is set every agent, worker and trainer process would compile them
# again (about 0.2 s of CPU for each agent start).
quiet .venv/bin/python -m compileall -q -j 0 agent probe sinks
