"""TCP sockets and their tcp_info from NETLINK_SOCK_DIAG: what `ss -tin` reads.

One dump per network namespace per poll gives every TCP socket's 4-tuple, state,
cookie, inode and `struct tcp_info` (INET_DIAG_INFO): counters the kernel keeps
per socket, read at poll time, so nothing runs per send or per segment.

`parse_dump(bytes)` is a pure function of the netlink messages (tested on literal
bytes); `DiagSocket` does the I/O. A diag socket sees only the network namespace
it was created in: `DiagSocket(netns_path)` enters that namespace for the
socket() call only (setns on this thread, then back).

Offsets are the UAPI's (`linux/inet_diag.h`, `linux/tcp.h`), which only grow at
their end; fields past what the running kernel sends read as None.
"""
from __future__ import annotations

import ctypes
import os
import socket
import struct
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
INET_DIAG_INFO = 2
CLONE_NEWNET = 0x40000000

TCP_ESTABLISHED, TCP_SYN_SENT, TCP_SYN_RECV, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_TIME_WAIT, TCP_CLOSE, \
    TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_LISTEN, TCP_CLOSING, TCP_NEW_SYN_RECV = range(1, 13)
STATE_NAMES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
               7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV"}
# Full sockets only: TIME_WAIT and NEW_SYN_RECV entries are mini-sockets with no tcp_info.
DUMP_STATES = sum(1 << s for s in STATE_NAMES if s not in (TCP_TIME_WAIT, TCP_NEW_SYN_RECV))

_NLMSG = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBBI")                 # inet_diag_req_v2 head; then inet_diag_sockid
_SOCKID = struct.Struct(">HH16s16s")           # sport, dport (network order), src, dst
_MSG_HEAD = struct.Struct("=BBBB")             # family, state, timer, retrans
_MSG_TAIL = struct.Struct("=IIIIIII")          # if, cookie[2], expires, rqueue, wqueue, uid, inode: after sockid
_MSG_LEN = 72
_NLA = struct.Struct("=HH")

# struct tcp_info: (name, offset, format)
TCP_INFO_FIELDS = (
    ("rtt_us", 68, "I"), ("snd_cwnd", 80, "I"), ("total_retrans", 100, "I"),
    ("bytes_acked", 120, "Q"), ("bytes_received", 128, "Q"), ("segs_out", 136, "I"), ("segs_in", 140, "I"),
    ("snd_wnd", 228, "I"), ("rcv_wnd", 232, "I"),
)


@dataclass
class TcpSock:
    family: int
    state: int
    sport: int
    dport: int
    src: bytes   # 4 or 16 bytes
    dst: bytes
    cookie: int
    uid: int
    inode: int
    info: dict[str, int | None]


def request(family: int, states: int = DUMP_STATES, seq: int = 1) -> bytes:
    body = _REQ.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0, states) + bytes(48)
    return _NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse_tcp_info(raw: bytes) -> dict[str, int | None]:
    out = {}
    for name, off, fmt in TCP_INFO_FIELDS:
        size = struct.calcsize(fmt)
        out[name] = struct.unpack_from("=" + fmt, raw, off)[0] if len(raw) >= off + size else None
    return out


class DumpError(Exception):
    pass


def parse_dump(data: bytes) -> tuple[list[TcpSock], bool]:
    """(sockets, done) from a buffer of netlink messages. Raises DumpError on NLMSG_ERROR."""
    socks = []
    off = 0
    done = False
    while off + _NLMSG.size <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size or off + length > len(data):
            raise DumpError(f"truncated netlink message ({length} bytes at {off} of {len(data)})")
        body = off + _NLMSG.size
        if mtype == NLMSG_DONE:
            done = True
            break
        if mtype == NLMSG_ERROR:
            err = struct.unpack_from("=i", data, body)[0]
            raise DumpError(f"sock_diag refused the dump: {os.strerror(-err)}")
        if mtype == SOCK_DIAG_BY_FAMILY and length >= _NLMSG.size + _MSG_LEN:
            family, state, _timer, _retrans = _MSG_HEAD.unpack_from(data, body)
            sport, dport, src, dst = _SOCKID.unpack_from(data, body + 4)
            _if, c0, c1, _exp, _rq, _wq, uid = struct.unpack_from("=IIIIIII", data, body + 40)
            inode = struct.unpack_from("=I", data, body + 68)[0]
            alen = 4 if family == socket.AF_INET else 16
            info: dict[str, int | None] = {}
            a = body + _MSG_LEN
            end = off + length
            while a + _NLA.size <= end:
                nla_len, nla_type = _NLA.unpack_from(data, a)
                if nla_len < _NLA.size:
                    break
                if nla_type & 0x3FFF == INET_DIAG_INFO:
                    info = parse_tcp_info(data[a + _NLA.size:a + nla_len])
                a += (nla_len + 3) & ~3
            socks.append(TcpSock(family, state, sport, dport, src[:alen], dst[:alen],
                                 c0 | (c1 << 32), uid, inode, info))
        off += (length + 3) & ~3
    return socks, done


_libc = ctypes.CDLL(None, use_errno=True)


class DiagSocket:
    """A NETLINK_SOCK_DIAG socket, in the network namespace `netns` (a path such as
    /proc/PID/ns/net) or in the agent's own when None."""

    def __init__(self, netns: str | None = None):
        if netns is None:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        else:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            target = os.open(netns, os.O_RDONLY)
            try:
                if _libc.setns(target, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({netns})")
                try:
                    self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
                finally:
                    if _libc.setns(own, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns back to the agent's network namespace")
            finally:
                os.close(target)
                os.close(own)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._seq = 0

    def dump(self) -> list[TcpSock]:
        out: list[TcpSock] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            self._seq += 1
            self.sock.send(request(family, seq=self._seq))
            while True:
                data = self.sock.recv(1 << 18)
                socks, done = parse_dump(data)
                out.extend(socks)
                if done or not data:
                    break
        return out

    def close(self) -> None:
        self.sock.close()
