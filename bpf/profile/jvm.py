"""JVMs: whether a process is one, whether it keeps frame pointers in JIT code, and its
perf map of JIT-compiled methods (`jcmd PID Compiler.perfmap`), read once by `sonde
profile` and kept fresh in the background by the agent's continuous profiling
(`JitMaps`), so that Java frames are named in both.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from sonde.bpf.profile import symbols

log = logging.getLogger("sonde.profile")

PFP = "-XX:+PreserveFramePointer"
AGENT_JIT_REFRESH_SECONDS = 60.0  # continuous mode (sonde profile refreshes every 10 s): a busy JVM's perf map is asked for again after this


def is_jvm(proc: Path, pid: int) -> bool:
    try:
        return "/libjvm.so" in (Path(proc) / str(pid) / "maps").read_text()
    except OSError:
        return False


def preserves_frame_pointers(proc: Path, pid: int) -> bool:
    """Whether the JVM was started with -XX:+PreserveFramePointer (argv or the
    JAVA_TOOL_OPTIONS / JDK_JAVA_OPTIONS it read); the last of +/- wins, as in the JVM."""
    words = []
    try:
        words += (Path(proc) / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        pass
    try:
        for var in (Path(proc) / str(pid) / "environ").read_bytes().decode(errors="replace").split("\0"):
            if var.startswith(("JAVA_TOOL_OPTIONS=", "JDK_JAVA_OPTIONS=")):
                words = var.split("=", 1)[1].split() + words
    except OSError:
        pass
    flags = [w for w in words if w in (PFP, "-XX:-PreserveFramePointer")]
    return bool(flags) and flags[-1] == PFP


def jvm_perf_map(proc: Path, pid: int) -> tuple[symbols.SymbolTable | None, str]:
    """Ask the JVM to write its perf map (`jcmd PID Compiler.perfmap`) and read it.
    Returns (table or None, a note when it failed)."""
    exe_dir = None
    try:
        exe_dir = Path(os.readlink(Path(proc) / str(pid) / "exe")).parent
    except OSError:
        pass
    jcmd = exe_dir / "jcmd" if exe_dir and (exe_dir / "jcmd").exists() else shutil.which("jcmd")
    if not jcmd:
        return None, f"pid {pid}: jcmd not found (install the JDK's jcmd): JIT frames are unnamed"
    try:
        r = subprocess.run([str(jcmd), str(pid), "Compiler.perfmap"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"pid {pid}: jcmd Compiler.perfmap failed ({e}): JIT frames are unnamed"
    if r.returncode != 0:
        why = (r.stderr or r.stdout).strip().splitlines()
        return None, f"pid {pid}: jcmd Compiler.perfmap failed ({why[-1] if why else r.returncode}): JIT frames are unnamed"
    # The JVM writes /tmp/perf-<its own pid>.map in its own mount namespace.
    nspid = pid
    try:
        for line in (Path(proc) / str(pid) / "status").read_text().splitlines():
            if line.startswith("NSpid:"):
                nspid = int(line.split()[-1])
    except OSError:
        pass
    path = Path(proc) / str(pid) / "root" / "tmp" / f"perf-{nspid}.map"
    try:
        return symbols.parse_perf_map(path.read_text()), ""
    except OSError as e:
        return None, f"pid {pid}: cannot read {path} ({e.strerror}): JIT frames are unnamed"


class JitMaps:
    """The agent's JIT names: each JVM among the busy processes gets its perf map
    (`jcmd PID Compiler.perfmap`) in a background thread, again every `refresh_s` while
    it stays busy, and the map is handed to that process's symbols. A poll never waits
    for a JVM: the stacks of the interval in which a JVM is first seen keep
    `[unknown JIT code]`, the next ones are named. A JVM whose map cannot be had
    (no jcmd, attach refused) is logged once and asked again only after refresh_s."""

    def __init__(self, proc: Path, refresh_s: float = AGENT_JIT_REFRESH_SECONDS, fetch=jvm_perf_map):
        self.proc, self.refresh_s, self._fetch = Path(proc), refresh_s, fetch
        self._asked: dict[int, float] = {}    # pid -> when its map was last asked for
        self._queue: dict[int, object] = {}   # pid -> its ProcessSymbols, waiting for the thread
        self._problems: set[int] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def want(self, pid: int, process_symbols) -> None:
        """Called per poll for each busy process: queue a JVM whose map is due."""
        now = time.monotonic()
        with self._lock:
            asked = self._asked.get(pid)
            if asked is not None and now - asked < self.refresh_s:
                return
            if not is_jvm(self.proc, pid):
                self._asked[pid] = now  # not a JVM: looked at again only after refresh_s (exec)
                return
            self._asked[pid] = now
            self._queue[pid] = process_symbols
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sonde-jit", daemon=True)
                self._thread.start()
        self._wake.set()

    def forget(self, keep: set[int]) -> None:
        with self._lock:
            for pid in [p for p in self._asked if p not in keep]:
                del self._asked[pid]
                self._problems.discard(pid)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            while True:
                with self._lock:
                    if not self._queue or self._stop.is_set():
                        break
                    pid, ps = self._queue.popitem()
                table, problem = self._fetch(self.proc, pid)
                if problem:
                    if pid not in self._problems:
                        log.warning("profile: %s", problem)
                        self._problems.add(pid)
                    continue
                ps.set_jit_map(table, preserves_frame_pointers(self.proc, pid))

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=65)
