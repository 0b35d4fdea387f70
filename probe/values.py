"""Turning what the trainer hands us into wire values, without a host sync.

The training thread only *captures*: a CPU tensor is snapshotted (the trainer
may update it in place later), a CUDA tensor is copied to pinned host memory
with ``non_blocking=True`` and a CUDA event is recorded behind the copy. The
sender thread *materialises*: it waits on the event and reads the numbers.
torch is never imported here; we only touch it when the trainer already has.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Callable
from typing import Any

from probe import protocol

PLAIN_NUMBERS = (float, int, bool)


class Captured:
    """A tensor value taken on the training thread, ready once ``event`` completes."""

    __slots__ = ("event", "host")

    def __init__(self, host: Any, event: Any) -> None:
        self.host = host
        self.event = event

    def wait(self) -> Any:
        if self.event is not None:
            self.event.synchronize()
        return self.host


class StepVector:
    """One step's numbers in one captured 1-d tensor, and the function that names them.

    The training thread only reduces tensors on their device (one norm per
    parameter, say) and copies the vector once; ``derive`` turns the host
    numbers into named metrics (global and per-group norms, ratios, flags) on
    the sender thread, where that arithmetic costs the training thread nothing.
    """

    __slots__ = ("_pairs", "captured", "derive")

    def __init__(
        self, captured: Captured, derive: Callable[[list[float]], list[tuple[str, float]]]
    ) -> None:
        self.captured = captured
        self.derive = derive
        self._pairs: list[tuple[str, float]] | None = None

    def pairs(self) -> list[tuple[str, float]]:
        """(name, value) pairs; waits for the copy (sender thread, computed once)."""
        if self._pairs is None:
            self._pairs = self.derive(self.captured.wait().tolist())
        return self._pairs


class CapturedVector:
    """The slice of a :class:`StepVector`'s metrics that one record carries."""

    __slots__ = ("start", "stop", "vector")

    def __init__(self, vector: StepVector, start: int = 0, stop: int | None = None) -> None:
        self.vector = vector
        self.start = start
        self.stop = stop

    def items(self) -> list[tuple[str, float]]:
        """(name, value) pairs; waits for the copy (sender thread)."""
        return self.vector.pairs()[self.start : self.stop]


def is_tensor(value: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def capture_tensor(tensor: Any) -> Captured:
    """Snapshot ``tensor`` without waiting for the device (training thread)."""
    tensor = tensor.detach()
    if tensor.is_cuda:
        import torch

        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]  # torch leaves it untyped
        # Behind the copy: it runs on the tensor's device's stream, which need not be
        # the current device's (a model on cuda:1 without torch.cuda.set_device(1)).
        event.record(torch.cuda.current_stream(tensor.device))
        return Captured(host, event)
    return Captured(tensor.clone(), None)


def capture_fresh(tensor: Any) -> Captured:
    """:func:`capture_tensor` for a tensor the probe has just computed itself.

    Nobody else holds it, so on CPU no snapshot copy is needed (one torch op
    less on the training thread); on CUDA it is the same asynchronous copy.
    """
    if tensor.is_cuda:
        return capture_tensor(tensor)
    return Captured(tensor, None)


# A 64-bin histogram needs far fewer values than a large tensor holds: 8,192 of them
# put ~128 in the average bin. Shipping more cost the trainer and the agent megabytes per
# histogram step (the demo model: 6.7 MB at 65,536 a tensor, 1.2 MB at 8,192).
HISTOGRAM_SAMPLE = 8_192

#: the probe's own generator: a sample must not advance the trainer's torch generator,
#: or watching a run would change its dropout masks and shuffles
_sampling = random.Random()


def sample_tensor(tensor: Any, limit: int) -> Any:
    """At most ``limit`` elements, a view on the tensor's device, without a host sync.

    Every ``stride``-th element from a random start: a strided read streams
    through memory, where a random gather from a large tensor waits on a cache
    miss per value (5x slower on the demo's activations). The stride shares no
    factor with the last dimension, so the sample visits every column (feature)
    evenly rather than a few of them.
    """
    flat = tensor.detach().reshape(-1)
    count = flat.numel()
    if count <= limit:
        return flat
    stride = count // limit
    columns = tensor.shape[-1] if tensor.dim() else 1
    while math.gcd(stride, columns) != 1:  # stops at 1 at the latest
        stride -= 1
    start = _sampling.randrange(count - stride * (limit - 1))
    return flat[start : start + stride * limit : stride]


# One histogram-batch record carries at most this many sampled values (4 MiB of float32)
# and this many histograms.
HISTOGRAM_BATCH_VALUES = 1 << 20
HISTOGRAM_BATCH_NAMES = 1024


def concat_samples(names: list[str], samples: list[Any]) -> list[tuple[list[str], list[int], Any]]:
    """Histogram samples as few float32 vectors: ``(names, lengths, vector)`` per batch.

    One batch per device, of at most ``HISTOGRAM_BATCH_VALUES`` values and
    ``HISTOGRAM_BATCH_NAMES`` histograms: the training thread then does one
    concatenation and one copy for a hundred histograms instead of a record
    each. The concatenation copies, so the samples may change afterwards.
    """
    import torch

    by_device: dict[Any, list[tuple[str, Any]]] = {}
    for name, sample in zip(names, samples, strict=True):
        flat = sample.reshape(-1)
        by_device.setdefault(flat.device, []).append(
            (name, flat if flat.dtype == torch.float32 else flat.float())
        )
    batches = []
    for pairs in by_device.values():
        chunk: list[tuple[str, Any]] = []
        size = 0
        for name, flat in pairs:
            full = len(chunk) == HISTOGRAM_BATCH_NAMES
            if chunk and (full or size + flat.numel() > HISTOGRAM_BATCH_VALUES):
                batches.append(_batch(chunk))
                chunk, size = [], 0
            chunk.append((name, flat))
            size += flat.numel()
        if chunk:
            batches.append(_batch(chunk))
    return batches


def _batch(chunk: list[tuple[str, Any]]) -> tuple[list[str], list[int], Any]:
    import torch

    return [n for n, _ in chunk], [t.numel() for _, t in chunk], torch.cat([t for _, t in chunk])


def sample_array(array: Any, limit: int) -> Any:
    """The numpy counterpart of :func:`sample_tensor` (always a copy)."""
    import numpy as np

    flat = np.asarray(array).reshape(-1)
    if flat.size <= limit:
        return flat.copy()
    return flat[np.random.default_rng().integers(0, flat.size, limit)]


def capture_metrics(body: dict[str, Any]) -> dict[str, Any]:
    """Capture the tensor values of a copied metrics dict in place (training thread)."""
    for name, value in body.items():
        if type(value) not in PLAIN_NUMBERS and is_tensor(value):
            body[name] = capture_tensor(value)
    return body


def scalar_value(value: Any) -> float | int | None:
    """A plain number for the wire, or None when ``value`` is not a scalar (sender thread)."""
    kind = type(value)
    if kind is float or kind is int:
        return value  # type: ignore[no-any-return]
    if kind is bool:
        return int(value)
    if kind is Captured:
        host = value.wait()
        if host.numel() != 1:
            return None
        return host.item()  # type: ignore[no-any-return]
    # numpy scalars and anything else that converts to a real number, but no sequences.
    if isinstance(value, (str, bytes)) or (
        hasattr(value, "__len__") and getattr(value, "ndim", 1) != 0
    ):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def tensor_payload(value: Any) -> dict[str, Any] | None:
    """dtype, shape and raw bytes of a captured tensor or numpy array (sender thread).

    Returns None when the value is larger than the wire allows.
    """
    if type(value) is Captured:
        host = value.wait().contiguous()
        nbytes = host.numel() * host.element_size()
        if nbytes > protocol.MAX_TENSOR_BYTES:
            return None
        dtype = str(host.dtype).removeprefix("torch.")
        if host.dtype.is_floating_point and dtype == "bfloat16":
            host = host.float()
            dtype = "float32"
        data = host.numpy().tobytes()
        return {"dtype": dtype, "shape": list(host.shape), "data": data}
    # numpy array
    if value.nbytes > protocol.MAX_TENSOR_BYTES:
        return None
    return {"dtype": str(value.dtype), "shape": list(value.shape), "data": value.tobytes()}
