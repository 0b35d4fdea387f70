"""Hugging Face ``Trainer`` telemetry: ``Trainer(..., callbacks=[OutriderCallback()])``.

The callback adds almost nothing to a training step (one attribute set
before the optimizer step). What the Trainer
logs reaches ``on_log`` as floats it has already gathered and read (its own
``.item()``), and is forwarded as it is; the model and the torch optimizer
under accelerate's wrapper are watched with ``probe.watch``, whose hooks do
no host sync. Every rank watches; only the world's process zero forwards
logs, configuration and events, which are the same on every rank.

Importing this module imports transformers; ``import probe`` does not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import probe
from probe import internal, values
from probe.integrations.plain import plain_config
from probe.watcher import check_every

__all__ = ["EVALUATE_EVENT", "SAVE_EVENT", "OutriderCallback"]

EVALUATE_EVENT = "evaluate"
SAVE_EVENT = "save"
DEFAULT_FLUSH_TIMEOUT = 2.0
WATCH_OPTIONS = frozenset(
    {"log_every", "layer_every", "hist_every", "activations_every", "batch_size", "tokens_per_step"}
)


class OutriderCallback(TrainerCallback):
    """Sends a ``Trainer``'s configuration, logs, evaluations and saves to outrider, and
    watches its model and optimizer.

    ``watch_options`` go to ``probe.watch`` (``log_every``, ``layer_every``,
    ``hist_every``, ``activations_every``, ``tokens_per_step``); ``watch=False``
    forwards the Trainer's logs alone. ``flush_timeout`` bounds the wait at
    the end of training for what is still queued; what is not sent by then
    goes on in the background (and is counted as dropped if exit cuts it off).
    """

    def __init__(
        self,
        *,
        watch: bool = True,
        flush_timeout: float = DEFAULT_FLUSH_TIMEOUT,
        **watch_options: Any,
    ) -> None:
        if flush_timeout < 0:
            raise ValueError(f"flush_timeout must be >= 0, got {flush_timeout}")
        unknown = sorted(set(watch_options) - WATCH_OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown probe.watch option(s) {', '.join(unknown)}; the callback takes "
                f"{', '.join(sorted(WATCH_OPTIONS))} (steps are the Trainer's global_step)"
            )
        check_every(
            watch_options.get("log_every", 1),
            watch_options.get("layer_every", 10),
            watch_options.get("hist_every", 100),
            watch_options.get("activations_every", 100),
        )
        self.watch = watch
        self.flush_timeout = flush_timeout
        self.watch_options = watch_options
        self.watcher: Any = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """The run's configuration (the training arguments over the model's config, as
        the Trainer's own trackers merge them), and hooks on the model and optimizer."""
        if state.is_world_process_zero:
            configuration = _configuration(args, model)
            if configuration:
                probe.config(configuration)
        self._unwatch()  # a second train() with the same callback
        if not self.watch or model is None:
            return
        try:
            options = {
                "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps,
                **self.watch_options,
            }
        except Exception as exc:
            internal.record(exc, "transformers: watch options")
            options = dict(self.watch_options)
        # The watcher numbers a step as the Trainer's global_step after it, so its
        # grad_norm and the Trainer's logged one land on the same step.
        self.watcher = probe.watch(model, optimizer, start_step=state.global_step + 1, **options)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Keep the watcher on the Trainer's step count: a step a loss scaler skips runs
        no optimizer hook, but the Trainer still counts it."""
        if self.watcher is not None:
            self.watcher.step = state.global_step + 1

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if state.is_world_process_zero and logs:
            numbers = _numbers(logs)
            if numbers:
                probe.log(numbers, step=state.global_step)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """An ``evaluate`` event with the evaluation's numbers (they also arrive as
        scalars through ``on_log``)."""
        if state.is_world_process_zero:
            numbers = {k: v for k, v in _numbers(metrics or {}).items() if not values.is_tensor(v)}
            probe.event(EVALUATE_EVENT, step=state.global_step, **numbers)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """A ``save`` event naming the checkpoint directory the Trainer just wrote."""
        if state.is_world_process_zero:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            path = os.path.abspath(os.path.join(args.output_dir or "", folder))
            probe.event(SAVE_EVENT, step=state.global_step, path=path)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Remove the hooks and wait, at most ``flush_timeout`` seconds, until what
        training logged is sent; the probe stays open for evaluations after it."""
        self._unwatch()
        probe.flush(self.flush_timeout)

    def _unwatch(self) -> None:
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            try:
                watcher.unwatch()
            except Exception as exc:
                internal.record(exc, "transformers: unwatch")


def _numbers(logs: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of a Trainer log (floats from the Trainer; a tensor a user's own
    ``trainer.log`` passes is left for the probe to read off the training thread).
    Strings, None and the like are left out."""
    return {
        name: value
        for name, value in logs.items()
        if isinstance(name, str)
        and (
            (isinstance(value, (int, float)) and not isinstance(value, bool))
            or (values.is_tensor(value) and value.numel() == 1)
        )
    }


def _configuration(args: TrainingArguments, model: Any) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    try:
        model_config = getattr(model, "config", None)
        if model_config is not None and hasattr(model_config, "to_dict"):
            merged.update(model_config.to_dict())
        merged.update(args.to_dict())  # type: ignore[no-untyped-call]  # untyped in transformers
        return plain_config(merged)
    except Exception as exc:
        internal.record(exc, "transformers: config")
        return {}
