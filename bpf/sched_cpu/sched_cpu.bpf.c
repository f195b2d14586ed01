/* sched_cpu: run-queue latency histogram per process (opt-in; probe cpu keeps the
 * always-on totals without any per-switch program).
 *
 * Run-queue latency is wakeup -> switch-in, measured per thread id and credited to
 * the process at the thread's next switch-out: at sched:sched_switch the current
 * task is still `prev`, so that is the first moment its tgid comes from
 * bpf_get_current_pid_tgid() without reading any task_struct. A task switched out
 * while still runnable (preempted) waits in the run queue from that moment, and
 * counts too.
 */
#include "sonde.h"

#define STATE_MASK 0xff  /* prev_state: sleeping states; 0 = still runnable (preempted or yielded) */

struct cpu_state_t {
    u64 pending_lat_us;  /* the running task's wait before this switch-in */
    u32 has_lat;
    u32 pad;
};

struct proc_rq_t {
    u64 rq_lat_sum_us;
    u64 rq_lat_count;
    char comm[SONDE_COMM_LEN];
};

struct rq_key_t {
    u32 tgid;
    u32 slot;
};

BPF_PERCPU_ARRAY(cpu_state, struct cpu_state_t, 1);
BPF_HASH(wakeup_ts, u32, u64, MAX_ENTRIES);
BPF_HASH(proc_rq, u32, struct proc_rq_t, MAX_ENTRIES);
BPF_HASH(rq_hist, struct rq_key_t, u64, MAX_ENTRIES * 4);
BPF_PERCPU_ARRAY(sonde_drops, u64, 1);
static __always_inline void count_drop(void) { int zero = 0; sonde_drops.increment(zero); }  /* see sonde.h */

static __always_inline void record_wakeup(u32 tid)
{
    u64 now = bpf_ktime_get_ns();
    if (wakeup_ts.update(&tid, &now))
        count_drop();
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    record_wakeup(args->pid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    record_wakeup(args->pid);
    return 0;
}

static __always_inline void credit_latency(u64 lat_us)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct proc_rq_t *p = proc_rq.lookup(&tgid);
    if (!p) {
        struct proc_rq_t init = {};
        bpf_get_current_comm(&init.comm, sizeof(init.comm));
        if (proc_rq.insert(&tgid, &init) && !proc_rq.lookup(&tgid))
            count_drop();
        p = proc_rq.lookup(&tgid);
        if (!p)
            return;
    }
    __sync_fetch_and_add(&p->rq_lat_sum_us, lat_us);
    __sync_fetch_and_add(&p->rq_lat_count, 1);
    struct rq_key_t k = {.tgid = tgid, .slot = sonde_log2_slot(lat_us)};
    u64 one = 1;
    u64 *c = rq_hist.lookup(&k);
    if (c)
        __sync_fetch_and_add(c, 1);
    else if (rq_hist.insert(&k, &one) == -SONDE_EEXIST) {
        c = rq_hist.lookup(&k);
        if (c)
            __sync_fetch_and_add(c, 1);
    } else if (!rq_hist.lookup(&k)) {
        count_drop();
    }
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    int zero = 0;
    struct cpu_state_t *st = cpu_state.lookup(&zero);
    if (!st)
        return 0;

    if (args->prev_pid != 0) {  /* pid 0 is the idle task */
        if (!(args->prev_state & STATE_MASK))
            record_wakeup(args->prev_pid);  /* still runnable: it waits in the run queue from now */
        if (st->has_lat)
            credit_latency(st->pending_lat_us);
    }

    st->has_lat = 0;
    if (args->next_pid != 0) {
        u32 tid = args->next_pid;
        u64 *ts = wakeup_ts.lookup(&tid);
        if (ts) {
            st->pending_lat_us = (bpf_ktime_get_ns() - *ts) / 1000;
            st->has_lat = 1;
            wakeup_ts.delete(&tid);
        }
    }
    return 0;
}
