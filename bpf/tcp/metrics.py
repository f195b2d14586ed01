"""Catalog entries of probe tcp: what it writes, with units and meaning."""
from sonde.ingest.runtime.catalog import COMM, HOST, INTERVAL_NOTE, PID, Field, Measurement, Tag, histogram

ROLE = Tag("role", "`client`: this process opened the connection; `server`: it accepted it; "
                  "`unknown`: the connection predates the agent.")
PEER = Tag("peer", "Remote IP address (IPv4 dotted, IPv6 RFC 5952), or `other` past the top-M peers.")
PORT = Tag("port", "For `client` flows the remote port; for `server` flows the local listening port. "
                   "Client ephemeral ports are never tags.")
STATE = Tag("state", "TCP state, as `ss` names it: ESTABLISHED, SYN_SENT, CLOSE_WAIT, ...")
REASON = Tag("reason", "Why the kernel sent the reset (sk_rst_reason, named from the running kernel's tracefs format).")

FLOW_TAGS = (HOST, PID, COMM, ROLE, PEER, PORT)

_TCP_SOURCE = "sock_diag tcp_info at poll time; sock_ops state callback at CLOSE (probe tcp)"

TCP_TRAFFIC = Measurement(
    name="tcp_traffic",
    kind="delta",
    help="TCP application bytes per process: the tcp_flow bytes of the process summed over its peers. "
         + INTERVAL_NOTE,
    source=_TCP_SOURCE,
    tags=(HOST, PID, COMM),
    fields=(
        Field("tx_bytes", "int", "bytes", "Bytes the process sent that the peers acknowledged (SYN and FIN excluded)."),
        Field("rx_bytes", "int", "bytes", "Bytes the process received in order (the peer's FIN excluded)."),
    ),
)

TCP_FLOW = Measurement(
    name="tcp_flow",
    kind="delta",
    help="TCP connection counters per process and peer endpoint, from the kernel's own per-socket "
         "counters (tcp_info). " + INTERVAL_NOTE,
    source=_TCP_SOURCE + "; tcp:tcp_send_reset, tcp:tcp_receive_reset",
    tags=FLOW_TAGS,
    fields=(
        Field("tx_bytes", "int", "bytes",
              "Application bytes sent to this peer and acknowledged by it (bytes_acked less SYN and FIN)."),
        Field("rx_bytes", "int", "bytes",
              "Application bytes received from this peer in order (bytes_received less its FIN)."),
        Field("tx_unacked_bytes", "int", "bytes",
              "Bytes sent but never acknowledged when the connection ended (reset or abort): lost in flight."),
        Field("rx_segments", "int", "segments", "Segments received (segs_in), pure ACKs included."),
        Field("tx_segments", "int", "segments", "Segments sent (segs_out), retransmits and pure ACKs included."),
        Field("active_opens", "int", "connections", "Connections this process opened that reached ESTABLISHED."),
        Field("passive_opens", "int", "connections", "Connections this process accepted."),
        Field("connect_refused", "int", "connections", "Connects answered with a reset (port closed, or refused)."),
        Field("connect_timeouts", "int", "connections",
              "Connects that failed without a reset: SYN retries exhausted, or abandoned by the caller."),
        Field("closes", "int", "connections", "Established connections that reached CLOSE."),
        Field("retransmits", "int", "segments", "Retransmitted segments (tcp_info total_retrans)."),
        Field("resets_sent", "int", "segments", "Resets this side sent."),
        Field("resets_received", "int", "segments",
              "Resets this side received on connections past SYN_SENT (a reset answering a SYN is connect_refused)."),
    ),
)

TCP_WINDOW = Measurement(
    name="tcp_window",
    kind="gauge",
    help="Round-trip time and windows per process and peer over the interval: one sample per live "
         "connection at each poll (tcp_info). Written only for intervals with samples.",
    source="sock_diag tcp_info at poll time (probe tcp)",
    tags=FLOW_TAGS,
    fields=(
        Field("samples", "int", "sockets", "Live connections sampled this interval."),
        Field("srtt_max_us", "int", "us", "Largest smoothed RTT sampled this interval."),
        Field("srtt_mean_us", "float", "us", "Mean smoothed RTT over the samples."),
        Field("srtt_last_us", "int", "us", "Smoothed RTT of the last sample."),
        Field("snd_cwnd_min", "int", "segments", "Smallest congestion window sampled."),
        Field("snd_cwnd_mean", "float", "segments", "Mean congestion window."),
        Field("snd_cwnd_last", "int", "segments", "Congestion window of the last sample."),
        Field("snd_wnd_min_bytes", "int", "bytes", "Smallest send window (the peer's advertised window)."),
        Field("snd_wnd_mean_bytes", "float", "bytes", "Mean send window."),
        Field("snd_wnd_last_bytes", "int", "bytes", "Send window of the last sample."),
        Field("rcv_wnd_min_bytes", "int", "bytes", "Smallest receive window this side advertised (0 before 6.2)."),
        Field("rcv_wnd_mean_bytes", "float", "bytes", "Mean receive window."),
        Field("rcv_wnd_last_bytes", "int", "bytes", "Receive window of the last sample."),
    ),
)


TCP_SRTT = histogram(
    "tcp_srtt", "Smoothed RTT, one sample per live connection per poll and one per connection at close, "
    "in microseconds", "sock_diag tcp_info; sock_ops at CLOSE (probe tcp)", FLOW_TAGS)
TCP_CONNECT_LATENCY = histogram(
    "tcp_connect_latency", "Connect latency, connect() to ESTABLISHED, in microseconds",
    "sock_ops connect and active-established callbacks (probe tcp)", FLOW_TAGS)
TCP_LIFETIME = histogram(
    "tcp_lifetime", "Connection lifetime, ESTABLISHED to CLOSE, in microseconds",
    "sock_ops established and state callbacks (probe tcp)", FLOW_TAGS)

TCP_STATES = Measurement(
    name="tcp_states",
    kind="gauge",
    help="Sockets per TCP state per process at poll time: the `ss -tan` picture over time "
         "(TIME_WAIT and NEW_SYN_RECV mini-sockets excluded; orphans under pid 0).",
    source="sock_diag dump at poll time (probe tcp)",
    tags=(HOST, PID, COMM, STATE),
    fields=(Field("sockets", "int", "sockets", "Sockets in this state."),),
)

TCP_RESETS_SENT = Measurement(
    name="tcp_resets_sent",
    kind="delta",
    help="Resets sent per process and kernel reason. " + INTERVAL_NOTE,
    source="tcp:tcp_send_reset (probe tcp)",
    tags=(HOST, PID, COMM, REASON),
    fields=(Field("resets", "int", "segments", "Resets sent for this reason."),),
)

MEASUREMENTS = (TCP_TRAFFIC, TCP_FLOW, TCP_WINDOW, *TCP_SRTT, *TCP_CONNECT_LATENCY, *TCP_LIFETIME, TCP_STATES,
                TCP_RESETS_SENT)
