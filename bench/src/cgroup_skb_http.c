/* A design study, not a probe: HTTP/1.x requests counted from cgroup_skb programs on
 * the opted-in service's own cgroup (ingress and egress), to measure what issue 15's
 * nginx case would cost counted there. Only that cgroup's packets run them: nothing else on the host pays,
 * unlike the socket tracepoints (1.93 % empty, bench/results/sockets_floor_toggle.json).
 *
 * Per packet with a payload it does what a counting design needs: the socket's own
 * storage (no hash on the connection), its first 16 payload bytes, a request waiting
 * until the other side's status line, then an aggregate keyed as `agg` in
 * bpf/l7/l7.bpf.c is (48 bytes), with the process that last sent on the socket (egress
 * runs in the sender's context; ingress, in softirq, has no process of its own). What
 * it leaves out: IPv6 extension headers, a request split across packets, pipelining
 * and the hand-over to a parser. `bench/hook_toggle.py --what cgroup-skb-http`
 * attaches it in agent windows only. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>

#define OP_LEN 16

struct st_t {
    u64 ts;
    char op[OP_LEN];
    u32 tgid;     /* the process that last sent on it (egress runs in the sender's context) */
    u8 waiting;
    u8 pad[3];
};

struct key_t {
    u32 tgid;
    u16 port;
    u16 code;
    u8 gen;
    u8 slot;
    u8 role;
    u8 proto;
    u8 family;
    u8 pad[3];
    u8 raddr[16];
    char op[OP_LEN];
};

struct val_t {
    u64 count;
    u64 sum_us;
    u64 max_us;
};

BPF_SK_STORAGE(conn_st, struct st_t);
BPF_TABLE("percpu_hash", struct key_t, struct val_t, agg, 4096);

static __always_inline u8 slot_of(u64 v)
{
    u8 s = 0;
#pragma unroll
    for (int i = 0; i < 6; i++) {
        u32 shift = 32 >> i;
        if (v >> shift) {
            v >>= shift;
            s += shift;
        }
    }
    return s + (v != 0);
}

static __always_inline int handle(struct __sk_buff *skb, u8 egress)
{
    struct bpf_sock *sk = skb->sk;
    if (!sk)
        return 1;
    sk = bpf_sk_fullsock(sk);
    if (!sk || sk->protocol != 6)
        return 1;
    u8 b0 = 0;
    if (bpf_skb_load_bytes(skb, 0, &b0, 1))
        return 1;
    u32 off = (b0 >> 4) == 4 ? (b0 & 15) * 4 : 40;
    u8 doff = 0;
    if (bpf_skb_load_bytes(skb, off + 12, &doff, 1))
        return 1;
    off += (doff >> 4) * 4;
    if (skb->len < off + 16)
        return 1;  /* no payload (an ACK, a FIN), or too short to be a message start */
    u8 d[16];
    if (bpf_skb_load_bytes(skb, off & 0xff, d, 16))
        return 1;
    struct st_t *st = conn_st.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (!st)
        return 1;
    if (egress)
        st->tgid = bpf_get_current_pid_tgid() >> 32;
    if (!st->waiting) {
        if ((d[0] == 'G' && d[1] == 'E' && d[2] == 'T' && d[3] == ' ') ||
            (d[0] == 'P' && d[1] == 'O' && d[2] == 'S' && d[3] == 'T')) {
            st->waiting = 1;
            st->ts = bpf_ktime_get_ns();
            __builtin_memcpy(st->op, d, 4);
        }
        return 1;
    }
    if (d[0] != 'H' || d[1] != 'T' || d[2] != 'T' || d[3] != 'P' || d[8] != ' ')
        return 1;
    u16 code = (d[9] - '0') * 100 + (d[10] - '0') * 10 + (d[11] - '0');
    st->waiting = 0;
    struct key_t k = {};
    k.tgid = st->tgid;
    k.role = egress;  /* a response sent: this side answered */
    k.port = egress ? sk->src_port : bpf_ntohs(sk->dst_port);
    k.code = code;
    k.family = sk->family;
    u32 ip = sk->dst_ip4;
    __builtin_memcpy(k.raddr, &ip, 4);
    __builtin_memcpy(k.op, st->op, OP_LEN);
    u64 us = (bpf_ktime_get_ns() - st->ts) / 1000;
    k.slot = slot_of(us);
    struct val_t *v = agg.lookup(&k);
    if (!v) {
        struct val_t z = {};
        agg.insert(&k, &z);
        v = agg.lookup(&k);
        if (!v)
            return 1;
    }
    v->count += 1;
    v->sum_us += us;
    if (us > v->max_us)
        v->max_us = us;
    return 1;
}

int http_ingress(struct __sk_buff *skb) { return handle(skb, 0); }
int http_egress(struct __sk_buff *skb) { return handle(skb, 1); }
