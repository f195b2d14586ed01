/* tcp: L4 per process x peer, from counters the kernel keeps.
 *
 * Nothing here runs per send, per receive or per segment. The agent reads live
 * sockets' tcp_info with one sock_diag dump per poll; this file covers what a
 * dump cannot see, once per connection:
 *   - cgroup/connect4, connect6 (process context): the connecting process;
 *   - cgroup/sock_release (process context, just before tcp_close): the closer;
 *   - sock_ops on the cgroup2 root: connect, active/passive established, and the
 *     state callback (flag set at establishment) whose transition to CLOSE reads
 *     the final counters before tcp_disconnect() zeroes them;
 *   - tcp:tcp_receive_reset and tcp:tcp_send_reset, which fire per reset (rare).
 * Sockets are keyed by the socket cookie, the same value the dump reports.
 *
 * Struct reads: the sock_ops context is verifier-checked ABI. The two fields read
 * from `struct sock` (skc_cookie, skc_flags) use offsets from the running kernel's
 * BTF, passed in as -D flags (OFF_SKC_COOKIE, OFF_SKC_FLAGS), never the headers.
 *
 * Sockets the agent has seen in a dump (`seen`, written by the agent) leave their
 * final counters in `closed_seen`, so the agent subtracts what it already wrote;
 * the others are summed into `tcp_agg` per flow here. Events (opens, closes,
 * failed connects, resets) are always counted here.
 */
#include <uapi/linux/bpf.h>
#include "sonde.h"

/* bpf_probe_read_kernel, called by its number: bcc rewrites calls by that name to
 * bpf_probe_read when /proc/kallsyms shows no addresses (no CAP_SYSLOG, or systemd's
 * ProtectKernelTunables=), and sock_ops programs may not call bpf_probe_read. */
static long (*sonde_read_kernel)(void *dst, u32 size, const void *src) = (void *)BPF_FUNC_probe_read_kernel;

#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_FIN_WAIT1 4
#define TCP_FIN_WAIT2 5
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define TCP_LAST_ACK 9
#define TCP_CLOSING 11

#define ROLE_UNKNOWN 0
#define ROLE_CLIENT 1
#define ROLE_SERVER 2

#define HIST_CONNECT 0
#define HIST_SRTT 1
#define HIST_LIFETIME 2

#define SOCK_DONE_BIT 1   /* enum sock_flags: SOCK_DEAD, SOCK_DONE, ... (set by tcp_fin) */
#define SONDE_SOCK_STREAM 1

/* Every map is sized from the probe's config (probes.tcp.map_entries, MAX_ENTRIES):
 * per flow MAX_ENTRIES (tcp_agg; tcp_hist 4 x, a few buckets per flow), per live
 * socket 6 x (conns, seen, closed_seen: 61,440 at the default 10,240), and half of
 * it for listening sockets, reset reasons per process and aborted connections. */
#define MAX_CONNS (MAX_ENTRIES * 6)
#define MAX_SMALL (MAX_ENTRIES / 2)

struct flow_key {
    u32 tgid;
    u16 port;
    u8 role;
    u8 family;
    u8 addr[16];
};

struct conn_t {
    u32 tgid;          /* 0 until connect, release or the agent names the owner */
    u8 role;
    u8 est;
    u8 rst_rcvd;
    u8 family;
    u16 port;
    u8 flagged;        /* the state callback is on: a CLOSE will come and delete this */
    u8 pad;
    u8 addr[16];
    u64 t0;            /* connect, then establishment (ns) */
    char comm[SONDE_COMM_LEN];
};

struct owner_t {
    u32 tgid;
    char comm[SONDE_COMM_LEN];
};

struct final_t {       /* application bytes, SYN and FIN taken out */
    u64 tx_bytes;
    u64 rx_bytes;
    u64 segs_in;
    u64 segs_out;
    u64 retrans;
};

struct agg_t {
    u64 tx_bytes;
    u64 rx_bytes;
    u64 segs_in;
    u64 segs_out;
    u64 retrans;
    u64 tx_unacked_bytes;
    u64 active_opens;
    u64 passive_opens;
    u64 connect_refused;
    u64 connect_timeouts;
    u64 closes;
    u64 resets_sent;
    u64 resets_received;
    u64 connect_sum_us;
    u64 lifetime_sum_us;
    u64 srtt_sum_us;
    char comm[SONDE_COMM_LEN];
};

struct listen_key {
    u16 port;
    u16 family;
    u8 addr[16];
};

struct hist_key {
    struct flow_key fk;
    u32 kind_slot;   /* kind << 8 | slot */
};

struct reason_key {
    u32 tgid;
    u32 reason;
};

struct reason_val {
    u64 resets;
    char comm[SONDE_COMM_LEN];
};

struct aborted_t {
    struct flow_key fk;
    char comm[SONDE_COMM_LEN];
};

/* Maps whose entries are deleted while programs may hold a pointer to them (an
 * entry looked up, then added to) are not preallocated: a deleted element is freed
 * after an RCU grace period, so a late add can never land in an element already
 * reused for another key. */
BPF_F_TABLE("hash", u64, struct conn_t, conns, MAX_CONNS, BPF_F_NO_PREALLOC);
BPF_HASH(seen, u64, struct owner_t, MAX_CONNS);
BPF_HASH(closed_seen, u64, struct final_t, MAX_CONNS);
BPF_F_TABLE("hash", struct flow_key, struct agg_t, tcp_agg, MAX_ENTRIES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct hist_key, u64, tcp_hist, MAX_ENTRIES * 4, BPF_F_NO_PREALLOC);
BPF_HASH(listeners, struct listen_key, struct owner_t, MAX_SMALL);
BPF_F_TABLE("hash", struct reason_key, struct reason_val, tcp_reset_reason, MAX_SMALL, BPF_F_NO_PREALLOC);
BPF_TABLE("lru_hash", u64, struct aborted_t, aborted, MAX_SMALL);
BPF_PERCPU_ARRAY(scratch_agg, struct agg_t, 1);
BPF_PERCPU_ARRAY(sonde_drops, u64, 1);
static __always_inline void count_drop(void) { int zero = 0; sonde_drops.increment(zero); }  /* see sonde.h */

static __always_inline struct agg_t *agg_entry(struct flow_key *fk, const char *comm)
{
    struct agg_t *v = tcp_agg.lookup(fk);
    if (v)
        return v;
    int zero = 0;
    struct agg_t *init = scratch_agg.lookup(&zero);
    if (!init)
        return 0;
    __builtin_memset(init, 0, sizeof(*init));
    __builtin_memcpy(init->comm, comm, sizeof(init->comm));
    int err = tcp_agg.insert(fk, init);
    if (err && err != -SONDE_EEXIST) {
        count_drop();
        return 0;
    }
    return tcp_agg.lookup(fk);
}

static __always_inline void hist_observe(struct flow_key *fk, u32 kind, u64 value)
{
    struct hist_key hk = {};
    hk.fk = *fk;
    hk.kind_slot = (kind << 8) | sonde_log2_slot(value);
    u64 one = 1;
    u64 *c = tcp_hist.lookup(&hk);
    if (c) {
        __sync_fetch_and_add(c, 1);
        return;
    }
    int err = tcp_hist.insert(&hk, &one);
    if (err == -SONDE_EEXIST) {
        c = tcp_hist.lookup(&hk);
        if (c)
            __sync_fetch_and_add(c, 1);
    } else if (err) {
        count_drop();
    }
}

static __always_inline u64 sock_cookie_of(const void *sk)
{
    u64 cookie = 0;
    if (sk)
        sonde_read_kernel(&cookie, sizeof(cookie), (const char *)sk + OFF_SKC_COOKIE);
    return cookie;
}

/* The remote (or, with local set, the local) address of a sock_ops socket. */
static __always_inline void addr_of(struct bpf_sock_ops *s, u8 *addr, int local)
{
    if (s->family == SONDE_AF_INET) {
        u32 a = local ? s->local_ip4 : s->remote_ip4;
        __builtin_memcpy(addr, &a, 4);
    } else if (local) {
        u32 a[4] = {s->local_ip6[0], s->local_ip6[1], s->local_ip6[2], s->local_ip6[3]};
        __builtin_memcpy(addr, a, 16);
    } else {
        u32 a[4] = {s->remote_ip6[0], s->remote_ip6[1], s->remote_ip6[2], s->remote_ip6[3]};
        __builtin_memcpy(addr, a, 16);
    }
}

/* The flow a tracked connection counts to, and its owner's comm where it has one. */
static __always_inline void flow_of(const struct conn_t *c, struct flow_key *fk, char *comm)
{
    fk->tgid = c->tgid;
    fk->role = c->role;
    fk->family = c->family;
    fk->port = c->port;
    __builtin_memcpy(fk->addr, c->addr, sizeof(fk->addr));
    if (c->tgid)
        __builtin_memcpy(comm, c->comm, SONDE_COMM_LEN);
}

/* The owner of an accepted socket no process has claimed yet: the listener's
 * owner (written by the agent from its dumps), on this address or the wildcard. */
static __always_inline void listener_owner(struct bpf_sock_ops *s, struct flow_key *fk, char *comm)
{
    struct listen_key lk = {.port = (u16)s->local_port, .family = (u16)s->family};
    addr_of(s, lk.addr, 1);
    struct owner_t *o = listeners.lookup(&lk);
    if (!o) {
        __builtin_memset(lk.addr, 0, sizeof(lk.addr));
        o = listeners.lookup(&lk);
    }
    if (o) {
        fk->tgid = o->tgid;
        __builtin_memcpy(comm, o->comm, SONDE_COMM_LEN);
    }
}

static __always_inline void on_close(struct bpf_sock_ops *s, u64 cookie, u32 old)
{
    struct conn_t *cp = conns.lookup(&cookie);
    if (!cp)
        return;  /* not opened under the agent: the polls cover it up to their last read */
    struct conn_t cc = *cp;
    struct conn_t *c = &cc;
    /* Delete first: the agent, marking this socket seen, checks that it is still
     * in `conns` after its mark, so a close that has begun is never missed. */
    conns.delete(&cookie);
    struct flow_key fk = {};
    char comm[SONDE_COMM_LEN] = "[unattributed]";
    flow_of(c, &fk, comm);
    if (!c->tgid && c->role == ROLE_SERVER)
        listener_owner(s, &fk, comm);

    /* Application bytes: bytes_acked counts our SYN (active opens) and our FIN once
     * acked; bytes_received counts the peer's FIN (tcp_fin sets SOCK_DONE). */
    u64 acked = s->bytes_acked, rcvd = s->bytes_received;
    u32 una = s->snd_una, nxt = s->snd_nxt;
    u8 fin_sent = old == TCP_FIN_WAIT1 || old == TCP_FIN_WAIT2 || old == TCP_CLOSING || old == TCP_LAST_ACK;
    u64 syn = (c->role == ROLE_CLIENT && c->est) ? 1 : 0;
    u64 fin_out = (fin_sent && una == nxt) ? 1 : 0;
    u64 flags = 0;
    struct bpf_sock *sk = s->sk;
    if (sk) {
        /* a BTF-typed pointer may take a constant offset; the bare socket pointer may not */
        void *tp = bpf_skc_to_tcp_sock(sk);
        if (tp)
            sonde_read_kernel(&flags, sizeof(flags), (const char *)tp + OFF_SKC_FLAGS);
    }
    u64 fin_in = (flags >> SOCK_DONE_BIT) & 1;
    struct final_t f = {};
    f.tx_bytes = acked >= syn + fin_out ? acked - syn - fin_out : 0;
    f.rx_bytes = rcvd >= fin_in ? rcvd - fin_in : 0;
    f.segs_in = s->segs_in;
    f.segs_out = s->segs_out;
    f.retrans = s->total_retrans;
    /* Sent but never acknowledged (a reset, an abort): not in tx_bytes, reported apart. */
    u32 inflight = nxt - una;
    if (inflight && fin_sent)
        inflight -= 1;
    if (!c->est)
        inflight = 0;

    /* Seen or not is decided by who deletes the mark: this program or the agent
     * (which deletes it when it finds the socket gone right after marking it). */
    struct owner_t *o = seen.lookup(&cookie);
    u8 was_seen = 0;
    if (o) {
        struct owner_t owner = *o;
        if (seen.delete(&cookie) == 0) {
            was_seen = 1;
            fk.tgid = owner.tgid;
            __builtin_memcpy(comm, owner.comm, sizeof(comm));
            if (closed_seen.update(&cookie, &f))
                count_drop();
        }
    }
    struct agg_t *v = agg_entry(&fk, comm);
    if (v) {
        if (!was_seen) {
            __sync_fetch_and_add(&v->tx_bytes, f.tx_bytes);
            __sync_fetch_and_add(&v->rx_bytes, f.rx_bytes);
            __sync_fetch_and_add(&v->segs_in, f.segs_in);
            __sync_fetch_and_add(&v->segs_out, f.segs_out);
            __sync_fetch_and_add(&v->retrans, f.retrans);
            if (c->role == ROLE_SERVER && c->est)
                __sync_fetch_and_add(&v->passive_opens, 1);
        }
        __sync_fetch_and_add(&v->tx_unacked_bytes, inflight);
        if (old == TCP_SYN_SENT) {
            if (c->rst_rcvd)
                __sync_fetch_and_add(&v->connect_refused, 1);
            else
                __sync_fetch_and_add(&v->connect_timeouts, 1);
        } else if (c->est) {
            u64 now = bpf_ktime_get_ns();
            u64 life_us = (now - c->t0) / 1000;
            u64 srtt_us = s->srtt_us >> 3;
            __sync_fetch_and_add(&v->closes, 1);
            __sync_fetch_and_add(&v->lifetime_sum_us, life_us);
            __sync_fetch_and_add(&v->srtt_sum_us, srtt_us);
            if (c->rst_rcvd)
                __sync_fetch_and_add(&v->resets_received, 1);
            hist_observe(&fk, HIST_LIFETIME, life_us);
            hist_observe(&fk, HIST_SRTT, srtt_us);
        }
    }
    /* An abortive close sends its reset after the transition to CLOSE: remember the
     * flow for tcp_send_reset. */
    if (!c->rst_rcvd && (old == TCP_ESTABLISHED || old == TCP_CLOSE_WAIT || old == TCP_FIN_WAIT1)) {
        struct aborted_t a = {};
        a.fk = fk;
        __builtin_memcpy(a.comm, comm, sizeof(a.comm));
        aborted.update(&cookie, &a);
    }
}

int sonde_sockops(struct bpf_sock_ops *s)
{
    u32 op = s->op;
    if (s->family != SONDE_AF_INET && s->family != SONDE_AF_INET6)
        return 1;
    if (op == BPF_SOCK_OPS_STATE_CB) {
        if (s->args[1] == TCP_CLOSE)
            on_close(s, bpf_get_socket_cookie(s), s->args[0]);
        return 1;
    }
    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        bpf_sock_ops_cb_flags_set(s, s->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
        u64 cookie = bpf_get_socket_cookie(s);
        struct conn_t n = {};
        struct conn_t *c = conns.lookup(&cookie);   /* from cgroup/connect: the owner */
        if (!c)
            c = &n;      /* connected before the agent attached connect4/6: no owner yet */
        /* Filled in place: replacing an entry of a map that is not preallocated
         * allocates a new element and frees the old one, per connection. */
        c->role = ROLE_CLIENT;
        c->flagged = 1;
        c->family = s->family;
        c->port = bpf_ntohl(s->remote_port);
        addr_of(s, c->addr, 0);
        c->t0 = bpf_ktime_get_ns();
        if (c == &n && conns.update(&cookie, &n))
            count_drop();
        return 1;
    }
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        u64 cookie = bpf_get_socket_cookie(s);
        struct conn_t *c = conns.lookup(&cookie);
        if (!c)
            return 1;
        u64 now = bpf_ktime_get_ns();
        u64 lat_us = (now - c->t0) / 1000;
        c->est = 1;
        c->t0 = now;
        struct flow_key fk = {.tgid = c->tgid, .role = c->role, .family = c->family, .port = c->port};
        __builtin_memcpy(fk.addr, c->addr, sizeof(fk.addr));
        char comm[SONDE_COMM_LEN] = "[unattributed]";
        if (c->tgid)
            __builtin_memcpy(comm, c->comm, sizeof(comm));
        struct agg_t *v = agg_entry(&fk, comm);
        if (v) {
            __sync_fetch_and_add(&v->active_opens, 1);
            __sync_fetch_and_add(&v->connect_sum_us, lat_us);
        }
        hist_observe(&fk, HIST_CONNECT, lat_us);
        return 1;
    }
    if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
        bpf_sock_ops_cb_flags_set(s, s->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
        u64 cookie = bpf_get_socket_cookie(s);
        struct conn_t n = {};
        n.role = ROLE_SERVER;
        n.flagged = 1;
        n.est = 1;
        n.family = s->family;
        n.port = s->local_port;
        addr_of(s, n.addr, 0);
        n.t0 = bpf_ktime_get_ns();
        if (conns.update(&cookie, &n))
            count_drop();
    }
    return 1;
}

static __always_inline int on_connect(struct bpf_sock_addr *ctx)
{
    if (ctx->type != SONDE_SOCK_STREAM || ctx->protocol != SONDE_IPPROTO_TCP)
        return 1;
    u64 cookie = bpf_get_socket_cookie(ctx);
    struct conn_t n = {};
    n.tgid = bpf_get_current_pid_tgid() >> 32;
    bpf_get_current_comm(&n.comm, sizeof(n.comm));
    n.role = ROLE_CLIENT;
    if (conns.update(&cookie, &n))
        count_drop();
    return 1;
}

int sonde_connect4(struct bpf_sock_addr *ctx) { return on_connect(ctx); }
int sonde_connect6(struct bpf_sock_addr *ctx) { return on_connect(ctx); }

int sonde_release(struct bpf_sock *sk)
{
    if (sk->protocol != SONDE_IPPROTO_TCP)
        return 1;
    u64 cookie = bpf_get_socket_cookie(sk);
    struct conn_t *c = conns.lookup(&cookie);
    if (!c)
        return 1;
    if (!c->flagged) {      /* a connect that failed before reaching TCP: no CLOSE will come */
        conns.delete(&cookie);
        return 1;
    }
    if (!c->tgid) {
        c->tgid = bpf_get_current_pid_tgid() >> 32;
        bpf_get_current_comm(&c->comm, sizeof(c->comm));
    }
    return 1;
}

/* A reset on a socket nobody tracks (no socket, or one older than the agent):
 * counted under tgid 0 with the peer from the segment. */
static __always_inline void unattributed_key(struct flow_key *fk, u16 family, u16 sport, u16 dport,
                                             const u8 *daddr4, const u8 *daddr6)
{
    fk->family = family;
    fk->port = sport < dport ? sport : dport;
    if (family == SONDE_AF_INET)
        __builtin_memcpy(fk->addr, daddr4, 4);
    else
        __builtin_memcpy(fk->addr, daddr6, 16);
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    u64 cookie = sock_cookie_of(args->skaddr);
    struct conn_t *c = cookie ? conns.lookup(&cookie) : 0;
    if (c) {
        c->rst_rcvd = 1;   /* counted at CLOSE: a refused connect, or a reset connection */
        return 0;
    }
    struct flow_key fk = {};
    unattributed_key(&fk, args->family, args->sport, args->dport, args->daddr, args->daddr_v6);
    char comm[SONDE_COMM_LEN] = "[unattributed]";
    struct agg_t *v = agg_entry(&fk, comm);
    if (v)
        __sync_fetch_and_add(&v->resets_received, 1);
    return 0;
}

#ifdef SONDE_F_tcp_send_reset_reason
/* 6.10+: `enum sk_rst_reason reason`, which the 6.1 headers bcc compiles against lack. */
enum sk_rst_reason { SK_RST_REASON_NOT_SPECIFIED = 0 };
#endif

TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
    struct flow_key fk = {};
    char comm[SONDE_COMM_LEN] = "[unattributed]";
    u64 cookie = sock_cookie_of(args->skaddr);
    struct conn_t *c = cookie ? conns.lookup(&cookie) : 0;
    struct aborted_t *a = 0;
    if (c) {
        flow_of(c, &fk, comm);
    } else if (cookie && (a = aborted.lookup(&cookie))) {
        fk = a->fk;
        __builtin_memcpy(comm, a->comm, sizeof(comm));
    } else {
#ifdef SONDE_F_tcp_send_reset_daddr_v6
        unattributed_key(&fk, args->family, args->sport, args->dport, args->daddr, args->daddr_v6);
#else
        /* 6.3+: daddr is a sockaddr_in / sockaddr_in6: family at 0, port at 2 (network
         * order), address at 4 (v4) or 8 (v6) */
        u16 fam = 0, dport = 0, sport = 0;
        __builtin_memcpy(&fam, &args->daddr[0], 2);
        __builtin_memcpy(&dport, &args->daddr[2], 2);
        __builtin_memcpy(&sport, &args->saddr[2], 2);
        unattributed_key(&fk, fam, bpf_ntohs(sport), bpf_ntohs(dport), &args->daddr[4], &args->daddr[8]);
#endif
    }
    struct agg_t *v = agg_entry(&fk, comm);
    if (v)
        __sync_fetch_and_add(&v->resets_sent, 1);
    struct reason_key rk = {.tgid = fk.tgid};
#ifdef SONDE_F_tcp_send_reset_reason
    rk.reason = args->reason;
#endif
    struct reason_val init = {};
    __builtin_memcpy(init.comm, comm, sizeof(init.comm));
    struct reason_val *r = tcp_reset_reason.lookup(&rk);
    if (!r) {
        tcp_reset_reason.insert(&rk, &init);
        r = tcp_reset_reason.lookup(&rk);
    }
    if (r)
        __sync_fetch_and_add(&r->resets, 1);
    else
        count_drop();
    return 0;
}
