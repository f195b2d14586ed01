/* tcp_traffic: TCP payload bytes and calls per process.
 *
 * sock:sock_send_length and sock:sock_recv_length fire in the calling process's
 * context when sock_sendmsg/sock_recvmsg return, so bpf_get_current_pid_tgid()
 * is the socket's user. The map is cumulative; user space writes deltas.
 */
#include "sonde.h"

struct traffic_t {
    u64 tx_bytes;
    u64 rx_bytes;
    u64 tx_calls;
    u64 rx_calls;
    char comm[SONDE_COMM_LEN];   /* comm of the thread that created the entry */
};

BPF_PERCPU_HASH(tcp_traffic, u32, struct traffic_t, MAX_ENTRIES);
BPF_PERCPU_ARRAY(sonde_drops, u64, 1);

static __always_inline struct traffic_t *traffic_entry(void)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct traffic_t *v = tcp_traffic.lookup(&tgid);
    if (v)
        return v;
    struct traffic_t init = {};
    bpf_get_current_comm(&init.comm, sizeof(init.comm));
    int err = tcp_traffic.insert(&tgid, &init);
    if (err && err != -SONDE_EEXIST) {
        /* map full: count the loss so the operator sees it */
        int zero = 0;
        u64 *drops = sonde_drops.lookup(&zero);
        if (drops)
            (*drops)++;
        return 0;
    }
    return tcp_traffic.lookup(&tgid);
}

static __always_inline int is_tcp(u16 family, u16 protocol)
{
    return protocol == SONDE_IPPROTO_TCP &&
           (family == SONDE_AF_INET || family == SONDE_AF_INET6);
}

static __always_inline int on_send(u16 family, u16 protocol, int ret)
{
    if (ret <= 0 || !is_tcp(family, protocol))
        return 0;
    struct traffic_t *v = traffic_entry();
    if (v) {
        v->tx_bytes += ret;
        v->tx_calls += 1;
    }
    return 0;
}

static __always_inline int on_recv(u16 family, u16 protocol, int ret, int flags)
{
    /* A MSG_PEEK read leaves the bytes queued: the real read counts them. */
    if (ret <= 0 || (flags & SONDE_MSG_PEEK) || !is_tcp(family, protocol))
        return 0;
    struct traffic_t *v = traffic_entry();
    if (v) {
        v->rx_bytes += ret;
        v->rx_calls += 1;
    }
    return 0;
}

TRACEPOINT_PROBE(sock, sock_send_length)
{
    return on_send(args->family, args->protocol, args->ret);
}

TRACEPOINT_PROBE(sock, sock_recv_length)
{
    return on_recv(args->family, args->protocol, args->ret, args->flags);
}
