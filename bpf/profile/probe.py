"""profile: CPU samples by stack, per process. Off by default (continuous profiling is
opt-in: `probes.profile.enabled: true`); `sonde profile` uses the same program for one
process at a time, with off-CPU time as well.

What fires, and when:
- per sample: a CPU-clock perf event on every CPU (49 Hz in the agent; `sonde profile
  --hz`, 99 by default) takes the user and kernel stack ids of the running task
  (BPF_STACK_TRACE) and counts one sample per (process, user stack, kernel stack),
  in the kernel; the idle task is skipped, and with a filter (sonde profile) so is
  every process not chosen, before anything else is done;
- per context switch, only with `sonde profile --off-cpu`: `sched:sched_switch` takes
  the stack of a chosen process's thread as it leaves the CPU and adds the time it
  was away when it comes back;
- per poll: the counts and their stacks are swapped to a second set, read and
  cleared: exact, nothing counted twice or lost between a read and a delete (see
  profile.bpf.c); then the top stacks of the busiest processes are symbolised.

What it reports: `profile_samples` per process and interval (samples, distinct stacks,
samples whose stack was truncated or lost), and its top stacks, `profile_stack`, one
point per rank (1 to 5) with the stack as folded text and the function it was in.
The stack is a field, never a tag: a tag per stack would add series without bound;
ranks and the top-N process fold bound them to processes x 5.

Readable stacks: C and C++ code with frame pointers resolve from the ELF's symbols
(.symtab, debuginfo under /usr/lib/debug/.build-id, else .dynsym); kernel frames from
/proc/kallsyms (`_[k]`); Java JIT frames from the JVM's perf map (`_[j]`, `sonde
profile` runs `jcmd PID Compiler.perfmap`; the JVM must run with
`-XX:+PreserveFramePointer`). In the stored top stacks, code no symbol names (a
stripped object's own functions) is one frame per object, `obj (no symbol)`, so that a
busy stripped binary's samples are not spread over one stack per offset (`sonde
profile` keeps the offsets). A user stack that is not walked to its thread's start
is cut after the first frame without frame pointers and ends in a
`[truncated: ...]` frame: a binary built without frame pointers (Debian's python3.11)
never shows a made-up caller.

Python 3.11: the program walks the interpreter's own frames from the sampled
thread's PyThreadState, with offsets derived from that version's headers
(python3.11-dev; python.py) and kept per process in a map, and names them
`module.function:line`. The agent looks at each busy process once and walks its
Python frames from the next interval on.

Java in continuous mode: a JVM among the busiest processes gets its perf map
(`jcmd PID Compiler.perfmap`) in a background thread, again every minute while it
stays busy; its JIT frames are named from the interval after, `[unknown JIT code]`
before that and for methods compiled since the last map.

Limits: each stack map holds 16384 stacks per interval; a sample whose stack found its
hash bucket taken is counted as lost (`lost_samples`), never given another stack.
"""
from __future__ import annotations

import ctypes as ct
import errno
import logging
import platform
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from sonde.bpf.profile import python, symbols
from sonde.bpf.profile.jvm import JitMaps
from sonde.ingest.output.lineproto import Point
from sonde.ingest.runtime.bpfmap import read_all
from sonde.ingest.runtime.cardinality import OTHER, fold
from sonde.ingest.runtime.delta import defer
from sonde.ingest.runtime.probe import Probe

log = logging.getLogger("sonde.profile")

AGENT_HZ = 49
TOP_STACKS = 5            # profile_stack ranks per process and interval
FRAMES_CHARS = 2000       # a stored stack keeps its leaf end within this many characters

_MEMBARRIER = {"x86_64": 324, "aarch64": 283}
_MEMBARRIER_CMD_GLOBAL = 1


def grace_period() -> None:
    """Return once every BPF program that was running has returned.
    membarrier(MEMBARRIER_CMD_GLOBAL) is synchronize_rcu(), and perf-event and tracepoint
    programs run inside RCU read-side sections. Where it is refused (nohz_full CPUs),
    wait 50 ms: these programs run for microseconds."""
    nr = _MEMBARRIER.get(platform.machine())
    if nr is not None:
        libc = ct.CDLL(None, use_errno=True)
        if libc.syscall(nr, _MEMBARRIER_CMD_GLOBAL, 0, 0) == 0:
            return
    time.sleep(0.05)


@dataclass(frozen=True)
class StackRow:
    tgid: int
    comm: bytes
    user: tuple[int, ...] | int    # addresses, leaf first; or a negative errno (no stack)
    kernel: tuple[int, ...] | int
    count: int
    time_ns: int = 0
    python: tuple[tuple[int, int], ...] = ()  # (code object, instruction index), leaf first
    python_truncated: bool = False


@dataclass
class Taken:
    on_cpu: list[StackRow]
    off_cpu: list[StackRow]


class StackSampler:
    """Swaps, reads and clears the program's sets (profile.bpf.c)."""

    def __init__(self, bpf, off_cpu: bool = False):
        self.bpf = bpf
        self.off_cpu = off_cpu
        self.active = 0
        self._set = bpf.get_table(b"active_set")
        self._set[self._set.Key(0)] = self._set.Leaf(0)
        self._off_stacks: dict[int, tuple[int, ...] | int] = {}

    def set_filter(self, tgids) -> None:
        table = self.bpf.get_table(b"tgid_filter")
        for tgid in tgids:
            table[table.Key(tgid)] = table.Leaf(1)

    def take(self) -> Taken:
        """Swap sets and read the one nothing writes any more. It is cleared once the
        agent's poll has handed its points over (`defer`; at once outside a poll): a poll
        that fails leaves its counts in place, and the set, active again from the next
        swap, brings them back with the one after."""
        old = self.active
        self.active ^= 1
        self._set[self._set.Key(0)] = self._set.Leaf(self.active)
        grace_period()  # nothing writes set `old` from here on
        stacks = self.bpf.get_table(f"stacks_{old}".encode())
        walked: dict[int, tuple[int, ...] | int] = {}
        samples = self.bpf.get_table(f"samples_{old}".encode())
        py_samples = self.bpf.get_table(f"py_samples_{old}".encode())
        on, keys = self._rows(samples, stacks, walked)
        py_on, py_keys = self._python_rows(py_samples, stacks, walked)
        on += py_on
        work = [(samples, keys), (py_samples, py_keys)]
        off = []
        if self.off_cpu:
            offcpu = self.bpf.get_table(f"offcpu_{old}".encode())
            off, off_keys = self._rows(offcpu, self.bpf.get_table(b"offcpu_stacks"), self._off_stacks)
            work.append((offcpu, off_keys))

        def clear() -> None:
            for table, table_keys in work:
                _delete(table, table_keys)
            _delete(stacks, list(stacks.keys()))  # all of them, also stacks whose sample found the map full
        defer(clear)
        return Taken(on, off)

    @staticmethod
    def _walk(stacks, sid: int, cache: dict) -> tuple[int, ...] | int:
        if sid < 0:
            return sid
        if sid not in cache:
            try:
                leaf = stacks[stacks.Key(sid)]
            except KeyError:
                cache[sid] = -errno.ENOENT
            else:
                ips = []
                for ip in leaf.ip:
                    if not ip:
                        break
                    ips.append(ip)
                cache[sid] = tuple(ips)
        return cache[sid]

    def counted(self) -> int:
        """Every count the program has added since it was loaded (never cleared)."""
        return sum(int(v) for leaf in self.bpf.get_table(b"counted").values() for v in leaf)

    def set_python(self, tgid: int, interp, offsets: dict[str, int]) -> None:
        """Walk this process's Python frames from now on (ValueError: its layout does not fit)."""
        table = self.bpf.get_table(b"py_procs")
        table[table.Key(tgid)] = python.proc_entry(table.Leaf, interp, offsets)

    def forget_python(self, tgid: int) -> None:
        table = self.bpf.get_table(b"py_procs")
        try:
            del table[table.Key(tgid)]
        except KeyError:
            pass

    def _python_rows(self, table, stacks, cache: dict) -> tuple[list[StackRow], list]:
        rows, keys = [], []
        for k, v in read_all(table):
            keys.append(table.Key.from_buffer_copy(k))
            frames = tuple((k.frames[i].code, k.frames[i].index) for i in range(min(k.depth, len(k.frames))))
            rows.append(StackRow(k.tgid, bytes(v.comm).split(b"\0", 1)[0], -errno.EFAULT,
                                 self._walk(stacks, k.kernel_stack, cache), v.count, v.time_ns, frames,
                                 bool(k.truncated)))
        return rows, keys

    def _rows(self, table, stacks, cache: dict) -> tuple[list[StackRow], list]:
        raw = [(k.tgid, k.user_stack, k.kernel_stack, v.count, v.time_ns, bytes(v.comm).split(b"\0", 1)[0])
               for k, v in read_all(table)]
        keys = [table.Key(t, u, kk, 0) for t, u, kk, _, _, _ in raw]
        rows = [StackRow(t, comm, self._walk(stacks, u, cache), self._walk(stacks, kk, cache), n, ns)
                for t, u, kk, n, ns, comm in raw]
        return rows, keys


def _delete(table, keys) -> None:
    for key in keys:
        try:
            del table[key]
        except KeyError:
            pass


# --- from rows to frames ------------------------------------------------------------

LOST = {errno.EEXIST: "[stack lost: hash bucket taken]", errno.ENOMEM: "[stack lost: no memory]",
        errno.ENOENT: "[stack lost]"}


class Symbolizer:
    """Rows to frame lists (root first), for the agent and for `sonde profile`."""

    def __init__(self, proc_root: Path = Path("/proc")):
        self.proc_root = Path(proc_root)
        self.elves = symbols.ElfCache()
        self.kernel = symbols.KernelSymbols.load(self.proc_root)
        self.processes: dict[int, symbols.ProcessSymbols] = {}
        self.python: dict[int, object] = {}  # tgid -> python.CodeReader

    def process(self, tgid: int) -> symbols.ProcessSymbols:
        if tgid not in self.processes:
            ps = symbols.ProcessSymbols(self.proc_root, tgid, self.elves)
            ps.refresh()
            self.processes[tgid] = ps
        return self.processes[tgid]

    def forget(self, keep: set[int]) -> None:
        for tgid in [t for t in self.processes if t not in keep]:
            del self.processes[tgid]
        for tgid in [t for t in self.python if t not in keep]:
            self.python.pop(tgid).close()

    def frames(self, row: StackRow) -> tuple[tuple[str, ...], str, bool]:
        """(frames root first, why it was truncated or "", whether its stack was lost)."""
        out: list[str] = []
        why, lost = "", False
        if row.python:
            reader = self.python.get(row.tgid)
            if row.python_truncated:
                why = "Python stack deeper than the walk"
                out.append(f"[truncated: {why}]")
            out += [reader.frame(code, index) if reader else f"[python code 0x{code:x}]"
                    for code, index in reversed(row.python)]
        elif isinstance(row.user, tuple) and row.user:
            resolved = self.process(row.tgid).resolve(list(row.user))
            if resolved.truncated:
                why = resolved.truncated
                out.append(f"[{why}]" if not resolved.frames else f"[truncated: {why}]")
            out += reversed(resolved.frames)
        elif isinstance(row.user, int) and -row.user in LOST:
            out.append(LOST[-row.user])
            lost = True
        if isinstance(row.kernel, tuple):
            out += [self.kernel.name(a) for a in reversed(row.kernel)]
        elif isinstance(row.kernel, int) and -row.kernel in LOST:
            out.append(LOST[-row.kernel])
            lost = True
        return tuple(out), why, lost


_UNNAMED = re.compile(r"^([^;\s]+)\+0x[0-9a-f]+$")


def unnamed_by_object(frame: str) -> str:
    """`libfoo.so+0x1234` (no symbol covers the address) -> `libfoo.so (no symbol)`."""
    m = _UNNAMED.match(frame)
    return f"{m.group(1)} (no symbol)" if m else frame


def leaf_function(frames: tuple[str, ...]) -> str:
    """The innermost frame of the program's own code: user frames win over the kernel's."""
    user = [f for f in frames if not f.endswith(symbols.KERNEL_SUFFIX) and not f.startswith("[")]
    if user:
        return user[-1]
    return frames[-1] if frames else ""


def folded_text(frames: tuple[str, ...], limit: int = FRAMES_CHARS) -> str:
    text = ";".join(frames)
    if len(text) <= limit:
        return text
    return "...;" + text[-(limit - 4):].split(";", 1)[-1]


# --- the agent's continuous mode ----------------------------------------------------


class ProfileDecoder:
    def __init__(self, probe):
        self.probe = probe
        self.host = probe.config.host
        self.sampler = StackSampler(probe.bpf)
        self.symbolizer = Symbolizer(probe.config.paths.proc)
        self.checked: set[int] = set()   # processes looked at for a Python interpreter
        self.jit = JitMaps(probe.config.paths.proc)   # busy JVMs' perf maps, fetched in the background

    def close(self) -> None:
        self.jit.close()

    def _python(self, tgid: int) -> None:
        """From the next interval on, walk the Python frames of a busy Python 3.11 process."""
        self.checked.add(tgid)
        interp = python.find_interpreter(self.probe.config.paths.proc, tgid)
        if interp is None:
            return
        try:
            offsets = python.derive_offsets(interp.version)
            self.sampler.set_python(tgid, interp, offsets)
        except ValueError as e:
            log.info("profile: pid %d runs Python %s, shown with C frames: %s", tgid, interp.version, e)
            return
        self.symbolizer.python[tgid] = python.CodeReader(self.probe.config.paths.proc, tgid, interp, offsets)

    def poll(self, ts: int) -> tuple[list[Point], int]:
        taken = self.sampler.take()
        by_tgid: dict[int, list[StackRow]] = defaultdict(list)
        for row in taken.on_cpu:
            by_tgid[row.tgid].append(row)
        procs = []
        for tgid, rows in by_tgid.items():
            alive = self.probe.procfs.alive(tgid)
            name = self.probe.process_name(tgid, rows[0].comm, exited=not alive)
            procs.append((tgid, name, [(r.count, r) for r in rows]))
        ctx = self.probe.context(ts)
        keep, rest = choose(procs, ctx)
        symbolised = []
        for tgid, name, rows in keep:
            if tgid not in self.checked:
                self._python(tgid)
            try:
                stacks = self._stacks(tgid, [r for _, r in rows])
            except Exception:  # the counts are cleared already: a symbolisation bug must not lose them
                log.exception("profile: cannot symbolise the stacks of pid %d", tgid)
                stacks = [(sum(n for n, _ in rows), ("[stacks not symbolised: see the agent's log]",),
                           "not symbolised", False)]
            symbolised.append((tgid, name, stacks))
            self.jit.want(tgid, self.symbolizer.process(tgid))
        points = decode(symbolised, rest, ctx)
        # What is known of a process (its maps, its Python state) lasts while it lives,
        # not only while it is among the busiest.
        live = {t for t in set(self.symbolizer.processes) | self.checked if self.probe.procfs.alive(t)}
        for tgid in [t for t in self.symbolizer.python if t not in live]:
            self.sampler.forget_python(tgid)
        self.symbolizer.forget(live)
        self.jit.forget(live)
        self.checked &= live
        return points, len(taken.on_cpu)

    def _stacks(self, tgid: int, rows: list[StackRow]) -> list[tuple]:
        """(samples, frames, why truncated or "", lost) per stack, symbolised. Code no
        symbol names (a stripped object's own functions) is one frame per object here,
        `obj (no symbol)`, and the stacks that become equal are one: a busy stripped
        binary's samples spread over hundreds of offsets would otherwise leave the top
        stacks of an interval holding a few percent of them each."""
        known = tgid in self.symbolizer.processes
        ps = self.symbolizer.process(tgid)   # a new one reads its maps now
        if known:
            ps.refresh()
        merged: dict[tuple, int] = defaultdict(int)
        for row in rows:
            frames, why, lost = self.symbolizer.frames(row)
            merged[(tuple(unnamed_by_object(f) for f in frames), why, lost)] += row.count
        return [(n, frames, why, lost) for (frames, why, lost), n in merged.items()]


RANKS = tuple(str(r) for r in range(1, TOP_STACKS + 1))


def choose(procs: list, ctx) -> tuple[list, list]:
    """The processes (tgid, name, [(samples, row)]) that keep their own series: the
    busiest that the series budget admits; the rest are written as pid=other."""
    def admit(p) -> bool:
        tgid, name, _ = p
        return ctx.budget.admit({("profile_samples", str(tgid), name)} |
                                {("profile_stack", str(tgid), name, r) for r in RANKS})
    return fold(procs, ctx.max_processes, lambda p: sum(n for n, _ in p[2]), admit)


def decode(keep: list, rest: list, ctx) -> list[Point]:
    """Pure: the kept processes with their symbolised stacks, (tgid, name, [(samples,
    frames root first, why truncated or "", lost)]), and the rest, (tgid, name,
    [(samples, row)]) -> profile_samples per process and its top stacks."""
    points = []
    for tgid, name, stacks in keep:
        tags = {"host": ctx.host, "pid": str(tgid), "comm": name}
        total = sum(n for n, _, _, _ in stacks)
        merged: dict[tuple[str, ...], list] = {}
        truncated = lost = 0
        for n, frames, why, was_lost in stacks:
            frames = tuple(frames)
            truncated += n if why else 0
            lost += n if was_lost else 0
            merged.setdefault(frames, [0, bool(why)])[0] += n
        points.append(Point("profile_samples", tags, {
            "samples": total, "stacks": len(merged), "truncated_samples": truncated, "lost_samples": lost}, ctx.ts))
        top = sorted(merged.items(), key=lambda kv: (-kv[1][0], kv[0]))[:TOP_STACKS]
        for rank, (frames, (n, trunc)) in enumerate(top, 1):
            points.append(Point("profile_stack", dict(tags, rank=str(rank)), {
                "samples": n, "share_pct": round(100.0 * n / total, 2), "function": leaf_function(frames),
                "frames": folded_text(frames), "truncated": int(trunc)}, ctx.ts))
    if rest:
        points.append(Point("profile_samples", {"host": ctx.host, "pid": OTHER, "comm": OTHER}, {
            "samples": sum(n for p in rest for n, _ in p[2]),
            "stacks": sum(len(p[2]) for p in rest)}, ctx.ts))
    return points


PROBE = Probe(
    name="profile",
    doc=__doc__,
    hooks=(),
    default_enabled=False,
    cpu_clock={"on_cpu_sample": AGENT_HZ},
    decoder=ProfileDecoder,
)
