"""One query vocabulary for dashboards, alert rules and backtrack, built on the catalog.

Every query names a catalog measurement, fields and tags; `Query.influxql()`
refuses anything the catalog does not declare, so what Grafana shows, what an
alert evaluates and what backtrack reports are the same numbers. Queries carry
Grafana's macros (`$timeFilter`, `$__interval`, `$__interval_ms`, template
variables); `expand()` substitutes them the way Grafana does, for the built-in
evaluator and for tests that run every query against a real InfluxDB.

`$__poll_ms` is Sonde's own: the agent's poll interval in ms, which
dashboards/house.py writes into the JSON at render time (Grafana never sees it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from sonde.ingest.runtime import catalog
from sonde.ingest.errors import CatalogError


@dataclass(frozen=True)
class Query:
    measurement: str
    select: tuple[str, ...]                    # e.g. ("sum(tx_bytes)", "count(x) - sum(x) as failed")
    where: tuple[tuple[str, str], ...] = ()    # (tag, regex or $var): tag =~ /^...$/
    group_by: tuple[str, ...] = ()             # tags
    per_second: bool = False                   # divide sums by the GROUP BY interval
    # divide sums by the polls in the GROUP BY interval: a gauge summed over the series
    # GROUP BY merges (e.g. sockets of every pid), then averaged over the polls
    per_poll: bool = False
    time_bucket: bool = True                   # GROUP BY time($__interval)
    extra: str = ""                            # e.g. "fill(0)"
    alias: str = ""
    raw_conditions: tuple[str, ...] = field(default=())  # field conditions, catalog-checked names only
    exclude: tuple[tuple[str, str], ...] = ()  # (tag, regex): tag !~ /^...$/

    def check(self) -> None:
        m = catalog.MEASUREMENTS.get(self.measurement)
        if m is None:
            raise CatalogError(f"query names measurement {self.measurement!r}, which the catalog does not declare")
        for expr in self.select:
            expr = expr.split(" as ")[0]
            for name in re.findall(r"\(([a-z_0-9]+)(?:,\s*[0-9.]+)?\)", expr) or [expr]:
                if name not in m.field_names | m.tag_names and name != "*":
                    raise CatalogError(f"query on {self.measurement} names field {name!r}, not in the catalog")
        for tag, _ in self.where + self.exclude:
            if tag not in m.tag_names:
                raise CatalogError(f"query on {self.measurement} filters on tag {tag!r}, not in the catalog")
        for tag in self.group_by:
            if tag not in m.tag_names:
                raise CatalogError(f"query on {self.measurement} groups by tag {tag!r}, not in the catalog")
        for cond in self.raw_conditions:
            for name in re.findall(r'"([a-z_0-9]+)"', cond):
                if name not in m.field_names and name not in m.tag_names:
                    raise CatalogError(f"query on {self.measurement} names {name!r}, not in the catalog")

    def influxql(self) -> str:
        self.check()
        sel = []
        for item in self.select:
            expr, _, name = item.partition(" as ")
            call = r"\(([a-z_0-9]+)((?:,\s*[0-9.]+)?)\)"  # fn(field) or fn(field, N)
            fields = [m[0] for m in re.findall(call, expr)]
            col = re.sub(call, r'("\1"\2)', expr) if fields else f'"{expr}"'
            if not name:
                name = self.alias if (self.alias and len(self.select) == 1) else (fields[0] if fields else expr)
            if self.per_second:
                col = f"({col}) / ($__interval_ms / 1000)"
            elif self.per_poll:
                col = f"({col}) / ($__interval_ms / $__poll_ms)"
            sel.append(f'{col} AS "{name}"')
        conds = ["$timeFilter"]
        conds += [f'"{tag}" =~ /^{value}$/' for tag, value in self.where]
        conds += [f'"{tag}" !~ /^{value}$/' for tag, value in self.exclude]
        conds += list(self.raw_conditions)
        q = f'SELECT {", ".join(sel)} FROM "{self.measurement}" WHERE {" AND ".join(conds)}'
        groups = (["time($__interval)"] if self.time_bucket else []) + [f'"{t}"' for t in self.group_by]
        if groups:
            q += " GROUP BY " + ", ".join(groups)
        if self.extra:
            q += " " + self.extra
        return q


def _regex_value(v: str) -> str:
    return re.sub(r"([\\/.^$|?*+()\[\]{}-])", r"\\\1", v)


def expand(query: str, *, start_ms: int, end_ms: int, interval_s: float,
           variables: dict[str, str | None] | None = None, poll_s: float | None = None) -> str:
    """Grafana's macro and template substitution, for running a panel's query directly.

    A variable set to None means Grafana's "All": it matches anything (`.*`)."""
    out = query.replace("$timeFilter", f"time >= {start_ms}ms and time <= {end_ms}ms")
    if poll_s is not None:
        out = out.replace("$__poll_ms", str(int(poll_s * 1000)))
    out = out.replace("$__interval_ms", str(int(interval_s * 1000)))
    out = out.replace("$__interval", f"{int(interval_s * 1000)}ms")
    for name, value in sorted((variables or {}).items(), key=lambda kv: -len(kv[0])):
        out = out.replace(f"${name}", ".*" if value is None else _regex_value(value))
    return out


def run_batch(query, statements: list[str]) -> list[dict]:
    """Each statement's result, from one request carrying all of them (`;`-separated).

    One HTTP round trip per evaluation instead of one per statement: InfluxDB runs them
    in order and answers with a result per `statement_id`. It stops at the first
    statement that fails ("not executed" for the next, nothing for the rest), so every
    statement without a clean result is run again on its own: a broken one then gets its
    own error (also when the server refuses it outright), and the others their answer."""
    if not statements:
        return []
    try:
        got = {r.get("statement_id", i): r for i, r in enumerate(query(";\n".join(statements)).get("results", []))}
    except Exception:  # the batch as a whole (e.g. a parse error): each statement alone says which
        got = {}
    out = []
    for i, text in enumerate(statements):
        r = got.get(i)
        if r is None or "error" in r:
            try:
                r = query(text)["results"][0]
            except Exception as e:  # refused on its own (e.g. a parse error, HTTP 400): its error alone
                r = {"statement_id": i, "error": str(e).splitlines()[0] if str(e) else type(e).__name__}
        out.append(r)
    return out
