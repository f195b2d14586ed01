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
 * - close() ends a connection: its entry goes, and user space is told.
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

#define HOW_BUF 0   /* (fd, buf, len) */
#define HOW_IOV 1   /* (fd, iov, iovcnt) */
#define HOW_MSG 2   /* (fd, msghdr, flags) */
#define HOW_LEN 3   /* sendfile: only the length */

#define DIR_IN 0
#define DIR_OUT 1

#define CONN_TRACK 1
#define CONN_SKIP 2
#define CONN_TLS 3

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
 * connection when its socket reaches TCP_CLOSE, which may happen in softirq. */
BPF_TABLE("lru_hash", u64, u64, socks, MAX_ENTRIES);
BPF_RINGBUF_OUTPUT(events, RING_PAGES);
/* One buffer per CPU, indexed by CPU: a per-CPU map's value is limited to 32 KiB.
 * Programs here run in process context with migration disabled and never nest on a
 * CPU, so a CPU's buffer has one user at a time. */
BPF_ARRAY(scratch, struct l7_buf_t, NR_CPUS);
/* [0] events the ring buffer had no room for, [1] events sent, [2] bytes captured */
BPF_PERCPU_ARRAY(l7_stats, u64, 4);
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

/* The connection (tgid, fd) ends: user space is told (where it was captured), its
 * entries go. */
static __always_inline void end_conn(u64 key, struct conn_t *c)
{
    if (c->state != CONN_SKIP)
        emit_small(EV_CLOSE, key >> 32, (s32)key);
    conns.delete(&key);
    caps.delete(&key);
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
    if (c && (!sk || !c->sk || c->sk == sk)) {
        if (sk && !c->sk)
            c->sk = sk;
        return c;
    }
    struct conn_t fresh = {};
    fresh.state = resolve(fd, &fresh) ? state_if_socket : CONN_SKIP;
    if (sk && fresh.sk != sk)
        return 0;
    if (c)
        end_conn(key, c);
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
            end_conn(key, c);
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
    /* r10 at 56 .. di at 112, orig_ax at 120 in struct pt_regs (x86-64) */
    u64 r[9] = {};
    if (!regs || sonde_read_kernel(r, sizeof(r), (const u8 *)regs + 56))
        return 0;
    u8 how;
    switch (r[8]) {
    case NR_READ: case NR_RECVFROM: case NR_WRITE: case NR_SENDTO: how = HOW_BUF; break;
    case NR_READV: case NR_WRITEV: how = HOW_IOV; break;
    case NR_RECVMSG: case NR_SENDMSG: how = HOW_MSG; break;
    case NR_SENDFILE: how = HOW_LEN; break;
    default: return 0;
    }
    struct args_t a = {.ptr = r[6], .len = r[5], .fd = (s32)r[7], .how = how, .dir = dir};
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
    if (!c || c->sk != sk)
        return 0;  /* the fd names another socket now */
    end_conn(key, c);
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
