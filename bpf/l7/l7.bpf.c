/* l7: payload prefixes of opted-in processes' socket reads and writes, for the
 * L7 parsers in user space (bpf/l7/protocols/). See probe.py for the why of the
 * hooks; in short:
 *
 * - `l7_sys_enter` / `l7_sys_exit` are raw tracepoints on raw_syscalls:sys_enter
 *   and sys_exit. They are attached only while some process is opted in. Every
 *   syscall of every process then runs them, so the first thing each does is the
 *   cheapest test that lets it go: sys_enter compares the syscall number (a field
 *   of its context) with the nine it wants, then looks the tgid up in `optin`, a
 *   bitmap in an array map (the lookup is inlined: no helper call); sys_exit tests
 *   the bitmap first.
 * - An opted-in thread's enter arguments wait in `inflight` (by thread id) until
 *   its exit, which carries the return value: the bytes really moved. The exit
 *   copies a prefix of them (4 KiB, or up to 32 KiB where the agent asks for it:
 *   `caps`), following iovecs, into the `events` ring buffer with the true length.
 * - A (tgid, fd) seen for the first time is looked at once, through the running
 *   kernel's own offsets (BTF, -D flags from probe.py): only TCP sockets over
 *   IPv4/IPv6 are captured; anything else (files, pipes, UNIX or UDP sockets) is
 *   remembered as skipped, so its later syscalls stop at the `conns` lookup. The
 *   peer address and ports are read at the same time, so a connection that closes
 *   before user space looks still has its peer.
 * - close() (syscall hooks) or its socket's TCP_CLOSE (socket hooks) ends a
 *   connection, once: user space is told. Its entry goes when its own thread closes
 *   or reuses the fd (a TCP_CLOSE only marks it: see end_conn).
 * - sched_process_fork opts a forked child of an opted-in process in (nginx's
 *   workers); sched_process_exit takes an exited process out; sched_process_exec
 *   tells user space, which decides whether the new program matches the config.
 *   These are rare events and stay attached while the probe is loaded.
 * - TLS: uprobes on libssl's SSL_read/SSL_write (and _ex) of opted-in processes
 *   copy the plaintext. The fd comes from the socket syscall the same thread makes
 *   inside the call; the ciphertext of such a connection is not sent.
 *
 * Nothing reads a kernel struct through bcc's headers: pt_regs offsets are the
 * x86-64 ABI's, everything else comes from BTF.
 */
#include "sonde.h"

#ifndef CAPTURE_BYTES
#define CAPTURE_BYTES 4096  /* per read or write, until the agent asks for more */
#endif
#define CAP_MAX 32768       /* per read or write at most; a power of two */
#ifndef RING_PAGES
#define RING_PAGES 4096     /* 16 MiB; a power of two */
#endif
#define MAX_IOV 8
#define PID_WORDS 65536     /* PID_MAX_LIMIT (2^22) tgids, one bit each */

/* x86-64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl: ABI) */
#define NR_READ 0
#define NR_WRITE 1
#define NR_CLOSE 3
#define NR_READV 19
#define NR_WRITEV 20
#define NR_SENDFILE 40
#define NR_SENDTO 44
#define NR_RECVFROM 45
#define NR_SENDMSG 46
#define NR_RECVMSG 47

#define EV_DATA 1
#define EV_CLOSE 2
#define EV_EXEC 3
#define EV_FORK 4
#define EV_EXIT 5
#define EV_FAST 6   /* a connection is counted in the kernel from its first request on */
#define EV_SEED 7   /* ... until now: the agent parses it from here, with what was waiting */

#define HOW_BUF 0   /* (fd, buf, len) */
#define HOW_IOV 1   /* (fd, iov, iovcnt) */
#define HOW_MSG 2   /* (fd, msghdr, flags) */
#define HOW_LEN 3   /* sendfile: only the length */

#define DIR_IN 0
#define DIR_OUT 1

#define CONN_TRACK 1
#define CONN_SKIP 2
#define CONN_TLS 3

#define OP_LEN 16   /* a method or command name (uppercase); a longer command goes to the agent */
#define FAST_MAX 512  /* a request counted in the kernel is whole in this many bytes */
#define FAST_HTTP 1
#define FAST_RESP 2
#define FAST_SLOW 3
#define CUT_SLOT 255  /* agg_key_t.slot of a request outstanding when its connection ended */
#ifndef AGG_ENTRIES
#define AGG_ENTRIES 8192
#endif

#define F_TLS 1
#define F_WIDE 2  /* captured with the wide limit (CAP_MAX) */

#define MSG_PEEK_ 2
#define TCP_CLOSE_ 7

#define S_IFMT_ 0170000
#define S_IFSOCK_ 0140000
#define SOCK_STREAM_ 1

static long (*sonde_read_kernel)(void *dst, u32 size, const void *src) = (void *)BPF_FUNC_probe_read_kernel;
static long (*sonde_read_user)(void *dst, u32 size, const void *src) = (void *)BPF_FUNC_probe_read_user;

struct l7_event_t {
    u64 ts;
    u32 tgid;
    s32 fd;
    u64 true_len;     /* bytes the call moved (its return value) */
    u32 cap_len;      /* bytes captured, a prefix of those */
    u32 lost;         /* this connection's events of this direction lost before this one */
    u8 kind;
    u8 dir;
    u8 flags;
    u8 family;
    u16 lport;        /* host order */
    u16 rport;        /* host order */
    u8 raddr[16];
    char comm[SONDE_COMM_LEN];
};

struct l7_buf_t {
    struct l7_event_t h;
    u8 data[2 * CAP_MAX];  /* twice the cap: the verifier sees every copy's end below it */
};

struct args_t {
    u64 ptr;
    u64 len;
    s32 fd;
    u8 how;
    u8 dir;
    u8 tls;
    u8 pad;
};

struct conn_t {
    u64 req_ts;   /* in-kernel counting: when the waiting request came */
    char op[OP_LEN];  /* its method or command */
    u8 fast;      /* 0 until the first bytes; FAST_HTTP/FAST_RESP: counted here; FAST_SLOW: by the agent */
    u8 req_dir;   /* the direction requests travel (fast connections) */
    u8 waiting;   /* a request waits for its response */
    u8 skipped;   /* 1 + the direction of an answer passed over before the first request */
    u32 state;
    u32 lost_in;
    u32 lost_out;
    u8 family;
    u8 pad;
    u16 lport;
    u16 rport;
    u16 pad2;
    u8 raddr[16];
    u32 cap;      /* bytes to copy per call, from the connection's first bytes; 0 until then */
    u32 pad3;
    u64 sk;       /* its struct sock (socket hooks; 0 where only the fd was seen) */
};

struct ssl_args_t {
    u64 buf;
    u64 out_len;     /* SSL_*_ex: where the byte count is written; 0 for SSL_read/SSL_write */
    u64 ssl;
    s32 fd;          /* the socket the call used, from the syscall inside it; -1 until seen */
    u8 dir;
    u8 pad[3];
};

struct user_iovec_t {
    u64 base;
    u64 len;
};

BPF_ARRAY(optin, u64, PID_WORDS);
BPF_TABLE("lru_hash", u32, struct args_t, inflight, MAX_ENTRIES);
/* LRU: an entry of a process that exited without closing (no close() to delete it)
 * must not fill the map; an evicted live entry is just looked at again. */
BPF_TABLE("lru_hash", u64, struct conn_t, conns, MAX_ENTRIES);
/* (tgid, fd) -> bytes to copy per read or write, where the agent's parser found the
 * kernel's guess (conn_t.cap) wrong: HTTP needs only each message's head, its bodies
 * are skipped by length; PostgreSQL, MySQL and Redis need every message head of a
 * result that spans whole reads. */
BPF_TABLE("lru_hash", u64, u32, caps, MAX_ENTRIES);
BPF_TABLE("lru_hash", u32, struct ssl_args_t, ssl_calls, MAX_ENTRIES);
BPF_TABLE("lru_hash", u64, s32, ssl_fds, MAX_ENTRIES);  /* SSL* -> its socket's fd */
/* struct sock * -> (tgid, fd) of its connection entry: the socket hooks end a
 * connection when its socket reaches TCP_CLOSE, which may happen in softirq, on
 * another CPU than the fd's owner (its entry is then marked, not deleted). */
BPF_TABLE("lru_hash", u64, u64, socks, MAX_ENTRIES);
BPF_RINGBUF_OUTPUT(events, RING_PAGES);
/* One buffer per CPU, indexed by CPU: a per-CPU map's value is limited to 32 KiB.
 * Programs here run in process context with migration disabled and never nest on a
 * CPU, so a CPU's buffer has one user at a time. */
BPF_ARRAY(scratch, struct l7_buf_t, NR_CPUS);
/* [0] events the ring buffer had no room for, [1] events sent, [2] bytes captured,
 * [3] exchanges counted in the kernel, [4] of those, lost to a full `agg` */
BPF_PERCPU_ARRAY(l7_stats, u64, 5);

/* --- in-kernel counting (HTTP/1.x and Redis, one request at a time) ---------------------
 * A connection whose first bytes are one whole HTTP/1.x request head (or one whole
 * RESP command) is counted here, not in the agent: each request waits in the
 * connection's entry until the other side's first bytes, the status line or reply
 * type, which complete it into `agg`. The agent reads and clears `agg` per poll,
 * one generation at a time (`l7_conf[0]`), so nothing is counted twice. The
 * first thing the kernel cannot be sure of (two requests in one read, a request while
 * one waits, a 1xx, a body in the request's read, bytes that are not a message start)
 * hands the connection to the agent for good, with the request that waits (EV_SEED). */
struct agg_key_t {
    u32 tgid;
    u16 port;     /* server: the local port; client: the remote one */
    u16 code;     /* http: the status code; resp: 1 for an error reply, else 0 */
    u8 gen;
    u8 slot;      /* the exp2 slot of the duration in microseconds, or CUT_SLOT */
    u8 role;      /* 0: this process answered (server), 1: it asked (client) */
    u8 proto;     /* FAST_HTTP or FAST_RESP */
    u8 family;
    u8 pad[3];
    u8 raddr[16];
    char op[OP_LEN];
};

struct agg_val_t {
    u64 count;
    u64 sum_us;
    u64 max_us;
};

BPF_TABLE("percpu_hash", struct agg_key_t, struct agg_val_t, agg, AGG_ENTRIES);
/* [0] the generation new exchanges go to; [1] 1 when in-kernel counting is on */
BPF_ARRAY(l7_conf, u32, 2);
BPF_PERCPU_ARRAY(sonde_drops, u64, 1);
static __always_inline void count_drop(void) { int zero = 0; sonde_drops.increment(zero); }  /* see sonde.h */

static __always_inline void stat_add(int i, u64 n)
{
    u64 *v = l7_stats.lookup(&i);
    if (v)
        *v += n;  /* per CPU; a raw tracepoint never runs twice at once on one CPU */
}

static __always_inline int opted_in(u32 tgid)
{
    u32 word = tgid >> 6;
    u64 *bits = optin.lookup(&word);
    return bits && ((*bits >> (tgid & 63)) & 1);
}

static __always_inline u64 conn_key(u32 tgid, s32 fd)
{
    return ((u64)tgid << 32) | (u32)fd;
}

/* What fd is, read once through the running kernel's offsets: 1 for a TCP socket
 * over IPv4/IPv6 (peer filled in), 0 for anything else. c->sk is the fd's struct
 * sock where it is a socket. */
static __always_inline int resolve(s32 fd, struct conn_t *c)
{
    const u8 *task = (const u8 *)bpf_get_current_task();
    const u8 *p = 0;
    u32 max_fds = 0;
    u16 v16 = 0;
    if (fd < 0)
        return 0;
    if (sonde_read_kernel(&p, sizeof(p), task + OFF_TASK_FILES) || !p)
        return 0;
    if (sonde_read_kernel(&p, sizeof(p), p + OFF_FILES_FDT) || !p)
        return 0;
    if (sonde_read_kernel(&max_fds, sizeof(max_fds), p + OFF_FDT_MAX_FDS) || (u32)fd >= max_fds)
        return 0;
    if (sonde_read_kernel(&p, sizeof(p), p + OFF_FDT_FD) || !p)
        return 0;
    if (sonde_read_kernel(&p, sizeof(p), p + (u64)(u32)fd * 8) || !p)  /* struct file * */
        return 0;
    const u8 *file = p;
    if (sonde_read_kernel(&p, sizeof(p), file + OFF_FILE_INODE) || !p)
        return 0;
    if (sonde_read_kernel(&v16, sizeof(v16), p + OFF_INODE_MODE) || (v16 & S_IFMT_) != S_IFSOCK_)
        return 0;
    if (sonde_read_kernel(&p, sizeof(p), file + OFF_FILE_PRIVATE) || !p)  /* struct socket * */
        return 0;
    if (sonde_read_kernel(&v16, sizeof(v16), p + OFF_SOCKET_TYPE) || v16 != SOCK_STREAM_)
        return 0;
    if (sonde_read_kernel(&p, sizeof(p), p + OFF_SOCKET_SK) || !p)        /* struct sock * */
        return 0;
    c->sk = (u64)p;
    if (sonde_read_kernel(&v16, sizeof(v16), p + OFF_SK_PROTOCOL) || v16 != SONDE_IPPROTO_TCP)
        return 0;
    if (sonde_read_kernel(&v16, sizeof(v16), p + OFF_SKC_FAMILY))
        return 0;
    if (v16 == SONDE_AF_INET) {
        sonde_read_kernel(&c->raddr, 4, p + OFF_SKC_DADDR);
    } else if (v16 == SONDE_AF_INET6) {
        sonde_read_kernel(&c->raddr, 16, p + OFF_SKC_V6_DADDR);
    } else {
        return 0;
    }
    c->family = v16;
    sonde_read_kernel(&v16, sizeof(v16), p + OFF_SKC_DPORT);
    c->rport = (v16 >> 8) | (v16 << 8);  /* network order in the sock */
    sonde_read_kernel(&c->lport, sizeof(c->lport), p + OFF_SKC_NUM);
    return 1;
}

static __always_inline void emit_small(u8 kind, u32 tgid, s32 fd)
{
    struct l7_event_t e = {};
    e.ts = bpf_ktime_get_ns();
    e.tgid = tgid;
    e.fd = fd;
    e.kind = kind;
    if (kind == EV_EXEC || kind == EV_FORK)
        bpf_get_current_comm(&e.comm, sizeof(e.comm));
    if (events.ringbuf_output(&e, sizeof(e), 0))
        stat_add(0, 1);
}

/* One exchange of a fast connection into agg, under the key k points at (zeroed by
 * the caller; on the stack, or in the CPU's scratch where the stack is short): its
 * response began (code), or it was cut (outstanding when the connection ended). */
static __always_inline void record(struct agg_key_t *k, struct conn_t *c, u32 tgid, u16 code, u64 dur_ns, u8 cut)
{
    u32 zero = 0;
    u32 *gen = l7_conf.lookup(&zero);
    k->gen = gen ? *gen : 0;
    k->tgid = tgid;
    k->role = c->req_dir == DIR_IN ? 0 : 1;
    k->port = k->role ? c->rport : c->lport;
    k->code = code;
    k->proto = c->fast;
    k->family = c->family;
    __builtin_memcpy(k->raddr, c->raddr, 16);
    __builtin_memcpy(k->op, c->op, OP_LEN);
    u64 us = dur_ns / 1000;
    k->slot = cut ? CUT_SLOT : sonde_log2_slot(us);
    struct agg_val_t *v = agg.lookup(k);
    if (!v) {
        struct agg_val_t z = {};
        agg.insert(k, &z);  /* fails where another CPU made it meanwhile: then it is there */
        v = agg.lookup(k);
        if (!v) {
            stat_add(4, 1);
            return;
        }
    }
    if (cut) {
        __sync_fetch_and_add(&v->count, 1);  /* may run in softirq, inside a program on this CPU */
        return;
    }
    v->count += 1;  /* per CPU, as l7_stats */
    v->sum_us += us;
    if (us > v->max_us)
        v->max_us = us;
    stat_add(3, 1);
}

/* Tell user space a connection ended, naming it (its peer and ports) as its data
 * events do: a close that reaches the ring after the fd's next connection's first
 * events (a TCP_CLOSE on another CPU) is then not taken for that one's. */
static __always_inline void emit_close(u64 key, struct conn_t *c)
{
    struct l7_event_t e = {};
    e.ts = bpf_ktime_get_ns();
    e.tgid = key >> 32;
    e.fd = (s32)key;
    e.kind = EV_CLOSE;
    e.family = c->family;
    e.lport = c->lport;
    e.rport = c->rport;
    __builtin_memcpy(e.raddr, c->raddr, 16);
    if (events.ringbuf_output(&e, sizeof(e), 0))
        stat_add(0, 1);
}

/* conn_t.sk of a connection whose end was claimed: its socket reached TCP_CLOSE while
 * the entry stays for its fd's owner to replace (socket hooks) */
#define SK_ENDED 1ULL

/* The connection (tgid, fd) ends, once: the first to claim it (its socket's TCP_CLOSE,
 * in softirq on any CPU; its fd's close or reuse, in its own thread) counts a request
 * left waiting (count_cut) and tells user space (where it was captured). Only the
 * fd's owner removes the entry (drop): a TCP_CLOSE racing the fd's reuse on another
 * CPU would otherwise delete the new connection's entry, and its first request with
 * it. live is the entry, seen the socket the caller saw it hold; what is counted and
 * told comes from view: the entry itself for its owner, a copy taken before the claim
 * for anyone else (once claimed, the owner may delete the entry and its memory go to
 * the fd's next connection). */
static __always_inline void end_conn(u64 key, struct conn_t *live, struct conn_t *view, u64 seen, int count_cut,
                                     int drop)
{
    if (seen != SK_ENDED && __sync_val_compare_and_swap(&live->sk, seen, SK_ENDED) == seen) {
        if (count_cut && (view->fast == FAST_HTTP || view->fast == FAST_RESP) && view->waiting) {
            struct agg_key_t k = {};
            record(&k, view, key >> 32, 0, 0, 1);
        }
        if (view->state != CONN_SKIP)
            emit_close(key, view);
    }
    if (drop) {
        conns.delete(&key);
        caps.delete(&key);
    }
}

/* The connection entry of (tgid, fd), created (and resolved) on first sight. sk, when
 * a socket hook knows it, is the socket the call used: an entry of another socket
 * means the fd was closed and reused (its old connection ends here), and an fd that
 * does not name sk (an io_uring worker's registers are not a syscall's) is not
 * this call's: 0, nothing created. */
static __always_inline struct conn_t *conn_of(u32 tgid, s32 fd, u32 state_if_socket, u64 sk)
{
    u64 key = conn_key(tgid, fd);
    struct conn_t *c = conns.lookup(&key);
    if (c && c->sk != SK_ENDED && (!sk || !c->sk || c->sk == sk)) {
        if (sk && !c->sk)
            c->sk = sk;
        return c;
    }
    struct conn_t fresh = {};
    fresh.state = resolve(fd, &fresh) ? state_if_socket : CONN_SKIP;
    if (sk && fresh.sk != sk)
        return 0;
    if (c)
        end_conn(key, c, c, c->sk, 1, 1);  /* the fd was closed and reused (ends it unless its TCP_CLOSE did) */
    if (conns.insert(&key, &fresh) && !conns.lookup(&key)) {
        count_drop();
        return 0;
    }
    if (sk && fresh.state != CONN_SKIP)
        socks.update(&sk, &key);
    return conns.lookup(&key);
}

/* Copy what the call moved, at most limit (<= CAP_MAX) bytes, from one buffer. */
static __always_inline u32 copy_buf(u8 *dst, u64 src, u64 n, u32 limit)
{
    u32 len = n < limit ? n : limit;
    /* keep the bound on the register the helper gets */
    asm volatile("if %[l] <= %[c] goto +1\n\t%[l] = %[c]" : [l] "+r"(len) : [c] "i"(CAP_MAX));
    if (len == 0 || sonde_read_user(dst, len, (const void *)src))
        return 0;
    return len;
}

/* Copy the first n bytes spread over iovecs, in order, until limit (<= CAP_MAX) is
 * reached or an iovec cannot be read: the result is always a prefix of the bytes moved. */
static __always_inline u32 copy_iov(u8 *dst, u64 iov, u64 iovcnt, u64 n, u32 limit)
{
    u32 off = 0;
    #pragma unroll
    for (int i = 0; i < MAX_IOV; i++) {
        if (i >= iovcnt || n == 0 || off >= limit)
            break;
        struct user_iovec_t v = {};
        if (sonde_read_user(&v, sizeof(v), (const void *)(iov + i * sizeof(v))))
            break;
        u64 take = v.len < n ? v.len : n;
        u32 room = limit - off;
        u32 len = take < room ? take : room;
        asm volatile("if %[l] <= %[c] goto +1\n\t%[l] = %[c]" : [l] "+r"(len) : [c] "i"(CAP_MAX));
        u32 at = off;
        /* off < limit <= CAP_MAX here, but the verifier must see it on the register it adds */
        asm volatile("%[a] &= %[m]" : [a] "+r"(at) : [m] "i"(CAP_MAX - 1));
        if (len && sonde_read_user(dst + at, len, (const void *)v.base))
            break;
        off += len;
        n -= take;
        if (len < take)
            break;  /* the limit was reached inside this iovec */
    }
    return off;
}

/* Whether a connection's first captured bytes start an HTTP/1.x request or response:
 * then 4 KiB per call holds every message head the parser needs (a body is skipped by
 * its length); anything else (Redis, PostgreSQL, MySQL) is copied up to CAP_MAX. */
static __always_inline int looks_like_http(const u8 *d)
{
    u32 w = d[0] | (d[1] << 8) | (d[2] << 16) | ((u32)d[3] << 24);
    switch (w) {
    case 0x20544547: /* "GET " */ case 0x54534f50: /* "POST" */ case 0x20545550: /* "PUT " */
    case 0x44414548: /* "HEAD" */ case 0x454c4544: /* "DELE" */ case 0x4954504f: /* "OPTI" */
    case 0x43544150: /* "PATC" */ case 0x4e4e4f43: /* "CONN" */ case 0x43415254: /* "TRAC" */
    case 0x50545448: /* "HTTP" */
        return 1;
    }
    return 0;
}

static __always_inline void emit(void *ctx, u32 tgid, s32 fd, struct conn_t *c, u8 dir, u8 how, u64 ptr,
                                 u64 len, u64 moved, u8 flags)
{
    u32 cpu = bpf_get_smp_processor_id();
    struct l7_buf_t *b = scratch.lookup(&cpu);
    if (!b)
        return;
    u64 key = conn_key(tgid, fd);
    u32 *want = caps.lookup(&key);
    u32 limit = want ? *want : (c->cap ? c->cap : CAP_MAX);
    if (limit > CAP_MAX)
        limit = CAP_MAX;
    u32 cap = 0;
    if (how == HOW_BUF) {
        cap = copy_buf(b->data, ptr, moved, limit);
    } else if (how == HOW_IOV) {
        cap = copy_iov(b->data, ptr, len, moved, limit);
    } else if (how == HOW_MSG) {
        u64 iov[2] = {};  /* struct user_msghdr: msg_iov at 16, msg_iovlen at 24 (UAPI) */
        if (!sonde_read_user(iov, sizeof(iov), (const void *)(ptr + 16)))
            cap = copy_iov(b->data, iov[0], iov[1], moved, limit);
    }
    if (!c->cap && cap >= 4)
        c->cap = looks_like_http(b->data) ? CAPTURE_BYTES : CAP_MAX;
    if (limit == CAP_MAX)
        flags |= F_WIDE;
    u32 *lost = dir == DIR_OUT ? &c->lost_out : &c->lost_in;
    u32 seen_lost = *lost;
    b->h.ts = bpf_ktime_get_ns();
    b->h.tgid = tgid;
    b->h.fd = fd;
    b->h.true_len = moved;
    b->h.cap_len = cap;
    b->h.lost = seen_lost;
    b->h.kind = EV_DATA;
    b->h.dir = dir;
    b->h.flags = flags;
    b->h.family = c->family;
    b->h.lport = c->lport;
    b->h.rport = c->rport;
    __builtin_memcpy(b->h.raddr, c->raddr, 16);
    __builtin_memset(b->h.comm, 0, sizeof(b->h.comm));
    u32 size = sizeof(b->h) + (cap & (2 * CAP_MAX - 1));
    if (events.ringbuf_output(b, size, 0)) {
        __sync_fetch_and_add(lost, 1);
        stat_add(0, 1);
        return;
    }
    if (seen_lost)
        __sync_fetch_and_add(lost, -seen_lost);  /* no atomic sub in BPF: add its negation */
    stat_add(1, 1);
    stat_add(2, cap);
}


/* The first bytes the call moved, at most want (<= FAST_MAX), from its first buffer
 * (a writev's or sendmsg's first iovec); 0 where they cannot be read. */
static __always_inline u32 fast_read(u8 *dst, u8 how, u64 ptr, u64 len, u64 moved, u32 want)
{
    u64 base = ptr, blen = moved;
    if (how == HOW_MSG) {
        u64 iov[2] = {};  /* struct user_msghdr: msg_iov at 16, msg_iovlen at 24 (UAPI) */
        if (sonde_read_user(iov, sizeof(iov), (const void *)(ptr + 16)))
            return 0;
        ptr = iov[0];
        len = iov[1];
        how = HOW_IOV;
    }
    if (how == HOW_IOV) {
        struct user_iovec_t v = {};
        if (len == 0 || sonde_read_user(&v, sizeof(v), (const void *)ptr))
            return 0;
        base = v.base;
        blen = v.len < moved ? v.len : moved;
    } else if (how != HOW_BUF) {
        return 0;
    }
    u32 n = blen < want ? blen : want;
    asm volatile("if %[l] <= %[c] goto +1\n\t%[l] = %[c]" : [l] "+r"(n) : [c] "i"(FAST_MAX));
    if (n == 0 || sonde_read_user(dst, n, (const void *)base))
        return 0;
    return n;
}

/* d[i], with i masked where the verifier sees it (clang drops a plain mask it can
 * prove useless, and the verifier may not follow that proof). */
static __always_inline u8 at_(const u8 *d, u64 i)
{
    asm volatile("%[a] &= %[m]" : [a] "+r"(i) : [m] "i"(CAP_MAX - 1));
    return d[i];
}
#define AT(d, i) at_((d), (i))

static __always_inline int crlf2_at(const u8 *d, u32 j)
{
    return AT(d, j) == '\r' && AT(d, j + 1) == '\n' && AT(d, j + 2) == '\r' && AT(d, j + 3) == '\n';
}

/* d starts with a method this path counts (CONNECT tunnels are the agent's). */
static __always_inline int is_method(const u8 *d)
{
    u32 w = d[0] | (d[1] << 8) | (d[2] << 16) | ((u32)d[3] << 24);
    switch (w) {
    case 0x20544547: /* "GET " */ case 0x54534f50: /* "POST" */ case 0x20545550: /* "PUT " */
    case 0x44414548: /* "HEAD" */ case 0x454c4544: /* "DELE" */ case 0x4954504f: /* "OPTI" */
    case 0x43544150: /* "PATC" */ case 0x43415254: /* "TRAC" */
        return 1;
    }
    return 0;
}

/* d[0..n) is one whole HTTP/1.x request head of a known method and nothing else (no
 * body, no second request): op gets the method. */
static __always_inline int http_request(const u8 *d, u32 n, char *op)
{
    if (n < 18 || n > FAST_MAX)  /* "GET / HTTP/1.0\r\n\r\n" */
        return 0;
    if (!is_method(d))
        return 0;
    if (!crlf2_at(d, n - 4))
        return 0;
    /* No earlier CRLFCRLF: every 4-byte window holds a byte at an index = 3 (mod 4),
     * so only windows around a CR or LF found there are compared. */
    #pragma clang loop unroll(disable)
    for (u32 i = 3; i < FAST_MAX; i += 4) {
        if (i + 2 > n)
            break;
        u8 ch = AT(d, i);
        if (ch != '\r' && ch != '\n')
            continue;
        #pragma unroll
        for (u32 k = 0; k < 4; k++) {
            u32 j = i - 3 + k;
            if (j + 4 < n && crlf2_at(d, j))
                return 0;
        }
    }
    #pragma unroll
    for (int i = 0; i < 8; i++) {
        u8 ch = d[i];
        if (ch == ' ')
            return 1;
        op[i] = ch;
    }
    return 0;
}

/* A decimal number (at most 10 digits) at d[*pos] ended by CRLF: *pos moves past the
 * CRLF. -1 if not. *pos lives in the CPU's scratch, not on the stack: read back from
 * there its value is unknown to the verifier, so the paths of each digit count merge
 * instead of multiplying over a command's arguments. */
static __always_inline long resp_num(const u8 *d, volatile u32 *pos, u32 n)
{
    long v = 0;
    u32 start = *pos & (CAP_MAX - 1);
    u32 p = start;
    #pragma unroll
    for (int i = 0; i < 10; i++) {
        if (p + 2 > n)
            return -1;
        u8 ch = AT(d, p);
        if (ch == '\r')
            break;
        if (ch < '0' || ch > '9')
            return -1;
        v = v * 10 + (ch - '0');
        p++;
    }
    if (p == start || p + 2 > n || AT(d, p) != '\r' || AT(d, p + 1) != '\n')
        return -1;
    *pos = p + 2;
    return v;
}

#define RESP_MAX_ARGS 8

/* The call's bytes (moved, of which d holds the first have) are one whole RESP
 * command (an array of bulk strings) and nothing else: op gets its name, uppercase.
 * pos: a u32 of scratch (see resp_num). */
static __always_inline int resp_request(const u8 *d, u32 have, u64 moved, char *op, volatile u32 *pos)
{
    if (have < 4 || d[0] != '*')
        return 0;
    *pos = 1;
    long args = resp_num(d, pos, have);
    if (args < 1 || args > RESP_MAX_ARGS)
        return 0;
    #pragma clang loop unroll(disable)
    for (int a = 0; a < RESP_MAX_ARGS; a++) {
        u32 at = *pos & (CAP_MAX - 1);
        if (at >= have || AT(d, at) != '$')
            return 0;
        *pos = at + 1;
        long len = resp_num(d, pos, have);
        if (len < 0 || len > 0x7fffffff)
            return 0;
        at = *pos & (CAP_MAX - 1);
        if (a == 0) {
            if (len >= OP_LEN || at + len > have)
                return 0;
            #pragma unroll
            for (int i = 0; i < OP_LEN - 1; i++) {
                if (i >= len)
                    break;
                u8 ch = AT(d, at + i);
                op[i] = (ch >= 'a' && ch <= 'z') ? ch - 32 : ch;
            }
        }
        u64 end = (u64)at + len + 2;
        if (a + 1 >= args) {
            if (end <= have && (AT(d, end - 2) != '\r' || AT(d, end - 1) != '\n'))
                return 0;
            return end == moved;
        }
        if (end + 2 > have || AT(d, end - 2) != '\r' || AT(d, end - 1) != '\n')
            return 0;  /* the next argument's head is past what was read */
        *pos = end;
    }
    return 0;
}

/* d starts with an HTTP/1.x status line's "HTTP/1.x NNN". */
static __always_inline int status_line(const u8 *d, u32 n)
{
    return n >= 13 && d[0] == 'H' && d[1] == 'T' && d[2] == 'T' && d[3] == 'P' && d[4] == '/' && d[5] == '1' &&
           d[6] == '.' && d[8] == ' ' && (d[12] == ' ' || d[12] == '\r');
}

/* A status line's code (200-599), or 0: not a final response's start. */
static __always_inline u16 http_status(const u8 *d, u32 n)
{
    if (!status_line(d, n))
        return 0;
    u8 a = d[9] - '0', b = d[10] - '0', c = d[11] - '0';
    if (a < 2 || a > 5 || b > 9 || c > 9)
        return 0;  /* a 1xx is not the end of the wait */
    return a * 100 + b * 10 + c;
}

/* A RESP reply's type: 1 an error, 0 another reply, -1 not a reply start (a push). */
static __always_inline int resp_reply(const u8 *d, u32 n)
{
    if (n < 1)
        return -1;
    switch (d[0]) {
    case '-': case '!':
        return 1;
    case '+': case ':': case '$': case '*': case '_': case ',': case '#': case '(': case '=': case '%': case '~':
        return 0;
    }
    return -1;
}

/* Tell the agent about a fast connection: EV_FAST when it starts being counted here,
 * EV_SEED when it is handed over (with its protocol, the direction of its requests
 * and, in true_len, whether a request waits: its time and op). e is the CPU's
 * scratch header (the stack is short). */
static __always_inline void tell(struct l7_event_t *e, u32 tgid, s32 fd, struct conn_t *c, u8 kind, u8 proto)
{
    e->ts = c->req_ts;
    e->tgid = tgid;
    e->fd = fd;
    e->true_len = c->waiting;
    e->cap_len = 0;
    e->lost = 0;
    e->kind = kind;
    e->dir = c->req_dir;
    e->flags = proto;
    e->family = c->family;
    e->lport = c->lport;
    e->rport = c->rport;
    __builtin_memcpy(e->raddr, c->raddr, 16);
    __builtin_memcpy(e->comm, c->op, OP_LEN);
    if (events.ringbuf_output(e, sizeof(*e), 0))
        stat_add(0, 1);
}

/* A connection picked up mid-stream (open before its process was opted in) may show
 * first the answer to a request it made or got before: an HTTP status line, or a
 * whole RESP reply (its last bytes CRLF) other than an array. The kernel passes over
 * it, and the rest of it (what follows in the same direction), and counts from the
 * next request; anything else goes to the agent (MySQL's server speaks first, and none of its or
 * PostgreSQL's first bytes look like these). */
static __always_inline int answer_before_request(const u8 *d, u32 n, u64 moved)
{
    if (status_line(d, n))
        return 1;
    if (n != moved || n < 3 || d[0] == '*' || resp_reply(d, n) < 0)
        return 0;  /* an array may be a command (a pipeline of them): the agent's */
    return AT(d, n - 2) == '\r' && AT(d, n - 1) == '\n';
}

/* The connection goes to the agent for good, from this call on. */
static __always_inline void hand_over(struct l7_event_t *e, u32 tgid, s32 fd, struct conn_t *c)
{
    u8 was = c->fast;
    c->fast = FAST_SLOW;
    if (was == FAST_HTTP || was == FAST_RESP)
        tell(e, tgid, fd, c, EV_SEED, was);
}

/* Count the call in the kernel where the connection allows: 1 when done (nothing for
 * the agent), 0 when the agent gets the bytes. */
static __always_inline int count_here(u32 tgid, s32 fd, struct conn_t *c, struct args_t *a, u64 moved)
{
    if (c->fast == FAST_SLOW)
        return 0;
    u32 idx = 1;
    u32 *on = l7_conf.lookup(&idx);
    if (!on || !*on)
        return 0;
    u32 cpu = bpf_get_smp_processor_id();
    struct l7_buf_t *b = scratch.lookup(&cpu);
    if (!b)
        return 0;
    u8 *d = b->data;
    if (c->fast == 0 || a->dir == c->req_dir) {
        if (c->skipped == 1 + a->dir)
            return 1;  /* more of an answer passed over */
        u32 n = fast_read(d, a->how, a->ptr, a->len, moved, FAST_MAX);
        if (c->fast == FAST_HTTP && n >= 4 && !is_method(d))
            return 1;  /* what does not start with a method is the last request's body */
        if (c->waiting) {
            hand_over(&b->h, tgid, fd, c);  /* a request while one waits: pipelined */
            return 0;
        }
        u8 proto = 0;
        __builtin_memset(c->op, 0, OP_LEN);
        if (n == moved && c->fast != FAST_RESP && http_request(d, n, c->op))
            proto = FAST_HTTP;
        else if (n && c->fast != FAST_HTTP && resp_request(d, n, moved, c->op, (volatile u32 *)(d + CAP_MAX + 64)))
            proto = FAST_RESP;
        if (!proto && !c->fast && !c->skipped && answer_before_request(d, n, moved)) {
            c->skipped = 1 + a->dir;  /* picked up mid-stream: the answer to a request never seen */
            return 1;
        }
        if (!proto) {
            hand_over(&b->h, tgid, fd, c);  /* nothing waits: its op is not needed */
            return 0;
        }
        c->req_ts = bpf_ktime_get_ns();
        c->waiting = 1;
        if (!c->fast) {
            c->fast = proto;
            c->req_dir = a->dir;
            tell(&b->h, tgid, fd, c, EV_FAST, proto);
        }
        return 1;
    }
    if (!c->waiting)
        return 1;  /* more of a response already counted */
    u32 n = fast_read(d, a->how, a->ptr, a->len, moved, 16);
    u16 code;
    if (c->fast == FAST_HTTP) {
        code = http_status(d, n);
        if (!code) {
            hand_over(&b->h, tgid, fd, c);
            return 0;
        }
    } else {
        int err = resp_reply(d, n);
        if (err < 0) {
            hand_over(&b->h, tgid, fd, c);
            return 0;
        }
        code = err;
    }
    c->waiting = 0;
    struct agg_key_t *k = (struct agg_key_t *)(d + CAP_MAX);  /* past the bytes read above */
    __builtin_memset(k, 0, sizeof(*k));
    record(k, c, tgid, code, bpf_ktime_get_ns() - c->req_ts, 0);
    return 1;
}

int l7_sys_enter(struct bpf_raw_tracepoint_args *ctx)
{
    u8 how, dir;
    switch (ctx->args[1]) {
    case NR_READ: case NR_RECVFROM: how = HOW_BUF; dir = DIR_IN; break;
    case NR_WRITE: case NR_SENDTO: how = HOW_BUF; dir = DIR_OUT; break;
    case NR_READV: how = HOW_IOV; dir = DIR_IN; break;
    case NR_WRITEV: how = HOW_IOV; dir = DIR_OUT; break;
    case NR_RECVMSG: how = HOW_MSG; dir = DIR_IN; break;
    case NR_SENDMSG: how = HOW_MSG; dir = DIR_OUT; break;
    case NR_SENDFILE: how = HOW_LEN; dir = DIR_OUT; break;
    case NR_CLOSE: how = 255; dir = 0; break;
    default: return 0;
    }
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!opted_in(tgid))
        return 0;
    /* r10 at 56 .. di at 112 in struct pt_regs: the syscall's arguments 3, 2, 1, 0 */
    u64 regs[8] = {};
    if (sonde_read_kernel(regs, sizeof(regs), (const u8 *)ctx->args[0] + 56))
        return 0;
    u64 a0 = regs[7], a1 = regs[6], a2 = regs[5], a3 = regs[0];
    s32 fd = (s32)a0;
    u64 key = conn_key(tgid, fd);
    struct conn_t *c = conns.lookup(&key);
    if (how == 255) {
        if (c)
            end_conn(key, c, c, c->sk, 1, 1);
        return 0;
    }
    if (c && c->state == CONN_SKIP)
        return 0;
    struct args_t a = {.ptr = a1, .len = a2, .fd = fd, .how = how, .dir = dir};
    if (how == HOW_LEN) {  /* sendfile(out_fd, in_fd, offset, count) */
        a.ptr = 0;
        a.len = a3;
    }
    u32 tid = id;
    inflight.update(&tid, &a);
    return 0;
}

/* A call's end, with its arguments and what it returned: inside SSL_read/SSL_write
 * the socket is noted for the plaintext; otherwise the bytes moved are sent. */
static __always_inline int on_io(void *ctx, u32 tgid, u32 tid, struct args_t *a, long ret, u64 sk)
{
    struct ssl_args_t *s = ssl_calls.lookup(&tid);
    if (s) {
        /* inside SSL_read/SSL_write: the call's socket, carrying its ciphertext */
        struct conn_t *c = conn_of(tgid, a->fd, CONN_TLS, sk);
        if (!c)
            return 0;
        s->fd = a->fd;
        if (c->state == CONN_TRACK)
            c->state = CONN_TLS;
        return 0;
    }
    if (ret <= 0)
        return 0;  /* an error or EOF moves no bytes; the close says the rest */
    struct conn_t *c = conn_of(tgid, a->fd, CONN_TRACK, sk);
    if (!c || c->state != CONN_TRACK)
        return 0;
    if (!count_here(tgid, a->fd, c, a, ret))
        emit(ctx, tgid, a->fd, c, a->dir, a->how, a->ptr, a->len, ret, 0);
    return 0;
}

int l7_sys_exit(struct bpf_raw_tracepoint_args *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!opted_in(tgid))
        return 0;
    u32 tid = id;
    struct args_t *ap = inflight.lookup(&tid);
    if (!ap)
        return 0;
    struct args_t a = *ap;
    inflight.delete(&tid);
    return on_io(ctx, tgid, tid, &a, ctx->args[1], 0);
}

#if !defined(SONDE_NO_sock_sock_send_length) && !defined(SONDE_NO_sock_sock_recv_length)
/* --- socket hooks (6.3+): sock_send_length / sock_recv_length ------------------------
 * They fire once per sendmsg/recvmsg on a socket, after the bytes moved, with
 * (sk, ret, flags): nothing else on the host pays (a syscall hook, even an empty
 * one, puts every syscall of every process on the slow path). The call's own
 * arguments are the syscall's, read from the user registers the task saved at its
 * entry; calls that are not one of the nine (io_uring, splice, sendmmsg) are not
 * captured. */
static __always_inline int sock_io(struct bpf_raw_tracepoint_args *ctx, u8 dir)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!opted_in(tgid))
        return 0;
    if (dir == DIR_IN && (ctx->args[2] & MSG_PEEK_))
        return 0;  /* the bytes stay queued: the read that takes them counts them */
    u64 regs = (u64)bpf_task_pt_regs((struct task_struct *)bpf_get_current_task_btf());
    /* dx at 96, si 104, di 112, orig_ax 120 in struct pt_regs (x86-64) */
    u64 r[4] = {};
    if (!regs || sonde_read_kernel(r, sizeof(r), (const u8 *)regs + 96))
        return 0;
    u8 how;
    switch (r[3]) {
    case NR_READ: case NR_RECVFROM: case NR_WRITE: case NR_SENDTO: how = HOW_BUF; break;
    case NR_READV: case NR_WRITEV: how = HOW_IOV; break;
    case NR_RECVMSG: case NR_SENDMSG: how = HOW_MSG; break;
    case NR_SENDFILE: how = HOW_LEN; break;
    default: return 0;
    }
    struct args_t a = {.ptr = r[1], .len = r[0], .fd = (s32)r[2], .how = how, .dir = dir};
    if (how == HOW_LEN)
        a.ptr = 0;  /* sendfile's bytes are a file's, not in the process */
    return on_io(ctx, tgid, (u32)id, &a, (int)ctx->args[1], ctx->args[0]);
}

int l7_sock_send(struct bpf_raw_tracepoint_args *ctx) { return sock_io(ctx, DIR_OUT); }
int l7_sock_recv(struct bpf_raw_tracepoint_args *ctx) { return sock_io(ctx, DIR_IN); }

/* inet_sock_set_state(sk, old, new): a captured connection's socket reaching
 * TCP_CLOSE ends it (a close, a reset, or the end of a FIN exchange). Every TCP
 * state change on the host runs this while something is opted in: a few per
 * connection, stopped at the first compare. */
int l7_sock_state(struct bpf_raw_tracepoint_args *ctx)
{
    if ((int)ctx->args[2] != TCP_CLOSE_)
        return 0;
    u64 sk = ctx->args[0];
    u64 *kp = socks.lookup(&sk);
    if (!kp)
        return 0;
    u64 key = *kp;
    socks.delete(&sk);
    struct conn_t *c = conns.lookup(&key);
    if (!c)
        return 0;
    struct conn_t view = *c;
    if (view.sk != sk)
        return 0;  /* the fd names another socket now */
    end_conn(key, c, &view, sk, 1, 0);
    return 0;
}
#endif

static __always_inline void optin_set(u32 tgid, int on)
{
    u32 word = tgid >> 6;
    u64 *bits = optin.lookup(&word);
    if (!bits)
        return;
    u64 bit = 1ULL << (tgid & 63);
    if (on)
        __sync_fetch_and_or(bits, bit);
    else
        __sync_fetch_and_and(bits, ~bit);
}

/* sched_process_fork(parent, child): a new process (not a thread) forked by an
 * opted-in one is opted in at once; user space learns of it from the event. */
int l7_fork(struct bpf_raw_tracepoint_args *ctx)
{
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    if (!opted_in(parent))
        return 0;
    const u8 *child = (const u8 *)ctx->args[1];
    u32 pid = 0, tgid = 0;
    if (sonde_read_kernel(&pid, sizeof(pid), child + OFF_TASK_PID) ||
        sonde_read_kernel(&tgid, sizeof(tgid), child + OFF_TASK_TGID) || pid != tgid)
        return 0;
    optin_set(tgid, 1);
    emit_small(EV_FORK, tgid, parent);
    return 0;
}

/* sched_process_exit: the process is gone when its group dies (6.16+ says so; before
 * that, when its leader exits). */
int l7_exit(struct bpf_raw_tracepoint_args *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!opted_in(tgid))
        return 0;
#ifdef EXIT_GROUP_DEAD
    if (!(u8)ctx->args[1])
        return 0;
#else
    if ((u32)id != tgid)
        return 0;
#endif
    optin_set(tgid, 0);
    emit_small(EV_EXIT, tgid, -1);
    return 0;
}

/* sched_process_exec: user space decides whether the new program matches. */
int l7_exec(struct bpf_raw_tracepoint_args *ctx)
{
    emit_small(EV_EXEC, bpf_get_current_pid_tgid() >> 32, -1);
    return 0;
}

/* --- TLS: libssl's plaintext ---------------------------------------------------------- */

/* A uprobe's context is the user registers, struct pt_regs in the x86-64 ABI's
 * layout (r15 first, 8 bytes each): not taken from bcc's headers. */
struct user_regs_t {
    u64 r15, r14, r13, r12, bp, bx, r11, r10, r9, r8, ax, cx, dx, si, di, orig_ax, ip, cs, flags, sp, ss;
};

static __always_inline int ssl_enter(struct user_regs_t *ctx, u8 dir, int ex)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!opted_in(id >> 32))
        return 0;
    struct ssl_args_t s = {.ssl = ctx->di, .buf = ctx->si, .fd = -1, .dir = dir};
    if (ex)
        s.out_len = ctx->cx;  /* SSL_read_ex(ssl, buf, num, size_t *readbytes) */
    s32 *fd = ssl_fds.lookup(&s.ssl);
    if (fd)
        s.fd = *fd;
    u32 tid = id;
    ssl_calls.update(&tid, &s);
    return 0;
}

static __always_inline int ssl_return(struct user_regs_t *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = id, tgid = id >> 32;
    struct ssl_args_t *sp = ssl_calls.lookup(&tid);
    if (!sp)
        return 0;
    struct ssl_args_t s = *sp;
    ssl_calls.delete(&tid);
    int ret = (int)ctx->ax;  /* an int: the upper half of rax is not sign-extended (-1 reads 4294967295) */
    u64 moved = 0;
    if (s.out_len) {
        if (ret != 1 || sonde_read_user(&moved, sizeof(moved), (const void *)s.out_len))
            return 0;
    } else {
        if (ret <= 0)
            return 0;
        moved = ret;
    }
    if (s.fd < 0 || moved == 0)
        return 0;  /* no socket seen yet for this SSL (it answered from its buffer) */
    ssl_fds.update(&s.ssl, &s.fd);
    struct conn_t *c = conn_of(tgid, s.fd, CONN_TLS, 0);
    if (!c || c->state == CONN_SKIP)
        return 0;
    c->state = CONN_TLS;
    emit(ctx, tgid, s.fd, c, s.dir, HOW_BUF, s.buf, 0, moved, F_TLS);
    return 0;
}

int ssl_read_enter(struct user_regs_t *ctx) { return ssl_enter(ctx, DIR_IN, 0); }
int ssl_write_enter(struct user_regs_t *ctx) { return ssl_enter(ctx, DIR_OUT, 0); }
int ssl_read_ex_enter(struct user_regs_t *ctx) { return ssl_enter(ctx, DIR_IN, 1); }
int ssl_write_ex_enter(struct user_regs_t *ctx) { return ssl_enter(ctx, DIR_OUT, 1); }
int ssl_return_probe(struct user_regs_t *ctx) { return ssl_return(ctx); }
