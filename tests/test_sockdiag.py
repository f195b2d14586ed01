"""The sock_diag parser on literal bytes: no kernel, no root."""
import socket
import struct

import pytest

from sonde.ingest.runtime import sockdiag

pytestmark = [pytest.mark.hot_path]

# One SOCK_DIAG_BY_FAMILY message captured on kernel 6.18 (`ss -ti` showed the same):
# a loopback client socket, ESTABLISHED, 127.0.0.1:36076 -> 127.0.0.1:35281, that
# sent 1000 bytes (bytes_acked 1001: the SYN counts), rtt 23 us, cwnd 11.
CLIENT = bytes.fromhex(
    "9801000014000200010000004e180000020100008cec89d17f0000010000000000000000000000007f00000100000000"
    "0000000000000000000000005ed33c000000000000000000000000000000000000000000f8e947000500080000000000"
    "08000f00000000000c001500010000000000000006001600520000001c010200010000000007aa01e01c030000000000"
    "008a000018020000000000000000000000000000000000000000000030000000000000003000000030000000ffff0000"
    "d7ff0000170000000d000000ffffff7f0b000000cbff00000300000000000000d7ff000000000000eaf50d6108000000"
    "ffffffffffffffffe9030000000000000000000000000000030000000200000000000000080000000000000001000000"
    "00d03607010000000000000000000000000000000000000000000000000000000200000000000000e803000000000000"
    "000000000000000000000000000000000000000000140100000001000000000000000000000000000000000000000000"
    "000000000000000000000000000000000000000000000000")
DONE = struct.pack("=IHHII", 20, sockdiag.NLMSG_DONE, 2, 1, 0) + b"\0" * 4


def test_established_client_socket():
    socks, done = sockdiag.parse_dump(CLIENT + DONE)
    assert done
    assert socks == [sockdiag.TcpSock(
        family=2, state=1, sport=36076, dport=35281, src=b"\x7f\0\0\x01", dst=b"\x7f\0\0\x01", cookie=3986270,
        uid=0, inode=4712952, has_info=True, info_state=1, rtt_us=23, snd_cwnd=11, total_retrans=0, bytes_acked=1001,
        bytes_received=0, segs_out=3, segs_in=2, snd_wnd=70656, rcv_wnd=65536)]


def test_older_kernel_tcp_info_is_shorter():
    # 6.1's tcp_info ends at snd_wnd (232 bytes): rcv_wnd reads 0; 4.19's ends before it
    full = bytes(range(256)) * 2
    assert sockdiag.parse_tcp_info(full[:232])[-1] == 0
    assert sockdiag.parse_tcp_info(full[:232])[-2] == struct.unpack_from("=I", full, 228)[0]
    assert sockdiag.parse_tcp_info(full[:200])[-2:] == (0, 0)
    assert sockdiag.parse_tcp_info(full[:100]) == (0,) * 9


def test_error_and_truncation_are_one_line():
    err = struct.pack("=IHHII", 36, sockdiag.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -1) + b"\0" * 16
    with pytest.raises(sockdiag.DumpError, match="refused the dump: Operation not permitted"):
        sockdiag.parse_dump(err)
    with pytest.raises(sockdiag.DumpError, match="truncated"):
        sockdiag.parse_dump(CLIENT[:200])


def test_request_asks_for_tcp_info_of_full_sockets():
    req = sockdiag.request(socket.AF_INET6, seq=7)
    length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", req)
    family, proto, ext, _pad, states = struct.unpack_from("=BBBBI", req, 16)
    assert (length, mtype, seq, family, proto) == (len(req), 20, 7, socket.AF_INET6, socket.IPPROTO_TCP)
    assert flags & 0x300 == 0x300 and ext == 1 << (sockdiag.INET_DIAG_INFO - 1)
    assert not states & (1 << sockdiag.TCP_TIME_WAIT) and states & (1 << sockdiag.TCP_LISTEN)
