"""The tables bench_overhead prints once every run is done.

Wall clock first (what a user sees, too noisy here to resolve 1%), then the
direct cost measured inside the trainer (the figure this machine resolves),
the agent's CPU by part, the trainer's kernel counters, and the run details
that say whether the figures are trustworthy (records lost, final losses,
which periodic work fell in the timed window).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

from _common import percentile, print_table

from overhead.runner import Run
from overhead.variants import BUDGETS, baseline_of

Runs = dict[str, list[Run]]

KERNEL_COLUMNS = (  # (header, key in kernel_counts, scale, format)
    ("training thread page faults", "thread_faults", 1, ".0f"),
    ("process page faults", "process_faults", 1, ".0f"),
    ("training thread system ms", "thread_system_s", 1000, ".2f"),
    ("voluntary switches", "thread_voluntary_switches", 1, ".1f"),
    ("involuntary switches", "thread_involuntary_switches", 1, ".1f"),
)


def pct(x: float) -> str:
    return f"{x:+.1f}%"


def ms_per_step(runs: Sequence[Run], key: str) -> float:
    """Median over repeats of a per-run CPU figure, per timed step, in ms."""
    return 1000 * float(statistics.median(r.result[key] / len(r.step_times) for r in runs))


def median_step(runs: Sequence[Run]) -> float:
    """The p50 of every timed step of ``runs``, pooled, in seconds."""
    return percentile(sorted(t for r in runs for t in r.step_times), 50)


def report(variants: Sequence[str], runs: Runs, args: argparse.Namespace) -> None:
    report_wall_clock(variants, runs, args)
    report_direct_cost(variants, runs)
    report_agent_tree(variants, runs)
    report_agent_parts(variants, runs)
    report_trainer_kernel(variants, runs)
    report_details(variants, runs, args)


def report_wall_clock(variants: Sequence[str], runs: Runs, args: argparse.Namespace) -> None:
    """Loop and step times; each monitored run against its own repeat's baseline."""
    print()
    print(
        f"Wall clock: steps {args.start}-{args.start + args.steps - 1} timed, after "
        f"{args.warmup} warm-up steps; {args.repeats} interleaved repeats per variant."
    )
    rows: list[list[str]] = []
    for variant in variants:
        vruns = runs[variant]
        base_runs = runs[baseline_of(variant)]
        loops = [r.loop_s for r in vruns]
        steps = sorted(t for r in vruns for t in r.step_times)
        step_p50 = percentile(steps, 50)
        if variant.startswith("base:"):
            slow, slow_step = "-", "-"
        else:
            paired = [r.loop_s / b.loop_s - 1 for r, b in zip(vruns, base_runs, strict=True)]
            slow = (
                f"{pct(100 * statistics.median(paired))} "
                f"({pct(100 * min(paired))}..{pct(100 * max(paired))})"
            )
            slow_step = pct(100 * (step_p50 / median_step(base_runs) - 1))
        rows.append(
            [
                variant,
                f"{statistics.median(loops):.2f}",
                f"{min(loops):.2f}-{max(loops):.2f}",
                f"{1000 * step_p50:.1f}",
                f"{1000 * percentile(steps, 90):.1f}",
                f"{1000 * steps[-1]:.0f}",
                slow,
                slow_step,
                BUDGETS.get(variant, "-"),
            ]
        )
    print_table(
        [
            "variant",
            "loop s (median)",
            "min-max",
            "step ms p50",
            "p90",
            "max",
            "slowdown: loop, median (min..max)",
            "slowdown: p50 step",
            "budget",
        ],
        rows,
    )


def report_direct_cost(variants: Sequence[str], runs: Runs) -> None:
    """CPU the telemetry took from the trainer's cores, as a share of the baseline's step."""
    print()
    print("Direct cost, measured inside the trainer (independent of run-to-run noise):")
    rows = []
    for variant in variants:
        vruns = runs[variant]
        base_runs = runs[baseline_of(variant)]
        tele = sorted(t for r in vruns for t in r.result["telemetry_times"])
        tele_ms = 1000 * statistics.fmean(tele)
        other_ms = ms_per_step(vruns, "other_threads_cpu_s")
        extra_ms = other_ms - ms_per_step(base_runs, "other_threads_cpu_s")
        helpers_ms = ms_per_step(vruns, "helpers_loop_cpu_s")
        agent_ms = ms_per_step(vruns, "agent_loop_cpu_s")
        shared = variant.endswith(":shared")
        # Separate cores: what the trainer's own core lost (the agent and W&B's service have
        # the other core). Shared cores: all CPU the telemetry took from the trainer's cores,
        # the agent's included (torch's own threads swamp a comparison of thread totals).
        cost_ms = tele_ms + (helpers_ms + agent_ms if shared else extra_ms)
        direct = (
            "-"
            if variant.startswith("base:")
            else pct(100 * cost_ms / (1000 * median_step(base_runs)))
        )
        rows.append(
            [
                variant,
                f"{tele_ms:.2f}",
                f"{1000 * percentile(tele, 50):.2f}",
                f"{1000 * tele[-1]:.1f}",
                f"{helpers_ms:.2f}",
                f"{agent_ms:.2f}",
                "n/a" if shared else f"{extra_ms:+.2f}",
                direct,
            ]
        )
    print_table(
        [
            "variant",
            "training thread in telemetry, ms/step: mean",
            "p50",
            "max",
            "telemetry threads + child processes, CPU ms/step",
            "agent CPU ms/step",
            "other trainer threads vs baseline, CPU ms/step",
            "direct cost / base p50 step",
        ],
        rows,
    )
    print(
        "training thread in telemetry: the telemetry calls after each step, the hidden-state "
        "hook, the optimizer hooks and the activation hooks (probe.watch), timed on the "
        "training thread. Telemetry "
        "threads: the trainer's threads started after torch's (the probe's sender and "
        "ZeroMQ's, TensorBoard's writer, W&B's), with its child processes (W&B's service); "
        "0 for the baseline unless torch started threads late. Agent CPU: the agent's and "
        "its children's (statistics workers, W&B's service) during the timed loop. Direct "
        "cost, separate cores: training thread + the other trainer threads' extra CPU on "
        "the trainer's core. Shared cores: training thread + telemetry threads + agent, all "
        "CPU taken from the cores torch runs on; the wall clock adds what preemption and "
        "cache effects cost on top."
    )


def report_agent_tree(variants: Sequence[str], runs: Runs) -> None:
    """The agent tree's CPU per trainer step (agent, statistics workers, W&B's service), run
    store only against the default sinks (and against them with W&B written live, when that
    was run), side by side per placement: what the sinks add."""

    def per_step(arm: str) -> tuple[float, float, float]:
        figures = [1000 * r.result["agent_loop_cpu_s"] / len(r.step_times) for r in runs[arm]]
        return statistics.median(figures), min(figures), max(figures)

    rows = []
    for placement in ("sep", "shared"):
        if f"outrider:{placement}" not in variants:
            continue
        none, none_lo, none_hi = per_step(f"outrider:{placement}")
        base = 1000 * median_step(runs[f"base:{placement}"])
        for kind in ("outrider+sinks", "outrider+sinks-live"):
            if f"{kind}:{placement}" not in variants:
                continue
            sinks, sinks_lo, sinks_hi = per_step(f"{kind}:{placement}")
            rows.append(
                [
                    placement,
                    kind,
                    f"{none:.2f} ({none_lo:.2f}-{none_hi:.2f})",
                    f"{sinks:.2f} ({sinks_lo:.2f}-{sinks_hi:.2f})",
                    f"{sinks - none:+.2f}",
                    f"{sinks / none:.2f}x" if none > 0 else "-",
                    f"{100 * (sinks - none) / base:+.2f}%",
                ]
            )
    if not rows:
        return
    print()
    print(
        "Agent tree CPU per trainer step, ms (median of the repeats, min-max), sinks none "
        "against the default sinks:"
    )
    print_table(
        [
            "placement",
            "variant",
            "sinks none",
            "with sinks",
            "the sinks add",
            "ratio",
            "added / base p50 step",
        ],
        rows,
    )


def report_agent_parts(variants: Sequence[str], runs: Runs) -> None:
    """The agent's CPU per step by part (thread or child process), where it was measured."""
    with_parts = [v for v in variants if any(r.result.get("agent_parts_cpu_s") for r in runs[v])]
    if not with_parts:
        return

    def per_step(variant: str, part: str) -> float:
        vruns = runs[variant]
        return 1000 * float(
            statistics.median(
                r.result["agent_parts_cpu_s"].get(part, 0.0) / len(r.step_times) for r in vruns
            )
        )

    totals: dict[str, float] = {}
    for variant in with_parts:
        for r in runs[variant]:
            for part, seconds in r.result["agent_parts_cpu_s"].items():
                totals[part] = totals.get(part, 0.0) + seconds
    named = sorted((p for p in totals if totals[p] > 0), key=lambda p: -totals[p])[:9]
    rows = []
    for variant in with_parts:
        cells = [per_step(variant, part) for part in named]
        rest = sum(per_step(variant, part) for part in totals if part not in named)
        rows.append([variant, *(f"{c:.2f}" for c in cells), f"{rest:.2f}"])
    print()
    print("Agent CPU by part, ms/step (median of the repeats; threads by their OS names):")
    print_table(["variant", *named, "other"], rows)


def report_trainer_kernel(variants: Sequence[str], runs: Runs) -> None:
    """What the trainer pays in the kernel, per timed step: costs no telemetry-code timer
    sees (page faults inside torch's ops, the training thread switched out)."""
    rows = []
    for variant in variants:
        vruns = [r for r in runs[variant] if "kernel" in r.result]
        if not vruns:
            continue
        cells = []
        for _, key, scale, fmt in KERNEL_COLUMNS:
            mean = statistics.mean(r.result["kernel"][key] / len(r.step_times) for r in vruns)
            cells.append(f"{scale * mean:{fmt}}")
        rows.append([variant, *cells])
    if rows:
        print("\nTrainer in the kernel, per timed step (mean over repeats):")
        print_table(["variant", *(header for header, *_ in KERNEL_COLUMNS)], rows)


def records_line(vruns: Sequence[Run]) -> str:
    """Stored, dropped and lost records over every repeat, from the agent's run.json."""
    accounting = [r.agent["accounting"] for r in vruns]
    sent = sum(a.get("sent") or 0 for a in accounting)
    received = sum(a.get("received") or 0 for a in accounting)
    lost = sum(a.get("lost") or 0 for a in accounting)
    dropped = sum(sum((a.get("dropped") or {}).values()) for a in accounting)
    return f"{received}/{sent} stored, {dropped} dropped, {lost} lost"


def report_details(variants: Sequence[str], runs: Runs, args: argparse.Namespace) -> None:
    """What makes the figures trustworthy: nothing lost, training unchanged, and which
    periodic work the timed window held."""
    print()
    detail: list[list[str]] = []
    for variant in variants:
        vruns = runs[variant]
        first = vruns[0].result
        events = ", ".join(f"{k} at {v}" for k, v in first["events"].items() if v) or "none"
        accounting = queue = window = "-"
        if vruns[0].agent:
            accounting = records_line(vruns)
            queue = str(max(r.result.get("queue_at_loop_end") or 0 for r in vruns))
            windows = {r.result.get("flush_window_at_loop_end") for r in vruns}
            window = "/".join(f"{w:g}" if w is not None else "?" for w in sorted(windows, key=str))
        losses = {f"{r.result['final_loss']:.4f}" for r in vruns}
        detail.append(
            [
                variant,
                f"{first['threads']}",
                ",".join(map(str, first["affinity"])),
                queue,
                window,
                accounting,
                "/".join(sorted(losses)),
                events,
            ]
        )
    print_table(
        [
            "variant",
            "torch threads",
            "trainer CPUs",
            "queued at loop end",
            "probe's window s",
            "records (all repeats)",
            "final loss",
            "periodic events in the timed steps",
        ],
        detail,
    )
    print(
        "final loss: identical across a placement's variants when monitoring leaves "
        "training untouched"
    )
    notes = sorted({n for v in variants for r in runs[v] for n in r.result["notes"]})
    for note in notes:
        print(f"note: {note}")
    print(
        f"note: histograms and activation stats every {args.hist_every} steps, features / "
        f"effective rank every {args.rank_every}, text samples every {args.text_every}; only "
        "the periodic work inside the timed steps (last column) is in the figures, at the "
        "rate it has there. The p50-step slowdown is the every-step cost alone."
    )
