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
from typing import NamedTuple

from sonde.ingest.runtime import keys

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
# inet_diag_msg: family, state, timer, retrans, sport, dport (network order), src, dst,
# if, cookie[2], expires, rqueue, wqueue, uid, inode
_MSG = struct.Struct("=BBBB2s2s16s16sIIIIIIII")
_MSG_LEN = 72
_NLA = struct.Struct("=HH")

# struct tcp_info fields, read in one unpack from offset 68 (tcpi_rtt) to 236 (tcpi_rcv_wnd, 6.2+):
# rtt, snd_cwnd (80), total_retrans (100), bytes_acked (120), bytes_received (128),
# segs_out (136), segs_in (140), snd_wnd (228, 5.4+), rcv_wnd (232, 6.2+)
_INFO_FULL = struct.Struct("=I8xI16xI16xQQII84xII")
_INFO_NO_RCV_WND = struct.Struct("=I8xI16xI16xQQII84xI")
_INFO_MIN = struct.Struct("=I8xI16xI16xQQII")
_INFO_OFF = 68


class TcpSock(NamedTuple):
    family: int
    state: int
    sport: int
    dport: int
    src: bytes   # 4 or 16 bytes
    dst: bytes
    cookie: int
    uid: int
    inode: int
    has_info: bool
    info_state: int = 0  # tcpi_state: read with the counters, later than `state` in the same message
    rtt_us: int = 0
    snd_cwnd: int = 0
    total_retrans: int = 0
    bytes_acked: int = 0
    bytes_received: int = 0
    segs_out: int = 0
    segs_in: int = 0
    snd_wnd: int = 0
    rcv_wnd: int = 0


def request(family: int, states: int = DUMP_STATES, seq: int = 1) -> bytes:
    body = _REQ.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0, states) + bytes(48)
    return _NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse_tcp_info(raw: bytes, off: int = 0, end: int | None = None) -> tuple[int, ...]:
    """(rtt_us, snd_cwnd, total_retrans, bytes_acked, bytes_received, segs_out, segs_in,
    snd_wnd, rcv_wnd) from a struct tcp_info; fields the kernel did not send are 0."""
    n = (len(raw) if end is None else end) - off
    base = off + _INFO_OFF
    if n >= 236:
        return _INFO_FULL.unpack_from(raw, base)
    if n >= 232:
        return _INFO_NO_RCV_WND.unpack_from(raw, base) + (0,)
    if n >= 144:
        return _INFO_MIN.unpack_from(raw, base) + (0, 0)
    return (0,) * 9


class DumpError(Exception):
    pass


def parse_dump(data: bytes) -> tuple[list[TcpSock], bool]:
    """(sockets, done) from a buffer of netlink messages. Raises DumpError on NLMSG_ERROR."""
    socks = []
    off = 0
    done = False
    size = len(data)
    unpack_nl, unpack_msg, unpack_nla, port = _NLMSG.unpack_from, _MSG.unpack_from, _NLA.unpack_from, keys.port_be
    while off + 16 <= size:
        length, mtype, _flags, _seq, _pid = unpack_nl(data, off)
        if length < 16 or off + length > size:
            raise DumpError(f"truncated netlink message ({length} bytes at {off} of {size})")
        body = off + 16
        if mtype == NLMSG_DONE:
            done = True
            break
        if mtype == NLMSG_ERROR:
            err = struct.unpack_from("=i", data, body)[0]
            raise DumpError(f"sock_diag refused the dump: {os.strerror(-err)}")
        if mtype == SOCK_DIAG_BY_FAMILY and length >= 16 + _MSG_LEN:
            (family, state, _timer, _retrans, sport, dport, src, dst, _if, c0, c1, _exp, _rq, _wq, uid,
             inode) = unpack_msg(data, body)
            alen = 4 if family == socket.AF_INET else 16
            a = body + _MSG_LEN
            end = off + length
            info = None
            while a + 4 <= end:
                nla_len, nla_type = unpack_nla(data, a)
                if nla_len < 4:
                    break
                if nla_type & 0x3FFF == INET_DIAG_INFO:
                    info = (data[a + 4],) + parse_tcp_info(data, a + 4, a + nla_len)
                    break
                a += (nla_len + 3) & ~3
            head = (family, state, port(sport), port(dport), src[:alen], dst[:alen], c0 | (c1 << 32), uid, inode)
            socks.append(TcpSock(*head, True, *info) if info is not None else TcpSock(*head, False))
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
