"""The files of a run directory, by name: what readers (``outrider show``, the dashboard,
reports) open without importing the writer and its decoding and histogram code."""

from __future__ import annotations

RUN_JSON = "run.json"  # the run's identity, status and accounting, replaced atomically
METRICS = "metrics.jsonl"  # every stored line, in arrival order
ALERTS = "alerts.jsonl"  # fired alerts, also in metrics.jsonl
TENSORS = "tensors.bin"  # the bytes of stored tensors, which lines in metrics.jsonl point into
