"""accelerate's tracker interface: ``Accelerator(log_with=[OutriderTracker()])``.

``accelerator.init_trackers(project, config)`` stores the configuration,
``accelerator.log(values, step)`` hands the values to ``probe.log`` (a tensor
is read on the probe's sender thread, not the training thread) and
``accelerator.end_training()`` waits, boundedly, until they are sent.
accelerate calls its trackers on the main process only; ``probe.watch(model,
optimizer)`` after ``accelerator.prepare`` watches every rank.

Importing this module imports accelerate and registers the tracker under the
name ``outrider`` (``Accelerator(log_with="outrider")``) with
``accelerate.tracking.register_tracker_class``, where that exists
(accelerate >= 1.16). ``import probe`` imports neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from accelerate.tracking import GeneralTracker

import probe
from probe import internal, values
from probe.integrations.plain import plain_config

__all__ = ["OutriderTracker"]

DEFAULT_FLUSH_TIMEOUT = 2.0


class OutriderTracker(GeneralTracker):  # type: ignore[misc]  # accelerate ships no types
    """An accelerate tracker that writes to outrider's agent.

    ``project_name`` (what ``init_trackers`` passes to registered trackers) is
    stored in the configuration. ``init_options`` go to ``probe.init``
    (``endpoint``, ``run_id``, ...); left out, the probe reads the environment
    ``outrider run`` sets. ``flush_timeout`` bounds ``end_training``'s wait.
    """

    name = "outrider"
    requires_logging_directory = False
    main_process_only = True

    def __init__(
        self,
        project_name: str | None = None,
        *,
        flush_timeout: float = DEFAULT_FLUSH_TIMEOUT,
        **init_options: Any,
    ) -> None:
        super().__init__()
        if flush_timeout < 0:
            raise ValueError(f"flush_timeout must be >= 0, got {flush_timeout}")
        self.project_name = project_name
        self.flush_timeout = flush_timeout
        self.init_options = init_options

    @property
    def tracker(self) -> Any:
        """The probe module: what this tracker logs through."""
        return probe

    def start(self) -> None:
        """Start the probe (``init_trackers``, main process)."""
        probe.init(**self.init_options)
        if self.project_name is not None:
            probe.config({"project_name": str(self.project_name)})

    def store_init_configuration(self, config: Mapping[str, Any]) -> None:
        probe.config(plain_config(config))

    def log(self, metrics: Mapping[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Numbers and single-element tensors as scalars (a map of them as ``name/key``),
        strings as text; anything else is left out, with one warning per name."""
        scalars, texts = _split(metrics)
        if scalars:
            probe.log(scalars, step=step)
        for name, content in texts.items():
            probe.text(name, content, step=step)

    def finish(self) -> None:
        """Wait at most ``flush_timeout`` seconds until everything logged is sent; the
        probe stays open (it finishes at exit), so later logs still go."""
        probe.flush(self.flush_timeout)


def _split(logged: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    scalars: dict[str, Any] = {}
    texts: dict[str, str] = {}
    for name, value in logged.items():
        if isinstance(value, str):
            texts[str(name)] = value
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if _is_scalar(item):
                    scalars[f"{name}/{key}"] = item
                else:
                    _skipped(f"{name}/{key}", item)
        elif _is_scalar(value):
            scalars[str(name)] = value
        else:
            _skipped(str(name), value)
    return scalars, texts


def _is_scalar(value: Any) -> bool:
    if isinstance(value, (int, float)):
        return True
    if values.is_tensor(value):
        return bool(value.numel() == 1)
    return type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0


def _skipped(name: str, value: Any) -> None:
    internal.warn_once(
        f"accelerate-skipped:{name}",
        "outrider probe: accelerator.log value %r is a %s; outrider takes numbers, "
        "single-element tensors and strings, so it is left out",
        name,
        type(value).__name__,
    )


def _register() -> None:
    """``log_with="outrider"``, through accelerate's own registry where it has one."""
    from accelerate import tracking

    register = getattr(tracking, "register_tracker_class", None)
    if register is None:
        return  # an older accelerate: log_with=[OutriderTracker()] still works
    if getattr(tracking, "LOGGER_TYPE_TO_CLASS", {}).get(OutriderTracker.name) is OutriderTracker:
        return
    register(OutriderTracker)


_register()
