"""The ``aggregation:`` section of the agent's config: the job tier on both ends.

A node agent reads ``forward_to`` and the uplink's bounds; an aggregator reads
``bind`` and the cross-rank statistics' settings. ``keys_dir`` and
``insecure`` apply to both: plain TCP is only ever used on loopback unless
``insecure`` says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pydantic

#: the section times a straggler is judged on, where a rank reports them
DEFAULT_SECTIONS = ("compute_seconds", "forward_seconds", "step_time_seconds")


class StragglerSettings(pydantic.BaseModel):
    """The ``stragglers:`` settings of the aggregator (docs/alerts.md, "Job alerts")."""

    model_config = pydantic.ConfigDict(extra="forbid")

    enabled: bool = True
    threshold: float = pydantic.Field(default=0.75, gt=0, le=1)
    consecutive: int = pydantic.Field(default=3, ge=1)
    floor_seconds: float = pydantic.Field(default=0.002, ge=0)
    sections: list[str] = pydantic.Field(
        default_factory=lambda: list(DEFAULT_SECTIONS), min_length=1
    )


class DivergenceSettings(pydantic.BaseModel):
    """The ``divergence:`` settings of the aggregator (docs/alerts.md, "Job alerts")."""

    model_config = pydantic.ConfigDict(extra="forbid")

    enabled: bool = True
    metrics: list[str] = pydantic.Field(default_factory=lambda: ["loss", "grad_norm"])
    threshold: float = pydantic.Field(default=6.0, gt=0)
    consecutive: int = pydantic.Field(default=2, ge=1)
    relative_floor: float = pydantic.Field(default=0.01, ge=0)
    min_ranks: int = pydantic.Field(default=3, ge=3)


#: the port a job aggregator listens on when none is named (beside MASTER_ADDR's 29500)
DEFAULT_PORT = 29460


class AggregationSettings(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    forward_to: str | None = pydantic.Field(
        default=None,
        description="HOST:PORT of the job aggregator this node agent forwards to (off: None).",
    )
    bind: str = pydantic.Field(
        default=f"127.0.0.1:{DEFAULT_PORT}", description="HOST:PORT an aggregator listens on."
    )
    keys_dir: Path | None = pydantic.Field(
        default=None, description="CURVE keys made by `outrider keys` (required off loopback)."
    )
    insecure: bool = pydantic.Field(
        default=False, description="Allow plain TCP off loopback (a trusted network only)."
    )
    backlog: int = pydantic.Field(
        default=10_000, ge=1, description="Items a node agent holds while the aggregator is away."
    )
    spool_dir: Path | None = pydantic.Field(
        default=None, description="Spill the backlog's overflow to files here (off: None)."
    )
    spool_bytes: int = pydantic.Field(default=64 << 20, ge=0)
    heartbeat_seconds: float = pydantic.Field(default=2.0, gt=0)
    accounting_seconds: float = pydantic.Field(
        default=5.0, gt=0, description="How often a node agent sends its streams' accounting."
    )
    forward_raw: bool = pydantic.Field(
        default=False,
        description="Also forward every stored scalar and event line (small jobs only).",
    )
    window_wait_seconds: float = pydantic.Field(
        default=30.0,
        gt=0,
        description="How long an aggregator waits for every rank's window before judging it.",
    )
    stragglers: StragglerSettings = pydantic.Field(default_factory=StragglerSettings)
    divergence: DivergenceSettings = pydantic.Field(default_factory=DivergenceSettings)
