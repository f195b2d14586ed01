"""Catalog entries of probe oom."""
from sonde.ingest.runtime.catalog import COMM, HOST, INTERVAL_NOTE, Field, Measurement

OOM_KILL = Measurement(
    name="oom_kill",
    kind="event",
    help="One point per OOM kill, at the time of the kill: kills of one process name in one interval are "
         "separate points (distinct timestamps). The pid is a field, not a tag, so kills never add series per pid.",
    source="oom:mark_victim (probe oom)",
    tags=(HOST, COMM),
    fields=(
        Field("pid", "int", "pid", "The victim's process id."),
        Field("cgroup", "str", "path",
              "The victim's memory cgroup, as a path in the memory controller's hierarchy (v1 `memory` where it "
              "is mounted, else cgroup2), read from the victim's task in the kernel when it was chosen; "
              "`[unknown]` when it cannot be named for sure (the cgroup was removed before the agent looked)."),
        Field("anon_rss_bytes", "int", "bytes", "Anonymous memory of the victim when chosen."),
        Field("file_rss_bytes", "int", "bytes", "File-backed resident memory of the victim when chosen."),
        Field("total_vm_bytes", "int", "bytes", "Virtual memory size of the victim."),
    ),
)

OOM_KILLS = Measurement(
    name="oom_kills",
    kind="delta",
    help="OOM kills on the host this interval, counted in the kernel (includes any event a full buffer lost), "
         "written for every interval with a kill or a lost event. "
         + INTERVAL_NOTE,
    source="oom:mark_victim (probe oom)",
    tags=(HOST,),
    fields=(Field("kills", "int", "kills", "OOM kills this interval."),
            Field("lost_events", "int", "events", "Kills this interval whose `oom_kill` event the perf buffer "
                                                  "dropped: counted in `kills`, missing from `oom_kill`.")),
)

MEASUREMENTS = (OOM_KILL, OOM_KILLS)
