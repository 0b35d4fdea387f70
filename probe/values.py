"""Turning what the trainer hands us into wire values, without a host sync.

The training thread only *captures*: a CPU tensor is snapshotted (the trainer
may update it in place later), a CUDA tensor is copied to pinned host memory
with ``non_blocking=True`` and a CUDA event is recorded behind the copy. The
sender thread *materialises*: it waits on the event and reads the numbers.
torch is never imported here; we only touch it when the trainer already has.
"""

from __future__ import annotations

import sys
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


class CapturedVector:
    """Many named scalars in one captured 1-d tensor (``probe.watch`` packs a step so)."""

    __slots__ = ("captured", "names", "start")

    def __init__(self, names: list[str], captured: Captured, start: int = 0) -> None:
        self.names = names
        self.captured = captured
        self.start = start

    def items(self) -> list[tuple[str, float]]:
        """(name, value) pairs; waits for the copy (sender thread)."""
        host = self.captured.wait()
        numbers = host[self.start : self.start + len(self.names)].tolist()
        return list(zip(self.names, numbers, strict=True))


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
        event.record()
        return Captured(host, event)
    return Captured(tensor.clone(), None)


# A 64-bin histogram needs far fewer values than a large tensor holds: 8,192 random ones
# put ~128 in the average bin. Shipping more cost the trainer and the agent megabytes per
# histogram step (the demo model: 6.7 MB at 65,536 a tensor, 1.2 MB at 8,192).
HISTOGRAM_SAMPLE = 8_192


def sample_tensor(tensor: Any, limit: int) -> Any:
    """At most ``limit`` elements, drawn on the tensor's device without a host sync."""
    import torch

    flat = tensor.detach().reshape(-1)
    if flat.numel() <= limit:
        return flat
    index = torch.randint(flat.numel(), (limit,), device=flat.device)
    return flat[index]


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
