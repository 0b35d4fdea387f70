"""The training thread never reads a tensor's value: checked on CPU, where CI runs.

On CUDA a host read (``.item()``, ``bool(t)``, ``.tolist()``, a boolean mask,
``nonzero``...) makes the training thread wait for the GPU. On CPU the same
calls cost nothing, so a CPU run cannot time them, but it can see them: a
``TorchDispatchMode`` (thread-local, so only the training thread) records the
aten operators that need a tensor's value on the host, and the ``Tensor``
methods that read memory without dispatching are wrapped for the training
thread. The probe's sender thread reads values by design and is not watched.

Where a GPU exists, the CUDA tests at the end of this file and in
test_watch.py check the same property with
``torch.cuda.set_sync_debug_mode("error")``, and that a capture's values are
read only once its asynchronous copy has landed.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import probe
from tests.helpers import lines, stop_agent
from tests.host_reads import recording_host_reads
from tests.probe.test_watch import norm

# -- the detector itself -------------------------------------------------------------------


@pytest.mark.parametrize(
    "read",
    [
        lambda t: t.sum().item(),
        lambda t: bool(t.max() > 0),
        lambda t: float(t.mean()),
        lambda t: t.tolist(),
        lambda t: t.numpy(),
        lambda t: t[t > 0],
        lambda t: torch.unique(t),
        lambda t: torch.histc(t),
    ],
    ids=["item", "bool", "float", "tolist", "numpy", "mask", "unique", "histc"],
)
def test_the_detector_sees_each_kind_of_host_read(read: Any) -> None:
    """Without this, a detector that saw nothing would pass every test below."""
    t = torch.randn(32)
    with recording_host_reads(source=None) as reads:
        read(t)
    assert reads.seen


def test_the_detector_ignores_device_side_work_and_other_threads() -> None:
    t = torch.randn(32)
    with recording_host_reads(source=None) as reads:
        torch.stack(torch._foreach_norm([t, t * 2])).float()
        t[torch.randint(32, (8,))].clamp(max=1.0)
        worker = threading.Thread(target=lambda: t.sum().item())
        worker.start()
        worker.join()
    assert reads.seen == []


def test_the_detector_blames_the_probe_only_for_its_own_reads() -> None:
    """A read inside probe code is seen; the trainer's own reads are not ours."""
    from probe import values

    captured = values.capture_tensor(torch.tensor(3.0))
    with recording_host_reads() as reads:
        torch.tensor(1.0).item()  # the trainer's
        assert values.scalar_value(captured) == 3.0  # probe code (sender-thread code, here)
    assert reads.seen  # Tensor.item and the aten read behind it, both from values.py
    assert all("probe/values.py" in read for read in reads.seen)


# -- the probe ------------------------------------------------------------------------------


def test_a_watched_step_reads_nothing_on_the_training_thread(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """Every kind of watch data due on every step, a clip, a tensor lr, tensors logged,
    histograms, features: no host read by the probe, and the values still arrive."""
    probe.init(endpoint, run_id="no-read")
    torch.manual_seed(0)
    width = 1100  # 8,800 weights and 17,600 activations: more than a histogram sample
    model = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 1))
    opt = torch.optim.Adam(
        [
            {"params": model[0].parameters()},
            {"params": model[2].parameters(), "lr": torch.tensor(0.01)},
        ],
        lr=0.05,
    )
    probe.watch(model, opt, layer_every=1, hist_every=1, activations_every=1, batch_size=16)
    expected, seen = [], []
    for step in range(4):
        x = torch.randn(16, 8)
        with recording_host_reads() as reads:
            opt.zero_grad()
            hidden = model[1](model[0](x))
            loss = nn.functional.mse_loss(model[2](hidden), x.sum(dim=1, keepdim=True))
            loss.backward()
        seen += reads.seen
        expected.append(norm([p.grad for p in model.parameters()]))  # the test may read
        with recording_host_reads() as reads:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            probe.log({"loss": loss, "train/hidden_mean": hidden.mean()}, step=step)
            probe.histogram("hidden", hidden, step=step)
            probe.features("hidden", hidden, step=step, every=1, max_rows=8)
        seen += reads.seen
    assert seen == []
    probe.finish()
    assert stop_agent(agent) == 0
    stored = lines(runs_dir / "no-read")
    grad_norms = {
        line["step"]: line["metrics"]["grad_norm"]
        for line in stored
        if line["kind"] == "scalars" and "grad_norm" in line["metrics"]
    }
    assert grad_norms == pytest.approx(dict(enumerate(expected)), rel=1e-5)
    logged = {line["step"] for line in stored if "loss" in line.get("metrics", {})}
    assert logged == {0, 1, 2, 3}
    assert any(line.get("as") == "features" for line in stored)


def test_an_evaluation_reads_nothing_on_the_training_thread(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """probe.evaluate_lm sums on the device and logs tensors: the numbers appear later."""
    probe.init(endpoint, run_id="eval-no-read")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 16), nn.Linear(16, 11))
    batches = [(torch.randint(11, (2, 5)), torch.randint(11, (2, 5))) for _ in range(3)]
    batches[0][1][0, 0] = -100  # an ignored target
    with recording_host_reads() as reads:
        probe.evaluate_lm(model, batches, step=7)
    assert reads.seen == []
    probe.finish()
    assert stop_agent(agent) == 0
    [line] = [
        line for line in lines(runs_dir / "eval-no-read") if "val/loss" in line.get("metrics", {})
    ]
    assert line["step"] == 7 and line["metrics"]["val/perplexity"] > 1.0


# -- the CUDA capture, where a GPU exists ---------------------------------------------------

# About 0.1 s of GPU time at 2 GHz: the stream is still busy when the capture returns.
BUSY_CYCLES = 200_000_000


def captured_after_a_busy_stream(device: torch.device) -> tuple[Any, float]:
    """A tensor captured on ``device`` while its stream is still busy, and its value."""
    from probe import values

    previous_mode = torch.cuda.get_sync_debug_mode()
    with torch.cuda.device(device):
        torch.cuda._sleep(BUSY_CYCLES)  # queued first: the fill and the copy wait behind it
    tensor = torch.full((4096,), 7.0, device=device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        captured = values.capture_tensor(tensor)
    finally:
        torch.cuda.set_sync_debug_mode(previous_mode)
    return captured, 7.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_capture_is_read_only_after_its_copy_lands() -> None:
    """No sync at capture; the sender's wait (the event) orders the read behind the copy."""
    captured, value = captured_after_a_busy_stream(torch.device("cuda", 0))
    assert captured.host.is_pinned()
    assert torch.equal(captured.wait(), torch.full((4096,), value))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_cuda_capture_on_a_device_other_than_the_current_waits_for_it(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """A model on cuda:1 with cuda:0 current: the event is on cuda:1's stream, and the
    memory counters are cuda:1's."""
    torch.cuda.set_device(0)
    captured, value = captured_after_a_busy_stream(torch.device("cuda", 1))
    assert torch.equal(captured.wait(), torch.full((4096,), value))

    probe.init(endpoint, run_id="cuda1")
    model = nn.Linear(64, 64).to("cuda:1")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.watch(model, opt)
    model(torch.randn(8, 64, device="cuda:1")).square().mean().backward()
    opt.step()
    allocated = torch.cuda.memory_allocated(1)  # the hook read it with the norms still alive
    assert torch.cuda.memory_allocated(0) == 0  # what reading the current device would give
    probe.finish()
    assert stop_agent(agent) == 0
    [metrics] = [
        line["metrics"] for line in lines(runs_dir / "cuda1") if "grad_norm" in line["metrics"]
    ]
    assert metrics["cuda_memory_allocated_bytes"] >= allocated > 0
