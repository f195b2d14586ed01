/* profile: on-CPU samples by stack (opt-in), and off-CPU time by stack for chosen
 * processes (`sonde profile --off-cpu`).
 *
 * On-CPU: a CPU-clock perf event on every CPU runs on_cpu_sample() at the configured
 * frequency; it counts one sample per (process, user stack id, kernel stack id), in
 * the kernel. Off-CPU (-DSONDE_OFFCPU): sched:sched_switch takes the stack of a
 * filtered thread as it leaves the CPU and adds the time it was away when it is
 * switched back in.
 *
 * Read and cleared exactly: counts and their stacks live in two sets, and
 * `active_set` says which one the programs write. The reader flips it, waits for an
 * RCU grace period (membarrier MEMBARRIER_CMD_GLOBAL is synchronize_rcu(): every
 * program that could have read the old index has returned, since perf-event and
 * tracepoint programs run in RCU read-side sections), then reads and clears the
 * other set, which nothing writes any more. No sample falls in a gap between a read
 * and a delete, and none is counted twice.
 *
 * Off-CPU stacks are kept in one map that is not cleared during a session: a
 * thread's stack is taken at switch-out, maybe before a flip, and its time is added
 * after it.
 *
 * Stack ids are negative errors where no stack was taken: -EFAULT (a kernel stack of
 * a sample in user mode, a user stack of a kernel thread), -EEXIST (another stack
 * holds that hash bucket), -ENOMEM. The reader reports them, never guesses.
 */
#include <uapi/linux/bpf_perf_event.h>
#include "sonde.h"

#ifndef STACK_ENTRIES
#define STACK_ENTRIES 16384
#endif

struct sample_key_t {
    u32 tgid;
    s32 user_stack;
    s32 kernel_stack;
    u32 pad;
};

struct sample_t {
    u64 count;    /* on-CPU: samples; off-CPU: switches out */
    u64 time_ns;  /* off-CPU: time away from the CPU */
    char comm[SONDE_COMM_LEN];
};

BPF_ARRAY(active_set, u32, 1);
/* Count maps take memory as entries come (BPF_F_NO_PREALLOC): a quiet host holds few
 * stacks, and only the reader deletes, from the set nothing writes. */
BPF_F_TABLE("hash", struct sample_key_t, struct sample_t, samples_0, MAX_ENTRIES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct sample_key_t, struct sample_t, samples_1, MAX_ENTRIES, BPF_F_NO_PREALLOC);
BPF_STACK_TRACE(stacks_0, STACK_ENTRIES);
BPF_STACK_TRACE(stacks_1, STACK_ENTRIES);
BPF_PERCPU_ARRAY(sonde_drops, u64, 1);
static __always_inline void count_drop(void) { int zero = 0; sonde_drops.increment(zero); }  /* see sonde.h */

#ifdef SONDE_FILTER
/* The processes to profile (tgid -> 1), filled by the reader; checked first. */
BPF_HASH(tgid_filter, u32, u8, 4096);
#endif

static __always_inline u32 current_set(void)
{
    int zero = 0;
    u32 *set = active_set.lookup(&zero);
    return set ? (*set & 1) : 0;
}

/* bcc rewrites a map's methods only where the map is named, so each map has its
 * lookup_or_try_init() at the call site and the counting is shared. */
/* Every count added to a set, never cleared: the reader's sum over its reads must
 * equal it (tests/probes/test_profile.py checks that no swap loses or repeats one). */
BPF_PERCPU_ARRAY(counted, u64, 1);

static __always_inline void bump(struct sample_t *v, u64 count, u64 time_ns)
{
    if (!v) {
        count_drop();  /* the map is full */
        return;
    }
    int zero = 0;
    counted.increment(zero, count);
    __sync_fetch_and_add(&v->count, count);
    if (time_ns)
        __sync_fetch_and_add(&v->time_ns, time_ns);
}

/* Python 3.11 frames (see python.py). The reader puts a Python process in py_procs
 * with the struct offsets of its own build (derived from that version's headers), so
 * one program serves several builds and a process that is not Python costs one
 * lookup. A sampled thread gets Python frames when it holds the GIL
 * (_PyRuntime.gilstate.tstate_current is its thread state); others keep their native
 * stack. */
#ifndef PY_MAX_FRAMES
#define PY_MAX_FRAMES 48
#endif

struct py_proc_t {
    u64 tstate_current;         /* address of _PyRuntime.gilstate.tstate_current */
    u32 tstate_native_thread_id;
    u32 tstate_cframe;
    u32 cframe_current_frame;
    u32 frame_code;             /* f_code; previous and prev_instr are read in the */
    u32 frame_previous;         /* same 64 bytes from there, at these offsets from it, */
    u32 frame_prev_instr;       /* in 8-byte words (checked by the reader) */
    u32 code_adaptive;
    u32 pad;
};

struct py_frame_t {
    u64 code;   /* PyCodeObject * */
    u32 index;  /* code unit of prev_instr in co_code_adaptive */
    u32 pad;
};

struct py_key_t {
    u32 tgid;
    s32 kernel_stack;
    u32 depth;
    u32 truncated;  /* deeper than PY_MAX_FRAMES, or a read failed mid-walk */
    struct py_frame_t frames[PY_MAX_FRAMES];
};

struct py_span_t {
    u64 word[8];
};

BPF_HASH(py_procs, u32, struct py_proc_t, 4096);
BPF_PERCPU_ARRAY(py_scratch, struct py_key_t, 1);  /* the key is too big for the BPF stack */
BPF_PERCPU_ARRAY(py_span, struct py_span_t, 1);
BPF_F_TABLE("hash", struct py_key_t, struct sample_t, py_samples_0, MAX_ENTRIES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct py_key_t, struct sample_t, py_samples_1, MAX_ENTRIES, BPF_F_NO_PREALLOC);

static __always_inline u64 user_ptr(u64 addr)
{
    u64 v = 0;
    if (bpf_probe_read_user(&v, sizeof(v), (void *)addr))
        return 0;
    return v;
}

/* 1 when the sample was counted with Python frames. */
static __always_inline int python_sample(struct bpf_perf_event_data *ctx, u32 tgid, u32 tid, u32 set,
                                         const char *comm)
{
    struct py_proc_t *p = py_procs.lookup(&tgid);
    if (!p)
        return 0;
    u64 tstate = user_ptr(p->tstate_current);
    if (!tstate || (u32)user_ptr(tstate + p->tstate_native_thread_id) != tid)
        return 0;  /* this thread does not hold the GIL: it runs C code, its native stack says where */
    u64 cframe = user_ptr(tstate + p->tstate_cframe);
    if (!cframe)
        return 0;
    u64 frame = user_ptr(cframe + p->cframe_current_frame);
    int zero = 0;
    struct py_key_t *k = py_scratch.lookup(&zero);
    struct py_span_t *span = py_span.lookup(&zero);
    if (!k || !span)
        return 0;
    __builtin_memset(k, 0, sizeof(*k));
    k->tgid = tgid;
    u64 code_at = p->frame_code, adaptive = p->code_adaptive;
    u32 previous_at = (p->frame_previous >> 3) & 7, instr_at = (p->frame_prev_instr >> 3) & 7;
    u32 n = 0;
    for (int i = 0; i < PY_MAX_FRAMES; i++) {
        if (!frame)
            break;
        if (bpf_probe_read_user(span->word, sizeof(span->word), (void *)(frame + code_at))) {
            k->truncated = 1;
            break;
        }
        u64 code = span->word[0];
        k->frames[i].code = code;
        k->frames[i].index = (u32)((span->word[instr_at] - code - adaptive) / 2);
        n = i + 1;
        frame = span->word[previous_at];
    }
    if (frame)
        k->truncated = 1;
    if (!n)
        return 0;
    k->depth = n;
    struct sample_t init = {};
    __builtin_memcpy(init.comm, comm, SONDE_COMM_LEN);
    if (set == 0) {
        k->kernel_stack = stacks_0.get_stackid(ctx, 0);
        bump(py_samples_0.lookup_or_try_init(k, &init), 1, 0);
    } else {
        k->kernel_stack = stacks_1.get_stackid(ctx, 0);
        bump(py_samples_1.lookup_or_try_init(k, &init), 1, 0);
    }
    return 1;
}

int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if ((u32)id == 0)
        return 0;  /* the idle task */
#ifdef SONDE_FILTER
    if (!tgid_filter.lookup(&tgid))
        return 0;
#endif
    struct sample_key_t k = {.tgid = tgid};
    struct sample_t init = {};
    bpf_get_current_comm(&init.comm, sizeof(init.comm));
    u32 set = current_set();
    if (python_sample(ctx, tgid, (u32)id, set, init.comm))
        return 0;
    if (set == 0) {
        k.user_stack = stacks_0.get_stackid(ctx, BPF_F_USER_STACK);
        k.kernel_stack = stacks_0.get_stackid(ctx, 0);
        bump(samples_0.lookup_or_try_init(&k, &init), 1, 0);
    } else {
        k.user_stack = stacks_1.get_stackid(ctx, BPF_F_USER_STACK);
        k.kernel_stack = stacks_1.get_stackid(ctx, 0);
        bump(samples_1.lookup_or_try_init(&k, &init), 1, 0);
    }
    return 0;
}

#if defined(SONDE_OFFCPU) && !defined(SONDE_FILTER)
#error "off-CPU time is for chosen processes only: -DSONDE_OFFCPU needs -DSONDE_FILTER"
#endif

#ifdef SONDE_OFFCPU
struct switched_out_t {
    u64 ts;
    u32 tgid;
    s32 user_stack;
    s32 kernel_stack;
    u32 pad;
    char comm[SONDE_COMM_LEN];
};

BPF_F_TABLE("hash", struct sample_key_t, struct sample_t, offcpu_0, MAX_ENTRIES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct sample_key_t, struct sample_t, offcpu_1, MAX_ENTRIES, BPF_F_NO_PREALLOC);
BPF_STACK_TRACE(offcpu_stacks, STACK_ENTRIES);
BPF_HASH(switched_out, u32, struct switched_out_t, MAX_ENTRIES);

TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    /* Switch-out: the current task is still prev, so its tgid needs no struct read. */
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = id;
    if (tid != 0 && tgid_filter.lookup(&tgid)) {
        struct switched_out_t s = {.ts = now, .tgid = tgid};
        s.user_stack = offcpu_stacks.get_stackid(args, BPF_F_USER_STACK);
        s.kernel_stack = offcpu_stacks.get_stackid(args, 0);
        bpf_get_current_comm(&s.comm, sizeof(s.comm));
        if (switched_out.update(&tid, &s))
            count_drop();
    }
    /* Switch-in: time away is credited to the stack it left with. */
    u32 next = args->next_pid;
    struct switched_out_t *s = switched_out.lookup(&next);
    if (s) {
        struct sample_key_t k = {.tgid = s->tgid, .user_stack = s->user_stack, .kernel_stack = s->kernel_stack};
        struct sample_t init = {};
        __builtin_memcpy(init.comm, s->comm, SONDE_COMM_LEN);
        u64 away = now - s->ts;
        if (current_set() == 0)
            bump(offcpu_0.lookup_or_try_init(&k, &init), 1, away);
        else
            bump(offcpu_1.lookup_or_try_init(&k, &init), 1, away);
        switched_out.delete(&next);
    }
    return 0;
}
#endif
