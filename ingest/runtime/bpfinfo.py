"""What the kernel says about loaded BPF programs, through libbpf's calls.

bcc's libbcc links libbpf, so its library handle reaches libbpf's own wrappers of
the bpf(2) commands: `bpf_obj_get_info` (libbcc's export of
BPF_OBJ_GET_INFO_BY_FD), `bpf_enable_stats`, `bpf_prog_query`,
`bpf_prog_get_fd_by_id`, `bpf_prog_get_next_id` and `bpf_prog_detach2`. No syscall
number and no byte offset is written here: libbpf knows the syscall of the machine
it was built for and sizes each command's attributes itself (BPF_PROG_QUERY since
6.6 writes a revision back past the older attribute size), and `bpf_prog_info` is
the UAPI struct, declared below field by field.

`recursion_misses` counts invocations the kernel skipped because the program was
already running on that CPU (a softirq event arriving while a process-context
run of the same program is under way, for example). Those events are lost to
every tracepoint-based tool; Sonde reports how many, so a count that is short says
by how much. A kernel older than a field returns a shorter struct (`info_len`),
and the field reads 0.
"""
from __future__ import annotations

import ctypes as ct
import errno
import os

BPF_STATS_RUN_TIME = 0


class ProgInfo(ct.Structure):
    """struct bpf_prog_info (include/uapi/linux/bpf.h). It only grows at its end; the
    kernel writes at most sizeof(ProgInfo) bytes of it and says how many in info_len."""
    _fields_ = [
        ("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32), ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64), ("name", ct.c_char * 16), ("ifindex", ct.c_uint32),
        ("gpl_compatible", ct.c_uint32), ("netns_dev", ct.c_uint64), ("netns_ino", ct.c_uint64),
        ("nr_jited_ksyms", ct.c_uint32), ("nr_jited_func_lens", ct.c_uint32),
        ("jited_ksyms", ct.c_uint64), ("jited_func_lens", ct.c_uint64),
        ("btf_id", ct.c_uint32), ("func_info_rec_size", ct.c_uint32), ("func_info", ct.c_uint64),
        ("nr_func_info", ct.c_uint32), ("nr_line_info", ct.c_uint32), ("line_info", ct.c_uint64),
        ("jited_line_info", ct.c_uint64), ("nr_jited_line_info", ct.c_uint32),
        ("line_info_rec_size", ct.c_uint32), ("jited_line_info_rec_size", ct.c_uint32),
        ("nr_prog_tags", ct.c_uint32), ("prog_tags", ct.c_uint64),
        ("run_time_ns", ct.c_uint64), ("run_cnt", ct.c_uint64), ("recursion_misses", ct.c_uint64),
        ("verified_insns", ct.c_uint32), ("attach_btf_obj_id", ct.c_uint32), ("attach_btf_id", ct.c_uint32),
        ("_pad", ct.c_uint32),
    ]


_fns: dict[str, object] = {}


def _fn(name: str, restype, *argtypes):
    """A libbpf function from bcc's library handle, with its own prototype (a fresh
    function object, so bcc's use of the same symbol is untouched)."""
    f = _fns.get(name)
    if f is None:
        from bcc.libbcc import lib
        f = lib[name]
        f.restype, f.argtypes = restype, list(argtypes)
        _fns[name] = f
    return f


def prog_info(prog_fd: int) -> ProgInfo | None:
    """The kernel's bpf_prog_info for a program fd, fields the kernel lacks left 0;
    None if the fd is not a program the caller may inspect."""
    info = ProgInfo()
    size = ct.c_uint32(ct.sizeof(info))
    get = _fn("bpf_obj_get_info", ct.c_int, ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32))
    if get(prog_fd, ct.addressof(info), ct.byref(size)) != 0:
        return None
    return info  # an older kernel writes a shorter struct (size): the rest stays 0


def _field(prog_fd: int, name: str) -> int:
    info = prog_info(prog_fd)
    return int(getattr(info, name)) if info is not None else 0


def recursion_misses(prog_fd: int) -> int:
    return _field(prog_fd, "recursion_misses")


def run_stats(prog_fd: int) -> tuple[int, int]:
    """(run_cnt, run_time_ns) of a program: counted only while statistics are on."""
    info = prog_info(prog_fd)
    return (int(info.run_cnt), int(info.run_time_ns)) if info is not None else (0, 0)


def prog_name(prog_fd: int) -> str:
    info = prog_info(prog_fd)
    return info.name.decode(errors="replace") if info is not None else ""  # c_char[] reads back as bytes


def enable_stats() -> int:
    """Turn on run-time statistics for every BPF program (BPF_ENABLE_STATS, 5.8+):
    they stay on while the returned fd is open and go off when it closes, even if
    the agent dies, unlike the kernel.bpf_stats_enabled sysctl. Returns -1 if refused."""
    fd = _fn("bpf_enable_stats", ct.c_int, ct.c_int)(BPF_STATS_RUN_TIME)
    return fd if fd >= 0 else -1


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


def attached_prog_ids(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to a cgroup (or other target) for one attach type."""
    query = _fn("bpf_prog_query", ct.c_int, ct.c_int, ct.c_int, ct.c_uint32, ct.POINTER(ct.c_uint32),
                ct.POINTER(ct.c_uint32), ct.POINTER(ct.c_uint32))
    room = 64
    for _ in range(4):
        ids = (ct.c_uint32 * room)()
        cnt = ct.c_uint32(room)
        flags = ct.c_uint32(0)
        res = query(target_fd, attach_type, 0, ct.byref(flags), ids, ct.byref(cnt))
        if res == 0:
            return list(ids[:min(cnt.value, room)])
        if res != -errno.ENOSPC or cnt.value <= room:
            return []
        room = cnt.value  # more are attached than there was room for: ask again with enough
    return []


def detach_by_name(cgroup_fd: int, attach_type: int, prefix: str) -> int:
    """Detach the programs on a cgroup whose name starts with `prefix` and that no
    live process holds: a cgroup attachment outlives the process that made it, so an
    agent killed with SIGKILL leaves its programs running until the next start
    removes them; another running agent's programs stay. Returns how many."""
    ids = attached_prog_ids(cgroup_fd, attach_type)
    if not ids:
        return 0
    held = held_prog_ids()
    detach = _fn("bpf_prog_detach2", ct.c_int, ct.c_int, ct.c_int, ct.c_int)
    n = 0
    for prog_id in ids:
        if prog_id in held:
            continue
        fd = prog_fd_by_id(prog_id)
        if fd < 0:
            continue
        try:
            if prog_name(fd).startswith(prefix) and detach(fd, cgroup_fd, attach_type) == 0:
                n += 1
        finally:
            os.close(fd)
    return n


# --- every program on the machine (benchmarks: bench/ab.py sums them per request) ------

def prog_ids() -> list[int]:
    """Ids of every BPF program loaded on the machine (BPF_PROG_GET_NEXT_ID, 4.13+; root)."""
    next_id = _fn("bpf_prog_get_next_id", ct.c_int, ct.c_uint32, ct.POINTER(ct.c_uint32))
    ids: list[int] = []
    cur = ct.c_uint32(0)
    while next_id(cur.value, ct.byref(cur)) == 0:
        ids.append(cur.value)
    return ids


def prog_fd_by_id(prog_id: int) -> int:
    """A new fd for program `prog_id` (BPF_PROG_GET_FD_BY_ID); -1 if it is gone or refused."""
    fd = _fn("bpf_prog_get_fd_by_id", ct.c_int, ct.c_uint32)(prog_id)
    return fd if fd >= 0 else -1


def prog_stats(prog_fd: int) -> tuple[int, str, int, int]:
    """(type, name, run_cnt, run_time_ns) of a program in one BPF_OBJ_GET_INFO_BY_FD."""
    info = prog_info(prog_fd)
    if info is None:
        return 0, "", 0, 0
    return int(info.type), info.name.decode(errors="replace"), int(info.run_cnt), int(info.run_time_ns)


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
