"""`sonde profile`: sample chosen processes for a while and write flame graphs.

The probe folder bpf/profile/ holds the kernel program, the exact swap-read-clear of
its counts and the symbolisation; this module runs one session: it finds the
processes, loads the program with a tgid filter (and the off-CPU hook when asked),
reads every second while the processes live, fetches a JVM's perf map through
`jcmd`, and writes folded stacks, speedscope JSON and an SVG per kind.

Everything that could surprise a reader of the graph becomes a one-line note (a
process that exited, a stripped or deleted binary, code without frame pointers, a
JVM without -XX:+PreserveFramePointer); notes are printed and drawn under the graph.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sonde.bpf.profile import python as pyframes
from sonde.bpf.profile import symbols
from sonde.bpf.profile.jvm import PFP, is_jvm, jvm_perf_map, preserves_frame_pointers
from sonde.bpf.profile.probe import PROBE, StackRow, StackSampler, Symbolizer
from sonde.ingest import config as config_mod
from sonde.ingest.analysis import flamegraph
from sonde.ingest.errors import SondeError
from sonde.ingest.runtime.probe import LoadedProbe, ensure_tracefs

MAX_SECONDS = 3600
POLL_SECONDS = 1.0
JIT_REFRESH_SECONDS = 10.0


@dataclass
class Result:
    on_cpu: flamegraph.Stacks
    off_cpu: flamegraph.Stacks | None
    notes: list[str]
    files: list[Path]
    samples: int
    seconds: float


# --- choosing processes --------------------------------------------------------------


def _comm(proc: Path, pid: int) -> str | None:
    try:
        return (proc / str(pid) / "comm").read_text().rstrip("\n")
    except OSError:
        return None


def _names(proc: Path, pid: int) -> set[str]:
    """What a user may call a process: its comm, its executable's and argv[0]'s base names."""
    names = set()
    comm = _comm(proc, pid)
    if comm:
        names.add(comm)
    try:
        names.add(os.path.basename(os.readlink(proc / str(pid) / "exe")).removesuffix(" (deleted)"))
    except OSError:
        pass
    try:
        argv0 = (proc / str(pid) / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        if argv0:
            names.add(os.path.basename(argv0))
    except OSError:
        pass
    return names


def find_by_name(proc: Path, name: str, exclude: int | None = None) -> list[int]:
    found = []
    for entry in Path(proc).iterdir():
        if entry.name.isdigit() and int(entry.name) != exclude and name in _names(proc, int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def targets(proc: Path, pid: int | None, process: str | None) -> list[int]:
    if pid is not None:
        if pid <= 0 or not (Path(proc) / str(pid)).is_dir():
            raise SondeError(f"profile: no process with pid {pid}; give a running process's pid (see ps)")
        try:
            status = (Path(proc) / str(pid) / "status").read_text()
        except OSError:
            raise SondeError(f"profile: pid {pid} exited before it could be profiled")
        tgid = next((int(l.split()[1]) for l in status.splitlines() if l.startswith("Tgid:")), pid)
        return [tgid]
    found = find_by_name(proc, process, exclude=os.getpid())
    if not found:
        raise SondeError(f"profile: no running process is called {process!r} (by comm, executable or argv[0])")
    return found


# --- the session ---------------------------------------------------------------------


@dataclass
class _Session:
    proc: Path
    symbolizer: Symbolizer
    comms: dict[int, str] = field(default_factory=dict)
    on: Counter = field(default_factory=Counter)
    off: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    exited: dict[int, float] = field(default_factory=dict)
    jvms: dict[int, float] = field(default_factory=dict)  # pid -> when its perf map was last fetched

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def add(self, rows: list[StackRow], into: Counter, weight) -> None:
        for r in rows:
            self.comms.setdefault(r.tgid, r.comm.decode(errors="replace"))
            into[(r.tgid, r.user, r.kernel, r.python, r.python_truncated)] += weight(r)
            reader = self.symbolizer.python.get(r.tgid)
            for code, _ in r.python if reader else ():
                reader.code(code)  # read now, while the process (and its code objects) live

    def watch(self, pids: list[int], started: float) -> None:
        for pid in pids:
            if pid in self.exited:
                continue
            ps = self.symbolizer.process(pid)
            if not ps.refresh():
                self.exited[pid] = time.monotonic() - started
                self.note(f"pid {pid} exited {self.exited[pid]:.1f} s into the profile; its samples until then are kept")
            elif pid not in self.comms:
                self.comms[pid] = _comm(self.proc, pid) or str(pid)

    def watch_python(self, sampler: StackSampler, pid: int) -> None:
        """Python frames for pid when it runs a Python 3.11 (a note says why not, else)."""
        interp = pyframes.find_interpreter(self.proc, pid)
        if interp is None:
            return
        try:
            offsets = pyframes.derive_offsets(interp.version)
            sampler.set_python(pid, interp, offsets)
        except ValueError as e:
            self.note(f"pid {pid} runs Python {interp.version}: {e}; its stacks are the interpreter's C frames")
            return
        self.symbolizer.python[pid] = pyframes.CodeReader(self.proc, pid, interp, offsets)
        self.note(f"pid {pid} runs Python {interp.version} ({interp.path}): Python frames from the interpreter's "
                  f"own state; threads not holding the GIL show their C stacks")

    def fetch_jit(self, pid: int) -> None:
        ps = self.symbolizer.process(pid)
        pfp = preserves_frame_pointers(self.proc, pid)
        if not pfp:
            self.note(f"pid {pid} is a JVM without {PFP}: its stacks stop at the first JIT frame "
                      f"(restart it with {PFP} for whole Java stacks)")
        table, problem = jvm_perf_map(self.proc, pid)
        if problem:
            self.note(problem)
        ps.set_jit_map(table, pfp)
        self.jvms[pid] = time.monotonic()

    def stacks(self, counts: Counter, multi: bool) -> tuple[flamegraph.Stacks, Counter]:
        out: dict[tuple[str, ...], int] = defaultdict(int)
        why = Counter()
        for (tgid, user, kernel, py, py_truncated), w in counts.items():
            if w <= 0:
                continue
            frames, truncated, _ = self.symbolizer.frames(StackRow(tgid, b"", user, kernel, w, 0, py, py_truncated))
            root = self.comms.get(tgid, str(tgid))
            if multi:
                root = f"{root} [{tgid}]"
            out[(root,) + frames] += w
            if truncated:
                why[truncated] += w
        return dict(out), why


def profile(*, pid: int | None, process: str | None, seconds: float, hz: int, off_cpu: bool, out: Path,
            proc_root: Path = Path("/proc"), status=lambda line: None) -> Result:
    if not 0 < seconds <= MAX_SECONDS:
        raise SondeError(f"profile: --seconds must be between 0 and {MAX_SECONDS} (got {seconds:g})")
    if not 1 <= hz <= 1000:
        raise SondeError(f"profile: --hz must be between 1 and 1000 (got {hz}); 49 to 99 is usual")
    if os.geteuid() != 0:
        raise SondeError("profile: loading the sampling program needs root (CAP_BPF and CAP_PERFMON); run it as root")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SondeError(f"profile: cannot create {out}: {e.strerror}")
    proc = Path(proc_root)
    pids = targets(proc, pid, process)
    cfg = config_mod.Config(probes={"profile": config_mod.ProbeConfig(enabled=True)})
    if off_cpu:
        ensure_tracefs(cfg.paths.tracefs)
    flags = ["-DSONDE_FILTER"] + (["-DSONDE_OFFCPU"] if off_cpu else [])
    session = _Session(proc, Symbolizer(proc))
    for p in pids:  # maps and ELF symbols read now, so the first second is not spent parsing
        session.comms[p] = _comm(proc, p) or str(p)
        session.symbolizer.process(p)
        if is_jvm(proc, p):
            session.fetch_jit(p)
    spec = dataclasses.replace(PROBE, hooks=("sched:sched_switch",) if off_cpu else (),
                               cpu_clock={"on_cpu_sample": hz}, decoder=None, cflags=lambda _sys: flags)
    loaded = LoadedProbe.load(spec, cfg)
    try:
        sampler = StackSampler(loaded.bpf, off_cpu=off_cpu)
        for p in pids:
            session.watch_python(sampler, p)
        sampler.set_filter(pids)
        started = time.monotonic()
        session.watch(pids, started)
        what = f"pid {pids[0]} ({session.comms[pids[0]]})" if len(pids) == 1 else \
            f"{len(pids)} processes called {process}"
        status(f"profiling {what} at {hz} Hz{' with off-CPU time' if off_cpu else ''} for {seconds:g} s")
        deadline = started + seconds
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            time.sleep(min(POLL_SECONDS, deadline - now))
            taken = sampler.take()
            session.add(taken.on_cpu, session.on, lambda r: r.count)
            session.add(taken.off_cpu, session.off, lambda r: r.time_ns)
            if process is not None:
                new = [p for p in find_by_name(proc, process, exclude=os.getpid()) if p not in pids]
                if new:
                    sampler.set_filter(new)
                    pids += new
                    for p in new:
                        if is_jvm(proc, p):
                            session.fetch_jit(p)
                        session.watch_python(sampler, p)
            session.watch(pids, started)
            for p, fetched in list(session.jvms.items()):
                if p not in session.exited and time.monotonic() - fetched > JIT_REFRESH_SECONDS:
                    session.fetch_jit(p)
            if pid is not None and all(p in session.exited for p in pids):
                break
        elapsed = time.monotonic() - started
    finally:
        loaded.close()
        for reader in session.symbolizer.python.values():
            reader.close()
    for p in session.jvms:  # methods compiled during the profile are in the newest map
        if p not in session.exited:
            session.fetch_jit(p)
    return _write(session, pids, out, hz, elapsed, off_cpu)


def _demangled(stacks: flamegraph.Stacks) -> flamegraph.Stacks:
    names = symbols.demangle({f for s in stacks for f in s})
    if not names:
        return stacks
    out: dict[tuple[str, ...], int] = defaultdict(int)
    for s, w in stacks.items():
        out[tuple(names.get(f, f) for f in s)] += w
    return dict(out)


def _write(session: _Session, pids: list[int], out: Path, hz: int, elapsed: float, off_cpu: bool) -> Result:
    multi = len({p for p in pids}) > 1
    on, why_on = session.stacks(session.on, multi)
    on = _demangled(on)
    off_us, why_off = None, Counter()
    if off_cpu:
        off_ns, why_off = session.stacks(session.off, multi)
        off_us = _demangled({k: round(v / 1000) for k, v in off_ns.items() if round(v / 1000) > 0})
    notes = list(session.notes)
    for ps in session.symbolizer.processes.values():
        for n in ps.notes:
            if n not in notes:
                notes.append(n)
    samples = sum(on.values())
    if not samples:
        notes.append("no on-CPU samples: the process did not run on a CPU during the profile")
    for kind, why, total in (("on-CPU samples", why_on, samples),
                             ("off-CPU time", why_off, sum(off_us.values()) if off_us else 0)):
        cut = sum(why.values())
        if cut and total:
            reasons = "; ".join(f"{r}" for r, _ in why.most_common(3))
            notes.append(f"{100.0 * cut / total:.1f}% of {kind} have truncated stacks ({reasons}): "
                         f"they end in a [truncated: ...] frame")
    files = []
    label = ", ".join(f"{session.comms.get(p, p)} {p}" for p in pids[:5]) + (" ..." if len(pids) > 5 else "")
    outputs = [("oncpu", on, f"On-CPU: {label}, {samples:,} samples at {hz} Hz over {elapsed:.1f} s", "samples",
                "none")]
    if off_us is not None:
        outputs.append(("offcpu", off_us, f"Off-CPU: {label}, {sum(off_us.values()) / 1e6:.3f} s blocked "
                                          f"over {elapsed:.1f} s", "us", "microseconds"))
    try:
        for stem, stacks, title, unit, ss_unit in outputs:
            paths = (out / f"{stem}.folded", out / f"{stem}.speedscope.json", out / f"{stem}.svg")
            paths[0].write_text(flamegraph.folded(stacks))
            paths[1].write_text(json.dumps(flamegraph.speedscope(stacks, title, ss_unit)))
            paths[2].write_text(flamegraph.svg(stacks, title, unit, notes))
            files += paths
        (out / "notes.txt").write_text("".join(n + "\n" for n in notes))
        files.append(out / "notes.txt")
    except OSError as e:
        raise SondeError(f"profile: cannot write to {out}: {e.strerror}")
    return Result(on, off_us, notes, files, samples, elapsed)
