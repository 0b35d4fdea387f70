#!/usr/bin/env bash
# Wheels for a GPU machine that has torch, numpy and pynvml but not the rest of
# outrider's needs, and no network (this project's device machine: Python 3.12).
# Run here, in the repository root; the versions are those of .venv, so the
# machine runs what the tests here run. The wheels land in .whl/ (git-ignored);
# scripts/device_check.sh installs them there.
#
#     bash scripts/device_wheels.sh [PYTHON_VERSION]   # default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
# Not on that machine's image (as its package list read on 2026-11-17).
NAMES=(pyzmq orjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
    google-crc32c openTSNE)
PIP=(.venv/bin/python -m pip)
rm -rf .whl  # one version of each: two would stop the install there
mkdir -p .whl
for name in "${NAMES[@]}"; do
    version=$("${PIP[@]}" show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    if [ -z "$version" ]; then
        echo "device_wheels: $name is not installed in .venv (run scripts/setup.sh first)" >&2
        exit 1
    fi
    "${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
        -d .whl "$name==$version" || {
        echo "device_wheels: no wheel of $name==$version for CPython $PYVER" >&2
        exit 1
    }
done
ls -l .whl
du -sh .whl
