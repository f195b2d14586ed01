/* sched_cpu: on-CPU time, run-queue latency and context switches per process.
 *
 * At sched:sched_switch the current task is still `prev`, so its tgid comes from
 * bpf_get_current_pid_tgid() without reading any task_struct. Each CPU remembers
 * when its current task was switched in; the switch-out adds the difference to
 * that task's process. Run-queue latency is wakeup -> switch-in, measured per
 * thread id and credited to the process at the thread's next switch-out (the
 * first moment its tgid is current). A task switched out while still runnable
 * (preempted) waits in the run queue from that moment, and counts too.
 */
#include <uapi/linux/bpf_perf_event.h>
#include "sonde.h"

#define STATE_MASK 0xff  /* prev_state: sleeping states; 0 = still runnable (preempted or yielded) */

struct cpu_state_t {
    u64 switched_in;
    u64 pending_lat_us;
    u32 has_lat;
    u32 pad;
};

struct proc_cpu_t {
    u64 oncpu_ns;
    u64 voluntary;
    u64 involuntary;
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
BPF_HASH(proc_cpu, u32, struct proc_cpu_t, MAX_ENTRIES);
BPF_HASH(rq_hist, struct rq_key_t, u64, MAX_ENTRIES * 4);
BPF_PERCPU_ARRAY(sonde_drops, u64, 1);

static __always_inline void count_drop(void)
{
    int zero = 0;
    u64 *d = sonde_drops.lookup(&zero);
    if (d)
        (*d)++;
}

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

/* Credit the running task's time so far, without waiting for it to switch out.
 * Called by the per-CPU clock tick below and by sched_switch. */
static __always_inline struct proc_cpu_t *credit_current(struct cpu_state_t *st, u64 now)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct proc_cpu_t *p = proc_cpu.lookup(&tgid);
    if (!p) {
        struct proc_cpu_t init = {};
        bpf_get_current_comm(&init.comm, sizeof(init.comm));
        if (proc_cpu.insert(&tgid, &init) && !proc_cpu.lookup(&tgid))
            count_drop();
        p = proc_cpu.lookup(&tgid);
    }
    if (p && st->switched_in && now > st->switched_in)
        __sync_fetch_and_add(&p->oncpu_ns, now - st->switched_in);
    st->switched_in = now;
    return p;
}

/* A task that never leaves its CPU (a spinner on an idle core) has no
 * sched_switch to credit it; a per-CPU clock event a few times a second does,
 * in the running task's own context. */
int on_cpu_tick(struct bpf_perf_event_data *ctx)
{
    int zero = 0;
    struct cpu_state_t *st = cpu_state.lookup(&zero);
    if (!st || (bpf_get_current_pid_tgid() & 0xffffffff) == 0)
        return 0;
    credit_current(st, bpf_ktime_get_ns());
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    int zero = 0;
    struct cpu_state_t *st = cpu_state.lookup(&zero);
    if (!st)
        return 0;
    u64 now = bpf_ktime_get_ns();

    if (args->prev_pid != 0) {  /* pid 0 is the idle task */
        u32 tgid = bpf_get_current_pid_tgid() >> 32;
        struct proc_cpu_t *p = credit_current(st, now);
        if (p) {
            if (args->prev_state & STATE_MASK) {
                __sync_fetch_and_add(&p->voluntary, 1);
            } else {
                /* still runnable: it waits in the run queue from now */
                __sync_fetch_and_add(&p->involuntary, 1);
                record_wakeup(args->prev_pid);
            }
            if (st->has_lat) {
                __sync_fetch_and_add(&p->rq_lat_sum_us, st->pending_lat_us);
                __sync_fetch_and_add(&p->rq_lat_count, 1);
                struct rq_key_t k = {.tgid = tgid, .slot = sonde_log2_slot(st->pending_lat_us)};
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
        }
    }

    st->switched_in = now;
    st->has_lat = 0;
    if (args->next_pid != 0) {
        u32 tid = args->next_pid;
        u64 *ts = wakeup_ts.lookup(&tid);
        if (ts) {
            st->pending_lat_us = (now - *ts) / 1000;
            st->has_lat = 1;
            wakeup_ts.delete(&tid);
        }
    }
    return 0;
}
