"""Requests paired with responses, per connection: the entry point for the capture.

A Connection takes one connection's capture events in timestamp order, guesses its
protocol from the first bytes if not told, and returns each completed Exchange.
Requests wait in a FIFO: a response completes the oldest one, so each pipelined
request is counted once. A request that never gets its response (the connection
closed, events were lost, the parser lost the message boundaries) is counted in
counters.unanswered, never silently dropped. After a loss the FIFO is flushed
(those requests are unanswered) and responses that arrive before the next request
are orphans: without that, a lost response would shift every later pairing by one.
"""
from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

from . import http, mysql, pgwire, resp
from .stream import MAX_BUFFER, REQUEST, RESPONSE

PROTOCOLS = ("http", "resp", "pgwire", "mysql")
OPS = {"http": http.OPS, "resp": resp.OPS, "pgwire": pgwire.OPS, "mysql": mysql.OPS}
STATUS_CLASSES = http.STATUS_CLASSES + ("ok", "error")
DIRECTIONS = ("in", "out")

# Outstanding requests kept per connection; older ones are counted unanswered.
MAX_PENDING = 4096

_PARSERS = {"http": http.HttpParser, "resp": resp.RespParser,
            "pgwire": pgwire.PgParser, "mysql": mysql.MysqlParser}


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request and its response. No payload: no URL, query text or key."""

    protocol: str  # one of PROTOCOLS
    op: str  # one of OPS[protocol]: method, command, or SQL operation class
    error: bool  # a 5xx, an error reply, an ErrorResponse or ERR packet
    status_class: str  # http: "1xx".."5xx" (4xx is not an error); others: "ok" or "error"
    duration_ns: int  # from the request's first byte to the response's last
    path: str | None = None  # http with keep_path=True only: normalised and bounded
    code: int = 0  # http: the status code (100-599); others: 0


@dataclass(slots=True)
class Counters:
    """Plain cumulative counts for one connection (or summed over many)."""

    requests: int = 0  # requests parsed, each pipelined one counted
    exchanges: int = 0  # requests completed by a response
    unanswered: int = 0  # requests whose response never came (close, loss, desync)
    orphan_responses: int = 0  # responses with no outstanding request
    lost_events: int = 0  # capture events the kernel dropped (gap)
    desyncs: int = 0  # times a direction lost the message boundaries and resynced
    truncated: int = 0  # messages whose needed bytes were not captured or over the cap
    aborted: int = 0  # pgwire: Executes skipped after an error in their batch (error exchanges)
    undetected: int = 0  # connections whose protocol was not recognised

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def add(self, other: Counters) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


class Pending:
    """An outstanding request. kind and detail are the parser's own."""

    __slots__ = ("ts", "op", "kind", "detail", "path", "counted", "error")

    def __init__(self, ts, op, kind, detail, path, counted):
        self.ts = ts
        self.op = op
        self.kind = kind
        self.detail = detail
        self.path = path
        self.counted = counted
        self.error = False


class Pairing:
    """The FIFO of outstanding requests of one connection, and its counters."""

    def __init__(self, protocol: str, counters: Counters | None = None, max_pending: int = MAX_PENDING):
        self.protocol = protocol
        self.counters = counters if counters is not None else Counters()
        self.max_pending = max_pending
        self.pending: deque[Pending] = deque()
        self._done: list[Exchange] = []
        self._cut: list[str] = []  # ops of requests outstanding when the connection ended

    def request(self, ts: int, op: str, *, kind=None, detail="", path=None, counted=True) -> Pending:
        """A request was sent. counted=False for a marker (a pgwire Sync)."""
        if len(self.pending) >= self.max_pending:
            self._unanswered(self.pending.popleft())
        p = Pending(ts, op, kind, detail, path, counted)
        self.pending.append(p)
        if counted:
            self.counters.requests += 1
        return p

    def head(self) -> Pending | None:
        return self.pending[0] if self.pending else None

    def pop(self) -> Pending | None:
        return self.pending.popleft() if self.pending else None

    def respond(self, ts: int, *, error: bool, status_class: str, code: int = 0) -> Exchange | None:
        """A response ended at ts: it completes the oldest outstanding request."""
        p = self.pop()
        if p is None:
            self.counters.orphan_responses += 1
            return None
        if not p.counted:
            return None
        ex = Exchange(self.protocol, p.op, error, status_class, max(0, ts - p.ts), p.path, code)
        self.counters.exchanges += 1
        self._done.append(ex)
        return ex

    def flush(self, ended: bool = False) -> None:
        """Give up on every outstanding request: they are unanswered. ended: because
        the connection ended (closed or reset) before their responses came, which for
        the side that sent them is a failed request (take_cut() names their ops); else
        because the capture lost the message boundaries."""
        while self.pending:
            p = self.pending.popleft()
            self._unanswered(p)
            if ended and p.counted:
                self._cut.append(p.op)

    def _unanswered(self, p: Pending) -> None:
        if p.counted:
            self.counters.unanswered += 1

    def take(self) -> list[Exchange]:
        done, self._done = self._done, []
        return done

    def take_cut(self) -> list[str]:
        """The ops of requests outstanding when the connection ended, since last taken."""
        cut, self._cut = self._cut, []
        return cut


def detect(data: bytes) -> tuple[str, str | None]:
    """Guess a connection's protocol from the first bytes one side sent.

    Returns (protocol, sender): sender is "client" or "server" (MySQL's server
    speaks first; an HTTP status line means the request was missed), or
    ("unknown", None).
    """
    data = bytes(data[:512])
    if http.looks_like_request(data):
        return "http", "client"
    if http.looks_like_response(data):
        return "http", "server"
    if pgwire.looks_like_startup(data):
        return "pgwire", "client"
    if mysql.looks_like_handshake(data):
        return "mysql", "server"
    if resp.looks_like_request(data):
        return "resp", "client"
    return "unknown", None


class Connection:
    """One connection's capture: feed events in timestamp order, get Exchanges back.

    protocol: one of PROTOCOLS, or None to detect it from the first bytes.
    requests: the direction ("in" or "out") carrying requests, or None to infer it
    (the observed process is the client when it sends the requests).
    keep_path: http only: also report the normalised request path.
    """

    # Detection waits for this many bytes from the side that speaks first (or for
    # its first message to end: a hole, or the other side answering), buffering at
    # most DETECT_EVENTS events, which are then parsed as usual.
    DETECT_BYTES = 64
    DETECT_EVENTS = 16

    def __init__(self, protocol: str | None = None, *, requests: str | None = None,
                 keep_path: bool = False, max_buffer: int = MAX_BUFFER,
                 counters: Counters | None = None):
        if protocol is not None and protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)} or None")
        if requests is not None and requests not in DIRECTIONS:
            raise ValueError(f"requests must be 'in' or 'out', not {requests!r}")
        self.protocol = protocol
        self.counters = counters if counters is not None else Counters()
        self._requests = requests
        self._keep_path = keep_path
        self._max_buffer = max_buffer
        self._parser = None
        self._pairing: Pairing | None = None
        self._early: list[tuple] = []  # events held while the protocol is detected
        if protocol is not None and requests is not None:
            self._start(protocol, requests)

    @property
    def request_direction(self) -> str | None:
        """"in" when the observed process answers requests (a server), "out" when it
        sends them, None until known."""
        return self._requests

    def feed(self, ts: int, direction: str, prefix: bytes, true_len: int) -> list[Exchange]:
        """One captured syscall: prefix is what was captured, true_len its return value."""
        _check(direction)
        if true_len < len(prefix):
            raise ValueError(f"true_len {true_len} is shorter than the {len(prefix)} captured bytes")
        if self._parser is None:
            if self.protocol is None:
                return self._hold((ts, direction, bytes(prefix), true_len))
            if self.protocol == "unknown" or not prefix:
                return []
            self._start_told(direction, prefix)
        side = REQUEST if direction == self._requests else RESPONSE
        self._parser.feed(side, ts, prefix, true_len)
        return self._pairing.take()

    def gap(self, ts: int, direction: str, lost: int = 1) -> list[Exchange]:
        """The kernel lost `lost` events of this direction (their bytes and lengths)."""
        _check(direction)
        self.counters.lost_events += lost
        if self._parser is None:
            if self.protocol is None and self._early:
                return self._hold((ts, direction, None, 0))
            return []
        self._parser.gap(REQUEST if direction == self._requests else RESPONSE)
        return self._pairing.take()

    def close(self, ts: int) -> list[Exchange]:
        """The connection closed: a body that ran until the close ends, the rest is unanswered."""
        done = []
        if self._parser is None and self._early:
            done = self._decide(final=True)
        if self._parser is None:
            return done
        self._parser.close(ts)
        return done + self._pairing.take()

    def waiting(self, ts: int, op: str) -> None:
        """A request sent before this Connection took over (the kernel counted the
        connection until then) waits for its response."""
        if self._pairing is None:
            raise ValueError("waiting() needs the protocol and the direction of requests")
        self._pairing.request(ts, op)
        if self.protocol == "http":
            # what the requester sends next may be the rest of that request's body:
            # bytes up to the next request line are passed over, the FIFO kept
            self._parser.resyncing[REQUEST] = True

    def take_cut(self) -> list[str]:
        """The ops of requests that were outstanding when the connection ended (close()):
        no response came, the peer closed or reset the connection (or this process
        closed it). Each is also in counters.unanswered."""
        return self._pairing.take_cut() if self._pairing is not None else []

    def _hold(self, event: tuple) -> list[Exchange]:
        self._early.append(event)
        return self._decide(final=len(self._early) >= self.DETECT_EVENTS)

    def _decide(self, final: bool) -> list[Exchange]:
        """Detect from the held events; once known, parse them. [] while undecided."""
        speaker = next((ev[1] for ev in self._early if ev[2]), None)
        data = bytearray()
        whole = False  # the first speaker's first message has surely ended
        for _, direction, prefix, true_len in self._early:
            if speaker is None:
                break
            if direction != speaker:
                whole = True  # the other side answered (or lost events): the opening is over
                continue
            if prefix is None or true_len > len(prefix):
                data += prefix or b""
                whole = True
                break
            data += prefix
        protocol, sender = detect(data) if data else ("unknown", None)
        if protocol == "unknown":
            if final or whole or len(data) >= self.DETECT_BYTES:
                self.protocol = "unknown"
                self.counters.undetected += 1
                self._early = []
            return []
        requests = self._requests or (speaker if sender == "client" else _other(speaker))
        self._start(protocol, requests)
        early, self._early = self._early, []
        done = []
        for ts, direction, prefix, true_len in early:
            if prefix is None:
                self._parser.gap(REQUEST if direction == requests else RESPONSE)
                done += self._pairing.take()
            else:
                done += self.feed(ts, direction, prefix, true_len)
        return done

    def _start_told(self, direction: str, prefix: bytes) -> None:
        """The protocol was given: only the direction of requests is inferred."""
        protocol, sender = detect(prefix)
        if protocol != self.protocol:  # the first sender is the usual one
            sender = "server" if self.protocol == "mysql" else "client"
        self._start(self.protocol, self._requests or (direction if sender == "client" else _other(direction)))

    def _start(self, protocol: str, requests: str) -> None:
        self.protocol = protocol
        self._requests = requests
        self._pairing = Pairing(protocol, self.counters)
        kw = {"keep_path": self._keep_path} if protocol == "http" else {}
        self._parser = _PARSERS[protocol](self._pairing, max_buffer=self._max_buffer, **kw)


def _check(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'in' or 'out', not {direction!r}")


def _other(direction: str) -> str:
    return "in" if direction == "out" else "out"
