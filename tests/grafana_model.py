"""Grafana's own evaluation of a provisioned alert rule, for the tests: each datasource
query over its relativeTimeRange, then the rule's expression nodes as Grafana's
server-side expressions run them (pkg/expr: reduce, math, threshold), written here
from Grafana's source, not from Sonde's evaluator:

- a datasource query with no series is NoData; each InfluxDB series is one series,
  its tags the labels;
- reduce `last` with mode `dropNN`: null, NaN and ±Inf points are dropped, the last
  point left is the value; none left is NaN, which dropNN turns into null;
- math: Go float64 arithmetic (x/0 = ±Inf, 0/0 = NaN); NaN on either side of any
  operator gives NaN, null gives null; comparisons give 1 or 0; two sets of numbers
  are joined by labels (mathexp.union): equal labels, or one side without labels, or
  one label set containing the other; equal-sized unequal sets are dropped; with no
  match and exactly one number on each side, the two are combined without labels;
  NoData alone on one side makes the result NoData;
- threshold: gt/lt/gte/lte on each number, null stays null.

`evaluate()` returns {labels: (value of the condition's input, condition 0/1/None)}.
"""
from __future__ import annotations

import ast
import math
import re

from sonde.ingest.analysis.queries import expand

NODATA = "NoData"


def _labels(d) -> tuple:
    return tuple(sorted((d or {}).items()))


def _query(node: dict, influx, db: str, now_ms: int):
    rel = node["relativeTimeRange"]
    text = expand(node["model"]["query"], start_ms=now_ms - rel["from"] * 1000, end_ms=now_ms - rel["to"] * 1000,
                  interval_s=node["model"].get("intervalMs", 1000) / 1000)
    res = influx.query(text, db=db)["results"][0]
    assert "error" not in res, f"{res['error']}\n{text}"
    series = res.get("series", [])
    if not series:
        return [NODATA]
    out = []
    for s in series:
        col = s["columns"].index("value") if "value" in s["columns"] else 1
        out.append((_labels(s.get("tags")), [row[col] for row in s["values"]]))
    return out


def _reduce(series, reducer: str, mode: str):
    assert reducer == "last" and mode == "dropNN", (reducer, mode)
    if series == [NODATA]:
        return [NODATA]
    out = []
    for labels, values in series:
        kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        value = kept[-1] if kept else math.nan
        out.append((labels, None if math.isnan(value) else value))
    return out


def _go(op: str, a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    if op == "/":
        if b == 0:
            return math.nan if a == 0 else math.copysign(math.inf, a) * math.copysign(1, b)
        return a / b
    return {"+": a + b, "-": a - b, "*": a * b, ">": float(a > b), "<": float(a < b),
            ">=": float(a >= b), "<=": float(a <= b), "==": float(a == b), "!=": float(a != b)}[op]


def _num(op, a, b):
    return None if a is None or b is None else _go(op, a, b)


def _contains(big: tuple, small: tuple) -> bool:
    return set(small) <= set(big)


def _union(a, b):
    """mathexp.union for two sets of numbers."""
    if not a or not b:
        return []
    if (len(a) == 1 or len(b) == 1) and NODATA in (a[0], b[0]):
        return [NODATA]
    unions = []
    for la, va in a:
        for lb, vb in b:
            if la == lb or not la or not lb:
                labels = la or lb
            elif len(la) == len(lb):
                continue
            elif _contains(la, lb):
                labels = la
            elif _contains(lb, la):
                labels = lb
            else:
                continue
            unions.append((labels, va, vb))
    if not unions and len(a) == 1 and len(b) == 1:
        unions.append(((), a[0][1], b[0][1]))
    return unions


_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Gt: ">", ast.Lt: "<", ast.GtE: ">=",
        ast.LtE: "<=", ast.Eq: "==", ast.NotEq: "!="}


def _math(expression: str, env: dict):
    tree = ast.parse(re.sub(r"\$([A-Za-z_][A-Za-z_0-9]*)", r"v__\1", expression), mode="eval").body

    def walk(n):
        if isinstance(n, ast.Constant):
            return float(n.value)  # a scalar
        if isinstance(n, ast.Name):
            return env[n.id[3:]]
        if isinstance(n, ast.BinOp):
            return binary(_OPS[type(n.op)], walk(n.left), walk(n.right))
        if isinstance(n, ast.Compare):
            assert len(n.ops) == 1
            return binary(_OPS[type(n.ops[0])], walk(n.left), walk(n.comparators[0]))
        raise AssertionError(f"expression node {ast.dump(n)} is not in Grafana's math")

    def binary(op, a, b):
        if isinstance(a, float) and isinstance(b, float):
            return _go(op, a, b)
        if isinstance(a, float):
            return b if b == [NODATA] else [(lb, _num(op, a, vb)) for lb, vb in b]
        if isinstance(b, float):
            return a if a == [NODATA] else [(la, _num(op, va, b)) for la, va in a]
        out = []
        for u in _union(a, b):
            out.append(NODATA if u == NODATA else (u[0], _num(op, u[1], u[2])))
        return out

    return walk(tree)


def evaluate(rule: dict, influx, db: str, now_ms: int) -> dict[tuple, tuple]:
    """Run a provisioned Grafana rule's data nodes; {labels: (math value, condition)}."""
    results = {}
    for node in rule["data"]:
        m = node["model"]
        if node["datasourceUid"] != "__expr__":
            results[node["refId"]] = _query(node, influx, db, now_ms)
        elif m["type"] == "reduce":
            results[node["refId"]] = _reduce(results[m["expression"]], m["reducer"], m["settings"]["mode"])
        elif m["type"] == "math":
            results[node["refId"]] = _math(m["expression"], results)
        elif m["type"] == "threshold":
            (cond,) = m["conditions"]
            kind, (param, *_) = cond["evaluator"]["type"], cond["evaluator"]["params"]
            test = {"gt": lambda v: v > param, "lt": lambda v: v < param, "gte": lambda v: v >= param,
                    "lte": lambda v: v <= param}[kind]
            results[node["refId"]] = [x if x == NODATA else (x[0], None if x[1] is None else float(test(x[1])))
                                      for x in results[m["expression"]]]
        else:
            raise AssertionError(f"node type {m['type']} is not modelled here")
    cond_node = next(n for n in rule["data"] if n["refId"] == rule["condition"])
    values = {x[0]: x[1] for x in results[cond_node["model"]["expression"]] if x != NODATA}
    return {labels: (values.get(labels), c) for labels, c in
            (x for x in results[rule["condition"]] if x != NODATA)}
