"""oom: OOM kills, as events (`oom_kill`: pid, comm, cgroup, memory) and a counter (`oom_kills`).

Hook: `oom:mark_victim`. Events arrive through a perf buffer read by a thread of
the probe's own, which names the victim's cgroup from /proc/<pid>/cgroup at once,
while the victim is still exiting: the v1 `memory` controller's path where that
hierarchy exists (hybrid hosts), else the v2 path. The counter is kept in the
kernel, so a kill whose event was lost still counts.

What fires: per request and per connection, nothing; per OOM kill, one program
run on `oom:mark_victim` (a rare event); per poll, one read of a one-entry array.
Kernel floor: `oom:mark_victim` with `pid`, `comm`, `total_vm`, `anon_rss` and
`file_rss` (the rss fields arrived in 6.0); checked before loading.
"""
from __future__ import annotations

import logging
import threading

from sonde.ingest.output.lineproto import Point, printable_name
from sonde.ingest.runtime.probe import Probe

log = logging.getLogger("sonde.probe.oom")


def cgroup_path(text: str) -> str:
    """The memory cgroup from /proc/<pid>/cgroup: v1 `N:memory:/path`, else v2 `0::/path`."""
    v2 = ""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "memory" in parts[1].split(","):
            return parts[2]
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
    return v2


class OomDecoder:
    def __init__(self, probe):
        self.probe = probe
        self.host = probe.config.host
        self.events: list[Point] = []
        self.lock = threading.Lock()
        self.lost = 0
        self.prev_kills = 0
        self.stop = threading.Event()
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

    def _on_event(self, cpu, data, size) -> None:
        e = self.table.event(data)
        try:
            text = (self.probe.config.paths.proc / str(e.pid) / "cgroup").read_text()
        except OSError:
            text = ""
        point = Point("oom_kill", {"host": self.host, "comm": printable_name(bytes(e.comm))}, {
            "pid": int(e.pid), "cgroup": cgroup_path(text),
            "anon_rss_bytes": e.anon_rss_kb * 1024, "file_rss_bytes": e.file_rss_kb * 1024,
            "total_vm_bytes": e.total_vm_kb * 1024}, 0)
        log.warning("OOM kill: pid %d (%s) in cgroup %s", e.pid, point.tags["comm"], point.fields["cgroup"] or "?")
        with self.lock:
            self.events.append(point)

    def poll(self, ts: int) -> tuple[list[Point], int]:
        with self.lock:
            events, self.events = self.events, []
        for p in events:
            p.ts_ns = ts
        total = int(self.probe.table("oom_kills")[0].value)
        kills, self.prev_kills = total - self.prev_kills, total
        if kills:
            events.append(Point("oom_kills", {"host": self.host}, {"kills": kills}, ts))
        return events, 0

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
    decoder=OomDecoder,
)
