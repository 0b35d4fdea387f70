"""Representation statistics of feature streams: rank and collapse, pairs, maps.

Each stored features batch becomes jobs for the statistics workers: its own
statistics, the cosine with its partner when it names one (student/teacher
at the same step), and every ``map_every`` batches a t-SNE or PCA map that
starts from the stream's previous one, so maps stay comparable across steps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.analysis import tasks
from agent.analysis.messages import (
    FeatureBatch,
    FeatureMapDrawn,
    FeatureStatistics,
    JobResult,
    MapMethod,
)
from agent.analysis.workers import StatsJobs
from agent.config import StatsSettings

#: batches waiting for a partner that never came are forgotten past this many
MAX_UNPAIRED = 256

StreamKey = tuple[str, int, str]  # (run, rank, feature name)


class FeatureStreams:
    """Turns features batches into worker jobs; results go to ``post`` (on a worker thread)."""

    def __init__(
        self, settings: StatsSettings, jobs: StatsJobs, post: Callable[[JobResult], None]
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.post = post
        self._counts: dict[StreamKey, int] = {}
        self._maps: dict[StreamKey, Any] = {}  # the stream's FeatureMap (its last map)
        self._unpaired: dict[tuple[str, str], FeatureBatch] = {}

    def submit(self, batch: FeatureBatch) -> None:
        stream = (batch.run, batch.rank, batch.name)
        self.jobs.submit(
            stream,
            "representation",
            tasks.representation_job,
            lambda metrics: self.post(FeatureStatistics(batch, metrics)),
            (batch.line, batch.run_dir),
        )
        self._pair(batch)
        count = self._counts[stream] = self._counts.get(stream, 0) + 1
        method = self.settings.feature_map
        if method != "off" and (count - 1) % self.settings.map_every == 0:
            self._map(batch, method)

    def _pair(self, batch: FeatureBatch) -> None:
        """Student/teacher streams: the line naming a pair meets its partner's at the same step."""
        partner = batch.line.get("pair")
        key = (batch.run, str(partner) if partner else batch.name)
        waiting = self._unpaired.get(key)
        if waiting is not None and waiting.step == batch.step and waiting.name != batch.name:
            del self._unpaired[key]
            student, teacher = (waiting, batch) if partner else (batch, waiting)
            self.jobs.submit(
                (teacher.run, teacher.rank, teacher.name, "pair"),
                "pair_cosine",
                tasks.pair_job,
                lambda metrics: self.post(FeatureStatistics(teacher, metrics)),
                (student.line, student.run_dir, teacher.line, teacher.run_dir),
            )
            return
        if len(self._unpaired) > MAX_UNPAIRED:
            self._unpaired.clear()
        self._unpaired[(batch.run, batch.name) if partner else key] = batch

    def _map(self, batch: FeatureBatch, method: MapMethod) -> None:
        """A map job carries the stream's FeatureMap out and back (its state: the last map).

        A t-SNE map is two jobs: its points, in a worker process of its own that
        exits afterwards (openTSNE brings scikit-learn and scipy, ~90 MB, which would
        otherwise stay resident for the whole run), then its drawing, on the shared
        worker. A PCA map needs neither and is one job.
        """
        from agent.analysis.maps import FeatureMap

        key = (batch.run, batch.rank, batch.name)
        directory = batch.run_dir / "images" / f"features-{batch.name}-{method}".replace("/", "_")
        step = -1 if batch.step is None else batch.step
        points = self.settings.map_points
        feature_map = self._maps.get(key) or FeatureMap(max_points=points)
        title = f"{batch.name} ({method}), step {batch.step}"
        path = directory / f"{step:08d}.png"

        def drawn(png: Path) -> None:
            self.post(FeatureMapDrawn(batch, method, png))

        if method == "pca":

            def done(result: tuple[Any, Path]) -> None:
                self._maps[key] = result[0]  # one job per key at a time: no race
                drawn(result[1])

            self.jobs.submit(
                (*key, "map"),
                method,
                tasks.map_job,
                done,
                (feature_map, batch.line, batch.run_dir, step, method, path, title),
            )
            return

        def placed(updated: Any) -> None:
            self._maps[key] = updated  # one job per key at a time: no race
            self.jobs.submit(
                (*key, "map_render"),
                f"{method}_render",
                tasks.render_map_job,
                drawn,
                (updated.points, path, title),
            )

        self.jobs.submit(
            (*key, "map"),
            method,
            tasks.map_points_job,
            placed,
            (feature_map, batch.line, batch.run_dir, step, method),
            cost_hint=tasks.TSNE_CPU_SECONDS_PER_1000_POINTS * points / 1000,
            alone=True,
        )
