/* block_io: block requests per disk and op class, with the latency split, from one
 * raw tracepoint at completion (BTF-typed where the kernel allows, plain otherwise).
 *
 * At block_rq_complete the request still carries the kernel's own timestamps:
 * start_time_ns (set where the kernel starts accounting it, the point
 * block_io_start marks) and io_start_time_ns (set when it is handed to the driver,
 * the point block_rq_issue marks, on queues where blk-stat is on: writeback
 * throttling, io.latency or io.cost use it). So nothing is followed across hooks
 * and no per-request map entry exists.
 *
 * Struct offsets and flag values come from the running kernel's BTF as -D flags
 * (bpf/block_io/probe.py); nothing here is read through the kernel headers bcc compiles
 * against. Without BLOCK_IO_LAYOUT this file compiles to nothing: the runtime's
 * first compile has no layout, the decoder then compiles it again with one.
 *
 * Per-CPU counters are updated without atomics: a raw tracepoint program never runs
 * twice at once on one CPU (the kernel skips, and counts as a miss, a nested run).
 */
#include "sonde.h"

#ifdef BLOCK_IO_LAYOUT

#define OP_READ 0
#define OP_WRITE 1
#define OP_SYNC_WRITE 2
#define OP_FLUSH 3
#define OP_DISCARD 4
#define OP_OTHER 5
#define OP_CLASSES 6

#define LAT_QUEUE 0
#define LAT_DEVICE 1
#define LAT_TOTAL 2

struct io_key_t {
    u32 dev;
    u32 op;
};

/* Cumulative since load, per CPU; the decoder sums CPUs and takes deltas. */
struct io_t {
    u64 requests;
    u64 bytes;
    u64 errors;
    u64 untimed;       /* no start stamp: in no latency histogram */
    u64 unsplit;       /* start but no issue stamp: in the total histogram only */
    u64 sum_ns[3];
    u64 slots[3 * SONDE_HIST_SLOTS];  /* kind-major; flat: bcc's Python side reads 2-D arrays wrong */
};

BPF_F_TABLE("percpu_hash", struct io_key_t, struct io_t, block_io, 1024, BPF_F_NO_PREALLOC);

/* The first disks a CPU completes requests for count in a per-CPU array instead:
 * an array slot is found without a call (the verifier inlines the lookup on 6.10+),
 * a hash entry with one (~90 ns here). Slots are direct-mapped by a hash of dev;
 * each CPU claims a free slot for the first dev that lands there, and a dev whose
 * slot another dev holds on that CPU counts in `block_io`. The decoder sums both. */
#define FAST_DEVS 4
struct io_slot_t {
    u32 dev;
    u32 used;
    struct io_t io;
};
BPF_PERCPU_ARRAY(block_io_fast, struct io_slot_t, FAST_DEVS * OP_CLASSES);
BPF_ARRAY(io_zero, struct io_t, 1);  /* a zeroed value to insert from (1 KiB: too big for the stack) */
BPF_PERCPU_ARRAY(sonde_drops, u64, 1);
static __always_inline void count_drop(void) { int zero = 0; sonde_drops.increment(zero); }  /* see sonde.h */

/* The classes blk_fill_rwbs() would print: R, W (S: sync), D/DE, F, anything else. */
static __always_inline u32 op_class(u32 opf)
{
    u32 op = opf & REQ_OP_MASK_;
    if (op == REQ_OP_READ_)
        return OP_READ;
    if (op == REQ_OP_WRITE_)
        return (opf & REQ_SYNC_) ? OP_SYNC_WRITE : OP_WRITE;
    if (op == REQ_OP_DISCARD_ || op == REQ_OP_SECURE_ERASE_)
        return OP_DISCARD;
    if (op == REQ_OP_FLUSH_)
        return OP_FLUSH;
    return OP_OTHER;
}

/* sonde_log2_slot(ns / 1000) without dividing: floor(ns / 1000) has bit length b - 10
 * or b - 9 when ns has b (1000 lies between 2^9 and 2^10), and it is b - 9 exactly
 * when ns >= 1000 << (b - 10). */
static __always_inline u64 us_slot(u64 ns)
{
    if (ns < 1000)
        return 0;
    u64 b = sonde_log2_slot(ns);  /* bit length, capped at SONDE_HIST_SLOTS - 1 */
    if (b >= SONDE_HIST_SLOTS - 1)
        return sonde_log2_slot(ns / 1000);  /* over ~9 minutes: rare, divide */
    return b < 10 ? 1 : (ns >= (1000ULL << (b - 10)) ? b - 9 : b - 10);
}

static __always_inline void observe(struct io_t *v, int kind, u64 ns)
{
    u64 s = us_slot(ns);
    /* us_slot already caps s, but the verifier needs to see the cap on the register
     * that indexes the array; written in BPF assembly so the compiler can neither
     * drop it nor index with a copy made before it. */
    asm volatile("if %[s] < %[n] goto +1\n\t%[s] = %[m]"
                 : [s] "+r"(s) : [n] "i"(SONDE_HIST_SLOTS), [m] "i"(SONDE_HIST_SLOTS - 1));
    v->sum_ns[kind] += ns;
    v->slots[kind * SONDE_HIST_SLOTS + s]++;
}

/* The body of both programs. `btf`, a constant after inlining, says how fields are
 * read: the tp_btf program reads the request and what it points to with plain loads
 * the verifier checks against the kernel's BTF; the plain raw tracepoint program
 * copies the span of the request's fields it needs with one bpf_probe_read_kernel
 * and the device with another. */
static __always_inline int on_complete(const u8 *rq, u32 error, u32 nr_bytes, const int btf)
{
    u64 now = bpf_ktime_get_ns();
    u64 span[(RQ_SPAN_LEN + 7) / 8];
    const u8 *base = rq;
    long adj = 0;
    if (!btf) {
        if (bpf_probe_read_kernel(span, RQ_SPAN_LEN, rq + RQ_SPAN_BASE))
            return 0;
        base = (const u8 *)span;
        adj = RQ_SPAN_BASE;
    }
#define RQ_FIELD(type, off) (*(const volatile type *)(base + (off) - adj))
#define RQ_PTR(off) ((const u8 *)RQ_FIELD(u64, off))
    u32 data_len = RQ_FIELD(u32, RQ_DATA_LEN);

    /* The device the kernel accounts it to: the partition (`part`, set when the
     * kernel starts accounting the request), else the whole disk. The decoder names
     * a partition's whole disk, as the block tracepoints' dev does. */
    u32 dev = 0;
#ifdef RQ_PART
    const u8 *part = RQ_PTR(RQ_PART);
#else
    const u8 *part = 0;
#endif
    if (part) {
#ifdef RQ_PART
        if (btf)
            dev = *(const volatile u32 *)(part + BD_DEV);
        else
            bpf_probe_read_kernel(&dev, sizeof(dev), part + BD_DEV);
#endif
    } else {
        const u8 *disk = 0;
#ifdef RQ_DISK
        disk = RQ_PTR(RQ_DISK);
#else
        const u8 *q = RQ_PTR(RQ_Q);
        if (btf) {
            if (q)
                disk = (const u8 *)*(const volatile u64 *)(q + Q_DISK);
        } else {
            bpf_probe_read_kernel(&disk, sizeof(disk), q + Q_DISK);
        }
#endif
        int mm[2] = {};
        if (disk) {
            if (btf) {
                mm[0] = *(const volatile int *)(disk + GD_MAJOR);
                mm[1] = *(const volatile int *)(disk + GD_FIRST_MINOR);
            } else {
                bpf_probe_read_kernel(&mm[0], 4, disk + GD_MAJOR);
                bpf_probe_read_kernel(&mm[1], 4, disk + GD_FIRST_MINOR);
            }
        }
        dev = ((u32)mm[0] << 20) | (u32)mm[1];  /* MKDEV, the kernel's internal dev_t */
    }
    struct io_key_t k = {.dev = dev, .op = op_class(RQ_FIELD(u32, RQ_CMD_FLAGS))};

    struct io_t *v = 0;
    u32 i = ((dev ^ (dev >> 20)) % FAST_DEVS) * OP_CLASSES + k.op;
    struct io_slot_t *slot = block_io_fast.lookup(&i);
    if (slot) {
        if (!slot->used) {
            slot->dev = dev;
            slot->used = 1;
        }
        if (slot->dev == dev)
            v = &slot->io;
    }
    if (!v)
        v = block_io.lookup(&k);
    if (!v) {
        int zero = 0;
        struct io_t *init = io_zero.lookup(&zero);
        if (!init)
            return 0;
        block_io.update(&k, init);
        v = block_io.lookup(&k);
        if (!v) {
            count_drop();
            return 0;
        }
    }
    /* Bytes as the kernel's iostats count them: every completion, partial ones too. */
    v->bytes += nr_bytes;
    if (nr_bytes < data_len)
        return 0;  /* partly done: the request completes later */
    v->requests++;
    if (error)
        v->errors++;

    /* start_time_ns is this request's only where RQF_IO_STAT says the kernel
     * stamped it (else it may be left from the slot's last use); io_start_time_ns
     * is zeroed when a request is set up, so non-zero means stamped at issue. */
    u64 start = RQ_FIELD(u64, RQ_START);
    u64 io_start = RQ_FIELD(u64, RQ_IO_START);
    if (!(RQ_FIELD(u32, RQ_RQ_FLAGS) & RQF_IO_STAT_) || !start || start > now) {
        v->untimed++;
        return 0;
    }
    observe(v, LAT_TOTAL, now - start);
    if (!io_start || io_start > now) {
        v->unsplit++;
        return 0;
    }
    /* Both stamps can come from one cached clock read per plug (blk_time_get_ns),
     * so issue is held to no earlier than start: queue + device = total exactly. */
    u64 issue = io_start > start ? io_start : start;
    observe(v, LAT_QUEUE, issue - start);
    observe(v, LAT_DEVICE, now - issue);
    return 0;
#undef RQ_PTR
#undef RQ_FIELD
}

/* block_rq_complete(struct request *rq, blk_status_t error, unsigned int nr_bytes),
 * BTF-typed (tp_btf): ctx[] holds the arguments. Loaded and attached by
 * ingest/runtime/btf_tracepoint.py, which bcc cannot do. */
int tpbtf_block_rq_complete(u64 *ctx)
{
    return on_complete((const u8 *)ctx[RQC_ARG_RQ], (u32)ctx[RQC_ARG_ERROR], (u32)ctx[RQC_ARG_NR_BYTES], 1);
}

/* The same as a plain raw tracepoint, where the kernel refuses the tp_btf program. */
int raw_block_rq_complete(struct bpf_raw_tracepoint_args *ctx)
{
    return on_complete((const u8 *)ctx->args[RQC_ARG_RQ], (u32)ctx->args[RQC_ARG_ERROR],
                       (u32)ctx->args[RQC_ARG_NR_BYTES], 0);
}

#endif /* BLOCK_IO_LAYOUT */
