"""Per-interval deltas from cumulative kernel counters, never read-and-clear."""
from __future__ import annotations


class DeltaTracker:
    def __init__(self):
        self._prev: dict = {}

    def delta(self, key, values: tuple[int, ...]) -> tuple[int, ...]:
        """values minus the previous read of key. A counter below its previous read
        means the entry was deleted and re-created (pid reuse, our own reclaim), so
        the whole value is new."""
        prev = self._prev.get(key)
        self._prev[key] = values
        if prev is None or any(v < p for v, p in zip(values, prev)):
            return values
        return tuple(v - p for v, p in zip(values, prev))

    def forget(self, key) -> None:
        self._prev.pop(key, None)

    def keep_only(self, keys) -> None:
        keys = set(keys)
        for k in list(self._prev):
            if k not in keys:
                del self._prev[k]
