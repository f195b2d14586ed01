"""HTTP/1.x: requests and responses, pipelined, with bodies skipped by their framing.

A request is counted when its head has been read; a response completes it when the
response's last body byte has gone by (the body need not have been captured: its
length is enough). Interim responses (100 Continue, 103) do not complete a request.
101 Switching Protocols and a 2xx answer to CONNECT end the parsing: what follows
is not HTTP/1.

Resync: scan for the next request line (`GET /x HTTP/1.1`) or status line
(`HTTP/1.1 200`), in the known bytes after the point that failed.
"""
from __future__ import annotations

import re

from .stream import REQUEST, RESPONSE, Desync, Parser, Stream

METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
OPS = METHODS + ("OTHER",)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# The error codes kept exactly (l7_http_errors' status tag): the IANA registry's 4xx and
# 5xx, and nginx's own (444 no response, 494-497 bad TLS or header, 499 client closed).
# Any other code is written as its class, so the tag has at most 51 values.
ERROR_CODES = frozenset((*range(400, 419), *range(421, 427), 428, 429, 431, 451, 444, 494, 495, 496, 497, 499,
                         *range(500, 509), 510, 511))

# A normalised path is cut to this many characters.
PATH_LIMIT = 96
_LINE_LIMIT = 8192 + 32

_REQUEST_LINE = re.compile(rb"([A-Z][A-Z_-]{0,19}) ([^ \r\n]{1,8192}) HTTP/1\.[0-9]\r?\Z")
_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] ([1-5][0-9][0-9])(?:[ \t][^\r\n]*)?\r?\Z")
_REQUEST_START = re.compile(
    rb"(?:" + b"|".join(m.encode() for m in METHODS) + rb") [^ \r\n]{1,8192} HTTP/1\.[01]\r?\n")
_RESPONSE_START = re.compile(rb"HTTP/1\.[01] [1-5][0-9][0-9][ \r]")
_HEAD_END = re.compile(rb"\n\r?\n")

# Body framing states (one per direction).
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILERS, _UNTIL_CLOSE = range(6)


class _Message:
    __slots__ = ("state", "left", "code")

    def __init__(self):
        self.state = _HEAD
        self.left = 0
        self.code = 0


class HttpParser(Parser):
    protocol = "http"
    scan_resync = True

    def __init__(self, pairing, *, keep_path: bool = False, **kw):
        self.keep_path = keep_path
        super().__init__(pairing, **kw)

    def reset(self, side: str) -> None:
        if side == REQUEST:
            self._req = _Message()
        else:
            self._resp = _Message()

    # -- requests ----------------------------------------------------------

    def step_request(self, s: Stream) -> bool:
        m = self._req
        if m.state != _HEAD:
            if not _read_body(s, m):
                return False
            m.state = _HEAD
            return True
        ts = s.head_ts
        try:
            head = _head(s, _REQUEST_LINE)
        except Desync as why:
            # A head larger than the capture: count the request if its line was captured.
            first = _first_line(s)
            match = first and _REQUEST_LINE.match(first)
            if match:
                self._request(ts, match)
                why.flush = False
            raise
        if head is None:
            return False
        match, lines = head
        length, chunked, te = _framing(lines)
        self._request(ts, match)
        if chunked:
            m.state = _CHUNK_SIZE
        elif te:
            m.state = _UNTIL_CLOSE  # an unknown transfer coding: the server must close
        elif length:
            m.state, m.left = _LENGTH, length
        return True

    def _request(self, ts: int, match: re.Match) -> None:
        method = match[1].decode()
        path = normalise_path(match[2]) if self.keep_path else None
        self.pairing.request(ts, method if method in METHODS else "OTHER", path=path)

    # -- responses ---------------------------------------------------------

    def step_response(self, s: Stream) -> bool:
        m = self._resp
        if m.state != _HEAD:
            if not _read_body(s, m):
                return False
            self._complete(s.ts)
            return True
        try:
            head = _head(s, _STATUS_LINE)
        except Desync as why:
            match = _STATUS_LINE.match(_first_line(s) or b"")
            if match:  # a head larger than the capture: the status is enough
                m.code = int(match[1])
                self._complete(s.ts)
                why.flush = False
            raise
        if head is None:
            return False
        match, lines = head
        code = int(match[1])
        length, chunked, te = _framing(lines)
        if code < 200 and code != 101:
            return True  # interim: the final response follows
        m.code = code
        pending = self.pairing.head()
        method = pending.op if pending else "GET"
        if code == 101 or (method == "CONNECT" and code < 300):
            self._complete(s.ts)
            self.passive = True  # a tunnel or another protocol from here on
            return False
        if method == "HEAD" or code in (204, 304):
            self._complete(s.ts)
        elif chunked:
            m.state = _CHUNK_SIZE
        elif te or length is None:
            m.state = _UNTIL_CLOSE  # RFC 9112 6.3: the body runs until the connection closes
        elif length:
            m.state, m.left = _LENGTH, length
        else:
            self._complete(s.ts)
        return True

    def _complete(self, ts: int) -> None:
        code = self._resp.code
        self.pairing.respond(ts, error=code >= 500, status_class=f"{code // 100}xx", code=code)
        self._resp = _Message()

    # -- losses ------------------------------------------------------------

    def on_desync(self, side: str, why: Desync) -> None:
        m = self._req if side == REQUEST else self._resp
        if m.state == _HEAD:
            return
        # The head was read: the message is counted; only its body framing was lost.
        if side == RESPONSE:
            self._complete(self.streams[RESPONSE].ts)
        why.flush = False

    def survives_gap(self, side: str) -> bool:
        return side == RESPONSE and self._resp.state == _UNTIL_CLOSE

    def finish(self, ts: int) -> None:
        if self._resp.state == _UNTIL_CLOSE:
            self._complete(self.streams[RESPONSE].ts)  # the last byte, not the close

    def scan(self, side: str, s: Stream) -> bool:
        found = s.search(_REQUEST_START if side == REQUEST else _RESPONSE_START)
        if found is not None:
            s.consume(found[0])
            self.resyncing[side] = False
            return True
        if s.blocked:  # nothing here: go on after the hole
            s.consume(s.avail)
            s.drop_hole()
            return True
        # Keep the unfinished last line: a start line may be arriving.
        keep_from = max(s.rfind(b"\n") + 1, s.avail - _LINE_LIMIT)
        s.consume(keep_from)
        return False


def _head(s: Stream, start_line: re.Pattern) -> tuple[re.Match, list[bytes]] | None:
    """The start line's match and the header lines once the head is complete (then
    consumed), or None until it is. Raises Desync, consuming nothing, when the bytes
    are not an HTTP/1 message of that kind or the head cannot be read whole."""
    found = s.search(_HEAD_END, s.cap)
    if found is not None:
        lines = [line.rstrip(b"\r") for line in s.peek(found[1]).split(b"\n")[:-2]]
        match = start_line.match(lines[0]) if lines else None
        if not match:
            raise Desync("not an HTTP/1 start line")
        s.consume(found[1])
        return match, lines
    first = _first_line(s)
    if first is not None and not start_line.match(first):
        raise Desync("not an HTTP/1 start line")
    if s.avail and not 0x41 <= s.peek(1)[0] <= 0x5A:
        raise Desync("not an HTTP/1 message")
    if s.avail >= s.cap:
        raise Desync("message head over the buffer cap", truncated=True)
    if s.blocked:
        raise Desync("message head longer than the capture", truncated=True)
    return None


def _first_line(s: Stream) -> bytes | None:
    i = s.find(b"\n", _LINE_LIMIT)
    return s.peek(i).rstrip(b"\r") if i >= 0 else None


def _framing(lines: list[bytes]) -> tuple[int | None, bool, bool]:
    """(Content-Length, chunked, another Transfer-Encoding).

    Connection: close does not matter: a response without a length runs until the
    close whatever it says (RFC 9112 6.3), and one with a length ends there.
    """
    length = None
    chunked = te = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        value = value.strip()
        if name == b"content-length":
            if not value.isdigit() or len(value) > 18:
                raise Desync("bad Content-Length")
            n = int(value)
            if length is not None and n != length:
                raise Desync("conflicting Content-Length")
            length = n
        elif name == b"transfer-encoding":
            last = value.lower().rsplit(b",", 1)[-1].strip()
            chunked = last == b"chunked"
            te = not chunked
    if chunked or te:
        length = None  # Transfer-Encoding overrides Content-Length
    return length, chunked, te


def _read_body(s: Stream, m: _Message) -> bool:
    """Go through the body; True once it is over, False when more bytes are needed."""
    while True:
        if m.state in (_LENGTH, _CHUNK_DATA):
            m.left -= s.skip(m.left)
            if m.left:
                return False
            if m.state == _LENGTH:
                return True
            m.state = _CHUNK_SIZE
        elif m.state == _CHUNK_SIZE:
            line = s.line(1024)
            if line is None:
                return False
            size = line.split(b";", 1)[0].strip()
            if not size or len(size) > 15 or size.strip(b"0123456789abcdefABCDEF"):
                raise Desync("bad chunk size")
            s.consume(len(line) + 2)
            if int(size, 16):
                m.state, m.left = _CHUNK_DATA, int(size, 16) + 2  # the data and its CRLF
            else:
                m.state = _TRAILERS
        elif m.state == _TRAILERS:
            line = s.line(8192)
            if line is None:
                return False
            s.consume(len(line) + 2)
            if not line:
                return True
        else:  # _UNTIL_CLOSE
            s.skip(1 << 62)  # whatever came, holes included
            return False


def normalise_path(target: bytes, limit: int = PATH_LIMIT) -> str:
    """A request target as a low-cardinality path: no query string, ids as ':id'."""
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    if path.startswith((b"http://", b"https://")):  # absolute form (a proxy request)
        parts = path.split(b"/", 3)
        path = b"/" + (parts[3] if len(parts) > 3 else b"")
    if path == b"*":
        return "*"
    if not path.startswith(b"/"):
        return ":authority"  # CONNECT host:port
    text = path.decode("ascii", "replace")
    segments = [":id" if _is_id(seg) else seg for seg in text.split("/")]
    return "/".join(segments)[:limit]


_ID = re.compile(r"[0-9]+|[0-9a-fA-F]*[0-9][0-9a-fA-F]*|[0-9a-fA-F-]{16,}")


def _is_id(segment: str) -> bool:
    if not segment:
        return False
    if len(segment) > 32 or not segment.isprintable() or "\ufffd" in segment:
        return True
    if segment.isdigit():
        return True
    return len(segment) >= 8 and _ID.fullmatch(segment) is not None


def looks_like_request(data: bytes) -> bool:
    """The start of an HTTP/1 request (for protocol detection)."""
    method, sep, rest = data[:16].partition(b" ")
    if not sep or method.decode("latin-1") not in METHODS:
        return False
    eol = data.find(b"\n")
    return eol < 0 or _REQUEST_LINE.match(data[:eol]) is not None


def looks_like_response(data: bytes) -> bool:
    return _RESPONSE_START.match(data) is not None


def status_tag(code: int) -> str | None:
    """An error status as a tag value: the code when registered (ERROR_CODES), else its
    class ("4xx", "5xx"); None below 400 (not an error status)."""
    if code < 400 or code > 599:
        return None
    return str(code) if code in ERROR_CODES else f"{code // 100}xx"
