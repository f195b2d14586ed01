/* tcp_flow: L4 connection metrics per process x peer endpoint.
 *
 * Several hooks fire in softirq or timer context, where the current task is not
 * the socket's owner. Ownership is kept in `socks`, keyed by the socket pointer's
 * *value* (never dereferenced), filled in process context (connect, listen,
 * send/recv, close) and evicted at tcp:tcp_destroy_sock. Events on sockets whose
 * owner is unknown are counted under tgid 0, so host totals stay exact.
 *
 * Window values (min, max) are per poll interval without read-and-clear: user
 * space bumps `window_epoch` each poll, and the kernel keeps two slots indexed by
 * the epoch's parity, restarting a slot when it sees a new epoch.
 */
#include "sonde.h"

#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_FIN_WAIT1 4
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define TCP_LAST_ACK 9
#define TCP_LISTEN 10

#define ROLE_UNKNOWN 0
#define ROLE_CLIENT 1   /* this process connected: port is the remote port */
#define ROLE_SERVER 2   /* this process accepted: port is the local listening port */

#define HIST_CONNECT 0
#define HIST_SRTT 1
#define HIST_LIFETIME 2

#ifndef MAX_SOCKS
#define MAX_SOCKS 65536
#endif

/* tcp:tcp_send_reset has `enum sk_rst_reason reason`; older headers lack the enum. */
enum sk_rst_reason { SK_RST_REASON_NOT_SPECIFIED = 0 };

struct flow_key {
    u32 tgid;
    u16 port;
    u8 role;
    u8 family;
    u8 addr[16];
};

struct flow_val {
    u64 tx_bytes;
    u64 rx_bytes;
    u64 rx_segments;
    u64 active_opens;
    u64 passive_opens;
    u64 connect_refused;
    u64 connect_timeouts;
    u64 closes;
    u64 retransmits;
    u64 resets_sent;
    u64 resets_received;
    u64 zero_windows;
    u64 srtt_sum_us;
    u64 connect_sum_us;
    u64 lifetime_sum_us;
    u64 wnd_samples;
    u64 snd_cwnd_sum;
    u64 snd_wnd_sum;
    u64 rcv_wnd_sum;
    u32 snd_cwnd_last;
    u32 snd_wnd_last;
    u32 rcv_wnd_last;
    u32 srtt_last_us;
    /* per-interval window slots, indexed by epoch parity */
    u32 wepoch[2];
    u32 srtt_max_us[2];
    u32 snd_cwnd_min[2];
    u32 snd_wnd_min[2];
    u32 rcv_wnd_min[2];
    u32 cepoch[2];
    u32 connect_max_us[2];
    u32 lepoch[2];
    u64 lifetime_max_us[2];
    char comm[SONDE_COMM_LEN];
};

struct sock_t {
    struct flow_key fk;
    u64 t_syn;
    u64 t_est;
    u8 state;
    u8 claimed;
    u8 opened;
    u8 got_rst;
    char comm[SONDE_COMM_LEN];
    u8 laddr[16];  /* local address, for passive sockets */
};

struct listen_key {
    u16 port;
    u16 family;
    u8 addr[16];   /* local address: the same port in two namespaces is two services */
};

struct owner_t {
    u32 tgid;
    char comm[SONDE_COMM_LEN];
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

BPF_HASH(socks, u64, struct sock_t, MAX_SOCKS);
BPF_HASH(listeners, struct listen_key, struct owner_t, MAX_ENTRIES);
BPF_HASH(tcp_flow, struct flow_key, struct flow_val, MAX_ENTRIES);
BPF_HASH(tcp_hist, struct hist_key, u64, MAX_ENTRIES * 8);
BPF_HASH(tcp_reset_reason, struct reason_key, struct reason_val, 4096);
BPF_ARRAY(window_epoch, u32, 1);
BPF_PERCPU_ARRAY(scratch_flow, struct flow_val, 1);
BPF_PERCPU_ARRAY(sonde_drops, u64, 1);

static __always_inline void count_drop(void)
{
    int zero = 0;
    u64 *d = sonde_drops.lookup(&zero);
    if (d)
        (*d)++;
}

static __always_inline u32 current_epoch(void)
{
    int zero = 0;
    u32 *e = window_epoch.lookup(&zero);
    return e ? *e : 0;
}

static __always_inline struct flow_val *flow_entry(struct flow_key *fk, const char *comm)
{
    struct flow_val *v = tcp_flow.lookup(fk);
    if (v)
        return v;
    int zero = 0;
    struct flow_val *init = scratch_flow.lookup(&zero);
    if (!init)
        return 0;
    __builtin_memset(init, 0, sizeof(*init));
    __builtin_memcpy(init->comm, comm, sizeof(init->comm));
    int err = tcp_flow.insert(fk, init);
    if (err && err != -SONDE_EEXIST) {
        count_drop();
        return 0;
    }
    return tcp_flow.lookup(fk);
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

/* For a connection whose side is unknown, the lower port is the service's: an
 * ephemeral port is never a tag. */
static __always_inline u16 service_port(u16 sport, u16 dport)
{
    return sport < dport ? sport : dport;
}

static __always_inline void copy_addr(u8 *dst, const u8 *v4, const u8 *v6, u16 family)
{
    if (family == SONDE_AF_INET)
        __builtin_memcpy(dst, v4, 4);
    else
        __builtin_memcpy(dst, v6, 16);
}

/* The current task becomes the socket's owner (process context only). */
static __always_inline void claim(struct sock_t *s)
{
    if (s->claimed)
        return;
    s->claimed = 1;
    s->fk.tgid = bpf_get_current_pid_tgid() >> 32;
    bpf_get_current_comm(&s->comm, sizeof(s->comm));
    if (s->fk.role == ROLE_SERVER && !s->opened) {
        s->opened = 1;
        struct flow_val *v = flow_entry(&s->fk, s->comm);
        if (v)
            __sync_fetch_and_add(&v->passive_opens, 1);
        struct listen_key lk = {.port = s->fk.port, .family = s->fk.family};
        __builtin_memcpy(lk.addr, s->laddr, sizeof(lk.addr));
        struct owner_t o = {.tgid = s->fk.tgid};
        __builtin_memcpy(o.comm, s->comm, sizeof(o.comm));
        if (listeners.update(&lk, &o))
            count_drop();
    }
}

static __always_inline struct sock_t *sock_from_process(u64 sk, u16 family)
{
    struct sock_t *s = socks.lookup(&sk);
    if (s) {
        claim(s);
        return s;
    }
    /* A socket opened before the agent started: owner known, peer learnt later. */
    struct sock_t n = {};
    n.fk.tgid = bpf_get_current_pid_tgid() >> 32;
    n.fk.family = 0;
    n.claimed = 1;
    n.state = TCP_ESTABLISHED;
    bpf_get_current_comm(&n.comm, sizeof(n.comm));
    if (socks.insert(&sk, &n) && !socks.lookup(&sk)) {
        count_drop();
        return 0;
    }
    return socks.lookup(&sk);
}

TRACEPOINT_PROBE(sock, sock_send_length)
{
    if (args->protocol != SONDE_IPPROTO_TCP ||
        (args->family != SONDE_AF_INET && args->family != SONDE_AF_INET6))
        return 0;
    struct sock_t *s = sock_from_process((u64)args->sk, args->family);
    if (!s || args->ret <= 0)
        return 0;
    struct flow_val *v = flow_entry(&s->fk, s->comm);
    if (v)
        __sync_fetch_and_add(&v->tx_bytes, args->ret);
    return 0;
}

TRACEPOINT_PROBE(sock, sock_recv_length)
{
    if (args->protocol != SONDE_IPPROTO_TCP ||
        (args->family != SONDE_AF_INET && args->family != SONDE_AF_INET6))
        return 0;
    struct sock_t *s = sock_from_process((u64)args->sk, args->family);
    if (!s || args->ret <= 0 || (args->flags & SONDE_MSG_PEEK))
        return 0;
    struct flow_val *v = flow_entry(&s->fk, s->comm);
    if (v)
        __sync_fetch_and_add(&v->rx_bytes, args->ret);
    return 0;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != SONDE_IPPROTO_TCP)
        return 0;
    u64 sk = (u64)args->skaddr;
    int os = args->oldstate, ns = args->newstate;
    u64 now = bpf_ktime_get_ns();

    /* listen() stores its state without this tracepoint, so there is no CLOSE->LISTEN
     * event; port owners are learnt from the processes that claim accepted sockets. */
    if (os == TCP_LISTEN) {             /* the listener closed */
        struct listen_key lk = {.port = args->sport, .family = args->family};
        copy_addr(lk.addr, args->saddr, args->saddr_v6, args->family);
        listeners.delete(&lk);
        return 0;
    }
    if (os == TCP_CLOSE && ns == TCP_SYN_SENT) {   /* connect(): process context */
        struct sock_t n = {};
        n.fk.tgid = bpf_get_current_pid_tgid() >> 32;
        n.fk.role = ROLE_CLIENT;
        n.fk.port = args->dport;
        n.fk.family = args->family;
        copy_addr(n.fk.addr, args->daddr, args->daddr_v6, args->family);
        n.t_syn = now;
        n.claimed = 1;
        n.state = ns;
        bpf_get_current_comm(&n.comm, sizeof(n.comm));
        if (socks.update(&sk, &n))
            count_drop();
        return 0;
    }

    struct sock_t *s = socks.lookup(&sk);
    if (os == TCP_SYN_RECV && ns == TCP_ESTABLISHED && (!s || s->state != TCP_SYN_RECV)) {
        /* Passive open, in softirq. A new child socket: an entry already under this
         * pointer is stale (a socket whose destroy we did not see), so replace it. */
        struct sock_t n = {};
        n.fk.role = ROLE_SERVER;
        n.fk.port = args->sport;
        n.fk.family = args->family;
        copy_addr(n.fk.addr, args->daddr, args->daddr_v6, args->family);
        copy_addr(n.laddr, args->saddr, args->saddr_v6, args->family);
        n.t_est = now;
        n.state = ns;
        /* provisional owner: the last process that used a connection accepted on
         * this port, until a process uses this one */
        struct listen_key lk = {.port = args->sport, .family = args->family};
        copy_addr(lk.addr, args->saddr, args->saddr_v6, args->family);
        struct owner_t *o = listeners.lookup(&lk);
        if (o) {
            n.fk.tgid = o->tgid;
            __builtin_memcpy(n.comm, o->comm, sizeof(n.comm));
        }
        if (socks.update(&sk, &n))
            count_drop();
        return 0;
    }
    if (!s)
        return 0;
    if (s->fk.family == 0) {  /* pre-existing socket: learn its peer now */
        s->fk.family = args->family;
        s->fk.port = service_port(args->sport, args->dport);
        copy_addr(s->fk.addr, args->daddr, args->daddr_v6, args->family);
    }
    s->state = ns;
    if ((os == TCP_ESTABLISHED && ns == TCP_FIN_WAIT1) || (os == TCP_CLOSE_WAIT && ns == TCP_LAST_ACK))
        claim(s);  /* close(): process context */

    struct flow_val *v = flow_entry(&s->fk, s->comm);
    if (!v)
        return 0;
    if (os == TCP_SYN_SENT) {
        if (ns == TCP_ESTABLISHED) {
            u64 lat_us = (now - s->t_syn) / 1000;
            s->t_est = now;
            __sync_fetch_and_add(&v->active_opens, 1);
            __sync_fetch_and_add(&v->connect_sum_us, lat_us);
            hist_observe(&s->fk, HIST_CONNECT, lat_us);
            u32 e = current_epoch(), i = e & 1;
            if (v->cepoch[i] != e) {
                v->cepoch[i] = e;
                v->connect_max_us[i] = lat_us;
            } else if (lat_us > v->connect_max_us[i]) {
                v->connect_max_us[i] = lat_us;
            }
        } else if (ns == TCP_CLOSE) {
            if (s->got_rst)
                __sync_fetch_and_add(&v->connect_refused, 1);
            else
                __sync_fetch_and_add(&v->connect_timeouts, 1);
        }
    }
    if (ns == TCP_CLOSE && s->t_est) {
        u64 life_us = (now - s->t_est) / 1000;
        s->t_est = 0;
        __sync_fetch_and_add(&v->closes, 1);
        __sync_fetch_and_add(&v->lifetime_sum_us, life_us);
        hist_observe(&s->fk, HIST_LIFETIME, life_us);
        u32 e = current_epoch(), i = e & 1;
        if (v->lepoch[i] != e) {
            v->lepoch[i] = e;
            v->lifetime_max_us[i] = life_us;
        } else if (life_us > v->lifetime_max_us[i]) {
            v->lifetime_max_us[i] = life_us;
        }
    }
    return 0;
}

/* Flow of a socket event outside process context; unknown sockets go to tgid 0. */
static __always_inline struct flow_val *flow_of_sock(u64 sk, struct flow_key *unknown)
{
    struct sock_t *s = socks.lookup(&sk);
    if (s)
        return flow_entry(&s->fk, s->comm);
    char comm[SONDE_COMM_LEN] = "[unattributed]";
    return flow_entry(unknown, comm);
}

#ifndef SONDE_NO_tcp_tcp_probe
TRACEPOINT_PROBE(tcp, tcp_probe)
{
    u64 sk = (u64)args->skaddr;
    struct sock_t *s = socks.lookup(&sk);
    if (!s)
        return 0;  /* not a socket we track: no owner to report it under */
    if (s->fk.family == 0) {
        /* daddr is a sockaddr_in / sockaddr_in6: family, port (network order), address */
        u16 fam = args->family;
        s->fk.family = fam;
        s->fk.port = service_port(args->sport, args->dport);
        if (fam == SONDE_AF_INET)
            __builtin_memcpy(s->fk.addr, &args->daddr[4], 4);
        else
            __builtin_memcpy(s->fk.addr, &args->daddr[8], 16);
    }
    struct flow_val *v = flow_entry(&s->fk, s->comm);
    if (!v)
        return 0;
    u32 srtt = args->srtt, cwnd = args->snd_cwnd, swnd = args->snd_wnd, rwnd = args->rcv_wnd;
    __sync_fetch_and_add(&v->rx_segments, 1);
    __sync_fetch_and_add(&v->wnd_samples, 1);
    __sync_fetch_and_add(&v->srtt_sum_us, srtt);
    __sync_fetch_and_add(&v->snd_cwnd_sum, cwnd);
    __sync_fetch_and_add(&v->snd_wnd_sum, swnd);
    __sync_fetch_and_add(&v->rcv_wnd_sum, rwnd);
    if (swnd == 0)
        __sync_fetch_and_add(&v->zero_windows, 1);
    v->srtt_last_us = srtt;
    v->snd_cwnd_last = cwnd;
    v->snd_wnd_last = swnd;
    v->rcv_wnd_last = rwnd;
    u32 e = current_epoch(), i = e & 1;
    if (v->wepoch[i] != e) {
        v->wepoch[i] = e;
        v->srtt_max_us[i] = srtt;
        v->snd_cwnd_min[i] = cwnd;
        v->snd_wnd_min[i] = swnd;
        v->rcv_wnd_min[i] = rwnd;
    } else {
        if (srtt > v->srtt_max_us[i]) v->srtt_max_us[i] = srtt;
        if (cwnd < v->snd_cwnd_min[i]) v->snd_cwnd_min[i] = cwnd;
        if (swnd < v->snd_wnd_min[i]) v->snd_wnd_min[i] = swnd;
        if (rwnd < v->rcv_wnd_min[i]) v->rcv_wnd_min[i] = rwnd;
    }
    hist_observe(&s->fk, HIST_SRTT, srtt);
    return 0;
}
#endif

#ifndef SONDE_NO_tcp_tcp_retransmit_skb
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    struct flow_key unknown = {};
    unknown.family = args->family;
    unknown.port = service_port(args->sport, args->dport);
    copy_addr(unknown.addr, args->daddr, args->daddr_v6, args->family);
    struct flow_val *v = flow_of_sock((u64)args->skaddr, &unknown);
    if (v)
        __sync_fetch_and_add(&v->retransmits, 1);
    return 0;
}
#endif

#ifndef SONDE_NO_tcp_tcp_receive_reset
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    u64 sk = (u64)args->skaddr;
    struct sock_t *s = socks.lookup(&sk);
    if (s && s->state == TCP_SYN_SENT) {
        /* a reset answering our SYN is a refused connect, counted as such at CLOSE */
        s->got_rst = 1;
        return 0;
    }
    struct flow_key unknown = {};
    unknown.family = args->family;
    unknown.port = service_port(args->sport, args->dport);
    copy_addr(unknown.addr, args->daddr, args->daddr_v6, args->family);
    struct flow_val *v = flow_of_sock(sk, &unknown);
    if (v)
        __sync_fetch_and_add(&v->resets_received, 1);
    return 0;
}
#endif

#ifndef SONDE_NO_tcp_tcp_send_reset
TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
    u64 sk = (u64)args->skaddr;
    struct flow_key unknown = {};
    /* daddr is a sockaddr: family at 0, port at 2, address at 4 (v4) or 8 (v6) */
    u16 fam = 0, dport = 0, sport = 0;
    __builtin_memcpy(&fam, &args->daddr[0], 2);
    __builtin_memcpy(&dport, &args->daddr[2], 2);
    __builtin_memcpy(&sport, &args->saddr[2], 2);
    unknown.family = fam;
    unknown.port = service_port((sport >> 8) | ((sport & 0xff) << 8), (dport >> 8) | ((dport & 0xff) << 8));
    if (fam == SONDE_AF_INET)
        __builtin_memcpy(unknown.addr, &args->daddr[4], 4);
    else if (fam == SONDE_AF_INET6)
        __builtin_memcpy(unknown.addr, &args->daddr[8], 16);
    struct flow_val *v = 0;
    struct reason_key rk = {.reason = args->reason};
    struct reason_val init = {};
    struct sock_t *s = sk ? socks.lookup(&sk) : 0;
    if (s) {
        v = flow_entry(&s->fk, s->comm);
        rk.tgid = s->fk.tgid;
        __builtin_memcpy(init.comm, s->comm, sizeof(init.comm));
    } else {
        char comm[SONDE_COMM_LEN] = "[unattributed]";
        v = flow_entry(&unknown, comm);
        __builtin_memcpy(init.comm, comm, sizeof(init.comm));
    }
    if (v)
        __sync_fetch_and_add(&v->resets_sent, 1);
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
#endif

TRACEPOINT_PROBE(tcp, tcp_destroy_sock)
{
    u64 sk = (u64)args->skaddr;
    struct sock_t *s = socks.lookup(&sk);
    if (!s)
        return 0;
    if (s->fk.role == ROLE_SERVER && !s->opened) {
        /* accepted but never used by a process: count it under the listener */
        struct flow_val *v = flow_entry(&s->fk, s->comm);
        if (v)
            __sync_fetch_and_add(&v->passive_opens, 1);
    }
    socks.delete(&sk);
    return 0;
}
