"""``probe.integrations.lightning``'s logger and callback for the ``pytorch_lightning``
package (a Trainer accepts only its own package's loggers and callbacks)."""

from __future__ import annotations

from typing import Any

from probe.integrations import lightning

__all__ = ["PACKAGE", "OutriderCallback", "OutriderLogger", "callbacks_factory"]

# Built on first use from the framework's own base classes (module ``__getattr__`` below).
OutriderLogger: type
OutriderCallback: type

PACKAGE = "pytorch_lightning"


def callbacks_factory() -> list[Any]:
    """Lightning's ``pytorch_lightning.callbacks_factory`` entry point."""
    return lightning.automatic_callbacks(PACKAGE, __name__)


def __getattr__(name: str) -> Any:
    if name == "OutriderLogger":
        return lightning.bind(PACKAGE, __name__)[0]
    if name == "OutriderCallback":
        return lightning.bind(PACKAGE, __name__)[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
