"""The variants bench_overhead compares: a telemetry kind on a placement.

Each monitored variant is compared with the baseline of its placement, so a
chosen variant brings its baseline along.
"""

from __future__ import annotations

KINDS = (
    "base",
    "outrider-log",
    "outrider",
    "outrider+sinks",
    "outrider+sinks-live",
    "wandb",
    "tensorboard",
)
PLACEMENTS = ("sep", "shared")
ALL_VARIANTS = tuple(f"{kind}:{place}" for place in PLACEMENTS for kind in KINDS)
#: outrider+sinks-live (W&B's offline run written as the run goes) only when asked for
DEFAULT_VARIANTS = tuple(
    v for v in ALL_VARIANTS if v != "outrider-log:shared" and "sinks-live" not in v
)
#: a core to spare, or sharing the trainer's cores (docs/performance.md, the budget)
BUDGETS = {
    "outrider:sep": "<= 1%",
    "outrider:shared": "<= 3%",
    "outrider+sinks:sep": "<= 1%",
    "outrider+sinks:shared": "<= 3%",
}


def baseline_of(variant: str) -> str:
    """The unmonitored run the variant is paired with: same placement, same repeat."""
    return f"base:{variant.split(':')[1]}"


def expand_variants(spec: str) -> list[str]:
    """Names, or a placement ('sep', 'shared') / kind ('wandb') for all matching ones;
    the baseline of every placement used is added."""
    chosen: list[str] = []
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        matches = [v for v in ALL_VARIANTS if item in (v, *v.split(":"))]
        if not matches:
            raise SystemExit(f"unknown variant {item!r}; known: {', '.join(ALL_VARIANTS)}")
        chosen += [m for m in matches if m not in chosen]
    for placement in PLACEMENTS:
        base = f"base:{placement}"
        if any(v.endswith(f":{placement}") for v in chosen) and base not in chosen:
            chosen.insert(0, base)
    return [v for v in ALL_VARIANTS if v in chosen]  # baselines first in each group
