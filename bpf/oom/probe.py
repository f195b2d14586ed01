"""oom: OOM kills, as events (`oom_kill`: pid, comm, cgroup, memory) and a counter (`oom_kills`).

Hooks: `oom:mark_victim`, twice. The tracepoint program sends each kill through a
perf buffer, read by a thread of the probe's own, and counts it in the kernel; a raw
tracepoint program on the same event reads the victim's memory cgroup id from its
task_struct while the victim is alive (offsets from the kernel's BTF). The agent
names that id by the inode number of the cgroup's directory in the memory
hierarchy (the v1 `memory` controller where it is mounted, hybrid hosts, else
cgroup2). Nothing is read from /proc after the kill: /proc/<pid>/cgroup races with
the victim's exit (a v1 hierarchy shows an exiting task in `/`). A cgroup that
cannot be named for sure (removed before the agent looked, or the raw program did
not run) is written as `[unknown]`, never as a guess.

Each kill is its own point, at the time of the kill: two kills of one process name
in one interval are two points (same tags, distinct timestamps), and no pid is a
tag. `oom_kills.lost_events` counts events the perf buffer dropped; `kills` is
counted in the kernel, so it includes them.

What fires: per request and per connection, nothing; per OOM kill, two program
runs on `oom:mark_victim` (a rare event); per poll, one read of a one-entry array.
Kernel floor: `oom:mark_victim` with `pid`, `comm`, `total_vm`, `anon_rss` and
`file_rss`, and a `struct task_struct *` argument for the cgroup (6.8+, and Debian's
6.1 and 6.12), checked before loading; without the task argument or BTF the kills
are still reported, with the cgroup `[unknown]`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from sonde.ingest.errors import SondeError
from sonde.ingest.output.lineproto import Point, printable_name
from sonde.ingest.runtime import btf
from sonde.ingest.runtime.decode import Context
from sonde.ingest.runtime.delta import defer
from sonde.ingest.runtime.probe import Probe

log = logging.getLogger("sonde.probe.oom")
UNKNOWN = "[unknown]"
MATCH_NS = 50_000_000   # both programs run in one tracepoint call: microseconds apart
WAIT_S = 0.05           # the raw program may run just after the event is readable


def memcg_layout(b: btf.BTF) -> dict[str, int]:
    """The -D flags of the raw program, from this kernel's BTF: the path from a task to
    its memory cgroup's kernfs id. Raises BTFError naming what the kernel lacks."""
    args = b.raw_tracepoint_args("mark_victim")
    if not args or args[0] != "struct task_struct *":
        raise btf.BTFError(f"{b.source}: raw tracepoint mark_victim passes ({', '.join(args)}), no task")
    subsys = b.member("css_set", "subsys")
    memory = b.enum_value("memory_cgrp_id")
    if (memory + 1) * 8 > subsys.size:
        raise btf.BTFError(f"{b.source}: css_set.subsys has no slot {memory} for memory_cgrp_id")
    kn_id = b.member("kernfs_node", "id")
    if kn_id.size != 8:
        raise btf.BTFError(f"{b.source}: kernfs_node.id is {kn_id.size} bytes, not 8")
    return {"OOM_MEMCG": 1, "TASK_PID": b.offsetof("task_struct", "pid"),
            "TASK_CGROUPS": b.offsetof("task_struct", "cgroups"), "CSS_SET_MEMORY": subsys.offset + 8 * memory,
            "CSS_CGROUP": b.offsetof("cgroup_subsys_state", "cgroup"), "CGROUP_KN": b.offsetof("cgroup", "kn"),
            "KN_ID": kn_id.offset}


def kernel_cflags(sys_root) -> list[str]:
    """The raw program's offsets, or none (the cgroup is then written as unknown)."""
    try:
        return [f"-D{k}={v}" for k, v in memcg_layout(btf.load(sys_root)).items()]
    except SondeError as e:
        log.warning("probe oom: the victim's cgroup will be written as %s: %s", UNKNOWN, e)
        return []


def memory_hierarchy(mounts_text: str) -> tuple[str, str] | None:
    """(mount point, "v1" | "v2") of the hierarchy the memory controller is in: a v1
    `cgroup` mount with the `memory` option, else the cgroup2 mount."""
    v2 = None
    for line in mounts_text.splitlines():
        f = line.split()
        if len(f) < 4:
            continue
        mountpoint = f[1].replace("\\040", " ")
        if f[2] == "cgroup" and "memory" in f[3].split(","):
            return mountpoint, "v1"
        if f[2] == "cgroup2" and v2 is None:
            v2 = mountpoint
    return (v2, "v2") if v2 else None


def cgroup_dirs(root: Path) -> dict[int, str]:
    """inode number -> cgroup path for every cgroup under a hierarchy's root. A
    cgroup's inode number is its kernfs id, never reused on 64-bit kernels."""
    out: dict[int, str] = {}
    stack = [(str(root), "/")]
    while stack:
        path, name = stack.pop()
        try:
            out[os.stat(path).st_ino] = name
            with os.scandir(path) as it:
                for d in it:
                    if d.is_dir(follow_symlinks=False):
                        stack.append((d.path, (name.rstrip("/") + "/" + d.name)))
        except OSError:  # removed while we looked
            continue
    return out


def kill_point(kill: dict, cgroup: str, ts: int, last_ts: dict[str, int], host: str) -> tuple[Point, dict]:
    """Pure: one kill (pid, comm as the kernel's bytes, memory in KiB) as its
    `oom_kill` point at the kill's time, and the next {comm: last time written}. Two
    kills of one name at one time would overwrite each other: the second goes 1 ns later."""
    comm = printable_name(kill["comm"])
    if ts <= last_ts.get(comm, 0):
        ts = last_ts[comm] + 1
    last_ts = dict(last_ts)
    last_ts[comm] = ts
    if len(last_ts) > 4096:
        last_ts = {comm: ts}
    return Point("oom_kill", {"host": host, "comm": comm}, {
        "pid": kill["pid"], "cgroup": cgroup,
        "anon_rss_bytes": kill["anon_rss_kb"] * 1024, "file_rss_bytes": kill["file_rss_kb"] * 1024,
        "total_vm_bytes": kill["total_vm_kb"] * 1024}, ts), last_ts


def decode(events: list[Point], lost: int, kills_total: int, prev_kills: int, ctx: Context) -> tuple[list[Point], int]:
    """Pure: the kills' points gathered since the last poll, the events the perf buffer
    lost, and the kernel's cumulative kill counter -> the points and the next counter."""
    kills = kills_total - prev_kills
    out = list(events)
    if kills or lost:
        out.append(Point("oom_kills", {"host": ctx.host}, {"kills": kills, "lost_events": lost}, ctx.ts))
    return out, kills_total


class OomDecoder:
    def __init__(self, probe):
        self.probe = probe
        self.host = probe.config.host
        self.events: list[Point] = []
        self.lock = threading.Lock()
        self.lost = 0
        self.prev_kills = 0
        self.last_ts: dict[str, int] = {}
        self.stop = threading.Event()
        try:
            self.victims = probe.table("victim_memcg")
        except KeyError:
            self.victims = None  # built without the raw program: cgroups are unknown
        self.names: dict[int, str] = {}
        try:
            found = memory_hierarchy((Path(probe.config.paths.proc) / "self/mounts").read_text())
        except OSError:
            found = None
        self.hierarchy = Path(found[0]) if found else None
        if self.victims is not None and self.hierarchy is None:
            log.warning("probe oom: no cgroup hierarchy with the memory controller is mounted; "
                        "cgroups will be written as %s", UNKNOWN)
        # keep the table object: bcc closes its perf buffers when it is collected
        self.table = probe.table("oom_events")
        self.table.open_perf_buffer(self._on_event, lost_cb=self._on_lost, page_cnt=8)
        self.thread = threading.Thread(target=self._run, name="sonde-oom", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.probe.bpf.perf_buffer_poll(timeout=200)

    def _on_lost(self, n: int) -> None:
        with self.lock:
            self.lost += n

    def _memcg_id(self, pid: int, ktime_ns: int) -> int | None:
        """The id the raw program recorded for this kill, taken out of the map."""
        if self.victims is None:
            return None
        key = self.victims.Key(pid)
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                v = self.victims[key]
                break
            except KeyError:
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.002)
        try:
            del self.victims[key]
        except KeyError:
            pass
        # an older entry of the same pid (its own event lost) is not this kill's
        return int(v.memcg_id) if abs(int(v.ktime_ns) - ktime_ns) < MATCH_NS else None

    def cgroup_name(self, memcg_id: int | None) -> str:
        if memcg_id is None or self.hierarchy is None:
            return UNKNOWN
        if memcg_id not in self.names:
            self.names = cgroup_dirs(self.hierarchy)
        return self.names.get(memcg_id, UNKNOWN)

    def _on_event(self, cpu, data, size) -> None:
        e = self.table.event(data)
        cgroup = self.cgroup_name(self._memcg_id(int(e.pid), int(e.ktime_ns)))
        # the kill's own time, so kills of one name in one interval stay apart
        ts = time.time_ns() - (time.monotonic_ns() - int(e.ktime_ns))
        kill = {"pid": int(e.pid), "comm": bytes(e.comm), "anon_rss_kb": int(e.anon_rss_kb),
                "file_rss_kb": int(e.file_rss_kb), "total_vm_kb": int(e.total_vm_kb)}
        with self.lock:
            point, self.last_ts = kill_point(kill, cgroup, ts, self.last_ts, self.host)
            self.events.append(point)
        log.warning("OOM kill: pid %d (%s) in cgroup %s", e.pid, point.tags["comm"], cgroup)

    def poll(self, ts: int) -> tuple[list[Point], int]:
        with self.lock:
            events, lost = list(self.events), self.lost
        total = int(self.probe.table("oom_kills")[0].value)
        out, kills = decode(events, lost, total, self.prev_kills, self.probe.context(ts))

        def taken():  # only once the points are handed over
            with self.lock:
                del self.events[:len(events)]
                self.lost -= lost
            self.prev_kills = kills
        defer(taken)
        return out, 0

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        # close the perf buffers before bcc's cleanup, not in a destructor after it
        for cpu in list(self.table._open_key_fds):
            del self.table[cpu]


PROBE = Probe(
    name="oom",
    doc=__doc__,
    hooks=("oom:mark_victim",),
    fields={"oom:mark_victim": ("pid", "comm", "total_vm", "anon_rss", "file_rss")},
    cflags=kernel_cflags,
    decoder=OomDecoder,
)
