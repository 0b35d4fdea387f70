"""representation_collapse: feature streams judged against their own first batches.

Each series is made of real feature batches (numpy), turned into the agent's statistics
by the agent's own function and fed to the engine as the analysis does: one record per
batch holding every ``features/<stream>/<measure>``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from agent.alerts.engine import AlertEngine
from agent.analysis.representation import representation_stats
from tests.agent.alerts.helpers import RUN, Clock, make

DIM = 64
ROWS = 512
Batch = npt.NDArray[np.float64]


def stream_record(stream: str, features: Batch) -> dict[str, float]:
    """What the analysis derives from one features batch of ``stream``."""
    stats = representation_stats(features.astype(np.float32))
    return {f"features/{stream}/{key}": value for key, value in stats.items()}


def run_series(
    engine: AlertEngine,
    clock: Clock,
    batches: Iterable[Batch],
    *,
    stream: str = "h",
    every: int = 100,
) -> list[dict[str, Any]]:
    """One batch every ``every`` steps (and 60 s); the alerts fired, in order."""
    fired: list[dict[str, Any]] = []
    for index, features in enumerate(batches):
        clock.advance(60)
        engine.observe(RUN, 0, index * every, clock.now, stream_record(stream, features))
        fired.extend(engine.take_fired())
    return fired


@functools.cache
def basis(k: int, seed: int) -> Batch:
    """k orthonormal directions of R^DIM, as rows (shared: never modify)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((DIM, k)))
    return q.T  # type: ignore[no-any-return]


def spread(rng: np.random.Generator, k: int = DIM, scale: float = 1.0) -> Batch:
    """Rows spread evenly over the first k directions of a fixed basis."""
    return scale * rng.standard_normal((ROWS, k)) @ basis(DIM, seed=99)[:k]  # type: ignore[no-any-return]


def series(
    make_batch: Callable[[int, np.random.Generator], Batch], n: int, seed: int
) -> list[Batch]:
    rng = np.random.default_rng(seed)
    return [make_batch(i, rng) for i in range(n)]


ANCHOR = 12.0 * basis(1, seed=7)[0]  # a shared direction, norm 12; isotropic rows have norm ~8


def test_healthy_stream_with_a_large_mean_offset_stays_silent() -> None:
    """Rows with a shared offset 12x their spread (raw cosine ~0.99, collapse_ratio ~0.1) for
    50 batches, the spread wobbling +-20%: no alert; the old absolute floors would fire."""
    engine, clock = make(keep=["representation_collapse"])
    offset = 100.0 * ANCHOR / 12.0

    def batch(i: int, rng: np.random.Generator) -> Batch:
        return spread(rng, scale=1.0 + 0.2 * np.sin(i)) + offset

    batches = series(batch, 50, seed=1)
    first = stream_record("h", batches[0])
    assert first["features/h/mean_pairwise_cosine"] > 0.99
    assert first["features/h/collapse_ratio"] < 0.15
    assert first["features/h/effective_rank"] < 12
    assert run_series(engine, clock, batches) == []
    legacy = {"effective_rank_below": 20.0, "collapse_ratio_below": 0.2}
    engine, clock = make({"representation_collapse": legacy}, keep=["representation_collapse"])
    assert run_series(engine, clock, batches[:3])  # what absolute floors would have said


def test_healthy_isotropic_stream_stays_silent() -> None:
    """Isotropic rows whose scale and rank wander (64 -> 40 directions): no alert."""
    engine, clock = make(keep=["representation_collapse"])

    def batch(i: int, rng: np.random.Generator) -> Batch:
        return spread(rng, k=DIM - (i * 24) // 59, scale=0.5 + i / 20)

    assert run_series(engine, clock, series(batch, 60, seed=2)) == []


def test_partial_collapse_cosine_drifting_to_0_97_fires() -> None:
    """Rows drift onto one direction (cosine 0.25 -> 0.97, the no-stop-gradient SimSiam of
    issue 19): the cosine condition alone fires at the first batch above 0.9."""
    cosine_only = {"std_fraction": None, "rank_fraction": None}
    engine, clock = make({"representation_collapse": cosine_only}, keep=["representation_collapse"])
    # cosine = |a|^2 / (|a|^2 + s^2 d): s from 2.6 (0.25) down to 0.25 (0.97) over 40 batches
    scales = np.geomspace(2.6, 0.25, 40)
    batches = [spread(np.random.default_rng(i), scale=s) + ANCHOR for i, s in enumerate(scales)]
    cosines = [stream_record("h", b)["features/h/mean_pairwise_cosine"] for b in batches]
    assert cosines[0] == pytest.approx(0.25, abs=0.05) and cosines[-1] > 0.96
    fired = run_series(engine, clock, batches)
    crossing = next(i for i, c in enumerate(cosines) if c > 0.9)
    assert [a["step"] for a in fired] == [crossing * 100]
    alert = fired[0]
    assert alert["severity"] == "error"
    assert alert["attrs"]["stream"] == "features/h"
    assert alert["attrs"]["measure"] == "mean_pairwise_cosine"
    assert alert["attrs"]["value"] == pytest.approx(cosines[crossing])
    assert alert["attrs"]["baseline"] == pytest.approx(min(cosines[:5]))
    assert alert["message"].startswith(
        "representation collapse in features/h: mean_pairwise_cosine"
    )
    assert f"(baseline {min(cosines[:5]):.3g})" in alert["message"]

    # With the built-in settings the falling normalised std also holds: one alert names both.
    engine, clock = make(keep=["representation_collapse"])
    fired = run_series(engine, clock, batches)
    assert len(fired) == 1
    assert "mean_pairwise_cosine" in fired[0]["message"] or "collapse_ratio" in fired[0]["message"]
    ratios = [stream_record("h", b)["features/h/collapse_ratio"] for b in batches]
    first = min(crossing, next(i for i, r in enumerate(ratios) if r < 0.35 * max(ratios[:5])))
    assert fired[0]["step"] == first * 100


def test_dimensional_collapse_rank_64_to_10_fires() -> None:
    """Rows spread over 64 then fewer and fewer directions (down to 10), cosine ~0 throughout:
    the centred rank fires once below 35% of its baseline; no other measure moves."""
    engine, clock = make(keep=["representation_collapse"])
    ks = [64] * 5 + [int(k) for k in np.linspace(64, 10, 30)]
    batches = [spread(np.random.default_rng(i), k=k) for i, k in enumerate(ks)]
    records = [stream_record("h", b) for b in batches]
    assert all(abs(r["features/h/mean_pairwise_cosine"]) < 0.01 for r in records)
    ranks = [r["features/h/centered_effective_rank"] for r in records]
    fired = run_series(engine, clock, batches)
    limit = 0.35 * max(ranks[:5])
    crossing = next(i for i, r in enumerate(ranks) if r < limit)
    assert [a["step"] for a in fired] == [crossing * 100]
    assert fired[0]["attrs"]["measure"] == "centered_effective_rank"
    assert fired[0]["attrs"]["threshold"] == pytest.approx(limit)
    assert "collapse_ratio" not in fired[0]["message"]


def test_a_stream_with_an_offset_is_judged_by_its_centred_rank() -> None:
    """The large-offset stream of the first test, losing directions: the centred rank fires
    although its cosine (already ~0.99 at the start) says nothing new."""
    engine, clock = make(keep=["representation_collapse"])
    offset = 100.0 * ANCHOR / 12.0
    ks = [64] * 5 + [8] * 3  # the same total variance over fewer directions
    batches = [
        spread(np.random.default_rng(i), k=k, scale=(DIM / k) ** 0.5) + offset
        for i, k in enumerate(ks)
    ]
    fired = run_series(engine, clock, batches)
    assert [(a["step"], a["attrs"]["measure"]) for a in fired] == [(500, "centered_effective_rank")]


def test_total_collapse_fires_on_every_measure_once() -> None:
    """Healthy rows, then every row one vector: one alert naming all three measures."""
    engine, clock = make(keep=["representation_collapse"])
    rng = np.random.default_rng(4)
    batches = [spread(rng) for _ in range(8)] + [np.tile(ANCHOR, (ROWS, 1))] * 4
    fired = run_series(engine, clock, batches)
    assert [a["step"] for a in fired] == [800]
    message = fired[0]["message"]
    for measure in ("mean_pairwise_cosine", "collapse_ratio", "centered_effective_rank"):
        assert measure in message


def test_collapse_inside_the_baseline_window_is_judged_against_its_start() -> None:
    """The step-0 batch healthy, the next collapsed (a broken objective collapses in tens of
    steps, before a second batch at every=100): it fires at once; a warm-up of 1 skips the
    healthy batch, so the collapsed stream becomes its own baseline and stays quiet."""
    rng = np.random.default_rng(5)
    collapsed = [0.1 * spread(rng) + ANCHOR for _ in range(6)]
    batches = [spread(rng), *collapsed]
    engine, clock = make(keep=["representation_collapse"])
    assert [a["step"] for a in run_series(engine, clock, batches)] == [100]
    engine, clock = make(
        {"representation_collapse": {"warmup_batches": 1}}, keep=["representation_collapse"]
    )
    assert run_series(engine, clock, batches) == []


def test_the_baseline_stops_after_its_window() -> None:
    """A slow decline is judged against the first batches, not against a moving average."""
    engine, clock = make(
        {"representation_collapse": {"baseline_batches": 3}}, keep=["representation_collapse"]
    )
    ks = [int(k) for k in np.linspace(64, 12, 40)]
    batches = [spread(np.random.default_rng(i), k=k) for i, k in enumerate(ks)]
    fired = run_series(engine, clock, batches)
    assert len(fired) == 1 and fired[0]["attrs"]["measure"] == "centered_effective_rank"
    ranks = [stream_record("h", b)["features/h/centered_effective_rank"] for b in batches]
    assert fired[0]["attrs"]["baseline"] == pytest.approx(max(ranks[:3]))


def test_streams_are_judged_apart_with_a_cooldown_each() -> None:
    """Two streams, one collapsing: only it fires; recovering and collapsing again within the
    1800 s cooldown is suppressed, after it fires again."""
    engine, clock = make(keep=["representation_collapse"])
    rng = np.random.default_rng(6)
    healthy, collapsed = spread(rng), np.tile(ANCHOR, (ROWS, 1))
    fired = []
    for features in (healthy, healthy, collapsed, healthy, collapsed):
        clock.advance(60)
        record = {**stream_record("a", healthy), **stream_record("b", features)}
        engine.observe(RUN, 0, None, clock.now, record)
        fired.extend(engine.take_fired())
    assert [a["attrs"]["stream"] for a in fired] == ["features/b"]
    assert engine.suppressed() == {"representation_collapse": 1}
    clock.advance(1800)
    for features in (healthy, collapsed):
        engine.observe(RUN, 0, None, clock.now, stream_record("b", features))
    assert [a["attrs"]["stream"] for a in engine.take_fired()] == ["features/b"]


def test_absolute_floors_still_work_when_set() -> None:
    """effective_rank_below / collapse_ratio_below fire on any batch, the first included."""
    rule = {"effective_rank_below": 2.0, "collapse_ratio_below": 0.1}
    # effective_rank is not among the built-in globs: a user who wants its floor names it
    rule_metric = {**rule, "metric": ["features/*/effective_rank", "features/*/collapse_ratio"]}
    engine, clock = make({"representation_collapse": rule_metric}, keep=["representation_collapse"])
    fired = run_series(engine, clock, [np.tile(ANCHOR, (ROWS, 1))])
    assert len(fired) == 1
    assert fired[0]["attrs"]["measure"] == "effective_rank"
    assert fired[0]["attrs"]["threshold"] == 2.0
    assert "effective_rank 1 below 2; collapse_ratio" in fired[0]["message"]


def test_a_pair_record_is_not_a_batch() -> None:
    """A teacher's pair_cosine record under a broad glob neither counts nor forms a baseline."""
    broad = {"metric": "features/*", "baseline_batches": 1}
    engine, clock = make({"representation_collapse": broad}, keep=["representation_collapse"])
    rng = np.random.default_rng(8)
    engine.observe(RUN, 0, 0, clock.now, {"features/t/pair_cosine_mean": 0.99})
    engine.observe(RUN, 0, 0, clock.now, stream_record("t", spread(rng)))
    engine.observe(RUN, 0, 100, clock.now, {"features/t/pair_cosine_mean": 0.99})
    engine.observe(RUN, 0, 100, clock.now, stream_record("t", np.tile(ANCHOR, (ROWS, 1))))
    assert [a["step"] for a in engine.take_fired()] == [100]


def test_the_baseline_outlives_a_bye_until_the_run_ends() -> None:
    """Statistics of a rank's last batch come after its bye: still judged on the baseline.
    After run_end the run's baselines are gone (a collapsed first batch is its own start)."""
    engine, clock = make(keep=["representation_collapse"])
    rng = np.random.default_rng(9)
    collapsed = np.tile(ANCHOR, (ROWS, 1))
    engine.observe(RUN, 0, 0, clock.now, stream_record("h", spread(rng)))
    engine.observe_event(RUN, 0, "bye", {})
    engine.observe(RUN, 0, 100, clock.now, stream_record("h", collapsed))
    assert [a["step"] for a in engine.take_fired()] == [100]
    engine.observe_event(RUN, 0, "run_end", {})
    engine.observe_event(RUN, 0, "hello", {"pid": 1})
    engine.observe(RUN, 0, 0, clock.now + 3600, stream_record("h", collapsed))
    assert engine.take_fired() == []
