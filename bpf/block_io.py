"""block_io: block I/O per disk and class, the latency split, utilisation, per-process bytes.

Hooks: `block:block_io_start` (kernel 6.5+; `block:block_rq_insert` where it is
missing), `block:block_rq_issue`, `block:block_rq_complete`. Requests are matched
by (device, sector) across them; nothing is read from kernel structs.

- `block_io`: requests, bytes and errors per disk and op class (read, write,
  sync_write, flush, discard, other, from rwbs).
- `block_{queue,device,total}_latency` (+ `_hist`): start -> issue (scheduler and
  queue), issue -> complete (driver and device), start -> complete.
- `disk_busy`: in-flight time per disk and its share of the interval.
- `process_io`: bytes and requests per process at submit time. Buffered writes are
  submitted by writeback kernel threads and show under them (`kworker/...`).

Disks are named from /sys/dev/block/<major>:<minor>/uevent under the configured
sys root. Limits: requests started before the agent are counted from their issue;
two requests in flight at once for the same (device, sector) count as one.
"""
from __future__ import annotations

from pathlib import Path

from ingest import hist
from ingest.bpfmap import read_all
from ingest.cardinality import OTHER, top_n
from ingest.delta import DeltaTracker
from ingest.lineproto import Point, printable_name
from ingest.probe import Probe

OPS = {0: "read", 1: "write", 2: "sync_write", 3: "flush", 4: "discard", 5: "other"}
KINDS = {0: "block_queue_latency", 1: "block_device_latency", 2: "block_total_latency"}
SUMS = {0: "queue_sum_us", 1: "device_sum_us", 2: "total_sum_us"}
IO_FIELDS = ("requests", "bytes", "errors", "queue_sum_us", "device_sum_us", "total_sum_us")


def split_dev(dev: int) -> tuple[int, int]:
    """The kernel's internal dev_t: major in the top 12 bits, minor in the low 20."""
    return dev >> 20, dev & 0xFFFFF


def disk_name(sys_root: Path, dev: int) -> str:
    major, minor = split_dev(dev)
    try:
        for line in (Path(sys_root) / f"dev/block/{major}:{minor}/uevent").read_text().splitlines():
            if line.startswith("DEVNAME="):
                return printable_name(line.split("=", 1)[1])
    except OSError:
        pass
    return f"{major}:{minor}"


class BlockDecoder:
    def __init__(self, probe):
        self.probe = probe
        self.host = probe.config.host
        self.io = probe.table("block_io")
        self.busy = probe.table("disk_busy")
        self.hist = probe.table("block_hist")
        self.procs = probe.table("proc_io")
        self.io_d, self.busy_d, self.hist_d, self.proc_d = DeltaTracker(), DeltaTracker(), DeltaTracker(), DeltaTracker()
        self.names: dict[int, str] = {}
        self.last_ts: int | None = None

    def disk(self, dev: int) -> str:
        if dev not in self.names:
            self.names[dev] = disk_name(self.probe.config.paths.sys, dev)
        return self.names[dev]

    def poll(self, ts: int) -> tuple[list[Point], int]:
        interval_ns = ts - self.last_ts if self.last_ts else None
        self.last_ts = ts
        points: list[Point] = []
        buckets: dict[tuple, dict[int, int]] = {}
        hist_rows = read_all(self.hist)
        for k, c in hist_rows:
            (d,) = self.hist_d.delta((k.dev, k.op, k.kind, k.slot), (int(c),))
            if d:
                buckets.setdefault((k.dev, k.op, k.kind), {})[k.slot] = d
        io_rows = read_all(self.io)
        for k, v in io_rows:
            d = dict(zip(IO_FIELDS, self.io_d.delta((k.dev, k.op), tuple(getattr(v, f) for f in IO_FIELDS))))
            if not d["requests"]:
                continue
            tags = {"host": self.host, "disk": self.disk(k.dev), "op": OPS.get(k.op, "other")}
            points.append(Point("block_io", tags, {f: d[f] for f in ("requests", "bytes", "errors")}, ts))
            for kind, name in KINDS.items():
                b = buckets.get((k.dev, k.op, kind))
                if not b:
                    continue
                points += hist.points(name, tags, b, d[SUMS[kind]], ts)
        busy_rows = read_all(self.busy)
        for k, v in busy_rows:
            dev = int(k)
            (d,) = self.busy_d.delta(dev, (v.busy_ns,))
            if d and interval_ns:
                points.append(Point("disk_busy", {"host": self.host, "disk": self.disk(dev)}, {
                    "busy_us": d // 1000, "util_pct": min(100.0, d / interval_ns * 100),
                    "interval_us": interval_ns // 1000}, ts))
        points += self._processes(ts)
        return points, len(hist_rows) + len(io_rows) + len(busy_rows)

    def _processes(self, ts: int) -> list[Point]:
        raw, dead = self.probe.read_process_map(self.procs)
        rows = []
        for tgid, v in raw:
            b, r = self.proc_d.delta(tgid, (v.bytes, v.requests))
            if r:
                rows.append((tgid, bytes(v.comm).split(b"\0", 1)[0], b, r))
        keep, rest = top_n(rows, self.probe.settings.max_processes, lambda x: x[2])
        points = []
        for tgid, kcomm, b, r in keep:
            name = self.probe.process_name(tgid, kcomm, exited=tgid in dead)
            if self.probe.budget.admit({("process_io", str(tgid), name)}):
                points.append(Point("process_io", {"host": self.host, "pid": str(tgid), "comm": name},
                                    {"bytes": b, "requests": r}, ts))
            else:
                rest.append((tgid, kcomm, b, r))
        if rest:
            points.append(Point("process_io", {"host": self.host, "pid": OTHER, "comm": OTHER},
                                {"bytes": sum(x[2] for x in rest), "requests": sum(x[3] for x in rest)}, ts))
        self.probe.reclaim(self.procs, dead)
        for tgid in dead:
            self.proc_d.forget(tgid)
        return points


PROBE = Probe(
    name="block_io",
    doc=__doc__,
    hooks=("block:block_rq_issue", "block:block_rq_complete"),
    optional_hooks={"block:block_io_start": "queue latency starts at block_rq_insert instead, and process_io "
                                            "counts only requests that pass the I/O scheduler"},
    decoder=BlockDecoder,
)
