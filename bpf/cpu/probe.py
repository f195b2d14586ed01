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

import os
import time
from dataclasses import dataclass, field

from sonde.ingest.runtime import cardinality
from sonde.ingest.runtime.cardinality import OTHER
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

    def __init__(self, counters: tuple):
        self.counters = counters  # cpu_ns here is schedstat's run time, stale by the running slice
        self.gone = 0  # polls since it left /proc with no exit record yet: its CPU is in the process clock


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


class CpuDecoder:
    def __init__(self, probe):
        self.probe = probe
        self.host = probe.config.host
        self.root = str(probe.config.paths.proc)
        self.procs: dict[int, _Proc] = {}
        self.records: list = []
        self.busiest: dict[int, int] = {}  # tgid -> ns its busiest thread ran this interval (this poll's rows)
        self.gen = 0
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
        # the kernel compares its own dev_t encoding, MKDEV(major, minor) = major << 20 | minor
        leaf.dev = (os.major(st.st_dev) << 20) | os.minor(st.st_dev)
        leaf.ino = st.st_ino
        table[table.Key(0)] = leaf

    def _baseline(self) -> None:
        """Read every process once, so the first poll reports only what happens after load.
        Exit records that arrive meanwhile belong before the baseline and are dropped."""
        for tgid in self._pids():
            p = self.procs[tgid] = _Proc(listed=self.gen)
            p.start = self._start(tgid)
            self._read(tgid, p)
        self.probe.bpf.ring_buffer_consume()
        self.records = []
        self.last_ts = time.time_ns()

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

    def _read(self, tgid: int, p: _Proc) -> tuple | None:
        """Read a listed process; return what it did since the last read, or None
        when it did nothing (or vanished meanwhile: its exit records come next poll)."""
        try:
            clock = process_clock(tgid)
        except OSError:
            return None
        if p.clock is not None and clock == p.clock and p.pending == ZERO:
            return None  # it has not run: no thread can have switched, waited or been born
        task = f"{self.root}/{tgid}/task"
        try:
            names = os.listdir(task)
        except OSError:
            return None
        live = ZERO
        busiest = 0
        threads = {}
        listed = set()
        for name in names:
            tid = int(name)
            listed.add(tid)
            if tid in p.dead_tids:
                if self._thread_dead(tgid, tid):
                    continue  # exited (its record is counted), still listed as a zombie
                p.dead_tids.discard(tid)  # a live thread under that id again
            old = p.threads.get(tid)
            sched = self._text(f"{task}/{tid}/schedstat")
            if sched is None:  # gone since the listing: its CPU is in the process clock
                if old is not None:
                    old.gone = 1
                    threads[tid] = old
                continue
            runtime, run_delay, pcount = parse_schedstat(sched)
            if old is not None and runtime == old.counters[0]:
                old.gone = 0
                threads[tid] = old  # it has not run since the last read: no switch either
                continue
            status = self._text(f"{task}/{tid}/status")
            if status is None:
                if old is not None:
                    old.gone = 1
                    threads[tid] = old
                continue
            counters = (runtime, run_delay, pcount) + parse_switches(status)
            delta = since(counters, old.counters if old else None)
            live = add(live, delta)
            busiest = max(busiest, delta[0])
            threads[tid] = _Thread(counters)
        for tid, t in p.threads.items():
            # Gone from /proc, exit record not drained yet: keep it for the record,
            # whose CPU is already in the process clock.
            if tid not in threads and tid not in listed and t.gone < GRACE_POLLS:
                t.gone += 1
                threads[tid] = t
        p.threads = threads
        p.dead_tids &= listed
        cpu = clock - p.clock if p.clock is not None else clock
        d = (max(cpu, 0),) + add(live, p.pending)[1:]
        p.clock, p.pending = clock, ZERO
        p.busiest, p.pending_busiest = min(max(busiest, p.pending_busiest), d[0]), 0
        return d

    def _on_record(self, ctx, data, size) -> None:
        e = self.ring.event(data)
        self.records.append((e.tid, e.tgid, bytes(e.comm).split(b"\0", 1)[0],
                             (e.cpu_ns, e.runq_ns, e.runq_waits, e.voluntary, e.involuntary)))

    def _exited(self, tid: int, tgid: int, comm: bytes, final: tuple) -> None:
        p = self.procs.get(tgid)
        if p is None:
            p = self.procs[tgid] = _Proc(created=self.gen)
        t = p.threads.pop(tid, None)
        d = since(final, t.counters if t else None)
        if t is not None and t.gone:
            d = (0,) + d[1:]
        p.pending = add(p.pending, d)
        p.pending_busiest = max(p.pending_busiest, d[0])
        p.dead_tids.add(tid)
        if tid == tgid:
            p.leader_exited = True
            p.comm = comm
        elif not p.comm:
            p.comm = comm

    # --- polling ---

    def poll(self, ts: int) -> tuple[list[Point], int]:
        interval_ns = max(ts - self.last_ts, 1)
        self.last_ts = ts
        self.gen += 1
        self.probe.bpf.ring_buffer_consume()
        records, self.records = self.records, []
        for tid, tgid, comm, final in records:
            self._exited(tid, tgid, comm, final)

        rows = []  # (tgid, name, counters)
        self.busiest = {}
        for tgid in self._pids():
            p = self.procs.get(tgid)
            if p is not None and p.listed >= 0 and p.listed < self.gen - 1:
                self._retire(tgid, p, rows)  # gone at the last poll: this is another process
                p = None
            if p is not None and p.leader_exited:
                p.leader_exited = False
                start = self._start(tgid)
                if start is not None and p.start is not None and start != p.start:
                    self._retire(tgid, p, rows)  # its pid was reused since the last poll
                    p = None
            if p is None:
                p = self.procs[tgid] = _Proc(created=self.gen)
            if p.start is None:
                p.start = self._start(tgid)
            p.listed = self.gen
            d = self._read(tgid, p)
            if d and any(d):
                comm = self._text(f"{self.root}/{tgid}/comm")
                p.last_comm = (comm.encode("utf-8", "surrogateescape").removesuffix(b"\n") if comm else
                               p.comm or p.last_comm)
                rows.append((tgid, printable_name(p.last_comm), d))
                self.busiest[tgid] = p.busiest

        for tgid, p in list(self.procs.items()):
            if p.listed != self.gen:
                self._retire(tgid, p, rows, keep=self.gen - max(p.listed, p.created) < GRACE_POLLS)
        return self._points(ts, rows, interval_ns), len(self.procs)

    def _retire(self, tgid: int, p: _Proc, rows: list, keep: bool = False) -> None:
        """Report what a gone process's threads did after the last read (their exit
        records), under the name it had; forget it once late records can no longer come."""
        if any(p.pending):
            rows.append((tgid, printable_name(p.comm or p.last_comm), p.pending))
            self.busiest[tgid] = min(p.pending_busiest, p.pending[0])
            p.pending, p.pending_busiest = ZERO, 0
        if not keep:
            del self.procs[tgid]

    def _points(self, ts: int, rows: list, interval_ns: int) -> list[Point]:
        budget = self.probe.budget
        kept, other = fold(rows, self.probe.settings.max_processes,
                           lambda pid, name: budget.admit({("process_cpu", str(pid), name)}))
        points = [self._point(ts, str(pid), name, d, interval_ns, self.busiest.get(pid, 0)) for pid, name, d in kept]
        if other is not None:
            budget.admit({("process_cpu", OTHER, OTHER)}, force=True)
            kept_pids = {pid for pid, _, _ in kept}
            busiest = max((self.busiest.get(pid, 0) for pid, _, _ in rows if pid not in kept_pids), default=0)
            points.append(self._point(ts, OTHER, OTHER, other, interval_ns, busiest))
        return points

    def _point(self, ts: int, pid: str, name: str, d: tuple, interval_ns: int, busiest_ns: int) -> Point:
        cpu_ns, runq_ns, runq_waits, voluntary, involuntary = d
        return Point("process_cpu", {"host": self.host, "pid": pid, "comm": name}, {
            "oncpu_us": cpu_ns // 1000,
            "cpu_pct": cpu_ns / interval_ns * 100,
            "interval_us": interval_ns // 1000,
            "voluntary_switches": voluntary,
            "involuntary_switches": involuntary,
            "runq_wait_us": runq_ns // 1000,
            "runq_waits": runq_waits,
            "max_thread_oncpu_us": busiest_ns // 1000,
        }, ts)


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
