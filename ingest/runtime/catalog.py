"""The metric catalog: the single contract between producers and consumers.

Every measurement, tag and field Sonde writes is declared once, with its unit and
meaning: each probe's in bpf/<probe>/metrics.py (`MEASUREMENTS`), the agent's own
here. `MEASUREMENTS` assembles them on first use, by the same discovery that finds
the probes, so a new probe edits nothing here. Probes may emit only what is declared
(`validate_point`); dashboards, alerts and backtrack may reference only what is
declared. `render_markdown()` generates docs/metrics.md, and a test fails when that
file is stale.

Names are a public API: renaming one breaks users' dashboards and queries.
Units live in field names (`_bytes`, `_seconds`, `_us`) and are converted once,
in the probe's decoder, never in a dashboard.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from sonde.ingest.errors import CatalogError


@dataclass(frozen=True)
class Tag:
    name: str
    help: str


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # "int" | "float" | "str"
    unit: str
    help: str


@dataclass(frozen=True)
class Measurement:
    name: str
    kind: str  # "delta" (per-interval counter deltas) | "gauge" | "event"
    help: str
    tags: tuple[Tag, ...]
    fields: tuple[Field, ...]
    source: str = ""

    @property
    def tag_names(self) -> frozenset[str]:
        return frozenset(t.name for t in self.tags)

    @property
    def field_names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.fields)

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise CatalogError(f"measurement {self.name} has no field {name!r} in the catalog")


HOST = Tag("host", "Host name of the agent that wrote the point (config `host`, default the system hostname).")
PID = Tag("pid", "Process id (tgid) in the root pid namespace, or `other` for processes folded past the top-N limit.")
COMM = Tag("comm", "Process name (kernel comm, at most 15 bytes); bytes that are not printable UTF-8 are written as \\xNN.")
PROBE = Tag("probe", "Probe name: its folder, bpf/<probe>/.")

LE = Tag("le", "Histogram bucket upper bound, inclusive, in the measurement's unit; `+Inf` for the last.")
INTERVAL_NOTE = "Per-interval delta: sum over time and divide by the interval for a rate."


def histogram(name: str, what: str, source: str, tags: tuple[Tag, ...]) -> tuple[Measurement, Measurement]:
    """A histogram is two measurements: `<name>_hist` buckets and `<name>` summary."""
    return (Measurement(
        name=f"{name}_hist",
        kind="delta",
        help=f"{what}: exp2 histogram buckets, non-cumulative counts per interval. Sum `count` "
             f"over hosts and time, then take percentiles from the summed buckets.",
        source=source,
        tags=tags + (LE,),
        fields=(Field("count", "int", "observations", "Observations in this bucket this interval."),),
    ), Measurement(
        name=name,
        kind="delta",
        help=f"{what}: per-interval summary. Percentiles are bucket upper bounds from this "
             f"interval's buckets (alerts may use them; backtrack recomputes from `{name}_hist`).",
        source=source,
        tags=tags,
        fields=(
            Field("count", "int", "observations", "Observations this interval."),
            Field("sum_us", "int", "us", "Sum of observed values."),
            Field("max_us", "int", "us", "Largest observed value this interval."),
            Field("p50_us", "int", "us", "Median (bucket upper bound)."),
            Field("p90_us", "int", "us", "90th percentile (bucket upper bound)."),
            Field("p99_us", "int", "us", "99th percentile (bucket upper bound)."),
        ),
    ))

SONDE_ALERT = Measurement(
    name="sonde_alert",
    kind="event",
    help="Alert transitions from the agent's built-in evaluator (alerts/thresholds.yaml): one point when "
         "an alert instance fires and one when it resolves.",
    source="agent (ingest/analysis/alerting.py)",
    tags=(HOST, Tag("rule", "Rule name, as in alerts/thresholds.yaml."),
          Tag("severity", "critical or warning."), Tag("state", "firing or resolved.")),
    fields=(
        Field("value", "float", "rule unit", "The rule's value at the transition (its formula over its queries)."),
        Field("labels", "str", "json", "The alert instance's labels (the series' tags), as a JSON object."),
        Field("summary", "str", "text", "What fired, in words, with the labels filled in."),
    ),
)

SONDE_ANOMALY = Measurement(
    name="sonde_anomaly",
    kind="event",
    help="Anomaly marks: the latest window of a key series far from the median of the windows before it "
         "(robust deviation score). Shown as Grafana annotations; ranked by backtrack.",
    source="agent (ingest/analysis/anomaly.py)",
    tags=(HOST, Tag("metric", "bytes_to_peer, srtt_p99, process_cpu or disk_latency_p99."),
          Tag("direction", "high or low.")),
    fields=(
        Field("score", "float", "robust sd", "(value - median) / (1.4826 x MAD) of the preceding windows."),
        Field("value", "float", "metric unit", "The latest window's value."),
        Field("baseline_median", "float", "metric unit", "Median of the preceding windows."),
        Field("labels", "str", "json", "The series' tags, as a JSON object."),
        Field("text", "str", "text", "The mark in words, for the annotation."),
    ),
)

SONDE_PROBE = Measurement(
    name="sonde_probe",
    kind="gauge",
    help="The agent's report on each probe, one point per poll.",
    source="agent",
    tags=(HOST, PROBE),
    fields=(
        Field("poll_duration_seconds", "float", "seconds", "Wall time to read and decode the probe's maps."),
        Field("poll_success", "int", "bool", "1 when the poll completed, 0 when it raised."),
        Field("map_entries", "int", "entries", "Live entries in the probe's maps after the poll."),
        Field("map_full_drops", "int", "events",
              "Events not counted because a map was full, this interval. Non-zero means lost data: raise the map size."),
        Field("points", "int", "points", "Points the poll produced."),
        Field("kernel_misses", "int", "events",
              "Hook invocations the kernel skipped this interval because another BPF program was running on "
              "that CPU (bpf_prog_info.recursion_misses). Counts in this probe are short by at most this many."),
        Field("hooks_missing", "int", "hooks",
              "Optional tracepoints this kernel lacks; the metrics they feed are off (named in the agent's log)."),
        Field("bpf_run_count", "int", "runs",
              "Runs of the probe's BPF programs this interval (bpf_prog_info.run_cnt). Only with config "
              "`bpf_stats: true`: the probe's own event rate, per request or per connection."),
        Field("bpf_run_time_ns", "int", "ns",
              "Time the probe's BPF programs ran this interval (bpf_prog_info.run_time_ns): Sonde's in-kernel cost. "
              "Only with `bpf_stats: true`; excludes a regular tracepoint's own record-filling cost."),
    ),
)

SONDE_SPOOL = Measurement(
    name="sonde_spool",
    kind="gauge",
    help="The agent's disk spool between polls and the sink, one point per poll.",
    source="agent",
    tags=(HOST,),
    fields=(
        Field("queued_points", "int", "points", "Points waiting for delivery: in the spool, and any a failed spool write holds in memory."),
        Field("dropped_points", "int", "points",
              "Oldest points dropped this interval because the spool was past its bound. " + INTERVAL_NOTE),
        Field("written_points", "int", "points", "Points the sink accepted this interval."),
        Field("rejected_points", "int", "points", "Points the server refused as malformed this interval (dropped, logged)."),
        Field("write_errors", "int", "errors", "Failed write attempts this interval (retried with backoff)."),
    ),
)


AGENT_MEASUREMENTS = (SONDE_ALERT, SONDE_ANOMALY, SONDE_PROBE, SONDE_SPOOL)


def probe_measurements(bpf_dir: Path | None = None, package: str = "sonde.bpf") -> dict[str, tuple[Measurement, ...]]:
    """Each probe folder's declared measurements: bpf/<probe>/metrics.py's `MEASUREMENTS`."""
    if bpf_dir is None:
        import sonde.bpf
        bpf_dir = Path(sonde.bpf.__file__).parent
    found = {}
    for metrics in sorted(bpf_dir.glob("*/metrics.py")):
        name = metrics.parent.name
        declared = getattr(importlib.import_module(f"{package}.{name}.metrics"), "MEASUREMENTS", None)
        if not isinstance(declared, tuple) or not all(isinstance(m, Measurement) for m in declared):
            raise CatalogError(f"bpf/{name}/metrics.py must define MEASUREMENTS, a tuple of Measurement")
        found[name] = declared
    return found


class _Catalog(Mapping):
    """measurement name -> Measurement, assembled from the probes and the agent on first use."""

    def __init__(self):
        self._by_name: dict[str, Measurement] | None = None

    def _all(self) -> dict[str, Measurement]:
        if self._by_name is None:
            by_name: dict[str, Measurement] = {}
            owners: dict[str, str] = {}
            declared = {"the agent": AGENT_MEASUREMENTS, **{f"probe {k}": v for k, v in probe_measurements().items()}}
            for owner, measurements in declared.items():
                for m in measurements:
                    if m.name in by_name:
                        raise CatalogError(f"measurement {m.name} declared twice: by {owners[m.name]} and {owner}")
                    by_name[m.name], owners[m.name] = m, owner
            self._by_name = by_name
        return self._by_name

    def __getitem__(self, name: str) -> Measurement:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


MEASUREMENTS: Mapping[str, Measurement] = _Catalog()


def validate_point(measurement: str, tags: dict, fields: dict) -> None:
    """Raise CatalogError unless the point uses only declared names and types."""
    m = MEASUREMENTS.get(measurement)
    if m is None:
        raise CatalogError(f"measurement {measurement!r} is not declared in the catalog")
    extra_tags = set(tags) - m.tag_names
    if extra_tags:
        raise CatalogError(f"{measurement}: tags {sorted(extra_tags)} are not declared in the catalog")
    if not fields:
        raise CatalogError(f"{measurement}: a point needs at least one field")
    for name, value in fields.items():
        f = m.field(name)
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "str": isinstance(value, str)}[f.type]
        if not ok:
            raise CatalogError(f"{measurement}.{name}: {type(value).__name__} value for a {f.type} field")


def render_markdown() -> str:
    """docs/metrics.md, generated; do not edit that file by hand."""
    out = [
        "# Sonde metric reference",
        "",
        "Generated from each probe's `bpf/<probe>/metrics.py` and `ingest/runtime/catalog.py` by "
        "`sonde catalog --markdown`. Do not edit by hand.",
        "",
        "Kinds: **delta** fields are per-interval deltas of in-kernel cumulative counters "
        "(sum them over time; divide by the interval for rates); **gauge** fields are values "
        "at poll time; **event** points are written once per occurrence.",
        "",
    ]
    for m in sorted(MEASUREMENTS.values(), key=lambda m: m.name):
        out += render_measurement(m, "##")
    return "\n".join(out)


def render_measurement(m: Measurement, heading: str) -> list[str]:
    """One measurement as Markdown: kind, help, source, its tags and fields."""
    out = [f"{heading} `{m.name}` ({m.kind})", "", m.help, ""]
    if m.source:
        out += [f"Source: {m.source}.", ""]
    out += ["| tag | meaning |", "|---|---|"]
    out += [f"| `{t.name}` | {t.help} |" for t in m.tags]
    out += ["", "| field | type | unit | meaning |", "|---|---|---|---|"]
    out += [f"| `{f.name}` | {f.type} | {f.unit} | {f.help} |" for f in m.fields]
    out.append("")
    return out
