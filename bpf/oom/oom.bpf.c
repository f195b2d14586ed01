/* oom: one event per OOM kill, from oom:mark_victim.
 *
 * Events go through a perf buffer so user space can name the victim's cgroup from
 * /proc while the victim is still exiting. `oom_kills` is a plain counter beside
 * it, so an event lost in the buffer still shows in the total.
 */
#include "sonde.h"

struct oom_event_t {
    u32 pid;
    u32 pad;
    u64 total_vm_kb;
    u64 anon_rss_kb;
    u64 file_rss_kb;
    char comm[SONDE_COMM_LEN];
};

BPF_PERF_OUTPUT(oom_events);
BPF_ARRAY(oom_kills, u64, 1);

TRACEPOINT_PROBE(oom, mark_victim)
{
    struct oom_event_t e = {};
    e.pid = args->pid;
    e.total_vm_kb = args->total_vm;
    e.anon_rss_kb = args->anon_rss;
    e.file_rss_kb = args->file_rss;
    TP_DATA_LOC_READ_CONST(&e.comm, comm, sizeof(e.comm));
    oom_events.perf_submit(args, &e, sizeof(e));
    int zero = 0;
    u64 *n = oom_kills.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
