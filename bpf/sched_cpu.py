"""sched_cpu: on-CPU time, run-queue latency and context switches per process.

Hooks: `sched:sched_switch` (current is still the task switching out, so its
process id needs no struct read), `sched:sched_wakeup` and `sched:sched_wakeup_new`
for run-queue latency (wakeup, or preemption, to switch-in, per thread, credited to
the process at that thread's next switch-out).

cpu_pct is on-CPU time over the interval in percent of one core: a thread spinning
on one core reads ~100. Time is credited at each switch-out and by a per-CPU
software clock event at 20 Hz in the running task's context, so a task that never
leaves its CPU is credited within 50 ms, never in one late lump.

Limits: the idle task is not reported; kernel threads are reported like processes
(pid = their tid, comm like `kworker/0:1`).
"""
from __future__ import annotations

from ingest import hist
from ingest.bpfmap import read_all
from ingest.cardinality import OTHER, top_n
from ingest.delta import DeltaTracker
from ingest.lineproto import Point
from ingest.probe import Probe

FIELDS = ("oncpu_ns", "voluntary", "involuntary", "rq_lat_sum_us", "rq_lat_count")


class SchedDecoder:
    def __init__(self, probe):
        self.probe = probe
        self.host = probe.config.host
        self.procs = probe.table("proc_cpu")
        self.hist = probe.table("rq_hist")
        self.deltas = DeltaTracker()
        self.hdeltas = DeltaTracker()
        self.last_ts: int | None = None

    def poll(self, ts: int) -> tuple[list[Point], int]:
        interval_ns = ts - self.last_ts if self.last_ts else None
        self.last_ts = ts
        raw, dead = self.probe.read_process_map(self.procs)
        rows = []
        for tgid, v in raw:
            d = dict(zip(FIELDS, self.deltas.delta(tgid, tuple(getattr(v, f) for f in FIELDS))))
            rows.append((tgid, bytes(v.comm).split(b"\0", 1)[0], d))
        buckets: dict[int, dict[int, int]] = {}
        raw_hist = [(k.tgid, k.slot, c if isinstance(c, int) else c.value) for k, c in read_all(self.hist)]
        for tgid, slot, count in raw_hist:
            (d,) = self.hdeltas.delta((tgid, slot), (count,))
            if d:
                buckets.setdefault(tgid, {})[slot] = d

        active = [r for r in rows if any(r[2].values())]
        keep, rest = top_n(active, self.probe.settings.max_processes, lambda r: r[2]["oncpu_ns"])
        points = []
        other = None
        for tgid, kcomm, d in keep:
            name = self.probe.process_name(tgid, kcomm, exited=tgid in dead)
            tags = {"host": self.host, "pid": str(tgid), "comm": name}
            series = {("process_cpu", str(tgid), name)} | {("process_runq_latency_hist", str(tgid), name, hist.le(s))
                                                           for s in buckets.get(tgid, {})}
            if self.probe.budget.admit(series):
                points += self._points(ts, tags, d, buckets.get(tgid, {}), interval_ns)
            else:
                rest.append((tgid, kcomm, d))
        if rest:
            other = {f: sum(r[2][f] for r in rest) for f in FIELDS}
            ob: dict[int, int] = {}
            for tgid, _, _ in rest:
                hist.merge(ob, buckets.get(tgid, {}))
            points += self._points(ts, {"host": self.host, "pid": OTHER, "comm": OTHER}, other, ob, interval_ns)

        self.probe.reclaim(self.procs, dead)
        for tgid in dead:
            self.deltas.forget(tgid)
        for tgid, slot, _ in raw_hist:
            if tgid in dead:
                try:
                    del self.hist[self.hist.Key(tgid, slot)]
                except KeyError:
                    pass
                self.hdeltas.forget((tgid, slot))
        return points, len(raw) + len(raw_hist)

    @staticmethod
    def _points(ts, tags, d, buckets, interval_ns) -> list[Point]:
        fields = {"oncpu_us": d["oncpu_ns"] // 1000,
                  "voluntary_switches": d["voluntary"], "involuntary_switches": d["involuntary"]}
        if interval_ns:
            fields["cpu_pct"] = d["oncpu_ns"] / interval_ns * 100
            fields["interval_us"] = interval_ns // 1000
        pts = [Point("process_cpu", tags, fields, ts)]
        if buckets:
            pts += hist.points("process_runq_latency", tags, buckets, d["rq_lat_sum_us"], ts)
        return pts


PROBE = Probe(
    name="sched_cpu",
    doc=__doc__,
    hooks=("sched:sched_switch", "sched:sched_wakeup", "sched:sched_wakeup_new"),
    cpu_clock={"on_cpu_tick": 20},
    decoder=SchedDecoder,
)
