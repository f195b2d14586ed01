/* cpu: one record per exiting thread, with the counters the kernel kept for it.
 *
 * Everything else the probe reports is read from the kernel's own counters at poll
 * time (bpf/cpu/probe.py). Polling cannot see a thread's last moments: what it did between
 * the last poll and its exit. So at sched:sched_process_exit, which fires once per
 * exiting thread in that thread's own context, this program copies the thread's
 * cumulative scheduler counters into a ring buffer the agent drains at each poll.
 *
 * Struct offsets come from the running kernel's BTF as -D flags (OFF_*); nothing is
 * dereferenced through bcc's headers. Ids are those of the agent's proc root's pid
 * namespace (set in `pidns` by the agent at load), so they match /proc; a thread
 * outside that namespace is skipped.
 */
#include "sonde.h"

#define RING_PAGES 512  /* 2 MiB: ~29,000 records of 72 bytes between two polls */

struct exit_t {
    u32 tid;
    u32 tgid;
    u64 cpu_ns;       /* task_struct.se.sum_exec_runtime */
    u64 runq_ns;      /* task_struct.sched_info.run_delay: time runnable, waiting for a CPU */
    u64 runq_waits;   /* task_struct.sched_info.pcount: times it got a CPU after such a wait */
    u64 voluntary;    /* task_struct.nvcsw */
    u64 involuntary;  /* task_struct.nivcsw */
    char comm[SONDE_COMM_LEN];
};

struct pidns_t {
    u64 dev;  /* kernel dev_t of nsfs, MKDEV(major, minor) */
    u64 ino;
};

BPF_ARRAY(pidns, struct pidns_t, 1);
BPF_RINGBUF_OUTPUT(exits, RING_PAGES);
BPF_PERCPU_ARRAY(sonde_drops, u64, 1);
static __always_inline void count_drop(void) { int zero = 0; sonde_drops.increment(zero); }  /* see sonde.h */

static __always_inline u64 task_u64(void *task, u64 off)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), task + off);
    return v;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    int zero = 0;
    struct pidns_t *ns = pidns.lookup(&zero);
    if (!ns || !ns->ino)
        return 0;  /* the agent has not said which namespace yet */
    struct bpf_pidns_info id = {};
    if (bpf_get_ns_current_pid_tgid(ns->dev, ns->ino, &id, sizeof(id)))
        return 0;

    void *task = (void *)bpf_get_current_task();
    struct exit_t e = {.tid = id.pid, .tgid = id.tgid};
    e.cpu_ns = task_u64(task, OFF_SUM_EXEC_RUNTIME);
    e.runq_ns = task_u64(task, OFF_RUN_DELAY);
    e.runq_waits = task_u64(task, OFF_PCOUNT);
    e.voluntary = task_u64(task, OFF_NVCSW);
    e.involuntary = task_u64(task, OFF_NIVCSW);
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    /* No wakeup: the agent drains the ring at its next poll, nobody waits on it. */
    if (exits.ringbuf_output(&e, sizeof(e), BPF_RB_NO_WAKEUP))
        count_drop();
    return 0;
}
