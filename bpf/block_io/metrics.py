"""Catalog entries of probe block_io."""
from sonde.ingest.runtime.catalog import HOST, INTERVAL_NOTE, Field, Measurement, Tag, histogram

DISK = Tag("disk", "Block device name from /sys/dev/block/<major>:<minor> (sda, nvme0n1, loop0), or `major:minor`.")
OP = Tag("op", "I/O class of the request's op and flags, as its rwbs reads: read, write, sync_write, flush, "
              "discard, other.")

BLOCK_IO = Measurement(
    name="block_io",
    kind="delta",
    help="Block requests completed per disk (the whole disk, as /proc/diskstats' disk line) and I/O class. "
         + INTERVAL_NOTE,
    source="raw tracepoint block_rq_complete (probe block_io)",
    tags=(HOST, DISK, OP),
    fields=(
        Field("requests", "int", "requests", "Requests completed."),
        Field("bytes", "int", "bytes", "Bytes completed, partial completions included (as /proc/diskstats "
                                       "counts sectors)."),
        Field("errors", "int", "requests", "Requests completed with an error (EIO, ENOSPC, ...)."),
        Field("untimed", "int", "requests", "Requests the kernel did not time (iostats off for the disk, or "
                                            "the flush machinery's own requests): in no latency histogram."),
        Field("unsplit", "int", "requests", "Timed requests with no issue time (the disk's queue keeps none "
                                            "unless writeback throttling, io.latency or io.cost uses it): in "
                                            "the total latency histogram only."),
    ),
)

LATENCY = tuple(m for kind, what in (("queue", "start (accounting) to issue to the driver"),
                                     ("device", "issue to completion"), ("total", "start to completion"))
                for m in histogram(
                    f"block_{kind}_latency", f"Block request latency, {what}, in microseconds, from the "
                    f"kernel's own request timestamps (those iostat's await uses; within one plug the kernel "
                    f"reuses one clock read, so a batch's requests share their start and issue times)",
                    "raw tracepoint block_rq_complete: request start_time_ns, io_start_time_ns (probe block_io)",
                    tags=(HOST, DISK, OP)))

DISK_BUSY = Measurement(
    name="disk_busy",
    kind="delta",
    help="Time each whole disk had requests in flight: the kernel's own io_ticks from /proc/diskstats, "
         "written every interval for every disk that has done I/O, idle intervals included. "
         + INTERVAL_NOTE,
    source="/proc/diskstats io_ticks (probe block_io)",
    tags=(HOST, DISK),
    fields=(
        Field("busy_us", "int", "us", "Busy time this interval (io_ticks: millisecond resolution)."),
        Field("util_pct", "float", "percent", "busy_us over the interval, in percent."),
        Field("interval_us", "int", "us", "Length of the interval, between two reads of /proc/diskstats."),
    ),
)

MEASUREMENTS = (BLOCK_IO, *LATENCY, DISK_BUSY)
