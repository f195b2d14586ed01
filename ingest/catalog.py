"""The metric catalog: the single contract between producers and consumers.

Every measurement, tag and field Sonde writes is declared here once, with its unit
and meaning. Probes may emit only what is declared (`validate_point`); dashboards,
alerts and backtrack may reference only what is declared. `render_markdown()`
generates docs/metrics.md, and a test fails when that file is stale.

Names are a public API: renaming one breaks users' dashboards and queries.
Units live in field names (`_bytes`, `_seconds`, `_us`) and are converted once,
in the probe's decoder, never in a dashboard.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import CatalogError


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
PROBE = Tag("probe", "Probe name, the stem of its bpf/<probe>.bpf.c file.")

ROLE = Tag("role", "`client`: this process opened the connection; `server`: it accepted it; "
                  "`unknown`: the connection predates the agent.")
PEER = Tag("peer", "Remote IP address (IPv4 dotted, IPv6 RFC 5952), or `other` past the top-M peers.")
PORT = Tag("port", "For `client` flows the remote port; for `server` flows the local listening port. "
                   "Client ephemeral ports are never tags.")
LE = Tag("le", "Histogram bucket upper bound, inclusive, in the measurement's unit; `+Inf` for the last.")
STATE = Tag("state", "TCP state, as `ss` names it: ESTABLISHED, SYN_SENT, CLOSE_WAIT, ...")
REASON = Tag("reason", "Why the kernel sent the reset (sk_rst_reason, named from the running kernel's tracefs format).")

FLOW_TAGS = (HOST, PID, COMM, ROLE, PEER, PORT)

_INTERVAL_NOTE = "Per-interval delta: sum over time and divide by the interval for a rate."

MEASUREMENTS: dict[str, Measurement] = {}


def _declare(m: Measurement) -> Measurement:
    if m.name in MEASUREMENTS:
        raise CatalogError(f"measurement {m.name} declared twice in the catalog")
    MEASUREMENTS[m.name] = m
    return m


_TCP_SOURCE = "sock_diag tcp_info at poll time; sock_ops state callback at CLOSE (probe tcp)"

TCP_TRAFFIC = _declare(Measurement(
    name="tcp_traffic",
    kind="delta",
    help="TCP application bytes per process: the tcp_flow bytes of the process summed over its peers. "
         + _INTERVAL_NOTE,
    source=_TCP_SOURCE,
    tags=(HOST, PID, COMM),
    fields=(
        Field("tx_bytes", "int", "bytes", "Bytes the process sent that the peers acknowledged (SYN and FIN excluded)."),
        Field("rx_bytes", "int", "bytes", "Bytes the process received in order (the peer's FIN excluded)."),
    ),
))

TCP_FLOW = _declare(Measurement(
    name="tcp_flow",
    kind="delta",
    help="TCP connection counters per process and peer endpoint, from the kernel's own per-socket "
         "counters (tcp_info). " + _INTERVAL_NOTE,
    source=_TCP_SOURCE + "; tcp:tcp_send_reset, tcp:tcp_receive_reset",
    tags=FLOW_TAGS,
    fields=(
        Field("tx_bytes", "int", "bytes",
              "Application bytes sent to this peer and acknowledged by it (bytes_acked less SYN and FIN)."),
        Field("rx_bytes", "int", "bytes",
              "Application bytes received from this peer in order (bytes_received less its FIN)."),
        Field("tx_unacked_bytes", "int", "bytes",
              "Bytes sent but never acknowledged when the connection ended (reset or abort): lost in flight."),
        Field("rx_segments", "int", "segments", "Segments received (segs_in), pure ACKs included."),
        Field("tx_segments", "int", "segments", "Segments sent (segs_out), retransmits and pure ACKs included."),
        Field("active_opens", "int", "connections", "Connections this process opened that reached ESTABLISHED."),
        Field("passive_opens", "int", "connections", "Connections this process accepted."),
        Field("connect_refused", "int", "connections", "Connects answered with a reset (port closed, or refused)."),
        Field("connect_timeouts", "int", "connections",
              "Connects that failed without a reset: SYN retries exhausted, or abandoned by the caller."),
        Field("closes", "int", "connections", "Established connections that reached CLOSE."),
        Field("retransmits", "int", "segments", "Retransmitted segments (tcp_info total_retrans)."),
        Field("resets_sent", "int", "segments", "Resets this side sent."),
        Field("resets_received", "int", "segments",
              "Resets this side received on connections past SYN_SENT (a reset answering a SYN is connect_refused)."),
    ),
))

TCP_WINDOW = _declare(Measurement(
    name="tcp_window",
    kind="gauge",
    help="Round-trip time and windows per process and peer over the interval: one sample per live "
         "connection at each poll (tcp_info). Written only for intervals with samples.",
    source="sock_diag tcp_info at poll time (probe tcp)",
    tags=FLOW_TAGS,
    fields=(
        Field("samples", "int", "sockets", "Live connections sampled this interval."),
        Field("srtt_max_us", "int", "us", "Largest smoothed RTT sampled this interval."),
        Field("srtt_mean_us", "float", "us", "Mean smoothed RTT over the samples."),
        Field("srtt_last_us", "int", "us", "Smoothed RTT of the last sample."),
        Field("snd_cwnd_min", "int", "segments", "Smallest congestion window sampled."),
        Field("snd_cwnd_mean", "float", "segments", "Mean congestion window."),
        Field("snd_cwnd_last", "int", "segments", "Congestion window of the last sample."),
        Field("snd_wnd_min_bytes", "int", "bytes", "Smallest send window (the peer's advertised window)."),
        Field("snd_wnd_mean_bytes", "float", "bytes", "Mean send window."),
        Field("snd_wnd_last_bytes", "int", "bytes", "Send window of the last sample."),
        Field("rcv_wnd_min_bytes", "int", "bytes", "Smallest receive window this side advertised (0 before 6.2)."),
        Field("rcv_wnd_mean_bytes", "float", "bytes", "Mean receive window."),
        Field("rcv_wnd_last_bytes", "int", "bytes", "Receive window of the last sample."),
    ),
))


def _histogram(name: str, what: str, source: str, tags: tuple[Tag, ...] = FLOW_TAGS) -> None:
    """A histogram is two measurements: `<name>_hist` buckets and `<name>` summary."""
    _declare(Measurement(
        name=f"{name}_hist",
        kind="delta",
        help=f"{what}: exp2 histogram buckets, non-cumulative counts per interval. Sum `count` "
             f"over hosts and time, then take percentiles from the summed buckets.",
        source=source,
        tags=tags + (LE,),
        fields=(Field("count", "int", "observations", "Observations in this bucket this interval."),),
    ))
    _declare(Measurement(
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


_histogram("tcp_srtt", "Smoothed RTT, one sample per live connection per poll and one per connection "
           "at close, in microseconds", "sock_diag tcp_info; sock_ops at CLOSE (probe tcp)")
_histogram("tcp_connect_latency", "Connect latency, connect() to ESTABLISHED, in microseconds",
           "sock_ops connect and active-established callbacks (probe tcp)")
_histogram("tcp_lifetime", "Connection lifetime, ESTABLISHED to CLOSE, in microseconds",
           "sock_ops established and state callbacks (probe tcp)")

TCP_STATES = _declare(Measurement(
    name="tcp_states",
    kind="gauge",
    help="Sockets per TCP state per process at poll time: the `ss -tan` picture over time "
         "(TIME_WAIT and NEW_SYN_RECV mini-sockets excluded; orphans under pid 0).",
    source="sock_diag dump at poll time (probe tcp)",
    tags=(HOST, PID, COMM, STATE),
    fields=(Field("sockets", "int", "sockets", "Sockets in this state."),),
))

TCP_RESETS_SENT = _declare(Measurement(
    name="tcp_resets_sent",
    kind="delta",
    help="Resets sent per process and kernel reason. " + _INTERVAL_NOTE,
    source="tcp:tcp_send_reset (probe tcp)",
    tags=(HOST, PID, COMM, REASON),
    fields=(Field("resets", "int", "segments", "Resets sent for this reason."),),
))

PROCESS_CPU = _declare(Measurement(
    name="process_cpu",
    kind="delta",
    help="CPU time, context switches and run-queue wait per process, from the kernel's own counters read "
         "at each poll; a process that exits between two polls is reported once more, with what it used "
         "until its exit. " + _INTERVAL_NOTE,
    source="the process CPU clock (clock_gettime), /proc/<pid>/task/<tid>/schedstat and status; "
           "sched:sched_process_exit for exiting threads (probe cpu)",
    tags=(HOST, PID, COMM),
    fields=(
        Field("oncpu_us", "int", "us", "Time the process's threads ran on a CPU this interval."),
        Field("cpu_pct", "float", "percent",
              "oncpu_us over the interval, in percent of one CPU (100 = one core pinned; can exceed 100)."),
        Field("interval_us", "int", "us", "Length of the interval the deltas cover."),
        Field("voluntary_switches", "int", "switches", "Switches out while blocking (sleep, I/O, lock)."),
        Field("involuntary_switches", "int", "switches", "Switches out while still runnable (preempted or yielded)."),
        Field("runq_wait_us", "int", "us",
              "Time the process's threads spent runnable but waiting in a run queue for a CPU this interval "
              "(scheduler run_delay, summed over threads). Over interval_us it is CPU demand not met."),
        Field("runq_waits", "int", "waits",
              "Times a thread got a CPU after such a wait (scheduler pcount); runq_wait_us / runq_waits is "
              "the mean wait."),
    ),
))

_histogram("process_runq_latency", "Run-queue latency per process, wakeup to switch-in, in microseconds",
           "sched:sched_wakeup, sched:sched_wakeup_new, sched:sched_switch (probe sched_cpu, off by default; "
           "process_cpu.runq_wait_us is the always-on total)",
           tags=(HOST, PID, COMM))

DISK = Tag("disk", "Block device name from /sys/dev/block/<major>:<minor> (sda, nvme0n1, loop0), or `major:minor`.")
OP = Tag("op", "I/O class of the request's op and flags, as its rwbs reads: read, write, sync_write, flush, "
              "discard, other.")

BLOCK_IO = _declare(Measurement(
    name="block_io",
    kind="delta",
    help="Block requests completed per disk (the whole disk, as /proc/diskstats' disk line) and I/O class. "
         + _INTERVAL_NOTE,
    source="raw tracepoint block_rq_complete (probe block_io)",
    tags=(HOST, DISK, OP),
    fields=(
        Field("requests", "int", "requests", "Requests completed."),
        Field("bytes", "int", "bytes", "Bytes completed, partial completions included (as /proc/diskstats "
                                       "counts sectors)."),
        Field("errors", "int", "requests", "Requests completed with an error (EIO, ENOSPC, ...)."),
        Field("untimed", "int", "requests", "Requests the kernel did not time (iostats off for the disk, or "
                                            "the flush machinery's own requests): in no latency histogram."),
        Field("unsplit", "int", "requests", "Timed requests with no issue time (the disk's queue keeps none "
                                            "unless writeback throttling, io.latency or io.cost uses it): in "
                                            "the total latency histogram only."),
    ),
))

for _kind, _what in (("queue", "start (accounting) to issue to the driver"),
                     ("device", "issue to completion"), ("total", "start to completion")):
    _histogram(f"block_{_kind}_latency", f"Block request latency, {_what}, in microseconds, from the kernel's "
               f"own request timestamps (those iostat's await uses; within one plug the kernel reuses one "
               f"clock read, so a batch's requests share their start and issue times)",
               "raw tracepoint block_rq_complete: request start_time_ns, io_start_time_ns (probe block_io)",
               tags=(HOST, DISK, OP))

DISK_BUSY = _declare(Measurement(
    name="disk_busy",
    kind="delta",
    help="Time each whole disk had requests in flight: the kernel's own io_ticks from /proc/diskstats, "
         "written every interval for every disk that has done I/O, idle intervals included. "
         + _INTERVAL_NOTE,
    source="/proc/diskstats io_ticks (probe block_io)",
    tags=(HOST, DISK),
    fields=(
        Field("busy_us", "int", "us", "Busy time this interval (io_ticks: millisecond resolution)."),
        Field("util_pct", "float", "percent", "busy_us over the interval, in percent."),
        Field("interval_us", "int", "us", "Length of the interval, between two reads of /proc/diskstats."),
    ),
))

PROCESS_IO = _declare(Measurement(
    name="process_io",
    kind="delta",
    help="Block I/O per process when it creates a request. Page-cache writeback is submitted by kernel "
         "threads (comm `kworker/...`, `jbd2/...`), so buffered writes show there, not under the writer. "
         + _INTERVAL_NOTE,
    source="raw tracepoint block_getrq (probe process_io, off by default)",
    tags=(HOST, PID, COMM),
    fields=(
        Field("bytes", "int", "bytes", "Bytes of the requests the process created, at creation (bios merged "
                                       "into a request later are not added)."),
        Field("requests", "int", "requests", "Requests the process created."),
    ),
))

OOM_KILL = _declare(Measurement(
    name="oom_kill",
    kind="event",
    help="One point per OOM kill. The pid is a field, not a tag, so kills never add series per pid.",
    source="oom:mark_victim (probe oom)",
    tags=(HOST, COMM),
    fields=(
        Field("pid", "int", "pid", "The victim's process id."),
        Field("cgroup", "str", "path",
              "The victim's memory cgroup (v1 `memory` controller line, else the v2 path), from /proc "
              "while it exits; empty if it was already gone."),
        Field("anon_rss_bytes", "int", "bytes", "Anonymous memory of the victim when chosen."),
        Field("file_rss_bytes", "int", "bytes", "File-backed resident memory of the victim when chosen."),
        Field("total_vm_bytes", "int", "bytes", "Virtual memory size of the victim."),
    ),
))

OOM_KILLS = _declare(Measurement(
    name="oom_kills",
    kind="delta",
    help="OOM kills on the host this interval, counted in the kernel (includes any event a full buffer lost). "
         + _INTERVAL_NOTE,
    source="oom:mark_victim (probe oom)",
    tags=(HOST,),
    fields=(Field("kills", "int", "kills", "OOM kills this interval."),),
))

SONDE_ALERT = _declare(Measurement(
    name="sonde_alert",
    kind="event",
    help="Alert transitions from the agent's built-in evaluator (alerts/thresholds.yaml): one point when "
         "an alert instance fires and one when it resolves.",
    source="agent (ingest/alerting.py)",
    tags=(HOST, Tag("rule", "Rule name, as in alerts/thresholds.yaml."),
          Tag("severity", "critical or warning."), Tag("state", "firing or resolved.")),
    fields=(
        Field("value", "float", "rule unit", "The rule's value at the transition (its formula over its queries)."),
        Field("labels", "str", "json", "The alert instance's labels (the series' tags), as a JSON object."),
        Field("summary", "str", "text", "What fired, in words, with the labels filled in."),
    ),
))

SONDE_ANOMALY = _declare(Measurement(
    name="sonde_anomaly",
    kind="event",
    help="Anomaly marks: the latest window of a key series far from the median of the windows before it "
         "(robust deviation score). Shown as Grafana annotations; ranked by backtrack.",
    source="agent (ingest/anomaly.py)",
    tags=(HOST, Tag("metric", "bytes_to_peer, srtt_p99, process_cpu or disk_latency_p99."),
          Tag("direction", "high or low.")),
    fields=(
        Field("score", "float", "robust sd", "(value - median) / (1.4826 x MAD) of the preceding windows."),
        Field("value", "float", "metric unit", "The latest window's value."),
        Field("baseline_median", "float", "metric unit", "Median of the preceding windows."),
        Field("labels", "str", "json", "The series' tags, as a JSON object."),
        Field("text", "str", "text", "The mark in words, for the annotation."),
    ),
))

SONDE_PROBE = _declare(Measurement(
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
))

SONDE_SPOOL = _declare(Measurement(
    name="sonde_spool",
    kind="gauge",
    help="The agent's disk spool between polls and the sink, one point per poll.",
    source="agent",
    tags=(HOST,),
    fields=(
        Field("queued_points", "int", "points", "Points waiting in the spool for delivery."),
        Field("dropped_points", "int", "points",
              "Oldest points dropped this interval because the spool was past its bound. " + _INTERVAL_NOTE),
        Field("written_points", "int", "points", "Points the sink accepted this interval."),
        Field("rejected_points", "int", "points", "Points the server refused as malformed this interval (dropped, logged)."),
        Field("write_errors", "int", "errors", "Failed write attempts this interval (retried with backoff)."),
    ),
))


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
        "Generated from `ingest/catalog.py` by `sonde catalog --markdown`. Do not edit by hand.",
        "",
        "Kinds: **delta** fields are per-interval deltas of in-kernel cumulative counters "
        "(sum them over time; divide by the interval for rates); **gauge** fields are values "
        "at poll time; **event** points are written once per occurrence.",
        "",
    ]
    for m in sorted(MEASUREMENTS.values(), key=lambda m: m.name):
        out += [f"## `{m.name}` ({m.kind})", "", m.help, ""]
        if m.source:
            out += [f"Source: {m.source}.", ""]
        out += ["| tag | meaning |", "|---|---|"]
        out += [f"| `{t.name}` | {t.help} |" for t in m.tags]
        out += ["", "| field | type | unit | meaning |", "|---|---|---|---|"]
        out += [f"| `{f.name}` | {f.type} | {f.unit} | {f.help} |" for f in m.fields]
        out.append("")
    return "\n".join(out)
