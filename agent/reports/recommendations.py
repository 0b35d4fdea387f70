"""What to change next time, drawn from what a run stored.

Each rule reads the stored series, alerts and run.json, and when its numbers
cross its threshold says what it found (with those numbers) and what to do.
The thresholds are module constants, listed in docs/reports.md. A rule whose
data the run did not log says nothing: the report's sections say what is missing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from agent.reports.convergence import (
    IMPROVING_CHANGE,
    SPIKE_MIN_JUMP,
    SPIKE_SIGMAS,
    Convergence,
    Validation,
    analyse,
    growth,
    validation,
)
from agent.store.series import RunLog

#: data wait above this share of the step time (summed over the run, the worst rank) is input-bound
INPUT_WAIT_SHARE = 0.2
#: the host's CPUs busier than this (median %) make more loader workers a poor fix
HOST_CPU_BUSY = 90.0
#: a GPU whose median utilisation is below this (%) is under-used
GPU_UTIL_LOW = 50.0
#: a GPU under-used with a peak memory below this share has room for a larger batch
GPU_MEMORY_ROOM = 0.6
#: peak memory above this share of the total is near the limit (GPU and host alike)
MEMORY_NEAR = 0.9
#: this many loss spikes with a gradient norm grown this much by the end: the LR is too high
LR_SPIKES = 2
GRAD_GROWTH = 1.5
#: a plateau with the LR still above this share of its peak: the schedule has not decayed yet
LR_STILL_HIGH = 0.5
#: 90% of the loss reduction reached in under this share of the run: it converged early
CONVERGED_EARLY = 0.5
#: the last validation above its best by more than this share: overfitting
OVERFIT_RISE = 0.03
#: fewer system samples than this and the resource rules stay silent
MIN_SAMPLES = 5

#: the training loss, by the first of these names the run logged (a job view has the last)
LOSS_NAMES = ("loss", "train/loss", "job/loss/mean")
VALIDATION_LOSSES = ("val/loss", "eval/loss", "validation/loss")
SEVERITIES = ("critical", "warning", "info")
_GPU = re.compile(r"^system/gpu(\d+)/(util_percent|memory_used_bytes|memory_total_bytes)$")
_CHILDREN = re.compile(r"^system/process/\d+/children$")
_RSS = re.compile(r"^system/process/\d+/rss_bytes$")
GIB = float(1 << 30)


@dataclass(frozen=True)
class Recommendation:
    """One finding (with the numbers that triggered it) and the action it calls for."""

    rule: str
    severity: str
    title: str
    finding: str
    action: str
    figures: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Evidence:
    """What the rules read: the stored run, its run.json, and the loss curves' analysis."""

    log: RunLog
    info: Mapping[str, Any]
    loss_metric: str | None = None
    rank: int = 0
    loss: Convergence | None = None
    val_metric: str | None = None
    val: Validation | None = None
    found: dict[str, Recommendation] = field(default_factory=dict)

    @classmethod
    def gather(cls, log: RunLog, info: Mapping[str, Any]) -> Evidence:
        """The loss (first of LOSS_NAMES logged) and validation loss of the lowest trainer
        rank that logged the loss (else the job view's own, rank -1), analysed."""
        loss_metric = next((n for n in LOSS_NAMES if n in log.series), None)
        names = [loss_metric] if loss_metric else [n for n in log.series if "/" not in n]
        ranks = {r for n in names for r in log.series[n].ranks}
        trainers = {r for r in ranks if r >= 0}  # a job view's own scalars are rank -1
        rank = min(trainers or ranks or {0})
        evidence = cls(log, info, loss_metric, rank)
        if loss_metric is not None:
            steps, times, values = log.series[loss_metric].arrays(rank)
            evidence.loss = analyse(steps, values, times)
        evidence.val_metric = next((n for n in VALIDATION_LOSSES if n in log.series), None)
        if evidence.val_metric is not None:
            steps, _, values = log.series[evidence.val_metric].arrays(rank)
            evidence.val = validation(steps, values)
        return evidence

    def values(self, name: str, rank: int | None = None) -> np.ndarray:
        """A metric's finite values in arrival order (of one rank when given)."""
        series = self.log.series.get(name)
        if series is None:
            return np.empty(0)
        values = series.arrays(rank)[2]
        finite: np.ndarray = values[np.isfinite(values)]
        return finite

    def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.log.alerts if a.get("name") == name]

    def gpus(self) -> dict[int, dict[str, np.ndarray]]:
        """Per GPU index: its util_percent, memory_used_bytes and memory_total_bytes samples."""
        gpus: dict[int, dict[str, np.ndarray]] = {}
        for name in self.log.series:
            match = _GPU.match(name)
            if match:
                gpus.setdefault(int(match[1]), {})[match[2]] = self.values(name)
        return gpus

    def matching(self, pattern: re.Pattern[str]) -> list[np.ndarray]:
        return [self.values(name) for name in self.log.series if pattern.match(name)]


def recommend(evidence: Evidence) -> list[Recommendation]:
    """Every rule's recommendation for this run, most severe first."""
    for rule in RULES:
        found = rule(evidence)
        if found is not None:
            evidence.found[found.rule] = found
    return sorted(evidence.found.values(), key=lambda r: SEVERITIES.index(r.severity))


def input_bound(e: Evidence) -> Recommendation | None:
    """The trainer waited on its data loader for a large share of each step."""
    steps = e.log.series.get("step_time_seconds")
    waits = e.log.series.get("data_wait_seconds")
    alerts = e.alerts("input_bound")
    worst: tuple[float, int, int] | None = None  # share, rank, steps
    if steps is not None and waits is not None:
        for rank in sorted(set(steps.ranks)):
            step_times = e.values("step_time_seconds", rank)
            total = float(step_times.sum())
            if total <= 0:
                continue
            share = float(e.values("data_wait_seconds", rank).sum()) / total
            if worst is None or share > worst[0]:
                worst = (share, rank, len(step_times))
    if not alerts and (worst is None or worst[0] <= INPUT_WAIT_SHARE):
        return None
    figures: dict[str, Any] = {"threshold": INPUT_WAIT_SHARE, "input_bound_alerts": len(alerts)}
    parts = []
    if worst is not None:
        share, rank, count = worst
        figures.update(data_wait_share=share, rank=rank, steps=count)
        parts.append(
            f"rank {rank} waited for data {share:.0%} of its step time "
            f"(data_wait_seconds over step_time_seconds, summed over {count} steps)"
        )
    if alerts:
        parts.append(f"the input_bound alert fired {len(alerts)} time(s)")
    util = _median_util(e)
    if util is not None:
        figures["gpu_util_median_percent"] = util
        parts.append(f"median GPU utilisation {util:.0f}%")
    workers = [int(v.max()) for v in e.matching(_CHILDREN) if len(v)]
    action = (
        "Feed the model faster: raise the DataLoader's num_workers, set pin_memory=True and "
        "persistent_workers=True, raise prefetch_factor, and pre-tokenise or pre-decode the "
        "data (or cache it on a local disk)."
    )
    if workers:
        figures["trainer_child_processes_max"] = max(workers)
        if max(workers) == 0:
            parts.append("the trainer ran no child processes (num_workers=0?)")
    cpu = e.values("system/cpu_percent")
    if len(cpu) >= MIN_SAMPLES:
        busy = float(np.median(cpu))
        figures["host_cpu_median_percent"] = busy
        if busy > HOST_CPU_BUSY:
            parts.append(f"the host's CPUs were {busy:.0f}% busy")
            action = (
                "The host's CPUs are already saturated, so more loader workers would compete "
                "for them: move decoding and augmentation offline (pre-processed shards), onto "
                "the GPU (e.g. DALI), or onto a host with more cores."
            )
    return Recommendation(
        "input_bound", "warning", "Training is input-bound", "; ".join(parts) + ".", action, figures
    )


def gpu_underused(e: Evidence) -> Recommendation | None:
    """A GPU sat idle for much of the run."""
    low = {}
    room = []
    for index, fields in sorted(e.gpus().items()):
        util = fields.get("util_percent", np.empty(0))
        if len(util) < MIN_SAMPLES:
            continue
        median = float(np.median(util))
        if median < GPU_UTIL_LOW:
            low[index] = median
            used, total = fields.get("memory_used_bytes"), fields.get("memory_total_bytes")
            if used is not None and total is not None and len(used) and len(total):
                room.append(float(used.max()) / float(total.max()))
    if not low:
        return None
    finding = ", ".join(f"GPU {i} median utilisation {u:.0f}%" for i, u in low.items())
    figures: dict[str, Any] = {
        "threshold_percent": GPU_UTIL_LOW,
        "util_median_percent": {str(i): u for i, u in low.items()},
    }
    if "input_bound" in e.found:
        action = (
            "Fix the input pipeline first (the input-bound recommendation): the GPU waits on it."
        )
    else:
        action = (
            "Give the GPU more work per launch: bf16 autocast, torch.compile, fewer host syncs "
            "on the training thread (.item(), .cpu(), printing tensors); profile a few steps "
            "with torch.profiler to see the gaps."
        )
        if room and max(room) < GPU_MEMORY_ROOM:
            figures["memory_peak_share"] = max(room)
            finding += f"; peak memory only {max(room):.0%} of the GPU's"
            action = "Raise the batch size (memory has room). " + action
    return Recommendation(
        "gpu_underused", "warning", "GPU under-used", finding + ".", action, figures
    )


def gpu_memory_near_limit(e: Evidence) -> Recommendation | None:
    """A GPU's memory came close to full: the next larger batch or sequence will not fit."""
    near = {}
    for index, fields in sorted(e.gpus().items()):
        used, total = fields.get("memory_used_bytes"), fields.get("memory_total_bytes")
        if used is None or total is None or not len(used) or not len(total) or total.max() <= 0:
            continue
        share = float(used.max()) / float(total.max())
        if share > MEMORY_NEAR:
            near[index] = (share, float(used.max()), float(total.max()))
    if not near:
        return None
    finding = ", ".join(
        f"GPU {i} peaked at {u / GIB:.1f} of {t / GIB:.1f} GiB ({s:.0%})"
        for i, (s, u, t) in near.items()
    )
    return Recommendation(
        "gpu_memory_near_limit",
        "warning",
        "GPU memory near the limit",
        finding + ".",
        "Leave headroom before scaling up: activation checkpointing, a smaller micro-batch "
        "with gradient accumulation, bf16, or a sharded optimizer (ZeRO/FSDP); "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True reduces fragmentation.",
        {"threshold": MEMORY_NEAR, "peak_share": {str(i): s for i, (s, _, _) in near.items()}},
    )


def host_memory_near_limit(e: Evidence) -> Recommendation | None:
    """The host ran short of memory: the OOM killer is next."""
    used, total = e.values("system/memory_used_bytes"), e.values("system/memory_total_bytes")
    if not len(used) or not len(total) or total.max() <= 0:
        return None
    share = float(used.max()) / float(total.max())
    if share <= MEMORY_NEAR:
        return None
    figures: dict[str, Any] = {
        "threshold": MEMORY_NEAR,
        "peak_share": share,
        "peak_bytes": float(used.max()),
    }
    finding = f"host memory peaked at {used.max() / GIB:.1f} of {total.max() / GIB:.1f} GiB"
    rss = [float(v.max()) for v in e.matching(_RSS) if len(v)]
    if rss:
        figures["trainer_rss_peak_bytes"] = max(rss)
        finding += f" ({share:.0%}); the trainer and its workers held {max(rss) / GIB:.1f} GiB"
    return Recommendation(
        "host_memory_near_limit",
        "warning",
        "Host memory near the limit",
        finding + ".",
        "Fewer or leaner loader workers (numpy arrays instead of Python lists of objects avoid "
        "copy-on-write duplication), a memory-mapped dataset, or a smaller prefetch_factor.",
        figures,
    )


def nonfinite(e: Evidence) -> Recommendation | None:
    loss = e.loss
    if loss is None or not loss.nonfinite:
        return None
    return Recommendation(
        "nonfinite",
        "critical",
        "The loss went NaN/inf",
        f"{loss.nonfinite} {e.loss_metric or 'loss'} value(s) were not finite, the first at step "
        f"{_step(loss.first_nonfinite_step)}.",
        "Restart from the last checkpoint before that step with a lower learning rate or "
        "gradient clipping; prefer bf16 to fp16; torch.autograd.detect_anomaly() on a short "
        "repro names the operation that made the first NaN.",
        {"nonfinite": loss.nonfinite, "first_step": loss.first_nonfinite_step},
    )


def learning_rate_too_high(e: Evidence) -> Recommendation | None:
    """Repeated loss spikes (or a climbing loss) while the gradient norm grows."""
    loss = e.loss
    if loss is None:
        return None
    spikes = max(loss.spikes, len(e.alerts("loss_spike")))
    grad = growth(e.values("grad_norm", e.rank))
    rising = grad is not None and grad >= GRAD_GROWTH
    if not rising or (spikes < LR_SPIKES and loss.state != "rising"):
        return None
    assert grad is not None
    what = f"{spikes} loss spikes" if spikes >= LR_SPIKES else "the loss climbing at the end"
    steps = ", ".join(_step(s) for s in loss.spike_steps[:5])
    return Recommendation(
        "lr_too_high",
        "warning",
        "Learning rate too high",
        f"{what}{f' (steps {steps})' if steps and spikes else ''} while grad_norm grew "
        f"x{grad:.1f} (median of the last quarter over the lowest earlier quarter).",
        "Lower the peak learning rate (halve it), lengthen the warm-up, and clip gradients "
        "(clip_grad_norm_(params, 1.0)); for Adam a larger eps or a lower beta2 damps spikes.",
        {
            "spikes": spikes,
            "spike_steps": loss.spike_steps,
            "grad_norm_growth": grad,
            "spikes_threshold": LR_SPIKES,
            "growth_threshold": GRAD_GROWTH,
        },
    )


def loss_spikes(e: Evidence) -> Recommendation | None:
    """Spikes without a growing gradient norm: bad batches more likely than a bad LR."""
    loss = e.loss
    if loss is None or "lr_too_high" in e.found:
        return None
    alerts = e.alerts("loss_spike")
    spikes = max(loss.spikes, len(alerts))
    if not spikes:
        return None
    steps: list[Any] = list(loss.spike_steps) or [a.get("step") for a in alerts]
    listed = ", ".join(_step(s) for s in steps[:5])
    return Recommendation(
        "loss_spikes",
        "info",
        "Loss spikes that recovered",
        f"{spikes} spike(s) at step(s) {listed}, more than {SPIKE_SIGMAS:g} noise deviations and "
        f"{SPIKE_MIN_JUMP:.0%} above the smoothed curve; the loss came back (the run ends "
        f"{loss.state}).",
        "Look at the batches at those steps (log their ids): a spike that recovers is usually "
        "a bad or unusual batch. If they repeat, lower the peak LR or clip gradients.",
        {"spikes": spikes, "spike_steps": steps},
    )


def loss_rising(e: Evidence) -> Recommendation | None:
    loss = e.loss
    if loss is None or loss.state != "rising" or e.found.keys() & {"lr_too_high", "nonfinite"}:
        return None
    return Recommendation(
        "loss_rising",
        "warning",
        "The loss is climbing at the end",
        f"the median loss of the last 20% of points is {-loss.tail_change:.1%} above the 20% "
        f"before; its smoothed best was {loss.best:.4g} at step {_step(loss.best_step)}.",
        "Resume from the checkpoint nearest the best step with a lower learning rate or a "
        "longer warm-up; check that the LR schedule is the one meant.",
        {"tail_change": loss.tail_change, "best_step": loss.best_step},
    )


def end_of_run(e: Evidence) -> Recommendation | None:
    """Still improving (train longer), a plateau at a high LR (decay it), or converged early."""
    loss = e.loss
    if loss is None or loss.nonfinite or loss.state == "rising":
        return None
    if loss.state == "improving":
        return Recommendation(
            "still_improving",
            "info",
            "Still improving at the end",
            f"the loss fell {loss.tail_change:.1%} over the last 20% of its points "
            f"({loss.per_1k_steps or 0:.3g} per 1k steps over the run).",
            "Train longer, or resume from the last checkpoint: the run stopped while learning.",
            {"tail_change": loss.tail_change, "threshold": IMPROVING_CHANGE},
        )
    lr = e.values("lr", e.rank)
    if len(lr) and lr.max() > 0 and lr[-1] / lr.max() >= LR_STILL_HIGH:
        return Recommendation(
            "plateau",
            "info",
            "Plateau with the learning rate still high",
            f"the loss changed {loss.tail_change:.1%} over the last 20% of its points while "
            f"lr ended at {lr[-1] / lr.max():.0%} of its peak.",
            "Decay the learning rate (cosine or step schedule, or ReduceLROnPlateau): the "
            "run has gone as far as this LR takes it.",
            {"tail_change": loss.tail_change, "lr_end_share": float(lr[-1] / lr.max())},
        )
    share = loss.share_of_run_at_90
    if share is not None and share < CONVERGED_EARLY:
        return Recommendation(
            "converged_early",
            "info",
            "Converged early",
            f"90% of the loss reduction was reached by step {_step(loss.step_at_90)}, "
            f"{share:.0%} of the way through; the loss moved {loss.tail_change:.1%} over the "
            "last 20%.",
            "A shorter schedule (or early stopping) would reach about the same loss for less "
            "compute; or spend it on a larger model or more data.",
            {"share_of_run_at_90": share, "threshold": CONVERGED_EARLY},
        )
    return None


def overfitting(e: Evidence) -> Recommendation | None:
    val, loss = e.val, e.loss
    if val is None or val.evaluations < 3 or val.above_best <= OVERFIT_RISE:
        return None
    if loss is not None and loss.state == "rising":
        return None  # the training loss climbs too: not overfitting
    return Recommendation(
        "overfitting",
        "warning",
        "Validation loss rising from its best",
        f"the median of the last {val.window} validation losses, {val.recent:.4g}, is "
        f"{val.above_best:.1%} above the best stretch's {val.smoothed_best:.4g} (around step "
        f"{_step(val.smoothed_best_step)}); the single best was {val.best:.4g} at step "
        f"{_step(val.best_step)}.",
        "Stop early and keep the checkpoint of the best validation step; add regularisation "
        "(weight decay, dropout, augmentation), more data or a smaller model.",
        {
            "above_best": val.above_best,
            "best_step": val.smoothed_best_step,
            "window": val.window,
            "threshold": OVERFIT_RISE,
        },
    )


def straggler(e: Evidence) -> Recommendation | None:
    """A job view named a rank that holds the others back."""
    job = e.info.get("job")
    ranks = {}
    if isinstance(job, dict):
        for rank in job.get("ranks") or []:
            if isinstance(rank, dict) and rank.get("straggler"):
                ranks[int(rank["rank"])] = rank
        for number in job.get("stragglers") or []:
            ranks.setdefault(int(number), {"rank": int(number)})
    alerts = e.alerts("straggler")
    for alert in alerts:
        if isinstance(alert.get("rank"), int):
            ranks.setdefault(alert["rank"], {"rank": alert["rank"], **(alert.get("attrs") or {})})
    if not ranks:
        return None
    described = []
    for number, rank in sorted(ranks.items()):
        where = f" on {rank['host']}" if rank.get("host") else ""
        score = rank.get("relative_score", rank.get("relative"))
        scored = f", {score:.2f}x the fastest rank's speed" if isinstance(score, float) else ""
        described.append(f"rank {number}{where}{scored}")
    return Recommendation(
        "straggler",
        "warning",
        "A straggler rank",
        "; ".join(described) + f" (straggler alerts: {len(alerts)}); every other rank waits "
        "for it at each all-reduce.",
        "Look at that host: GPU clocks and temperature, CPU contention or a noisy neighbour, "
        "its data loader (data_wait_seconds) and its network links; drain the node if it "
        "stays slow.",
        {"ranks": sorted(ranks), "straggler_alerts": len(alerts)},
    )


def telemetry_gaps(e: Evidence) -> Recommendation | None:
    dropped, lost = int(e.info.get("dropped") or 0), int(e.info.get("lost") or 0)
    if not dropped and not lost:
        return None
    return Recommendation(
        "telemetry_gaps",
        "info",
        "Telemetry has gaps",
        f"{dropped} records were dropped by the probe and {lost} lost on the way; the curves "
        "above miss them.",
        "Log less often or fewer names, or raise OUTRIDER_QUEUE_SIZE; training was not slowed.",
        {"dropped": dropped, "lost": lost},
    )


#: in order: later rules read what earlier ones found
RULES: tuple[Callable[[Evidence], Recommendation | None], ...] = (
    nonfinite,
    input_bound,
    gpu_underused,
    gpu_memory_near_limit,
    host_memory_near_limit,
    learning_rate_too_high,
    loss_spikes,
    loss_rising,
    end_of_run,
    overfitting,
    straggler,
    telemetry_gaps,
)


def _median_util(e: Evidence) -> float | None:
    medians = [
        float(np.median(f["util_percent"]))
        for f in e.gpus().values()
        if len(f.get("util_percent", ())) >= MIN_SAMPLES
    ]
    return max(medians) if medians else None


def _step(step: float | None) -> str:
    return "?" if step is None else f"{step:.0f}"
