"""PostgreSQL frontend/backend protocol v3.

What is one request (the unit pg_stat_statements counts as a call):
- a simple Query ('Q'), completed by its ReadyForQuery ('Z'), an error if an
  ErrorResponse ('E') came before it. A Query holding several statements is one
  request (pg_stat_statements counts each statement);
- an Execute ('E' from the frontend), completed by its own CommandComplete ('C'),
  EmptyQueryResponse ('I'), PortalSuspended ('s') or ErrorResponse. Parse, Bind,
  Describe, Close and Flush are not requests: only Execute runs a statement.

Executes are batched up to a Sync ('S'); the backend answers each Execute in order
and the Sync with a ReadyForQuery. After an error the backend skips every message
up to the Sync. So an ErrorResponse completes the oldest outstanding Execute (even
when the failing message was its Parse or Bind), and the Executes after it in that
batch, which never ran and get no reply of their own, complete as errors at the
batch's ReadyForQuery, each also counted in counters.aborted. pg_stat_statements
counts neither: it records only statements that finished.

The operation class comes from the statement text: the Query's, or for an Execute
the Parse of the statement its portal was bound to (statement and portal names
are remembered per connection; an Execute whose Parse was never seen is UNKNOWN).

The startup packet, SSLRequest/GSSENCRequest and authentication are not requests.
An accepted SSLRequest ('S') means TLS from there on: parsing stops.

Resync: at the next chunk that starts with a plausible message header.
"""
from __future__ import annotations

from . import sql
from .stream import REQUEST, Desync, Parser, Stream

OPS = sql.OPS

_FRONTEND = frozenset(b"QPBEDSHCXFdcfp")
_BACKEND = frozenset(b"RKSZTDCIENA123nstGHWdcVv")
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_STARTUP_MAX = 10000
_MESSAGE_MAX = 1 << 30
_NAMES_MAX = 1024  # prepared statements and portals remembered per connection
# The frontend messages that matter, and how much of their body to read: names are
# under 64 bytes, then the SQL keyword.
_PEEK = {0x51: sql.PEEK, 0x50: 64 + sql.PEEK, 0x42: 130, 0x45: 65, 0x43: 66, 0x53: 0}


class PgParser(Parser):
    protocol = "pgwire"

    def __init__(self, pairing, **kw):
        self._startup = True  # the first frontend message is untyped
        self._tls_reply = False  # an SSLRequest/GSSENCRequest awaits its one-byte answer
        self._statements: dict[bytes, str] = {}
        self._portals: dict[bytes, str] = {}
        super().__init__(pairing, **kw)

    def reset(self, side: str) -> None:
        if side == REQUEST:
            self._q_skip = 0
        else:
            self._r_skip = 0
            self._r_kind = 0  # the backend message being skipped, acted on at its end

    def on_desync(self, side: str, why: Desync) -> None:
        if side == REQUEST:
            self._startup = False
        else:
            self._tls_reply = False

    # -- frontend ----------------------------------------------------------

    def step_request(self, s: Stream) -> bool:
        if self._q_skip:
            self._q_skip -= s.skip(self._q_skip)
            return not self._q_skip
        if self._startup and s.need(1) == b"\x00":  # untyped: a length under 16 MiB
            head = s.need(8)
            if head is None:
                return False
            length = int.from_bytes(head[:4], "big")
            code = int.from_bytes(head[4:], "big")
            if code in (_SSL_REQUEST, _GSSENC_REQUEST) and length == 8:
                s.consume(8)
                self._tls_reply = True
                return True
            if code == _CANCEL_REQUEST and length == 16:
                self.passive = True  # a cancel connection carries nothing else
                return False
            self._startup = False
            if code >> 16 == 3 and 8 < length <= _STARTUP_MAX:
                self._q_skip = length
                return True
        elif self._startup and s.avail:
            self._startup = False  # a typed message: the capture began mid-connection
        head = s.need(5)
        if head is None:
            return False
        kind = head[0]
        length = int.from_bytes(head[1:5], "big", signed=True)
        if kind not in _FRONTEND or not 4 <= length <= _MESSAGE_MAX:
            raise Desync("not a PostgreSQL frontend message")
        want = _PEEK.get(kind)
        if want is not None:
            body_len = length - 4
            want = min(want, body_len)
            if s.avail < 5 + want and not s.blocked:
                return False
            body = s.peek(5 + want)[5:]
            if len(body) < want:
                self.counters.truncated += 1  # framing holds: the length is known
            self._frontend(kind, body, len(body) == body_len, s.head_ts)
        s.consume(5)
        self._q_skip = length - 4
        return True

    def _frontend(self, kind: int, body: bytes, whole: bool, ts: int) -> None:
        if kind == 0x51:  # Q
            op = sql.classify(body, complete=whole) if body else "UNKNOWN"
            self.pairing.request(ts, op, kind="query")
        elif kind == 0x50:  # P: statement name, query text
            name, rest = _cstring(body)
            if name is not None:
                op = sql.classify(rest, complete=whole) if rest or whole else "UNKNOWN"
                _remember(self._statements, name, op)
        elif kind == 0x42:  # B: portal name, statement name
            portal, rest = _cstring(body)
            statement, _ = _cstring(rest)
            if portal is not None:
                op = self._statements.get(statement, "UNKNOWN") if statement is not None else "UNKNOWN"
                _remember(self._portals, portal, op)
        elif kind == 0x45:  # E: portal name
            portal, _ = _cstring(body)
            op = self._portals.get(portal, "UNKNOWN") if portal is not None else "UNKNOWN"
            self.pairing.request(ts, op, kind="execute")
        elif kind == 0x53:  # S
            self.pairing.request(ts, "", kind="sync", counted=False)
        elif kind == 0x43 and body:  # C: 'S' statement or 'P' portal, name
            name, _ = _cstring(body[1:])
            names = self._statements if body[0] == 0x53 else self._portals
            names.pop(name, None)

    # -- backend -----------------------------------------------------------

    def step_response(self, s: Stream) -> bool:
        if self._r_kind:
            self._r_skip -= s.skip(self._r_skip)
            if self._r_skip:
                return False
            kind, self._r_kind = self._r_kind, 0
            self._backend(kind, s.ts)  # a response ends with its last byte
            return True
        if self._tls_reply:
            answer = s.need(1)
            if answer is None:
                return False
            self._tls_reply = False
            if answer in (b"S", b"G"):
                self.passive = True  # TLS or GSSAPI encryption from here on
                return False
            if answer == b"N":
                s.consume(1)
                return True
            # Anything else is a (pre-9.x) server's ErrorResponse: a typed message.
        head = s.need(5)
        if head is None:
            return False
        kind = head[0]
        length = int.from_bytes(head[1:5], "big", signed=True)
        if kind not in _BACKEND or not 4 <= length <= _MESSAGE_MAX:
            raise Desync("not a PostgreSQL backend message")
        s.consume(5)
        self._r_skip = length - 4
        self._r_kind = kind
        return True

    def _backend(self, kind: int, ts: int) -> None:
        pairing = self.pairing
        head = pairing.head()
        if kind in (0x43, 0x49, 0x73):  # C, I, s: one Execute done (a Query waits for Z)
            if head is None:
                self.counters.orphan_responses += 1
            elif head.kind == "execute":
                pairing.respond(ts, error=False, status_class="ok")
        elif kind == 0x45:  # E
            if head is not None and head.kind == "execute":
                pairing.respond(ts, error=True, status_class="error")
            elif head is not None and head.kind == "query":
                head.error = True
        elif kind == 0x5A:  # Z
            while head is not None and head.kind == "execute":  # skipped after an error
                self.counters.aborted += 1
                pairing.respond(ts, error=True, status_class="error")
                head = pairing.head()
            if head is not None and head.kind == "sync":
                pairing.pop()
            elif head is not None and head.kind == "query":
                pairing.respond(ts, error=head.error, status_class="error" if head.error else "ok")

    def plausible(self, side: str, head: bytes) -> bool:
        if len(head) < 5:
            return False
        length = int.from_bytes(head[1:5], "big", signed=True)
        kinds = _FRONTEND if side == REQUEST else _BACKEND
        return head[0] in kinds and 4 <= length <= _MESSAGE_MAX


def _cstring(data: bytes) -> tuple[bytes | None, bytes]:
    """(the NUL-terminated string at the start, the rest); None when not terminated."""
    i = data.find(b"\0")
    return (data[:i], data[i + 1:]) if i >= 0 else (None, b"")


def _remember(names: dict, key: bytes, value: str) -> None:
    if key not in names and len(names) >= _NAMES_MAX:
        del names[next(iter(names))]
    names[key] = value


def looks_like_startup(data: bytes) -> bool:
    """A StartupMessage, SSLRequest, GSSENCRequest or CancelRequest (for detection)."""
    if len(data) < 8:
        return False
    length = int.from_bytes(data[:4], "big")
    code = int.from_bytes(data[4:8], "big")
    if code in (_SSL_REQUEST, _GSSENC_REQUEST):
        return length == 8
    if code == _CANCEL_REQUEST:
        return length == 16
    return code >> 16 == 3 and 8 < length <= _STARTUP_MAX and (len(data) < length or data[length - 1] == 0)
