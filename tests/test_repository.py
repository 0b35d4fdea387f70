"""The tree as a user clones it: no file holds the leftovers of an unresolved merge."""

from __future__ import annotations

import re
import subprocess

from tests.helpers import REPO

#: git's conflict markers, each alone at the start of a line
MARKER = re.compile(rb"^(<{7} |={7}$|>{7} )", re.MULTILINE)


def test_no_tracked_file_holds_merge_conflict_markers() -> None:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout
    marked = []
    for name in filter(None, listed.decode().split("\0")):
        path = REPO / name
        if path.is_file() and not path.is_symlink() and MARKER.search(path.read_bytes()):
            marked.append(name)
    assert marked == []
