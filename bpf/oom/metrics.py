"""Catalog entries of probe oom."""
from sonde.ingest.runtime.catalog import COMM, HOST, INTERVAL_NOTE, Field, Measurement

OOM_KILL = Measurement(
    name="oom_kill",
    kind="event",
    help="One point per OOM kill. The pid is a field, not a tag, so kills never add series per pid.",
    source="oom:mark_victim (probe oom)",
    tags=(HOST, COMM),
    fields=(
        Field("pid", "int", "pid", "The victim's process id."),
        Field("cgroup", "str", "path",
              "The victim's memory cgroup (v1 `memory` controller line, else the v2 path), from /proc "
              "while it exits; empty if it was already gone."),
        Field("anon_rss_bytes", "int", "bytes", "Anonymous memory of the victim when chosen."),
        Field("file_rss_bytes", "int", "bytes", "File-backed resident memory of the victim when chosen."),
        Field("total_vm_bytes", "int", "bytes", "Virtual memory size of the victim."),
    ),
)

OOM_KILLS = Measurement(
    name="oom_kills",
    kind="delta",
    help="OOM kills on the host this interval, counted in the kernel (includes any event a full buffer lost). "
         + INTERVAL_NOTE,
    source="oom:mark_victim (probe oom)",
    tags=(HOST,),
    fields=(Field("kills", "int", "kills", "OOM kills this interval."),),
)

MEASUREMENTS = (OOM_KILL, OOM_KILLS)
