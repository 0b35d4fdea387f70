"""Data flows one way, probe -> agent -> sinks: the import rule, checked on the real tree.

``probe`` runs inside the trainer and imports nothing of ``agent`` or
``sinks``; ``sinks`` imports only the wire protocol (``probe.protocol``) and
its own modules, the stored-entry schema among them, never ``agent``; the
agent may import both. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import REPO

#: package -> what it may import: a module or package and everything below it
ALLOWED = {
    "probe": ("probe",),
    "sinks": ("sinks", "probe.protocol"),
    "agent": ("agent", "sinks", "probe"),
}
OURS = tuple(ALLOWED)


def imported_modules(source: str) -> Iterator[tuple[int, str]]:
    """(line, module) for every absolute import of one of our packages, at any depth."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from probe import protocol`` names probe.protocol; ``from probe.x import f``
            # names probe.x.f, which a rule for probe.x. allows
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.partition(".")[0] in OURS:
                yield node.lineno, name


def allowed(package: str, module: str) -> bool:
    return any(module == rule or module.startswith(f"{rule}.") for rule in ALLOWED[package])


def violations(root: Path) -> list[str]:
    found = []
    for package in OURS:
        for path in sorted((root / package).rglob("*.py")):
            for line, module in imported_modules(path.read_text()):
                if not allowed(package, module):
                    found.append(f"{path.relative_to(root)}:{line} imports {module}")
    return found


def test_the_source_tree_keeps_the_import_rule() -> None:
    """No module of probe/, sinks/ or agent/ imports what the rule forbids."""
    assert violations(REPO) == []


def test_the_check_finds_a_forbidden_import(tmp_path: Path) -> None:
    """A sink importing the agent, or the probe importing a sink, is reported with its line."""
    for package in OURS:
        (tmp_path / package).mkdir()
    (tmp_path / "sinks" / "bad.py").write_text(
        "from probe.protocol import KINDS\nfrom sinks import schema\n"
        "def late():\n    from agent.store import runs\n"
    )
    (tmp_path / "probe" / "bad.py").write_text("import sinks.schema\nfrom probe import values\n")
    (tmp_path / "sinks" / "also_bad.py").write_text("import probe\n")
    (tmp_path / "agent" / "fine.py").write_text(
        "from sinks import schema\nfrom probe import protocol\n"
    )
    assert violations(tmp_path) == [
        "probe/bad.py:1 imports sinks.schema",
        "sinks/also_bad.py:1 imports probe",
        "sinks/bad.py:4 imports agent.store.runs",
    ]
