#!/usr/bin/env bash
# The test command: set up, lint, type-check and run the whole suite.
# The Prometheus tests need Debian's `prometheus` package (server and promtool);
# it is installed here when missing and we are root (as on CI).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v promtool >/dev/null || ! [ -x /usr/bin/prometheus ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
  else
    echo "note: install Debian's 'prometheus' package for the Prometheus tests" >&2
  fi
fi
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest --durations=15 "$@"
