"""Which metric names a rule watches: exact names and fnmatch globs."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence


def is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


class MetricPattern:
    """Exact metric names and fnmatch globs (case-sensitive; ``*`` also matches ``/``).

    The globs are compiled into one regex: the engine asks once per new metric
    name and caches the answer, so a rule with many globs costs one match.
    """

    def __init__(self, patterns: Sequence[str]) -> None:
        self.exact = frozenset(p for p in patterns if not is_glob(p))
        globs = [p for p in patterns if is_glob(p)]
        self.is_glob = bool(globs)
        self._regex = (
            re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs)) if globs else None
        )

    def __call__(self, name: str) -> bool:
        return name in self.exact or (
            self._regex is not None and self._regex.match(name) is not None
        )
