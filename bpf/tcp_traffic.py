"""tcp_traffic: TCP payload bytes and calls per process, IPv4 and IPv6.

Hooks: `sock:sock_send_length` and `sock:sock_recv_length`, which fire in process
context as sock_sendmsg/sock_recvmsg return, with the byte count the caller saw.
Filtered in the kernel to protocol TCP and family AF_INET/AF_INET6; failed calls,
zero-byte calls and MSG_PEEK reads are not counted, so the bytes equal what the
application moved through its sockets.

Off by default: tcp_flow reports the same bytes per process (and per peer), and
with both on every send and receive pays for two programs. Enable this one alone
(`probes: {tcp_traffic: {enabled: true}, tcp_flow: {enabled: false}}`) for the
cheapest per-process view.

Limits:
- Data moved without sendmsg/recvmsg (sendfile, splice, io_uring's direct ops,
  kernel TLS offload) does not pass these tracepoints and is not counted.
- The comm tag is /proc/<pid>/comm while the process lives, else the comm of the
  thread that first used TCP.
- A pid reused before the next poll attributes the old process's last interval to
  the new one (the entry is keyed by pid).
"""
from ingest.probe import CounterMap, Probe

PROBE = Probe(
    name="tcp_traffic",
    doc=__doc__,
    hooks=("sock:sock_send_length", "sock:sock_recv_length"),
    default_enabled=False,
    maps=(
        CounterMap(
            map="tcp_traffic",
            tgid="",  # the key is the tgid itself
            fields={"tx_bytes": "tx_bytes", "rx_bytes": "rx_bytes",
                    "tx_calls": "tx_calls", "rx_calls": "rx_calls"},
            rank_by=("tx_bytes", "rx_bytes"),
        ),
    ),
)
