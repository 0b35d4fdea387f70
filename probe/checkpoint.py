"""Checkpoints that a crash mid-write cannot corrupt, and a load that finds the last good one.

``save`` runs on the training thread because the trainer asked for a save: it
costs what ``torch.save`` costs plus an fsync of the file and of its directory
(and of two small files, ``index.json`` and ``latest``). Nothing costly is added
for telemetry: the ``checkpoint`` event carries the path, step and size, and the
agent hashes and checks the file on its own CPU time (``docs/checkpoints.md``).

One writer per directory (typically rank 0): a save removes the temporary files
an interrupted save left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import probe

__all__ = ["CHECKPOINT_EVENT", "INDEX", "LATEST", "load", "save"]

#: the probe event each save sends, which the agent verifies
CHECKPOINT_EVENT = "checkpoint"
INDEX = "index.json"
LATEST = "latest"
_TEMP_PREFIX = ".ckpt-"
_TEMP_SUFFIX = ".tmp"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step}.pt"


def save(
    obj: Any,
    directory: str | os.PathLike[str],
    step: int,
    *,
    keep_last: int = 3,
    best_metric: str | None = None,
    best_value: float | None = None,
    mode: Literal["min", "max"] = "min",
    every_steps: int | None = None,
    every_seconds: float | None = None,
) -> Path:
    """Save ``obj`` as ``<directory>/ckpt-<step>.pt`` atomically; returns its path.

    The file is written to a temporary name, fsynced and renamed, so a crash
    leaves either the whole checkpoint or none. The newest ``keep_last`` are kept,
    and, given ``best_metric`` and ``best_value``, the best by that metric
    (lowest with ``mode="min"``); older ones are deleted. ``index.json`` lists
    what is kept, ``latest`` names the newest. ``every_steps`` / ``every_seconds``
    tell the agent how often this trainer saves, so it can alert when saves stop
    (``checkpoint_missing``). Errors of the save itself (a full disk) raise, as
    ``torch.save``'s would; the telemetry never does.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    if mode not in ("min", "max"):
        raise ValueError(f'mode must be "min" or "max", got {mode!r}')
    if (best_metric is None) != (best_value is None):
        raise ValueError("best_metric and best_value go together: give both or neither")
    if every_steps is not None and (
        isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps < 1
    ):
        raise ValueError(f"every_steps must be a positive int, got {every_steps!r}")
    if every_seconds is not None and not (
        isinstance(every_seconds, int | float)
        and not isinstance(every_seconds, bool)
        and 0 < every_seconds < float("inf")
    ):
        raise ValueError(f"every_seconds must be a positive number, got {every_seconds!r}")
    import torch

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(folder)
    path = folder / checkpoint_name(step)
    _write_atomically(path, lambda file: torch.save(obj, file))
    size = path.stat().st_size

    entry: dict[str, Any] = {"step": step, "path": path.name, "size": size}
    if best_metric is not None:
        entry["metric"] = best_metric
        entry["value"] = float(best_value)  # type: ignore[arg-type]  # checked with best_metric
    previous = [e for e in _read_index(folder) if e.get("step") != step]
    kept, dropped = _retain([*previous, entry], keep_last, best_metric, mode)
    best = best_metric is not None and _best(kept, best_metric, mode) is entry
    index = {"latest": path.name, "checkpoints": kept}
    _write_atomically(folder / INDEX, lambda file: file.write(json.dumps(index).encode()))
    _write_atomically(folder / LATEST, lambda file: file.write(path.name.encode() + b"\n"))
    for old in dropped:
        name = str(old.get("path", ""))
        if _NAME.match(name):
            (folder / name).unlink(missing_ok=True)

    attrs: dict[str, Any] = {"path": str(path.resolve()), "size": size}
    if best_metric is not None:
        attrs.update(metric=best_metric, value=entry["value"], best=best)
    if every_steps is not None:
        attrs["every_steps"] = every_steps
    if every_seconds is not None:
        attrs["every_seconds"] = float(every_seconds)
    probe.event(CHECKPOINT_EVENT, step=step, **attrs)
    return path


def load(
    directory: str | os.PathLike[str], map_location: Any = "cpu", **load_options: Any
) -> tuple[Any, Path]:
    """Load the newest checkpoint of ``directory``; returns ``(obj, path)``.

    A newest checkpoint that cannot be loaded (truncated, corrupt) is skipped with
    a warning that names it and the one loaded instead. ``load_options`` go to
    ``torch.load`` (e.g. ``weights_only=False`` for objects beyond tensors and
    plain containers). Raises ``FileNotFoundError`` when there is no checkpoint,
    ``RuntimeError`` (naming each failure) when none loads.
    """
    import torch

    folder = Path(directory)
    failures: list[str] = []
    for path in _candidates(folder):
        try:
            obj = torch.load(path, map_location=map_location, **load_options)
        except Exception as exc:
            failures.append(f"{path.name}: {type(exc).__name__}: {exc}")
            continue
        if failures:
            warnings.warn(
                f"outrider checkpoint: could not load {'; '.join(failures)}; "
                f"loaded {path.name} instead",
                stacklevel=2,
            )
        return obj, path
    if not failures:
        raise FileNotFoundError(f"no checkpoint in {folder}")
    raise RuntimeError(f"no checkpoint in {folder} could be loaded: {'; '.join(failures)}")


def _candidates(folder: Path) -> list[Path]:
    """Newest first: what ``latest`` names, then the index, then any ckpt-<step>.pt on disk."""
    names: list[str] = []
    with contextlib.suppress(OSError):
        names.append((folder / LATEST).read_text().strip())
    names += [str(e.get("path", "")) for e in _by_step(_read_index(folder))]
    try:
        on_disk = [p.name for p in folder.iterdir() if _NAME.match(p.name)]
    except OSError:
        on_disk = []
    names += sorted(on_disk, key=lambda n: int(_NAME.match(n).group(1)), reverse=True)  # type: ignore[union-attr]  # filtered above
    seen: dict[str, None] = {}
    for name in names:
        if _NAME.match(name) and (folder / name).is_file():
            seen.setdefault(name)
    return [folder / name for name in seen]


def _by_step(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(entries, key=lambda e: int(e.get("step", -1)), reverse=True)


def _retain(
    entries: list[dict[str, Any]], keep_last: int, metric: str | None, mode: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(kept, dropped): the newest ``keep_last`` plus the best by ``metric``, oldest first."""
    newest = _by_step(entries)
    keep = {id(e) for e in newest[:keep_last]}
    best = _best(entries, metric, mode)
    if best is not None:
        keep.add(id(best))
    kept = [e for e in reversed(newest) if id(e) in keep]
    dropped = [e for e in newest if id(e) not in keep]
    return kept, dropped


def _best(entries: list[dict[str, Any]], metric: str | None, mode: str) -> dict[str, Any] | None:
    """The entry with the best value of ``metric`` (lowest with ``mode="min"``), if any."""
    scored = [e for e in entries if e.get("metric") == metric and _is_number(e.get("value"))]
    if metric is None or not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda e: float(e["value"]))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _read_index(folder: Path) -> list[dict[str, Any]]:
    """The index's entries; none for a missing or unreadable index (it is rebuilt on save)."""
    try:
        index = json.loads((folder / INDEX).read_bytes())
        entries = index["checkpoints"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("step"), int)]


def _write_atomically(path: Path, write: Any) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, rename over ``path``,
    fsync the directory; on any failure the temporary file is removed."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temps(folder: Path) -> None:
    """What a save killed mid-write left behind (one writer per directory)."""
    for stale in folder.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)
