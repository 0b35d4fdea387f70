"""Seeing host reads (device-to-host syncs on CUDA) on CPU, where CI runs.

A ``TorchDispatchMode`` (thread-local, so only the calling thread) records the
aten operators that need a tensor's value on the host, and the ``Tensor``
methods that read memory without dispatching are wrapped for that thread.
``recording_host_reads(source=None)`` counts every read of the thread (to
compare a fit with and without outrider); the default counts only the probe's.
"""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import probe

aten = torch.ops.aten

# Operators whose result depends on a tensor's values on the host: each one is a
# device-to-host sync on CUDA (a scalar read, or an output size known only from the data).
HOST_READ_OPS = {
    aten._local_scalar_dense.default,  # .item(), bool(), float(), int()
    aten.is_nonzero.default,
    aten.equal.default,
    aten.nonzero.default,  # boolean-mask indexing, torch.where(cond)
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.bincount.default,
    aten.histc.default,  # min and max from the data when not given
    aten.repeat_interleave.Tensor,
}

# Indexing with a boolean mask: the output size is the mask's count of True.
MASK_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}

# Tensor methods that read memory without an aten operator on CPU.
HOST_READ_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")

PROBE_DIR = str(Path(probe.__file__).parent) + os.sep


class HostReads(TorchDispatchMode):
    """Records the host reads made on this thread by code under ``source`` (a path
    prefix; None: by any code), with the innermost such frame."""

    def __init__(self, source: str | None) -> None:
        super().__init__()
        self.source = source
        self.seen: list[str] = []

    def note(self, what: str) -> None:
        frames = traceback.extract_stack()[:-2]
        if self.source is None:
            self.seen.append(f"{what} at {frames[-1].filename}:{frames[-1].lineno}")
            return
        mine = [f for f in frames if f.filename.startswith(self.source)]
        if mine:  # else the trainer's own read (an optimizer's .item(), say): not ours
            self.seen.append(f"{what} at {mine[-1].filename}:{mine[-1].lineno}")

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in HOST_READ_OPS or (func in MASK_INDEX_OPS and _has_mask(args[1])):
            self.note(str(func))
        return func(*args, **(kwargs or {}))


def _has_mask(indices: Any) -> bool:
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
    )


@contextmanager
def recording_host_reads(source: str | None = PROBE_DIR) -> Iterator[HostReads]:
    """Record the host reads the current thread makes inside the block from code
    under ``source`` (the probe package by default)."""
    reads = HostReads(source)
    thread = threading.get_ident()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READ_METHODS}

    def wrapped(name: str, original: Any) -> Any:
        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == thread:
                reads.note(f"Tensor.{name}")
            return original(self, *args, **kwargs)

        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrapped(name, original))
    try:
        with reads:
            yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
