"""Alert rules: one definition, two evaluators.

Each rule is a few catalog-checked InfluxQL queries (refs A, B, ... over relative
time windows), a formula over their per-series values (Grafana math syntax:
`$A / $B`, comparisons give 0 or 1), and a comparison against a threshold from
alerts/thresholds.yaml. Every window, baseline and `for` is in seconds of wall time,
never a count of polls. `grafana_provisioning()` renders Grafana alerting
provisioning (validated against the Grafana 11.6 schema): each query reduced to its
last value, the formula as a math expression, the threshold as a threshold
expression; ingest/analysis/alerting.py evaluates the same queries and formula inside
the agent, joining series the way Grafana's math does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from sonde.ingest.docs import replace_section
from sonde.ingest.analysis.queries import Query
from sonde.ingest.runtime import catalog
from sonde.ingest.runtime.identity import AGENT_COMM

THRESHOLDS = Path(__file__).resolve().parent / "thresholds.yaml"
DATASOURCE_UID = "sonde-influxdb"
FOLDER_UID = "sonde"
GROUP = "sonde"
EVAL_INTERVAL_S = 30


@dataclass(frozen=True)
class Ref:
    query: Query
    from_s: int   # window start, seconds before now
    to_s: int = 0  # window end, seconds before now


@dataclass(frozen=True)
class Rule:
    name: str
    summary: str       # {{ $labels.x }} placeholders, filled from the series' tags
    severity: str
    refs: dict         # refId -> Ref; A is the primary: its series are the alert instances
    formula: str       # over $A, $B, ...
    op: str            # gt | lt | ge
    threshold: float
    window_s: int      # the time the rule looks at, ending now
    for_s: int         # how long a breach must last before the alert fires (Grafana's `for`)
    why: str

    @property
    def labels(self) -> tuple[str, ...]:
        return self.refs["A"].query.group_by


def _why(name: str, path: Path = THRESHOLDS) -> str:
    """The comment above a rule in thresholds.yaml: why its threshold is what it is."""
    lines = path.read_text().splitlines()
    if f"{name}:" not in lines:  # a thresholds file without the shipped comments
        path, lines = THRESHOLDS, THRESHOLDS.read_text().splitlines()
    start = lines.index(f"{name}:")
    out = []
    for line in lines[start + 1:]:
        s = line.strip()
        if not s.startswith("#"):
            break
        out.append(s.lstrip("# "))
    return " ".join(out)


def cpu_field() -> str:
    """The busiest thread's CPU time where the cpu probe writes it, else the process's."""
    per_thread = "max_thread_oncpu_us"
    return per_thread if per_thread in catalog.MEASUREMENTS["process_cpu"].field_names else "oncpu_us"


def load(path: Path = THRESHOLDS) -> dict[str, Rule]:
    t = yaml.safe_load(path.read_text())

    def q(measurement, select, where=(), group_by=(), exclude=()):
        return Query(measurement, (select,), tuple(where), tuple(group_by), time_bucket=False,
                     exclude=tuple(exclude))

    def why(name):
        return _why(name, path)

    client = (("role", "client"),)
    not_agent = (("comm", AGENT_COMM),)  # the agent's own sockets: see ingest/runtime/identity.py
    flow_labels = ("host", "comm", "peer", "port")
    rules = []

    r = t["backend_resets"]
    rules.append(Rule("backend_resets", "{{comm}} received resets from {{peer}}:{{port}}", "critical",
                      {"A": Ref(q("tcp_flow", "sum(resets_received) as value", client, flow_labels, not_agent),
                                r["window"])},
                      "$A", "gt", r["threshold"], r["window"], r["for"], why("backend_resets")))
    r = t["failed_connects"]
    rules.append(Rule("failed_connects", "{{comm}} cannot connect to {{peer}}:{{port}}", "critical",
                      {"A": Ref(q("tcp_flow", "sum(connect_refused) + sum(connect_timeouts) as value", client,
                                  flow_labels, not_agent), r["window"])},
                      "$A", "gt", r["threshold"], r["window"], r["for"], why("failed_connects")))
    r = t["retransmit_ratio"]
    lab = ("host", "comm", "peer")
    rules.append(Rule("retransmit_ratio", "{{comm}} <-> {{peer}}: retransmit ratio high", "warning",
                      {"A": Ref(q("tcp_flow", "sum(retransmits) as value", (), lab), r["window"]),
                       "B": Ref(q("tcp_flow", "sum(tx_segments) as value", (), lab), r["window"])},
                      f"($A / $B) * ($B >= {r['min_segments']})", "gt", r["threshold"], r["window"], r["for"],
                      why("retransmit_ratio")))
    r = t["srtt_p99_jump"]
    rules.append(Rule("srtt_p99_jump", "{{comm}} <-> {{peer}}: srtt p99 jumped against the last hour", "warning",
                      {"A": Ref(q("tcp_srtt", "max(p99_us) as value", (), lab), r["window"]),
                       "B": Ref(q("tcp_srtt", "mean(p99_us) as value", (), lab), r["window"] + r["baseline"],
                                r["window"])},
                      f"($A / $B) * ($A >= {r['min_us']})", "gt", r["threshold"], r["window"], r["for"],
                      why("srtt_p99_jump")))
    r = t["cpu_pinned"]
    plab = ("host", "pid", "comm")
    # CPU time over the time the window's polls cover, in % of one core, when they cover the
    # window (a process that did not run in a poll writes no point for it): weighted by each
    # poll's length, so a short poll's rounding counts for little
    cover_us = int(r["coverage"] * r["window"] * 1_000_000)
    rules.append(Rule("cpu_pinned", "{{comm}} (pid {{pid}}) pinned at a full core", "critical",
                      {"A": Ref(q("process_cpu", f"sum({cpu_field()}) as value", (), plab), r["window"]),
                       "B": Ref(q("process_cpu", "sum(interval_us) as value", (), plab), r["window"])},
                      f"($A / $B * 100) * ($B >= {cover_us})", "ge", r["threshold"], r["window"], r["for"],
                      why("cpu_pinned")))
    r = t["disk_latency_p99"]
    rules.append(Rule("disk_latency_p99", "{{disk}}: p99 block latency high for most of the window", "warning",
                      {"A": Ref(q("block_total_latency", "percentile(p99_us, 50) as value",
                                  (("op", "(read|write|sync_write)"),),
                                  ("host", "disk")), r["window"])},
                      "$A", "gt", r["threshold_us"], r["window"], r["for"], why("disk_latency_p99")))
    r = t["disk_utilisation"]
    # busy time over the window's time: exact whatever the poll interval, and whichever polls wrote
    rules.append(Rule("disk_utilisation", "{{disk}}: busy most of the time", "warning",
                      {"A": Ref(q("disk_busy", "sum(busy_us) as value", (), ("host", "disk")), r["window"])},
                      f"$A / {r['window'] * 10_000}", "gt", r["threshold"], r["window"], r["for"],
                      why("disk_utilisation")))
    r = t["oom_kill"]
    rules.append(Rule("oom_kill", "{{host}}: the kernel killed a process for memory", "critical",
                      {"A": Ref(q("oom_kills", "sum(kills) as value", (), ("host",)), r["window"])},
                      "$A", "gt", r["threshold"], r["window"], r["for"], why("oom_kill")))
    r = t["throughput_drop"]
    windows = r["baseline"] / r["window"]
    # A spans the baseline and the window, B the baseline alone, so $A - $B is the window's bytes and
    # every flow of the baseline has a series in A: a flow that stopped is 0, not missing.
    rules.append(Rule("throughput_drop", "{{comm}} -> {{peer}}:{{port}}: throughput fell against the last hour",
                      "warning",
                      {"A": Ref(q("tcp_flow", "sum(tx_bytes) + sum(rx_bytes) as value", client, flow_labels,
                                  not_agent), r["window"] + r["baseline"]),
                       "B": Ref(q("tcp_flow", "sum(tx_bytes) + sum(rx_bytes) as value", client, flow_labels,
                                  not_agent), r["window"] + r["baseline"], r["window"])},
                      f"(($A - $B) / ($B / {windows:g})) + 1000 * (($B / {windows:g}) < {r['min_baseline_bytes']})",
                      "lt", r["threshold"], r["window"], r["for"], why("throughput_drop")))
    # L7 (probe l7, opt-in): the series are the process's peers, as tcp_flow's
    l7_labels = ("host", "comm", "role", "peer", "port", "protocol")
    if "http_5xx_ratio" in t:
        r = t["http_5xx_ratio"]
        served = (("protocol", "http"), ("role", "server"))
        lab5 = ("host", "comm", "port")
        rules.append(Rule("http_5xx_ratio", "{{comm}} on :{{port}} answers 5xx", "critical",
                          {"A": Ref(q("l7_requests", "sum(status_5xx) as value", served, lab5), r["window"]),
                           "B": Ref(q("l7_requests", "sum(requests) as value", served, lab5), r["window"])},
                          f"($A / $B) * ($B >= {r['min_requests']})", "gt", r["threshold"], r["window"], r["for"],
                          why("http_5xx_ratio")))
    if "l7_error_ratio" in t:
        r = t["l7_error_ratio"]
        # a request whose connection ended before its response failed too (no_response:
        # a backend's reset), and is not in `requests`
        rules.append(Rule("l7_error_ratio", "{{comm}} ({{role}}) <-> {{peer}}:{{port}} {{protocol}}: requests failing",
                          "warning",
                          {"A": Ref(q("l7_requests", "sum(errors) + sum(no_response) as value", (), l7_labels),
                                    r["window"]),
                           "B": Ref(q("l7_requests", "sum(requests) + sum(no_response) as value", (), l7_labels),
                                    r["window"])},
                          f"($A / $B) * ($B >= {r['min_requests']})", "gt", r["threshold"], r["window"], r["for"],
                          why("l7_error_ratio")))
    if "l7_p99_jump" in t:
        r = t["l7_p99_jump"]
        lab7 = l7_labels + ("op",)
        rules.append(Rule("l7_p99_jump", "{{comm}} ({{role}}) <-> {{peer}}:{{port}} {{protocol}} {{op}}: request p99 "
                          "jumped against the last hour", "warning",
                          {"A": Ref(q("l7_duration", "max(p99_us) as value", (), lab7), r["window"]),
                           "B": Ref(q("l7_duration", "mean(p99_us) as value", (), lab7), r["window"] + r["baseline"],
                                    r["window"])},
                          f"($A / $B) * ($A >= {r['min_us']})", "gt", r["threshold"], r["window"], r["for"],
                          why("l7_p99_jump")))
    r = t["agent_drops"]
    rules.append(Rule("agent_drops", "{{host}}: Sonde lost events or points", "warning",
                      {"A": Ref(q("sonde_probe", "sum(map_full_drops) as value", (), ("host",)), r["window"]),
                       "B": Ref(q("sonde_spool", "sum(dropped_points) as value", (), ("host",)), r["window"])},
                      "$A + $B", "gt", r["threshold"], r["window"], r["for"], why("agent_drops")))
    r = t["agent_poll_failures"]
    rules.append(Rule("agent_poll_failures", "{{host}}: probe {{probe}} failed to poll", "warning",
                      {"A": Ref(q("sonde_probe", "count(poll_success) - sum(poll_success) as value", (),
                                  ("host", "probe")), r["window"])},
                      "$A", "gt", r["threshold"], r["window"], r["for"], why("agent_poll_failures")))
    for rule in rules:  # (the `anomaly` section configures ingest/analysis/anomaly.py, not a rule)
        for ref in rule.refs.values():
            ref.query.check()
    return {r.name: r for r in rules}


_GRAFANA_OP = {"gt": "gt", "lt": "lt", "ge": "gt"}


def grafana_rule(rule: Rule) -> dict:
    data = []
    for ref_id, ref in rule.refs.items():
        data.append({
            "refId": ref_id, "datasourceUid": DATASOURCE_UID, "queryType": "",
            "relativeTimeRange": {"from": ref.from_s, "to": ref.to_s},
            "model": {"refId": ref_id, "query": ref.query.influxql(), "rawQuery": True,
                      "resultFormat": "time_series", "intervalMs": 1000, "maxDataPoints": 43200},
        })
    reduced = {}
    for ref_id in rule.refs:
        rid = f"{ref_id}_last"
        reduced[ref_id] = rid
        data.append({"refId": rid, "datasourceUid": "__expr__", "queryType": "",
                     "relativeTimeRange": {"from": 0, "to": 0},
                     "model": {"refId": rid, "type": "reduce", "expression": ref_id, "reducer": "last",
                               "settings": {"mode": "dropNN"}, "datasource": {"type": "__expr__", "uid": "__expr__"}}})
    formula = rule.formula
    for ref_id, rid in sorted(reduced.items(), key=lambda kv: -len(kv[0])):
        formula = formula.replace(f"${ref_id}", f"${rid}")
    data.append({"refId": "VALUE", "datasourceUid": "__expr__", "queryType": "",
                 "relativeTimeRange": {"from": 0, "to": 0},
                 "model": {"refId": "VALUE", "type": "math", "expression": formula,
                           "datasource": {"type": "__expr__", "uid": "__expr__"}}})
    # Grafana has no >=: a ge rule compares against the threshold nudged below it
    threshold = rule.threshold - 1e-9 if rule.op == "ge" else rule.threshold
    data.append({"refId": "ALERT", "datasourceUid": "__expr__", "queryType": "",
                 "relativeTimeRange": {"from": 0, "to": 0},
                 "model": {"refId": "ALERT", "type": "threshold", "expression": "VALUE",
                           "conditions": [{"evaluator": {"type": _GRAFANA_OP[rule.op], "params": [threshold]}}],
                           "datasource": {"type": "__expr__", "uid": "__expr__"}}})
    summary = rule.summary
    for label in rule.labels:
        summary = summary.replace("{{" + label + "}}", "{{ $labels." + label + " }}")
    return {
        "uid": f"sonde-{rule.name.replace('_', '-')}"[:40], "title": rule.name, "orgID": 1,
        "folderUID": FOLDER_UID, "ruleGroup": GROUP, "condition": "ALERT", "data": data,
        "for": f"{rule.for_s}s", "noDataState": "OK", "execErrState": "Error",
        "labels": {"severity": rule.severity, "source": "sonde"},
        "annotations": {"summary": summary, "description": rule.why},
    }


def grafana_provisioning(rules: dict[str, Rule] | None = None) -> dict:
    rules = rules or load()
    return {"apiVersion": 1, "groups": [{
        "orgId": 1, "name": GROUP, "folder": "Sonde", "interval": f"{EVAL_INTERVAL_S}s",
        "rules": [grafana_rule(r) for r in rules.values()]}]}


_OPS = {"gt": ">", "lt": "<", "ge": ">="}


def markdown_list(rules: dict[str, Rule] | None = None) -> str:
    """The README's list of alert rules, generated so it cannot drift."""
    rules = rules or load()
    lines = ["| rule | severity | fires when | window | why |", "|---|---|---|---|---|"]
    for r in rules.values():
        lines.append(f"| `{r.name}` | {r.severity} | `{r.formula}` {_OPS[r.op]} {r.threshold:g} | {r.window_s} s | "
                     f"{r.why} |")
    return "\n".join(lines) + "\n"


def update_readme(readme: Path) -> None:
    replace_section(readme, "alerts", markdown_list())
