/* oom: one event per OOM kill, from oom:mark_victim.
 *
 * Two programs run on the same kill:
 *   - the tracepoint program sends the event (pid, comm, memory, the time) through a
 *     perf buffer and counts it in `oom_kills`, so a kill whose event the buffer lost
 *     still shows in the total;
 *   - a raw tracepoint program on the same event gets the victim's task_struct and
 *     reads its memory cgroup's id (task->cgroups->subsys[memory]->cgroup->kn->id,
 *     the inode number of the cgroup's directory) while the victim is still alive,
 *     into `victim_memcg` keyed by pid. Reading /proc/<pid>/cgroup afterwards races
 *     with the victim's exit (a v1 hierarchy shows an exiting task in `/`).
 * Offsets come from the running kernel's BTF as -D flags (bpf/oom/probe.py); nothing
 * is read through the kernel headers. Without OOM_MEMCG (a kernel whose mark_victim
 * passes no task, or no memory controller) only the tracepoint program is built.
 */
#include "sonde.h"

struct oom_event_t {
    u32 pid;
    u32 pad;
    u64 total_vm_kb;
    u64 anon_rss_kb;
    u64 file_rss_kb;
    u64 ktime_ns;
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
    e.ktime_ns = bpf_ktime_get_ns();
    TP_DATA_LOC_READ_CONST(&e.comm, comm, sizeof(e.comm));
    oom_events.perf_submit(args, &e, sizeof(e));
    int zero = 0;
    u64 *n = oom_kills.lookup(&zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}

#ifdef OOM_MEMCG
struct victim_t {
    u64 memcg_id;   /* kernfs id of the memory cgroup: its directory's inode number */
    u64 ktime_ns;   /* the kill, to match the tracepoint program's event */
};

/* LRU: an entry whose event the perf buffer lost is never read; it must not fill the map. */
BPF_TABLE("lru_hash", u32, struct victim_t, victim_memcg, 1024);

RAW_TRACEPOINT_PROBE(mark_victim)
{
    const u8 *task = (const u8 *)ctx->args[0];
    const u8 *p = 0;
    struct victim_t v = {.ktime_ns = bpf_ktime_get_ns()};
    u32 pid = 0;
    if (bpf_probe_read_kernel(&pid, sizeof(pid), task + TASK_PID))
        return 0;
    /* task->cgroups (RCU; the victim is alive and being marked, so it is valid here) */
    if (bpf_probe_read_kernel(&p, sizeof(p), task + TASK_CGROUPS) || !p)
        return 0;
    if (bpf_probe_read_kernel(&p, sizeof(p), p + CSS_SET_MEMORY) || !p)   /* ->subsys[memory_cgrp_id] */
        return 0;
    if (bpf_probe_read_kernel(&p, sizeof(p), p + CSS_CGROUP) || !p)       /* ->cgroup */
        return 0;
    if (bpf_probe_read_kernel(&p, sizeof(p), p + CGROUP_KN) || !p)        /* ->kn */
        return 0;
    if (bpf_probe_read_kernel(&v.memcg_id, sizeof(v.memcg_id), p + KN_ID))
        return 0;
    victim_memcg.update(&pid, &v);
    return 0;
}
#endif
