"""MySQL / MariaDB client/server protocol (protocol 41, uncompressed).

Packets are a 3-byte little-endian length, a sequence id, and the payload; a
payload of 0xffffff bytes continues in the next packet. The server speaks first
(a handshake v10); the handshake and authentication are not requests. A client
packet with sequence id 0 is a command; each command that gets a response is one
request, completed by the response's last packet:

  command                 op            response                    server counter
  COM_QUERY               SQL class     OK / ERR / result set(s)    Questions, Com_<statement>
  COM_STMT_EXECUTE        its PREPARE's Ok / ERR / binary result    Questions, Com_stmt_execute
  COM_STMT_PREPARE        PREPARE       prepare-OK + defs / ERR     Com_stmt_prepare (not Questions)
  COM_PING                PING          OK                          none (not Questions)
  COM_INIT_DB             INIT_DB       OK / ERR                    Questions, Com_change_db
  COM_STMT_CLOSE          -             none: not a request         Com_stmt_close (not Questions)
  COM_STMT_SEND_LONG_DATA -             none: not a request         Questions, Com_stmt_send_long_data
  COM_QUIT                -             none: not a request         Questions (MariaDB: not skipped)
  others                  COMMAND       one packet, or as needed    Questions, except COM_STATISTICS
                                                                    and COM_STMT_RESET

(From MariaDB's sql_parse.cc: CF_SKIP_QUESTIONS is set for COM_STATISTICS, COM_PING,
COM_STMT_PREPARE, COM_STMT_CLOSE and COM_STMT_RESET.) A COM_QUERY holding several
statements is one request but several Questions. An error is an ERR packet anywhere
in the response. Com_<statement> is counted in mysql_execute_command, which
prepared statements also run: whether an executed prepared SELECT also adds to
Com_select is for the ground-truth test to confirm.

A result set's EOF after its column definitions is absent under CLIENT_DEPRECATE_EOF.
The capability comes from the client's handshake response when it was captured,
else from the packets themselves: a 5-byte 0xfe packet is an EOF, a longer one an
OK (OK_Packet is at least 7 bytes), and a row never starts with 0xfe unless it is a
continued 16 MiB packet. A result set ends at an EOF/OK (0xfe, under 0xffffff
bytes) or an ERR, and more follow while SERVER_MORE_RESULTS_EXISTS is set.

TLS (CLIENT_SSL) and compression (CLIENT_COMPRESS) stop the parsing.
Resync: at the next chunk that starts a command (sequence 0) or a response (1).
"""
from __future__ import annotations

from . import sql
from .stream import REQUEST, RESPONSE, Desync, Parser, Stream

OPS = sql.OPS + ("PREPARE", "PING", "INIT_DB", "COMMAND")

COM_QUIT = 0x01
COM_INIT_DB = 0x02
COM_QUERY = 0x03
COM_FIELD_LIST = 0x04
COM_PING = 0x0E
COM_CHANGE_USER = 0x11
COM_BINLOG_DUMP = 0x12
COM_STMT_PREPARE = 0x16
COM_STMT_EXECUTE = 0x17
COM_STMT_SEND_LONG_DATA = 0x18
COM_STMT_CLOSE = 0x19
COM_STMT_FETCH = 0x1C
COM_BINLOG_DUMP_GTID = 0x1E
COM_STMT_BULK_EXECUTE = 0xFA  # MariaDB

CLIENT_COMPRESS = 0x20
CLIENT_SSL = 0x800
CLIENT_DEPRECATE_EOF = 1 << 24
SERVER_MORE_RESULTS_EXISTS = 0x0008
SERVER_STATUS_CURSOR_EXISTS = 0x0040

_CONTINUED = 0xFFFFFF
_NO_RESPONSE = frozenset({COM_QUIT, COM_STMT_SEND_LONG_DATA, COM_STMT_CLOSE})
_STREAMING = frozenset({COM_BINLOG_DUMP, COM_BINLOG_DUMP_GTID})
_KNOWN = frozenset(range(0x00, 0x20)) | {COM_STMT_BULK_EXECUTE}
_STATEMENTS_MAX = 1024

# What a response to each command looks like.
_SINGLE, _RESULT, _PREPARE, _FIELDS, _ROWS, _AUTH = range(6)
_SHAPE = {
    COM_QUERY: _RESULT, COM_STMT_EXECUTE: _RESULT, COM_STMT_BULK_EXECUTE: _RESULT,
    COM_STMT_PREPARE: _PREPARE, COM_FIELD_LIST: _FIELDS, COM_STMT_FETCH: _ROWS,
    COM_CHANGE_USER: _AUTH,
}
# Where the parser is inside a response.
(_IDLE, _FIRST, _COLUMNS, _AFTER_COLUMNS, _RESULT_ROWS, _DEFS, _AFTER_DEFS, _FIELD_DEFS,
 _AUTHENTICATING) = range(9)


class MysqlParser(Parser):
    protocol = "mysql"

    def __init__(self, pairing, **kw):
        self._phase = "handshake"  # then "auth", then "command"
        self._hello_seen = False
        self._deprecate_eof: bool | None = None
        self._statements: dict[int, str] = {}
        self._last_prepared = "UNKNOWN"
        super().__init__(pairing, **kw)

    def reset(self, side: str) -> None:
        if side == REQUEST:
            self._q_skip = 0
            self._q_continued = False
        else:
            self._r_skip = 0
            self._r_continued = False
            self._r_state = _IDLE
            self._r_seq: int | None = 0
            self._r_left = 0  # column or parameter definitions still to come
            self._r_defs: list[int] = []  # prepare: definition blocks after the current one
            self._ending: bool | None = None  # the response ends with this packet: its error flag
            self._trailing_eof: int | None = None

    def on_desync(self, side: str, why: Desync) -> None:
        self._phase = "command"

    # -- client ------------------------------------------------------------

    def step_request(self, s: Stream) -> bool:
        if self._q_skip:
            self._q_skip -= s.skip(self._q_skip)
            return not self._q_skip
        head = s.need(4)
        if head is None:
            return False
        length = int.from_bytes(head[:3], "little")
        seq = head[3]
        continued = self._q_continued
        if continued or seq != 0:
            # Not a command: authentication, LOCAL INFILE data, or a 16 MiB continuation.
            if not continued and seq == 1 and not self._hello_seen and self._phase != "command":
                caps = s.need(4 + min(length, 4))
                if caps is None:
                    return False
                self._hello(caps[4:], length)
                if self.passive:
                    return False
        else:
            if length == 0:
                raise Desync("an empty command packet")
            want = 1 + min(length - 1, sql.PEEK)
            if s.avail < 4 + want and not s.blocked:
                return False
            payload = s.peek(4 + want)[4:]
            if not payload:
                raise Desync("a command byte was not captured", truncated=True)
            if len(payload) < want:
                self.counters.truncated += 1  # framing holds: the length is known
            self._command(payload, len(payload) == length, s.head_ts)
        self._q_continued = length == _CONTINUED
        s.consume(4)
        self._q_skip = length
        return True

    def _hello(self, caps: bytes, length: int) -> None:
        """The client's handshake response: its capability flags."""
        self._hello_seen = True
        if len(caps) < 4:
            return  # protocol 320: no 4-byte flags
        flags = int.from_bytes(caps, "little")
        if flags & CLIENT_SSL and length == 32 or flags & CLIENT_COMPRESS:
            self.passive = True  # an SSLRequest (TLS follows), or compressed packets
            return
        self._deprecate_eof = bool(flags & CLIENT_DEPRECATE_EOF)

    def _command(self, payload: bytes, whole: bool, ts: int) -> None:
        cmd = payload[0]
        if cmd not in _KNOWN:
            raise Desync("not a MySQL command")
        if cmd in _STREAMING:
            self.passive = True  # a replication stream, not requests
            return
        if cmd == COM_STMT_CLOSE:
            self._statements.pop(_u32(payload[1:5]), None)
        if cmd in _NO_RESPONSE:
            return
        detail = ""
        if cmd == COM_QUERY:
            op = sql.classify(payload[1:], complete=whole)
        elif cmd in (COM_STMT_EXECUTE, COM_STMT_BULK_EXECUTE):
            stmt = _u32(payload[1:5])
            op = self._last_prepared if stmt == 0xFFFFFFFF else self._statements.get(stmt, "UNKNOWN")
        elif cmd == COM_STMT_PREPARE:
            op, detail = "PREPARE", sql.classify(payload[1:], complete=whole)
        elif cmd == COM_PING:
            op = "PING"
        elif cmd == COM_INIT_DB:
            op = "INIT_DB"
        else:
            op = "COMMAND"
        self.pairing.request(ts, op, kind=_SHAPE.get(cmd, _SINGLE), detail=detail)

    # -- server ------------------------------------------------------------

    def step_response(self, s: Stream) -> bool:
        if self._r_skip:
            self._r_skip -= s.skip(self._r_skip)
            if self._r_skip:
                return False
        if self._ending is not None:  # a response ends with its last byte
            error, self._ending = self._ending, None
            self.pairing.respond(s.ts, error=error, status_class="error" if error else "ok")
            return True
        head = s.need(4)
        if head is None:
            return False
        length = int.from_bytes(head[:3], "little")
        seq = head[3]
        if self._r_continued:  # the rest of a 16 MiB payload
            self._r_continued = length == _CONTINUED
            self._r_seq = seq
            s.consume(4)
            self._r_skip = length
            return True
        want = min(length, 32)
        if s.avail < 4 + want and not s.blocked:
            return False
        payload = s.peek(4 + want)[4:]
        if length and not payload:
            raise Desync("a response packet's first byte was not captured", truncated=True)
        if len(payload) < want:
            self.counters.truncated += 1
        s.consume(4)
        self._packet(seq, length, payload)  # may end the response and reset the state
        self._r_skip = length
        self._r_continued = length == _CONTINUED
        return True

    def _packet(self, seq: int, length: int, p: bytes) -> None:
        first = p[0] if p else -1
        if self._phase == "handshake":
            if seq == 0 and first in (0x0A, 0xFF):
                self._phase = "auth" if first == 0x0A else "handshake"
                return  # the greeting, or a refusal (too many connections)
            self._phase = "command"  # the capture began mid-connection
        if self._phase == "auth":
            if first in (0x00, 0xFF):  # authentication done (or failed: the server closes)
                self._phase = "command"
            return
        if self._r_state == _IDLE:
            self._start(seq, length, first, p)
            return
        if self._r_seq is not None and seq != (self._r_seq + 1) & 0xFF:
            raise Desync("a response packet out of sequence")
        self._r_seq = seq
        self._next(length, first, p)

    def _start(self, seq: int, length: int, first: int, p: bytes) -> None:
        if self._trailing_eof is not None:
            if seq == self._trailing_eof and first == 0xFE and length == 5:
                self._trailing_eof = None  # the end of the previous PREPARE response
                self._deprecate_eof = False
                return
            self._trailing_eof = None
        pending = self.pairing.head()
        if pending is None:
            # E.g. the ERR a killed connection gets: its shape is unknown, so resync.
            self.counters.orphan_responses += 1
            raise Desync("a response with no outstanding command", flush=False)
        if seq != 1:
            raise Desync("a response that does not start at sequence 1")
        self._r_seq = 1
        shape = pending.kind
        if shape == _SINGLE:
            self._done(first == 0xFF)
        elif shape == _AUTH:
            self._r_seq = None  # the client's auth packets interleave
            self._r_state = _AUTHENTICATING
            self._next(length, first, p)
        elif shape == _PREPARE:
            if first != 0x00 or len(p) < 9:
                self._done(first == 0xFF)
                return
            columns = int.from_bytes(p[5:7], "little")
            params = int.from_bytes(p[7:9], "little")
            _remember(self._statements, _u32(p[1:5]), pending.detail)
            self._last_prepared = pending.detail
            self._r_defs = [n for n in (params, columns) if n]
            self._next_defs()
        elif shape == _FIELDS:
            self._r_state = _FIELD_DEFS
            self._next(length, first, p)
        elif shape == _ROWS:
            self._r_state = _RESULT_ROWS
            self._next(length, first, p)
        else:
            self._r_state = _FIRST
            self._next(length, first, p)

    def _next(self, length: int, first: int, p: bytes) -> None:
        state = self._r_state
        if state == _FIRST:  # a result: OK, ERR, LOCAL INFILE, or a column count
            if first == 0xFF:
                self._done(True)
            elif first in (0x00, 0xFE):
                self._end_of_result(length, p)
            elif first == 0xFB:
                self._r_seq = None  # the client sends the file, then the server answers
            else:
                count = _lenenc(p)
                if not count:
                    raise Desync("a bad column count")
                self._r_state, self._r_left = _COLUMNS, count
        elif state in (_COLUMNS, _DEFS):
            if first == 0xFF:
                self._done(True)
                return
            self._r_left -= 1
            if not self._r_left:
                if state == _COLUMNS:
                    self._r_state = _AFTER_COLUMNS
                else:
                    self._after_defs()
        elif state == _AFTER_COLUMNS:
            if first == 0xFE and length == 5:  # the EOF of the column definitions
                self._deprecate_eof = False
                self._r_state = _RESULT_ROWS
                if _u16(p[3:5]) & SERVER_STATUS_CURSOR_EXISTS:
                    self._done(False)  # rows come by COM_STMT_FETCH
                return
            self._deprecate_eof = True
            self._r_state = _RESULT_ROWS
            self._next(length, first, p)
        elif state == _RESULT_ROWS:
            if first == 0xFF:
                self._done(True)
            elif first == 0xFE and length < _CONTINUED:
                self._end_of_result(length, p)
        elif state == _AFTER_DEFS:  # an EOF may close a block of definitions
            self._r_state = _DEFS
            if first == 0xFE and length == 5:
                self._deprecate_eof = False
                self._next_defs()
            else:
                self._deprecate_eof = True
                self._next_defs()
                if self._r_state == _DEFS:
                    self._next(length, first, p)
                else:
                    raise Desync("a packet after the end of a PREPARE response")
        elif state == _FIELD_DEFS:  # column definitions up to an EOF
            if first == 0xFF:
                self._done(True)
            elif first == 0xFE and length < 9:
                self._done(False)
        elif state == _AUTHENTICATING:  # auth switch and more data, up to OK or ERR
            if first in (0x00, 0xFF):
                self._done(first == 0xFF)

    def _end_of_result(self, length: int, p: bytes) -> None:
        status = _u16(p[3:5]) if p[:1] == b"\xfe" and length == 5 else _ok_status(p)
        if status & SERVER_MORE_RESULTS_EXISTS:
            self._r_state = _FIRST  # another result set follows
        else:
            self._done(False)

    def _next_defs(self) -> None:
        """Start the next block of PREPARE definitions, or end the response."""
        if self._r_defs:
            self._r_state, self._r_left = _DEFS, self._r_defs.pop(0)
        else:
            self._done(False)

    def _after_defs(self) -> None:
        if self._deprecate_eof is False:
            self._r_state = _AFTER_DEFS  # the EOF must come
        elif self._r_defs:
            self._r_state = _AFTER_DEFS  # the next packet tells whether an EOF came
        elif self._deprecate_eof:
            self._done(False)
        else:
            # Unknown, and nothing more is due: end now, and drop an EOF that follows.
            self._trailing_eof = (self._r_seq + 1) & 0xFF if self._r_seq is not None else None
            self._done(False)

    def _done(self, error: bool) -> None:
        """The response ends with the current packet: it completes once that is skipped."""
        trailing = self._trailing_eof
        self.reset(RESPONSE)
        self._trailing_eof = trailing
        self._ending = error

    def plausible(self, side: str, head: bytes) -> bool:
        if len(head) < 5:
            return False
        length = int.from_bytes(head[:3], "little")
        if side == REQUEST:
            return head[3] == 0 and length >= 1 and head[4] in _KNOWN
        return head[3] == 1 and length >= 1


def _u16(b: bytes) -> int:
    return int.from_bytes(b[:2], "little") if len(b) >= 2 else 0


def _u32(b: bytes) -> int:
    return int.from_bytes(b[:4], "little") if len(b) >= 4 else -1


def _lenenc(p: bytes, at: int = 0) -> int | None:
    """A length-encoded integer, None if malformed or cut."""
    if len(p) <= at:
        return None
    first = p[at]
    if first < 0xFB:
        return first
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first)
    if size is None or len(p) < at + 1 + size:
        return None
    return int.from_bytes(p[at + 1:at + 1 + size], "little")


def _ok_status(p: bytes) -> int:
    """Status flags of an OK packet: after the header, affected rows and insert id."""
    at = 1
    for _ in range(2):
        if at >= len(p):
            return 0
        first = p[at]
        at += 1 + {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first, 0)
    return _u16(p[at:at + 2])


def _remember(names: dict, key: int, value: str) -> None:
    if key not in names and len(names) >= _STATEMENTS_MAX:
        del names[next(iter(names))]
    names[key] = value


def looks_like_handshake(data: bytes) -> bool:
    """A server's handshake v10 packet (for detection: MySQL's server speaks first)."""
    if len(data) < 8:
        return False
    length = int.from_bytes(data[:3], "little")
    if data[3] != 0 or data[4] != 0x0A or not 20 <= length <= 1024:
        return False
    end = data.find(b"\0", 5, 5 + 64)
    version = data[5:end] if end > 5 else data[5:5 + 64]
    return bool(version) and version[:1].isdigit() and all(0x20 <= c < 0x7F for c in version)
