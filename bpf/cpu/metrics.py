"""Catalog entries of probe cpu."""
from sonde.ingest.runtime.catalog import COMM, HOST, INTERVAL_NOTE, PID, Field, Measurement

PROCESS_CPU = Measurement(
    name="process_cpu",
    kind="delta",
    help="CPU time, context switches and run-queue wait per process, from the kernel's own counters read "
         "at each poll; a process that exits between two polls is reported once more, with what it used "
         "until its exit. " + INTERVAL_NOTE,
    source="the process CPU clock (clock_gettime), /proc/<pid>/task/<tid>/schedstat and status; "
           "sched:sched_process_exit for exiting threads (probe cpu)",
    tags=(HOST, PID, COMM),
    fields=(
        Field("oncpu_us", "int", "us", "Time the process's threads ran on a CPU this interval."),
        Field("cpu_pct", "float", "percent",
              "oncpu_us over the interval, in percent of one CPU (100 = one core pinned; can exceed 100)."),
        Field("interval_us", "int", "us", "Length of the interval the deltas cover."),
        Field("voluntary_switches", "int", "switches", "Switches out while blocking (sleep, I/O, lock)."),
        Field("involuntary_switches", "int", "switches", "Switches out while still runnable (preempted or yielded)."),
        Field("runq_wait_us", "int", "us",
              "Time the process's threads spent runnable but waiting in a run queue for a CPU this interval "
              "(scheduler run_delay, summed over threads). Over interval_us it is CPU demand not met."),
        Field("runq_waits", "int", "waits",
              "Times a thread got a CPU after such a wait (scheduler pcount); runq_wait_us / runq_waits is "
              "the mean wait."),
        Field("max_thread_oncpu_us", "int", "us",
              "On-CPU time this interval of the process's busiest thread (its scheduler run time; a thread that "
              "exited, from its exit record). One thread near interval_us is a stuck worker even in a process "
              "whose other threads idle; oncpu_us alone cannot tell that from many threads sharing the work."),
    ),
)

MEASUREMENTS = (PROCESS_CPU,)
