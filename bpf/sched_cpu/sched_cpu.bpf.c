/* sched_cpu: run-queue latency histogram per process (opt-in; probe cpu keeps the
 * always-on totals without any per-switch program).
 *
 * Run-queue latency is wakeup -> switch-in, measured per thread id and credited to
 * the process at the thread's next switch-out: at sched_switch the current task is
 * still `prev`, so that is the first moment its tgid comes from
 * bpf_get_current_pid_tgid() without reading any task_struct. A task switched out
 * while still runnable (preempted) waits in the run queue from that moment, and
 * counts too.
 *
 * Raw tracepoints, not perf-based ones: a perf-based tracepoint program is skipped
 * whenever any BPF program or BPF map syscall is under way on the CPU (the kernel's
 * bpf_prog_active), and some of those skips are counted nowhere; a raw one is skipped
 * only when the same program is already running on the CPU (counted as a recursion
 * miss), and costs a fraction as much. The thread ids it needs (task_struct.pid)
 * and, on kernels whose sched_switch passes no prev_state, the task's state are read
 * at offsets from the running kernel's BTF (bpf/sched_cpu/probe.py).
 *
 * A process's sum, count and histogram slots are one map value, so one read of the
 * map sees each process's buckets with its count and sum: nothing a poll reads can
 * belong to a process the same poll did not see.
 */
#include "sonde.h"


struct cpu_state_t {
    u64 pending_lat_us;  /* the running task's wait before this switch-in */
    u32 has_lat;
    u32 tid;             /* whose wait it is: credited only at that thread's switch-out */
};

/* Cumulative per process; the agent takes deltas. Not preallocated: the agent
 * deletes an exited process's entry, and a late add must never land in an element
 * already reused for another process. */
struct proc_rq_t {
    u64 rq_lat_sum_us;
    u64 rq_lat_count;
    u64 slots[SONDE_HIST_SLOTS];
    char comm[SONDE_COMM_LEN];
};

BPF_PERCPU_ARRAY(cpu_state, struct cpu_state_t, 1);
BPF_HASH(wakeup_ts, u32, u64, MAX_ENTRIES);
BPF_F_TABLE("hash", u32, struct proc_rq_t, proc_rq, MAX_ENTRIES, BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(proc_rq_zero, struct proc_rq_t, 1);  /* a value to insert from (too big for the stack) */
BPF_PERCPU_ARRAY(sonde_drops, u64, 1);
static __always_inline void count_drop(void) { int zero = 0; sonde_drops.increment(zero); }  /* see sonde.h */

static __always_inline void record_wakeup(u32 tid)
{
    u64 now = bpf_ktime_get_ns();
    if (wakeup_ts.update(&tid, &now))
        count_drop();
}

static __always_inline u32 task_pid(const void *task)
{
    u32 pid = 0;
    bpf_probe_read_kernel(&pid, sizeof(pid), (const u8 *)task + TASK_PID);
    return pid;
}

RAW_TRACEPOINT_PROBE(sched_wakeup)
{
    u32 tid = task_pid((const void *)ctx->args[0]);
    if (tid)
        record_wakeup(tid);
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_wakeup_new)
{
    u32 tid = task_pid((const void *)ctx->args[0]);
    if (tid)
        record_wakeup(tid);
    return 0;
}

static __always_inline void credit_latency(u64 lat_us)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct proc_rq_t *p = proc_rq.lookup(&tgid);
    if (!p) {
        int zero = 0;
        struct proc_rq_t *init = proc_rq_zero.lookup(&zero);
        if (!init)
            return;
        __builtin_memset(init, 0, sizeof(*init));
        bpf_get_current_comm(&init->comm, sizeof(init->comm));
        int err = proc_rq.insert(&tgid, init);
        p = proc_rq.lookup(&tgid);
        if (!p) {
            if (err && err != -SONDE_EEXIST)
                count_drop();
            return;
        }
    }
    u64 s = sonde_log2_slot(lat_us);
    /* sonde_log2_slot caps s, but the verifier must see the cap on the register that
     * indexes the array (as in block_io.bpf.c) */
    asm volatile("if %[s] < %[n] goto +1\n\t%[s] = %[m]"
                 : [s] "+r"(s) : [n] "i"(SONDE_HIST_SLOTS), [m] "i"(SONDE_HIST_SLOTS - 1));
    __sync_fetch_and_add(&p->rq_lat_sum_us, lat_us);
    __sync_fetch_and_add(&p->rq_lat_count, 1);
    __sync_fetch_and_add(&p->slots[s], 1);
}

RAW_TRACEPOINT_PROBE(sched_switch)
{
    int zero = 0;
    struct cpu_state_t *st = cpu_state.lookup(&zero);
    if (!st)
        return 0;
    bool preempt = (bool)ctx->args[0];
    const void *prev_task = (const void *)ctx->args[1];
    const void *next_task = (const void *)ctx->args[2];
#ifdef SWITCH_STATE_ARG
    u32 prev_state = (u32)ctx->args[3];
#else
    u32 prev_state = 0;
    bpf_probe_read_kernel(&prev_state, sizeof(prev_state), (const u8 *)prev_task + TASK_STATE);
#endif
    u32 prev = task_pid(prev_task);
    u32 next = task_pid(next_task);

    if (prev != 0) {  /* pid 0 is the idle task */
        if (preempt || prev_state == 0)
            record_wakeup(prev);  /* still runnable: it waits in the run queue from now */
        else
            /* It sleeps: a stamp left from a wakeup while it still ran is stale (its
             * next switch-in needs a new wakeup, which stamps after this switch). Left
             * in place, a thread that exits after one would keep its entry forever. */
            wakeup_ts.delete(&prev);
        if (st->has_lat && st->tid == prev)
            credit_latency(st->pending_lat_us);
    }

    st->has_lat = 0;
    if (next != 0) {
        u64 *ts = wakeup_ts.lookup(&next);
        if (ts) {
            st->pending_lat_us = (bpf_ktime_get_ns() - *ts) / 1000;
            st->has_lat = 1;
            st->tid = next;
            wakeup_ts.delete(&next);
        }
    }
    return 0;
}
