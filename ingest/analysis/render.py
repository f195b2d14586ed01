"""Pictures of a backtrack: the topology as SVG (laid out by Graphviz's `dot`) and the
key series as PNGs (matplotlib).

The SVG is Graphviz's: `dot` places each edge label as a node of its own rank, so labels
never sit on each other, and edges are routed around nodes. The PNGs have clock time
(UTC) on the time axis, units in the axis labels, per-second rates, and one row per
series on shared axes (small multiples), so series that coincide (backends with equal
traffic) are each seen. Each PNG carries, in its `Sonde` text chunk, what it drew (axis labels,
tick labels, series and their colours) for tools and tests.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from sonde.ingest.errors import SondeError


def _human(n: float, unit: str) -> str:
    for prefix in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.0f} {prefix}{unit}" if not prefix else f"{n:.1f} {prefix}{unit}"
        n /= 1000
    return f"{n:.1f} T{unit}"


def edge_label(e: dict) -> str:
    parts = [_human(e["bytes"], "B"), f'{e["connections"]} conns']
    if e["resets"]:
        parts.append(f'{e["resets"]} resets')
    if e["failed_connects"]:
        parts.append(f'{e["failed_connects"]} failed')
    if e.get("srtt_p99_us"):
        parts.append(f'srtt p99 {e["srtt_p99_us"]} us')
    l7 = e.get("l7")
    if l7:
        parts.append(f'{"/".join(l7["protocols"])} {l7["requests"]} req'
                     + (f', {l7["failed"]} failed' if l7["failed"] else "")
                     + (f', p99 {l7["p99_us"]} us' if l7["p99_us"] else ""))
    return ", ".join(parts)


def topology_svg(topo: dict) -> str:
    """The graph laid out left to right: clients, processes and balancers, endpoints."""
    try:
        import graphviz
    except ImportError:
        raise SondeError("--svg needs the graphviz Python package: pip install graphviz (scripts/setup.sh does)")
    g = graphviz.Digraph("sonde", graph_attr={"rankdir": "LR", "fontname": "sans-serif", "nodesep": "0.3",
                                               "ranksep": "1.2"},
                         node_attr={"fontname": "sans-serif", "fontsize": "11"},
                         edge_attr={"fontname": "sans-serif", "fontsize": "9"})
    ids = {n["id"]: f"n{i}" for i, n in enumerate(topo["nodes"])}
    shape = {"client": "ellipse", "process": "box", "balancer": "box3d", "endpoint": "ellipse"}
    for n in topo["nodes"]:
        g.node(ids[n["id"]], label=n["id"], shape=shape.get(n["kind"], "box"),
               style="filled", fillcolor="#dbe9f6" if n["kind"] in ("process", "balancer") else "#f2f2f2")
    for e in topo["edges"]:
        color = "#d62728" if e["abnormal"] else "#7f7f7f"
        label = edge_label(e) + (f' ({", ".join(e["why"])})' if e["why"] else "")
        width = 1 + min(4.0, len(str(e["bytes"])) / 3)
        g.edge(ids[e["source"]], ids[e["target"]], label=label, color=color, fontcolor=color,
               penwidth=f"{width:.1f}")
    try:
        return g.pipe(format="svg", encoding="utf-8")
    except graphviz.ExecutableNotFound:
        raise SondeError("--svg needs Graphviz's dot: apt-get install graphviz (scripts/setup.sh does)")
    except graphviz.CalledProcessError as e:
        raise SondeError(f"--svg: Graphviz's dot failed: {(e.stderr or b'').decode(errors='replace').strip()[:200]}")


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # with the line styles: told apart in grey print too
STYLES = ("-", "--", "-.", ":")


def plot(bt, w, out_dir, report: dict) -> list[Path]:
    """PNGs of the key series over the window and the one before, the window shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    from sonde.ingest.analysis.backtrack import Window

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SondeError(f"--png: cannot create {out}: {e.strerror}")
    span = w.end_ms - w.start_ms
    wide = Window(w.start_ms - span, w.end_ms, w.host, w.process, w.peer)
    step_s = max(1, span // 1000 // 30)
    lb_of = {(lb["host"], pid): lb for lb in report["load_balancers"] for pid in lb["pids"]}

    def who(r) -> str:
        lb = lb_of.get((r["host"], r["pid"]))
        return lb["process"] if lb else f'{r["comm"]}[{r["pid"]}]'

    utc = dt.timezone.utc
    panels = [
        ("backend_bytes", "Bytes per second to each upstream (connections the process opened)", "bytes/s", "B/s",
         f'SELECT sum("tx_bytes") + sum("rx_bytes") AS "v" FROM "tcp_flow" WHERE {wide.where()} '
         f'AND "role" = \'client\' GROUP BY time({step_s}s), "host", "comm", "pid", "peer", "port" fill(none)',
         lambda r: f'{who(r)} -> {r["peer"]}:{r["port"]}', "sum", 1 / step_s),
        ("srtt_p99", "Smoothed RTT p99 per upstream (largest over the processes)", "srtt p99 (µs)", "",
         f'SELECT max("p99_us") AS "v" FROM "tcp_srtt" WHERE {wide.where()} AND "role" = \'client\' '
         f'GROUP BY time({step_s}s), "host", "comm", "pid", "peer", "port" fill(none)',
         lambda r: f'{who(r)} -> {r["peer"]}:{r["port"]}', "max", 1),
        ("cpu", "CPU per process", "CPU (% of one core)", "%",
         f'SELECT max("cpu_pct") AS "v" FROM "process_cpu" WHERE {wide.where(peer=False)} '
         f'GROUP BY time({step_s}s), "host", "comm", "pid" fill(none)',
         lambda r: f'{r["comm"]}[{r["pid"]}]', "max", 1),
    ]
    written = []
    for name, title, ylabel, unit, q, label, merge, scale in panels:
        series: dict[str, dict[int, float]] = {}
        for r in bt.rows(q):
            if r["v"] is None:
                continue
            s = series.setdefault(label(r), {})
            v = r["v"] * scale
            s[r["time"]] = s.get(r["time"], 0) + v if merge == "sum" else max(s.get(r["time"], v), v)
        top = sorted(series.items(), key=lambda kv: -max(kv[1].values()))[:8]
        # small multiples: one row per series on shared axes, so series that coincide
        # (backends with equal traffic) are each seen, and still compared by height
        fig, axes = plt.subplots(max(1, len(top)), 1, sharex=True, sharey=True, squeeze=False,
                                 figsize=(10, 1.2 + 1.15 * max(1, len(top))))
        axes = [a for (a,) in axes]
        drawn = []
        for i, (key, pts) in enumerate(top):
            ax = axes[i]
            times = sorted(pts)
            line, = ax.plot([dt.datetime.fromtimestamp(t / 1e9, utc) for t in times], [pts[t] for t in times],
                            color=f"C{i}", marker=MARKERS[i % len(MARKERS)], linestyle=STYLES[i % len(STYLES)],
                            linewidth=2, markersize=4)
            ax.set_title(key, loc="left", fontsize=8, pad=2)
            drawn.append({"label": key, "color": matplotlib.colors.to_hex(line.get_color()),
                          "marker": line.get_marker(), "linestyle": line.get_linestyle(),
                          "max": max(pts.values())})
        if not top:
            axes[0].text(0.5, 0.5, "no data in these windows", transform=axes[0].transAxes, ha="center")
        for ax in axes:
            ax.axvspan(dt.datetime.fromtimestamp(w.start_ms / 1000, utc),
                       dt.datetime.fromtimestamp(w.end_ms / 1000, utc), color="orange", alpha=0.15)
            ax.grid(alpha=0.3)
        ax = axes[-1]
        ax.set_xlim(dt.datetime.fromtimestamp(wide.start_ms / 1000, utc), dt.datetime.fromtimestamp(w.end_ms / 1000, utc))
        ax.xaxis.set_major_locator(mdates.AutoDateLocator(tz=utc, minticks=4, maxticks=10))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=utc))
        ax.set_xlabel(f"time (UTC), {dt.datetime.fromtimestamp(w.start_ms / 1000, utc):%Y-%m-%d}; "
                      f"the window shaded, the window before it unshaded")
        if unit == "%":
            ax.yaxis.set_major_formatter("{x:.0f}%")
        elif unit:
            ax.yaxis.set_major_formatter(EngFormatter(unit=unit))
        else:
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        ax.set_ylim(bottom=0)
        fig.suptitle(title, fontsize=10)
        fig.supylabel(ylabel, fontsize=9)
        fig.tight_layout()
        fig.canvas.draw()
        meta = {"title": title, "xlabel": ax.get_xlabel(), "ylabel": ylabel,
                "xticks": [t.get_text() for t in ax.get_xticklabels()],
                "yticks": [t.get_text() for t in ax.get_yticklabels()], "step_s": step_s, "series": drawn}
        path = out / f"{name}.png"
        fig.savefig(path, dpi=90, metadata={"Sonde": json.dumps(meta)})
        plt.close(fig)
        written.append(path)
    return written
