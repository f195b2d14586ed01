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
_RUN_TIME_NS = 192
_RUN_CNT = 200
_RECURSION_MISSES = 208
_BPF_ENABLE_STATS = 32

_libc = ctypes.CDLL(None, use_errno=True)


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


def _info_u64(prog_fd: int, offset: int) -> int:
    buf = ctypes.create_string_buffer(_INFO_SIZE)
    attr = _InfoAttr(prog_fd, _INFO_SIZE, ctypes.addressof(buf))
    if os.uname().machine != "x86_64":
        return 0
    if _libc.syscall(_SYS_BPF, _BPF_OBJ_GET_INFO_BY_FD, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        return 0
    if attr.info_len < offset + 8:
        return 0
    return int.from_bytes(buf.raw[offset:offset + 8], "little")


def recursion_misses(prog_fd: int) -> int:
    return _info_u64(prog_fd, _RECURSION_MISSES)


def run_stats(prog_fd: int) -> tuple[int, int]:
    """(run_cnt, run_time_ns) of a program: counted only while statistics are on."""
    return _info_u64(prog_fd, _RUN_CNT), _info_u64(prog_fd, _RUN_TIME_NS)


def enable_stats() -> int:
    """Turn on run-time statistics for every BPF program (BPF_ENABLE_STATS, 5.8+):
    they stay on while the returned fd is open and go off when it closes, even if
    the agent dies, unlike the kernel.bpf_stats_enabled sysctl. Returns -1 if refused."""
    attr = (ctypes.c_uint32 * 2)(0, 0)  # BPF_STATS_RUN_TIME
    if os.uname().machine != "x86_64":
        return -1
    return _libc.syscall(_SYS_BPF, _BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr))


_BPF_PROG_DETACH = 9
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_PROG_QUERY = 16
_NAME_OFF = 64


class _QueryAttr(ctypes.Structure):
    # Room for the whole query section: since 6.6 the kernel writes `revision` (at byte
    # 56) back whatever size was passed, which past a 32-byte struct corrupts memory.
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("prog_attach_flags", ctypes.c_uint64), ("link_ids", ctypes.c_uint64),
                ("link_attach_flags", ctypes.c_uint64), ("revision", ctypes.c_uint64),
                ("reserved", ctypes.c_uint8 * 64)]


class _DetachAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("replace_bpf_fd", ctypes.c_uint32)]


def _bpf(cmd: int, attr) -> int:
    return _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))


def prog_name(prog_fd: int) -> str:
    buf = ctypes.create_string_buffer(_INFO_SIZE)
    attr = _InfoAttr(prog_fd, _INFO_SIZE, ctypes.addressof(buf))
    if _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr) != 0:
        return ""
    return buf.raw[_NAME_OFF:_NAME_OFF + 16].split(b"\0", 1)[0].decode(errors="replace")


def held_prog_ids(proc: str = "/proc") -> set[int]:
    """Ids of the BPF programs some live process holds an fd to (fdinfo `prog_id:`)."""
    held = set()
    for d in os.scandir(proc):
        if not d.name.isdigit():
            continue
        try:
            fds = list(os.scandir(f"{d.path}/fd"))
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd.path) != "anon_inode:bpf-prog":
                    continue
                with open(f"{d.path}/fdinfo/{fd.name}") as f:
                    for line in f:
                        if line.startswith("prog_id:"):
                            held.add(int(line.split()[1]))
            except (OSError, ValueError):
                continue
    return held


def detach_by_name(cgroup_fd: int, attach_type: int, prefix: str) -> int:
    """Detach the programs on a cgroup whose name starts with `prefix` and that no
    live process holds: a cgroup attachment outlives the process that made it, so an
    agent killed with SIGKILL leaves its programs running until the next start
    removes them; another running agent's programs stay. Returns how many."""
    ids = (ctypes.c_uint32 * 64)()
    q = _QueryAttr(cgroup_fd, attach_type, 0, 0, ctypes.addressof(ids), 64, 0)
    if _bpf(_BPF_PROG_QUERY, q) != 0:
        return 0
    if not q.prog_cnt:
        return 0
    held = held_prog_ids()
    n = 0
    for prog_id in ids[:q.prog_cnt]:
        if prog_id in held:
            continue
        fd_attr = (ctypes.c_uint32 * 4)(prog_id, 0, 0, 0)
        fd = _libc.syscall(_SYS_BPF, _BPF_PROG_GET_FD_BY_ID, ctypes.byref(fd_attr), ctypes.sizeof(fd_attr))
        if fd < 0:
            continue
        try:
            if prog_name(fd).startswith(prefix):
                if _bpf(_BPF_PROG_DETACH, _DetachAttr(cgroup_fd, fd, attach_type, 0, 0)) == 0:
                    n += 1
        finally:
            os.close(fd)
    return n


# --- every program on the machine (benchmarks: bench/ab.py sums them per request) ------

_BPF_PROG_GET_NEXT_ID = 11
_TYPE_OFF = 0
_ID_OFF = 4


def prog_ids() -> list[int]:
    """Ids of every BPF program loaded on the machine (BPF_PROG_GET_NEXT_ID, 4.13+; root)."""
    if os.uname().machine != "x86_64":
        return []
    ids: list[int] = []
    attr = (ctypes.c_uint32 * 3)(0, 0, 0)  # start_id, next_id, open_flags
    while _libc.syscall(_SYS_BPF, _BPF_PROG_GET_NEXT_ID, ctypes.byref(attr), ctypes.sizeof(attr)) == 0:
        ids.append(attr[1])
        attr[0] = attr[1]
    return ids


def prog_fd_by_id(prog_id: int) -> int:
    """A new fd for program `prog_id` (BPF_PROG_GET_FD_BY_ID); -1 if it is gone or refused."""
    if os.uname().machine != "x86_64":
        return -1
    attr = (ctypes.c_uint32 * 3)(prog_id, 0, 0)  # prog_id, next_id, open_flags
    return _libc.syscall(_SYS_BPF, _BPF_PROG_GET_FD_BY_ID, ctypes.byref(attr), ctypes.sizeof(attr))


def prog_stats(prog_fd: int) -> tuple[int, str, int, int]:
    """(type, name, run_cnt, run_time_ns) of a program in one BPF_OBJ_GET_INFO_BY_FD."""
    buf = ctypes.create_string_buffer(_INFO_SIZE)
    attr = _InfoAttr(prog_fd, _INFO_SIZE, ctypes.addressof(buf))
    if os.uname().machine != "x86_64" or _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr) != 0:
        return 0, "", 0, 0
    raw = buf.raw

    def u64(off: int) -> int:
        return int.from_bytes(raw[off:off + 8], "little") if attr.info_len >= off + 8 else 0
    name = raw[_NAME_OFF:_NAME_OFF + 16].split(b"\0", 1)[0].decode(errors="replace")
    return int.from_bytes(raw[_TYPE_OFF:_TYPE_OFF + 4], "little"), name, u64(_RUN_CNT), u64(_RUN_TIME_NS)


def all_run_stats() -> dict[int, tuple[str, int, int]]:
    """prog id -> (name, run_cnt, run_time_ns) for every program loaded now. The counts
    grow only while statistics are on (enable_stats() or kernel.bpf_stats_enabled)."""
    out: dict[int, tuple[str, int, int]] = {}
    for prog_id in prog_ids():
        fd = prog_fd_by_id(prog_id)
        if fd < 0:
            continue  # unloaded since the id was listed
        try:
            _type, name, cnt, ns = prog_stats(fd)
        finally:
            os.close(fd)
        out[prog_id] = (name, cnt, ns)
    return out
