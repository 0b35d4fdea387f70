"""Agent memory over a long run: its RSS, sampled while a trainer logs at a fast pace.

Why: the agent lives as long as the run, which may be days, and its budget
is a flat RSS of at most 300 MB for the whole tree (docs/performance.md). A
slow leak takes hours to show at a real step rate, so this script compresses
a long run: a small model trains in this process under ``probe.watch``
(scalars and gradient norms every step, per-layer norms every 10 steps,
histograms and activation statistics every 50), with ``probe.features`` of a
hidden state every 100 steps, a text sample every 200 and an event every
1,000, paced at ``--rate`` steps per second (default 100: ten times a 100 ms
step) for ``--minutes``. The agent is a real ``outrider agent`` process with
the default sinks (run store, TensorBoard, Prometheus, offline W&B) and its
statistics on.

Printed: the RSS over time of the agent, its statistics workers, W&B's
service and this trainer; each one's growth over the second half of the run
(a least-squares slope, in MB per 100,000 steps); the run's files on disk
per 1,000 steps; and the trainer stream's accounting (nothing may be lost).

    python bench/bench_agent_memory.py                  # 20 minutes: 120,000 steps
    python bench/bench_agent_memory.py --minutes 3      # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_SINKS_CONFIG,
    agent_tree,
    machine,
    print_table,
    short_ipc_endpoint,
    start_run_agent,
    stop_agent,
    stream_accounting,
)

from agent.alerts.rules import least_squares_slope

PARTS = ("agent", "statistics workers", "W&B service", "trainer")
AGENT_PARTS = PARTS[:3]
TOTAL = "agent total RSS"
PSS = "agent total PSS"
MB = 1024 * 1024


def _part(agent: Any, process: Any) -> str:
    """Which part of the agent a process of its tree is."""
    if process.pid == agent.pid:
        return "agent"
    command = " ".join(process.cmdline())
    return "statistics workers" if "multiprocessing" in command else "W&B service"


class RssTrace:
    """RSS of each part, sampled every ``every`` seconds on a thread of this process."""

    def __init__(self, agent_pid: int, every: float) -> None:
        import psutil

        self.agent = psutil.Process(agent_pid)
        self.trainer = psutil.Process()
        self.every = every
        self.step = 0  # the trainer's step, set by the training loop
        self.samples: list[tuple[float, int, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-trace", daemon=True)
        self._started = time.perf_counter()

    def start(self) -> None:
        self._started = time.perf_counter()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> dict[str, float]:
        """RSS of each part, and the agent's total PSS (its processes share library pages,
        which each one's RSS counts again), in MB."""
        import psutil

        rss = dict.fromkeys((*PARTS, TOTAL, PSS), 0.0)
        for process in agent_tree(self.agent):
            with contextlib.suppress(psutil.Error):
                memory = process.memory_full_info()
                rss[_part(self.agent, process)] += memory.rss / MB
                rss[PSS] += memory.pss / MB
        rss["trainer"] = self.trainer.memory_info().rss / MB
        rss[TOTAL] = sum(rss[part] for part in AGENT_PARTS)
        return rss

    def _run(self) -> None:
        while True:
            self.samples.append((time.perf_counter() - self._started, self.step, self.sample()))
            if self._stop.wait(self.every):
                return


def train(args: argparse.Namespace, trace: RssTrace) -> int:
    """The compressed run: ``args.minutes`` of steps at ``args.rate`` steps/s. Returns steps."""
    import torch
    from torch import nn

    import probe

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    probe.watch(model, opt, hist_every=50, activations_every=50, batch_size=64)
    hidden: list[torch.Tensor] = []
    model[3].register_forward_hook(lambda module, inputs, output: hidden.append(output))
    words = ["loss", "token", "gradient", "layer", "sample", "the", "of", "and", "model"]
    step = 0
    started = time.perf_counter()
    deadline = started + 60 * args.minutes
    while time.perf_counter() < deadline:
        x = torch.randn(64, 64)
        y = torch.randint(10, (64,))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        probe.log({"loss": loss}, step=step)
        probe.features("hidden", hidden.pop(), step=step, every=100)
        if step % 200 == 0:
            probe.text(
                "samples/generation", " ".join(words[(step + i) % 9] for i in range(40)), step
            )
        if step % 1000 == 0:
            probe.event("checkpoint_saved", step=step, path=f"ckpt/{step}.pt")
        step += 1
        trace.step = step
        time.sleep(max(0.0, started + step / args.rate - time.perf_counter()))
    return step


def slope_per_100k_steps(points: list[tuple[int, float]]) -> float:
    """Least-squares MB per 100,000 steps (the alert rules' fit)."""
    slope = least_squares_slope([x for x, _ in points], [y for _, y in points])
    return float("nan") if slope is None else 1e5 * slope


def directory_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / MB


def report(trace: RssTrace, steps: int, seconds: float, run_dir: Path) -> None:
    samples = trace.samples
    print(
        f"\n{steps:,} steps in {seconds:.0f} s ({steps / seconds:.0f} steps/s); at 10 steps/s "
        f"that is {steps / 10 / 3600:.1f} h of training"
    )
    rows = []
    marks = sorted({round(i * (len(samples) - 1) / 10) for i in range(11)})
    for index in marks:
        elapsed, step, rss = samples[index]
        rows.append(
            [
                f"{elapsed / 60:5.1f}",
                f"{step:,}",
                *(f"{rss[part]:.0f}" for part in (*PARTS, TOTAL, PSS)),
            ]
        )
    print(
        f"\nMB over the run ({TOTAL} = agent + statistics workers + W&B service; "
        "PSS counts shared pages once)"
    )
    print_table(["minute", "step", *PARTS, TOTAL, PSS], rows)

    second_half = [s for s in samples if s[0] >= samples[-1][0] / 2]
    rows = []
    for part in (*PARTS, TOTAL, PSS):
        peak = max(rss[part] for _, _, rss in samples)
        start = second_half[0][2][part]
        slope = slope_per_100k_steps([(step, rss[part]) for _, step, rss in second_half])
        rows.append([part, f"{peak:.0f}", f"{start:.0f}", f"{slope:+.1f}"])
    print("\nGrowth over the second half of the run (least squares)")
    print_table(["part", "peak MB", "at half-time MB", "MB per 100k steps"], rows)

    rows = []
    for label, path in (
        ("run store (metrics.jsonl, tensors.bin, run.json)", None),
        ("tensorboard/", run_dir / "tensorboard"),
        ("wandb/", run_dir / "wandb"),
    ):
        if path is None:
            size = sum(f.stat().st_size for f in run_dir.iterdir() if f.is_file()) / MB
        else:
            size = directory_mb(path) if path.exists() else 0.0
        rows.append([label, f"{size:.1f}", f"{1000 * size / max(steps, 1):.2f}"])
    print("\nOn disk")
    print_table(["files", "MB", "MB per 1k steps"], rows)
    print(f"\ntrainer stream accounting: {stream_accounting(run_dir)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="run length (default 20)")
    parser.add_argument("--rate", type=float, default=100.0, help="steps per second (default 100)")
    parser.add_argument(
        "--sample-seconds", type=float, default=5.0, help="RSS sampling period (default 5)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="an agent config file to run instead of the default sinks (e.g. stats off)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.minutes <= 0 or args.rate <= 0 or args.sample_seconds <= 0:
        parser.error("--minutes, --rate and --sample-seconds must be > 0")
    print(f"machine: {machine()}")
    setup = f"config {args.config}" if args.config else "default sinks, statistics on"
    print(f"{args.minutes:g} minutes at {args.rate:g} steps/s, {setup}")
    import probe

    with tempfile.TemporaryDirectory(prefix="bam-", dir="/tmp") as tmp_name:
        tmp = Path(tmp_name)
        workdir = tmp / "work"
        workdir.mkdir()
        endpoint = short_ipc_endpoint(tmp)
        agent = start_run_agent(
            endpoint,
            workdir / "runs",
            "memory",
            workdir,
            sinks=True,
            cpus=None,
            config_text=args.config.read_text() if args.config else DEFAULT_SINKS_CONFIG,
        )
        try:
            probe.init(endpoint=endpoint, run_id="memory")
            trace = RssTrace(agent.pid, args.sample_seconds)
            trace.start()
            started = time.perf_counter()
            try:
                steps = train(args, trace)
                seconds = time.perf_counter() - started
                print(f"probe counters: {probe.stats()}")
                probe.finish()
            finally:
                trace.stop()
        finally:
            stop_agent(agent)
        report(trace, steps, seconds, workdir / "runs" / "memory")


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    main()
