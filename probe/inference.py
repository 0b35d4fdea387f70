"""Inference benchmark of a model: latency percentiles, throughput and peak memory per
batch size, and what dynamic int8 quantization does to size, latency and outputs.

It runs on the caller's thread, on purpose: the user asked for a benchmark, and
timing a forward means waiting for it (on CUDA, a synchronize after each one).
Call it outside the training loop, e.g. after training or at a checkpoint.
A model that fails is reported in the result's ``error``, never raised.
"""

from __future__ import annotations

import copy
import io
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from probe import internal, protocol

PREFIX = "inference/"
QUANTIZED_TYPES = "nn.Linear, nn.LSTM"


class ModelFailed(Exception):
    """The user's model (or its input) raised: a user fault, reported, never counted as ours."""


def benchmark_inference(
    model: Any,
    example_input: Any,
    *,
    log: Callable[[dict[str, Any], int | None], None],
    event: Callable[..., None],
    batch_sizes: Sequence[int] = (1, 8, 32),
    warmup: int = 3,
    iters: int = 20,
    quantize: bool = True,
    step: int | None = None,
) -> dict[str, Any]:
    """Benchmark ``model`` on batches built from ``example_input``; log and return the figures.

    ``example_input`` is a tensor, a tuple/list of positional tensors or a dict of
    keyword tensors, batch first (batch 1 is typical); each batch size takes its
    first rows, repeated along dim 0 as needed. The int8 outputs are compared with
    the fp32 ones on all its rows. Figures go to ``inference/...`` scalars and one
    ``inference_benchmark`` event holding the whole result.
    """
    result: dict[str, Any] = {"warmup": warmup, "iters": iters, "batches": []}
    try:
        _measure(model, example_input, result, batch_sizes, warmup, iters, quantize)
    except ModelFailed as exc:
        cause = exc.__cause__ or exc
        result["error"] = f"{type(cause).__name__}: {cause}"
        internal.warn_once(
            f"inference-model:{type(cause).__name__}",
            "outrider probe: probe.benchmark_inference: the model failed (%s); "
            "the figures measured before it are kept",
            result["error"],
        )
    except Exception as exc:
        result["error"] = f"internal error: {type(exc).__name__}: {exc}"
        internal.record(exc, "benchmark_inference")
    try:
        log(scalars(result), step)
        event(protocol.INFERENCE_EVENT, step, **result)
    except Exception as exc:
        internal.record(exc, "benchmark_inference")
    return result


def check_arguments(batch_sizes: Sequence[int], warmup: int, iters: int) -> None:
    """Misuse is a ``ValueError`` at the call, saying what to fix."""
    if iters < 1 or warmup < 0:
        raise ValueError(
            f"benchmark_inference needs iters >= 1 and warmup >= 0, got {iters}, {warmup}"
        )
    if not batch_sizes or any(type(b) is not int or b < 1 for b in batch_sizes):
        raise ValueError(
            f"benchmark_inference needs positive integer batch sizes, got {list(batch_sizes)!r}"
        )


def _measure(
    model: Any,
    example_input: Any,
    result: dict[str, Any],
    batch_sizes: Sequence[int],
    warmup: int,
    iters: int,
    quantize: bool,
) -> None:
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ModelFailed from TypeError(f"needs a torch.nn.Module, got {type(model).__name__}")
    device = _device(model)
    result["device"] = str(device)
    result["memory_source"] = (
        "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process RSS growth"
    )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch_size in batch_sizes:
                batch = _batch(example_input, batch_size)
                result["batches"].append(_timed(model, batch, batch_size, device, warmup, iters))
            if quantize:
                result["quantized"] = _quantized(model, example_input, device, warmup, iters)
    finally:
        model.train(was_training)


def _timed(
    model: Any, batch: Any, batch_size: int, device: Any, warmup: int, iters: int
) -> dict[str, Any]:
    """Latency percentiles, throughput and peak memory of ``iters`` forwards of one batch."""
    import torch

    cuda = device.type == "cuda"
    memory = None if cuda else _RssPeak()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    latencies = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        _call(model, batch)
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if memory is not None:
            memory.sample()
        if i >= warmup:
            latencies.append(elapsed)
    peak = memory.growth() if memory is not None else torch.cuda.max_memory_allocated(device)
    ordered = sorted(latencies)
    return {
        "batch_size": batch_size,
        "latency_p50_seconds": percentile(ordered, 50),
        "latency_p90_seconds": percentile(ordered, 90),
        "latency_p99_seconds": percentile(ordered, 99),
        "samples_per_second": batch_size * len(latencies) / max(sum(latencies), 1e-12),
        "peak_memory_bytes": int(peak),
    }


def _quantized(
    model: Any, example_input: Any, device: Any, warmup: int, iters: int
) -> dict[str, Any]:
    """Dynamic int8 quantization on CPU: size, batch-1 latency, and output agreement on
    every row of ``example_input`` (one row gives a top-1 agreement of 0 or 1)."""
    import torch

    if device.type != "cpu":
        return _skipped(f"the model is on {device.type}; dynamic int8 quantization runs on CPU")
    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    if not engines or torch.backends.quantized.engine == "none":
        return _skipped("this torch build has no quantized engine")
    kinds = {torch.nn.Linear, torch.nn.LSTM}
    if not any(type(m) in kinds for m in model.modules()):
        return _skipped(f"no {QUANTIZED_TYPES} module to quantize")
    try:
        with warnings.catch_warnings():
            # recent torch releases deprecate torch.ao quantization; it still works
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            quantized = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]  # torch leaves it untyped
                copy.deepcopy(model), kinds, dtype=torch.qint8
            )
    except Exception as exc:
        return _skipped(f"quantize_dynamic failed: {type(exc).__name__}: {exc}")
    batch = _batch(example_input, 1)
    reference = _first_tensor(_call(model, example_input))
    try:
        output = _first_tensor(_call(quantized, example_input))
        int8 = _timed(quantized, batch, 1, device, warmup, iters)["latency_p50_seconds"]
    except ModelFailed as exc:
        cause = exc.__cause__ or exc
        return _skipped(f"the quantized model failed: {type(cause).__name__}: {cause}")
    fp32 = _timed(model, batch, 1, device, warmup, iters)["latency_p50_seconds"]
    size, quantized_size = _state_bytes(model), _state_bytes(quantized)
    figures: dict[str, Any] = {
        "status": "done",
        "engine": torch.backends.quantized.engine,
        "size_bytes_fp32": size,
        "size_bytes_int8": quantized_size,
        "size_ratio": quantized_size / max(size, 1),
        "latency_p50_seconds_fp32": fp32,
        "latency_p50_seconds_int8": int8,
        "latency_ratio": int8 / max(fp32, 1e-12),
    }
    if reference is not None and output is not None and reference.shape == output.shape:
        figures["max_abs_diff"] = float((reference.float() - output.float()).abs().max())
        if reference.is_floating_point() and reference.dim() >= 2 and reference.shape[-1] >= 2:
            agree = reference.argmax(-1) == output.argmax(-1)
            figures["top1_agreement"] = float(agree.float().mean())
    return figures


def _skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason}


def scalars(result: dict[str, Any]) -> dict[str, float]:
    """The result's numbers as ``inference/...`` scalars (finite ones only)."""
    out: dict[str, float] = {}
    for row in result.get("batches", []):
        scope = f"{PREFIX}batch{row['batch_size']}/"
        for key, value in row.items():
            if key != "batch_size":
                out[scope + key] = value
    for key, value in (result.get("quantized") or {}).items():
        if type(value) in (int, float):
            out[f"{PREFIX}quantized/{key}"] = value
    return {k: v for k, v in out.items() if math.isfinite(v)}


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of sorted values, interpolated linearly between ranks."""
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class _RssPeak:
    """The process's resident memory, sampled after each forward: its growth over the
    RSS before the first one.

    A lower bound on what the forwards need: memory the allocator already holds
    from earlier work is reused without growing RSS, and memory freed back to the
    system inside one forward is not seen.
    """

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._base = self._peak = self._process.memory_info().rss

    def sample(self) -> None:
        self._peak = max(self._peak, self._process.memory_info().rss)

    def growth(self) -> int:
        return int(self._peak - self._base)


def _device(model: Any) -> Any:
    import torch

    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _batch(example: Any, batch_size: int) -> Any:
    """``example`` repeated along dim 0 to ``batch_size`` rows (non-tensors left as they are)."""
    import torch

    if isinstance(example, torch.Tensor):
        if example.dim() == 0 or example.shape[0] == 0:
            return example
        reps = -(-batch_size // example.shape[0])
        return example.repeat(reps, *([1] * (example.dim() - 1)))[:batch_size].contiguous()
    if isinstance(example, (tuple, list)):
        return type(example)(_batch(item, batch_size) for item in example)
    if isinstance(example, dict):
        return {key: _batch(item, batch_size) for key, item in example.items()}
    return example


def _call(model: Any, batch: Any) -> Any:
    try:
        if isinstance(batch, dict):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)
    except Exception as exc:
        raise ModelFailed from exc


def _first_tensor(output: Any) -> Any:
    """The first tensor of a model's output (LSTM: the sequence output), or None."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _state_bytes(model: Any) -> int:
    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()
