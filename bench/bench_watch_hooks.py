"""Training-thread cost of probe.watch's optimizer hooks on the demo model, per step.

Why: the hooks (gradient norms before clipping, lr, step time; per-layer norms
every ``--layer-every`` steps) run inside ``optimizer.step()`` on the training
thread. This times ``clip_grad_norm_`` + ``optimizer.step()`` (+ one
``probe.log``) with and without a watcher, in interleaved rounds, on one torch
thread. No agent is needed: without one the records are counted as dropped,
which costs the training thread the same. Histograms and activations are off:
they have their own steps (docs/watch.md).

The section timer (``forward_seconds``, ``backward_seconds``) adds two hooks to
every forward of the model and a gradient hook to one output per step. Its cost
is printed twice, as training-thread CPU time: per forward of a tiny module
(``nn.Linear(8, 8)``, so the hooks are not lost in the model's own time), and per
whole demo-model step (forward, backward, clip, step), each with the timer's
hooks removed and in place, interleaved round by round.

Last, the training-thread CPU time inside probe.watch's hooks per demo step,
with ``hist_every`` and ``activations_every`` at 0 and at 1: what a histogram
and activation step adds (each parameter's and gradient's sample, every leaf
module's output statistics and sample), timed inside the hooks.

    python bench/bench_watch_hooks.py                 # ~60 s
    python bench/bench_watch_hooks.py --device cuda   # on a GPU: host time of the launches

On CUDA the timed region is what the training thread spends issuing the work
(nothing in it waits for the GPU); each step is synchronised after its timing,
so steps do not pile up in the stream.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per round and side")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layer-every", type=int, default=10)
    p.add_argument("--device", default="cpu", help="torch device (default cpu; e.g. cuda)")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F
    from _common import load_demo

    import probe

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this torch sees no CUDA device")
    torch.set_num_threads(1)
    demo = load_demo()

    endpoint = f"ipc://{tempfile.mkdtemp()}/nobody.sock"  # nothing listens: drops, counted
    os.environ.setdefault("OUTRIDER_RUN_ID", "bench-watch-hooks")
    probe.init(endpoint=endpoint)
    model = demo.CharLM(128, 4, 128, 4).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (16, 128), device=device)
    y = torch.randint(0, 256, (16, 128), device=device)

    def median_step_ms(watched: bool) -> float:
        times = []
        for step in range(args.steps):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            started = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if watched:
                probe.log({"loss": loss.detach()}, step=step)
            times.append(time.perf_counter() - started)
            if cuda:
                torch.cuda.synchronize()  # after the timing: the next step starts idle
        return 1000 * statistics.median(times)

    base: list[float] = []
    watched: list[float] = []
    for _ in range(args.rounds):
        base.append(median_step_ms(False))
        watcher: Any = probe.watch(
            model, opt, log_every=1, layer_every=args.layer_every, hist_every=0, activations_every=0
        )
        watched.append(median_step_ms(True))
        watcher.unwatch()
    hooks = [w - b for w, b in zip(watched, base, strict=True)]
    sections = section_timer_cost(args, model, opt, x, y, cuda)
    plain, periodic = periodic_step_cost(args, model, opt, x, y, cuda)
    print(
        f"clip_grad_norm_ + optimizer.step(), median ms per step over {args.rounds} rounds "
        f"x {args.steps} steps (1 torch thread, {device}):"
    )
    print(f"  without probe.watch  {statistics.median(base):.3f}")
    print(f"  with probe.watch     {statistics.median(watched):.3f}")
    print(
        f"  the hooks            {statistics.median(hooks):.3f} "
        f"(rounds {min(hooks):.3f}..{max(hooks):.3f})"
    )
    print("section timer (forward_seconds, backward_seconds), training-thread CPU time:")
    for label, (without, timed) in sections.items():
        print(
            f"  {label:<34} without {without:9.2f} us  with {timed:9.2f} us  "
            f"(+{timed - without:.2f} us)"
        )
    print("probe.watch's hooks, training-thread CPU per demo step:")
    print(
        f"  {'every step (grad norms, lr, times)':<34} {plain / 1000:9.2f} ms\n"
        f"  {'+ histograms + activation stats':<34} {periodic / 1000:9.2f} ms"
    )
    probe.finish(2.0)


def section_timer_cost(
    args: argparse.Namespace, model: Any, opt: Any, x: Any, y: Any, cuda: bool
) -> dict[str, tuple[float, float]]:
    """Median CPU microseconds of a tiny forward and of a whole demo step, with the
    watcher's section-timing hooks removed and in place (interleaved rounds)."""
    import torch

    import probe

    tiny = torch.nn.Linear(8, 8).to(x.device)
    tiny_opt = torch.optim.SGD(tiny.parameters(), lr=0.0)
    z = torch.randn(4, 8, device=x.device)
    calls = 20_000

    def tiny_forward_us() -> float:
        started = time.thread_time()
        for _ in range(calls):
            tiny(z)
        return 1e6 * (time.thread_time() - started) / calls

    results: dict[str, tuple[list[float], list[float]]] = {
        "tiny forward (Linear 8x8), per call": ([], []),
        "demo step (fwd+bwd+clip+step)": ([], []),
    }
    for _ in range(args.rounds):
        for timed in (False, True):
            kinds = {"layer_every": args.layer_every, "hist_every": 0, "activations_every": 0}
            watchers = [probe.watch(m, o, **kinds) for m, o in ((tiny, tiny_opt), (model, opt))]
            if not timed:
                for watcher in watchers:
                    for handle in watcher._timing:
                        handle.remove()
            tiny_us, step_us = tiny_forward_us(), demo_step_us(args.steps, model, opt, x, y, cuda)
            results["tiny forward (Linear 8x8), per call"][timed].append(tiny_us)
            results["demo step (fwd+bwd+clip+step)"][timed].append(step_us)
            for watcher in watchers:
                watcher.unwatch()
    return {
        label: (statistics.median(without), statistics.median(timed))
        for label, (without, timed) in results.items()
    }


#: the Watcher methods its hooks call on the training thread: optimizer pre- and post-step,
#: and each leaf module's forward hook on activation steps
HOOK_METHODS = ("_gradients_ready", "_after_step", "_take_activation")


def periodic_step_cost(
    args: argparse.Namespace, model: Any, opt: Any, x: Any, y: Any, cuda: bool
) -> tuple[float, float]:
    """Median training-thread CPU microseconds per demo step inside probe.watch's hooks,
    without and with histograms and activation statistics on every step (interleaved
    rounds). The hooks are timed inside, so the step's own noise stays out."""
    import probe
    from probe.watcher import Watcher

    spent = [0.0]

    def timed(method: Any) -> Any:
        def run(*call_args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return method(*call_args, **kwargs)
            finally:
                spent[0] += time.thread_time() - started

        return run

    originals = {name: getattr(Watcher, name) for name in HOOK_METHODS}
    for name, method in originals.items():
        setattr(Watcher, name, timed(method))
    results: tuple[list[float], list[float]] = ([], [])
    try:
        for _ in range(args.rounds):
            for periodic in (False, True):
                every = 1 if periodic else 0
                watcher: Any = probe.watch(
                    model, opt, layer_every=0, hist_every=every, activations_every=every
                )
                times = []
                for _ in range(args.steps):
                    spent[0] = 0.0
                    train_step(model, opt, x, y, clip=False)
                    times.append(spent[0])
                results[periodic].append(1e6 * statistics.median(times))
                watcher.unwatch()
    finally:
        for name, method in originals.items():
            setattr(Watcher, name, method)
    return statistics.median(results[0]), statistics.median(results[1])


def demo_step_us(steps: int, model: Any, opt: Any, x: Any, y: Any, cuda: bool) -> float:
    """Median training-thread CPU microseconds of a demo step: forward, backward, clip, step."""
    import torch

    times = []
    for _ in range(steps):
        started = time.thread_time()
        train_step(model, opt, x, y, clip=True)
        times.append(time.thread_time() - started)
        if cuda:
            torch.cuda.synchronize()
    return 1e6 * statistics.median(times)


def train_step(model: Any, opt: Any, x: Any, y: Any, *, clip: bool) -> None:
    """One demo training step: forward, backward, maybe ``clip_grad_norm_``, step."""
    import torch
    import torch.nn.functional as F

    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    opt.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


if __name__ == "__main__":
    main()
