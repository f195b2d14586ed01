"""`sonde backtrack`: what happened on a host in a past window, from stored metrics only.

Every number comes from InfluxQL over the catalog's measurements. Percentiles are
computed from `_hist` buckets summed across the window (and hosts), so they are
exact to the bucket. Findings compare the window with the one just before it, and
backends of one load balancer with each other; the top-ranked finding becomes the
likely cause, in words an operator can act on.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass

from sonde.ingest.runtime import hist

FLOW_FIELDS = ("tx_bytes", "rx_bytes", "active_opens", "passive_opens", "connect_refused", "connect_timeouts",
               "resets_received", "resets_sent", "retransmits")


def _slot(le: str) -> int:
    return hist.SLOTS - 1 if le == hist.INF else int(le).bit_length()


def _regex(value: str) -> str:
    return "/^" + re.sub(r"([\\/.^$|?*+()\[\]{}-])", r"\\\1", value) + "$/"


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
            c.append(f'"{process_tag}" =~ {_regex(self.process)}')
        if self.peer and peer:
            c.append(f'"peer" =~ {_regex(self.peer)}')
        return " AND ".join(c)

    def before(self) -> "Window":
        span = self.end_ms - self.start_ms
        return Window(self.start_ms - span, self.start_ms, self.host, self.process, self.peer)


@dataclass
class Finding:
    score: float
    kind: str
    subject: str
    evidence: str
    cause: str

    def as_dict(self) -> dict:
        return {"score": round(self.score, 2), "kind": self.kind, "subject": self.subject,
                "evidence": self.evidence, "cause": self.cause}


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
        sel = ", ".join(f'sum("{f}") AS "{f}"' for f in FLOW_FIELDS)
        rows = self.rows(f'SELECT {sel} FROM "tcp_flow" WHERE {w.where()} '
                         f'GROUP BY "host", "comm", "role", "peer", "port"')
        for r in rows:
            for f in FLOW_FIELDS:
                r[f] = int(r.get(f) or 0)
        key = ("host", "comm", "role", "peer", "port")
        for name in ("tcp_srtt", "tcp_connect_latency"):
            buckets: dict[tuple, dict[int, int]] = {}
            for b in self.rows(f'SELECT sum("count") AS "n" FROM "{name}_hist" WHERE {w.where()} '
                               f'GROUP BY "host", "comm", "role", "peer", "port", "le"'):
                k = tuple(b[t] for t in key)
                buckets.setdefault(k, {})[_slot(b["le"])] = buckets.get(k, {}).get(_slot(b["le"]), 0) + int(b["n"])
            short = name.removeprefix("tcp_")
            for r in rows:
                b = buckets.get(tuple(r[t] for t in key))
                r[f"{short}_p50_us"] = hist.percentile(b, 0.5) if b else None
                r[f"{short}_p99_us"] = hist.percentile(b, 0.99) if b else None
        return sorted(rows, key=lambda r: -(r["tx_bytes"] + r["rx_bytes"]))

    def load_balancers(self, flows: list[dict], process: str | None) -> list[dict]:
        """Processes with both accepted (frontend) and opened (backend) flows: proxies."""
        by = {}
        for r in flows:
            by.setdefault((r["host"], r["comm"]), []).append(r)
        out = []
        for (host, comm), rs in by.items():
            if process and comm != process:
                continue
            front = [r for r in rs if r["role"] == "server"]
            back = [r for r in rs if r["role"] == "client" and r["peer"] not in ("other", "unknown")]
            if not front or not back:
                continue
            backends = {}
            for r in back:
                b = backends.setdefault(f'{r["peer"]}:{r["port"]}', {f: 0 for f in FLOW_FIELDS})
                for f in FLOW_FIELDS:
                    b[f] += r[f]
                b["srtt_p99_us"] = max(b.get("srtt_p99_us") or 0, r.get("srtt_p99_us") or 0) or None
                b["connect_latency_p99_us"] = max(b.get("connect_latency_p99_us") or 0,
                                                  r.get("connect_latency_p99_us") or 0) or None
            conns = sum(b["active_opens"] for b in backends.values()) or 1
            volume = sum(b["tx_bytes"] + b["rx_bytes"] for b in backends.values()) or 1
            for b in backends.values():
                b["connection_share"] = round(b["active_opens"] / conns, 4)
                b["byte_share"] = round((b["tx_bytes"] + b["rx_bytes"]) / volume, 4)
                b["bytes_per_connection"] = round((b["tx_bytes"] + b["rx_bytes"]) / b["active_opens"], 1) \
                    if b["active_opens"] else None
            frontends = {}
            for r in front:
                f = frontends.setdefault(r["port"], {"passive_opens": 0, "rx_bytes": 0, "tx_bytes": 0, "clients": 0})
                f["passive_opens"] += r["passive_opens"]
                f["rx_bytes"] += r["rx_bytes"]
                f["tx_bytes"] += r["tx_bytes"]
                f["clients"] += 1
            out.append({"host": host, "process": comm, "frontends": frontends, "backends": backends})
        return out

    def cpu(self, w: Window) -> list[dict]:
        rows = self.rows(f'SELECT max("cpu_pct") AS "max_pct", mean("cpu_pct") AS "mean_pct", '
                         f'count("cpu_pct") AS "intervals" FROM "process_cpu" WHERE {w.where(peer=False)} '
                         f'GROUP BY "host", "pid", "comm"')
        pinned = {(r["host"], r["pid"]): int(r["n"]) for r in self.rows(
            f'SELECT count("cpu_pct") AS "n" FROM "process_cpu" WHERE {w.where(peer=False)} AND "cpu_pct" >= 95 '
            f'GROUP BY "host", "pid", "comm"')}
        for r in rows:
            r["pinned_intervals"] = pinned.get((r["host"], r["pid"]), 0)
            r["pinned"] = r["pinned_intervals"] >= 3
        return sorted(rows, key=lambda r: -(r["mean_pct"] or 0))

    def disks(self, w: Window) -> list[dict]:
        rows = self.rows(f'SELECT sum("requests") AS "requests", sum("bytes") AS "bytes", sum("errors") AS "errors" '
                         f'FROM "block_io" WHERE {w.where(process_tag="", peer=False)} GROUP BY "host", "disk", "op"')
        return rows

    def events(self, w: Window, measurement: str) -> list[dict]:
        return self.rows(f'SELECT * FROM "{measurement}" WHERE {w.where(process_tag="", peer=False)}')

    # --- findings ----------------------------------------------------------------------

    def findings(self, flows, before_flows, lbs, cpu, ooms) -> list[Finding]:
        out: list[Finding] = []
        prev = {(r["host"], r["comm"], r["role"], r["peer"], r["port"]): r for r in before_flows}
        for r in flows:
            k = (r["host"], r["comm"], r["role"], r["peer"], r["port"])
            p = prev.get(k, {})
            subject = f'{r["comm"]} -> {r["peer"]}:{r["port"]}' if r["role"] == "client" else \
                f'{r["comm"]} <- {r["peer"]} on :{r["port"]}'
            # resets from clients to a frontend are routine (a client aborting); from a peer
            # this process connected to, they are the backend-reset case
            if r["role"] == "client" and r["resets_received"] > p.get("resets_received", 0):
                out.append(Finding(50 + r["resets_received"], "resets", subject,
                                   f'{r["resets_received"]} resets received (window before: {p.get("resets_received", 0)})',
                                   f'{r["peer"]}:{r["port"]} is resetting connections from {r["comm"]}: check that '
                                   f'backend (its timeouts, its logs around the window)'))
            failed = r["connect_refused"] + r["connect_timeouts"]
            if failed > p.get("connect_refused", 0) + p.get("connect_timeouts", 0):
                out.append(Finding(60 + failed, "failed_connects", subject,
                                   f'{r["connect_refused"]} refused, {r["connect_timeouts"]} timed out',
                                   f'{r["peer"]}:{r["port"]} is not accepting connections from {r["comm"]} '
                                   f'(health check failing): is it listening?'))
        for lb in lbs:
            backs = lb["backends"]
            if len(backs) < 2:
                continue
            srtts = {k: b["srtt_p99_us"] for k, b in backs.items() if b.get("srtt_p99_us")}
            bpcs = {k: b["bytes_per_connection"] for k, b in backs.items() if b.get("bytes_per_connection")}
            for k, b in backs.items():
                others = [v for o, v in srtts.items() if o != k]
                if k in srtts and others and srtts[k] > 4 * statistics.median(others) and srtts[k] >= 2000:
                    ratio = srtts[k] / statistics.median(others)
                    out.append(Finding(30 + min(ratio, 50), "slow_backend_path", f'{lb["process"]} -> {k}',
                                       f'srtt p99 {srtts[k]} us against {statistics.median(others):g} us for the other '
                                       f'backends; {b["connection_share"]:.0%} of connections, '
                                       f'{b["byte_share"]:.0%} of bytes',
                                       f'the network path from {lb["process"]} to {k} is slow or bandwidth-limited '
                                       f'(balancing is fair: connections are shared evenly); check that link'))
                others_b = [v for o, v in bpcs.items() if o != k]
                if k in bpcs and others_b and bpcs[k] < 0.5 * statistics.median(others_b) and \
                        not any(f.subject == f'{lb["process"]} -> {k}' for f in out):
                    out.append(Finding(25, "low_throughput_backend", f'{lb["process"]} -> {k}',
                                       f'{bpcs[k]:g} bytes per connection against {statistics.median(others_b):g}',
                                       f'less data moves on each connection to {k}: a limited path or a slow backend'))
        for c in cpu:
            if c["pinned"]:
                out.append(Finding(40 + c["pinned_intervals"], "cpu_pinned", f'{c["comm"]} (pid {c["pid"]})',
                                   f'at >= 95% of a core for {c["pinned_intervals"]} intervals (max {c["max_pct"]:.0f}%)',
                                   f'{c["comm"]} pid {c["pid"]} is stuck on its core: take a stack of that process '
                                   f'(or restart it); its share of traffic is suffering'))
        for o in ooms:
            out.append(Finding(45, "oom_kill", f'{o.get("comm")} (pid {o.get("pid")})',
                               f'OOM-killed in cgroup {o.get("cgroup") or "?"}',
                               f'{o.get("comm")} ran out of memory in {o.get("cgroup") or "its cgroup"}'))
        return sorted(out, key=lambda f: -f.score)

    # --- the report --------------------------------------------------------------------

    def report(self, w: Window) -> dict:
        self.progress("flows")
        flows = self.flows(w)
        before = self.flows(w.before())
        self.progress("load balancers")
        lbs = self.load_balancers(flows, w.process)
        before_lbs = {(x["host"], x["process"]): x for x in self.load_balancers(before, w.process)}
        for lb in lbs:
            b = before_lbs.get((lb["host"], lb["process"]))
            now_bytes = sum(x["tx_bytes"] + x["rx_bytes"] for x in lb["backends"].values())
            then_bytes = sum(x["tx_bytes"] + x["rx_bytes"] for x in b["backends"].values()) if b else 0
            now_p99 = max((x.get("connect_latency_p99_us") or 0 for x in lb["backends"].values()), default=0)
            then_p99 = max((x.get("connect_latency_p99_us") or 0 for x in b["backends"].values()), default=0) if b else 0
            lb["vs_before"] = {"backend_bytes": now_bytes, "backend_bytes_before": then_bytes,
                               "backend_bytes_ratio": round(now_bytes / then_bytes, 3) if then_bytes else None,
                               "backend_connect_p99_us": now_p99, "backend_connect_p99_us_before": then_p99}
        self.progress("cpu")
        cpu = self.cpu(w)
        self.progress("disks and OOM")
        disks = self.disks(w)
        ooms = self.events(w, "oom_kill")
        self.progress("alerts and anomalies")
        alerts = [a for a in self.events(w, "sonde_alert") if a.get("state") == "firing"]
        anomalies = self.events(w, "sonde_anomaly")
        findings = self.findings(flows, before, lbs, cpu, ooms)
        return {
            "window": {"from_ms": w.start_ms, "to_ms": w.end_ms, "host": w.host, "process": w.process,
                       "peer": w.peer},
            "talkers": flows,
            "load_balancers": lbs,
            "cpu": cpu[:20],
            "disks": disks,
            "oom_kills": ooms,
            "alerts": [{"rule": a["rule"], "summary": a.get("summary"), "time": a["time"]} for a in alerts],
            "anomalies": [{"metric": a["metric"], "score": a.get("score"), "text": a.get("text")} for a in anomalies],
            "findings": [f.as_dict() for f in findings],
            "likely_cause": findings[0].cause if findings else None,
        }


def topology(report: dict) -> dict:
    """Nodes (processes, peers) and edges with volumes, latency and resets; abnormal edges marked."""
    abnormal = {f["subject"] for f in report["findings"]}
    nodes, edges = {}, []
    for r in report["talkers"]:
        proc = f'{r["comm"]}@{r["host"]}'
        peer = r["peer"] if r["role"] == "server" else f'{r["peer"]}:{r["port"]}'
        nodes[proc] = {"id": proc, "kind": "process"}
        nodes.setdefault(peer, {"id": peer, "kind": "client" if r["role"] == "server" else "endpoint"})
        src, dst = (peer, proc) if r["role"] == "server" else (proc, peer)
        subject = f'{r["comm"]} -> {r["peer"]}:{r["port"]}' if r["role"] == "client" else \
            f'{r["comm"]} <- {r["peer"]} on :{r["port"]}'
        marks = [f["kind"] for f in report["findings"] if f["subject"] in (subject, f'{r["comm"]} -> {peer}')]
        edges.append({"source": src, "target": dst, "bytes": r["tx_bytes"] + r["rx_bytes"],
                      "connections": r["active_opens"] + r["passive_opens"], "resets": r["resets_received"],
                      "failed_connects": r["connect_refused"] + r["connect_timeouts"],
                      "srtt_p99_us": r.get("srtt_p99_us"), "abnormal": bool(marks) or subject in abnormal,
                      "why": marks})
    return {"nodes": list(nodes.values()), "edges": edges}


def topology_svg(topo: dict) -> str:
    """A plain 2D layout: clients left, processes middle, endpoints right."""
    cols = {"client": 80, "process": 380, "endpoint": 680}
    ys, pos = {"client": 0, "process": 0, "endpoint": 0}, {}
    for n in topo["nodes"]:
        ys[n["kind"]] += 1
        pos[n["id"]] = (cols[n["kind"]], 40 + 50 * ys[n["kind"]])
    height = 80 + 50 * max(ys.values() or [1])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="860" height="{height}" font-family="sans-serif" '
           f'font-size="11">']
    for e in topo["edges"]:
        (x1, y1), (x2, y2) = pos[e["source"]], pos[e["target"]]
        color = "#d62728" if e["abnormal"] else "#7f7f7f"
        width = 1 + min(6, math.log10(1 + e["bytes"]) / 2)
        label = f'{e["bytes"]} B, {e["connections"]} conns' + (f', {e["resets"]} resets' if e["resets"] else "") + \
            (f', {e["failed_connects"]} failed' if e["failed_connects"] else "")
        out.append(f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{color}" stroke-width="{width:.1f}"/>')
        out.append(f'<text x="{(x1 + x2) / 2}" y="{(y1 + y2) / 2 - 4}" fill="{color}">{_xml(label)}</text>')
    for n in topo["nodes"]:
        x, y = pos[n["id"]]
        out.append(f'<circle cx="{x}" cy="{y}" r="6" fill="#1f77b4"/>')
        out.append(f'<text x="{x + 9}" y="{y + 4}">{_xml(n["id"])}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _xml(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def text(report: dict) -> str:
    """The report for a terminal."""
    w = report["window"]
    lines = [f"Sonde backtrack, {_ts(w['from_ms'])} to {_ts(w['to_ms'])}"
             + (f", host {w['host']}" if w["host"] else ""), ""]
    lines.append("Likely cause: " + (report["likely_cause"] or "nothing stands out against the window before"))
    if report["findings"]:
        lines += ["", "Findings (ranked):"]
        lines += [f"  {f['score']:6.1f}  {f['kind']:<22} {f['subject']}: {f['evidence']}" for f in report["findings"]]
    lines += ["", "Who talked to whom:",
              f"  {'process':<16}{'role':<8}{'peer':<26}{'tx':>12}{'rx':>12}{'conn':>7}{'fail':>6}{'rst':>6}"
              f"{'retx':>6}{'srtt p50/p99 us':>18}"]
    for r in report["talkers"][:30]:
        conns = r["active_opens"] + r["passive_opens"]
        srtt = f'{r.get("srtt_p50_us") or "-"}/{r.get("srtt_p99_us") or "-"}'
        lines.append(f"  {r['comm'][:15]:<16}{r['role']:<8}{(r['peer'] + ':' + r['port'])[:25]:<26}"
                     f"{r['tx_bytes']:>12}{r['rx_bytes']:>12}{conns:>7}"
                     f"{r['connect_refused'] + r['connect_timeouts']:>6}{r['resets_received']:>6}"
                     f"{r['retransmits']:>6}{srtt:>18}")
    for lb in report["load_balancers"]:
        lines += ["", f"Load balancer {lb['process']} on {lb['host']}: backends"]
        for k, b in sorted(lb["backends"].items()):
            lines.append(f"  {k:<26} conns {b['active_opens']:>6} ({b['connection_share']:.0%})  bytes "
                         f"{b['tx_bytes'] + b['rx_bytes']:>10} ({b['byte_share']:.0%})  resets {b['resets_received']}"
                         f"  failed {b['connect_refused'] + b['connect_timeouts']}  srtt p99 {b['srtt_p99_us']}")
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


def _ts(ms: int) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def as_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=str)


def plot(bt: Backtrack, w: Window, out_dir, report: dict) -> list:
    """PNG plots of the key series over the window and the one before, the window shaded."""
    from pathlib import Path

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    span = w.end_ms - w.start_ms
    wide = Window(w.start_ms - span, w.end_ms, w.host, w.process, w.peer)
    step_s = max(1, span // 1000 // 30)
    panels = [
        ("backend_bytes", "bytes per interval to each peer (role client)",
         f'SELECT sum("tx_bytes") + sum("rx_bytes") AS "v" FROM "tcp_flow" WHERE {wide.where()} AND "role" = \'client\' '
         f'GROUP BY time({step_s}s), "comm", "peer"', ("comm", "peer")),
        ("srtt_p99", "srtt p99 (us) per peer",
         f'SELECT max("p99_us") AS "v" FROM "tcp_srtt" WHERE {wide.where()} GROUP BY time({step_s}s), "comm", "peer"',
         ("comm", "peer")),
        ("cpu", "CPU % of a core, per process",
         f'SELECT max("cpu_pct") AS "v" FROM "process_cpu" WHERE {wide.where(peer=False)} '
         f'GROUP BY time({step_s}s), "comm", "pid"', ("comm", "pid")),
    ]
    written = []
    for name, title, q, labels in panels:
        series: dict[tuple, list] = {}
        for r in bt.rows(q):
            if r["v"] is not None:
                series.setdefault(tuple(r[l] for l in labels), []).append((r["time"] / 1e9, r["v"]))
        top = sorted(series.items(), key=lambda kv: -max(v for _, v in kv[1]))[:8]
        fig, ax = plt.subplots(figsize=(9, 3.5))
        for key, pts in top:
            ax.plot([t for t, _ in pts], [v for _, v in pts], label=" ".join(key))
        ax.axvspan(w.start_ms / 1000, w.end_ms / 1000, color="orange", alpha=0.15, label="window")
        ax.set_title(title)
        ax.set_xlabel("unix time (s)")
        if top:
            ax.legend(fontsize=7, loc="upper left")
        path = out / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
