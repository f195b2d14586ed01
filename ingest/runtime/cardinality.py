"""Series control. InfluxDB 1.x drops writes past max-series-per-database, so an
unbounded tag (pids under churn, peers of a busy proxy) is a correctness problem.

Two limits, both from config:
- per interval, the top N processes and top M peers per process by activity keep
  their own series; the rest fold into `other`, with exact totals;
- a hard cap on the series a host creates per window (`SeriesBudget`): a new series
  past the cap folds into `other` too.
"""
from __future__ import annotations

import threading
import time

OTHER = "other"


class SeriesBudget:
    def __init__(self, max_series: int, window_seconds: float):
        self.max_series = max_series
        self.window_seconds = window_seconds
        self._known: set[tuple] = set()
        self._window_start = time.monotonic()
        self._lock = threading.Lock()
        self.refused = 0

    def _roll(self) -> None:
        if time.monotonic() - self._window_start > self.window_seconds:
            self._known.clear()
            self._window_start = time.monotonic()

    def admit(self, keys: set[tuple], force: bool = False) -> bool:
        """Admit a group of series (one flow or process) whole, or refuse it whole."""
        with self._lock:
            self._roll()
            new = keys - self._known
            if not force and new and len(self._known) + len(new) > self.max_series:
                self.refused += 1
                return False
            self._known |= new
            return True

    def __len__(self) -> int:
        return len(self._known)


def top_n(items: list, n: int, weight) -> tuple[list, list]:
    """Split into the n heaviest and the rest, by weight(item), heaviest first."""
    ranked = sorted(items, key=weight, reverse=True)
    return ranked[:n], ranked[n:]


def fold(items: list, n: int, weight, admit) -> tuple[list, list]:
    """The per-interval cardinality rule, once for every probe: the n heaviest items by
    weight(item) that admit(item) accepts (the series budget), and the rest, which the
    caller sums into `other` so totals stay exact."""
    keep, rest = top_n(items, n, weight)
    kept = []
    for item in keep:
        (kept if admit(item) else rest).append(item)
    return kept, rest
