"""The decode step every probe shares: rows + previous state -> points + new state.

A poll is three steps: read rows (the kernel's maps, /proc), decode, commit. Decoding
is a pure function: it reads no map and no file, it does not change the state it is
given, and it returns the state the next poll starts from. The poll commits that
state only once the whole poll has succeeded (`delta.defer`), so a poll that raises
anywhere leaves every probe where it was and the next poll counts the same events
again. Golden files (tests/golden/<probe>/) run each probe's decode on literal rows.

What is regular is written here once: per-interval deltas of cumulative counters,
the per-process top-N fold into `other` within the series budget, and counter maps
keyed by process (`CounterMap`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from sonde.ingest.output.lineproto import Point
from sonde.ingest.runtime.cardinality import OTHER, SeriesBudget, fold
from sonde.ingest.runtime.delta import since


@dataclass(frozen=True)
class Context:
    """What a decode needs besides rows and state: the host tag, the poll's time, the
    top-N limits and the host's series budget (the one thing decode updates: which
    series exist is bookkeeping across probes, not counts)."""
    host: str
    ts: int
    max_processes: int = 200
    max_peers: int = 20
    budget: SeriesBudget = field(default_factory=lambda: SeriesBudget(1 << 30, 3600))


def fold_processes(measurement: str, rows: list, ctx: Context, rank: tuple[str, ...]) -> list[Point]:
    """(pid, comm, fields) rows as points: the top-N processes by the sum of the `rank`
    fields that the series budget admits keep their own series; the rest are summed
    into pid=other, comm=other, so totals stay exact."""
    keep, rest = fold(rows, ctx.max_processes, lambda r: sum(r[2][f] for f in rank),
                      lambda r: ctx.budget.admit({(measurement, r[0], r[1])}))
    points = [Point(measurement, {"host": ctx.host, "pid": pid, "comm": name}, fields, ctx.ts)
              for pid, name, fields in keep]
    if rest:
        folded = {f: sum(r[2][f] for r in rest) for f in rest[0][2]}
        ctx.budget.admit({(measurement, OTHER, OTHER)}, force=True)
        points.append(Point(measurement, {"host": ctx.host, "pid": OTHER, "comm": OTHER}, folded, ctx.ts))
    return points


@dataclass(frozen=True)
class CounterMap:
    """A BPF hash map of cumulative counters keyed by process.

    `map` is both the BPF map's name and the catalog measurement's name.
    `fields` maps catalog field -> member of the value struct.
    """
    map: str
    fields: dict[str, str]
    tgid: str = "tgid"            # key member (or the key itself when "") holding the process id
    comm: str = "comm"            # value member holding the kernel comm, for exited processes
    rank_by: tuple[str, ...] = ()  # fields whose sum ranks processes for the top-N fold

    def decode(self, rows: list, prev: Mapping[int, tuple], ctx: Context) -> tuple[list[Point], dict]:
        """rows: (tgid, name, values in `fields` order, exited). Returns the points and
        the next state (tgid -> values read): an exited process's entry is read for the
        last time, so it leaves the state."""
        new: dict[int, tuple] = {}
        per_process = []
        for tgid, name, values, exited in rows:
            d = since(prev.get(tgid), values)
            if not exited:
                new[tgid] = tuple(values)
            if any(d):
                per_process.append((str(tgid), name, dict(zip(self.fields, d))))
        return fold_processes(self.map, per_process, ctx, self.rank_by or tuple(self.fields)), new
