"""PyTorch Lightning: the scalars Lightning logs, the model watched, the step loss.

``OutriderLogger`` takes what Lightning hands its loggers (the metrics of
``self.log``, already turned into floats by Lightning and reduced across ranks
where ``sync_dist=True``; the hyperparameters; each saved checkpoint) on global
rank 0, as Lightning's own loggers do. ``OutriderCallback`` starts the probe
with the trainer's ranks, calls ``probe.watch`` on the model and its torch
optimizer when training starts, and logs every rank's step loss as a tensor.
Neither reads a tensor on the host nor adds a collective.

``callbacks_factory`` is Lightning's ``lightning.pytorch.callbacks_factory``
entry point: under ``outrider run`` every Trainer gets the callback without a
code change (one the user added takes its place). ``import probe`` imports
neither torch nor Lightning; this module imports Lightning when a class is
first asked for. ``probe.integrations.pytorch_lightning`` gives the same
classes for the ``pytorch_lightning`` package.
"""

from __future__ import annotations

import functools
import importlib
import os
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

import probe
from probe import internal, protocol
from probe.checkpoint import CHECKPOINT_EVENT
from probe.integrations.plain import plain_config
from probe.watcher import check_every

__all__ = ["PACKAGE", "OutriderCallback", "OutriderLogger", "callbacks_factory"]

# Built on first use from the framework's own base classes (module ``__getattr__`` below).
OutriderLogger: type
OutriderCallback: type

PACKAGE = "lightning.pytorch"
#: the event ``finalize`` sends: Lightning's status at the end of fit, validate or test
TRAINER_END_EVENT = "trainer_end"
_LOGGER_METHODS_ON_RANK_ZERO = (
    "log_metrics",
    "log_hyperparams",
    "after_save_checkpoint",
    "finalize",
)


class LoggerBody:
    """What ``OutriderLogger`` does; the class Lightning sees adds its ``Logger`` base."""

    def __init__(self, name: str = "outrider", version: str | int | None = None) -> None:
        super().__init__()
        self._name = name
        self._version = version

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str | int | None:
        """The outrider run id (``outrider run`` sets it), unless one was given."""
        return self._version if self._version is not None else os.environ.get(protocol.ENV_RUN_ID)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """The floats Lightning converted (reduced with ``sync_dist``), passed on as they are."""
        probe.log(metrics, step=step)

    def log_hyperparams(
        self, params: Mapping[str, Any] | Namespace, *args: Any, **kwargs: Any
    ) -> None:
        """Into run.json: nested maps flattened to ``a/b``, anything not JSON-like as text."""
        try:
            probe.config(plain_params(vars(params) if isinstance(params, Namespace) else params))
        except Exception as exc:
            internal.record(exc, "lightning: hyperparameters")

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """A ``checkpoint`` event for the file just saved, which the agent checks.

        Its step is Lightning's ``global_step`` (optimizer steps done), as in the
        file's name. A path that is not a local file (a remote URL, an asynchronous
        save still under way) sends nothing.
        """
        path = getattr(checkpoint_callback, "_last_checkpoint_saved", None)
        if not isinstance(path, str) or not path:
            return
        try:
            size = os.stat(path).st_size
        except OSError:
            return
        step = getattr(checkpoint_callback, "_last_global_step_saved", None)
        probe.event(
            CHECKPOINT_EVENT,
            step=step if isinstance(step, int) else None,
            path=os.path.abspath(path),
            size=size,
        )

    def save(self) -> None:
        """Nothing: Lightning calls it after every ``log_metrics``, and the probe never waits."""

    def finalize(self, status: str) -> None:
        """A ``trainer_end`` event with Lightning's status (``success``, ``failed``, ...)."""
        probe.event(TRAINER_END_EVENT, status=status)


def plain_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters as the agent takes them: nested maps flattened to ``a/b``, values
    made plain (``plain_config``: a tensor described by its shape and dtype, never read)."""
    return plain_config(_flattened(params, ""))


def _flattened(params: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Namespace):
            value = vars(value)
        if isinstance(value, Mapping):
            flat.update(_flattened(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


class CallbackBody:
    """What ``OutriderCallback`` does; the class Lightning sees adds its ``Callback`` base.

    The ``*_every`` and throughput arguments are ``probe.watch``'s; ``log_loss=False``
    leaves the loss to the trainer's own ``probe.log``.
    """

    def __init__(
        self,
        *,
        log_every: int = 1,
        layer_every: int = 10,
        hist_every: int = 100,
        activations_every: int = 100,
        batch_size: int | None = None,
        tokens_per_step: int | None = None,
        log_loss: bool = True,
        automatic: bool = False,
    ) -> None:
        super().__init__()
        check_every(log_every, layer_every, hist_every, activations_every)
        self.watch_options: dict[str, Any] = {
            "log_every": log_every,
            "layer_every": layer_every,
            "hist_every": hist_every,
            "activations_every": activations_every,
            "batch_size": batch_size,
            "tokens_per_step": tokens_per_step,
        }
        self.log_loss = log_loss
        self.automatic = automatic  # added by the entry point, not by the user
        self.active = True
        self.watcher: Any = None
        self._loss: Any = None  # the micro-batch losses of the step so far (accumulation)
        self._global_step = 0
        self._watch_due = False  # watch at the next training batch

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Start the probe with the trainer's ranks (Lightning's launcher sets no ``RANK``)."""
        try:
            others = [
                cb for cb in trainer.callbacks if cb is not self and getattr(cb, "_outrider", False)
            ]
            self.active = not (self.automatic and others)
            if self.active:
                probe.init(
                    rank=trainer.global_rank,
                    local_rank=trainer.local_rank,
                    world_size=trainer.world_size,
                )
        except Exception as exc:
            internal.record(exc, "lightning")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._stop_watching()
        self._loss = None
        self._global_step = trainer.global_step
        self._watch_due = True

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        """Watch the model and the torch optimizer before the first batch, counting steps
        as Lightning's loggers do (final here, also in a fit resumed from a checkpoint)."""
        if not (self.active and self._watch_due):
            return
        self._watch_due = False
        try:
            if self.automatic and probe._watchers:
                return  # the trainer watches the model itself
            optimizers = trainer.optimizers
            self.watcher = probe.watch(
                pl_module,
                optimizers[0] if optimizers else None,
                start_step=logging_step(trainer),
                **self.watch_options,
            )
        except Exception as exc:
            internal.record(exc, "lightning")

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """The step's loss, a tensor (the probe reads it off the training thread).

        Under gradient accumulation Lightning hands each micro-batch's loss divided
        by the number of micro-batches; their sum, kept on the device, is logged
        once the optimizer has stepped.
        """
        if not (self.active and self.log_loss):
            return
        try:
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if loss is None or not (hasattr(loss, "detach") or isinstance(loss, int | float)):
                return
            if hasattr(loss, "detach"):
                loss = loss.detach()
            if not pl_module.automatic_optimization:
                probe.log({"loss": loss}, step=logging_step(trainer))
                return
            self._loss = loss if self._loss is None else self._loss + loss
            if trainer.global_step != self._global_step:  # the optimizer stepped
                self._global_step = trainer.global_step
                probe.log({"loss": self._loss}, step=logging_step(trainer))
                self._loss = None
        except Exception as exc:
            internal.record(exc, "lightning")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._stop_watching()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._stop_watching()

    def _stop_watching(self) -> None:
        watcher, self.watcher = self.watcher, None
        if watcher is None:
            return
        try:
            watcher.unwatch()
            if watcher in probe._watchers:
                probe._watchers.remove(watcher)
        except Exception as exc:
            internal.record(exc, "lightning")


def logging_step(trainer: Any) -> int:
    """The step Lightning gives its loggers during training: the batches that stepped an
    optimizer so far, one per batch whatever the number of optimizers (``global_step``
    counts each optimizer's steps)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)
    return step if isinstance(step, int) else int(trainer.global_step)


def under_outrider_run() -> bool:
    """``outrider run`` set the agent's endpoint and telemetry is not switched off."""
    disabled = os.environ.get(protocol.ENV_DISABLED, "") not in ("", "0", "false")
    return bool(os.environ.get(protocol.ENV_ENDPOINT)) and not disabled


@functools.cache
def bind(package: str, module: str) -> tuple[type, type]:
    """``(OutriderLogger, OutriderCallback)`` on ``package``'s ``Logger`` and ``Callback``
    (``lightning.pytorch`` or ``pytorch_lightning``), named as attributes of ``module``.

    The logger's methods are wrapped in that package's ``rank_zero_only``, whose rank
    its Trainer sets.
    """
    framework = importlib.import_module(package)
    rank_zero_only = importlib.import_module(f"{package}.utilities.rank_zero").rank_zero_only
    gated = {
        name: rank_zero_only(getattr(LoggerBody, name)) for name in _LOGGER_METHODS_ON_RANK_ZERO
    }
    logger = type(
        "OutriderLogger",
        (LoggerBody, framework.loggers.Logger),
        {"__module__": module, "__doc__": LoggerBody.__doc__, **gated},
    )
    callback = type(
        "OutriderCallback",
        (CallbackBody, framework.Callback),
        {"__module__": module, "__doc__": CallbackBody.__doc__, "_outrider": True},
    )
    return logger, callback


def automatic_callbacks(package: str, module: str) -> list[Any]:
    """The entry point's answer: the callback under ``outrider run``, else nothing.

    Never raises: Lightning calls it while building the Trainer.
    """
    try:
        if not under_outrider_run():
            return []
        return [bind(package, module)[1](automatic=True)]
    except Exception as exc:
        internal.record(exc, "lightning")
        return []


def callbacks_factory() -> list[Any]:
    """Lightning's ``lightning.pytorch.callbacks_factory`` entry point."""
    return automatic_callbacks(PACKAGE, __name__)


def __getattr__(name: str) -> Any:
    if name == "OutriderLogger":
        return bind(PACKAGE, __name__)[0]
    if name == "OutriderCallback":
        return bind(PACKAGE, __name__)[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
