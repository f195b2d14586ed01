"""Catalog entries of probe sched_cpu."""
from sonde.ingest.runtime.catalog import COMM, HOST, PID, histogram

PROCESS_RUNQ_LATENCY = histogram(
    "process_runq_latency", "Run-queue latency per process, wakeup to switch-in, in microseconds",
    "sched:sched_wakeup, sched:sched_wakeup_new, sched:sched_switch (probe sched_cpu, off by default; "
    "process_cpu.runq_wait_us is the always-on total)",
    tags=(HOST, PID, COMM))

MEASUREMENTS = PROCESS_RUNQ_LATENCY
