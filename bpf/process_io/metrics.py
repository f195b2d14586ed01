"""Catalog entries of probe process_io."""
from sonde.ingest.runtime.catalog import COMM, HOST, INTERVAL_NOTE, PID, Field, Measurement

PROCESS_IO = Measurement(
    name="process_io",
    kind="delta",
    help="Block I/O per process when it creates a request. Page-cache writeback is submitted by kernel "
         "threads (comm `kworker/...`, `jbd2/...`), so buffered writes show there, not under the writer. "
         + INTERVAL_NOTE,
    source="raw tracepoint block_getrq (probe process_io, off by default)",
    tags=(HOST, PID, COMM),
    fields=(
        Field("bytes", "int", "bytes", "Bytes of the requests the process created, at creation (bios merged "
                                       "into a request later are not added)."),
        Field("requests", "int", "requests", "Requests the process created."),
    ),
)

MEASUREMENTS = (PROCESS_IO,)
