/* process_io: block I/O bytes and requests per process, counted where a request is
 * created for a bio (raw tracepoint block_getrq), in the submitting task's context.
 *
 * Off by default: it is a second program per I/O, on top of block_io's one at
 * completion, and per-disk totals do not need it. The bio's size is read at an offset
 * from the running kernel's BTF (bpf/process_io/probe.py); without PROCESS_IO_LAYOUT this
 * file compiles to nothing and the decoder compiles it again with one.
 */
#include "sonde.h"

#ifdef PROCESS_IO_LAYOUT

struct process_io_t {
    u64 bytes;
    u64 requests;
    char comm[SONDE_COMM_LEN];
};

BPF_HASH(process_io, u32, struct process_io_t, MAX_ENTRIES);
BPF_PERCPU_ARRAY(sonde_drops, u64, 1);
static __always_inline void count_drop(void) { int zero = 0; sonde_drops.increment(zero); }  /* see sonde.h */

/* Bios merged into the request afterwards are not added: the request's bytes when
 * the process created it. */
RAW_TRACEPOINT_PROBE(block_getrq)
{
    const u8 *bio = (const u8 *)ctx->args[GETRQ_ARG_BIO];
    u32 size = 0;
    bpf_probe_read_kernel(&size, sizeof(size), bio + BIO_SIZE);
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct process_io_t *p = process_io.lookup(&tgid);
    if (!p) {
        struct process_io_t init = {};
        bpf_get_current_comm(&init.comm, sizeof(init.comm));
        process_io.insert(&tgid, &init);
        p = process_io.lookup(&tgid);
        if (!p) {
            count_drop();
            return 0;
        }
    }
    __sync_fetch_and_add(&p->bytes, size);
    __sync_fetch_and_add(&p->requests, 1);
    return 0;
}

#endif /* PROCESS_IO_LAYOUT */
