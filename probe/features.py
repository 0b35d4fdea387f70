"""Representation batches for the agent's rank / collapse / t-SNE statistics.

``probe.features`` ships at most ``max_rows`` rows of a (batch, dim) tensor,
chosen on the tensor's own device (an asynchronous gather, no host sync).
Two streams named as a pair (student and teacher) get the same rows at the
same step, so the agent can compare them row by row.
"""

from __future__ import annotations

from typing import Any

from probe import protocol, values

DEFAULT_MAX_ROWS = 2048


class FeatureSampler:
    """Decides when a stream is due and which rows it ships."""

    def __init__(self) -> None:
        self._calls: dict[str, int] = {}
        self._rows: dict[tuple[str, int | None], Any] = {}  # (pair name, step) -> row index

    def due(self, name: str, step: int | None, every: int) -> bool:
        """Every ``every`` steps (by ``step`` when given, else by call count)."""
        count = self._calls.get(name, 0)
        self._calls[name] = count + 1
        position = step if step is not None else count
        return every <= 1 or position % every == 0

    def sample(
        self, name: str, tensor: Any, step: int | None, max_rows: int, pair: str | None
    ) -> Any:
        """The rows to ship, as a float32 2-d tensor on the original device (a float32
        numpy copy for a numpy array, so a trainer without torch can ship features too)."""
        if not values.is_tensor(tensor):
            return self._sample_array(name, tensor, step, max_rows, pair)
        import torch

        rows = tensor.detach().reshape(-1, tensor.shape[-1])
        if rows.dtype != torch.float32:
            rows = rows.float()
        limit = max(1, min(max_rows, protocol.MAX_TENSOR_BYTES // (4 * rows.shape[1])))
        if rows.shape[0] <= limit:
            return rows
        key = (pair or name, step)
        index = self._rows.pop(key, None) if pair else None
        if index is None or index.device != rows.device or int(index.numel()) != limit:
            index = torch.randperm(rows.shape[0], device=rows.device)[:limit]
            if len(self._rows) > 64:
                self._rows.clear()  # pairs not taken up; keep the cache bounded
            self._rows[(name, step)] = index
        return rows.index_select(0, index)

    def _sample_array(
        self, name: str, array: Any, step: int | None, max_rows: int, pair: str | None
    ) -> Any:
        import numpy as np

        rows = np.asarray(array, dtype=np.float32)
        rows = rows.reshape(-1, rows.shape[-1])
        limit = max(1, min(max_rows, protocol.MAX_TENSOR_BYTES // (4 * rows.shape[1])))
        if rows.shape[0] <= limit:
            return rows.copy()
        key = (pair or name, step)
        index = self._rows.pop(key, None) if pair else None
        if not isinstance(index, np.ndarray) or index.size != limit:
            index = np.random.default_rng().permutation(rows.shape[0])[:limit]
            if len(self._rows) > 64:
                self._rows.clear()
            self._rows[(name, step)] = index
        return rows[index]
