"""The built-in alert evaluator: the same rules Grafana gets (alerts/rules.py), run
inside the agent on a schedule against the same InfluxDB.

Each evaluation runs every rule's queries over their windows ending now and computes
the formula per series the way Grafana's math expression joins them: a series takes
part only where every query the formula names has a series with the same labels. A
small state machine per (rule, labels) follows Grafana's: a breach that has lasted
`for_s` seconds fires, the first evaluation without a breach resolves.

Firing and resolved transitions are written as `sonde_alert` points. With a webhook,
every evaluation posts every firing alert again (as Prometheus does: Alertmanager
resolves an alert that is not re-sent before its `endsAt`), plus the ones that
resolved, as Alertmanager-compatible JSON, with retries. The state is kept in a file
(the agent's state_dir), so an alert that fired before a restart still resolves after
it.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import re
from pathlib import Path

import urllib3
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from sonde.ingest.output.lineproto import Point
from sonde.ingest.analysis.queries import expand, run_batch

log = logging.getLogger("sonde.alerting")

STATE_VERSION = 1
RESEND_VALID_EVALS = 4  # a firing alert's endsAt: this many evaluations ahead (Prometheus uses 4)


def formula_value(formula: str, values: dict[str, float]) -> float:
    """Evaluate a rule formula with Grafana's float semantics: `$A / $B` with x/0 = ±Inf
    and 0/0 = NaN, comparisons give 0 or 1, and NaN on either side of any operator
    gives NaN."""
    expr = re.sub(r"\$([A-Za-z_]+)", lambda m: f"_v[{m.group(1)!r}]", formula)
    result = eval(expr, {"__builtins__": {}}, {"_v": {k: _GrafanaFloat(v) for k, v in values.items()}})
    return float(result)  # formulas come from alerts/rules.py only


class _GrafanaFloat(float):
    """A float whose operators follow Grafana's math expression (Go float64)."""

    def _op(self, other, fn):
        a, b = float(self), float(other)
        if math.isnan(a) or math.isnan(b):
            return _GrafanaFloat(math.nan)
        return _GrafanaFloat(fn(a, b))

    def __add__(self, o): return self._op(o, lambda a, b: a + b)
    def __radd__(self, o): return _GrafanaFloat(o)._op(self, lambda a, b: a + b)
    def __sub__(self, o): return self._op(o, lambda a, b: a - b)
    def __rsub__(self, o): return _GrafanaFloat(o)._op(self, lambda a, b: a - b)
    def __mul__(self, o): return self._op(o, lambda a, b: a * b)
    def __rmul__(self, o): return _GrafanaFloat(o)._op(self, lambda a, b: a * b)
    def __truediv__(self, o): return self._op(o, _go_div)
    def __rtruediv__(self, o): return _GrafanaFloat(o)._op(self, _go_div)
    def __gt__(self, o): return self._op(o, lambda a, b: float(a > b))
    def __lt__(self, o): return self._op(o, lambda a, b: float(a < b))
    def __ge__(self, o): return self._op(o, lambda a, b: float(a >= b))
    def __le__(self, o): return self._op(o, lambda a, b: float(a <= b))


def _go_div(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 else math.copysign(math.inf, a) * math.copysign(1, b)
    return a / b


def breached(op: str, value: float, threshold: float) -> bool:
    if math.isnan(value):
        return False
    return {"gt": value > threshold, "lt": value < threshold, "ge": value >= threshold}[op]


class Evaluator:
    def __init__(self, rules: dict, query, host: str, webhook_url: str | None = None,
                 state_path: Path | None = None, interval_s: float = 30.0):
        self.rules = rules
        self.query = query          # InfluxQL text -> /query JSON
        self.host = host
        self.webhook_url = webhook_url
        self.state_path = Path(state_path) if state_path else None
        self.interval_s = interval_s
        # (rule, labels) -> {"pending_since": ms | None, "firing": bool, "since": ms | None};
        # only pending or firing series are kept
        self.state: dict[tuple, dict] = self._load_state()
        self.http = urllib3.PoolManager(timeout=urllib3.Timeout(total=5), retries=False)

    # --- state across restarts --------------------------------------------------------

    def _load_state(self) -> dict[tuple, dict]:
        if not self.state_path or not self.state_path.exists():
            return {}
        try:
            doc = json.loads(self.state_path.read_text())
            entries = doc["alerts"] if doc.get("version") == STATE_VERSION else []
            state = {}
            for e in entries:
                if e["rule"] not in self.rules:
                    log.info("alert state: rule %s is no longer defined; its state is dropped", e["rule"])
                    continue
                key = tuple((label, e["labels"].get(label, "")) for label in self.rules[e["rule"]].labels)
                state[(e["rule"], key)] = {"pending_since": e["pending_since"], "firing": bool(e["firing"]),
                                           "since": e["since"]}
            return state
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.error("alert state %s is unreadable (%s); starting with no alert firing", self.state_path, e)
            return {}

    def _save_state(self) -> None:
        if not self.state_path:
            return
        doc = {"version": STATE_VERSION, "alerts": [
            {"rule": name, "labels": dict(key), **st} for (name, key), st in sorted(self.state.items())]}
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(doc, sort_keys=True))
            os.replace(tmp, self.state_path)
        except OSError as e:
            log.error("cannot write alert state %s: %s", self.state_path, e.strerror)

    # --- evaluation ---------------------------------------------------------------------

    def statements(self, rule, now_ms: int) -> list[str]:
        """The InfluxQL of each of the rule's refs, over its window ending at now_ms."""
        return [expand(ref.query.influxql(), start_ms=now_ms - ref.from_s * 1000, end_ms=now_ms - ref.to_s * 1000,
                       interval_s=max(1, ref.from_s - ref.to_s)) for ref in rule.refs.values()]

    def values(self, rule, now_ms: int) -> dict[tuple, float]:
        """The formula's value at now_ms for every series that every ref of the formula has
        (Grafana's math joins series with equal labels and drops the rest)."""
        return self._formula(rule, run_batch(self.query, self.statements(rule, now_ms)))

    def _formula(self, rule, results: list[dict]) -> dict[tuple, float]:
        per_ref: dict[str, dict[tuple, float]] = {}
        for ref_id, res in zip(rule.refs, results):
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
        used = [r for r in rule.refs if f"${r}" in rule.formula]
        keys = set(per_ref[used[0]]).intersection(*(per_ref[r] for r in used[1:]))
        return {key: formula_value(rule.formula, {r: per_ref[r][key] for r in used}) for key in sorted(keys)}

    def _results(self, now_ms: int) -> dict[str, list[dict] | Exception]:
        """Every rule's ref results, from one batched query (see queries.run_batch)."""
        texts = {name: self.statements(rule, now_ms) for name, rule in self.rules.items()}
        flat = [t for ts in texts.values() for t in ts]
        try:
            results = run_batch(self.query, flat)
        except Exception as e:  # not even the batch could be sent: every rule fails with it
            return {name: e for name in texts}
        out, i = {}, 0
        for name, ts in texts.items():
            out[name], i = results[i:i + len(ts)], i + len(ts)
        return out

    def evaluate(self, now_ms: int) -> list[Point]:
        points, notify = [], []
        ts = now_ms * 1_000_000
        results = self._results(now_ms)
        for rule in self.rules.values():
            try:
                if isinstance(results[rule.name], Exception):
                    raise results[rule.name]
                values = self._formula(rule, results[rule.name])
            except Exception as e:  # one broken rule must not stop the others; its alerts stay as they were
                log.error("alert rule %s: evaluation failed: %s", rule.name, e)
                continue
            for key, value in values.items():
                if breached(rule.op, value, rule.threshold):
                    st = self.state.setdefault((rule.name, key), {"pending_since": None, "firing": False,
                                                                  "since": None})
                    if st["pending_since"] is None:
                        st["pending_since"] = now_ms
                    if not st["firing"] and now_ms - st["pending_since"] >= rule.for_s * 1000:
                        st["firing"], st["since"] = True, now_ms
                        points.append(self._point(rule, key, value, "firing", ts))
                    st["value"] = value
                elif (rule.name, key) in self.state:
                    self._resolve(rule, key, value, now_ms, points, notify)
            for name, key in [k for k in self.state if k[0] == rule.name and k[1] not in values]:
                self._resolve(rule, key, math.nan, now_ms, points, notify)  # the series is gone: nothing breaches
        for (name, key), st in self.state.items():
            if st["firing"]:  # every firing alert, every evaluation: Alertmanager forgets what is not re-sent
                notify.append((self.rules[name], key, st.pop("value", math.nan), "firing", st["since"], None))
            st.pop("value", None)
        self._save_state()
        if notify and self.webhook_url:
            self._post(notify, now_ms)
        return points

    def _resolve(self, rule, key, value, now_ms, points, notify):
        st = self.state.pop((rule.name, key))
        if st["firing"]:
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
                     {"value": 0.0 if not math.isfinite(value) else float(value),
                      "labels": json.dumps(labels, sort_keys=True), "summary": summary}, ts)

    def _post(self, notify, now_ms: int) -> None:
        def iso(ms):
            return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat().replace("+00:00", "Z")
        valid_until = now_ms + int(RESEND_VALID_EVALS * self.interval_s * 1000)
        body = []
        for rule, key, value, state, since, ended in notify:
            alert = {"labels": {"alertname": rule.name, "severity": rule.severity, "host": self.host, **dict(key)},
                     "annotations": {"summary": self._point(rule, key, value, state, 0).fields["summary"],
                                     "description": rule.why, "value": f"{value:g}"},
                     "startsAt": iso(since), "endsAt": iso(ended if ended else valid_until),
                     "generatorURL": "sonde://alerts/" + rule.name}
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
