"""Feature streams' jobs: a t-SNE map's libraries leave with the process that computed it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from agent.analysis.features import FeatureStreams
from agent.analysis.messages import FeatureBatch, FeatureMapDrawn, JobResult
from agent.analysis.workers import StatsJobs
from agent.config import StatsSettings
from agent.store.layout import TENSORS

PNG = b"\x89PNG\r\n\x1a\n"


def _resident(modules: tuple[str, ...]) -> list[str]:
    return [name for name in modules if name in sys.modules]


def _batch(run_dir: Path, step: int) -> FeatureBatch:
    rows = np.random.default_rng(step).standard_normal((40, 8)).astype(np.float32)
    with open(run_dir / TENSORS, "ab") as tensors:
        offset = tensors.tell()
        tensors.write(rows.tobytes())
    line = {"name": "h", "dtype": "float32", "shape": [40, 8], "offset": offset, "nbytes": 1280}
    return FeatureBatch("run", 0, "h", step, run_dir, line)


def test_a_tsne_map_is_drawn_and_its_libraries_are_not_left_in_the_shared_worker(
    tmp_path: Path,
) -> None:
    """Two t-SNE maps of a stream: each is computed in a process of its own and drawn on
    the shared worker, which never holds openTSNE, scikit-learn or scipy afterwards; the
    second map starts from the stream's first."""
    settings = StatsSettings(feature_map="tsne", map_every=1, cpu_share=0)
    jobs = StatsJobs(threads=1, processes=True)
    posted: list[JobResult] = []
    streams = FeatureStreams(settings, jobs, posted.append)
    for step in (10, 20):
        streams.submit(_batch(tmp_path, step))
        assert jobs.wait_idle(120)
    drawn = [p for p in posted if isinstance(p, FeatureMapDrawn)]
    assert [(d.method, d.batch.step) for d in drawn] == [("tsne", 10), ("tsne", 20)]
    for map_drawn in drawn:
        assert map_drawn.path.read_bytes()[:8] == PNG
    assert streams._maps[("run", 0, "h")].step == 20
    figures = jobs.figures()
    assert figures["tsne"].count == figures["tsne_render"].count == 2
    assert figures["tsne"].failed == figures["tsne_render"].failed == 0
    left: list[list[str]] = []
    jobs.submit("check", "check", _resident, left.append, (("openTSNE", "sklearn", "scipy"),))
    assert jobs.wait_idle(60)
    assert left == [[]]
    assert jobs.close(10)
