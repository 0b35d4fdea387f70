"""The failures ``outrider simulate`` injects, and the built-in alert each should raise.

Apart from the simulated trainer (``agent.simulation``) so that the command line
lists them without importing the trainer's numpy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    """What a failure does to the run, and the built-in alert that should catch it."""

    does: str
    raises: str | None
    ranks: int = 1  # the ranks it needs by default: above 1, a job of two node agents


FAILURES: dict[str, Failure] = {
    "healthy": Failure("nothing goes wrong", None),
    "spike": Failure("one step's loss x20, then back on the curve", "loss_spike"),
    "divergence": Failure("lr and loss climb 2% a step from then on", "loss_divergence"),
    "nan": Failure("loss, val/loss, grad_norm NaN from then on", "nonfinite"),
    "collapse": Failure("feature rows converge on one direction", "representation_collapse"),
    "stall": Failure("no records for longer than `stalled` waits", "stalled"),
    "straggler": Failure("one rank's compute twice as slow (4 ranks)", "straggler", ranks=4),
}
