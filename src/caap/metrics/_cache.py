"""A per-batch memo shared by metric instances, so that metrics scoring the same batch share forward passes.

The Lightning module updates every metric with the same `AttributionBatch` object; results computed for that
object (keyed by what they depend on: the model's identity and the perturbation settings) live exactly as
long as it does (a `weakref.finalize` drops them), so no forward pass is repeated within a batch and nothing
leaks across batches. The model is assumed unchanged while one batch is being scored.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any


class BatchCache:
    """`get(batch, key, compute)`: `compute()` once per (batch object, key)."""

    def __init__(self) -> None:
        self._store: dict[int, dict[Hashable, Any]] = {}

    def entry(self, batch: object) -> dict[Hashable, Any]:
        """The memo dict of `batch` (created on first use, dropped when the batch is garbage-collected)."""
        bid = id(batch)
        memo = self._store.get(bid)
        if memo is None:
            memo = self._store[bid] = {}
            weakref.finalize(batch, self._store.pop, bid, None)
        return memo

    def get(self, batch: object, key: Hashable, compute: Callable[[], Any]) -> Any:
        memo = self.entry(batch)
        if key not in memo:
            memo[key] = compute()
        return memo[key]

    def clear(self) -> None:
        self._store.clear()


BATCH_CACHE = BatchCache()
"""The process-wide cache the faithfulness metrics share."""
