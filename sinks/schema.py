"""The stored-entry schema: what the run store writes and every sink reads.

One owner for the format of a ``metrics.jsonl`` line (docs/protocol.md): the
entry kinds, the stream a batch came from, the batch a sink receives, the
spelling of numbers JSON cannot hold, and the flat metric names of a host
sample. The agent writes with these and the sinks read with them, so a kind
or a spelling is defined here once. Imports nothing of ``agent``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from probe import protocol

# -- entry kinds -------------------------------------------------------------------------------
# A trainer's records are stored under their wire kind (probe.protocol: scalars, tensor, text,
# event, config, hello, heartbeat, probe_stats, bye, run_end); the agent adds these.
ALERT: Final = "alert"  # a fired alert rule, or a sink's own alarm
IMAGE: Final = "image"  # a PNG the analysis drew (feature map, dashboard)
SUMMARY: Final = "summary"  # a window or epoch summary of a stream's scalars
SYSTEM: Final = "system"  # one host sample (CPU, memory, disks, network, GPUs, trainers)
HISTOGRAM: Final = "histogram"  # a tensor binned at store time (weights, gradients)

AGENT_KINDS: Final = frozenset({ALERT, IMAGE, SUMMARY, SYSTEM, HISTOGRAM})
KINDS: Final = protocol.KINDS | AGENT_KINDS

#: entry kinds the training code made (a ``histogram`` is a stored ``tensor``): their
#: arrival means the loop is alive. Heartbeats and probe counters come from the sender
#: thread, so they keep coming from a hung loop and do not count.
TRAINER_KINDS: Final = frozenset(
    {
        protocol.SCALARS,
        protocol.TENSOR,
        protocol.TEXT,
        protocol.EVENT,
        protocol.CONFIG,
        HISTOGRAM,
    }
)

#: the ``event`` entries the agent stores for each checked checkpoint (docs/checkpoints.md)
CHECKPOINT_VERIFIED: Final = "checkpoint_verified"  # whole: path, size, sha256 (best)
CHECKPOINT_FAILED: Final = "checkpoint_failed"  # missing, another size, not a torch archive
CHECKPOINT_SKIPPED: Final = "checkpoint_skipped"  # rotated away by its saver before the check

#: the stream id of entries the agent made itself (alerts, summaries, derived statistics)
AGENT_STREAM: Final = "agent"


@dataclass(frozen=True)
class Source:
    """The stream a batch came from (the wire envelope)."""

    run: str
    stream: str
    rank: int
    local_rank: int
    world_size: int
    host: str
    pid: int

    @classmethod
    def from_envelope(cls, envelope: Mapping[str, Any]) -> Source:
        """The wire envelope's identity fields (probe.protocol.ENVELOPE_KEYS)."""
        return cls(**{key: envelope[key] for key in protocol.ENVELOPE_KEYS})


@dataclass(frozen=True)
class Batch:
    """Stored entries from one stream, in arrival order; ``run_dir`` is the run's directory."""

    source: Source
    entries: Sequence[dict[str, Any]]
    run_dir: str


# -- numbers JSON cannot hold -----------------------------------------------------------------
NAN: Final = "NaN"
INFINITY: Final = "Infinity"
NEGATIVE_INFINITY: Final = "-Infinity"

_ENCODED: Final = {math.inf: INFINITY, -math.inf: NEGATIVE_INFINITY}
#: what ``decode_number`` reads: the spellings above, and Python's ``str()`` of a non-finite
#: float, which earlier agents wrote for derived statistics
_DECODED: Final = {
    NAN: math.nan,
    INFINITY: math.inf,
    NEGATIVE_INFINITY: -math.inf,
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
}


def encode_number(value: float) -> float | str:
    """A float as stored: itself, or ``"NaN"`` / ``"Infinity"`` / ``"-Infinity"``.

    JSON has no non-finite numbers; these are the strings ``float()`` and
    JavaScript's ``Number()`` both read back.
    """
    if value != value:
        return NAN
    return _ENCODED.get(value, value)


def decode_number(value: Any) -> float | None:
    """A stored number as a float (non-finite spellings included); None for anything else."""
    kind = type(value)
    if kind is float or kind is int:
        return float(value)
    if kind is str:
        return _DECODED.get(value)
    return None


# -- host samples as metrics ---------------------------------------------------------------------
# Keys of a sample that are not measurements (flatten leaves them out).
_NOT_MEASURED: Final = frozenset({"kind", "host", "t", "step", "rank", "seq", "stream", "source"})


def flatten(entry: Mapping[str, Any]) -> dict[str, float]:
    """A ``system`` entry as flat metric names and numbers.

    ``system/<field>`` for host fields (``system/cpu_percent``,
    ``system/memory_used_bytes``, ``system/disk_write_bytes_per_s``, ...),
    ``system/process/<pid>/<field>`` for each watched trainer
    (``cpu_percent``, ``rss_bytes``, ``threads``, ``children``) and
    ``system/gpu<index>/<field>`` for each GPU (``util_percent``,
    ``temperature_c``, ``memory_used_bytes``, ...). Only numbers are kept
    (names, uuids and the ``gone`` list are not), so a field a host or GPU
    does not report is simply absent. Works on run-store lines as read back.
    """
    flat: dict[str, float] = {}
    for key, value in entry.items():
        if key not in _NOT_MEASURED and _is_number(value):
            flat[f"system/{key}"] = float(value)
    for process in _mappings(entry.get("processes")):
        pid = process.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool):
            continue
        for key, value in process.items():
            if key != "pid" and _is_number(value):
                flat[f"system/process/{pid}/{key}"] = float(value)
    for gpu in _mappings(entry.get("gpus")):
        index = gpu.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            continue
        for key, value in gpu.items():
            if key != "index" and _is_number(value):
                flat[f"system/gpu{index}/{key}"] = float(value)
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _mappings(value: Any) -> list[Mapping[str, Any]]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, Mapping)]
