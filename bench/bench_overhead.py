"""Training slowdown of the demo model under monitoring, against no monitoring.

Why: the product's headline promise is "full training telemetry for under 1%
slowdown" (design.md, performance budget). This script trains the demo model
(``examples/train_charlm.py``: its data, model, batches and learning-rate
schedule, reused as they are) for a fixed number of steps, once per variant,
in interleaved repeats (A B C D, then D C B A, ...). Every run is a fresh
subprocess, so hooks, threads and sink processes never leak from one variant
into the next. The timed region is the training loop only (after warm-up
steps); set-up and shutdown (agent drain, ``wandb.finish``) are outside it.

Two kinds of figure: the wall clock (loop and step times, slowdown against the
paired baseline run) and the direct cost measured inside the trainer (time
the training thread spends in telemetry code and optimizer hooks, and the CPU
time of the trainer's other threads). On a noisy shared machine the wall clock
cannot resolve 1%; the direct cost can. See docs/performance.md.

Variants (``KIND:PLACEMENT``):

- ``base``: no monitoring (``OUTRIDER_DISABLED=1``, no agent).
- ``outrider-log``: the transport floor: ``probe.log`` of loss, lr, grad norm,
  step time and throughput every step to a real agent, nothing else.
- ``outrider``: full telemetry through the probe to a real agent process
  (``--sinks none``: the run store only); ``outrider+sinks`` the same with the
  agent's default sinks (TensorBoard, Prometheus on a free port, W&B offline).
  Full telemetry = ``probe.watch(model, opt, log_every=1, hist_every=50,
  activations_every=50)`` + ``probe.features`` of the last hidden state every
  100 steps + ``probe.log`` of loss/lr every step + a ``probe.text`` sample
  every 200 steps.
- ``wandb``: in-process W&B (offline), the telemetry the way tutorials write
  it: ``.item()`` on loss and grad norm and ``wandb.log`` every step,
  ``wandb.Histogram`` of every weight and gradient every 50 steps, the
  effective rank (SVD of the last hidden state) every 100 steps, a text
  sample every 200 steps.
- ``tensorboard``: the same with torch's ``SummaryWriter``.

Placements:

- ``sep`` (separate cores): the trainer pinned to CPU 0 with
  ``torch.set_num_threads(1)``; the agent (or W&B's service process) pinned
  to CPU 1. Threads inside the trainer process (the probe's sender, the
  TensorBoard writer) stay on CPU 0 with the training thread.
- ``shared``: nothing pinned, torch's default thread count; trainer and agent
  share every core.

Each monitored variant is compared with the baseline of the same placement,
repeat by repeat (same round, same thread settings).

    python bench/bench_overhead.py             # default: ~16 min on 2 CPUs
    python bench/bench_overhead.py --quick     # 2 repeats x 100 steps
    python bench/bench_overhead.py --variants sep --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from _common import (
    agent_cpu,
    agent_cpu_by_part,
    load_average,
    machine,
    percentile,
    print_table,
    short_ipc_endpoint,
    stop_agent,
)
from _common import start_agent as common_start_agent

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
DEMO_PATH = ROOT / "examples" / "train_charlm.py"
TRAINER_CPU = 0
AGENT_CPU = 1
KINDS = ("base", "outrider-log", "outrider", "outrider+sinks", "wandb", "tensorboard")
PLACEMENTS = ("sep", "shared")
ALL_VARIANTS = tuple(f"{kind}:{place}" for place in PLACEMENTS for kind in KINDS)
DEFAULT_VARIANTS = tuple(v for v in ALL_VARIANTS if v != "outrider-log:shared")
BUDGETS = {
    "outrider:sep": "<= 1%",
    "outrider:shared": "well < 5%",
    "outrider+sinks:sep": "<= 1%",
    "outrider+sinks:shared": "well < 5%",
}
AGENT_CONFIG = """\
sinks:
  tensorboard:
    enabled: true
  prometheus:
    enabled: true
    port: 0
  wandb:
    enabled: true
    mode: offline
"""


# ---------------------------------------------------------------------------
# the worker: one training run in its own process
# ---------------------------------------------------------------------------


def load_demo() -> ModuleType:
    """Import examples/train_charlm.py by path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_charlm", DEMO_PATH)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {DEMO_PATH}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def effective_rank(hidden: Tensor) -> float:
    """RankMe effective rank of (rows, dim) features, computed in the loop with an SVD."""
    import torch

    s = torch.linalg.svdvals(hidden.reshape(-1, hidden.shape[-1]).float())
    p = s / s.sum() + 1e-7
    return float(torch.exp(-(p * p.log()).sum()).item())


def pin_threads_of(pid: int, cpus: set[int]) -> int:
    """Pin every thread of ``pid`` and of its descendants to ``cpus``; returns the count."""
    import psutil

    pinned = 0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0
    for proc in procs:
        try:
            tids = [t.id for t in proc.threads()]
        except psutil.Error:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
                pinned += 1
            except OSError:
                pass
    return pinned


class Telemetry:
    """No monitoring: the baseline. Subclasses add one backend's telemetry."""

    label = "none"

    def __init__(
        self,
        args: argparse.Namespace,
        demo: ModuleType,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        workdir: Path,
    ) -> None:
        self.args = args
        self.demo = demo
        self.model = model
        self.opt = opt
        self.workdir = workdir
        self.step = 0
        self.sampling = False
        self.notes: list[str] = []
        self.events: dict[str, list[int]] = {}
        self.hook_s = 0.0  # time in this object's forward hook since the worker last read it

    def before_step(self, step: int) -> None:
        self.step = step

    def hook_hidden(self) -> None:
        """A forward hook on the final layer norm (the last hidden state), timed."""

        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if self.sampling:
                return
            started = time.perf_counter()
            self.on_hidden(output)
            self.hook_s += time.perf_counter() - started

        self.model.get_submodule("ln_f").register_forward_hook(hook)

    def on_hidden(self, output: Tensor) -> None:
        pass

    def generate(self, step: int) -> str | None:
        """The demo's own text sample on text steps, in every variant (the baseline too):
        generating it is the trainer's work, logging it is the telemetry's."""
        if self._due("text", self.args.text_every, step):
            return self._sample_text()
        return None

    def after_step(
        self,
        step: int,
        loss: Tensor,
        grad_norm: Tensor,
        lr: float,
        step_time: float,
        sample: str | None,
    ) -> None:
        pass

    def at_loop_end(self) -> dict[str, Any]:
        """Counters read right after the timed loop, before any flush."""
        return {}

    def close(self) -> dict[str, Any]:
        return {}

    def _due(self, kind: str, every: int, step: int) -> bool:
        if every > 0 and step % every == 0:
            self.events.setdefault(kind, []).append(step)
            return True
        return False

    def _sample_text(self) -> str:
        """The demo's 120-byte sample; the hidden-state hooks skip its forward passes."""
        self.sampling = True
        try:
            return str(self.demo.sample(self.model, 120, "cpu", self.args.seed))
        finally:
            self.sampling = False


class OutriderTelemetry(Telemetry):
    label = "outrider probe"

    def __init__(
        self,
        args: argparse.Namespace,
        demo: ModuleType,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        workdir: Path,
    ) -> None:
        super().__init__(args, demo, model, opt, workdir)
        import probe

        self.probe = probe
        if not probe.init(endpoint=args.endpoint, run_id=args.run_id):
            raise RuntimeError("probe.init() did not start: no agent?")
        probe.config({"bench": "bench_overhead", "steps": args.steps, "warmup": args.warmup})
        self.log_only = args.kind == "outrider-log"
        self.full = hasattr(probe, "watch") and hasattr(probe, "features")
        self.has_features = hasattr(probe, "features")
        if self.log_only:
            return  # the transport floor: probe.log of five scalars per step, nothing else
        if self.full:
            probe.watch(
                model,
                opt,
                log_every=1,
                layer_every=args.layer_every,
                hist_every=args.hist_every,
                activations_every=args.hist_every,
                batch_size=args.batch_size,
                tokens_per_step=args.batch_size * args.context,
                start_step=args.start - args.warmup,
            )
        else:
            self.notes.append(
                "WARNING: probe.watch is missing: hand-written fallback (probe.log of loss/lr/"
                "grad_norm/step time every step, probe.histogram of weights and grads every "
                f"{args.hist_every} steps, hidden features every {args.rank_every} steps); "
                "this is NOT the full-telemetry figure"
            )
        self.hook_hidden()

    def on_hidden(self, output: Tensor) -> None:
        if self.has_features:
            self.probe.features("hidden", output, self.step, every=self.args.rank_every)
        elif self.step % self.args.rank_every == 0:
            self.probe.tensor("hidden", output.detach().flatten(0, 1)[::8], step=self.step)

    def after_step(
        self,
        step: int,
        loss: Tensor,
        grad_norm: Tensor,
        lr: float,
        step_time: float,
        sample: str | None,
    ) -> None:
        args = self.args
        if self.full and not self.log_only:
            self.probe.log({"loss": loss.detach(), "lr": lr}, step=step)
        else:
            self.probe.log(
                {
                    "loss": loss.detach(),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "step_time_seconds": step_time,
                    "tokens_per_second": args.batch_size * args.context / step_time,
                },
                step=step,
            )
            if self.log_only:
                return
            if self._due("histograms", args.hist_every, step):
                for name, p in self.model.named_parameters():
                    self.probe.histogram(f"weights/{name}", p.detach(), step=step)
                    if p.grad is not None:
                        self.probe.histogram(f"grads/{name}", p.grad, step=step)
        if self.full:
            self._due("histograms", args.hist_every, step)  # probe.watch does them; count only
        self._due("features", args.rank_every, step)
        if sample is not None:
            self.probe.text("samples/generation", sample, step=step)

    def at_loop_end(self) -> dict[str, Any]:
        return {"queue_at_loop_end": self.probe.stats().get("queue_depth")}

    def close(self) -> dict[str, Any]:
        self.probe.flush(30)
        stats = self.probe.stats()
        self.probe.finish(10)
        return {"probe_stats": stats}


class WandbTelemetry(Telemetry):
    label = "wandb (offline, in-process)"

    def __init__(
        self,
        args: argparse.Namespace,
        demo: ModuleType,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        workdir: Path,
    ) -> None:
        super().__init__(args, demo, model, opt, workdir)
        os.environ.update(
            WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off", WANDB_DIR=str(workdir)
        )
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project="outrider-bench", dir=str(workdir), mode="offline", config={"steps": args.steps}
        )
        if args.placement == "sep":
            # W&B's service process gets the other core, as the agent does.
            import psutil

            children = psutil.Process().children()
            pinned = sum(pin_threads_of(child.pid, {AGENT_CPU}) for child in children)
            self.notes.append(
                f"pinned {pinned} threads of W&B's service process to CPU {AGENT_CPU}"
            )
        self.hidden: Tensor | None = None
        self.hook_hidden()

    def on_hidden(self, output: Tensor) -> None:
        self.hidden = output.detach()

    def after_step(
        self,
        step: int,
        loss: Tensor,
        grad_norm: Tensor,
        lr: float,
        step_time: float,
        sample: str | None,
    ) -> None:
        args, wandb = self.args, self.wandb
        row: dict[str, Any] = {
            "loss": loss.item(),
            "lr": lr,
            "grad_norm": grad_norm.item(),
            "step_time_seconds": step_time,
            "tokens_per_second": args.batch_size * args.context / step_time,
        }
        if self._due("histograms", args.hist_every, step):
            for name, p in self.model.named_parameters():
                row[f"weights/{name}"] = wandb.Histogram(p.detach().cpu().numpy())
                if p.grad is not None:
                    row[f"grads/{name}"] = wandb.Histogram(p.grad.detach().cpu().numpy())
        if self.hidden is not None and self._due("features", args.rank_every, step):
            row["hidden/effective_rank"] = effective_rank(self.hidden)
        if sample is not None:
            row["samples/generation"] = wandb.Html(f"<pre>{sample}</pre>")
        wandb.log(row, step=step)

    def close(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.run.finish()
        return {"finish_s": time.perf_counter() - started}


class TensorBoardTelemetry(Telemetry):
    label = "torch SummaryWriter (in-process)"

    def __init__(
        self,
        args: argparse.Namespace,
        demo: ModuleType,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        workdir: Path,
    ) -> None:
        super().__init__(args, demo, model, opt, workdir)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(workdir / "tensorboard"))
        self.hidden: Tensor | None = None
        self.hook_hidden()

    def on_hidden(self, output: Tensor) -> None:
        self.hidden = output.detach()

    def after_step(
        self,
        step: int,
        loss: Tensor,
        grad_norm: Tensor,
        lr: float,
        step_time: float,
        sample: str | None,
    ) -> None:
        args, add = self.args, self.writer.add_scalar
        add("loss", loss.item(), step)
        add("lr", lr, step)
        add("grad_norm", grad_norm.item(), step)
        add("step_time_seconds", step_time, step)
        add("tokens_per_second", args.batch_size * args.context / step_time, step)
        if self._due("histograms", args.hist_every, step):
            for name, p in self.model.named_parameters():
                self.writer.add_histogram(f"weights/{name}", p.detach(), step)
                if p.grad is not None:
                    self.writer.add_histogram(f"grads/{name}", p.grad, step)
        if self.hidden is not None and self._due("features", args.rank_every, step):
            add("hidden/effective_rank", effective_rank(self.hidden), step)
        if sample is not None:
            self.writer.add_text("samples/generation", sample, step)

    def close(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.writer.close()
        return {"finish_s": time.perf_counter() - started}


TELEMETRY: dict[str, type[Telemetry]] = {
    "base": Telemetry,
    "outrider-log": OutriderTelemetry,
    "outrider": OutriderTelemetry,
    "outrider+sinks": OutriderTelemetry,
    "wandb": WandbTelemetry,
    "tensorboard": TensorBoardTelemetry,
}


def kernel_counts(thread: Any, process: Any) -> dict[str, float]:
    """Costs the trainer pays outside telemetry code, from ``getrusage`` of the training
    thread and the process: page faults (the allocator returning and re-faulting memory),
    system time, and the training thread being switched out."""
    return {
        "thread_faults": thread.ru_minflt + thread.ru_majflt,
        "process_faults": process.ru_minflt + process.ru_majflt,
        "thread_system_s": thread.ru_stime,
        "thread_voluntary_switches": thread.ru_nvcsw,
        "thread_involuntary_switches": thread.ru_nivcsw,
    }


def worker(args: argparse.Namespace) -> None:
    """Train ``warmup + steps`` steps, time the last ``steps``, write a JSON result."""
    if args.placement == "sep":
        os.sched_setaffinity(0, {TRAINER_CPU})  # before torch starts any thread
        os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    import resource

    import torch
    import torch.nn.functional as F

    if args.placement == "sep":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    demo = load_demo()
    torch.manual_seed(args.seed)
    raw = demo.load_stdlib_text(args.data_bytes)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    train = data[: int(0.9 * len(data))]
    gen = torch.Generator().manual_seed(args.seed)
    model = demo.CharLM(args.context, args.layers, args.d_model, args.heads)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    workdir = Path(args.workdir)
    # Optimizer hooks run in registration order: marks registered before and after the
    # telemetry's own hooks (probe.watch) time those hooks from outside.
    marks: dict[str, float] = {}

    def mark(key: str) -> Any:
        def hook(optimizer: Any, hook_args: Any, hook_kwargs: Any) -> None:
            marks[key] = time.perf_counter()

        return hook

    opt.register_step_pre_hook(mark("pre0"))
    opt.register_step_post_hook(mark("post0"))
    import psutil

    me = psutil.Process()
    x = torch.randn(256, 256)
    (x @ x).sum().item()  # torch's thread pools are started by now (the baseline checks it)
    torch_threads = {t.id for t in me.threads()}  # threads started before the telemetry's
    telemetry = TELEMETRY[args.kind](args, demo, model, opt, workdir)
    opt.register_step_pre_hook(mark("pre1"))
    opt.register_step_post_hook(mark("post1"))

    total = args.warmup + args.steps
    first = args.start - args.warmup  # the warm-up steps come just before the timed window
    step_times: list[float] = []
    telemetry_times: list[float] = []  # training-thread time in telemetry code, per step
    loop_start = cpu_start = thread_start = loop_start_unix = agent_start = 0.0
    kernel_start: dict[str, float] = {}
    helpers_start: dict[tuple[str, int], float] = {}
    parts_start: dict[str, float] = {}
    last = time.perf_counter()
    for i in range(total):
        step = first + i
        if i == args.warmup:
            loop_start = last = time.perf_counter()
            loop_start_unix = time.time()
            agent_start = agent_cpu_s(args.agent_pid) if args.agent_pid else 0.0
            parts_start = agent_cpu_by_part(args.agent_pid) if args.agent_pid else {}
            helpers_start = helper_cpu(me, torch_threads)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu_start = usage.ru_utime + usage.ru_stime
            kernel_start = kernel_counts(resource.getrusage(resource.RUSAGE_THREAD), usage)
            thread_start = time.thread_time()
        telemetry.before_step(step)
        telemetry.hook_s = 0.0
        lr = demo.lr_at(i, total, args.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = demo.get_batch(train, args.batch_size, args.context, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step_time = max(time.perf_counter() - last, 1e-9)
        sample = telemetry.generate(step)
        started = time.perf_counter()
        telemetry.after_step(step, loss, grad_norm, lr, step_time, sample)
        now = time.perf_counter()
        if i >= args.warmup:
            step_times.append(now - last)
            telemetry_times.append(
                now
                - started
                + telemetry.hook_s
                + marks["pre1"]
                - marks["pre0"]
                + marks["post1"]
                - marks["post0"]
            )
        last = now
    loop_s = time.perf_counter() - loop_start
    loop_end_unix = time.time()
    agent_loop_s = agent_cpu_s(args.agent_pid) - agent_start if args.agent_pid else 0.0
    parts_end = agent_cpu_by_part(args.agent_pid) if args.agent_pid else {}
    helpers_end = helper_cpu(me, torch_threads)
    helpers_loop_s = sum(cpu - helpers_start.get(key, 0.0) for key, cpu in helpers_end.items())
    thread_s = time.thread_time() - thread_start
    kernel_thread = resource.getrusage(resource.RUSAGE_THREAD)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    kernel_end = kernel_counts(kernel_thread, usage)
    cpu_s = usage.ru_utime + usage.ru_stime - cpu_start
    result: dict[str, Any] = {
        "loop_s": loop_s,
        "loop_unix": [loop_start_unix, loop_end_unix],
        "agent_loop_cpu_s": agent_loop_s,  # the agent's and its children's CPU in the loop
        "agent_parts_cpu_s": {k: v - parts_start.get(k, 0.0) for k, v in parts_end.items()},
        "helpers_loop_cpu_s": helpers_loop_s,  # telemetry threads and child processes
        "trainer_cpu_s": cpu_s,
        "other_threads_cpu_s": cpu_s - thread_s,
        "kernel": {key: value - kernel_start[key] for key, value in kernel_end.items()},
        "telemetry_times": telemetry_times,
        "step_times": step_times,
        "final_loss": float(loss.item()),
        "threads": torch.get_num_threads(),
        "affinity": sorted(os.sched_getaffinity(0)),
        **telemetry.at_loop_end(),
    }
    result.update(telemetry.close())
    measured = range(args.start, args.start + args.steps)
    result["events"] = {k: [s for s in v if s in measured] for k, v in telemetry.events.items()}
    result["notes"] = telemetry.notes
    Path(args.result).write_text(json.dumps(result))


# ---------------------------------------------------------------------------
# the driver: agents, interleaved repeats, the report
# ---------------------------------------------------------------------------


@dataclass
class Run:
    """One variant's run in one repeat."""

    loop_s: float
    step_times: list[float]
    result: dict[str, Any]
    agent: dict[str, Any] = field(default_factory=dict)


def start_agent(
    endpoint: str,
    runs_dir: Path,
    run_id: str,
    workdir: Path,
    *,
    sinks: bool,
    cpus: set[int] | None,
    config_text: str = AGENT_CONFIG,
) -> subprocess.Popen[bytes]:
    """A real agent, as ``outrider run`` starts it (``python -P -m agent``), optionally pinned;
    with ``sinks``, configured by ``config_text`` (default: the default sinks, W&B offline)."""
    options = ["--run-id", run_id]
    if sinks:
        config = workdir / "agent.yaml"
        config.write_text(config_text)
        options += ["--config", str(config)]
    else:
        options += ["--sinks", "none"]

    def pin() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return common_start_agent(
        endpoint,
        runs_dir,
        workdir / "agent.log",
        options=options,
        cwd=workdir,
        env=dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(workdir)),
        preexec_fn=pin,
    )


def helper_cpu(me: Any, torch_threads: set[int]) -> dict[tuple[str, int], float]:
    """CPU seconds so far of the trainer's telemetry threads (those started after torch's:
    the probe's sender and ZeroMQ's, TensorBoard's and W&B's writers) and of its child
    processes (W&B's service), by thread or process id."""
    import psutil

    cpu: dict[tuple[str, int], float] = {}
    try:
        for thread in me.threads():
            if thread.id not in torch_threads and thread.id != threading.get_native_id():
                cpu[("thread", thread.id)] = thread.user_time + thread.system_time
        for child in me.children(recursive=True):
            times = child.cpu_times()
            cpu[("process", child.pid)] = times.user + times.system
    except psutil.Error:
        pass
    return cpu


def agent_cpu_s(pid: int) -> float:
    """CPU seconds of the agent and its children (W&B's service process) so far."""
    return sum(agent_cpu(pid))


def stream_accounting(run_dir: Path) -> dict[str, Any]:
    """The trainer stream's accounting from run.json (sent, received, dropped, lost)."""
    info = json.loads((run_dir / "run.json").read_text())
    for stream in info.get("streams", []):
        if stream.get("rank", -1) >= 0:
            return {key: stream.get(key) for key in ("sent", "received", "dropped", "lost")}
    return {}


def run_variant(variant: str, args: argparse.Namespace, tmp: Path, index: int) -> Run:
    kind, placement = variant.split(":")
    workdir = Path(tempfile.mkdtemp(prefix=f"{index:03d}-", dir=tmp))
    result_path = workdir / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--kind",
        kind,
        "--placement",
        placement,
        "--result",
        str(result_path),
        "--workdir",
        str(workdir),
    ]
    for name in (
        "steps",
        "warmup",
        "hist_every",
        "rank_every",
        "text_every",
        "layer_every",
        "seed",
        "batch_size",
        "context",
        "layers",
        "d_model",
        "heads",
        "lr",
        "data_bytes",
        "start",
    ):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    agent = None
    run_id = f"bench-overhead-{index:03d}"
    runs_dir = workdir / "runs"
    if kind.startswith("outrider"):
        endpoint = short_ipc_endpoint(tmp)
        agent = start_agent(
            endpoint,
            runs_dir,
            run_id,
            workdir,
            sinks=kind == "outrider+sinks",
            cpus={AGENT_CPU} if placement == "sep" else None,
        )
        command += ["--endpoint", endpoint, "--run-id", run_id, "--agent-pid", str(agent.pid)]
    else:
        env["OUTRIDER_DISABLED"] = "1"
    agent_info: dict[str, Any] = {}
    try:
        cpu_before = agent_cpu_s(agent.pid) if agent else 0.0
        started = time.perf_counter()
        proc = subprocess.run(
            command, env=env, cwd=workdir, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not result_path.exists():
            raise RuntimeError(
                f"{variant} worker failed ({proc.returncode}):\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )
        if agent is not None:
            agent_info["cpu_share"] = (agent_cpu_s(agent.pid) - cpu_before) / (
                time.perf_counter() - started
            )
            started = time.perf_counter()
            stop_agent(agent)
            agent_info["stop_s"] = time.perf_counter() - started
            agent_info["accounting"] = stream_accounting(runs_dir / run_id)
    finally:
        if agent is not None:
            stop_agent(agent)
    result = json.loads(result_path.read_text())
    shutil.rmtree(workdir, ignore_errors=True)
    return Run(result["loop_s"], result["step_times"], result, agent_info)


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


def pct(x: float) -> str:
    return f"{x:+.1f}%"


def ms_per_step(runs: Sequence[Run], key: str) -> float:
    """Median over repeats of a per-run CPU figure, per timed step, in ms."""
    return 1000 * float(statistics.median(r.result[key] / len(r.step_times) for r in runs))


def report_agent_parts(variants: Sequence[str], runs: dict[str, list[Run]]) -> None:
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


KERNEL_COLUMNS = (  # (header, key in kernel_counts, scale, format)
    ("training thread page faults", "thread_faults", 1, ".0f"),
    ("process page faults", "process_faults", 1, ".0f"),
    ("training thread system ms", "thread_system_s", 1000, ".2f"),
    ("voluntary switches", "thread_voluntary_switches", 1, ".1f"),
    ("involuntary switches", "thread_involuntary_switches", 1, ".1f"),
)


def report_trainer_kernel(variants: Sequence[str], runs: dict[str, list[Run]]) -> None:
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


def report(variants: Sequence[str], runs: dict[str, list[Run]], args: argparse.Namespace) -> None:
    print()
    print(
        f"Wall clock: steps {args.start}-{args.start + args.steps - 1} timed, after "
        f"{args.warmup} warm-up steps; {args.repeats} interleaved repeats per variant."
    )
    rows: list[list[str]] = []
    for variant in variants:
        vruns = runs[variant]
        base_runs = runs[f"base:{variant.split(':')[1]}"]
        loops = [r.loop_s for r in vruns]
        steps = sorted(t for r in vruns for t in r.step_times)
        median_step = percentile(steps, 50)
        if variant.startswith("base:"):
            slow, slow_step = "-", "-"
        else:
            paired = [r.loop_s / b.loop_s - 1 for r, b in zip(vruns, base_runs, strict=True)]
            slow = (
                f"{pct(100 * statistics.median(paired))} "
                f"({pct(100 * min(paired))}..{pct(100 * max(paired))})"
            )
            base_steps = sorted(t for b in base_runs for t in b.step_times)
            slow_step = pct(100 * (median_step / percentile(base_steps, 50) - 1))
        rows.append(
            [
                variant,
                f"{statistics.median(loops):.2f}",
                f"{min(loops):.2f}-{max(loops):.2f}",
                f"{1000 * median_step:.1f}",
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

    print()
    print("Direct cost, measured inside the trainer (independent of run-to-run noise):")
    rows = []
    for variant in variants:
        vruns = runs[variant]
        base_runs = runs[f"base:{variant.split(':')[1]}"]
        tele = [t for r in vruns for t in r.result["telemetry_times"]]
        tele.sort()
        tele_ms = 1000 * statistics.fmean(tele)
        other_ms = ms_per_step(vruns, "other_threads_cpu_s")
        extra_ms = other_ms - ms_per_step(base_runs, "other_threads_cpu_s")
        helpers_ms = ms_per_step(vruns, "helpers_loop_cpu_s")
        agent_ms = ms_per_step(vruns, "agent_loop_cpu_s")
        base_step = percentile(sorted(t for b in base_runs for t in b.step_times), 50)
        shared = variant.endswith(":shared")
        # Separate cores: what the trainer's own core lost (the agent and W&B's service have
        # the other core). Shared cores: all CPU the telemetry took from the trainer's cores,
        # the agent's included (torch's own threads swamp a comparison of thread totals).
        cost_ms = tele_ms + (helpers_ms + agent_ms if shared else extra_ms)
        direct = "-" if variant.startswith("base:") else pct(100 * cost_ms / (1000 * base_step))
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
        "hook and the optimizer hooks (probe.watch), timed on the training thread; not "
        "probe.watch's activation hooks (forward hooks on activation steps). Telemetry "
        "threads: the trainer's threads started after torch's (the probe's sender and "
        "ZeroMQ's, TensorBoard's writer, W&B's), with its child processes (W&B's service); "
        "0 for the baseline unless torch started threads late. Agent CPU: the agent's and "
        "its children's (statistics workers, W&B's service) during the timed loop. Direct "
        "cost, separate cores: training thread + the other trainer threads' extra CPU on "
        "the trainer's core. Shared cores: training thread + telemetry threads + agent, all "
        "CPU taken from the cores torch runs on; the wall clock adds what preemption and "
        "cache effects cost on top."
    )
    report_agent_parts(variants, runs)
    report_trainer_kernel(variants, runs)

    print()
    detail: list[list[str]] = []
    for variant in variants:
        vruns = runs[variant]
        first = vruns[0].result
        events = ", ".join(f"{k} at {v}" for k, v in first["events"].items() if v) or "none"
        accounting = "-"
        queue = "-"
        if vruns[0].agent:
            sent = sum(r.agent["accounting"].get("sent") or 0 for r in vruns)
            received = sum(r.agent["accounting"].get("received") or 0 for r in vruns)
            lost = sum(r.agent["accounting"].get("lost") or 0 for r in vruns)
            dropped = sum(sum((r.agent["accounting"].get("dropped") or {}).values()) for r in vruns)
            accounting = f"{received}/{sent} stored, {dropped} dropped, {lost} lost"
            queue = str(max(r.result.get("queue_at_loop_end") or 0 for r in vruns))
        losses = {f"{r.result['final_loss']:.4f}" for r in vruns}
        detail.append(
            [
                variant,
                f"{first['threads']}",
                ",".join(map(str, first["affinity"])),
                queue,
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--steps",
        type=int,
        default=200,
        help="timed steps per run (default 200: every periodic kind at its rate)",
    )
    p.add_argument(
        "--warmup", type=int, default=5, help="untimed steps just before the timed ones (default 5)"
    )
    p.add_argument(
        "--start",
        type=int,
        default=50,
        help="step number of the first timed step (default 50: with 200 steps the "
        "window 50-249 holds histograms at 50, 100, 150 and 200, features at "
        "100 and 200 and a text sample at 200, each at its nominal rate)",
    )
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    p.add_argument("--quick", action="store_true", help="2 repeats x 100 steps")
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help="comma-separated KIND:PLACEMENT names, or a kind / placement for all "
        "matching (baselines are added); default: all but outrider-log:shared",
    )
    p.add_argument(
        "--hist-every",
        type=int,
        default=50,
        help="weight/grad histograms and activation stats (default 50)",
    )
    p.add_argument(
        "--rank-every",
        type=int,
        default=100,
        help="hidden-state features / effective rank (default 100)",
    )
    p.add_argument("--text-every", type=int, default=200, help="text samples (default 200)")
    p.add_argument(
        "--layer-every",
        type=int,
        default=10,
        help="probe.watch per-layer norms (default 10, watch's own default)",
    )
    # The demo's model and data (examples/train_charlm.py defaults).
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--data-bytes", type=int, default=3_000_000)
    # Internal: one run in this process.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--placement", choices=PLACEMENTS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    p.add_argument("--run-id", help=argparse.SUPPRESS)
    p.add_argument("--agent-pid", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 2, 100
    if args.start < args.warmup:
        p.error("--start must be at least --warmup (warm-up steps are numbered before it)")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    variants = expand_variants(args.variants)
    if (os.cpu_count() or 1) < 2 and any(v.endswith(":sep") for v in variants):
        print("fewer than 2 CPUs: skipping the separate-cores variants")
        variants = [v for v in variants if not v.endswith(":sep")]
    print(f"machine: {machine()}")
    print(
        f"variants: {', '.join(variants)}; {args.repeats} repeats x ({args.warmup} warm-up + "
        f"{args.steps} timed steps)"
    )
    load_start = load_average()
    started = time.perf_counter()
    runs: dict[str, list[Run]] = {v: [] for v in variants}
    tmp = Path(tempfile.mkdtemp(prefix="bov-"))
    try:
        index = 0
        for repeat in range(args.repeats):
            # A B C D, D C B A, ...: a slow drift of the machine hits no variant more often.
            for variant in variants if repeat % 2 == 0 else variants[::-1]:
                run = run_variant(variant, args, tmp, index)
                index += 1
                runs[variant].append(run)
                print(
                    f"repeat {repeat + 1}/{args.repeats}  {variant:24s} loop {run.loop_s:6.2f} s"
                    f"  median step {1000 * statistics.median(run.step_times):6.1f} ms",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(variants, runs, args)
    print(
        f"\nload average (1 min) {load_start:.2f} -> {load_average():.2f}; "
        f"total {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
