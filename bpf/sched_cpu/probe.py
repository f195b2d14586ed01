"""sched_cpu: run-queue latency histogram per process. Off by default.

The always-on probe `cpu` reports CPU time, context switches and the total run-queue
wait per process (`process_cpu`) from counters the kernel keeps, with nothing per
context switch. This probe adds the distribution of each wait, which needs a program
on every context switch and wakeup: turn it on (probes.sched_cpu.enabled: true) when
a latency percentile matters more than the cost (a raw tracepoint hit is 20-40 ns on
this platform, the map updates come on top; not measured for this probe).

Hooks (raw tracepoints): `sched_wakeup` and `sched_wakeup_new` stamp a thread's
wakeup; `sched_switch` measures wakeup (or preemption) to switch-in, per thread, and
credits it to the process at that thread's next switch-out, when its process id
needs no struct read. Raw, not perf-based, tracepoints: a perf-based one is skipped
while any BPF program or BPF map syscall is under way on the CPU (another tool's, or
the agent's own poll: measured, 9 of ~800 waits lost while three processes read BPF
maps in a loop, none with raw ones); a raw one only when it is itself already
running there (sonde_probe.kernel_misses). Thread ids are read from the task at
task_struct.pid, an offset from the kernel's BTF.

Limits: the idle task is not reported; kernel threads are reported like processes
(pid = their tid, comm like `kworker/0:1`). Counts are never more than the switch-ins
/proc/PID/task/*/schedstat counts; on a busy 6.18 host a few in a hundred of those
never reached the sched_switch tracepoint (an ftrace instance missed the same ones),
so they are in no histogram.
"""
from __future__ import annotations

from sonde.ingest.errors import ProbeError
from sonde.ingest.runtime import btf, hist
from sonde.ingest.runtime.cardinality import OTHER, fold
from sonde.ingest.runtime.decode import Context
from sonde.ingest.runtime.delta import defer, since
from sonde.ingest.output.lineproto import Point
from sonde.ingest.runtime.probe import Probe


def layout(b: btf.BTF) -> dict[str, int]:
    """The -D values sched_cpu.bpf.c needs, from this kernel's BTF."""
    def need(fn, *args):
        try:
            return fn(*args)
        except btf.BTFError as e:
            raise ProbeError(f"probe sched_cpu: {str(e).partition(': ')[2]}; disable it with "
                             f"probes.sched_cpu.enabled: false")
    d = {"TASK_PID": need(b.offsetof, "task_struct", "pid")}
    for tp, want in (("sched_wakeup", "struct task_struct *"), ("sched_wakeup_new", "struct task_struct *")):
        args = need(b.raw_tracepoint_args, tp)
        if not args or args[0] != want:
            raise ProbeError(f"probe sched_cpu: raw tracepoint {tp} passes ({', '.join(args)}), not a task; "
                             f"disable it with probes.sched_cpu.enabled: false")
    args = need(b.raw_tracepoint_args, "sched_switch")
    if args[:3] != ["bool", "struct task_struct *", "struct task_struct *"]:
        raise ProbeError(f"probe sched_cpu: raw tracepoint sched_switch passes ({', '.join(args)}); "
                         f"disable it with probes.sched_cpu.enabled: false")
    if len(args) >= 4:  # 5.18+: the state the switch saw
        d["SWITCH_STATE_ARG"] = 1
    else:
        d["TASK_STATE"] = need(b.offsetof, "task_struct", "__state" if b.has_member("task_struct", "__state")
                               else "state")
    return d


def kernel_cflags(sys_root) -> list[str]:
    try:
        b = btf.load(sys_root)
    except btf.BTFError as e:
        raise ProbeError(f"probe sched_cpu: {e}; disable it with probes.sched_cpu.enabled: false")
    return [f"-D{k}={v}" for k, v in layout(b).items()]


def decode(rows: list, prev: dict, ctx: Context) -> tuple[list[Point], dict]:
    """Pure: rows (tgid, name, exited, (rq_lat_sum_us, *slots)) of `proc_rq` and the
    previous reads (tgid -> that tuple) -> points and the next state."""
    new = dict(prev)
    procs = []  # (tgid, name, sum_us delta, buckets)
    for tgid, name, exited, now in rows:
        now = tuple(now)
        d = since(prev.get(tgid), now)
        buckets = {s: c for s, c in enumerate(d[1:]) if c}
        # A read can catch an observation's sum before its bucket (microseconds
        # apart): such a sum waits for its bucket, in the next poll.
        if not buckets and not exited:
            continue
        new[tgid] = now
        if buckets:
            procs.append((tgid, name, d[0], buckets))
    for tgid, _, exited, _ in rows:
        if exited:
            new.pop(tgid, None)

    def admit(row) -> bool:
        tgid, name, _, buckets = row
        return ctx.budget.admit({("process_runq_latency", str(tgid), name)} | {
            ("process_runq_latency_hist", str(tgid), name, hist.le(s)) for s in buckets})

    keep, rest = fold(procs, ctx.max_processes, lambda r: r[2], admit)
    points = []
    for tgid, name, sum_us, buckets in keep:
        points += hist.points("process_runq_latency", {"host": ctx.host, "pid": str(tgid), "comm": name},
                              buckets, sum_us, ctx.ts)
    if rest:
        merged: dict[int, int] = {}
        for _, _, _, buckets in rest:
            hist.merge(merged, buckets)
        points += hist.points("process_runq_latency", {"host": ctx.host, "pid": OTHER, "comm": OTHER},
                              merged, sum(r[2] for r in rest), ctx.ts)
    return points, new


class SchedDecoder:
    """One map, `proc_rq`: per process its wait sum, count and exp2 slots in one value.
    One read gives each process's buckets together with its sum, so no bucket can
    belong to a process this poll did not see, and every process with new buckets is
    written (folded into `other` past the top-N, never dropped)."""

    def __init__(self, probe):
        self.probe = probe
        self.procs = probe.table("proc_rq")
        self.prev: dict[int, tuple] = {}

    def poll(self, ts: int) -> tuple[list[Point], int]:
        raw, dead = self.probe.read_process_map(self.procs)
        rows = []
        for tgid, v in raw:
            now = (v.rq_lat_sum_us, *v.slots)
            exited = tgid in dead
            # named only when it has something new (a /proc read per changed process)
            name = self.probe.process_name(tgid, bytes(v.comm), exited) if now != self.prev.get(tgid) else ""
            rows.append((tgid, name, exited, now))
        points, new = decode(rows, self.prev, self.probe.context(ts))
        defer(lambda: setattr(self, "prev", new))  # once these points are handed over
        self.probe.reclaim(self.procs, dead)
        return points, len(raw)


PROBE = Probe(
    name="sched_cpu",
    doc=__doc__,
    hooks=("sched:sched_switch", "sched:sched_wakeup", "sched:sched_wakeup_new"),
    cflags=kernel_cflags,
    default_enabled=False,
    decoder=SchedDecoder,
)
