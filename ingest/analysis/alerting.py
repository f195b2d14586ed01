"""The built-in alert evaluator: the same rules Grafana gets (alerts/rules.py), run
inside the agent on a schedule against the same InfluxDB.

Each evaluation runs every rule's queries over their windows ending now, computes
the formula per series (joined on the rule's labels), and steps a small state
machine per (rule, labels): `for_evals` consecutive breaches fire it, the first
evaluation without a breach resolves it. Firing and resolved transitions are
written as `sonde_alert` points and, optionally, posted to a webhook as
Alertmanager-compatible JSON, with retries.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re

import urllib3
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from sonde.ingest.output.lineproto import Point
from sonde.ingest.analysis.queries import expand

log = logging.getLogger("sonde.alerting")


def formula_value(formula: str, values: dict[str, float]) -> float:
    """Evaluate a rule formula (Grafana math syntax, `$A / $B`, comparisons give 0/1)."""
    expr = re.sub(r"\$([A-Za-z_]+)", lambda m: f"_v[{m.group(1)!r}]", formula)
    try:
        result = eval(expr, {"__builtins__": {}}, {"_v": values})  # formulas come from alerts/rules.py only
    except ZeroDivisionError:
        return math.nan
    return float(result)


def breached(op: str, value: float, threshold: float) -> bool:
    if math.isnan(value):
        return False
    return {"gt": value > threshold, "lt": value < threshold, "ge": value >= threshold}[op]


class Evaluator:
    def __init__(self, rules: dict, query, host: str, webhook_url: str | None = None):
        self.rules = rules
        self.query = query          # InfluxQL text -> /query JSON
        self.host = host
        self.webhook_url = webhook_url
        self.state: dict[tuple, dict] = {}
        self.http = urllib3.PoolManager(timeout=urllib3.Timeout(total=5), retries=False)

    def values(self, rule, now_ms: int) -> dict[tuple, float]:
        """The formula's value for every series of the rule's primary query (A)."""
        per_ref: dict[str, dict[tuple, float]] = {}
        for ref_id, ref in rule.refs.items():
            text = expand(ref.query.influxql(), start_ms=now_ms - ref.from_s * 1000, end_ms=now_ms - ref.to_s * 1000,
                          interval_s=max(1, ref.from_s - ref.to_s))
            res = self.query(text)["results"][0]
            if "error" in res:
                raise RuntimeError(f"rule {rule.name}: {res['error']}")
            out = {}
            for s in res.get("series", []):
                tags = s.get("tags", {})
                key = tuple((label, tags.get(label, "")) for label in rule.labels)
                col = s["columns"].index("value")
                v = s["values"][-1][col]
                out[key] = float(v) if v is not None else math.nan
            per_ref[ref_id] = out
        return {key: formula_value(rule.formula, {r: per_ref[r].get(key, 0.0) for r in rule.refs})
                for key in per_ref["A"]}

    def evaluate(self, now_ms: int) -> list[Point]:
        points, notify = [], []
        ts = now_ms * 1_000_000
        for rule in self.rules.values():
            try:
                values = self.values(rule, now_ms)
            except Exception as e:  # one broken rule must not stop the others
                log.error("alert rule %s: evaluation failed: %s", rule.name, e)
                continue
            seen = set()
            for key, value in values.items():
                st = self.state.setdefault((rule.name, key), {"breaches": 0, "firing": False, "since": None})
                seen.add(key)
                if breached(rule.op, value, rule.threshold):
                    st["breaches"] += 1
                    if not st["firing"] and st["breaches"] >= rule.for_evals:
                        st["firing"], st["since"] = True, now_ms
                        points.append(self._point(rule, key, value, "firing", ts))
                        notify.append((rule, key, value, "firing", st["since"], None))
                else:
                    self._resolve(rule, key, st, value, now_ms, points, notify)
            for (name, key), st in list(self.state.items()):
                if name == rule.name and key not in seen:  # the series is gone: nothing breaches
                    self._resolve(rule, key, st, math.nan, now_ms, points, notify)
        if notify and self.webhook_url:
            self._post(notify)
        return points

    def _resolve(self, rule, key, st, value, now_ms, points, notify):
        st["breaches"] = 0
        if st["firing"]:
            st["firing"] = False
            points.append(self._point(rule, key, value, "resolved", now_ms * 1_000_000))
            notify.append((rule, key, value, "resolved", st["since"], now_ms))

    def firing(self) -> list[tuple[str, dict]]:
        return [(name, dict(key)) for (name, key), st in self.state.items() if st["firing"]]

    def _point(self, rule, key, value, state, ts) -> Point:
        labels = dict(key)
        summary = rule.summary
        for k, v in labels.items():
            summary = summary.replace("{{" + k + "}}", v)
        return Point("sonde_alert", {"host": self.host, "rule": rule.name, "severity": rule.severity,
                                     "state": state},
                     {"value": 0.0 if math.isnan(value) else float(value), "labels": json.dumps(labels, sort_keys=True),
                      "summary": summary}, ts)

    def _post(self, notify) -> None:
        def iso(ms):
            return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat().replace("+00:00", "Z")
        body = []
        for rule, key, value, state, since, ended in notify:
            alert = {"labels": {"alertname": rule.name, "severity": rule.severity, "host": self.host, **dict(key)},
                     "annotations": {"summary": self._point(rule, key, value, state, 0).fields["summary"],
                                     "description": rule.why, "value": f"{value:g}"},
                     "startsAt": iso(since), "generatorURL": "sonde://alerts/" + rule.name}
            if ended:
                alert["endsAt"] = iso(ended)
            body.append(alert)
        try:
            for attempt in Retrying(retry=retry_if_exception_type(OSError), stop=stop_after_attempt(4),
                                    wait=wait_exponential(multiplier=0.5, max=5), reraise=True):
                with attempt:
                    r = self.http.request("POST", self.webhook_url, body=json.dumps(body).encode(),
                                          headers={"Content-Type": "application/json"})
                    if r.status >= 500:
                        raise OSError(f"HTTP {r.status}")
        except (OSError, urllib3.exceptions.HTTPError) as e:
            log.error("alert webhook %s failed after retries: %s", self.webhook_url, e)
