"""Where a process spent its CPU in a past window, from continuous profiling: the
`profile_stack` points (top stacks per process and interval) summed by the function
they were in. What `sonde backtrack` needs to name the function of a pinned process.

Only names the catalog declares are queried (checked at import), so a renamed field
breaks here first, not in a report.
"""
from __future__ import annotations

from dataclasses import dataclass

from sonde.ingest.runtime import catalog

STACK = catalog.MEASUREMENTS["profile_stack"]
SAMPLES = catalog.MEASUREMENTS["profile_samples"]
for _f in ("samples", "function", "frames", "truncated"):
    STACK.field(_f)
SAMPLES.field("samples")


@dataclass
class Hotspot:
    function: str
    samples: int
    share_pct: float     # of all the process's samples in the window
    frames: str          # its busiest stack, root first
    truncated: bool      # that stack was cut where frame pointers were missing


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _rows(query, q: str) -> list[dict]:
    res = query(q)["results"][0]
    if "error" in res:
        raise RuntimeError(f"{res['error']} in: {q}")
    return [dict(zip(s["columns"], v)) for s in res.get("series", []) for v in s["values"]]


def hotspots(query, start_ms: int, end_ms: int, pid: str, host: str | None = None, top: int = 3) -> list[Hotspot]:
    """The functions where process `pid` (on `host`) had the most samples in
    [start_ms, end_ms), busiest first; [] when continuous profiling was off.
    `query` takes InfluxQL and returns /query's JSON, as backtrack's does."""
    where = f'time >= {start_ms}ms AND time < {end_ms}ms AND "pid" = {_quote(pid)}'
    if host:
        where += f' AND "host" = {_quote(host)}'
    total = _rows(query, f'SELECT sum("samples") AS "samples" FROM "{SAMPLES.name}" WHERE {where}')
    total = (total[0]["samples"] or 0) if total else 0
    if not total:
        return []
    by_function: dict[str, list] = {}
    for r in _rows(query, f'SELECT "samples", "function", "frames", "truncated" FROM "{STACK.name}" WHERE {where}'):
        entry = by_function.setdefault(r["function"], [0, {}])
        entry[0] += r["samples"]
        key = (r["frames"], bool(r["truncated"]))
        entry[1][key] = entry[1].get(key, 0) + r["samples"]
    ranked = sorted(by_function.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]
    out = []
    for function, (n, stacks) in ranked:
        (frames, truncated), _ = max(stacks.items(), key=lambda kv: (kv[1], kv[0]))
        out.append(Hotspot(function, n, round(100.0 * n / total, 1), frames, truncated))
    return out


def describe(spots: list[Hotspot]) -> str:
    """One clause for a report: `in c (62% of its samples), d (38%)`."""
    if not spots:
        return ""
    parts = [f"{spots[0].function} ({spots[0].share_pct:g}% of its samples)"]
    parts += [f"{s.function} ({s.share_pct:g}%)" for s in spots[1:]]
    return "in " + ", ".join(parts)
