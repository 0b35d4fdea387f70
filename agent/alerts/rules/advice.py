"""What to do when an alert fires: the ``advice`` every alert carries, and each kind's default.

A built-in rule's advice is written in ``agent/alerts/defaults.yaml`` beside
its thresholds; a user's rule without ``advice`` gets its kind's default here.
The engine puts it in the alert record (``advice``), the log line and the
webhook payloads, so whoever reads an alert reads what to do about it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

MAX_ADVICE_CHARS: Final = 1000

#: advice for a rule whose spec gives none, by rule kind
DEFAULT_ADVICE: Mapping[str, str] = {
    "threshold": (
        "Look at what drives the metric around the step of the alert; if the bound is "
        "normal for this job, move `above`/`below` or lengthen `for_steps`/`for_seconds`."
    ),
    "rate": (
        "Find what changed between the two samples (a new phase, a restart, a leak "
        "starting); if such jumps are normal here, widen the rule's bounds."
    ),
    "zscore": (
        "One jump that recovers is usually a bad batch: look at the batch at that step. "
        "Repeated jumps mean the run is unstable: lower the learning rate or clip gradients."
    ),
    "nonfinite": (
        "Restart from the last good checkpoint with a lower learning rate or gradient "
        "clipping; torch.autograd.detect_anomaly() on a short repro names the operation "
        "that made the first NaN."
    ),
    "plateau": (
        "Lower the learning rate (ReduceLROnPlateau would now), or stop if the schedule "
        "is already at its floor: the run has converged for this LR range."
    ),
    "overfitting": (
        "Stop early and keep the checkpoint with the best validation loss; add "
        "regularisation (weight decay, dropout, augmentation), more data or a smaller model."
    ),
    "divergence": (
        "Stop the run and restart from a checkpoint before the rise with a lower learning "
        "rate, gradient clipping or a longer warm-up; check the LR schedule is the one meant."
    ),
    "collapse": (
        "Check the loss's anti-collapse terms (centring and temperature, stop-gradient and "
        "predictor, variance term) and lower the learning rate."
    ),
    "trend": (
        "Compare snapshots a few minutes apart (tracemalloc, torch.cuda.memory_snapshot()) "
        "to find what keeps growing."
    ),
    "input_bound": (
        "Feed the GPU faster: more data-loader workers, pin_memory, persistent workers, "
        "prefetching, pre-processed data or a faster disk."
    ),
    "stalled": (
        "py-spy dump --pid on the trainer shows where each thread waits; raise "
        "`after_seconds` if evaluation or checkpointing legitimately takes longer."
    ),
    "run_died": (
        "Read the trainer's stderr and the kernel log (OOM killer); resume from the last "
        "checkpoint."
    ),
    "probe_drops": (
        "Log less often or fewer names, raise the probe's queue size, and check that the "
        "agent keeps up."
    ),
    "event": "Read the message: it comes from the component that raised it.",
    "checkpoint_missing": (
        "Check that the trainer still reaches its save call and that saves pass the agent's "
        "check; if saves are meant to be rarer now, pass the new cadence to checkpoint.save."
    ),
}


def check_advice(text: str) -> str:
    """``text`` stripped; ValueError if it is blank or longer than MAX_ADVICE_CHARS."""
    advice = " ".join(text.split())
    if not advice:
        raise ValueError("advice is blank; leave it out to get the rule kind's default")
    if len(advice) > MAX_ADVICE_CHARS:
        raise ValueError(
            f"advice is {len(advice)} characters; at most {MAX_ADVICE_CHARS} (link to a "
            "runbook for more)"
        )
    return advice
