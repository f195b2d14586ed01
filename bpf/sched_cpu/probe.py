"""sched_cpu: run-queue latency histogram per process. Off by default.

The always-on probe `cpu` reports CPU time, context switches and the total run-queue
wait per process (`process_cpu`) from counters the kernel keeps, with nothing per
context switch. This probe adds the distribution of each wait, which needs a program
on every context switch and wakeup: turn it on (probes.sched_cpu.enabled: true) when
a latency percentile matters more than the cost, 75-130 ns per hook hit.

Hooks: `sched:sched_wakeup` and `sched:sched_wakeup_new` stamp a thread's wakeup;
`sched:sched_switch` measures wakeup (or preemption) to switch-in, per thread, and
credits it to the process at that thread's next switch-out, when its process id
needs no struct read.

Limits: the idle task is not reported; kernel threads are reported like processes
(pid = their tid, comm like `kworker/0:1`).
"""
from __future__ import annotations

from sonde.ingest.runtime import hist
from sonde.ingest.runtime.bpfmap import read_all
from sonde.ingest.runtime.cardinality import OTHER, fold
from sonde.ingest.runtime.delta import DeltaTracker
from sonde.ingest.output.lineproto import Point
from sonde.ingest.runtime.probe import Probe

FIELDS = ("rq_lat_sum_us", "rq_lat_count")


class SchedDecoder:
    def __init__(self, probe):
        self.probe = probe
        self.host = probe.config.host
        self.procs = probe.table("proc_rq")
        self.hist = probe.table("rq_hist")
        self.deltas = DeltaTracker()
        self.hdeltas = DeltaTracker()

    def poll(self, ts: int) -> tuple[list[Point], int]:
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

        active = [r for r in rows if buckets.get(r[0])]
        def admit(row) -> bool:
            tgid, kcomm, _ = row
            name = self.probe.process_name(tgid, kcomm, exited=tgid in dead)
            return self.probe.budget.admit({("process_runq_latency", str(tgid), name)} | {
                ("process_runq_latency_hist", str(tgid), name, hist.le(s)) for s in buckets[tgid]})

        keep, rest = fold(active, self.probe.settings.max_processes, lambda r: r[2]["rq_lat_sum_us"], admit)
        points = []
        for tgid, kcomm, d in keep:
            name = self.probe.process_name(tgid, kcomm, exited=tgid in dead)
            tags = {"host": self.host, "pid": str(tgid), "comm": name}
            points += hist.points("process_runq_latency", tags, buckets[tgid], d["rq_lat_sum_us"], ts)
        if rest:
            ob: dict[int, int] = {}
            for tgid, _, _ in rest:
                hist.merge(ob, buckets[tgid])
            points += hist.points("process_runq_latency", {"host": self.host, "pid": OTHER, "comm": OTHER}, ob,
                                  sum(r[2]["rq_lat_sum_us"] for r in rest), ts)

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


PROBE = Probe(
    name="sched_cpu",
    doc=__doc__,
    hooks=("sched:sched_switch", "sched:sched_wakeup", "sched:sched_wakeup_new"),
    default_enabled=False,
    decoder=SchedDecoder,
)
