"""cpu: CPU time, context switches and run-queue wait per process, from counters the kernel keeps.

What fires when:
- per request, per send, per context switch: nothing.
- per connection: nothing.
- per exiting thread (so once per single-threaded process exit): one tracepoint
  program on `sched:sched_process_exit` copies that thread's cumulative counters
  (se.sum_exec_runtime, sched_info.run_delay and .pcount, nvcsw, nivcsw, comm) into a
  ring buffer: one 72-byte record.
- per poll, in the agent: one listing of /proc and one read of each process's CPU
  clock (`clock_gettime`, under 1 µs). Only for a process whose clock moved: a listing
  of /proc/<pid>/task and each thread's /proc/<pid>/task/<tid>/schedstat; only for a
  thread whose run time moved: its .../status. Then the ring buffer of exit records is
  drained. An idle process costs one clock read.

Fields of `process_cpu`:
- oncpu_us: the process CPU clock, `clock_gettime(((~pid) << 3) | 2)`: the scheduler's
  sum_exec_runtime over all the process's threads, exited ones included. It is the
  clock /proc/<pid>/stat's utime + stime are scaled to, so the two agree up to their
  tick rounding.
- voluntary_switches, involuntary_switches: nvcsw and nivcsw summed over threads
  (/proc/<pid>/task/<tid>/status, voluntary_ctxt_switches and nonvoluntary_ctxt_switches).
- runq_wait_us, runq_waits: sched_info.run_delay and .pcount summed over threads
  (/proc/<pid>/task/<tid>/schedstat, second and third numbers): time spent runnable
  but waiting for a CPU, and how many times a thread got a CPU after such a wait.
Thread counters are kept per thread, so a thread that exits between polls adds what
it did since the last poll (from its exit record), once.

A process that exits between two polls keeps its last interval: its threads' exit
records give what they used after the last poll, reported once at the next poll under
the name it had (its main thread's comm). A process born and gone between two polls is
reported whole. A zombie is read through its still-readable clock, which is exact.

Kernel threads are reported like processes (pid = their tid, comm as /proc shows it,
e.g. `kworker/0:1-events`): their CPU is CPU the host really spent (softirqs in
ksoftirqd, writeback, reclaim in kswapd), top-N folding bounds their series, and an
idle one costs one clock read per poll and writes nothing.

The first poll reports what happened since the probe loaded: loading reads every
process once, as the baseline.

Limits:
- The last interval of a process that exits is off by a few ms (measured here: 1-2 ms
  under): a thread's exit record misses the CPU it uses after the tracepoint (releasing
  its memory and files) and since its last scheduler tick, and the per-thread run times
  it is taken from lag the process clock by the slice running at the previous read.
- The ring holds ~29,000 exit records between two polls; records past that are lost
  and counted in sonde_probe.map_full_drops (their processes' last intervals are lost).
- Only processes of the agent's own pid namespace are seen (the host's, in
  production); the probe refuses to load when paths.proc lists another namespace.
- A process whose non-leader thread calls execve: that thread's switch and run-queue
  counts up to the execve are counted twice (the kernel gives it the leader's id).

Kernel floor: BTF (/sys/kernel/btf/vmlinux), ring buffers (5.8),
bpf_get_ns_current_pid_tgid (5.7), CONFIG_SCHED_INFO for run-queue wait.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field

from sonde.ingest.runtime import cardinality, keys
from sonde.ingest.runtime.cardinality import OTHER
from sonde.ingest.runtime.delta import defer
from sonde.ingest.errors import ProbeError
from sonde.ingest.output.lineproto import Point, printable_name
from sonde.ingest.runtime.probe import Probe

# clockid_t of another process's CPU clock (include/linux/posix-timers.h): the pid
# complemented and shifted, and CPUCLOCK_SCHED (sum_exec_runtime, ns). (A thread's
# own clock is readable only from inside its process, so threads are read from
# their schedstat.)
CPUCLOCK_SCHED = 2

# Counters are tuples (cpu_ns, runq_ns, runq_waits, voluntary, involuntary): one
# thread's or one process's cumulative values, or the difference of two reads.
ZERO = (0, 0, 0, 0, 0)
GRACE_POLLS = 2  # a process's state outlives its last listing by this many polls, for late exit records


def process_clock(pid: int) -> int:
    return time.clock_gettime_ns(((~pid) << 3) | CPUCLOCK_SCHED)


# --- pure parsers of /proc text ----------------------------------------------------------

def parse_schedstat(text: str) -> tuple[int, int, int]:
    """/proc/<pid>/task/<tid>/schedstat: run time (ns), run-queue wait (ns), times run."""
    runtime, run_delay, pcount = text.split()[:3]
    return int(runtime), int(run_delay), int(pcount)


def parse_switches(text: str) -> tuple[int, int]:
    """(voluntary, involuntary) context switches from /proc/<pid>/task/<tid>/status."""
    voluntary = involuntary = None
    for line in reversed(text.splitlines()):  # the two lines are at the end
        key, _, value = line.partition(":")
        if key == "voluntary_ctxt_switches":
            voluntary = int(value)
        elif key == "nonvoluntary_ctxt_switches":
            involuntary = int(value)
        if voluntary is not None and involuntary is not None:
            return voluntary, involuntary
    raise ValueError("no voluntary_ctxt_switches / nonvoluntary_ctxt_switches lines")


def parse_stat(text: str) -> tuple[str, int]:
    """(state, start time in clock ticks since boot) from /proc/<pid>/stat. The comm
    field may hold spaces and parentheses, so fields are counted from its last ')'."""
    rest = text.rsplit(")", 1)[1].split()
    return rest[0], int(rest[19])


# --- counter arithmetic ------------------------------------------------------------------

def add(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b))


def since(now: tuple, prev: tuple | None) -> tuple:
    """now - prev per counter, never negative; everything is new when prev is None."""
    if prev is None:
        return now
    return tuple(max(n - p, 0) for n, p in zip(now, prev))


def fold(rows: list, n: int, admit) -> tuple[list, tuple | None]:
    """Split (pid, name, counters) rows into the top n by CPU that `admit(pid, name)`
    accepts (the series budget), and the exact sum of the others (None when none)."""
    kept, rest = cardinality.fold(rows, n, lambda r: r[2][0], lambda r: admit(r[0], r[1]))
    other = None
    for row in rest:
        other = add(other or ZERO, row[2])
    return kept, other


# --- state -------------------------------------------------------------------------------

class _Thread:
    __slots__ = ("counters", "gone")

    def __init__(self, counters: tuple, gone: int = 0):
        self.counters = counters  # cpu_ns here is schedstat's run time, stale by the running slice
        self.gone = gone  # polls since it left /proc with no exit record yet: its CPU is in the process clock


@dataclass
class _Proc:
    clock: int | None = None  # process CPU clock at the last read; None before the first
    start: int | None = None  # start time (ticks since boot), to tell a reused pid
    listed: int = -1  # poll generation that last listed it in /proc
    created: int = 0
    threads: dict = field(default_factory=dict)  # tid -> _Thread, as of the last read
    dead_tids: set = field(default_factory=set)  # exit record seen; may still be listed (zombie)
    pending: tuple = ZERO  # what exited threads did since the last read, not yet reported
    leader_exited: bool = False
    comm: bytes = b""  # the main thread's comm from its exit record: the name once the process is gone
    last_comm: bytes = b""  # /proc's name at the last report
    busiest: int = 0  # ns: the most one thread ran over the last read's interval
    pending_busiest: int = 0  # ns: the most one exited thread ran after the last read


@dataclass(frozen=True)
class State:
    """What the next poll starts from. A _Proc in a State is never changed: decode
    works on copies of the ones it touches."""
    procs: dict = field(default_factory=dict)  # tgid -> _Proc
    gen: int = 0
    last_ts: int = 0


ZOMBIE = "zombie"  # a thread read: its exit record is counted, it is still listed


@dataclass(frozen=True)
class Sample:
    """One listed process as read from /proc. clock: its CPU clock (None: it vanished).
    tasks: tid -> counters (cpu_ns, runq_ns, runq_waits, voluntary, involuntary), its
    run time alone when that has not moved since the last read, None when it went
    between the listing and the read, or ZOMBIE; tasks is None when nothing was read
    (its clock has not moved, or its task listing failed). start: its start time,
    read when the state needs it. comm: /proc's name, read when tasks were."""
    start: int | None = None
    clock: int | None = None
    tasks: dict | None = None
    comm: bytes | None = None


def _own(procs: dict, tgid: int) -> _Proc:
    """The process's _Proc, copied into `procs` (a new state's) before it is changed."""
    p = copy.copy(procs[tgid])
    procs[tgid] = p
    return p


def current(p: _Proc, gen: int, start: int | None) -> bool:
    """Whether a pid listed at poll `gen` is still the process `p`: listed at the last
    poll, and not a reused pid (its start time is read once its main thread has exited)."""
    if 0 <= p.listed < gen - 1:
        return False  # gone at the last poll: this is another process
    return not (p.leader_exited and start is not None and p.start is not None and start != p.start)


def apply_exits(procs: dict, records: list, gen: int) -> dict:
    """Pure: the exit records (tid, tgid, comm, final counters) added to the processes'
    pending counts. Returns the new processes (procs is not changed)."""
    procs = dict(procs)
    for tid, tgid, comm, final in records:
        if tgid in procs:
            p = _own(procs, tgid)
        else:
            p = procs[tgid] = _Proc(created=gen)
        p.threads = dict(p.threads)
        t = p.threads.pop(tid, None)
        d = since(final, t.counters if t else None)
        if t is not None and t.gone:
            d = (0,) + d[1:]
        p.pending = add(p.pending, d)
        p.pending_busiest = max(p.pending_busiest, d[0])
        p.dead_tids = p.dead_tids | {tid}
        if tid == tgid:
            p.leader_exited = True
            p.comm = comm
        elif not p.comm:
            p.comm = comm
    return procs


def advance(p: _Proc, s: Sample) -> tuple | None:
    """Pure on a copy: what a listed process did since its last read (None: nothing
    read), with p moved to this read."""
    if s.clock is None or s.tasks is None:
        return None
    live = ZERO
    busiest = 0
    threads = {}
    dead_tids = set(p.dead_tids)
    for tid, t in s.tasks.items():
        if t == ZOMBIE:
            continue  # exited (its record is counted), still listed as a zombie
        dead_tids.discard(tid)  # a live thread under that id again
        old = p.threads.get(tid)
        if t is None:  # gone since the listing: its CPU is in the process clock
            if old is not None:
                threads[tid] = _Thread(old.counters, 1)
            continue
        if isinstance(t, int):
            threads[tid] = _Thread(old.counters)  # it has not run since the last read: no switch either
            continue
        delta = since(t, old.counters if old else None)
        live = add(live, delta)
        busiest = max(busiest, delta[0])
        threads[tid] = _Thread(t)
    for tid, t in p.threads.items():
        # Gone from /proc, exit record not drained yet: keep it for the record,
        # whose CPU is already in the process clock.
        if tid not in threads and tid not in s.tasks and t.gone < GRACE_POLLS:
            threads[tid] = _Thread(t.counters, t.gone + 1)
    p.threads = threads
    p.dead_tids = dead_tids & set(s.tasks)
    cpu = s.clock - p.clock if p.clock is not None else s.clock
    d = (max(cpu, 0),) + add(live, p.pending)[1:]
    p.clock, p.pending = s.clock, ZERO
    p.busiest, p.pending_busiest = min(max(busiest, p.pending_busiest), d[0]), 0
    return d


def baseline(samples: dict[int, Sample], ts: int) -> State:
    """Pure: the state after reading every process once (the first poll reports only
    what happens after it)."""
    procs = {}
    for tgid, s in samples.items():
        p = procs[tgid] = _Proc(listed=0, start=s.start)
        advance(p, s)
    return State(procs, 0, ts)


def decode(records: list, samples: dict[int, Sample], state: State, ctx) -> tuple[list[Point], State]:
    """Pure: exit records drained from the ring, every listed process's Sample (in the
    order /proc listed them) and the previous state -> process_cpu points and the next
    state."""
    interval_ns = max(ctx.ts - state.last_ts, 1)
    gen = state.gen + 1
    procs = apply_exits(state.procs, records, gen)
    rows = []  # (tgid, name, counters)
    busiest: dict[int, int] = {}  # tgid -> ns its busiest thread ran this interval

    def retire(tgid: int, keep: bool = False) -> None:
        """Report what a gone process's threads did after the last read (their exit
        records), under the name it had; forget it once late records can no longer come."""
        p = procs[tgid]
        if any(p.pending):
            rows.append((tgid, printable_name(p.comm or p.last_comm), p.pending))
            busiest[tgid] = min(p.pending_busiest, p.pending[0])
            p = _own(procs, tgid)
            p.pending, p.pending_busiest = ZERO, 0
        if not keep:
            del procs[tgid]

    for tgid, s in samples.items():
        if tgid in procs and not current(procs[tgid], gen, s.start):
            retire(tgid)  # gone at the last poll, or its pid was reused since
        if tgid in procs:
            p = _own(procs, tgid)
            p.leader_exited = False
        else:
            p = procs[tgid] = _Proc(created=gen)
        if p.start is None:
            p.start = s.start
        p.listed = gen
        d = advance(p, s)
        if d and any(d):
            p.last_comm = s.comm if s.comm is not None else (p.comm or p.last_comm)
            rows.append((tgid, printable_name(p.last_comm), d))
            busiest[tgid] = p.busiest

    for tgid, p in list(procs.items()):
        if p.listed != gen:
            retire(tgid, keep=gen - max(p.listed, p.created) < GRACE_POLLS)
    return points(ctx, rows, interval_ns, busiest), State(procs, gen, ctx.ts)


def points(ctx, rows: list, interval_ns: int, busiest: dict[int, int]) -> list[Point]:
    kept, other = fold(rows, ctx.max_processes, lambda pid, name: ctx.budget.admit({("process_cpu", str(pid), name)}))
    out = [_point(ctx, str(pid), name, d, interval_ns, busiest.get(pid, 0)) for pid, name, d in kept]
    if other is not None:
        ctx.budget.admit({("process_cpu", OTHER, OTHER)}, force=True)
        kept_pids = {pid for pid, _, _ in kept}
        most = max((busiest.get(pid, 0) for pid, _, _ in rows if pid not in kept_pids), default=0)
        out.append(_point(ctx, OTHER, OTHER, other, interval_ns, most))
    return out


def _point(ctx, pid: str, name: str, d: tuple, interval_ns: int, busiest_ns: int) -> Point:
    cpu_ns, runq_ns, runq_waits, voluntary, involuntary = d
    return Point("process_cpu", {"host": ctx.host, "pid": pid, "comm": name}, {
        "oncpu_us": cpu_ns // 1000,
        "cpu_pct": cpu_ns / interval_ns * 100,
        "interval_us": interval_ns // 1000,
        "voluntary_switches": voluntary,
        "involuntary_switches": involuntary,
        "runq_wait_us": runq_ns // 1000,
        "runq_waits": runq_waits,
        "max_thread_oncpu_us": busiest_ns // 1000,
    }, ctx.ts)


class CpuDecoder:
    """The poll: drain the exit records, read /proc where the state says something
    may have moved, `decode` (pure), commit once the poll has succeeded."""

    def __init__(self, probe):
        self.probe = probe
        self.root = str(probe.config.paths.proc)
        self.records: list = []  # drained from the ring, not yet taken by a successful poll
        self._check_namespace()
        self.ring = probe.table("exits")  # keep the table: bcc frees its ring buffer with it
        self.ring.open_ring_buffer(self._on_record)
        self._set_pidns()
        self._baseline()

    # --- setup ---

    def _check_namespace(self) -> None:
        """The clocks are read by pid in the agent's own pid namespace, so the proc root
        must list that one: there, `self` names the agent's own pid. (RuntimeError: the
        runtime turns it into a one-line ProbeError and unloads the program.)"""
        try:
            self_pid = os.readlink(f"{self.root}/self")
        except OSError as e:
            raise RuntimeError(f"cannot read {self.root}/self ({e.strerror}); paths.proc must be a mounted procfs")
        if self_pid != str(os.getpid()):
            raise RuntimeError(f"{self.root} lists another pid namespace than the agent's own; run the agent "
                               f"in that namespace (the host's) or set paths.proc to its own /proc")

    def _set_pidns(self) -> None:
        """Tell the exit program which pid namespace to report ids in: the agent's own
        (its own ns link needs no ptrace access, unlike pid 1's)."""
        st = os.stat(f"{self.root}/self/ns/pid")
        table = self.probe.table("pidns")
        leaf = table.Leaf()
        leaf.dev = keys.kernel_dev(os.major(st.st_dev), os.minor(st.st_dev))  # the kernel's dev_t encoding
        leaf.ino = st.st_ino
        table[table.Key(0)] = leaf

    def _baseline(self) -> None:
        """Read every process once, so the first poll reports only what happens after load.
        Exit records that arrive meanwhile belong before the baseline and are dropped."""
        self.state = baseline({tgid: self._sample(tgid, None, self._start(tgid)) for tgid in self._pids()},
                              time.time_ns())
        self.probe.bpf.ring_buffer_consume()
        self.records = []

    # --- reading ---

    def _pids(self) -> list[int]:
        return [int(n) for n in os.listdir(self.root) if n.isdigit()]

    def _text(self, path: str) -> str | None:
        """A small /proc file in one read (os.open: pathlib costs more than the read here)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            return os.read(fd, 8192).decode("utf-8", "surrogateescape")
        except OSError:
            return None
        finally:
            os.close(fd)

    def _start(self, tgid: int) -> int | None:
        text = self._text(f"{self.root}/{tgid}/stat")
        return parse_stat(text)[1] if text else None

    def _thread_dead(self, tgid: int, tid: int) -> bool:
        text = self._text(f"{self.root}/{tgid}/task/{tid}/stat")
        return text is None or parse_stat(text)[0] in ("Z", "X")

    def _sample(self, tgid: int, p: _Proc | None, start: int | None) -> Sample:
        """Read a listed process, as far as its previous read `p` says anything may
        have moved: only its clock when that has not, and a thread's status only when
        its run time has moved."""
        try:
            clock = process_clock(tgid)
        except OSError:
            return Sample(start)
        if p is not None and p.clock is not None and clock == p.clock and p.pending == ZERO:
            return Sample(start, clock)  # it has not run: no thread can have switched, waited or been born
        task = f"{self.root}/{tgid}/task"
        try:
            names = os.listdir(task)
        except OSError:
            return Sample(start, clock)
        tasks: dict = {}
        for name in names:
            tid = int(name)
            if p is not None and tid in p.dead_tids and self._thread_dead(tgid, tid):
                tasks[tid] = ZOMBIE
                continue
            old = p.threads.get(tid) if p is not None else None
            sched = self._text(f"{task}/{tid}/schedstat")
            if sched is None:
                tasks[tid] = None
                continue
            runtime, run_delay, pcount = parse_schedstat(sched)
            if old is not None and runtime == old.counters[0]:
                tasks[tid] = runtime
                continue
            status = self._text(f"{task}/{tid}/status")
            tasks[tid] = None if status is None else (runtime, run_delay, pcount) + parse_switches(status)
        comm = self._text(f"{self.root}/{tgid}/comm")
        return Sample(start, clock, tasks,
                      comm.encode("utf-8", "surrogateescape").removesuffix(b"\n") if comm else None)

    def _on_record(self, ctx, data, size) -> None:
        e = self.ring.event(data)
        self.records.append((e.tid, e.tgid, bytes(e.comm).split(b"\0", 1)[0],
                             (e.cpu_ns, e.runq_ns, e.runq_waits, e.voluntary, e.involuntary)))

    # --- polling ---

    def poll(self, ts: int) -> tuple[list[Point], int]:
        self.probe.bpf.ring_buffer_consume()
        records = list(self.records)
        gen = self.state.gen + 1
        procs = apply_exits(self.state.procs, records, gen)  # what the reads below compare with
        samples = {}
        for tgid in self._pids():
            p = procs.get(tgid)
            start = self._start(tgid) if p is None or p.leader_exited or p.start is None or \
                not current(p, gen, None) else None
            samples[tgid] = self._sample(tgid, p if p is not None and current(p, gen, start) else None, start)
        points, new = decode(records, samples, self.state, self.probe.context(ts))

        def commit() -> None:
            self.state = new
            del self.records[:len(records)]
        defer(commit)  # once these points are handed over
        return points, len(new.procs)


def kernel_offsets(sys_root) -> list[str]:
    from sonde.ingest.runtime.btf import load
    b = load(sys_root)
    if not b.has_member("task_struct", "sched_info.run_delay"):
        raise ProbeError("this kernel has no task_struct.sched_info (CONFIG_SCHED_INFO is off), "
                         "so it keeps no run-queue wait; disable the probe with probes.cpu.enabled: false")
    return [f"-DOFF_SUM_EXEC_RUNTIME={b.offsetof('task_struct', 'se.sum_exec_runtime')}",
            f"-DOFF_RUN_DELAY={b.offsetof('task_struct', 'sched_info.run_delay')}",
            f"-DOFF_PCOUNT={b.offsetof('task_struct', 'sched_info.pcount')}",
            f"-DOFF_NVCSW={b.offsetof('task_struct', 'nvcsw')}",
            f"-DOFF_NIVCSW={b.offsetof('task_struct', 'nivcsw')}"]


PROBE = Probe(
    name="cpu",
    doc=__doc__,
    hooks=("sched:sched_process_exit",),
    cflags=kernel_offsets,
    decoder=CpuDecoder,
)
