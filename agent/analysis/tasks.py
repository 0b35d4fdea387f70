"""The statistics workers' jobs: module-level functions, so a worker process can run them.

Each reads what it needs from the run store itself (a features batch's rows
from ``tensors.bin``), so only a stored line's offsets cross the process
boundary, never the rows.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.analysis.messages import MapMethod
from agent.store.layout import TENSORS

#: what a t-SNE map costs a worker (openTSNE, one thread, about 2 s for 1,000 x 128 points):
#: under ``stats.cpu_share`` the first map waits as if one had run
TSNE_CPU_SECONDS_PER_1000_POINTS = 2.0


def read_features(line: Mapping[str, Any], run_dir: Path) -> Any:
    """A features batch's rows, read back from the run's tensors.bin (float32, 2-d)."""
    import numpy as np

    shape = line.get("shape")
    if line.get("dtype") != "float32" or not isinstance(shape, list) or len(shape) != 2:
        raise ValueError(f"features {line.get('name')!r}: want 2-d float32, got {shape}")
    with open(run_dir / TENSORS, "rb") as tensors:
        tensors.seek(int(line["offset"]))
        data = tensors.read(int(line["nbytes"]))
    if len(data) != 4 * shape[0] * shape[1]:
        raise ValueError(f"features {line.get('name')!r}: {len(data)} bytes for shape {shape}")
    return np.frombuffer(data, dtype=np.float32).reshape(shape)


def representation_job(line: Mapping[str, Any], run_dir: Path) -> dict[str, float]:
    from agent.analysis.representation import representation_stats

    return representation_stats(read_features(line, run_dir))


def pair_job(
    student: Mapping[str, Any], student_dir: Path, teacher: Mapping[str, Any], teacher_dir: Path
) -> dict[str, float]:
    from agent.analysis.representation import paired_stats

    return paired_stats(read_features(student, student_dir), read_features(teacher, teacher_dir))


def map_job(
    feature_map: Any,
    line: Mapping[str, Any],
    run_dir: Path,
    step: int,
    method: MapMethod,
    path: Path,
    title: str,
) -> tuple[Any, Path]:
    """The next map of a stream, drawn; returns the updated FeatureMap with the PNG's path."""
    feature_map = map_points_job(feature_map, line, run_dir, step, method)
    return feature_map, render_map_job(feature_map.points, path, title)


def map_points_job(
    feature_map: Any, line: Mapping[str, Any], run_dir: Path, step: int, method: MapMethod
) -> Any:
    """The next map's points of a stream; returns the FeatureMap, updated (``.points``).

    A t-SNE map runs this in a worker process of its own and draws the points in
    another job (:func:`render_map_job`): openTSNE's libraries and matplotlib are
    never resident in one process, and openTSNE's leave with the process.
    """
    feature_map.update(read_features(line, run_dir), step, method)
    return feature_map


def render_map_job(points: Any, path: Path, title: str) -> Path:
    """A map's points drawn as a PNG at ``path``."""
    from agent.analysis.maps import render_map

    try:
        return render_map(points, path, title)
    finally:
        _free_figures()


def dashboard_job(history: Mapping[str, tuple[Any, Any]], path: Path, title: str) -> Path:
    from agent.analysis.dashboard import render_dashboard

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return render_dashboard(history, path, title)
    finally:
        _free_figures()


def _free_figures() -> None:
    """A full garbage collection after each image, which frees its matplotlib Figure.

    A Figure is a web of reference cycles, so only the cycle collector frees
    it, and in a worker whose objects are mostly long-lived modules Python runs
    a full collection rarely: the worker's RSS climbed by 8-13 MB a
    dashboard, for the whole run (bench/bench_agent_memory.py). One collection
    costs ~70 ms of the worker's CPU, once per image (with ``stats.processes:
    false`` the jobs run on an agent thread, and it holds the agent's GIL as long).
    """
    gc.collect()
