/* block_io: block I/O per disk and op class, latency split, utilisation, per-process bytes.
 *
 * A request is followed by (dev, sector) through its tracepoints: start
 * (block_io_start, where the kernel starts accounting it, in the submitter's
 * context; block_rq_insert on kernels without it) -> block_rq_issue (handed to the
 * driver) -> block_rq_complete (with the error, if any). Queue latency is start ->
 * issue, device latency issue -> complete, total start -> complete. Busy time is
 * the time a disk has at least one request between start and complete, the same
 * in-flight rule /proc/diskstats io_ticks follows.
 */
#include "sonde.h"

#define OP_READ 0
#define OP_WRITE 1
#define OP_SYNC_WRITE 2
#define OP_FLUSH 3
#define OP_DISCARD 4
#define OP_OTHER 5

#define LAT_QUEUE 0
#define LAT_DEVICE 1
#define LAT_TOTAL 2

struct rq_key_t {
    u32 dev;
    u32 pad;
    u64 sector;
};

struct rq_t {
    u64 start_ts;
    u64 issue_ts;
    u32 bytes;
    u32 op;
};

struct io_key_t {
    u32 dev;
    u32 op;
};

struct io_t {
    u64 requests;
    u64 bytes;
    u64 errors;
    u64 queue_sum_us;
    u64 device_sum_us;
    u64 total_sum_us;
};

struct busy_t {
    s64 inflight;
    u64 busy_start;
    u64 busy_ns;
};

struct hist_key_t {
    u32 dev;
    u16 op;
    u8 kind;
    u8 slot;
};

struct proc_io_t {
    u64 bytes;
    u64 requests;
    char comm[SONDE_COMM_LEN];
};

BPF_HASH(inflight_rq, struct rq_key_t, struct rq_t, MAX_ENTRIES);
BPF_HASH(block_io, struct io_key_t, struct io_t, 1024);
BPF_HASH(disk_busy, u32, struct busy_t, 1024);
BPF_HASH(block_hist, struct hist_key_t, u64, 16384);
BPF_HASH(proc_io, u32, struct proc_io_t, MAX_ENTRIES);
BPF_PERCPU_ARRAY(sonde_drops, u64, 1);

static __always_inline void count_drop(void)
{
    int zero = 0;
    u64 *d = sonde_drops.lookup(&zero);
    if (d)
        (*d)++;
}

/* rwbs: [F(preflush)] op{R,W,D,F(flush),N} [F(fua)] [A] [S(sync)] [M] ... */
static __always_inline u32 op_class(const char *r)
{
    char op = 0;
    int sync = 0, flush = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        char c = r[i];
        if (c == 0)
            break;
        if (!op && (c == 'R' || c == 'W' || c == 'D' || c == 'N'))
            op = c;
        else if (!op && c == 'F')
            flush = 1;
        else if (op && c == 'S')
            sync = 1;
    }
    if (op == 'R') return OP_READ;
    if (op == 'W') return sync ? OP_SYNC_WRITE : OP_WRITE;
    if (op == 'D') return OP_DISCARD;
    if (!op && flush) return OP_FLUSH;
    return OP_OTHER;
}

static __always_inline void hist_add(u32 dev, u32 op, u8 kind, u64 us)
{
    struct hist_key_t k = {.dev = dev, .op = op, .kind = kind, .slot = sonde_log2_slot(us)};
    u64 one = 1;
    u64 *c = block_hist.lookup(&k);
    if (c) {
        __sync_fetch_and_add(c, 1);
    } else if (block_hist.insert(&k, &one) == -SONDE_EEXIST) {
        c = block_hist.lookup(&k);
        if (c)
            __sync_fetch_and_add(c, 1);
    } else if (!block_hist.lookup(&k)) {
        count_drop();
    }
}

static __always_inline void busy_begin(u32 dev, u64 now)
{
    struct busy_t *b = disk_busy.lookup(&dev);
    if (!b) {
        struct busy_t init = {};
        disk_busy.insert(&dev, &init);
        b = disk_busy.lookup(&dev);
        if (!b) {
            count_drop();
            return;
        }
    }
    if (__sync_fetch_and_add(&b->inflight, 1) == 0)
        b->busy_start = now;
}

static __always_inline void busy_end(u32 dev, u64 now)
{
    struct busy_t *b = disk_busy.lookup(&dev);
    if (!b)
        return;
    if (__sync_fetch_and_add(&b->inflight, -1) == 1 && b->busy_start)
        __sync_fetch_and_add(&b->busy_ns, now - b->busy_start);
}

static __always_inline int on_start(u32 dev, u64 sector, u32 bytes, const char *rwbs)
{
    u64 now = bpf_ktime_get_ns();
    struct rq_key_t k = {.dev = dev, .sector = sector};
    struct rq_t r = {.start_ts = now, .bytes = bytes, .op = op_class(rwbs)};
    if (inflight_rq.update(&k, &r)) {
        count_drop();
        return 0;
    }
    busy_begin(dev, now);
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct proc_io_t *p = proc_io.lookup(&tgid);
    if (!p) {
        struct proc_io_t init = {};
        bpf_get_current_comm(&init.comm, sizeof(init.comm));
        proc_io.insert(&tgid, &init);
        p = proc_io.lookup(&tgid);
    }
    if (p) {
        __sync_fetch_and_add(&p->bytes, bytes);
        __sync_fetch_and_add(&p->requests, 1);
    } else {
        count_drop();
    }
    return 0;
}

#ifndef SONDE_NO_block_block_io_start
TRACEPOINT_PROBE(block, block_io_start)
{
    char rwbs[8];
    __builtin_memcpy(rwbs, args->rwbs, sizeof(rwbs));
    return on_start(args->dev, args->sector, args->bytes, rwbs);
}
#else
TRACEPOINT_PROBE(block, block_rq_insert)
{
    char rwbs[8];
    __builtin_memcpy(rwbs, args->rwbs, sizeof(rwbs));
    return on_start(args->dev, args->sector, args->bytes, rwbs);
}
#endif

TRACEPOINT_PROBE(block, block_rq_issue)
{
    u64 now = bpf_ktime_get_ns();
    struct rq_key_t k = {.dev = args->dev, .sector = args->sector};
    struct rq_t *r = inflight_rq.lookup(&k);
    if (r) {
        r->issue_ts = now;
        return 0;
    }
    /* not seen starting (issued directly, or started before the agent) */
    char rwbs[8];
    __builtin_memcpy(rwbs, args->rwbs, sizeof(rwbs));
    struct rq_t n = {.start_ts = now, .issue_ts = now, .bytes = args->bytes, .op = op_class(rwbs)};
    if (inflight_rq.update(&k, &n))
        count_drop();
    else
        busy_begin(args->dev, now);
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete)
{
    u64 now = bpf_ktime_get_ns();
    struct rq_key_t k = {.dev = args->dev, .sector = args->sector};
    struct rq_t *r = inflight_rq.lookup(&k);
    if (!r)
        return 0;
    u32 dev = args->dev, op = r->op;
    u64 issue = r->issue_ts ? r->issue_ts : now;
    u64 queue_us = (issue - r->start_ts) / 1000, device_us = (now - issue) / 1000;
    u64 total_us = (now - r->start_ts) / 1000;
    u32 bytes = r->bytes;
    inflight_rq.delete(&k);
    busy_end(dev, now);

    struct io_key_t ik = {.dev = dev, .op = op};
    struct io_t *io = block_io.lookup(&ik);
    if (!io) {
        struct io_t init = {};
        block_io.insert(&ik, &init);
        io = block_io.lookup(&ik);
    }
    if (!io) {
        count_drop();
        return 0;
    }
    __sync_fetch_and_add(&io->requests, 1);
    __sync_fetch_and_add(&io->bytes, bytes);
    if (args->error)
        __sync_fetch_and_add(&io->errors, 1);
    __sync_fetch_and_add(&io->queue_sum_us, queue_us);
    __sync_fetch_and_add(&io->device_sum_us, device_us);
    __sync_fetch_and_add(&io->total_sum_us, total_us);
    hist_add(dev, op, LAT_QUEUE, queue_us);
    hist_add(dev, op, LAT_DEVICE, device_us);
    hist_add(dev, op, LAT_TOTAL, total_us);
    return 0;
}
