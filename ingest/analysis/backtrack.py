"""`sonde backtrack`: what happened on a host in a past window, from stored metrics only.

Every number comes from InfluxQL over the catalog's measurements. Percentiles are
computed from `_hist` buckets summed across the window, so they are exact to the
bucket. The model the findings rest on:

- A process is a pid on a host. Names repeat (every Python program is `python3`),
  so flows are grouped by pid, never by name.
- A load balancer is a process that accepts connections *and* connects to upstreams.
  Workers of one balancer (same name, same host, a listening port and an upstream in
  common, in the window or the one before) are reported as one balancer.
- Backends are compared with each other only within a pool: the upstreams of one
  balancer on one port. A process's connections to two different services are not
  siblings, so one answering faster or with less data is not a finding.
- Findings are faults (resets, refused or timed-out connects, a process pinned on its
  core, an OOM kill) or symptoms (a backend path slower than its pool, less data per
  connection than its pool, clients whose open connections stopped moving data). A
  fault explains a symptom when the faulty process owns the symptom's connections or
  serves the port they go to on the same host (a pinned server explains its clients'
  stall), or when resets or failed connects on a balancer-to-backend edge explain less
  data per connection on it. An explained
  symptom ranks under the fault that explains it and is never the likely cause; a
  fault that explains symptoms ranks before one that explains none.
- L7 (where probe l7 was opted in on a balancer): per backend, the requests the
  balancer sent (answered, plus those whose connection ended first: `no_response`)
  and how many failed; per frontend, the error statuses it answered. A backend's
  requests that got no response became the balancer's own error status to its
  client; which one (502, 504) is read from the frontend's counts, and named only when
  the frontend's own error answers (those it did not pass on from a backend) add up to
  exactly those requests. Failed requests on an edge with resets or failed connects are
  a symptom those explain.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field

from sonde.ingest.analysis.hotspots import describe, hotspots
from sonde.ingest.runtime import hist

FLOW_FIELDS = ("tx_bytes", "rx_bytes", "active_opens", "passive_opens", "connect_refused", "connect_timeouts",
               "resets_received", "resets_sent", "retransmits")
FLOW_KEY = ("host", "pid", "comm", "role", "peer", "port")
# probe l7 (opt-in): requests per process x role x peer x protocol
L7_KEY = FLOW_KEY + ("protocol",)
L7_FIELDS = ("requests", "errors", "no_response")
# pids that are not one process: folded past the top-N limit, or sockets no process held
NOT_A_PROCESS = ("other", "0")
NOT_A_PEER = ("other", "unknown")

PINNED_PCT = 95          # a process on a CPU or waiting for one >= 95% of an interval wants a whole core
PINNED_INTERVALS = 3     # ... for three polls: not a burst
STALL_FRACTION = 0.25    # open connections moving under a quarter of the bytes of the window before
STALL_OPEN_POLLS = 3     # ... found open at three polls or more of the window
SLOW_PATH_RATIO = 4      # srtt p99 against the pool's median
SLOW_PATH_MIN_US = 2000  # ... and at least 2 ms: below that, loopback and LAN jitter


def _slot(le: str) -> int:
    return hist.SLOTS - 1 if le == hist.INF else int(le).bit_length()


def _regex(value: str) -> str:
    return "/^" + re.sub(r"([\\/.^$|?*+()\[\]{}-])", r"\\\1", value) + "$/"


def _pct(x: float) -> str:
    return f"{x:.0%}"


@dataclass
class Window:
    start_ms: int
    end_ms: int
    host: str | None = None
    process: str | None = None
    peer: str | None = None

    def where(self, *, process_tag: str = "comm", peer: bool = True) -> str:
        c = [f"time >= {self.start_ms}ms", f"time < {self.end_ms}ms"]
        if self.host:
            c.append(f'"host" =~ {_regex(self.host)}')
        if self.process and process_tag:
            tag = "pid" if self.process.isdigit() else process_tag
            c.append(f'"{tag}" =~ {_regex(self.process)}')
        if self.peer and peer:
            c.append(f'"peer" =~ {_regex(self.peer)}')
        return " AND ".join(c)

    def before(self) -> "Window":
        span = self.end_ms - self.start_ms
        return Window(self.start_ms - span, self.start_ms, self.host, self.process, self.peer)


@dataclass(eq=False)
class Finding:
    score: float
    kind: str
    subject: str
    evidence: str
    cause: str
    symptom: bool = False
    procs: set = field(default_factory=set)    # (host, pid) whose connections show it
    served: set = field(default_factory=set)   # (host, port): it is about connections to this local port
    edges: set = field(default_factory=set)    # (balancer id, backend endpoint)
    serves: dict = field(default_factory=dict)  # (host, pid) -> ports it listens on: whom a pinned process serves
    explained_by: "Finding | None" = None

    def explains(self, s: "Finding") -> bool:
        if self.symptom or not s.symptom:
            return False
        # resets and refused connects on an edge cut its connections short: less data
        # on each (they do not lengthen its round trips)
        if s.kind in ("low_throughput_backend", "failed_requests") and self.edges & s.edges:
            return True
        if self.kind in ("cpu_pinned", "oom_kill"):
            return bool(self.procs & s.procs) or any(
                (h, port) in s.served for h, pid in self.procs for port in self.serves.get((h, pid), ()))
        return False

    def as_dict(self) -> dict:
        return {"score": round(self.score, 2), "kind": self.kind, "subject": self.subject,
                "evidence": self.evidence, "cause": self.cause,
                "explained_by": {"kind": self.explained_by.kind, "subject": self.explained_by.subject}
                if self.explained_by else None}


def rank(findings: list[Finding]) -> list[Finding]:
    """Causes first, each followed by the symptoms it explains. A cause whose effects
    show in the window (it explains a symptom) ranks before one whose effects do not: on
    a busy host a batch job may also want a whole core, but only the stuck worker has
    clients that stopped moving. The score orders the rest."""
    by_score = sorted(findings, key=lambda f: -f.score)
    for s in by_score:
        s.explained_by = next((f for f in by_score if f is not s and f.explains(s)), None)
    effects = {id(f): [s for s in by_score if s.explained_by is f] for f in by_score}
    causes = sorted((f for f in by_score if f.explained_by is None), key=lambda f: (not effects[id(f)], -f.score))
    return [x for f in causes for x in (f, *effects[id(f)])]


def _proc(r: dict) -> tuple[str, str]:
    return r["host"], r["pid"]


def _is_process(r: dict) -> bool:
    return r["pid"] not in NOT_A_PROCESS and r["comm"] not in ("other", "[unattributed]")


def _bytes(r: dict) -> int:
    return r["tx_bytes"] + r["rx_bytes"]


class Backtrack:
    def __init__(self, query, progress=None):
        self.query = query            # InfluxQL -> /query JSON
        self.progress = progress or (lambda step: None)

    def rows(self, q: str) -> list[dict]:
        res = self.query(q)["results"][0]
        if "error" in res:
            raise RuntimeError(f"{res['error']} in: {q}")
        out = []
        for s in res.get("series", []):
            for v in s["values"]:
                row = dict(zip(s["columns"], v))
                row.update(s.get("tags", {}))
                out.append(row)
        return out

    # --- sections ----------------------------------------------------------------------

    def flows(self, w: Window) -> list[dict]:
        """One row per process (pid) x role x peer endpoint, with percentiles and how
        many polls found its connections open."""
        group = ", ".join(f'"{t}"' for t in FLOW_KEY)
        sel = ", ".join(f'sum("{f}") AS "{f}"' for f in FLOW_FIELDS)
        rows = {tuple(r[t] for t in FLOW_KEY): r
                for r in self.rows(f'SELECT {sel} FROM "tcp_flow" WHERE {w.where()} GROUP BY {group}')}
        for r in self.rows(f'SELECT count("samples") AS "open_polls" FROM "tcp_window" WHERE {w.where()} '
                           f'GROUP BY {group}'):
            k = tuple(r[t] for t in FLOW_KEY)
            rows.setdefault(k, dict(zip(FLOW_KEY, k)))["open_polls"] = int(r["open_polls"])
        for r in rows.values():
            for f in FLOW_FIELDS:
                r[f] = int(r.get(f) or 0)
            r.setdefault("open_polls", 0)
            r.pop("time", None)
        for name in ("tcp_srtt", "tcp_connect_latency"):
            buckets: dict[tuple, dict[int, int]] = {}
            for b in self.rows(f'SELECT sum("count") AS "n" FROM "{name}_hist" WHERE {w.where()} '
                               f'GROUP BY {group}, "le"'):
                per = buckets.setdefault(tuple(b[t] for t in FLOW_KEY), {})
                per[_slot(b["le"])] = per.get(_slot(b["le"]), 0) + int(b["n"])
            short = name.removeprefix("tcp_")
            for k, r in rows.items():
                b = buckets.get(k)
                r[f"{short}_p50_us"] = hist.percentile(b, 0.5) if b else None
                r[f"{short}_p99_us"] = hist.percentile(b, 0.99) if b else None
        return sorted(rows.values(), key=lambda r: -_bytes(r))

    def l7(self, w: Window) -> dict[tuple, dict]:
        """Probe l7's requests per process (pid) x role x peer x protocol: requests
        answered, errors, requests whose connection ended first (no_response), HTTP
        error statuses, and duration p50/p99 from the summed buckets. {} where l7 was off."""
        group = ", ".join(f'"{t}"' for t in L7_KEY)
        sel = ", ".join(f'sum("{f}") AS "{f}"' for f in L7_FIELDS)
        rows = {}
        for r in self.rows(f'SELECT {sel} FROM "l7_requests" WHERE {w.where()} GROUP BY {group}'):
            r.pop("time", None)
            for f in L7_FIELDS:
                r[f] = int(r.get(f) or 0)
            r["codes"] = {}
            rows[tuple(r[t] for t in L7_KEY)] = r
        if not rows:
            return rows
        for r in self.rows(f'SELECT sum("responses") AS "n" FROM "l7_http_errors" WHERE {w.where()} '
                           f'GROUP BY {group}, "status"'):
            row = rows.get(tuple(r[t] for t in L7_KEY))
            if row is not None and r["n"]:
                row["codes"][r["status"]] = row["codes"].get(r["status"], 0) + int(r["n"])
        buckets: dict[tuple, dict[int, int]] = {}
        for b in self.rows(f'SELECT sum("count") AS "n" FROM "l7_duration_hist" WHERE {w.where()} '
                           f'GROUP BY {group}, "le"'):
            per = buckets.setdefault(tuple(b[t] for t in L7_KEY), {})
            per[_slot(b["le"])] = per.get(_slot(b["le"]), 0) + int(b["n"])
        for k, r in rows.items():
            b = buckets.get(k)
            r["p50_us"] = hist.percentile(b, 0.5) if b else None
            r["p99_us"] = hist.percentile(b, 0.99) if b else None
            r["buckets"] = b or {}
        return rows

    def load_balancers(self, flows: list[dict], before: list[dict], process: str | None = None) -> list[dict]:
        """Processes that accept connections and connect to upstreams, workers of one
        balancer together; membership is judged over the window and the one before, so
        a worker that moved nothing in the window (a stuck one) is still counted."""
        fronts: dict[tuple, set] = {}
        backs: dict[tuple, set] = {}
        comm: dict[tuple, str] = {}
        for r in [*flows, *before]:
            if not _is_process(r):
                continue
            p = _proc(r)
            comm[p] = r["comm"]
            if r["role"] == "server":
                fronts.setdefault(p, set()).add(r["port"])
            elif r["role"] == "client" and r["peer"] not in NOT_A_PEER:
                backs.setdefault(p, set()).add(f'{r["peer"]}:{r["port"]}')
        members = sorted(p for p in fronts if p in backs)
        # workers: same name on one host, sharing a listening port and an upstream
        parent = {p: p for p in members}

        def root(p):
            while parent[p] != p:
                parent[p] = parent[parent[p]]
                p = parent[p]
            return p
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                if a[0] == b[0] and comm[a] == comm[b] and fronts[a] & fronts[b] and backs[a] & backs[b]:
                    parent[root(b)] = root(a)
        groups: dict[tuple, list] = {}
        for p in members:
            groups.setdefault(root(p), []).append(p)
        out = []
        for pids in groups.values():
            host, name = pids[0][0], comm[pids[0]]
            if process and process not in (name, *(pid for _, pid in pids)):
                continue
            lb = self._balancer(host, name, set(pids), flows, before)
            if lb["backends"] or lb["backends_before"]:
                out.append(lb)
        return sorted(out, key=lambda lb: -sum(_bytes(b) for b in lb["backends"].values()))

    @staticmethod
    def _balancer(host: str, name: str, pids: set, flows: list[dict], before: list[dict]) -> dict:
        def backends_of(rows):
            out = {}
            for r in rows:
                if _proc(r) not in pids or r["role"] != "client" or r["peer"] in NOT_A_PEER:
                    continue
                b = out.setdefault(f'{r["peer"]}:{r["port"]}', {f: 0 for f in FLOW_FIELDS} | {
                    "srtt_p99_us": None, "connect_latency_p99_us": None, "srtt_p99_by_pid": {}})
                for f in FLOW_FIELDS:
                    b[f] += r[f]
                for f in ("srtt_p99_us", "connect_latency_p99_us"):
                    b[f] = max(b[f] or 0, r.get(f) or 0) or None
                if r.get("srtt_p99_us"):
                    b["srtt_p99_by_pid"][r["pid"]] = r["srtt_p99_us"]
            conns = sum(b["active_opens"] for b in out.values()) or 1
            volume = sum(_bytes(b) for b in out.values()) or 1
            for b in out.values():
                b["connection_share"] = round(b["active_opens"] / conns, 4)
                b["byte_share"] = round(_bytes(b) / volume, 4)
                b["bytes_per_connection"] = round(_bytes(b) / b["active_opens"], 1) if b["active_opens"] else None
            return out

        def workers_of(rows):
            out = {pid: {"client_bytes": 0, "accepted": 0, "upstream_bytes": 0} for _, pid in sorted(pids)}
            for r in rows:
                if _proc(r) not in pids:
                    continue
                wk = out[r["pid"]]
                if r["role"] == "server":
                    wk["client_bytes"] += _bytes(r)
                    wk["accepted"] += r["passive_opens"]
                elif r["role"] == "client":
                    wk["upstream_bytes"] += _bytes(r)
            for f in ("client_bytes", "accepted", "upstream_bytes"):
                total = sum(wk[f] for wk in out.values())
                for wk in out.values():
                    wk[f.replace("bytes", "share") if "bytes" in f else "accepted_share"] = \
                        round(wk[f] / total, 4) if total else None
            return out

        frontends = {}
        for r in flows:
            if _proc(r) in pids and r["role"] == "server":
                f = frontends.setdefault(r["port"], {"passive_opens": 0, "rx_bytes": 0, "tx_bytes": 0, "clients": set()})
                f["passive_opens"] += r["passive_opens"]
                f["rx_bytes"] += r["rx_bytes"]
                f["tx_bytes"] += r["tx_bytes"]
                f["clients"].add(r["peer"])
        for f in frontends.values():
            f["clients"] = len(f["clients"])
        backends, backends_before = backends_of(flows), backends_of(before)
        workers, workers_before = workers_of(flows), workers_of(before)
        for pid, wk in workers.items():
            wk["before"] = workers_before[pid]
        now_bytes = sum(_bytes(b) for b in backends.values())
        then_bytes = sum(_bytes(b) for b in backends_before.values())
        return {"host": host, "process": name, "pids": sorted(pid for _, pid in pids), "id": f"{name}@{host}",
                "frontends": frontends, "backends": backends, "backends_before": backends_before,
                "workers": workers,
                "vs_before": {"backend_bytes": now_bytes, "backend_bytes_before": then_bytes,
                              "backend_bytes_ratio": round(now_bytes / then_bytes, 3) if then_bytes else None,
                              "backend_connect_p99_us": max((b["connect_latency_p99_us"] or 0
                                                             for b in backends.values()), default=0),
                              "backend_connect_p99_us_before": max((b["connect_latency_p99_us"] or 0
                                                                    for b in backends_before.values()), default=0)},
                "balance": {port: balance(pool, len(pids)) for port, pool in pools(backends).items()}}

    def cpu(self, w: Window) -> list[dict]:
        """CPU per process. Pinned at a poll: on a CPU >= 95% of the interval; or, on a
        busy host where a spinning process gets only part of a core, on a CPU or waiting
        for one >= 95% of the interval without once blocking (no voluntary switch: a
        process that sleeps, waits for I/O or for a lock is busy, not stuck). Pinned in the
        window: at PINNED_INTERVALS polls or more."""
        where = w.where(peer=False)
        rows = self.rows(f'SELECT max("cpu_pct") AS "max_pct", mean("cpu_pct") AS "mean_pct", '
                         f'count("cpu_pct") AS "intervals", sum("oncpu_us") AS "oncpu_us", '
                         f'sum("runq_wait_us") AS "runq_wait_us", sum("interval_us") AS "interval_us" '
                         f'FROM "process_cpu" WHERE {where} GROUP BY "host", "pid", "comm"')
        pinned = {(r["host"], r["pid"]): int(r["n"]) for r in self.rows(
            f'SELECT count("cpu_pct") AS "n" FROM "process_cpu" WHERE {where} AND ("cpu_pct" >= {PINNED_PCT} OR '
            f'(("oncpu_us" + "runq_wait_us") >= {PINNED_PCT / 100} * "interval_us" AND "voluntary_switches" = 0)) '
            f'GROUP BY "host", "pid", "comm"')}
        for r in rows:
            r.pop("time", None)
            span = r.pop("interval_us") or 0
            r["demand_pct"] = round(100 * ((r.pop("oncpu_us") or 0) + (r.pop("runq_wait_us") or 0)) / span, 1) \
                if span else None
            r["pinned_intervals"] = pinned.get((r["host"], r["pid"]), 0)
            r["pinned"] = r["pinned_intervals"] >= PINNED_INTERVALS
        return sorted(rows, key=lambda r: (-r["pinned_intervals"], -(r["mean_pct"] or 0)))

    def disks(self, w: Window) -> list[dict]:
        return self.rows(f'SELECT sum("requests") AS "requests", sum("bytes") AS "bytes", sum("errors") AS "errors" '
                         f'FROM "block_io" WHERE {w.where(process_tag="", peer=False)} GROUP BY "host", "disk", "op"')

    def events(self, w: Window, measurement: str) -> list[dict]:
        return self.rows(f'SELECT * FROM "{measurement}" WHERE {w.where(process_tag="", peer=False)}')

    # --- findings ----------------------------------------------------------------------

    def _hotspots(self, w: Window, host: str, pid: str) -> list:
        try:
            return hotspots(self.query, w.start_ms, w.end_ms, str(pid), host)
        except RuntimeError:  # no profile measurements in this database
            return []

    def findings(self, flows, before_flows, lbs, cpu, ooms, w: Window | None = None) -> list[Finding]:
        out: list[Finding] = []
        serves: dict[tuple, set] = {}
        for r in [*flows, *before_flows]:
            if r["role"] == "server" and _is_process(r):
                serves.setdefault(_proc(r), set()).add(r["port"])
        in_lb = {(lb["host"], pid): lb for lb in lbs for pid in lb["pids"]}

        # faults on connections: per balancer and backend (workers summed), else per process
        for lb in lbs:
            for k, b in lb["backends"].items():
                p = lb["backends_before"].get(k, {})
                procs = {(lb["host"], pid) for pid in lb["pids"]}
                faults = self._connection_faults(f'{lb["process"]} -> {k}', lb["process"], k, b, p, procs,
                                                 {(lb["id"], k)})
                l7b = (lb.get("l7") or {}).get("backends", {}).get(k)
                for f in faults:
                    if l7b and l7b["failed"]:
                        # what the clients saw: the requests through the balancer that failed
                        if f.kind == "resets":
                            n = b["resets_received"]
                            what = f'that backend reset {n} connection{"s"[:n != 1]}'
                        else:
                            n = b["connect_refused"] + b["connect_timeouts"]
                            what = f'{n} connect{"s"[:n != 1]} to that backend failed'
                        f.cause = f'{l7b["text"]} while {what}: ' + f.cause.split(": ", 1)[1]
                out += faults
        prev = {tuple(r[t] for t in FLOW_KEY): r for r in before_flows}
        for r in flows:
            if r["role"] != "client" or (_proc(r) in in_lb and r["peer"] not in NOT_A_PEER):
                continue
            who = f'{r["comm"]} pid {r["pid"]}'
            k = f'{r["peer"]}:{r["port"]}'
            out += self._connection_faults(f'{who} -> {k}', who, k, r, prev.get(tuple(r[t] for t in FLOW_KEY), {}),
                                           {_proc(r)}, set())

        # requests through a balancer that failed, per backend (probe l7)
        for lb in lbs:
            out += self._failed_requests(lb)

        # symptoms of a balancer's backend paths, against the other backends of the same pool
        for lb in lbs:
            for port, pool in pools(lb["backends"]).items():
                if len(pool) < 2:
                    continue
                out += self._pool_symptoms(lb, port, pool)

        # processes on their core
        pinned = []
        for c in cpu:
            if not c["pinned"]:
                continue
            p = (c["host"], c["pid"])
            clause = self._pinned_clause(p, in_lb.get(p), flows, before_flows)
            # Where it was, when continuous profiling was on (probe profile): the function, not only the pid.
            where = describe(self._hotspots(w, c["host"], c["pid"])) if w else ""
            f = Finding(40 + c["pinned_intervals"], "cpu_pinned", f'{c["comm"]} (pid {c["pid"]})',
                        f'wanted >= {PINNED_PCT}% of a core for {c["pinned_intervals"]} intervals (over the window '
                        f'on a CPU {c["mean_pct"] or 0:.0f}%, on a CPU or waiting for one {c["demand_pct"] or 0:.0f}%)',
                        f'{c["comm"]} pid {c["pid"]} is stuck on its core '
                        + (f"{where}" if where else "(continuous profiling was off: take a stack of that process)")
                        + " (or restart it)" + (f"; {clause}" if clause else ""),
                        procs={p}, serves=serves)
            out.append(f)
            pinned.append(f)

        # clients whose open connections stopped moving data, served by a pinned process
        served_by_pinned = {(h, port) for f in pinned for (h, pid) in f.procs for port in serves.get((h, pid), ())}
        for r in flows:
            if r["role"] != "client" or not _is_process(r) or (r["host"], r["port"]) not in served_by_pinned \
                    or _proc(r) in {p for f in pinned for p in f.procs}:
                continue
            then = _bytes(prev.get(tuple(r[t] for t in FLOW_KEY), {"tx_bytes": 0, "rx_bytes": 0}))
            if then and r["open_polls"] >= STALL_OPEN_POLLS and _bytes(r) < STALL_FRACTION * then:
                out.append(Finding(20, "stalled_clients", f'{r["comm"]} pid {r["pid"]} -> {r["peer"]}:{r["port"]}',
                                   f'connections open at {r["open_polls"]} polls, {_bytes(r)} bytes moved against '
                                   f'{then} in the window before',
                                   f'the server of :{r["port"]} stopped answering {r["comm"]} pid {r["pid"]}',
                                   symptom=True, procs={_proc(r)}, served={(r["host"], r["port"])}))
        for o in ooms:
            out.append(Finding(45, "oom_kill", f'{o.get("comm")} (pid {o.get("pid")})',
                               f'OOM-killed in cgroup {o.get("cgroup") or "?"}',
                               f'{o.get("comm")} ran out of memory in {o.get("cgroup") or "its cgroup"}',
                               procs={(o.get("host"), str(o.get("pid")))}, serves=serves))
        return rank(out)

    @staticmethod
    def _connection_faults(subject, who, k, b, p, procs, edges) -> list[Finding]:
        out = []
        # resets on connections this process opened are the backend-reset case; resets
        # from clients to a frontend are routine (a client aborting)
        if b["resets_received"] > p.get("resets_received", 0):
            out.append(Finding(50 + b["resets_received"], "resets", subject,
                               f'{b["resets_received"]} reset{"s"[:b["resets_received"] != 1]} received '
                               f'(window before: {p.get("resets_received", 0)})',
                               f'{k} is resetting connections from {who}: check that backend '
                               f'(its timeouts, its logs around the window)', procs=procs, edges=edges))
        failed = b["connect_refused"] + b["connect_timeouts"]
        if failed > p.get("connect_refused", 0) + p.get("connect_timeouts", 0):
            out.append(Finding(60 + failed, "failed_connects", subject,
                               f'{b["connect_refused"]} refused, {b["connect_timeouts"]} timed out',
                               f'{k} is not accepting connections from {who} (health check failing): is it listening?',
                               procs=procs, edges=edges))
        return out

    @staticmethod
    def _failed_requests(lb: dict) -> list[Finding]:
        """Requests the balancer sent to a backend that failed (an error answer, or no
        answer: the connection ended first). Where that edge also had resets or failed
        connects in the window, those are the fault and this is their symptom, and the
        fault's cause carries the requests clause."""
        l7 = lb.get("l7")
        if not l7:
            return []
        out = []
        procs = {(lb["host"], pid) for pid in lb["pids"]}
        for k, b in l7["backends"].items():
            then = l7["backends_before"].get(k, {})
            if not b["failed"] or b["failed"] <= then.get("failed", 0):
                continue
            l4 = lb["backends"].get(k, {})
            faulty = l4.get("resets_received", 0) or l4.get("connect_refused", 0) or l4.get("connect_timeouts", 0)
            out.append(Finding(50 + min(b["failed"], 40) if not faulty else 20, "failed_requests",
                               f'{lb["process"]} -> {k}',
                               f'{b["failed"]} of {b["sent"]} requests failed ({failure_detail(b)}; window before: '
                               f'{then.get("failed", 0)} of {then.get("sent", 0)})',
                               f'{b["text"]}: check that backend (its logs around the window)',
                               symptom=bool(faulty), procs=procs, edges={(lb["id"], k)}))
        return out

    @staticmethod
    def _pool_symptoms(lb: dict, port: str, pool: dict) -> list[Finding]:
        out = []
        procs = {(lb["host"], pid) for pid in lb["pids"]}
        srtts = {k: b["srtt_p99_us"] for k, b in pool.items() if b.get("srtt_p99_us")}
        bpcs = {k: b["bytes_per_connection"] for k, b in pool.items() if b.get("bytes_per_connection")}
        fair = lb["balance"].get(port, {}).get("text")
        for k, b in pool.items():
            host, _, bport = k.rpartition(":")
            served = {(lb["host"], bport)}  # a backend on this host: a pinned server of it explains its path
            others = [v for o, v in srtts.items() if o != k]
            if k in srtts and others and srtts[k] > SLOW_PATH_RATIO * statistics.median(others) \
                    and srtts[k] >= SLOW_PATH_MIN_US:
                med = statistics.median(others)
                out.append(Finding(30 + min(srtts[k] / med, 50), "slow_backend_path", f'{lb["process"]} -> {k}',
                                   f'srtt p99 {srtts[k]} us against {med:g} us for the other backends on :{port}; '
                                   f'{b["connection_share"]:.0%} of connections, {b["byte_share"]:.0%} of bytes',
                                   f'the network path from {lb["process"]} to {k} is slow or bandwidth-limited'
                                   + (f" ({fair})" if fair else "") + "; check that link",
                                   symptom=True, procs=procs, served=served, edges={(lb["id"], k)}))
                continue
            others_b = [v for o, v in bpcs.items() if o != k]
            if k in bpcs and others_b and bpcs[k] < 0.5 * statistics.median(others_b):
                out.append(Finding(25, "low_throughput_backend", f'{lb["process"]} -> {k}',
                                   f'{bpcs[k]:g} bytes per connection against {statistics.median(others_b):g} '
                                   f'for the other backends on :{port}',
                                   f'less data moves on each connection to {k}: a limited path or a slow backend',
                                   symptom=True, procs=procs, served=served, edges={(lb["id"], k)}))
        return out

    @staticmethod
    def _pinned_clause(p: tuple, lb: dict | None, flows, before) -> str | None:
        """What the pinned process's traffic shows against the window before, or nothing."""
        if lb:
            wk = lb["workers"][p[1]]
            then = wk["before"]
            for what, n, share in (("client", "client_bytes", "client_share"),
                                   ("upstream", "upstream_bytes", "upstream_share")):
                if then[n] and wk[n] < 0.5 * then[n]:
                    clause = f"its {what} bytes fell to {wk[n] / then[n]:.0%} of the window before"
                    if len(lb["workers"]) > 1:
                        clause += (f" (it carried {_pct(then[share])} of {lb['process']}'s {what} bytes then, "
                                   f"{_pct(wk[share] or 0)} in the window)")
                    return clause
            return None
        now = sum(_bytes(r) for r in flows if _proc(r) == p)
        then = sum(_bytes(r) for r in before if _proc(r) == p)
        if then and now < 0.5 * then:
            return f"its TCP bytes fell to {now / then:.0%} of the window before"
        return None

    # --- the report --------------------------------------------------------------------

    def report(self, w: Window) -> dict:
        self.progress("flows")
        flows = self.flows(w)
        before = self.flows(w.before())
        self.progress("load balancers")
        lbs = self.load_balancers(flows, before, w.process)
        self.progress("l7")
        l7_rows = self.l7(w)
        l7_before = self.l7(w.before()) if l7_rows else {}
        for lb in lbs:
            lb["l7"] = balancer_l7(lb, l7_rows, l7_before)
        self.progress("cpu")
        cpu = self.cpu(w)
        self.progress("disks and OOM")
        disks = self.disks(w)
        ooms = self.events(w, "oom_kill")
        self.progress("alerts and anomalies")
        alerts = [a for a in self.events(w, "sonde_alert") if a.get("state") == "firing"]
        anomalies = self.events(w, "sonde_anomaly")
        findings = self.findings(flows, before, lbs, cpu, ooms, w)
        causes = [f for f in findings if f.explained_by is None]
        return {
            "window": {"from_ms": w.start_ms, "to_ms": w.end_ms, "host": w.host, "process": w.process,
                       "peer": w.peer},
            "talkers": flows,
            "l7": sorted(({k: v for k, v in r.items() if k != "buckets"} for r in l7_rows.values()),
                         key=lambda r: -(r["requests"] + r["no_response"])),
            "load_balancers": lbs,
            "cpu": cpu[:20],
            "disks": disks,
            "oom_kills": ooms,
            "alerts": [{"rule": a["rule"], "summary": a.get("summary"), "time": a["time"]} for a in alerts],
            "anomalies": [{"metric": a["metric"], "score": a.get("score"), "text": a.get("text")} for a in anomalies],
            "findings": [f.as_dict() for f in findings],
            "likely_cause": causes[0].cause if causes else None,
        }


def _sum_l7(rows: list[dict]) -> dict:
    out = {f: 0 for f in L7_FIELDS} | {"codes": {}, "buckets": {}}
    for r in rows:
        for f in L7_FIELDS:
            out[f] += r[f]
        for c, n in r["codes"].items():
            out["codes"][c] = out["codes"].get(c, 0) + n
        hist.merge(out["buckets"], r.get("buckets") or {})
    b = out.pop("buckets")
    out["p50_us"] = hist.percentile(b, 0.5) if b else None
    out["p99_us"] = hist.percentile(b, 0.99) if b else None
    out["sent"] = out["requests"] + out["no_response"]
    out["failed"] = out["errors"] + out["no_response"]
    return out


def _sub(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) - b.get(k, 0) for k in a if a.get(k, 0) - b.get(k, 0) > 0}


def _codes(codes: dict, prefix: str = "5") -> str:
    return " or ".join(f"{c}" for c in sorted(codes) if c.startswith(prefix))


def failure_detail(b: dict) -> str:
    parts = []
    own = {c: n for c, n in b["codes"].items() if c.startswith("5")}
    if own:
        parts.append(", ".join(f"{n} answered {c} by the backend" for c, n in sorted(own.items())))
    if b["no_response"]:
        parts.append(f'{b["no_response"]} got no response before the connection ended'
                     + (f', answered {b["cut_code"]} by the balancer' if b.get("cut_code") else ""))
    return "; ".join(parts) or "errors"


def balancer_l7(lb: dict, rows: dict, before: dict) -> dict | None:
    """A balancer's L7 view, from probe l7's rows of its pids: its frontends (what it
    answered its clients, by error status) and its backends (what it sent each, and
    what failed), now and in the window before. None when l7 saw none of its pids."""
    pids = set(lb["pids"])

    def view(src: dict) -> dict:
        mine = [r for r in src.values() if r["host"] == lb["host"] and r["pid"] in pids and r["protocol"] == "http"]
        fronts: dict[str, list] = {}
        backs: dict[str, list] = {}
        for r in mine:
            if r["role"] == "server":
                fronts.setdefault(r["port"], []).append(r)
            elif r["peer"] not in NOT_A_PEER:
                backs.setdefault(f'{r["peer"]}:{r["port"]}', []).append(r)
        return {"frontends": {p: _sum_l7(v) for p, v in fronts.items()},
                "backends": {k: _sum_l7(v) for k, v in backs.items()}, "rows": len(mine)}

    now, then = view(rows), view(before)
    if not now["rows"]:
        return None
    # Requests a backend left without a response became the balancer's own error answer
    # (nginx: 502 on a reset or a refused connect, 504 on a timeout). The frontends'
    # error statuses less those the backends themselves answered (passed on) are the
    # balancer's own; when they add up to exactly the requests without a response,
    # those requests are named by them.
    front = {}
    for f in now["frontends"].values():
        for c, n in f["codes"].items():
            front[c] = front.get(c, 0) + n
    passed = {}
    for b in now["backends"].values():
        for c, n in b["codes"].items():
            passed[c] = passed.get(c, 0) + n
    own = {c: n for c, n in _sub(front, passed).items() if c.startswith("5")}
    cut = sum(b["no_response"] for b in now["backends"].values())
    cut_code = _codes(own) if cut and sum(own.values()) == cut else None
    for k, b in now["backends"].items():
        b["cut_code"] = cut_code if b["no_response"] else None
        codes = {c for c in b["codes"] if c.startswith("5")} | ({b["cut_code"]} if b["cut_code"] else set())
        known = codes and not (b["no_response"] and not b["cut_code"])
        how = f"with {' or '.join(sorted(codes))}" if known else f"({failure_detail(b)})"
        b["text"] = f'{b["failed"]} of {b["sent"]} requests through {lb["process"]} to {k} failed {how}' \
            if b["failed"] else f'all {b["sent"]} requests through {lb["process"]} to {k} were answered'
    return {"frontends": now["frontends"], "backends": now["backends"], "backends_before": then["backends"],
            "own_error_codes": own, "no_response_code": cut_code}


def pools(backends: dict) -> dict[str, dict]:
    """A balancer's upstreams by port: the backends that are replicas of each other."""
    out: dict[str, dict] = {}
    for k, b in backends.items():
        out.setdefault(k.rpartition(":")[2], {})[k] = b
    return out


def balance(pool: dict, workers: int) -> dict:
    """Whether connections were shared evenly over a pool, from the counts alone.

    A fair balancer gives each of n backends N/n of N connections, within the larger of
    - `workers`: round robin runs per worker, so each worker's count per backend is off
      by at most one from its share;
    - three standard deviations of a random assignment, 3 sqrt(N (1/n)(1 - 1/n)), for
      balancers that pick at random (or least-connections under jitter).
    Below 10 connections per backend there is too little to judge."""
    n = len(pool)
    counts = {k: b["active_opens"] for k, b in pool.items()}
    total = sum(counts.values())
    if n < 2 or total < 10 * n:
        return {"fair": None, "connections": total, "tolerance": None, "text": None}
    tol = max(workers, 3 * math.sqrt(total * (1 / n) * (1 - 1 / n)))
    off = {k: c - total / n for k, c in counts.items()}
    fair = all(abs(d) <= tol for d in off.values())
    shares = ", ".join(f"{c / total:.0%}" for _, c in sorted(counts.items()))
    if fair:
        text = f"balancing is fair: {shares} of {total} connections"
    else:
        worst = max(off, key=lambda k: abs(off[k]))
        text = f"balancing is uneven: {worst} got {counts[worst] / total:.0%} of {total} connections"
    return {"fair": fair, "connections": total, "tolerance": round(tol, 1), "text": text}


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.0f} {prefix}{unit}" if prefix == "" else f"{n:.1f} {prefix}{unit}"
        n /= 1000
    return f"{n} {unit}"


def topology(report: dict) -> dict:
    """Nodes (processes, balancers, peers) and edges with volumes, latency and resets;
    abnormal edges marked with the findings' kinds. Where probe l7 saw an edge, it
    carries the requests on it (answered, failed, p99, protocols); an L7 edge with no L4
    flow (the tcp probe off) is an edge of its own."""
    lb_of = {(lb["host"], pid): lb for lb in report["load_balancers"] for pid in lb["pids"]}
    nodes, edges = {}, {}

    def edge(r: dict) -> dict:
        lb = lb_of.get((r["host"], r["pid"]))
        if lb:
            proc = f'{lb["process"]}[{",".join(lb["pids"])}]@{lb["host"]}'
            name = lb["process"]
        else:
            proc = f'{r["comm"]}[{r["pid"]}]@{r["host"]}'
            name = f'{r["comm"]} pid {r["pid"]}'
        nodes[proc] = {"id": proc, "kind": "balancer" if lb else "process"}
        peer = r["peer"] if r["role"] == "server" else f'{r["peer"]}:{r["port"]}'
        nodes.setdefault(peer, {"id": peer, "kind": "client" if r["role"] == "server" else "endpoint"})
        src, dst = (peer, f"{proc}") if r["role"] == "server" else (proc, peer)
        subject = f'{name} -> {peer}' if r["role"] == "client" else f'{name} <- {r["peer"]} on :{r["port"]}'
        return edges.setdefault((src, dst, r["port"]), {
            "source": src, "target": dst, "port": r["port"], "subject": subject, "bytes": 0, "connections": 0,
            "resets": 0, "failed_connects": 0, "srtt_p99_us": None})

    for r in report["talkers"]:
        e = edge(r)
        e["bytes"] += _bytes(r)
        e["connections"] += r["active_opens"] + r["passive_opens"]
        e["resets"] += r["resets_received"]
        e["failed_connects"] += r["connect_refused"] + r["connect_timeouts"]
        e["srtt_p99_us"] = max(e["srtt_p99_us"] or 0, r.get("srtt_p99_us") or 0) or None
    for r in report.get("l7", ()):
        e = edge(r)
        l7 = e.setdefault("l7", {"protocols": [], "requests": 0, "failed": 0, "no_response": 0, "p99_us": None})
        if r["protocol"] not in l7["protocols"]:
            l7["protocols"].append(r["protocol"])
        l7["requests"] += r["requests"] + r["no_response"]
        l7["failed"] += r["errors"] + r["no_response"]
        l7["no_response"] += r["no_response"]
        # p99 of the slowest pid on the edge: an upper bound, like srtt_p99_us
        l7["p99_us"] = max(l7["p99_us"] or 0, r.get("p99_us") or 0) or None
    for e in edges.values():
        e["why"] = sorted({f["kind"] for f in report["findings"] if f["subject"] == e["subject"]})
        e["abnormal"] = bool(e["why"])
    return {"nodes": list(nodes.values()), "edges": list(edges.values())}


def text(report: dict) -> str:
    """The report for a terminal."""
    w = report["window"]
    lines = [f"Sonde backtrack, {_ts(w['from_ms'])} to {_ts(w['to_ms'])}"
             + (f", host {w['host']}" if w["host"] else ""), ""]
    lines.append("Likely cause: " + (report["likely_cause"] or "nothing stands out against the window before"))
    if report["findings"]:
        lines += ["", "Findings (causes ranked; what a cause explains is indented under it):"]
        for f in report["findings"]:
            indent = "      " if f["explained_by"] else ""
            lines.append(f"  {indent}{f['score']:6.1f}  {f['kind']:<22} {f['subject']}: {f['evidence']}")
    lines += ["", "Who talked to whom:",
              f"  {'process':<16}{'pid':>8} {'role':<7}{'peer':<26}{'tx':>12}{'rx':>12}{'conn':>7}{'fail':>6}"
              f"{'rst':>6}{'retx':>6}{'srtt p50/p99 us':>18}"]
    for r in report["talkers"][:30]:
        conns = r["active_opens"] + r["passive_opens"]
        srtt = f'{r.get("srtt_p50_us") or "-"}/{r.get("srtt_p99_us") or "-"}'
        lines.append(f"  {r['comm'][:15]:<16}{r['pid'][:8]:>8} {r['role']:<7}{(r['peer'] + ':' + r['port'])[:25]:<26}"
                     f"{r['tx_bytes']:>12}{r['rx_bytes']:>12}{conns:>7}"
                     f"{r['connect_refused'] + r['connect_timeouts']:>6}{r['resets_received']:>6}"
                     f"{r['retransmits']:>6}{srtt:>18}")
    if report["l7"]:
        lines += ["", "Requests (probe l7, every opted-in process and protocol):",
                  f"  {'process':<16}{'pid':>8} {'role':<7}{'peer':<26}{'protocol':<9}{'requests':>10}{'errors':>8}"
                  f"{'no resp':>8}{'p50/p99 us':>18}"]
        for r in report["l7"][:30]:
            lat = f'{r.get("p50_us") or "-"}/{r.get("p99_us") or "-"}'
            lines.append(f"  {r['comm'][:15]:<16}{r['pid'][:8]:>8} {r['role']:<7}{(r['peer'] + ':' + r['port'])[:25]:<26}"
                         f"{r['protocol'][:8]:<9}{r['requests']:>10}{r['errors']:>8}{r['no_response']:>8}{lat:>18}")
            if r["codes"]:
                lines.append(f"  {'':<24} error statuses: {_codes_text(r['codes'])}")
    for lb in report["load_balancers"]:
        lines += ["", f"Load balancer {lb['process']} on {lb['host']} (pids {', '.join(lb['pids'])}, listening on "
                      f":{', :'.join(sorted(lb['frontends'])) or '-'}): backends"]
        for k, b in sorted(lb["backends"].items()):
            lines.append(f"  {k:<26} conns {b['active_opens']:>6} ({b['connection_share']:.0%})  bytes "
                         f"{_bytes(b):>10} ({b['byte_share']:.0%})  resets {b['resets_received']}"
                         f"  failed {b['connect_refused'] + b['connect_timeouts']}  srtt p99 {b['srtt_p99_us']}")
        for port, bal in sorted(lb["balance"].items()):
            if bal["text"]:
                lines.append(f"  :{port} {bal['text']}")
        l7 = lb.get("l7")
        if l7:
            lines.append("  requests (probe l7):")
            for port, f in sorted(l7["frontends"].items()):
                lines.append(f"    from clients on :{port:<16} {f['requests']:>8} answered  "
                             f"{_codes_text(f['codes'])}  p99 {f['p99_us'] or '-'} us")
            for k, b in sorted(l7["backends"].items()):
                lines.append(f"    to {k:<26} {b['sent']:>8} sent  {b['failed']:>6} failed"
                             f"{' (' + failure_detail(b) + ')' if b['failed'] else ''}  p99 {b['p99_us'] or '-'} us")
        if len(lb["workers"]) > 1:
            lines.append("  workers: " + ", ".join(
                f"pid {pid} {_pct(wk['upstream_share'] or 0)} of upstream bytes"
                f" (before {_pct(wk['before']['upstream_share'] or 0)})" for pid, wk in lb["workers"].items()))
    pinned = [c for c in report["cpu"] if c["pinned"]]
    lines += ["", "CPU (top): " + ", ".join(f"{c['comm']}/{c['pid']} {c['mean_pct']:.0f}%"
                                            + (" PINNED" if c["pinned"] else "") for c in report["cpu"][:8])]
    if pinned:
        lines.append("  pinned near 100% of a core: " + ", ".join(f"{c['comm']} pid {c['pid']}" for c in pinned))
    if report["oom_kills"]:
        lines.append("OOM kills: " + ", ".join(f"{o.get('comm')} pid {o.get('pid')}" for o in report["oom_kills"]))
    if report["alerts"]:
        lines += ["", "Alerts fired:"] + [f"  {a['rule']}: {a['summary']}" for a in report["alerts"]]
    return "\n".join(lines) + "\n"


def _codes_text(codes: dict) -> str:
    return ", ".join(f"{c} x{n}" for c, n in sorted(codes.items())) or "no 4xx/5xx"


def _ts(ms: int) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def as_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=str)
