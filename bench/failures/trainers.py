"""One training run of the failure suite, instrumented as README.md's "Using it" says.

``probe.init()``, ``probe.watch(model, optimizer)``, the train ``loss`` every
step, ``val/loss`` on a held-out set every 50 steps, ``probe.features`` of a
hidden layer every 50 steps. The failure (``--failure``) is injected at
``--onset``, and the probe records that as an event, ``failure_injected``,
at that step. ``--step-seconds`` paces the steps to a floor, so that the
rules that look at time (stalls, memory trends) see a run of real length.

    python -P -m bench.failures.trainers --family mlp --optimizer sgd --failure nan --onset 200
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import probe
from bench.failures.families import FAMILIES
from bench.failures.injections import INJECTIONS

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine", "warmup-cosine")
VAL_EVERY = 50
FEATURES_EVERY = 50


def lr_at(schedule: str, step: int, steps: int, peak: float) -> float:
    """Constant; cosine from the peak to a tenth of it; or 5% linear warm-up, then cosine."""
    warmup = max(1, steps // 20) if schedule == "warmup-cosine" else 0
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="One failure-suite training run under an agent.")
    p.add_argument("--family", choices=sorted(FAMILIES), required=True)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--schedule", choices=SCHEDULES, default="constant")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--clip", type=float, default=0.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--width", type=int, default=None, help="the MLP's hidden width")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--failure", choices=sorted(INJECTIONS), default="none")
    p.add_argument("--onset", type=int, default=0)
    p.add_argument("--stall-seconds", type=float, default=30.0)
    p.add_argument("--step-seconds", type=float, default=0.0, help="pace steps to this floor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print the val loss as it goes")
    return p.parse_args(argv)


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # several runs and their agents share the machine's cores
    gen = torch.Generator().manual_seed(args.seed)
    build = FAMILIES[args.family]
    family = build(gen, args.width) if args.width else build(gen)  # type: ignore[call-arg]
    optimizer = make_optimizer(args.optimizer, family.model, args.lr)
    injection = INJECTIONS[args.failure](args.onset)
    if args.failure == "stall":
        injection.seconds = args.stall_seconds  # type: ignore[attr-defined]

    probe.init()
    probe.config(vars(args))
    probe.watch(family.model, optimizer)
    started = time.perf_counter()
    for step in range(args.steps):
        if injection.active(step) and step == args.onset:
            probe.event("failure_injected", step=step, failure=args.failure)
            probe.flush(2.0)  # the onset is stored even if the failure kills the process
            injection.start(family, optimizer)
        lr = lr_at(args.schedule, step, args.steps, args.lr) * injection.lr_factor(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if step % VAL_EVERY == 0:
            val_loss = family.val_loss()
            probe.log({"val/loss": val_loss}, step=step)
            if args.verbose:
                print(f"step {step:5d} | lr {lr:.3g} | val loss {val_loss.item():.4f}", flush=True)
        batch = injection.batch(step, family.batch(gen), family, gen)
        loss = family.loss(batch, gen)
        optimizer.zero_grad(set_to_none=True)
        injection.loss(step, loss).backward()  # type: ignore[no-untyped-call]
        if args.clip > 0:
            nn.utils.clip_grad_norm_(family.model.parameters(), args.clip)
        optimizer.step()
        probe.log({"loss": loss.detach()}, step=step)
        if family.hidden:
            hidden = family.hidden[-1]
            rows = hidden.reshape(-1, hidden.shape[-1])  # the LSTM's: one row per position
            probe.features("hidden", rows, step=step, every=FEATURES_EVERY)
        injection.after_step(step, loss)
        time.sleep(max(0.0, started + (step + 1) * args.step_seconds - time.perf_counter()))
    probe.event("training_done", step=args.steps - 1)
    probe.finish()


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
