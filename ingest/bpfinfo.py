"""What the kernel says about a loaded BPF program: BPF_OBJ_GET_INFO_BY_FD.

`recursion_misses` counts invocations the kernel skipped because another BPF
program was already running on that CPU (a softirq event arriving while a
process-context program runs, for example). Those events are lost to every
tracepoint-based tool; Sonde reports how many, so a count that is short says by
how much. Offsets are from the UAPI `struct bpf_prog_info`, which only grows at
its end (stable ABI); an older kernel returns a shorter struct and 0 here.
"""
from __future__ import annotations

import ctypes
import os

_SYS_BPF = 321  # x86_64
_BPF_OBJ_GET_INFO_BY_FD = 15
_INFO_SIZE = 232
_RECURSION_MISSES = 208

_libc = ctypes.CDLL(None, use_errno=True)


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


def recursion_misses(prog_fd: int) -> int:
    buf = ctypes.create_string_buffer(_INFO_SIZE)
    attr = _InfoAttr(prog_fd, _INFO_SIZE, ctypes.addressof(buf))
    if os.uname().machine != "x86_64":
        return 0
    if _libc.syscall(_SYS_BPF, _BPF_OBJ_GET_INFO_BY_FD, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        return 0
    if attr.info_len < _RECURSION_MISSES + 8:
        return 0
    return int.from_bytes(buf.raw[_RECURSION_MISSES:_RECURSION_MISSES + 8], "little")
