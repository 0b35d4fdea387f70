"""What the receive loop counts: messages, records, bytes, and rejections by reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class AgentCounters:
    messages: int = 0
    records: int = 0
    bytes: int = 0
    rejected_messages: dict[str, int] = field(default_factory=dict)
    rejected_records: dict[str, int] = field(default_factory=dict)
    metric_values_over_cap: int = 0  # held back from the analysis and sinks (ingest/names.py)

    def reject(self, table: dict[str, int], reason: str, count: int = 1) -> None:
        table[reason] = table.get(reason, 0) + count

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "records": self.records,
            "bytes": self.bytes,
            "rejected_messages": dict(self.rejected_messages),
            "rejected_records": dict(self.rejected_records),
            "metric_values_over_cap": self.metric_values_over_cap,
        }
