"""Catalog entries of probe l7: requests, errors and durations per process x peer x
protocol x operation, and what the capture missed."""
from sonde.ingest.runtime.catalog import COMM, HOST, INTERVAL_NOTE, PID, Field, Measurement, Tag, histogram

ROLE = Tag("role", "`server`: this process answered the requests (it received them); `client`: it sent them.")
PEER = Tag("peer", "Remote IP address (IPv4 dotted, IPv6 RFC 5952), or `other` past the top-M peers.")
PORT = Tag("port", "For `server` the local port the requests came to; for `client` the remote port. "
                   "Client ephemeral ports are never tags.")
PROTOCOL = Tag("protocol", "`http` (HTTP/1.x, also over TLS), `resp` (Redis), `pgwire` (PostgreSQL), `mysql` "
                           "(MySQL/MariaDB); in l7_capture also `unknown` (not recognised).")
OP = Tag("op", "Operation class, a closed set per protocol: http the method (GET, POST, ..., OTHER); resp the "
               "command (GET, SET, ..., OTHER); pgwire SELECT, INSERT, UPDATE, DELETE, BEGIN, COMMIT, ROLLBACK, "
               "OTHER, UNKNOWN; mysql those and PREPARE, PING, INIT_DB, COMMAND. Never a URL, key or query text.")

RED_TAGS = (HOST, PID, COMM, ROLE, PEER, PORT, PROTOCOL, OP)
_SOURCE = ("payload prefixes of opted-in processes' socket reads and writes (sock:sock_send_length/"
           "sock_recv_length, or raw_syscalls:sys_enter/sys_exit before 6.3) and libssl uprobes, parsed in the "
           "agent (probe l7, opt-in)")

L7_REQUESTS = Measurement(
    name="l7_requests",
    kind="delta",
    help="Requests answered per process, peer, protocol and operation, counted when the response ends "
         "(each pipelined request on its own). " + INTERVAL_NOTE,
    source=_SOURCE,
    tags=RED_TAGS,
    fields=(
        Field("requests", "int", "requests", "Requests whose response ended this interval."),
        Field("errors", "int", "requests",
              "Of those, errors: http a 5xx status; resp an error reply (-ERR, -WRONGTYPE, ...); pgwire an "
              "ErrorResponse (and the Executes its batch then skipped); mysql an ERR packet."),
        Field("status_1xx", "int", "requests", "http only: responses with a 1xx status."),
        Field("status_2xx", "int", "requests", "http only: responses with a 2xx status."),
        Field("status_3xx", "int", "requests", "http only: responses with a 3xx status."),
        Field("status_4xx", "int", "requests", "http only: responses with a 4xx status (not errors)."),
        Field("status_5xx", "int", "requests", "http only: responses with a 5xx status (errors)."),
        Field("no_response", "int", "requests",
              "Requests outstanding when their connection ended (the peer closed or reset it, or this "
              "process closed it): no response came. Not in `requests`; also in l7_capture.unanswered. "
              "For role=client these are requests the peer failed: a backend that resets connections "
              "shows here, per peer."),
    ),
)

STATUS = Tag("status", "The HTTP error status: the exact code for the IANA-registered 4xx and 5xx and nginx's own "
                       "(444, 494-497, 499), else the class (`4xx`, `5xx`); at most 51 values.")

L7_HTTP_ERRORS = Measurement(
    name="l7_http_errors",
    kind="delta",
    help="HTTP responses with a 4xx or 5xx status, per status code, with the tags of l7_requests (whose "
         "status_4xx/status_5xx fields they add up to). A row only where such responses were seen. " + INTERVAL_NOTE,
    source=_SOURCE,
    tags=RED_TAGS + (STATUS,),
    fields=(Field("responses", "int", "responses", "Responses with this status whose end was seen this interval."),),
)

L7_DURATION = histogram(
    "l7_duration", "Request duration, from the syscall that carried the request's first byte to the one that "
    "carried its response's last, in microseconds", _SOURCE, RED_TAGS)

L7_CAPTURE = Measurement(
    name="l7_capture",
    kind="delta",
    help="What the L7 capture of one process could not count, per protocol: none of these is silent. "
         + INTERVAL_NOTE,
    source=_SOURCE,
    tags=(HOST, PID, COMM, PROTOCOL),
    fields=(
        Field("connections", "int", "connections", "Connections first seen this interval."),
        Field("unanswered", "int", "requests",
              "Requests whose response never came: the connection closed, events were lost, or the parser "
              "lost the message boundaries."),
        Field("orphan_responses", "int", "responses", "Responses with no outstanding request (after a loss)."),
        Field("lost_events", "int", "events",
              "Reads or writes of this process's connections the kernel could not hand over (ring buffer full)."),
        Field("desyncs", "int", "events", "Times a direction lost the message boundaries and resynchronised."),
        Field("truncated", "int", "messages",
              "Messages whose needed bytes were beyond the captured prefix, or over the parser's buffer."),
        Field("aborted", "int", "requests",
              "pgwire: Executes skipped after an error in their batch (counted as errors in l7_requests)."),
        Field("undetected", "int", "connections", "Connections whose protocol was not recognised (not counted)."),
    ),
)

L7_PROBE = Measurement(
    name="l7_probe",
    kind="gauge",
    help="The L7 capture as a whole, one point per poll: what is opted in, whether the syscall hooks are "
         "attached (they are only while a process is opted in), and what the kernel handed over.",
    source="probe l7: its maps, ring buffer and the agent's opt-in state",
    tags=(HOST,),
    fields=(
        Field("opted_in_processes", "int", "processes", "Processes opted in at poll time."),
        Field("hooks_attached", "int", "bool", "1 while the capture hooks (socket or syscall tracepoints) are attached, else 0."),
        Field("tracked_connections", "int", "connections", "Connections the agent parses at poll time."),
        Field("events", "int", "events", "Read/write events handed to the agent this interval."),
        Field("lost_events", "int", "events",
              "Events the kernel dropped this interval because the ring buffer was full (the agent fell behind)."),
        Field("captured_bytes", "int", "bytes", "Payload prefix bytes copied this interval (never written out)."),
        Field("tls_processes", "int", "processes", "Opted-in processes with libssl uprobes attached."),
        Field("kernel_exchanges", "int", "requests",
              "Requests counted in the kernel this interval (HTTP/1.x and Redis connections going one "
              "request at a time: probes.l7.in_kernel), not parsed by the agent; in l7_requests."),
        Field("kernel_dropped", "int", "requests",
              "Requests counted in the kernel that found its aggregation map full: not in l7_requests."),
        Field("throttled_seconds", "float", "seconds",
              "Time the parser waited this interval because it had used its CPU budget "
              "(probes.l7.cpu_percent); events the kernel could not hold meanwhile are lost_events."),
    ),
)

MEASUREMENTS = (L7_REQUESTS, L7_HTTP_ERRORS, *L7_DURATION, L7_CAPTURE, L7_PROBE)
