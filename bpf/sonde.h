/* Shared definitions for Sonde's probes.
 *
 * Probes never include kernel headers for struct layouts and never dereference
 * kernel pointers: the headers bcc compiles against need not match the running
 * kernel, and a wrong offset gives silent garbage. Constants come from stable
 * UAPI values, spelled out here.
 */
#ifndef SONDE_H
#define SONDE_H

#define SONDE_AF_INET 2
#define SONDE_AF_INET6 10
#define SONDE_IPPROTO_TCP 6
#define SONDE_MSG_PEEK 2
#define SONDE_EEXIST 17

#ifndef MAX_ENTRIES
#define MAX_ENTRIES 10240
#endif

#define SONDE_COMM_LEN 16

/* Every probe declares `BPF_PERCPU_ARRAY(sonde_drops, u64, 1)` and a one-line
 * count_drop() (`sonde_drops.increment(zero)`) in its .bpf.c: bcc rewrites map
 * references (`.lookup`, `&map` in bpf_map_* calls) only in the main file, so neither
 * the map nor the helper can live in this header (tried: the program then fails to
 * load). The runtime reads the map as `sonde_probe.map_full_drops`. */

#endif

/* Exp2 histogram slot: 0 for 0, else floor(log2(v)) + 1, so slot s holds
 * values in [2^(s-1), 2^s - 1] and its upper bound (the `le` tag) is 2^s - 1.
 * Slots at or past SONDE_HIST_SLOTS - 1 land in the last, reported as +Inf. */
#define SONDE_HIST_SLOTS 40

static __always_inline u32 sonde_log2_slot(u64 v)
{
    u32 r = 0;
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8)  { v >>= 8;  r += 8; }
    if (v >> 4)  { v >>= 4;  r += 4; }
    if (v >> 2)  { v >>= 2;  r += 2; }
    if (v >> 1)  { r += 1; v >>= 1; }
    r += v;  /* v is 0 or 1 here: adds the final +1 for non-zero input */
    return r >= SONDE_HIST_SLOTS - 1 ? SONDE_HIST_SLOTS - 1 : r;
}
