"""``outrider report``: one stored run as a self-contained HTML page and its PNG charts.

``build`` reads the run store (run.json and metrics.jsonl through ``RunLog``) into
a ``Report``: summary, training progress, validation, resource use, alerts,
convergence analysis and recommendations, each section with what it lacks and
how to log it. ``render_charts`` draws its PNGs, ``html`` lays it out with the
PNGs embedded (base64, inline CSS, nothing fetched), and ``render_html(run_dir)``
does all three for the web dashboard, which serves it as is.

matplotlib is imported inside the chart functions, through its object API on the
Agg canvas (never pyplot, whose global state is not thread-safe): the dashboard
renders reports on a server thread.
"""

from __future__ import annotations

import base64
import datetime
import html as markup
import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.reports import convergence
from agent.reports.recommendations import Evidence, Recommendation, recommend
from agent.store.runs import load_info
from agent.store.series import RunLog, downsample

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: the report's sections, in page order: anchor id and heading
SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Summary"),
    ("progress", "Training progress"),
    ("validation", "Validation"),
    ("resources", "Resource use"),
    ("alerts", "Alerts"),
    ("convergence", "Convergence analysis"),
    ("recommendations", "Recommendations"),
)
VALIDATION_PREFIXES = ("val/", "eval/", "validation/")
THROUGHPUT = ("tokens_per_second", "samples_per_second", "steps_per_second")
#: metric rows in the progress and validation tables at most
MAX_ROWS = 60
#: points drawn per line at most (downsampled keeping spikes)
CHART_BUCKETS = 1000
DPI = 100
GIB = float(1 << 30)

#: what each section needs, and how to log it, for a run without it
HOW_TO_LOG = {
    "loss": "no training loss: log it every step with `probe.log({'loss': loss}, step=step)`.",
    "validation": "no validation metrics (`val/...`): `probe.evaluate_lm(model, batches, "
    "step=step)` logs val/loss, perplexity and accuracy, or `probe.log({'val/loss': v}, "
    "step=step)`.",
    "system": "no system samples: the agent samples the host once a second while it runs the "
    "trainer (`outrider run -- python train.py`).",
    "gpu": "no GPU samples: the agent found no NVIDIA GPU or driver (pynvml) on this host.",
    "step_time": "no step time: `probe.watch(model, optimizer)` logs step_time_seconds and "
    "throughput every step.",
    "data_wait": "no data wait: `probe.watch(model, optimizer).data(loader)` measures how long "
    "each step waits for its batch (data_wait_seconds).",
    "grad_norm": "no gradient norm: `probe.watch(model, optimizer)` logs grad_norm before "
    "clipping.",
}


@dataclass
class Report:
    """Everything the page shows, as plain data (``as_dict`` is ``outrider report --json``)."""

    run_id: str
    run_dir: Path
    summary: dict[str, Any]
    progress: dict[str, Any]
    validation: dict[str, Any]
    resources: dict[str, Any]
    alerts: dict[str, Any]
    convergence: dict[str, Any]
    recommendations: list[Recommendation]
    missing: dict[str, list[str]]
    log: RunLog = field(repr=False)
    info: dict[str, Any] = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = _clean(
            {
                "run_id": self.run_id,
                "run_dir": str(self.run_dir),
                "summary": self.summary,
                "progress": self.progress,
                "validation": self.validation,
                "resources": self.resources,
                "alerts": self.alerts,
                "convergence": self.convergence,
                "recommendations": [r.as_dict() for r in self.recommendations],
                "missing": self.missing,
            }
        )
        return cleaned


def build(run_dir: Path) -> Report:
    """The report of the run stored in ``run_dir`` (OSError / JSONDecodeError if run.json
    cannot be read)."""
    run_dir = Path(run_dir)
    info = load_info(run_dir)
    log = RunLog.read(run_dir)
    missing: dict[str, list[str]] = {}
    evidence = Evidence.gather(log, info)
    loss_metric, rank, loss = evidence.loss_metric, evidence.rank, evidence.loss
    if loss_metric is None:
        missing.setdefault("progress", []).append(HOW_TO_LOG["loss"])
    recommendations = recommend(evidence)
    report = Report(
        run_id=str(info.get("run_id", run_dir.name)),
        run_dir=run_dir,
        summary={},
        progress=_progress(log, loss_metric, rank, missing),
        validation=_validation(log, evidence.val_metric, evidence.val, loss, missing),
        resources=_resources(log, info, rank, missing),
        alerts=_alerts(log),
        convergence=_convergence(loss, log, rank, loss_metric, missing),
        recommendations=recommendations,
        missing=missing,
        log=log,
        info=info,
    )
    report.summary = _summary(report, loss)
    return report


def render_html(run_dir: Path) -> str:
    """The whole report of ``run_dir`` as one self-contained HTML page."""
    report = build(run_dir)
    return html(report, render_charts(report))


def write(report: Report, out_dir: Path) -> list[Path]:
    """report.html and the PNGs into ``out_dir`` (made if needed); the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = render_charts(report)
    written = []
    for name, png in charts.items():
        path = out_dir / f"{name}.png"
        path.write_bytes(png)
        written.append(path)
    page = out_dir / "report.html"
    page.write_text(html(report, charts), encoding="utf-8")
    return [page, *written]


# -- sections ----------------------------------------------------------------------------


def _summary(report: Report, loss: convergence.Convergence | None) -> dict[str, Any]:
    info = report.info
    start, end = info.get("start_time"), info.get("end_time")
    git = info.get("git") or {}
    config = dict(info.get("config") or {})
    config.update(report.log.config())
    ranks = sorted(
        {r for name in report.log.metric_names(system=False) for r in report.log.series[name].ranks}
        - {-1}
    )
    command = info.get("command") or (info.get("trainer") or {}).get("argv") or []
    return {
        "status": info.get("status"),
        "exit_status": info.get("exit_status"),
        "start_time": start,
        "start": _when(start),
        "duration_s": end - start if isinstance(start, float) and isinstance(end, float) else None,
        "last_step": info.get("last_step", loss.last_step if loss else None),
        "ranks": ranks,
        "host": info.get("host"),
        "command": " ".join(str(part) for part in command),
        "git_commit": git.get("commit"),
        "git_dirty": git.get("dirty"),
        "python": info.get("python"),
        "torch": info.get("torch"),
        "config": config,
        "records": info.get("records", 0),
        "dropped": info.get("dropped", 0),
        "lost": info.get("lost", 0),
        "final_loss": loss.final if loss else None,
        "loss_reduction": loss.reduction if loss else None,
        "alerts": len(report.log.alerts),
        "recommendations": len(report.recommendations),
        "job": "job" in info,
    }


def _progress(
    log: RunLog, loss_metric: str | None, rank: int, missing: dict[str, list[str]]
) -> dict[str, Any]:
    names = [
        n
        for n in log.metric_names(system=False)
        if not n.startswith(VALIDATION_PREFIXES) and not n.startswith("features/")
    ]
    for name, need in (("grad_norm", "grad_norm"), ("step_time_seconds", "step_time")):
        if name not in log.series:
            missing.setdefault("progress", []).append(HOW_TO_LOG[need])
    return {
        "loss_metric": loss_metric,
        "rank": rank,
        "metrics": _table(log, names, rank),
        "metrics_total": len(names),
    }


def _validation(
    log: RunLog,
    val_metric: str | None,
    val: convergence.Validation | None,
    loss: convergence.Convergence | None,
    missing: dict[str, list[str]],
) -> dict[str, Any]:
    names = [n for n in log.metric_names(system=False) if n.startswith(VALIDATION_PREFIXES)]
    if not names:
        missing.setdefault("validation", []).append(HOW_TO_LOG["validation"])
    result: dict[str, Any] = {
        "metric": val_metric,
        "metrics": _table(log, names, None),
        "best": val.as_dict() if val else None,
    }
    if val is not None and loss is not None:
        result["gap_to_train"] = val.last - loss.final
    return result


def _resources(
    log: RunLog, info: Mapping[str, Any], rank: int, missing: dict[str, list[str]]
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    cpu = _finite(log, "system/cpu_percent")
    samples = max((len(s) for n, s in log.series.items() if n.startswith("system/")), default=0)
    result["system_samples"] = samples
    if not samples:
        missing.setdefault("resources", []).append(HOW_TO_LOG["system"])
    if len(cpu):
        result["host_cpu_percent"] = {"median": float(np.median(cpu)), "max": float(cpu.max())}
    used, total = (
        _finite(log, "system/memory_used_bytes"),
        _finite(log, "system/memory_total_bytes"),
    )
    if len(used) and len(total):
        result["host_memory"] = {"peak_bytes": float(used.max()), "total_bytes": float(total.max())}
    rss = [_finite(log, n) for n in log.series if re.match(r"^system/process/\d+/rss_bytes$", n)]
    rss = [r for r in rss if len(r)]
    if rss:
        result["trainer_rss_peak_bytes"] = max(float(r.max()) for r in rss)
    gpus: dict[str, dict[str, float]] = {}
    for name in log.series:
        match = re.match(r"^system/gpu(\d+)/(\w+)$", name)
        if match:
            values = _finite(log, name)
            if len(values):
                gpu = gpus.setdefault(match[1], {})
                gpu[f"{match[2]}_median"] = float(np.median(values))
                gpu[f"{match[2]}_max"] = float(values.max())
    result["gpus"] = gpus
    if samples and not gpus:
        missing.setdefault("resources", []).append(HOW_TO_LOG["gpu"])
    step_time = _finite(log, "step_time_seconds", rank)
    if len(step_time):
        p50, p90, p99 = np.percentile(step_time, [50, 90, 99])
        result["step_time_seconds"] = {"p50": p50, "p90": p90, "p99": p99}
        waits = {}
        if "data_wait_seconds" in log.series:
            for r in sorted(set(log.series["step_time_seconds"].ranks)):
                spent = float(_finite(log, "step_time_seconds", r).sum())
                if spent > 0:
                    waits[str(r)] = float(_finite(log, "data_wait_seconds", r).sum()) / spent
        else:
            missing.setdefault("resources", []).append(HOW_TO_LOG["data_wait"])
        result["data_wait_share"] = waits
    else:
        missing.setdefault("resources", []).append(HOW_TO_LOG["step_time"])
    for name in THROUGHPUT:
        speed = _finite(log, name, rank)
        if len(speed):
            result["throughput"] = {"metric": name, "median": float(np.median(speed))}
            break
    peak = _finite(log, "cuda_memory_peak_bytes")
    if len(peak):
        result["cuda_memory_peak_bytes"] = float(peak.max())
    return result


def _alerts(log: RunLog) -> dict[str, Any]:
    by_name: dict[str, int] = {}
    listed = []
    for alert in log.alerts:
        name = str(alert.get("name"))
        by_name[name] = by_name.get(name, 0) + 1
        listed.append(
            {key: alert.get(key) for key in ("name", "severity", "rank", "step", "t", "message")}
            | {"advice": alert.get("advice")}
        )
    return {"count": len(log.alerts), "by_name": by_name, "list": listed}


def _convergence(
    loss: convergence.Convergence | None,
    log: RunLog,
    rank: int,
    loss_metric: str | None,
    missing: dict[str, list[str]],
) -> dict[str, Any]:
    if loss is None:
        if loss_metric is not None:
            missing.setdefault("convergence", []).append(
                f"fewer than {convergence.MIN_POINTS} finite {loss_metric} values: too few to "
                "judge the curve."
            )
        else:
            missing.setdefault("convergence", []).append(HOW_TO_LOG["loss"])
        return {"metric": loss_metric}
    grad = convergence.growth(_finite(log, "grad_norm", rank))
    if "grad_norm" not in log.series:
        missing.setdefault("convergence", []).append(HOW_TO_LOG["grad_norm"])
    return {"metric": loss_metric, "rank": rank, **loss.as_dict(), "grad_norm_growth": grad}


# -- charts ------------------------------------------------------------------------------


def render_charts(report: Report) -> dict[str, bytes]:
    """PNG bytes per chart name: progress, validation, resources, convergence (each drawn
    only when the run has its data)."""
    charts = {"progress": _progress_chart(report)}
    if report.validation["metrics"]:
        charts["validation"] = _validation_chart(report)
    if report.resources.get("system_samples") or "step_time_seconds" in report.log.series:
        charts["resources"] = _resources_chart(report)
    if report.convergence.get("points"):
        charts["convergence"] = _convergence_chart(report)
    return charts


def _figure(rows: int, cols: int, height: float) -> tuple[Figure, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11.0, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, cols, squeeze=False)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _line(
    axes: Axes,
    report: Report,
    name: str,
    label: str,
    rank: int | None,
    *,
    by_time: bool = False,
    scale: float = 1.0,
    **style: Any,
) -> bool:
    series = report.log.series.get(name)
    if series is None:
        return False
    steps, times, values = series.arrays(rank)
    x = (times - _start(report)) / 60.0 if by_time else steps
    keep = np.isfinite(values) & np.isfinite(x)
    x, y = x[keep], values[keep] * scale
    if not len(y):
        return False
    index = downsample(y, CHART_BUCKETS)
    if len(y) < 3:
        style.setdefault("marker", "o")
    axes.plot(x[index], y[index], label=label, **style)
    return True


def _finish(
    axes: Axes, title: str, drew: bool, xlabel: str, *, log: bool = False, empty: str = "no data"
) -> None:
    """Title, labels and grid; "no data" (or ``empty``) on a panel with nothing drawn; a log
    y axis where asked and the points are positive and span more than a decade."""
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(xlabel, fontsize=8)
    axes.tick_params(labelsize=8)
    axes.grid(True, alpha=0.3)
    if not drew:
        axes.text(0.5, 0.5, empty, ha="center", va="center", transform=axes.transAxes)
        return
    low, high = axes.dataLim.y0, axes.dataLim.y1
    if log and low > 0 and high / low > 10:
        axes.set_yscale("log")
    if len(axes.get_legend_handles_labels()[0]) > 1:
        axes.legend(fontsize=8)


def _progress_chart(report: Report) -> bytes:
    figure, axes = _figure(2, 2, 6.5)
    rank = report.progress["rank"]
    loss_metric = report.progress["loss_metric"]
    (loss, lr), (grad, speed) = axes
    drew = False
    if loss_metric:
        drew = _line(loss, report, loss_metric, "train", rank, alpha=0.4, lw=0.8)
        trend = _trend(report, loss_metric, rank)
        if trend is not None:
            loss.plot(trend[0], trend[2], label="trend (rolling median)", color="C0", lw=1.6)
    val_metric = report.validation.get("metric")
    if val_metric:
        drew |= _line(loss, report, val_metric, "validation", rank, color="C1", marker=".")
    for alert in report.log.alerts:
        if isinstance(alert.get("step"), int):
            loss.axvline(alert["step"], color="C3", ls="--", lw=0.8, alpha=0.7)
    _finish(loss, f"{loss_metric or 'loss'} (dashed: alerts)", drew, "step", log=True)
    _finish(lr, "learning rate", _line(lr, report, "lr", "lr", rank, color="C2"), "step")
    drew = _line(grad, report, "grad_norm", "grad_norm", rank, color="C4", lw=0.8)
    _finish(grad, "gradient norm (before clipping)", drew, "step", log=True)
    name = next((n for n in THROUGHPUT if n in report.log.series), None)
    drew = name is not None and _line(speed, report, name, name, rank, color="C5", lw=0.8)
    _finish(speed, (name or "throughput").replace("_", " "), drew, "step")
    return _png(figure)


def _validation_chart(report: Report) -> bytes:
    names = [row["name"] for row in report.validation["metrics"]][:4]
    figure, axes = _figure(1, len(names), 3.4)
    for panel, name in zip(axes[0], names, strict=False):
        drew = _line(panel, report, name, name, None, marker=".", color="C1")
        _finish(panel, name, drew, "step", log=name.endswith("loss"))
    return _png(figure)


def _resources_chart(report: Report) -> bytes:
    figure, axes = _figure(2, 2, 6.5)
    (util, memory), (cpu, step) = axes
    minutes = "minutes since the run started"
    drew = False
    gpus = sorted(report.resources.get("gpus", {}), key=int)
    for index in gpus:
        drew |= _line(
            util, report, f"system/gpu{index}/util_percent", f"GPU {index}", None, by_time=True
        )
    _finish(util, "GPU utilisation %", drew, minutes, empty="no GPU samples")
    drew = False
    for index in gpus:
        drew |= _line(
            memory,
            report,
            f"system/gpu{index}/memory_used_bytes",
            f"GPU {index}",
            None,
            by_time=True,
            scale=1 / GIB,
        )
    drew |= _line(
        memory,
        report,
        "system/memory_used_bytes",
        "host",
        None,
        by_time=True,
        scale=1 / GIB,
        color="k",
    )
    for name in report.log.series:
        if re.match(r"^system/process/\d+/rss_bytes$", name):
            pid = name.split("/")[2]
            drew |= _line(
                memory,
                report,
                name,
                f"trainer {pid} RSS",
                None,
                by_time=True,
                scale=1 / GIB,
                ls="--",
            )
    _finish(memory, "memory used, GiB", drew, minutes)
    drew = _line(cpu, report, "system/cpu_percent", "host", None, by_time=True, color="C2")
    _finish(cpu, "host CPU busy %", drew, minutes)
    rank = report.progress["rank"]
    drew = _line(step, report, "step_time_seconds", "step time", rank, lw=0.8)
    drew |= _line(step, report, "data_wait_seconds", "data wait", rank, lw=0.8, color="C3")
    _finish(step, "seconds per step", drew, "step")
    return _png(figure)


def _convergence_chart(report: Report) -> bytes:
    figure, axes = _figure(1, 2, 3.6)
    curve, noise = axes[0]
    result = report.convergence
    metric, rank = result["metric"], result["rank"]
    _line(curve, report, metric, metric, rank, alpha=0.35, lw=0.8)
    trend = _trend(report, metric, rank)
    if trend is not None:
        curve.plot(trend[0], trend[2], color="C0", lw=1.6, label="trend")
    curve.axvline(result["best_step"], color="C2", lw=1, label="best (smoothed)")
    if result.get("step_at_90") is not None:
        curve.axvline(result["step_at_90"], color="C1", ls=":", lw=1, label="90% of reduction")
    steps, _, values = report.log.series[metric].arrays(rank)
    spikes = np.isin(steps, result["spike_steps"])
    if spikes.any():
        curve.plot(steps[spikes], values[spikes], "x", color="C3", label="spikes")
    _finish(curve, f"{metric}: trend, best step, spikes", True, "step", log=True)
    if trend is not None:
        x, y, smooth = trend
        residual = np.log(y / smooth) if np.all(y > 0) and np.all(smooth > 0) else y - smooth
        index = downsample(residual, CHART_BUCKETS)
        noise.plot(x[index], residual[index], lw=0.7, color="C0")
        band = result["relative_noise"] or 0.0
        noise.axhspan(-band, band, color="C2", alpha=0.2, label=f"noise ±{band:.3g}")
    _finish(noise, "residual around the trend (log ratio)", trend is not None, "step")
    return _png(figure)


def _trend(
    report: Report, metric: str, rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The finite points by step and their rolling-median trend, as the analysis sees them."""
    steps, _, values = report.log.series[metric].arrays(rank)
    order = np.argsort(steps, kind="stable")
    x, y = steps[order], values[order]
    keep = np.isfinite(y) & np.isfinite(x)
    x, y = x[keep], y[keep]
    if len(y) < convergence.MIN_POINTS:
        return None
    return x, y, convergence.rolling_median(y, convergence.trend_window(len(y)))


def _start(report: Report) -> float:
    start = report.info.get("start_time")
    if isinstance(start, int | float):
        return float(start)
    times = [s.times[0] for s in report.log.series.values() if s.times]
    return min(times) if times else 0.0


# -- the page ----------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2430;
background:#f5f6f8;line-height:1.45}
header{background:#1d2430;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c5ccd8;font-size:14px}
nav{padding:8px 28px;background:#e8ebf0;font-size:14px}nav a{margin-right:14px;color:#234}
main{max-width:1180px;margin:0 auto;padding:8px 20px 40px}
section{background:#fff;border-radius:8px;padding:14px 22px;margin:16px 0;
box-shadow:0 1px 3px rgba(0,0,0,.08)}
h2{font-size:18px;margin:4px 0 10px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{padding:3px 10px;border-bottom:1px solid #e3e6eb;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;display:block;margin:10px 0}
.missing{background:#fff7e0;border-left:4px solid #e0a800;padding:6px 10px;margin:8px 0;
font-size:14px}
.rec{border-left:5px solid #5b8def;padding:6px 12px;margin:10px 0;background:#f7f9fd}
.rec.warning{border-color:#e0a800;background:#fffbef}
.rec.critical{border-color:#d33;background:#fff3f3}
.sev{font-size:12px;text-transform:uppercase;font-weight:600;color:#666}
code{background:#eef0f4;padding:1px 4px;border-radius:3px}
.kv td:first-child{color:#555;width:190px}
"""


def html(report: Report, charts: Mapping[str, bytes]) -> str:
    """The page: every section, each chart embedded as a base64 PNG."""
    bodies = {
        "summary": _summary_html(report),
        "progress": _metrics_html(report.progress["metrics"], report.progress["metrics_total"]),
        "validation": _validation_html(report),
        "resources": _resources_html(report),
        "alerts": _alerts_html(report),
        "convergence": _convergence_html(report),
        "recommendations": _recommendations_html(report),
    }
    parts = []
    for key, title in SECTIONS:
        chart = charts.get(key)
        image = (
            f'<img alt="{title}" src="data:image/png;base64,{base64.b64encode(chart).decode()}">'
            if chart
            else ""
        )
        notes = "".join(
            f'<p class="missing">{_code(note)}</p>' for note in report.missing.get(key, [])
        )
        parts.append(f'<section id="{key}"><h2>{title}</h2>{notes}{image}{bodies[key]}</section>')
    nav = "".join(f'<a href="#{key}">{title}</a>' for key, title in SECTIONS)
    summary = report.summary
    subtitle = (
        f"{summary.get('status') or '?'} · started {summary.get('start') or '?'} · "
        f"{_duration(summary.get('duration_s'))} · last step {_num(summary.get('last_step'))}"
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>outrider report: {_text(report.run_id)}</title><style>{STYLE}</style></head>"
        f"<body><header><h1>Run {_text(report.run_id)}</h1><p>{_text(subtitle)}</p></header>"
        f"<nav>{nav}</nav><main>{''.join(parts)}</main></body></html>\n"
    )


def _summary_html(report: Report) -> str:
    s = report.summary
    rows = [
        ("run directory", str(report.run_dir)),
        ("status", f"{s['status']} (exit {_num(s['exit_status'])})"),
        ("started", s["start"] or "-"),
        ("duration", _duration(s["duration_s"])),
        ("last step", _num(s["last_step"])),
        ("ranks", ", ".join(str(r) for r in s["ranks"]) or "-"),
        ("host", f"{s['host'] or '-'} (python {s['python'] or '-'}, torch {s['torch'] or '-'})"),
        ("command", s["command"] or "-"),
        ("git", f"{(s['git_commit'] or '-')[:12]}{' (dirty)' if s['git_dirty'] else ''}"),
        ("records", f"{s['records']} stored, {s['dropped']} dropped, {s['lost']} lost"),
        ("final loss", _num(s["final_loss"])),
        (
            "loss reduction",
            "-" if s["loss_reduction"] is None else f"{s['loss_reduction']:.1%}",
        ),
        ("alerts", str(s["alerts"])),
        ("recommendations", str(s["recommendations"])),
    ]
    config = s["config"]
    if config:
        rows.append(("config", ", ".join(f"{k}={v}" for k, v in sorted(config.items()))))
    return _kv(rows)


def _metrics_html(rows: Sequence[Mapping[str, Any]], total: int) -> str:
    if not rows:
        return "<p>No metrics of this kind were logged.</p>"
    head = (
        "<tr><th>metric</th><th>count</th><th>first</th><th>last</th><th>min</th><th>max</th></tr>"
    )
    body = "".join(
        f"<tr><td>{_text(r['name'])}</td><td class=n>{r['count']}</td>"
        + "".join(f"<td class=n>{_num(r[k])}</td>" for k in ("first", "last", "min", "max"))
        + "</tr>"
        for r in rows
    )
    more = (
        f"<p>{total - len(rows)} more in <code>outrider show</code>.</p>"
        if total > len(rows)
        else ""
    )
    return f"<table>{head}{body}</table>{more}"


def _validation_html(report: Report) -> str:
    v = report.validation
    rows = []
    best = v.get("best")
    if best:
        rows = [
            ("evaluations", str(best["evaluations"])),
            ("best", f"{_num(best['best'])} at step {_num(best['best_step'])}"),
            ("last", f"{_num(best['last'])} at step {_num(best['last_step'])}"),
            (
                "recent vs best stretch",
                f"median of the last {best['window']}: {_num(best['recent'])}, "
                f"{best['above_best']:+.1%} against the lowest rolling median "
                f"{_num(best['smoothed_best'])} (around step {_num(best['smoothed_best_step'])})",
            ),
        ]
        if v.get("gap_to_train") is not None:
            rows.append(("last minus final train loss", _num(v["gap_to_train"])))
    return (_kv(rows) if rows else "") + _metrics_html(v["metrics"], len(v["metrics"]))


def _resources_html(report: Report) -> str:
    r = report.resources
    rows = [("system samples", str(r.get("system_samples", 0)))]
    if "host_cpu_percent" in r:
        cpu = r["host_cpu_percent"]
        rows.append(("host CPU busy", f"median {cpu['median']:.0f}%, max {cpu['max']:.0f}%"))
    if "host_memory" in r:
        m = r["host_memory"]
        rows.append(
            ("host memory peak", f"{m['peak_bytes'] / GIB:.2f} of {m['total_bytes'] / GIB:.1f} GiB")
        )
    if "trainer_rss_peak_bytes" in r:
        rows.append(("trainer RSS peak", f"{r['trainer_rss_peak_bytes'] / GIB:.2f} GiB"))
    for index, gpu in sorted(r.get("gpus", {}).items(), key=lambda item: int(item[0])):
        parts = []
        if "util_percent_median" in gpu:
            parts.append(f"util median {gpu['util_percent_median']:.0f}%")
        if "memory_used_bytes_max" in gpu:
            total = gpu.get("memory_total_bytes_max")
            of = f" of {total / GIB:.1f}" if total else ""
            parts.append(f"memory peak {gpu['memory_used_bytes_max'] / GIB:.1f}{of} GiB")
        if "temperature_c_max" in gpu:
            parts.append(f"max {gpu['temperature_c_max']:.0f} °C")
        if "power_watts_median" in gpu:
            parts.append(f"power median {gpu['power_watts_median']:.0f} W")
        rows.append((f"GPU {index}", ", ".join(parts) or "-"))
    if "cuda_memory_peak_bytes" in r:
        rows.append(("CUDA allocator peak", f"{r['cuda_memory_peak_bytes'] / GIB:.2f} GiB"))
    if "step_time_seconds" in r:
        st = r["step_time_seconds"]
        rows.append(
            (
                "step time",
                f"p50 {_num(st['p50'])} s, p90 {_num(st['p90'])} s, p99 {_num(st['p99'])} s",
            )
        )
    if "throughput" in r:
        rows.append((r["throughput"]["metric"], f"median {_num(r['throughput']['median'])}"))
    for rank, share in (r.get("data_wait_share") or {}).items():
        rows.append((f"data wait, rank {rank}", f"{share:.1%} of step time"))
    return _kv(rows)


def _alerts_html(report: Report) -> str:
    alerts = report.alerts
    if not alerts["count"]:
        return "<p>No alerts fired during this run.</p>"
    counts = ", ".join(f"{name} x{n}" for name, n in sorted(alerts["by_name"].items()))
    head = (
        "<tr><th>severity</th><th>alert</th><th>step</th><th>rank</th>"
        "<th>message and advice</th></tr>"
    )
    body = "".join(
        f"<tr><td>{_text(a['severity'])}</td><td>{_text(a['name'])}</td>"
        f"<td class=n>{_num(a['step'])}</td><td class=n>{_num(a['rank'])}</td>"
        f"<td>{_text(a['message'])}<br><i>{_text(a.get('advice') or '')}</i></td></tr>"
        for a in alerts["list"][-100:]
    )
    return f"<p>{alerts['count']} alert(s): {_text(counts)}.</p><table>{head}{body}</table>"


def _convergence_html(report: Report) -> str:
    c = report.convergence
    if not c.get("points"):
        return ""
    minute = "-" if c["per_minute"] is None else f"{c['per_minute']:.4g}"
    rows = [
        ("metric", f"{c['metric']} (rank {c['rank']}, {c['points']} points)"),
        (
            "loss reduction",
            f"{c['reduction']:.1%}: {_num(c['initial'])} → {_num(c['final'])} "
            "(medians of the first and last 5% of points)",
        ),
        ("best (smoothed)", f"{_num(c['best'])} at step {_num(c['best_step'])}"),
        (
            "stability",
            f"noise {c['relative_noise']:.2%} around the trend (robust std of the log ratio); "
            f"{c['spikes']} spike(s)"
            + (
                f" at step(s) {', '.join(_num(s) for s in c['spike_steps'])}" if c["spikes"] else ""
            ),
        ),
        (
            "efficiency",
            f"{_num(c['per_1k_steps'])} loss per 1k steps, {minute} per minute"
            + (f" at {c['steps_per_second']:.3g} steps/s" if c["steps_per_second"] else ""),
        ),
        (
            "90% of the reduction",
            "-"
            if c["step_at_90"] is None
            else f"by step {_num(c['step_at_90'])} ({c['share_of_run_at_90']:.0%} of the run)",
        ),
        ("at the end", f"{c['state']} (last 20% vs the 20% before: {c['tail_change']:+.1%})"),
    ]
    if c.get("nonfinite"):
        rows.append(
            (
                "non-finite",
                f"{c['nonfinite']} values, first at step {_num(c['first_nonfinite_step'])}",
            )
        )
    if c.get("grad_norm_growth") is not None:
        rows.append(("grad_norm growth", f"x{c['grad_norm_growth']:.2f} (last quarter vs lowest)"))
    return _kv(rows)


def _recommendations_html(report: Report) -> str:
    if not report.recommendations:
        return "<p>Nothing to change: no rule found a problem in what this run logged.</p>"
    return "".join(
        f'<div class="rec {r.severity}"><span class="sev">{r.severity}</span> '
        f"<b>{_text(r.title)}</b> <code>{r.rule}</code><p>{_text(r.finding)}</p>"
        f"<p><b>Do:</b> {_text(r.action)}</p></div>"
        for r in report.recommendations
    )


# -- helpers -----------------------------------------------------------------------------


def _table(log: RunLog, names: Iterable[str], rank: int | None) -> list[dict[str, Any]]:
    rows = []
    for name in list(names)[:MAX_ROWS]:
        values = log.series[name].values if rank is None else log.series[name].arrays(rank)[2]
        array = np.asarray(values, dtype=float)
        finite = array[np.isfinite(array)]
        if not len(array):
            array = np.asarray(log.series[name].values, dtype=float)
            finite = array[np.isfinite(array)]
        rows.append(
            {
                "name": name,
                "count": len(array),
                "first": float(array[0]) if len(array) else None,
                "last": float(array[-1]) if len(array) else None,
                "min": float(finite.min()) if len(finite) else None,
                "max": float(finite.max()) if len(finite) else None,
            }
        )
    return rows


def _finite(log: RunLog, name: str, rank: int | None = None) -> np.ndarray:
    series = log.series.get(name)
    if series is None:
        return np.empty(0)
    values = series.arrays(rank)[2]
    finite: np.ndarray = values[np.isfinite(values)]
    return finite


def _clean(value: Any) -> Any:
    """JSON-ready: numpy scalars as Python numbers, NaN/inf as None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _kv(rows: Sequence[tuple[str, str]]) -> str:
    return (
        '<table class="kv">'
        + "".join(f"<tr><td>{_text(k)}</td><td>{_text(v)}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _text(value: Any) -> str:
    return markup.escape(str(value))


def _code(text: str) -> str:
    """Escaped text with its `backticked` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _text(text))


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) < 1e9 else f"{value:.4g}"
    return str(value)


def _when(epoch: Any) -> str | None:
    if not isinstance(epoch, int | float):
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
