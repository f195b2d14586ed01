"""Redis RESP2 and RESP3: commands, and the replies that complete them.

A request is an array of bulk strings (or an inline command line); its operation is
the command's first word, upper-cased, if it is a Redis command (CLIENT SETNAME is
CLIENT), else OTHER: keys and values never leave the parser. Each pipelined command
is one request. A reply is any RESP value, nested aggregates included; it is an
error when its top-level type is an error (-ERR, -WRONGTYPE, RESP3 !). RESP3 push
messages (>) and attributes (|) complete nothing.

After SUBSCRIBE, PSUBSCRIBE, SSUBSCRIBE or MONITOR the connection carries messages,
not replies: the command is paired with its first reply, then parsing stops.

Resync: at the next chunk that starts like a command (`*3\\r\\n$3\\r\\n`) or a reply.
"""
from __future__ import annotations

import re

from .stream import REQUEST, Desync, Parser, Stream

COMMANDS = frozenset("""
ACL APPEND ASKING AUTH BGREWRITEAOF BGSAVE BITCOUNT BITFIELD BITFIELD_RO BITOP BITPOS
BLMOVE BLMPOP BLPOP BRPOP BRPOPLPUSH BZMPOP BZPOPMAX BZPOPMIN CLIENT CLUSTER COMMAND
CONFIG COPY DBSIZE DEBUG DECR DECRBY DEL DISCARD DUMP ECHO EVAL EVAL_RO EVALSHA
EVALSHA_RO EXEC EXISTS EXPIRE EXPIREAT EXPIRETIME FAILOVER FCALL FCALL_RO FLUSHALL
FLUSHDB FUNCTION GEOADD GEODIST GEOHASH GEOPOS GEORADIUS GEORADIUS_RO GEORADIUSBYMEMBER
GEORADIUSBYMEMBER_RO GEOSEARCH GEOSEARCHSTORE GET GETBIT GETDEL GETEX GETRANGE GETSET
HDEL HELLO HEXISTS HGET HGETALL HINCRBY HINCRBYFLOAT HKEYS HLEN HMGET HMSET HRANDFIELD
HSCAN HSET HSETNX HSTRLEN HVALS INCR INCRBY INCRBYFLOAT INFO KEYS LASTSAVE LATENCY LCS
LINDEX LINSERT LLEN LMOVE LMPOP LOLWUT LPOP LPOS LPUSH LPUSHX LRANGE LREM LSET LTRIM
MEMORY MGET MIGRATE MODULE MONITOR MOVE MSET MSETNX MULTI OBJECT PERSIST PEXPIRE
PEXPIREAT PEXPIRETIME PFADD PFCOUNT PFDEBUG PFMERGE PFSELFTEST PING PSETEX PSUBSCRIBE
PSYNC PTTL PUBLISH PUBSUB PUNSUBSCRIBE QUIT RANDOMKEY READONLY READWRITE RENAME
RENAMENX REPLCONF REPLICAOF RESET RESTORE RESTORE-ASKING ROLE RPOP RPOPLPUSH RPUSH
RPUSHX SADD SAVE SCAN SCARD SCRIPT SDIFF SDIFFSTORE SELECT SET SETBIT SETEX SETNX
SETRANGE SHUTDOWN SINTER SINTERCARD SINTERSTORE SISMEMBER SLAVEOF SLOWLOG SMEMBERS
SMISMEMBER SMOVE SORT SORT_RO SPOP SPUBLISH SRANDMEMBER SREM SSCAN SSUBSCRIBE STRLEN
SUBSCRIBE SUBSTR SUNION SUNIONSTORE SUNSUBSCRIBE SWAPDB SYNC TIME TOUCH TTL TYPE UNLINK
UNSUBSCRIBE UNWATCH WAIT WAITAOF WATCH XACK XADD XAUTOCLAIM XCLAIM XDEL XGROUP XINFO
XLEN XPENDING XRANGE XREAD XREADGROUP XREVRANGE XSETID XTRIM ZADD ZCARD ZCOUNT ZDIFF
ZDIFFSTORE ZINCRBY ZINTER ZINTERCARD ZINTERSTORE ZLEXCOUNT ZMPOP ZMSCORE ZPOPMAX
ZPOPMIN ZRANDMEMBER ZRANGE ZRANGEBYLEX ZRANGEBYSCORE ZRANGESTORE ZRANK ZREM
ZREMRANGEBYLEX ZREMRANGEBYRANK ZREMRANGEBYSCORE ZREVRANGE ZREVRANGEBYLEX
ZREVRANGEBYSCORE ZREVRANK ZSCAN ZSCORE ZUNION ZUNIONSTORE
""".split())
OPS = tuple(sorted(COMMANDS)) + ("OTHER",)

# Commands after whose first reply the connection carries pushed messages.
_SUBSCRIBING = frozenset({"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "MONITOR"})

_INLINE_MAX = 64 * 1024  # Redis's own limit (PROTO_INLINE_MAX_SIZE)
_MAX_ELEMENTS = 1 << 24
_NAME_MAX = 32
_SIMPLE = frozenset(b"+-:_#,(")
_BLOB = frozenset(b"$!=")
_AGGREGATE = frozenset(b"*~>%|")
_COMMAND_START = re.compile(rb"\*[1-9][0-9]{0,7}\r\n\$[0-9]{1,10}\r\n")
_REPLY_START = re.compile(rb"[-+:_#,(][^\r\n]*\r\n|[$!=*~>%|](?:-1|[0-9]{1,10})\r\n")

# Request states.
_START, _ELEMENT, _NAME, _ARGUMENT = range(4)


class RespParser(Parser):
    protocol = "resp"

    def reset(self, side: str) -> None:
        if side == REQUEST:
            self._q_state = _START
            self._q_left = 0  # elements of the command not yet read
            self._q_size = 0  # bytes of the current element still to skip
            self._q_op: str | None = None
            self._q_ts = 0
        else:
            self._stack: list[list] = []  # [values left, is an attribute] per open aggregate
            self._push = False
            self._error = False
            self._skip = 0

    # -- commands ----------------------------------------------------------

    def step_request(self, s: Stream) -> bool:
        state = self._q_state
        if state == _START:
            first = s.need(1)
            if first is None:
                return False
            self._q_ts = s.head_ts
            if first != b"*":
                return self._inline(s)
            line = s.line(16)
            if line is None:
                return False
            n = _integer(line[1:])
            if n is None or n > _MAX_ELEMENTS:
                raise Desync("bad RESP array length")
            s.consume(len(line) + 2)
            if n <= 0:
                return True  # Redis ignores empty and null arrays: no reply
            self._q_left, self._q_op, self._q_state = n, None, _ELEMENT
        elif state == _ELEMENT:
            line = s.line(16)
            if line is None:
                return False
            n = _integer(line[1:])
            if line[:1] != b"$" or n is None or n < 0:
                raise Desync("a command element is not a bulk string")
            s.consume(len(line) + 2)
            self._q_size = n + 2  # the bytes and their CRLF
            first = self._q_op is None
            self._q_state = _NAME if first and n <= _NAME_MAX else _ARGUMENT
            if first and n > _NAME_MAX:
                self._q_op = "OTHER"
        elif state == _NAME:
            data = s.need(self._q_size)
            if data is None:
                return False
            if data[-2:] != b"\r\n":
                raise Desync("bulk string without its CRLF")
            s.consume(self._q_size)
            self._q_op = command(data[:-2])
            return self._element_done()
        else:
            self._q_size -= s.skip(self._q_size)
            if self._q_size:
                return False
            return self._element_done()
        return True

    def _element_done(self) -> bool:
        self._q_left -= 1
        if not self._q_left:
            self.pairing.request(self._q_ts, self._q_op or "OTHER")
            self._q_state = _START
        else:
            self._q_state = _ELEMENT
        return True

    def _inline(self, s: Stream) -> bool:
        line = s.line(_INLINE_MAX, b"\n", truncated=True)
        if line is None:
            return False
        s.consume(len(line) + 1)
        words = line.split()
        if words:  # Redis skips empty lines
            self.pairing.request(self._q_ts, command(words[0]))
        return True

    # -- replies -----------------------------------------------------------

    def step_response(self, s: Stream) -> bool:
        if self._skip:
            self._skip -= s.skip(self._skip)
            if self._skip:
                return False
            self._value_done(s.ts)
            return True
        line = s.line(s.cap - 2, truncated=True)
        if line is None:
            return False
        kind = line[0] if line else -1
        top = not self._stack
        if top:
            self._push = kind == 0x3E  # '>'
            self._error = kind in (0x2D, 0x21)  # '-' or '!'
        if kind in _SIMPLE:
            s.consume(len(line) + 2)
            self._value_done(s.ts)
        elif kind in _BLOB or kind in _AGGREGATE:
            n = _integer(line[1:])
            if n is None or n < -1 or n > _MAX_ELEMENTS and kind in _AGGREGATE:
                raise Desync("bad RESP length")
            s.consume(len(line) + 2)
            if n == -1 or (n == 0 and kind in _AGGREGATE):
                self._value_done(s.ts)  # a null, or an empty aggregate
            elif kind in _BLOB:
                self._skip = n + 2
            else:
                pairs = kind in (0x25, 0x7C)  # '%' map, '|' attribute
                self._stack.append([2 * n if pairs else n, kind == 0x7C])
        else:
            raise Desync("not a RESP type")
        return True

    def _value_done(self, ts: int) -> None:
        stack = self._stack
        while stack:
            top = stack[-1]
            top[0] -= 1
            if top[0] > 0:
                return
            stack.pop()
            if top[1]:
                return  # an attribute annotates the value that follows it
        if self._push:
            return  # out of band: answers no request
        pending = self.pairing.head()
        self.pairing.respond(ts, error=self._error, status_class="error" if self._error else "ok")
        if pending is not None and pending.op in _SUBSCRIBING:
            self.passive = True

    def plausible(self, side: str, head: bytes) -> bool:
        if side == REQUEST:
            return looks_like_request(head)
        return _REPLY_START.match(head) is not None


def command(word: bytes) -> str:
    name = word.upper().decode("latin-1")
    return name if name in COMMANDS else "OTHER"


def _integer(text: bytes) -> int | None:
    if not text or len(text) > 20:
        return None
    digits = text[1:] if text[:1] == b"-" else text
    if not digits.isdigit():
        return None
    return int(text)


def looks_like_request(data: bytes) -> bool:
    """A RESP command array, or an inline Redis command (for detection and resync)."""
    if _COMMAND_START.match(data):
        return True
    word = data[:24].split(b" ", 1)[0].split(b"\r\n", 1)[0]
    return b"\n" in data[:_INLINE_MAX] and 0 < len(word) < 24 and command(word) != "OTHER"
