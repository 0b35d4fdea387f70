"""Several stored runs side by side: each metric's best and final value, how the configs
differ, and the curves overlaid (``outrider compare``).

"Best" needs a direction, which a metric's name gives: loss-like names (loss, perplexity,
error, seconds, ...) are best at their minimum, accuracy-like ones (acc, f1, reward,
per_second, ...) at their maximum; any other metric (lr, a norm) has no best, only its
final value and its range. A run's values of a metric are its lowest rank's (rank 0 in a
normal run): mixing ranks would make "final" depend on which rank wrote last.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.store.runs import load_info
from agent.store.series import RunLog, Series, downsample
from sinks import schema

Rule = Literal["min", "max", "none"]

#: name words that make lower better, and higher better (matched on ``_``/``/``/``-`` parts)
LOWER_IS_BETTER = frozenset(
    {
        "loss",
        "perplexity",
        "ppl",
        "error",
        "err",
        "nll",
        "mse",
        "mae",
        "rmse",
        "wer",
        "cer",
        "bpb",
        "bpc",
        "seconds",
        "latency",
    }
)
HIGHER_IS_BETTER = frozenset(
    {
        "acc",
        "accuracy",
        "top1",
        "top5",
        "f1",
        "precision",
        "recall",
        "auc",
        "auroc",
        "bleu",
        "rouge",
        "map",
        "iou",
        "miou",
        "dice",
        "reward",
        "return",
        "score",
        "throughput",
        "per_second",
    }
)
RULE_TEXT = (
    "best = min for loss-like names (loss, perplexity, error, nll, mse, seconds, latency, ...), "
    "max for accuracy-like ones (acc, f1, precision, recall, auc, bleu, reward, score, "
    "per_second, ...), none otherwise"
)
SPARK = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 24
PLOT_POINTS = 2000  # points drawn per curve at most (spikes kept: series.downsample)


def rule_for(name: str) -> Rule:
    """Whether ``name`` is best at its minimum, its maximum, or has no best."""
    parts = name.lower().split("/")
    for part in (parts[-1], "/".join(parts)):  # the leaf decides; else the whole name
        if "per_second" in part:
            return "max"
        words = set(re.split(r"[_\-./ ]+", part))
        if words & LOWER_IS_BETTER:
            return "min"
        if words & HIGHER_IS_BETTER:
            return "max"
    return "none"


@dataclass
class MetricResult:
    """One metric of one run, from its lowest rank's points."""

    rank: int
    count: int
    final: float
    final_step: int | None
    best: float | None
    best_step: int | None
    min: float | None
    max: float | None
    non_finite: int
    steps: np.ndarray = field(repr=False)
    values: np.ndarray = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "count": self.count,
            "final": schema.encode_number(self.final),
            "final_step": self.final_step,
            "best": self.best,
            "best_step": self.best_step,
            "min": self.min,
            "max": self.max,
            "non_finite": self.non_finite,
        }


@dataclass
class RunColumn:
    """One compared run: who it is, its config, and its metrics."""

    name: str
    run_dir: Path
    info: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, MetricResult]

    def overview(self) -> dict[str, Any]:
        info = self.info
        start, end = info.get("start_time"), info.get("end_time")
        git = info.get("git") if isinstance(info.get("git"), dict) else {}
        return {
            "run_id": self.name,
            "dir": str(self.run_dir),
            "status": info.get("status"),
            "start_time": start,
            "duration_s": end - start if start and end else None,
            "last_step": info.get("last_step"),
            "git_commit": (git or {}).get("commit"),
        }


@dataclass
class Comparison:
    runs: list[RunColumn]
    names: list[str]
    rules: dict[str, Rule]
    config_diff: dict[str, dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": RULE_TEXT,
            "runs": [run.overview() for run in self.runs],
            "metrics": {
                name: {
                    "rule": self.rules[name],
                    "runs": {
                        run.name: run.metrics[name].as_dict()
                        for run in self.runs
                        if name in run.metrics
                    },
                }
                for name in self.names
            },
            "config": {run.name: run.config for run in self.runs},
            "config_diff": self.config_diff,
        }


def _step(value: float) -> int | None:
    return int(value) if math.isfinite(value) else None


def metric_result(series: Series) -> MetricResult:
    """Final, best (by the name's rule), min and max of the lowest rank's points."""
    rank = min(series.ranks)
    steps, _, values = series.arrays(rank=rank)
    finite = np.isfinite(values)
    result = MetricResult(
        rank=rank,
        count=len(values),
        final=float(values[-1]),
        final_step=_step(steps[-1]),
        best=None,
        best_step=None,
        min=None,
        max=None,
        non_finite=int((~finite).sum()),
        steps=steps,
        values=values,
    )
    if finite.any():
        kept = np.flatnonzero(finite)
        low, high = kept[np.argmin(values[kept])], kept[np.argmax(values[kept])]
        result.min, result.max = float(values[low]), float(values[high])
        rule = rule_for(series.name)
        if rule != "none":
            at = low if rule == "min" else high
            result.best, result.best_step = float(values[at]), _step(steps[at])
    return result


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config maps as dotted keys (``optimizer.lr``), so a diff names the leaf."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


MISSING = "(absent)"


def config_diff(runs: Sequence[RunColumn]) -> dict[str, dict[str, Any]]:
    """Config keys whose value is not the same in every run (absent counts as a value)."""
    flats = [flat_config(run.config) for run in runs]
    keys = sorted(set().union(*flats)) if flats else []
    diff: dict[str, dict[str, Any]] = {}
    for key in keys:
        values = [flat.get(key, MISSING) for flat in flats]
        if any(value != values[0] for value in values[1:]):
            diff[key] = {run.name: value for run, value in zip(runs, values, strict=True)}
    return diff


def load_run(
    name: str, run_dir: Path, names: Callable[[str], bool] | None, system: bool
) -> RunColumn:
    """One run read back: its run.json, its config and each wanted metric's figures."""
    info = load_info(run_dir)
    log = RunLog.read(run_dir, names)
    config = info.get("config") if isinstance(info.get("config"), dict) else None
    metrics = {
        metric: metric_result(log.series[metric])
        for metric in log.metric_names(system=system)
        if len(log.series[metric])
    }
    return RunColumn(name, run_dir, info, config or log.config(), metrics)


def compare(
    runs: Sequence[tuple[str, Path]],
    names: Callable[[str], bool] | None = None,
    *,
    system: bool = False,
) -> Comparison:
    """Compare the runs ``(name, directory)``; ``names`` picks metrics (None: every metric,
    the host's ``system/...`` series only with ``system``)."""
    columns = [
        load_run(name, run_dir, names, system or names is not None) for name, run_dir in runs
    ]
    metric_names = sorted(set().union(*(run.metrics for run in columns)))
    rules = {name: rule_for(name) for name in metric_names}
    return Comparison(columns, metric_names, rules, config_diff(columns))


def _cells(steps: np.ndarray, values: np.ndarray, width: int) -> list[float]:
    """The points in step order cut into ``width`` slices: each slice's mean (NaN for a
    slice holding a non-finite value)."""
    if np.isfinite(steps).all():
        values = values[np.argsort(steps, kind="stable")]
    cells = []
    for part in np.array_split(values, min(width, len(values))):
        cells.append(float(part.mean()) if np.isfinite(part).all() else math.nan)
    return cells


def sparklines(comparison: Comparison, name: str, width: int = SPARK_WIDTH) -> dict[str, str]:
    """Each run's curve of ``name`` in ``width`` block characters, all on one scale (that of
    the slices' means, so one spike does not flatten every curve); ``!`` marks a slice with
    a non-finite value."""
    cells = {
        run.name: _cells(run.metrics[name].steps, run.metrics[name].values, width)
        for run in comparison.runs
        if name in run.metrics and run.metrics[name].count
    }
    finite = [c for row in cells.values() for c in row if math.isfinite(c)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    span = high - low
    lines = {}
    for run, row in cells.items():
        chars = []
        for cell in row:
            if not math.isfinite(cell):
                chars.append("!")
                continue
            level = 0.5 if span <= 0 else (cell - low) / span
            chars.append(SPARK[min(len(SPARK) - 1, max(0, int(level * len(SPARK))))])
        lines[run] = "".join(chars)
    return lines


# -- HTML ------------------------------------------------------------------------------------
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0}
figcaption{font-size:.9em;color:#555}
"""


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return html.escape(str(value))


def _plot(comparison: Comparison, name: str) -> str:
    """The runs' curves of ``name`` overlaid, as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.4), dpi=100)
    axes = figure.add_subplot()
    for run in comparison.runs:
        metric = run.metrics.get(name)
        if metric is None:
            continue
        steps, values = metric.steps, metric.values
        if not np.isfinite(steps).all():
            steps = np.arange(len(values), dtype=float)
        keep = downsample(values, PLOT_POINTS // 4)
        axes.plot(steps[keep], values[keep], label=run.name, linewidth=1.2)
    axes.set_title(name)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def to_html(comparison: Comparison) -> str:
    """One self-contained page: overview, best/final per metric, config differences and the
    overlaid curves as embedded PNGs (no scripts, nothing fetched)."""
    runs = comparison.runs
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>outrider compare: {html.escape(', '.join(r.name for r in runs))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>outrider compare</h1><h2>Runs</h2><table><tr>",
        "<th>run</th><th>status</th><th>last step</th><th>duration (s)</th><th>git</th></tr>",
    ]
    for run in runs:
        view = run.overview()
        commit = view["git_commit"][:12] if isinstance(view["git_commit"], str) else None
        parts.append(
            f"<tr><td>{_cell(run.name)}</td><td>{_cell(view['status'])}</td>"
            f"<td>{_cell(view['last_step'])}</td><td>{_cell(view['duration_s'])}</td>"
            f"<td>{_cell(commit)}</td></tr>"
        )
    parts.append("</table><h2>Metrics</h2>")
    parts.append(f"<p>{html.escape(RULE_TEXT)}.</p><table><tr><th>metric</th><th>rule</th>")
    for run in runs:
        name = html.escape(run.name)
        parts.append(f"<th>{name} best (step)</th><th>{name} final (step)</th>")
    parts.append("</tr>")
    for metric in comparison.names:
        parts.append(f"<tr><td>{html.escape(metric)}</td><td>{comparison.rules[metric]}</td>")
        for run in runs:
            result = run.metrics.get(metric)
            if result is None:
                parts.append("<td>-</td><td>-</td>")
                continue
            best = (
                f"{_cell(result.best)} ({_cell(result.best_step)})"
                if result.best is not None
                else "-"
            )
            parts.append(
                f"<td>{best}</td><td>{_cell(result.final)} ({_cell(result.final_step)})</td>"
            )
        parts.append("</tr>")
    parts.append("</table><h2>Config differences</h2>")
    if comparison.config_diff:
        parts.append("<table><tr><th>key</th>")
        parts.extend(f"<th>{html.escape(run.name)}</th>" for run in runs)
        parts.append("</tr>")
        for key, values in comparison.config_diff.items():
            parts.append(f"<tr><td>{html.escape(key)}</td>")
            parts.extend(f"<td>{_cell(values[run.name])}</td>" for run in runs)
            parts.append("</tr>")
        parts.append("</table>")
    else:
        parts.append("<p>The configs are the same.</p>")
    parts.append("<h2>Curves</h2><div class='plots'>")
    for metric in comparison.names:
        parts.append(
            f"<figure><img alt='{html.escape(metric)}' "
            f"src='data:image/png;base64,{_plot(comparison, metric)}'>"
            f"<figcaption>{html.escape(metric)}</figcaption></figure>"
        )
    parts.append("</div></body></html>\n")
    return "".join(parts)
