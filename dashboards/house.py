"""House style for Sonde's dashboards, so each `*.dashboard.py` stays a short list of panels.

Panels take `sonde.ingest.analysis.queries.Query` objects (catalog-checked) and lay themselves out
on a 24-column grid. `render()` turns a grafanalib Dashboard into the JSON Sonde
ships: grafanalib's output normalised to the current Grafana model (its legacy
keys dropped or renamed), which validates against the Grafana 11.6 schemas.

Rates and per-poll averages are exact only when a `$__interval` bucket holds whole
polls: the agent writes one delta per poll, so a bucket shorter than the poll
interval is either empty (0) or holds a whole poll's delta (a spike), the sawtooth
of a default 1 h view. `render()` therefore gives every time-bucketed panel a
minimum interval (`min_interval()`): the smallest multiple of the poll interval
above which every interval Grafana picks is itself a multiple of the poll interval.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import attr
from grafanalib import core as g
from grafanalib._gen import DashboardEncoder
from grafanalib.influxdb import InfluxDBTarget

from sonde.ingest.config import Config
from sonde.ingest.docs import replace_section
from sonde.ingest.analysis.queries import Query

DATASOURCE = {"type": "influxdb", "uid": "sonde-influxdb"}
DASH_DIR = Path(__file__).resolve().parent


def target(q: Query, ref: str, alias: str = "") -> InfluxDBTarget:
    return InfluxDBTarget(query=q.influxql(), alias=alias, refId=ref, datasource=DATASOURCE)


class Grid:
    """Places panels left to right, wrapping at 24 columns."""

    def __init__(self):
        self.x = self.y = 0
        self.row_h = 0

    def __call__(self, w: int, h: int) -> g.GridPos:
        if self.x + w > 24:
            self.x, self.y = 0, self.y + self.row_h
            self.row_h = 0
        pos = g.GridPos(h=h, w=w, x=self.x, y=self.y)
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos


def timeseries(grid: Grid, title: str, queries: list[tuple[Query, str]], unit: str = "short",
               w: int = 12, h: int = 8, description: str = "") -> g.TimeSeries:
    return g.TimeSeries(title=title, description=description, dataSource=DATASOURCE,
                        targets=[target(q, chr(65 + i), alias) for i, (q, alias) in enumerate(queries)],
                        unit=unit, gridPos=grid(w, h))


def table(grid: Grid, title: str, queries: list[tuple[Query, str]], w: int = 24, h: int = 8,
          description: str = "") -> g.Table:
    return g.Table(title=title, description=description, dataSource=DATASOURCE,
                   targets=[InfluxDBTarget(query=q.influxql(), alias=a, refId=chr(65 + i), datasource=DATASOURCE,
                                           format="table") for i, (q, a) in enumerate(queries)],
                   gridPos=grid(w, h))


def stat(grid: Grid, title: str, q: Query, unit: str = "short", w: int = 6, h: int = 4,
         description: str = "") -> g.Stat:
    return g.Stat(title=title, description=description, dataSource=DATASOURCE, targets=[target(q, "A")],
                  format=unit, reduceCalc="sum", gridPos=grid(w, h))


@attr.s
class HeatmapPanel:
    """A current-model heatmap over pre-bucketed `le` series (grafanalib's Heatmap is the legacy one)."""
    title = attr.ib()
    query = attr.ib()
    gridPos = attr.ib()
    unit = attr.ib(default="µs")
    description = attr.ib(default="")

    def to_json_data(self):
        return {
            "type": "heatmap", "title": self.title, "description": self.description, "datasource": DATASOURCE,
            "gridPos": self.gridPos,
            "targets": [{"refId": "A", "datasource": DATASOURCE, "query": self.query.influxql(), "rawQuery": True,
                         "resultFormat": "time_series", "alias": "$tag_le"}],
            "options": {
                "calculate": False,
                "color": {"mode": "scheme", "scheme": "Oranges", "fill": "dark-orange", "scale": "exponential",
                          "exponent": 0.5, "steps": 64, "reverse": False},
                "showValue": "never", "cellGap": 1,
                "yAxis": {"axisPlacement": "left", "unit": self.unit, "reverse": False},
                "rowsFrame": {"layout": "le"},
                "legend": {"show": True}, "tooltip": {"mode": "single", "yHistogram": False, "showColorScale": False},
                "exemplars": {"color": "rgba(255,0,255,0.7)"},
            },
            "fieldConfig": {"defaults": {}, "overrides": []},
        }


def heatmap(grid: Grid, title: str, q: Query, unit: str = "µs", w: int = 12, h: int = 8,
            description: str = "") -> HeatmapPanel:
    return HeatmapPanel(title=title, query=q, gridPos=grid(w, h), unit=unit, description=description)


def variable(name: str, label: str, query: str, include_all: bool = True) -> g.Template:
    return g.Template(name=name, label=label, query=query, dataSource=DATASOURCE, includeAll=include_all,
                      multi=False, allValue=".*", default="All" if include_all else None)


HOST_VAR = variable("host", "Host", 'SHOW TAG VALUES FROM "sonde_probe" WITH KEY = "host"')
PROCESS_VAR = variable("process", "Process", 'SHOW TAG VALUES FROM "process_cpu" WITH KEY = "comm" '
                                             'WHERE "host" =~ /^$host$/')
PEER_VAR = variable("peer", "Peer", 'SHOW TAG VALUES FROM "tcp_flow" WITH KEY = "peer" WHERE "host" =~ /^$host$/')


# Percent of one core (CPU) or of the time (disk busy) over each bucket: time summed over every
# series the panel merges and every poll in the bucket, over the bucket's length.
CPU_PCT = "sum(oncpu_us) / ($__interval_ms * 10)"
BUSY_PCT = "sum(busy_us) / ($__interval_ms * 10)"

ANOMALY_QUERY = Query("sonde_anomaly", ("text", "score", "metric"), (("host", "$host"),), (),
                      time_bucket=False)
ALERT_QUERY = Query("sonde_alert", ("summary", "value", "rule"), (("host", "$host"), ("state", "firing")), (),
                    time_bucket=False)


def marks(grid: Grid) -> g.Table:
    """Anomaly marks and firing alerts in range, newest first.

    These would be annotations, but the Grafana 11.6 schema's AnnotationTarget only
    models the built-in Grafana datasource (no InfluxDB `query`), and the schema is
    not to be loosened; so every dashboard ends with them as a table."""
    return table(grid, "Anomaly marks and alerts in range", [(ANOMALY_QUERY, "anomalies"), (ALERT_QUERY, "alerts")],
                 h=6, description="sonde_anomaly and sonde_alert (firing) points for this host.")


def dashboard(uid: str, title: str, panels: list, variables: list, description: str = "") -> g.Dashboard:
    grid = Grid()
    grid.y = 1000  # below every other panel: Grafana compacts the gap
    return g.Dashboard(title=title, uid=uid, description=description, tags=["sonde"],
                       panels=panels + [marks(grid)], templating=g.Templating(list=variables), timezone="utc",
                       time=g.Time("now-1h", "now"), refresh="30s")


# --- rendering and normalisation -----------------------------------------------------

_PANEL_KEYS = {"type", "id", "pluginVersion", "targets", "title", "description", "transparent", "datasource",
               "gridPos", "links", "repeat", "repeatDirection", "maxPerRow", "maxDataPoints", "transformations",
               "interval", "timeFrom", "timeShift", "hideTimeOverride", "libraryPanel", "cacheTimeout",
               "queryCachingTTL", "options", "fieldConfig"}
_DASH_KEYS = {"id", "uid", "title", "description", "revision", "gnetId", "tags", "timezone", "editable",
              "graphTooltip", "time", "timepicker", "fiscalYearStartMonth", "liveNow", "weekStart", "refresh",
              "schemaVersion", "version", "panels", "templating", "annotations", "links", "snapshot", "preload"}
_VAR_KEYS = {"type", "name", "label", "hide", "skipUrlSync", "description", "query", "datasource", "current",
             "multi", "allowCustomValue", "options", "refresh", "sort", "includeAll", "allValue", "regex", "auto",
             "auto_min", "auto_count"}


DEFAULT_POLL_S = Config.model_fields["interval_seconds"].default

# Every interval Grafana's auto interval can take (rangeutil.ts roundInterval), in ms.
GRAFANA_INTERVALS_MS = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 15000, 20000, 30000, 60000, 120000,
                        300000, 600000, 900000, 1200000, 1800000, 3600000, 7200000, 10800000, 21600000, 43200000,
                        86400000, 604800000, 2592000000, 31536000000)


def min_interval_ms(poll_s: float) -> int:
    """The smallest multiple of the poll interval such that every larger interval Grafana
    may pick is a multiple of the poll interval too (10 s polls: 20 s, since Grafana's
    15 s would hold one poll and two by turns). A poll interval that divides none of
    Grafana's (7 s) gets itself: such buckets hold a varying number of polls."""
    poll = round(poll_s * 1000)
    for k in range(1, 3_600_000 // poll + 1):
        if not any(v % poll for v in GRAFANA_INTERVALS_MS if v > k * poll):
            return k * poll
    return poll


def duration(ms: int) -> str:
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _prune(obj):
    """Drop None values (grafanalib's "unset") everywhere; the schema wants them absent."""
    if isinstance(obj, dict):
        return {k: _prune(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_prune(v) for v in obj]
    return obj


def _panel(p: dict, pid: int, poll_s: float) -> dict:
    p = _prune(p)
    out = {k: v for k, v in p.items() if k in _PANEL_KEYS and v != ""}
    out["id"] = pid
    if isinstance(out.get("repeat"), dict):  # grafanalib's legacy repeat object
        out.pop("repeat")
    for t in out.get("targets", []):
        for k in [k for k, v in t.items() if v in ("", None)]:
            del t[k]
        if "query" in t:
            t["query"] = t["query"].replace("$__poll_ms", str(round(poll_s * 1000)))
    if any("$__interval" in t.get("query", "") for t in out.get("targets", [])):
        out["interval"] = duration(min_interval_ms(poll_s))
    out.setdefault("fieldConfig", {"defaults": {}, "overrides": []})
    # Options the current model requires that grafanalib predates, at Grafana's defaults.
    opts = out.setdefault("options", {})
    if out["type"] == "timeseries" and isinstance(opts.get("legend"), dict):
        opts["legend"].setdefault("showLegend", True)
    if out["type"] == "stat":
        opts.setdefault("wideLayout", True)
        opts.setdefault("showPercentChange", False)
        opts.setdefault("percentChangeColorMode", "standard")
    if out["type"] == "table":
        opts.setdefault("frameIndex", 0)
        out["fieldConfig"].setdefault("defaults", {}).setdefault("custom", {}).setdefault("inspect", False)
    thresholds = out["fieldConfig"].get("defaults", {}).get("thresholds")
    if thresholds is not None and not isinstance(thresholds.get("steps"), list):
        thresholds["steps"] = []  # grafanalib's Stat leaves "" here
    return out


def _variable(v: dict) -> dict:
    v = _prune(v)
    out = {k: val for k, val in v.items() if k in _VAR_KEYS}
    current = {k: val for k, val in out.get("current", {}).items() if k in ("text", "value", "selected")}
    if current.get("text") is None or current.get("value") is None:
        out.pop("current", None)
    else:
        out["current"] = current
    if out.get("type") != "interval":
        for k in ("auto", "auto_min", "auto_count"):
            out.pop(k, None)
    return out


def render(dash: g.Dashboard, poll_s: float = DEFAULT_POLL_S) -> dict:
    """grafanalib's JSON, normalised to the current Grafana model, for an agent polling
    every `poll_s` seconds."""
    raw = json.loads(json.dumps(dash.to_json_data(), cls=DashboardEncoder))
    out = {k: v for k, v in raw.items() if k in _DASH_KEYS and v is not None}
    picker = raw.get("timepicker") or raw.get("timePicker")
    if picker is not None:  # grafanalib's time_options and nowDelay are gone from the model
        out["timepicker"] = {k: v for k, v in _prune(picker).items() if k in ("refresh_intervals", "hidden")}
    out["panels"] = [_panel(p, i + 1, poll_s) for i, p in enumerate(raw.get("panels", []))]
    out["templating"] = {"list": [_variable(v) for v in raw.get("templating", {}).get("list", [])]}
    out["annotations"] = {"list": [_prune(a) for a in raw.get("annotations", {}).get("list", [])]}
    return out


def load_all() -> dict[str, g.Dashboard]:
    """Every dashboards/*.dashboard.py, by file stem."""
    found = {}
    for path in sorted(DASH_DIR.glob("*.dashboard.py")):
        spec = importlib.util.spec_from_file_location(f"sonde_dashboard_{path.name[:-13]}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        found[path.name.removesuffix(".dashboard.py")] = mod.dashboard
    return found


def write_all(out_dir: Path, poll_s: float = DEFAULT_POLL_S) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, dash in load_all().items():
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(render(dash, poll_s), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def queries_of(rendered: dict, marks: bool = False) -> list[str]:
    """Every InfluxQL query in a rendered dashboard: panel targets and template variables.
    The marks table (anomalies, alerts) is left out unless asked for: a calm range has none."""
    qs = [t["query"] for p in rendered["panels"] for t in p.get("targets", []) if t.get("query")
          and (marks or "sonde_anomaly" not in t["query"] and "sonde_alert" not in t["query"])]
    qs += [v["query"] for v in rendered["templating"]["list"] if v.get("query")]
    return qs


def markdown_list() -> str:
    """The README's list of dashboards and panels, generated so it cannot drift."""
    lines = []
    for name, dash in load_all().items():
        r = render(dash)
        lines.append(f"- **{r['title']}** (`dashboards/{name}.dashboard.py`, uid `{r['uid']}`): {r['description']}")
        lines += [f"  - {p['title']} ({p['type']})" for p in r["panels"]]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path) -> None:
    replace_section(readme, "dashboards", markdown_list())
