"""The suite's catalogue: healthy runs of every family, optimiser and schedule, the
failure scenarios, which alert rule should catch each failure, and the agent
config the runs use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: which built-in rule should catch each failure (any one of them counts)
EXPECTED_RULES: dict[str, tuple[str, ...]] = {
    "nan": ("nonfinite",),
    "spike": ("loss_spike",),
    "divergence": ("loss_divergence",),
    "exploding": ("grad_explosion",),
    "vanishing": ("grad_vanishing",),
    "plateau": ("loss_plateau",),
    "overfitting": ("overfitting",),
    "collapse": ("representation_collapse",),
    "leak": ("memory_leak",),
    "stall": ("stalled",),
    "death": ("run_died",),
}

#: failures after which training is healthy again: any other warning+ alert is a false alarm
RECOVERS: dict[str, frozenset[str]] = {"spike": frozenset({"loss_spike", "grad_explosion"})}

#: seconds per step at least: ~40 steps/s, so that 1,000 steps last longer than the
#: shortened memory-trend window and warm-up below
STEP_SECONDS = 0.025

#: the agent's config for every run: the defaults, with the rules that wait for minutes
#: (stalled, memory_leak) shortened to fit runs of ~30 s, and no t-SNE maps or dashboards
#: (CPU the rules do not need)
AGENT_CONFIG = """\
stats:
  feature_map: "off"
  dashboard_seconds: 0
system:
  interval: 0.5
alerts:
  rules:
    stalled:
      after_seconds: 15
    memory_leak:
      window_seconds: 15
      warmup_seconds: 5
      buckets: 15
"""
#: long enough for the shortened ``stalled`` rule (15 s) with margin for a loaded machine
STALL_SECONDS = 22.0


@dataclass(frozen=True)
class Scenario:
    """One run: a family trained with an optimiser and schedule, maybe broken at ``onset``."""

    name: str
    family: str
    optimizer: str
    schedule: str
    lr: float
    failure: str = "none"
    onset: int = 0
    steps: int = 1000
    clip: float = 0.0
    width: int | None = None

    @property
    def healthy(self) -> bool:
        return self.failure == "none"

    @property
    def expected(self) -> tuple[str, ...]:
        return EXPECTED_RULES.get(self.failure, ())

    def setup(self) -> str:
        clip = f" clip {self.clip:g}" if self.clip else ""
        return f"{self.family} {self.optimizer} {self.schedule}{clip}"

    def trainer_args(self) -> list[str]:
        args = [
            f"--family={self.family}",
            f"--optimizer={self.optimizer}",
            f"--schedule={self.schedule}",
            f"--lr={self.lr}",
            f"--clip={self.clip}",
            f"--steps={self.steps}",
            f"--failure={self.failure}",
            f"--onset={self.onset}",
            f"--step-seconds={STEP_SECONDS}",
            f"--stall-seconds={STALL_SECONDS}",
        ]
        return args + ([f"--width={self.width}"] if self.width else [])

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "expected": list(self.expected)}


HEALTHY = (
    Scenario("healthy-mlp-sgd", "mlp", "sgd", "cosine", 0.02),
    Scenario("healthy-mlp-adamw", "mlp", "adamw", "warmup-cosine", 0.003, clip=1.0),
    Scenario("healthy-cnn-sgd", "cnn", "sgd", "constant", 0.03),
    Scenario("healthy-cnn-adamw", "cnn", "adamw", "cosine", 0.003, clip=1.0),
    Scenario("healthy-lstm-adamw", "lstm", "adamw", "warmup-cosine", 0.01, clip=1.0),
    Scenario("healthy-lstm-sgd", "lstm", "sgd", "constant", 0.5, clip=1.0),
    Scenario("healthy-simsiam-sgd", "simsiam", "sgd", "cosine", 0.05),
    Scenario("healthy-simsiam-adamw", "simsiam", "adamw", "constant", 0.002),
)

FAILURES = (
    Scenario("nan", "mlp", "adamw", "constant", 0.003, "nan", onset=250, steps=500),
    Scenario("spike", "mlp", "sgd", "cosine", 0.02, "spike", onset=400, clip=1.0),
    Scenario("divergence", "mlp", "sgd", "constant", 0.02, "divergence", onset=300, steps=800),
    Scenario("exploding", "lstm", "sgd", "constant", 0.5, "exploding", onset=300, steps=600),
    Scenario("vanishing", "mlp", "adamw", "constant", 0.003, "vanishing", onset=250, steps=600),
    Scenario("plateau", "cnn", "sgd", "constant", 0.03, "plateau", onset=300),
    Scenario("overfitting", "mlp", "adamw", "constant", 0.003, "overfitting", 200, width=512),
    Scenario("collapse", "simsiam", "adamw", "constant", 0.002, "collapse", onset=300),
    Scenario("leak", "mlp", "sgd", "cosine", 0.02, "leak", onset=200),
    Scenario("stall", "mlp", "adamw", "constant", 0.003, "stall", onset=200, steps=400),
    Scenario("death", "cnn", "adamw", "constant", 0.003, "death", onset=200, steps=400),
)

SCENARIOS = {scenario.name: scenario for scenario in (*FAILURES, *HEALTHY)}

#: what CI runs (tests/e2e/test_failure_suite.py): the failures today's rules catch in
#: seconds, and two healthy runs
QUICK = ("stall", "leak", "spike", "nan", "death", "healthy-mlp-adamw", "healthy-cnn-sgd")
