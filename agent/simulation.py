"""A synthetic training run, healthy or broken on purpose, logged through the real probe.

``outrider simulate`` runs this module as its trainer, so the records take the
path a real run's take (probe, socket, agent, run store, statistics, alerts,
sinks) without torch, a model or a GPU. The curves are what a language model's
run looks like: a noisy loss decaying to a floor, a warm-up then cosine
learning rate, the gradient norm, step time and throughput, ``val/loss`` and a
64-d feature batch every 50 steps. One failure is injected at ``--at``.

    python -P -m agent.simulation --failure spike --steps 2000 --at 1000

With ``--ranks`` above 1 it is one node of a data-parallel job: it starts
``--local-ranks`` processes of itself as global ranks ``--first-rank`` on (each
with torchrun's RANK, LOCAL_RANK, WORLD_SIZE), which also log the step's
sections as DDP shapes them: ``compute_seconds``, and ``backward_seconds``
holding the wait for the slowest rank in the all-reduce, so every rank's step
takes as long as the slowest one's. The ``straggler`` failure makes
``--slow-rank``'s compute twice as slow from ``--at``.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

import numpy as np

import probe
from agent.failures import FAILURES

EVAL_EVERY = 50
FEATURES_EVERY = 50
FEATURE_DIM = 64
FEATURE_ROWS = 256
TOKENS_PER_STEP = 8 * 1024
PEAK_LR = 3e-4
NOISE = 0.05  # sigma of the log-normal noise on the loss, clipped to 3 sigma
COMPUTE_SHARE = 0.6  # of a healthy step, the compute section; the rest waits in the all-reduce
#: the straggler's compute time over its healthy one: a relative score of about 0.5, well
#: under the aggregator's 0.75 (a GPU throttled to half its clocks)
STRAGGLER_SLOWDOWN = 2.0


class Curves:
    """The run's noiseless shapes and their noise, step by step (one seeded generator)."""

    def __init__(self, steps: int, seed: int) -> None:
        self.steps = steps
        self.rng = np.random.default_rng(seed)
        self.tau = max(20.0, steps / 8)  # the loss is near its floor by a third of the run
        self.warmup = max(1, steps // 20)
        self.offset = 4.0 * _unit(self.rng.normal(size=FEATURE_DIM))
        self.scales = self.rng.uniform(0.5, 1.5, size=FEATURE_DIM)
        self.direction = _unit(self.rng.normal(size=FEATURE_DIM))

    def noise(self, sigma: float) -> float:
        return math.exp(sigma * float(np.clip(self.rng.normal(), -3.0, 3.0)))

    def loss(self, step: int) -> float:
        return 1.6 + 3.0 * math.exp(-step / self.tau)

    def lr(self, step: int) -> float:
        """Linear warm-up over 5% of the run, then cosine to a tenth of the peak."""
        if step < self.warmup:
            return PEAK_LR * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return PEAK_LR * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))

    def grad_norm(self, step: int) -> float:
        return 0.8 + 2.0 * math.exp(-step / self.tau)

    def features(self, collapsed: float) -> np.ndarray:
        """Rows with a shared offset and per-dimension spread; ``collapsed`` in [0, 1] pulls
        every row onto one direction (only its length still varies)."""
        spread = self.rng.normal(size=(FEATURE_ROWS, FEATURE_DIM)) * self.scales
        healthy = self.offset + spread
        lengths = self.rng.uniform(6.0, 10.0, size=(FEATURE_ROWS, 1))
        keep = max(1.0 - collapsed, 0.01)
        rows: np.ndarray = keep * healthy + (1.0 - keep) * lengths * self.direction
        return rows.astype(np.float32)


def _unit(vector: np.ndarray) -> np.ndarray:
    unit: np.ndarray = vector / np.linalg.norm(vector)
    return unit


def simulate(
    failure: str,
    steps: int,
    steps_per_second: float,
    at: int,
    seed: int,
    stall_seconds: float,
    rank: int = 0,
    world_size: int = 1,
    slow_rank: int | None = None,
) -> None:
    """Log ``steps`` steps paced at ``steps_per_second``, ``failure`` injected at step ``at``;
    as ``rank`` of ``world_size``, also the sections of a DDP step."""
    curves = Curves(steps, seed + rank)
    step_seconds = 1.0 / steps_per_second
    probe.init()
    probe.config({"simulated": True, "failure": failure, "at": at, "steps": steps, "seed": seed})
    slow = failure == "straggler" and rank == slow_rank
    started = time.perf_counter()
    for step in range(steps):
        broken = failure != "healthy" and step >= at
        if broken and step == at and (failure != "straggler" or slow):
            probe.event("failure_injected", step=step, failure=failure)
            if failure == "stall":
                probe.flush(2.0)
                time.sleep(stall_seconds)
                started += stall_seconds
        shape = curves.loss(step)
        lr = curves.lr(step)
        grad_norm = curves.grad_norm(step) * curves.noise(0.1)
        if broken and failure == "divergence":
            climb = 1.02 ** (step - at)
            shape, lr, grad_norm = curves.loss(at) * climb, curves.lr(at) * climb, grad_norm * climb
        loss = shape * curves.noise(NOISE)
        val = 1.05 * shape * curves.noise(0.01)  # averaged over many batches: little noise
        if broken and failure == "nan":
            loss = grad_norm = val = math.nan
        elif failure == "spike" and step == at:
            loss *= 20.0
        step_time = step_seconds * curves.noise(0.05)
        sections: dict[str, float] = {}
        if world_size > 1:
            compute = COMPUTE_SHARE * step_seconds * curves.noise(0.03)
            if slow and broken:
                compute *= STRAGGLER_SLOWDOWN
            if failure == "straggler" and broken:  # every rank waits for the straggler
                step_time *= 1.0 + COMPUTE_SHARE * (STRAGGLER_SLOWDOWN - 1.0)
            sections = {"compute_seconds": compute, "backward_seconds": step_time - compute}
        probe.log(
            {
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "step_time_seconds": step_time,
                "tokens_per_second": TOKENS_PER_STEP / step_time,
                **sections,
            },
            step=step,
        )
        if step % EVAL_EVERY == EVAL_EVERY - 1:
            probe.log({"val/loss": val}, step=step)
        if step % FEATURES_EVERY == 0 and rank == 0:
            collapsed = 0.0
            if broken and failure == "collapse":
                collapsed = 1.0 - math.exp(-(step - at + 1) / 15)
            probe.features("hidden", curves.features(collapsed), step=step, every=FEATURES_EVERY)
        time.sleep(max(0.0, started + (step + 1) * step_seconds - time.perf_counter()))
    probe.event("training_done", step=steps - 1)
    probe.finish()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A synthetic training run through the probe.")
    parser.add_argument("--failure", choices=list(FAILURES), default="healthy")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--steps-per-second", type=float, default=20.0)
    parser.add_argument("--at", type=int, default=None, help="failure step (default: half-way)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stall-seconds", type=float, default=310.0)
    parser.add_argument("--ranks", type=int, default=1, help="the job's world size")
    parser.add_argument("--first-rank", type=int, default=0, help="this node's first rank")
    parser.add_argument("--local-ranks", type=int, default=1, help="ranks on this node")
    parser.add_argument("--slow-rank", type=int, default=None, help="the straggler's rank")
    parser.add_argument("--rank-process", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_node(args: argparse.Namespace, argv: list[str]) -> int:
    """This node's ranks as processes of their own, as torchrun starts them; the worst exit
    status of theirs. The signals this process gets are passed on to them."""
    children: list[subprocess.Popen[bytes]] = []
    for local in range(args.local_ranks):
        env = dict(
            os.environ,
            RANK=str(args.first_rank + local),
            LOCAL_RANK=str(local),
            WORLD_SIZE=str(args.ranks),
            LOCAL_WORLD_SIZE=str(args.local_ranks),
        )
        command = [sys.executable, "-P", "-m", "agent.simulation", *argv, "--rank-process"]
        children.append(subprocess.Popen(command, env=env))

    from agent.cli.launcher import exit_code, wait_forwarding

    return max(exit_code(status) for status in wait_forwarding(children))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.ranks > 1 and not args.rank_process:
        sys.exit(run_node(args, argv))
    at = args.steps // 2 if args.at is None else args.at
    rank = int(os.environ.get("RANK", "0")) if args.rank_process else 0
    simulate(
        args.failure,
        args.steps,
        args.steps_per_second,
        at,
        args.seed,
        args.stall_seconds,
        rank=rank,
        world_size=args.ranks,
        slow_rank=args.slow_rank,
    )


if __name__ == "__main__":
    main()
