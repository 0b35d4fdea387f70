"""The agent runs below the trainer, and its children (W&B's service) inherit that, with
one Go scheduler thread."""

from __future__ import annotations

import os
import subprocess

from tests.helpers import PYTHON, REPO

CHILD = """
import os, subprocess, sys
from agent.daemon import yield_cpu_to_the_trainer
yield_cpu_to_the_trainer(nice=3, blas_threads=1)
probe = "import os; print(os.nice(0), os.environ.get('GOMAXPROCS'))"
print(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout)
"""


def _child(**env: str) -> list[str]:
    environment = {k: v for k, v in os.environ.items() if k != "GOMAXPROCS"}
    done = subprocess.run(
        [PYTHON, "-c", CHILD],
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_children_get_a_lower_priority_and_one_go_scheduler() -> None:
    nice, gomaxprocs = _child()
    assert int(nice) >= os.nice(0) + 3
    assert gomaxprocs == "1"


def test_a_gomaxprocs_the_user_set_is_kept() -> None:
    assert _child(GOMAXPROCS="4")[1] == "4"
