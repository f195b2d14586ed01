"""Per-interval deltas from cumulative kernel counters, never read-and-clear.

A poll takes deltas, builds points and hands them over. If it raises on the way, the
interval must not be lost: everything a poll changes in the trackers is journaled in
the open `interval()` and undone when the poll fails, so the next poll takes the
same counts again as part of a longer interval. Steps that cannot be undone (deleting
a dead process's kernel entry after its last delta) are `defer`red to the end of a
poll that succeeded.
"""
from __future__ import annotations

import contextvars
import logging
from contextlib import contextmanager

log = logging.getLogger("sonde.delta")
_ABSENT = object()
_open: contextvars.ContextVar["Interval | None"] = contextvars.ContextVar("sonde_interval", default=None)


class Interval:
    """One poll's changes: trackers to commit or roll back, steps to run on success."""

    def __init__(self):
        self.trackers: list[DeltaTracker] = []
        self.deferred: list = []


@contextmanager
def interval():
    """Open a poll: on a clean exit the trackers keep their new reads and the deferred
    steps run; on an exception every tracker is back where it was before the poll."""
    iv = Interval()
    token = _open.set(iv)
    try:
        yield iv
    except BaseException:
        for t in iv.trackers:
            t._rollback()
        raise
    else:
        for t in iv.trackers:
            t._commit()
    finally:
        _open.reset(token)
    for step in iv.deferred:
        try:
            step()
        except Exception:  # a cleanup step: its failure must not lose the points
            log.exception("deferred step after a poll failed")


def defer(step) -> None:
    """Run `step` once the open poll has succeeded (at once when no poll is open)."""
    iv = _open.get()
    if iv is None:
        step()
    else:
        iv.deferred.append(step)


def since(prev: tuple | None, values: tuple) -> tuple:
    """values minus the previous read. A counter below its previous read means the
    entry was deleted and re-created (pid reuse, our own reclaim), so the whole value
    is new; so is everything when there is no previous read."""
    if prev is None or any(v < p for v, p in zip(values, prev)):
        return tuple(values)
    return tuple(v - p for v, p in zip(values, prev))


class DeltaTracker:
    def __init__(self):
        self._prev: dict = {}
        self._undo: dict | None = None  # key -> value before the open poll changed it

    def _note(self, key) -> None:
        iv = _open.get()
        if iv is None:
            return
        if self._undo is None:
            self._undo = {}
            iv.trackers.append(self)
        if key not in self._undo:
            self._undo[key] = self._prev.get(key, _ABSENT)

    def _commit(self) -> None:
        self._undo = None

    def _rollback(self) -> None:
        for key, old in (self._undo or {}).items():
            if old is _ABSENT:
                self._prev.pop(key, None)
            else:
                self._prev[key] = old
        self._undo = None

    def delta(self, key, values: tuple[int, ...]) -> tuple[int, ...]:
        """values minus the previous read of key. A counter below its previous read
        means the entry was deleted and re-created (pid reuse, our own reclaim), so
        the whole value is new."""
        self._note(key)
        prev = self._prev.get(key)
        self._prev[key] = values
        return since(prev, values)

    def peek(self, key, values: tuple[int, ...]) -> tuple[int, ...]:
        """What delta() would return, without taking it: the counts stay for a later poll."""
        return since(self._prev.get(key), values)

    def forget(self, key) -> None:
        if key in self._prev:
            self._note(key)
            del self._prev[key]

    def keep_only(self, keys) -> None:
        keys = set(keys)
        for k in list(self._prev):
            if k not in keys:
                self._note(k)
                del self._prev[k]
