"""One direction of one connection's captured bytes, and the parser skeleton on top.

The capture keeps at most a prefix of each syscall's data but always reports the
syscall's true length, so a direction is known bytes with holes of known size. A
parser may skip a hole when the framing says how long the message is (an HTTP body
of Content-Length N, a PostgreSQL or MySQL message), but never read from one: a
message head that falls in a hole loses the message boundaries (a desync), and the
parser resyncs the way its protocol allows.
"""
from __future__ import annotations

from collections import deque

REQUEST = "request"
RESPONSE = "response"

# A message head longer than this is not buffered: it is counted truncated and the
# direction resyncs. 64 KiB holds any sane HTTP header block or RESP line.
MAX_BUFFER = 64 * 1024

# Compact the buffer once this many consumed bytes sit at its front.
_COMPACT = 16 * 1024


class Desync(Exception):
    """A direction lost its message boundaries.

    truncated: the bytes needed were not captured, or did not fit the buffer cap.
    flush: whole messages may have been lost, so the outstanding requests can no
    longer be paired and are counted unanswered.
    """

    def __init__(self, reason: str, *, truncated: bool = False, flush: bool = True):
        super().__init__(reason)
        self.truncated = truncated
        self.flush = flush


class Stream:
    """Captured bytes of one direction: a known head, then holes and more bytes."""

    def __init__(self, cap: int = MAX_BUFFER):
        self.cap = cap
        self.ts = 0  # timestamp of the latest chunk fed
        self.clear()

    def clear(self) -> None:
        """Forget everything buffered (after a gap or a desync)."""
        self._buf = bytearray()
        self._off = 0
        # After the first hole: int items are missing byte counts, bytes items are
        # captured bytes. Invariant: when not empty, it starts with an int.
        self._rest: deque[int | bytes] = deque()
        self._marks: deque[tuple[int, int]] = deque()  # (end position, ts) per chunk
        self.pos = 0  # stream position of the head byte
        self._end = 0  # stream position after the last byte fed

    def feed(self, ts: int, prefix: bytes, true_len: int) -> None:
        if true_len < len(prefix):
            raise ValueError(
                f"true_len {true_len} is shorter than the {len(prefix)} captured bytes: "
                "pass the syscall's return value as true_len")
        if true_len <= 0:
            return
        self.ts = ts
        self._end += true_len
        self._marks.append((self._end, ts))
        if prefix:
            if self._rest:
                self._append(bytes(prefix))
            else:
                self._buf += prefix
        if true_len > len(prefix):
            self._append(true_len - len(prefix))

    def _append(self, item: int | bytes) -> None:
        if self._rest and type(self._rest[-1]) is type(item):
            self._rest[-1] += item
        else:
            self._rest.append(item)

    @property
    def avail(self) -> int:
        """Known bytes at the head."""
        return len(self._buf) - self._off

    @property
    def blocked(self) -> bool:
        """True when a hole follows the known head: no more known bytes will join it."""
        return bool(self._rest)

    @property
    def head_ts(self) -> int:
        """Timestamp of the chunk holding the head byte (when a message started)."""
        marks = self._marks
        while marks and marks[0][0] <= self.pos:
            marks.popleft()
        return marks[0][1] if marks else self.ts

    def peek(self, n: int | None = None) -> bytes:
        """Up to n known bytes at the head (all of them when n is None), not consumed."""
        end = len(self._buf) if n is None else min(len(self._buf), self._off + n)
        return bytes(self._buf[self._off:end])

    def need(self, n: int) -> bytes | None:
        """Exactly n known bytes, or None until they arrive.

        Raises Desync when they can never arrive: they fall in a hole, or n is over the cap.
        """
        if self.avail >= n:
            return self.peek(n)
        if n > self.cap:
            raise Desync(f"a {n}-byte message head is over the {self.cap}-byte buffer", truncated=True)
        if self._rest:
            raise Desync("bytes the parser needs were not captured", truncated=True)
        return None

    def find(self, sub: bytes, limit: int | None = None) -> int:
        """Offset of sub in the known head (within its first limit bytes), or -1."""
        end = len(self._buf) if limit is None else min(len(self._buf), self._off + limit)
        i = self._buf.find(sub, self._off, end)
        return i - self._off if i >= 0 else -1

    def rfind(self, sub: bytes) -> int:
        i = self._buf.rfind(sub, self._off)
        return i - self._off if i >= 0 else -1

    def search(self, pattern, limit: int | None = None) -> tuple[int, int] | None:
        """(start, end) offsets of a compiled bytes regex's first match in the known head."""
        end = len(self._buf) if limit is None else min(len(self._buf), self._off + limit)
        m = pattern.search(self._buf, self._off, end)
        return (m.start() - self._off, m.end() - self._off) if m else None

    def line(self, limit: int, sep: bytes = b"\r\n", *, truncated: bool = False) -> bytes | None:
        """The next line without its terminator (not consumed), or None until it arrives.

        Raises Desync when no terminator comes within limit bytes, or a hole cuts the line.
        """
        i = self.find(sep, limit + len(sep))
        if i >= 0:
            return self.peek(i)
        if self.avail >= limit + len(sep):
            raise Desync(f"no line end within {limit} bytes", truncated=truncated)
        if self._rest:
            raise Desync("a line was cut by the capture", truncated=True)
        return None

    def consume(self, n: int) -> None:
        """Drop n known bytes from the head."""
        if n > self.avail:
            raise AssertionError(f"consume({n}) with {self.avail} known bytes")  # a parser bug
        self._off += n
        self.pos += n
        self._settle()

    def skip(self, n: int) -> int:
        """Skip up to n bytes, captured or not; returns how many were fed to skip."""
        done = min(n, self.avail)
        self._off += done
        rest = self._rest
        while done < n and rest:
            item = rest[0]
            size = item if isinstance(item, int) else len(item)
            take = min(n - done, size)
            if take == size:
                rest.popleft()
            else:
                rest[0] = item - take if isinstance(item, int) else item[take:]
            done += take
        self.pos += done
        self._settle()
        return done

    def drop_hole(self) -> bool:
        """With no known bytes left, skip the hole that follows (for resync scans)."""
        if self.avail or not self._rest:
            return False
        self.skip(self._rest[0])  # type: ignore[arg-type]  # the invariant: a hole
        return True

    def _settle(self) -> None:
        if self._off == len(self._buf):
            self._buf.clear()
            self._off = 0
            rest = self._rest
            while rest and not isinstance(rest[0], int):
                self._buf += rest.popleft()
        elif self._off >= _COMPACT:
            del self._buf[:self._off]
            self._off = 0


class Parser:
    """Both directions of one connection for one protocol.

    Subclasses implement step_request/step_response (parse one message or part of
    one; return False when more bytes are needed) and reset(side). After a desync or a
    gap a direction resyncs: by default it drops bytes until a chunk whose start looks
    like a message (plausible), and a response direction also waits until a request
    was seen after the loss, so that the next response starts a message. Protocols
    that can find a message start inside a chunk set scan_resync and implement scan.
    """

    protocol = ""
    scan_resync = False

    def __init__(self, pairing, *, max_buffer: int = MAX_BUFFER):
        self.pairing = pairing
        self.counters = pairing.counters
        self.streams = {REQUEST: Stream(max_buffer), RESPONSE: Stream(max_buffer)}
        self.resyncing = {REQUEST: False, RESPONSE: False}
        self.passive = False  # encrypted, upgraded or subscribed: nothing more to count
        self.reset(REQUEST)
        self.reset(RESPONSE)

    # -- hooks -------------------------------------------------------------

    def reset(self, side: str) -> None:
        raise NotImplementedError

    def step_request(self, s: Stream) -> bool:
        raise NotImplementedError

    def step_response(self, s: Stream) -> bool:
        raise NotImplementedError

    def plausible(self, side: str, head: bytes) -> bool:
        """Could a message start at head (the start of a chunk)?"""
        return False

    def scan(self, side: str, s: Stream) -> bool:
        raise NotImplementedError

    def on_desync(self, side: str, why: Desync) -> None:
        """Called before the direction is reset; may complete a message or clear why.flush."""

    def survives_gap(self, side: str) -> bool:
        """True when lost bytes cannot matter (a body that runs until the close)."""
        return False

    def finish(self, ts: int) -> None:
        """The connection closed: complete what the close completes."""

    # -- driving -----------------------------------------------------------

    def feed(self, side: str, ts: int, prefix: bytes, true_len: int) -> None:
        if self.passive or true_len <= 0:
            return
        if self.resyncing[side] and not self.scan_resync:
            if side == RESPONSE and not self.pairing.pending:
                return  # this output answers requests already given up on
            if not self.plausible(side, bytes(prefix[:64])):
                return
            self.resyncing[side] = False
        self.streams[side].feed(ts, prefix, true_len)
        self._run(side)

    def _run(self, side: str) -> None:
        s = self.streams[side]
        step = self.step_request if side == REQUEST else self.step_response
        while not self.passive:
            try:
                if self.resyncing[side]:
                    if not self.scan(side, s):
                        break
                elif not step(s):
                    break
            except Desync as why:
                self._desync(side, why)
                if not self.scan_resync:
                    break

    def _desync(self, side: str, why: Desync) -> None:
        self.counters.desyncs += 1
        if why.truncated:
            self.counters.truncated += 1
        self.on_desync(side, why)
        s = self.streams[side]
        if self.scan_resync:
            # Step past the point that failed, so the scan cannot match it again.
            if s.avail:
                s.consume(1)
            else:
                s.drop_hole()
        else:
            s.clear()
        if why.flush:
            self.pairing.flush()
        self.reset(side)
        self.resyncing[side] = True

    def gap(self, side: str) -> None:
        """The kernel lost events of this direction: their bytes and length are unknown."""
        if self.passive or self.survives_gap(side):
            return
        self.streams[side].clear()
        self.reset(side)
        self.resyncing[side] = True
        self.pairing.flush()

    def close(self, ts: int) -> None:
        if not self.passive:
            self.finish(ts)
        self.pairing.flush(ended=True)
