"""outrider's in-process probe: hand telemetry to the sidecar agent and return.

The one line a trainer needs is ``probe.init()`` (it reads the environment
``outrider run`` sets); ``probe.log`` also starts the probe on first use.
Every function here is safe to call at any time: none raises into the
trainer, none waits on the agent, a socket, a disk or the GPU.

``probe.checkpoint.save`` / ``load`` write and find checkpoints atomically.

``import probe`` imports neither torch, numpy nor wandb.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from probe import checkpoint, internal, protocol, values
from probe.client import DEFAULT_EXIT_TIMEOUT, DEFAULT_QUEUE_SIZE, Client
from probe.features import DEFAULT_MAX_ROWS, FeatureSampler
from probe.identity import Identity
from probe.sender import DEFAULT_BUSY_FLUSH_INTERVAL, DEFAULT_FLUSH_INTERVAL

__all__ = [
    "benchmark_inference",
    "checkpoint",
    "config",
    "evaluate_lm",
    "event",
    "features",
    "finish",
    "flush",
    "histogram",
    "init",
    "is_enabled",
    "log",
    "stats",
    "tensor",
    "text",
    "unwatch",
    "watch",
]

_PLAIN_TYPES = frozenset(values.PLAIN_NUMBERS)
_client: Client | None = None
_disabled = False  # no further autostart: telemetry off, or finished
_finished = False  # finished explicitly: a new init() may start a new stream
_init_lock = threading.Lock()


def init(
    endpoint: str | None = None,
    *,
    run_id: str | None = None,
    rank: int | None = None,
    local_rank: int | None = None,
    world_size: int | None = None,
    queue_size: int | None = None,
    exit_timeout: float = DEFAULT_EXIT_TIMEOUT,
    flush_interval: float | None = None,
    busy_flush_interval: float | None = None,
    enabled: bool | None = None,
    **sender_options: Any,
) -> bool:
    """Start the probe; returns True when telemetry is on.

    Arguments left out come from ``OUTRIDER_ENDPOINT``, ``OUTRIDER_RUN_ID``,
    ``OUTRIDER_QUEUE_SIZE``, ``OUTRIDER_FLUSH_INTERVAL``,
    ``OUTRIDER_BUSY_FLUSH_INTERVAL``, ``OUTRIDER_DISABLED``
    and torchrun's ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``. With no endpoint
    at all, telemetry is off, one warning says so, and every call stays a cheap
    no-op. Calling it again returns the current state (after ``finish()`` it
    starts a new stream); a bad argument raises ``ValueError`` (the only time
    the probe raises: at set-up, never in the loop).

    ``flush_interval`` (seconds, default 0.02) is how long a step's records
    gather before they go to the agent as one message. Each message wakes the
    probe's and the agent's threads, which costs the trainer nothing while a
    core is idle; while every core the trainer may run on is busy, records
    gather for ``busy_flush_interval`` instead (default 0.25; 0 keeps
    ``flush_interval``): a few short steps go as one message, and reach the
    agent up to that much later (docs/performance.md).
    """
    global _client, _disabled, _finished
    with _init_lock:
        if _client is not None:
            return True
        if _disabled and not _finished:
            return False
        _disabled = _finished = False
        if enabled is None:
            enabled = os.environ.get(protocol.ENV_DISABLED, "") in ("", "0", "false")
        endpoint = endpoint or os.environ.get(protocol.ENV_ENDPOINT)
        if not enabled:
            _disabled = True
            return False
        if not endpoint:
            _disabled = True
            internal.warn_once(
                "no-endpoint",
                "outrider probe: no agent endpoint (%s is not set; run under `outrider run` "
                "or call probe.init(endpoint=...)); telemetry is off",
                protocol.ENV_ENDPOINT,
            )
            return False
        if queue_size is None:
            queue_size = int(os.environ.get(protocol.ENV_QUEUE_SIZE) or DEFAULT_QUEUE_SIZE)
        if flush_interval is None:
            flush_interval = _seconds_from_env(protocol.ENV_FLUSH_INTERVAL, DEFAULT_FLUSH_INTERVAL)
        if busy_flush_interval is None:
            busy_flush_interval = _seconds_from_env(
                protocol.ENV_BUSY_FLUSH_INTERVAL, DEFAULT_BUSY_FLUSH_INTERVAL
            )
        identity = Identity.from_env(run_id, rank, local_rank, world_size)
        client = Client(
            endpoint,
            identity,
            queue_size=queue_size,
            exit_timeout=exit_timeout,
            flush_interval=flush_interval,
            busy_flush_interval=busy_flush_interval,
            **sender_options,
        )
        client.start()
        _client = client
        return True


def _seconds_from_env(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {text!r}") from None


def _autostart() -> Client | None:
    """First telemetry call without ``init()``: start from the environment."""
    try:
        init()
    except Exception as exc:
        internal.record(exc, "init")
        global _disabled
        _disabled = True
    return _client


def _live_client() -> Client | None:
    """The stream, started from the environment on first use; None while telemetry is off."""
    return _client or (None if _disabled else _autostart())


def log(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log scalars: Python numbers or single-element tensors, by name.

    A tensor is captured (snapshot, or an async copy on CUDA) and turned into
    a number on the sender thread, never here.
    """
    client = _client
    if client is None and (_disabled or (client := _autostart()) is None):
        return
    try:
        body = dict(metrics)
        if not _PLAIN_TYPES.issuperset(map(type, body.values())):
            body = values.capture_metrics(body)
        client.submit(protocol.SCALARS, step, body)
    except Exception as exc:
        internal.record(exc, "log")


def text(name: str, content: str, step: int | None = None) -> None:
    """Log a piece of text, e.g. a generated sample (truncated to the wire limit)."""
    body = {"name": name, "text": str(content)[: protocol.MAX_TEXT_CHARS]}
    _submit_checked(protocol.TEXT, step, body)


def event(name: str, step: int | None = None, **attrs: Any) -> None:
    """Log a discrete event (checkpoint saved, epoch end, eval done) with attributes."""
    _submit_checked(protocol.EVENT, step, {"name": name, "attrs": attrs})


def config(params: Mapping[str, Any]) -> None:
    """Record the run's configuration (hyperparameters); stored in run.json."""
    _submit_checked(protocol.CONFIG, None, {"params": dict(params)})


def tensor(name: str, value: Any, step: int | None = None) -> None:
    """Ship a tensor or numpy array (at most 8 MiB) for the agent to analyse."""
    _submit_tensor(name, value, step, {})


def histogram(name: str, values: Any, step: int | None = None, bins: int | None = None) -> None:
    """Have the agent histogram ``values`` (weights, gradients, activations).

    Large tensors are subsampled to 8,192 random elements on their own device
    (an asynchronous gather, no host sync); binning happens in the agent.
    """
    _submit_tensor(name, values, step, {"as": "histogram", "bins": bins})


_features = FeatureSampler()


def features(
    name: str,
    tensor: Any,
    step: int | None = None,
    *,
    every: int = 100,
    max_rows: int = DEFAULT_MAX_ROWS,
    pair: str | None = None,
) -> None:
    """Ship a representation batch (rows = samples, a tensor or numpy array) for rank,
    collapse and t-SNE.

    Every ``every`` steps (or calls, without ``step``), at most ``max_rows``
    rows chosen on the tensor's device. ``pair="student"`` on a teacher's
    features takes the same rows as the student's call at the same step.
    """
    client = _live_client()
    if client is None:
        return
    try:
        if not _features.due(name, step, every):
            return
        rows = _features.sample(name, tensor, step, max_rows, pair)
        body: dict[str, Any] = {
            "name": name,
            "value": values.capture_tensor(rows) if values.is_tensor(rows) else rows,
            "as": "features",
        }
        if pair is not None:
            body["pair"] = pair
        client.submit(protocol.TENSOR, step, body)
    except Exception as exc:
        internal.record(exc, "features")


def evaluate_lm(
    model: Any,
    batches: Iterable[tuple[Any, Any]],
    step: int | None = None,
    *,
    prefix: str = "val/",
    ignore_index: int = -100,
) -> dict[str, Any]:
    """Validation loss, perplexity and top-1 accuracy of a language model, logged.

    Runs ``model`` in eval mode without gradients over ``(inputs, targets)``
    batches, sums on the device and logs ``val/loss``, ``val/perplexity`` and
    ``val/accuracy`` as tensors (no host sync). Returns those three tensors.
    """
    from probe.evaluation import evaluate_lm as run

    return run(model, batches, log=log, step=step, prefix=prefix, ignore_index=ignore_index)


def benchmark_inference(
    model: Any,
    example_input: Any,
    *,
    batch_sizes: Sequence[int] = (1, 8, 32),
    warmup: int = 3,
    iters: int = 20,
    quantize: bool = True,
    step: int | None = None,
) -> dict[str, Any]:
    """Latency p50/p90/p99, throughput and peak memory per batch size, and the effect of
    dynamic int8 quantization (CPU), logged under ``inference/`` and returned.

    Runs on the caller's thread and waits for every forward: a benchmark the user
    asks for, outside the training loop (docs/inference.md). ``example_input``
    (batch first, often batch 1) is repeated along dim 0 for each batch size; int8
    outputs are compared with fp32 on all its rows. A model
    that fails leaves ``error`` in the result instead of raising; bad arguments
    raise ``ValueError``.
    """
    from probe import inference  # the module imports torch only when called

    inference.check_arguments(batch_sizes, warmup, iters)
    return inference.benchmark_inference(
        model,
        example_input,
        log=log,
        event=event,
        batch_sizes=batch_sizes,
        warmup=warmup,
        iters=iters,
        quantize=quantize,
        step=step,
    )


def _submit_tensor(name: str, value: Any, step: int | None, extra: dict[str, Any]) -> None:
    client = _live_client()
    if client is None:
        return
    try:
        histogram = extra.get("as") == "histogram"
        if values.is_tensor(value):
            if histogram:
                value = values.sample_tensor(value, values.HISTOGRAM_SAMPLE)
            if value.numel() * value.element_size() > protocol.MAX_TENSOR_BYTES:
                client.drop(protocol.DROP_TOO_LARGE)
                internal.warn_once(
                    f"too-large:{name}",
                    "outrider probe: tensor %r is over %d bytes and was dropped; "
                    "subsample it first",
                    name,
                    protocol.MAX_TENSOR_BYTES,
                )
                return
            value = values.capture_tensor(value)
        elif histogram:
            value = values.sample_array(value, values.HISTOGRAM_SAMPLE)
        else:
            value = value.copy()
        body = {"name": name, "value": value}
        body.update((key, item) for key, item in extra.items() if item is not None)
        client.submit(protocol.TENSOR, step, body)
    except Exception as exc:
        internal.record(exc, "tensor")


def _submit_histograms(names: list[str], samples: list[Any], step: int | None) -> None:
    """Ship many bounded histogram samples (``probe.watch``'s) as a few batch records.

    The agent splits each batch by ``lengths`` and bins every histogram, as it
    does for ``probe.histogram``.
    """
    client = _live_client()
    if client is None:
        return
    try:
        for batch_names, lengths, vector in values.concat_samples(names, samples):
            body = {
                "name": "histograms",
                "value": values.capture_fresh(vector),
                "as": "histograms",
                "names": batch_names,
                "lengths": lengths,
            }
            client.submit(protocol.TENSOR, step, body)
    except Exception as exc:
        internal.record(exc, "histograms")


_watchers: list[Any] = []


class _Unwatched:
    """What ``watch`` returns while telemetry is off: the same methods, doing nothing."""

    step = 0

    def data(self, loader: Iterable[Any]) -> Iterator[Any]:
        return iter(loader)

    def unwatch(self) -> None:
        pass


def watch(
    model: Any,
    optimizer: Any = None,
    *,
    log_every: int = 1,
    layer_every: int = 10,
    hist_every: int = 100,
    activations_every: int = 100,
    batch_size: int | None = None,
    tokens_per_step: int | None = None,
    start_step: int = 0,
) -> Any:
    """Collect training telemetry from ``model`` and ``optimizer`` through hooks.

    Every optimizer step: step time and throughput (given ``batch_size`` or
    ``tokens_per_step``). Every ``log_every`` steps: learning rates, the global
    and per-group gradient norm (before clipping), a non-finite flag, CUDA memory.
    Every ``layer_every``: per-parameter gradient and weight norms and the
    update-to-weight ratio per group. Every ``hist_every``: weight and gradient
    histograms. Every ``activations_every``: mean, std and fraction of zeros of
    each leaf module's output, and a histogram of it. 0 switches a kind off.
    Without an optimizer (a hand-written update), a step is a backward and the
    update after it, and everything but ``lr`` is collected; a wrapped optimizer
    (accelerate, Lightning, DeepSpeed) is looked through to the torch optimizer.
    Nothing here waits for the device. Returns a watcher with ``unwatch()`` and
    ``data(loader)`` (times data waits); with telemetry off, or given something
    it cannot watch (one warning says what), it returns one that does nothing.
    A negative ``*_every`` raises ``ValueError``.
    """
    from probe.watcher import check_every  # the module itself imports no torch

    check_every(log_every, layer_every, hist_every, activations_every)
    client = _live_client()
    if client is None:
        return _Unwatched()
    try:
        hooked = _watchable(model, optimizer)
        if hooked is None:
            return _Unwatched()
        from probe.watcher import Watcher  # torch is imported only when watching

        watcher = Watcher(
            client.submit,
            _submit_histograms,
            model,
            hooked[0],
            log_every=log_every,
            layer_every=layer_every,
            hist_every=hist_every,
            activations_every=activations_every,
            batch_size=batch_size,
            tokens_per_step=tokens_per_step,
            start_step=start_step,
        )
    except Exception as exc:
        internal.record(exc, "watch")
        return _Unwatched()
    _watchers.append(watcher)
    return watcher


def _watchable(model: Any, optimizer: Any) -> tuple[Any] | None:
    """``(torch optimizer or None,)`` for ``watch`` to hook; None, after one warning,
    when ``model`` cannot be watched. An optimizer that cannot be hooked is warned
    about and left out: the model's own hooks still see the steps."""
    import torch

    from probe.watcher import find_optimizer

    if not isinstance(model, torch.nn.Module):
        internal.warn_once(
            "watch-model",
            "outrider probe: probe.watch needs a torch.nn.Module, got %s; nothing is watched",
            type(model).__name__,
        )
        return None
    try:
        found = None if optimizer is None else find_optimizer(optimizer)
    except Exception:
        found = None  # an attribute that raises: not an optimizer we can hook
    if optimizer is not None and found is None:
        internal.warn_once(
            "watch-optimizer",
            "outrider probe: probe.watch cannot hook %s (not a torch.optim.Optimizer, nor "
            "one wrapped under .optimizer or ._optimizer); watching the model alone, "
            'without lr (docs/watch.md, "Without an optimizer")',
            type(optimizer).__name__,
        )
    if found is None and not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
        internal.warn_once(
            "watch-torch",
            "outrider probe: probe.watch without a torch optimizer needs torch >= 2.1 "
            "(torch %s); nothing is watched",
            torch.__version__,
        )
        return None
    return (found,)


def unwatch() -> None:
    """Remove the hooks of every ``watch`` call."""
    while _watchers:
        _watchers.pop().unwatch()


def _submit_checked(kind: str, step: int | None, body: dict[str, Any]) -> None:
    client = _live_client()
    if client is None:
        return
    try:
        client.submit(kind, step, body)
    except Exception as exc:
        internal.record(exc, kind)


def flush(timeout: float = 5.0) -> bool:
    """Wait up to ``timeout`` s until everything logged so far is sent or counted."""
    client = _client
    if client is None:
        return True
    try:
        return client.flush(timeout)
    except Exception as exc:
        internal.record(exc, "flush")
        return False


def finish(timeout: float | None = None) -> bool:
    """Flush, send the final counters and close; later calls are no-ops.

    Runs automatically at interpreter exit, bounded to ``exit_timeout``
    (2 s by default).
    """
    global _client, _disabled, _finished
    client = _client
    if client is None:
        return True
    unwatch()
    _client = None
    _disabled = _finished = True
    try:
        return client.finish(timeout)
    except Exception as exc:
        internal.record(exc, "finish")
        return False


def stats() -> dict[str, Any]:
    """The probe's own counters (sent, dropped by reason, queue depth, errors) and its
    ``flush_window``: the seconds records gather now before they are sent."""
    client = _client
    return client.stats() if client is not None else {}


def is_enabled() -> bool:
    return _client is not None


def _reset_for_tests() -> None:
    """Forget all state, so one test process can init several times."""
    global _client, _disabled, _finished
    if _client is not None:
        _client.finish(0.5)
    _client = None
    _disabled = _finished = False
