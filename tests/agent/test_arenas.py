"""The agent caps glibc's malloc arenas for itself and its children, unless the user did."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

CHECK = (
    "import os; from agent.arenas import limit_malloc_arenas; "
    "print(limit_malloc_arenas(), os.environ['MALLOC_ARENA_MAX'])"
)


def _run(extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env.update(extra, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-P", "-c", CHECK], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_two_arenas_by_default_and_a_users_setting_is_kept() -> None:
    """Unset: two arenas here and MALLOC_ARENA_MAX=2 for children; a user's 4 stays 4."""
    assert _run({}) == "2 2"
    assert _run({"MALLOC_ARENA_MAX": "4"}) == "4 4"
    assert _run({"MALLOC_ARENA_MAX": "many"}) == "None many"
