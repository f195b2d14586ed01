"""Catalog entries of probe profile."""
from sonde.ingest.runtime.catalog import COMM, HOST, INTERVAL_NOTE, PID, Field, Measurement, Tag

PROFILE_SAMPLES = Measurement(
    name="profile_samples",
    kind="delta",
    help="CPU samples per process this interval, from continuous profiling (probes.profile.enabled: true, "
         "49 Hz per CPU). samples / 49 is about the CPU seconds the process used. " + INTERVAL_NOTE,
    source="a CPU-clock perf event on every CPU, stacks from BPF_STACK_TRACE (probe profile, off by default)",
    tags=(HOST, PID, COMM),
    fields=(
        Field("samples", "int", "samples", "Samples taken while the process ran."),
        Field("stacks", "int", "stacks", "Distinct stacks among them."),
        Field("truncated_samples", "int", "samples",
              "Samples whose user stack could not be walked to its thread's start (code without frame "
              "pointers): their stack ends in a [truncated: ...] frame. Not written for pid=other."),
        Field("lost_samples", "int", "samples",
              "Samples whose stack could not be stored (its hash bucket held another stack this interval); "
              "counted under a [stack lost] frame. Not written for pid=other."),
    ),
)

PROFILE_STACK = Measurement(
    name="profile_stack",
    kind="delta",
    help="A process's top stacks this interval, one point per rank. The stack is a field, not a tag, so "
         "series stay bounded by processes x 5 ranks. " + INTERVAL_NOTE,
    source="a CPU-clock perf event on every CPU, stacks from BPF_STACK_TRACE, symbolised from ELF symbols, "
           "/proc/kallsyms and JVM perf maps (probe profile, off by default)",
    tags=(HOST, PID, COMM, Tag("rank", "1 for the stack with the most samples in the interval, up to 5.")),
    fields=(
        Field("samples", "int", "samples", "Samples with this stack."),
        Field("share_pct", "float", "percent", "samples over the process's samples this interval, in percent."),
        Field("function", "str", "name",
              "The innermost function of the program's own code in the stack (a user frame when there is one, "
              "else the kernel's): where the process was."),
        Field("frames", "str", "folded",
              "The stack, root first, frames joined by `;` (flame graph folded format); kernel frames end in "
              "`_[k]`, JIT frames in `_[j]`; cut at the root end to 2000 characters."),
        Field("truncated", "int", "bool", "1 when the stack ends in a [truncated: ...] frame."),
    ),
)

MEASUREMENTS = (PROFILE_SAMPLES, PROFILE_STACK)
