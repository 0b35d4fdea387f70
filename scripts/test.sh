#!/usr/bin/env bash
# The test command: set up, lint, type-check and run the whole suite.
# The Prometheus tests need Debian's `prometheus` package (server and promtool), the
# dashboard tests Debian's `chromium`; both are installed here when missing and we are
# root (as on CI).
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v promtool >/dev/null && [ -x /usr/bin/prometheus ] || missing+=(prometheus)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "note: install Debian's ${missing[*]} package(s) for the tests that need them" >&2
  fi
fi
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy

# Two phases. Most tests wait on processes and sockets more than they compute, so two
# workers share the machine's cores (OUTRIDER_TEST_WORKERS sets how many); the tests
# marked `serial` keep both cores busy or judge the wall clock, and run alone after.
# A test that fails beside the other worker is run again alone, and only a failure there
# fails the command: the probe gives a busy agent seconds, not minutes, by design.
status=0
.venv/bin/python -m pytest -n "${OUTRIDER_TEST_WORKERS:-2}" --dist loadscope -m "not serial" \
  --durations=15 "$@" || status=$?
if [ "$status" -eq 1 ]; then
  echo "scripts/test.sh: the tests that failed beside another worker, run again alone:" >&2
  .venv/bin/python -m pytest --last-failed --last-failed-no-failures none -m "not serial" "$@"
elif [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then  # 5: no test selected in this phase
  exit "$status"
fi
status=0
.venv/bin/python -m pytest -m serial --durations=5 "$@" || status=$?
[ "$status" -eq 0 ] || [ "$status" -eq 5 ] || exit "$status"
