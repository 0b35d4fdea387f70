"""The agent's own CPU: idle, and at a trainer's pace of one small message per step.

An agent sits beside the trainer for the whole run, so what it costs when
little happens matters as much as its ingest rate: on a machine the trainer
keeps busy, every CPU-millisecond the agent takes, and every wake-up, comes
out of the trainer's steps (docs/performance.md). Each round starts a fresh
agent (as ``outrider run`` does) per configuration, lets it settle, then
measures its CPU, and its children's (statistics workers, W&B's service),
over two phases: idle (no trainer), and paced (a probe in this process logs
five scalars, or ``--scalars``, ``--rate`` times a second, each flushed by the
probe's sender as one message, as a trainer's step does). Configurations
alternate within each round. ``--compare DIR`` adds the same configurations
run from another source tree (e.g. a ``git worktree`` of an older commit),
side by side.

Figures are printed, never asserted: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import (
    agent_cpu,
    load_average,
    machine,
    print_table,
    short_ipc_endpoint,
    start_run_agent,
    stop_agent,
)


def measure(
    pid: int, seconds: float, rate: float, step0: int, scalars: int
) -> tuple[float, float, int]:
    """Agent and children CPU in ms per second over ``seconds``; ``rate`` messages/s (0: idle)
    of ``scalars`` values each."""
    import probe

    extra = {f"layer/{i}": float(i) for i in range(max(0, scalars - 5))}

    own0, kids0 = agent_cpu(pid)
    started = time.perf_counter()
    sent = 0
    while (elapsed := time.perf_counter() - started) < seconds:
        if rate:
            sent += 1
            probe.log(
                {"loss": 1.0 / sent, "lr": 1e-3, "a": 1.0, "b": 2.0, "c": 3.0, **extra},
                step=step0 + sent,
            )
            time.sleep(max(0.0, sent / rate - (time.perf_counter() - started)))
        else:
            time.sleep(min(0.5, seconds - elapsed))
    elapsed = time.perf_counter() - started
    own1, kids1 = agent_cpu(pid)
    return 1e3 * (own1 - own0) / elapsed, 1e3 * (kids1 - kids0) / elapsed, sent


def one_agent(
    label: str, sinks: bool, tree: Path | None, args: argparse.Namespace, tmp: Path
) -> dict[str, tuple[float, float, int]]:
    import probe

    workdir = Path(tempfile.mkdtemp(prefix="w-", dir=tmp))
    endpoint = short_ipc_endpoint(tmp)
    saved = os.environ.get("PYTHONPATH")
    if tree is not None:
        os.environ["PYTHONPATH"] = str(tree)  # the agent imports from the other tree
    try:
        agent = start_run_agent(endpoint, workdir / "runs", "idle", workdir, sinks=sinks, cpus=None)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    try:
        probe.init(endpoint=endpoint, run_id="idle")
        probe.log({"warm": 1.0}, step=0)
        probe.flush()
        time.sleep(args.settle)
        figures = {
            "idle": measure(agent.pid, args.seconds, 0.0, 0, args.scalars),
            "paced": measure(agent.pid, args.seconds, args.rate, 1, args.scalars),
        }
        probe.finish()
    finally:
        stop_agent(agent)
    print(
        f"  {label:28s} idle {figures['idle'][0]:6.1f} + {figures['idle'][1]:5.1f} ms/s   "
        f"paced {figures['paced'][0]:6.1f} + {figures['paced'][1]:5.1f} ms/s",
        flush=True,
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase (default 20)")
    parser.add_argument(
        "--rate",
        type=float,
        default=10.0,
        help="messages per second in the paced phase (default 10: a 100 ms step)",
    )
    parser.add_argument(
        "--scalars",
        type=int,
        default=5,
        help="values per message (default 5; probe.watch's per-layer norms make a few "
        "hundred on the steps it logs them)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds after start-up before measuring (default 5)",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="another source tree (e.g. a git worktree of an older commit) "
        "whose agent runs side by side",
    )
    parser.add_argument(
        "--no-sinks-only", action="store_true", help="only the agent with --sinks none"
    )
    args = parser.parse_args()
    os.environ.setdefault("WANDB_SILENT", "true")
    configs: list[tuple[str, bool, Path | None]] = [("this tree, sinks none", False, None)]
    if not args.no_sinks_only:
        configs.append(("this tree, default sinks", True, None))
    if args.compare is not None:
        configs += [
            (label.replace("this tree", "--compare"), sinks, args.compare.resolve())
            for label, sinks, _ in list(configs)
        ]
    print(f"machine: {machine()}; load average {load_average():.2f}")
    print(
        f"{args.rounds} rounds x {len(configs)} agents; {args.seconds:.0f} s idle, then "
        f"{args.seconds:.0f} s at {args.rate:g} messages/s of {max(5, args.scalars)} values"
    )
    results: dict[str, list[dict[str, tuple[float, float, int]]]] = {c[0]: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="bai-") as tmp:
        for round_ in range(args.rounds):
            order = configs if round_ % 2 == 0 else configs[::-1]
            print(f"round {round_ + 1}/{args.rounds}")
            for label, sinks, tree in order:
                results[label].append(one_agent(label, sinks, tree, args, Path(tmp)))
    rows = []
    for label, runs in results.items():
        # Median over the rounds of (agent, children) CPU, per phase.
        idle_own, idle_kids, paced_own, paced_kids = (
            statistics.median(run[phase][i] for run in runs)
            for phase, i in (("idle", 0), ("idle", 1), ("paced", 0), ("paced", 1))
        )
        idle, paced = idle_own + idle_kids, paced_own + paced_kids
        per_message = (paced - idle) / args.rate
        rows.append(
            [
                label,
                f"{idle_own:.1f}",
                f"{idle_kids:.1f}",
                f"{idle:.1f}",
                f"{paced_own:.1f}",
                f"{paced_kids:.1f}",
                f"{paced:.1f}",
                f"{per_message:.2f}",
            ]
        )
    print()
    print_table(
        [
            "agent",
            "idle: agent ms/s",
            "children",
            "total",
            "paced: agent ms/s",
            "children",
            "total",
            "ms per message (paced - idle)",
        ],
        rows,
    )
    print(
        f"\nmedians over {args.rounds} rounds; load average {load_average():.2f}. "
        "ms/s: milliseconds of CPU per second of wall clock (10 ms/s = 1% of one core)."
    )


if __name__ == "__main__":
    main()
