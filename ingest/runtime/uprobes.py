"""Uprobes for one process that its forks inherit.

bcc attaches a uprobe for a pid through the uprobe PMU: each perf event gets its own
trace event, so an event a fork inherits has no BPF program and the child runs
unprobed until user space sees the fork and attaches again, after the child's first
calls (a PostgreSQL backend's TLS startup, an nginx worker's first requests). Here the
uprobe is a named tracefs event (`sonde_uprobes/...`, shared by every perf event opened
on it) and its perf event is opened with `inherit`: the kernel copies it to every
child at fork, before the child runs, and the uprobe's filter then admits the child's
memory, so the program runs in it from its first call. Closing the event ends it in
the children too. Other processes that map the same file run no program: the
uprobe's filter admits only the memory of the probed tasks.

Event names carry the agent's pid; `remove_stale` takes out those of agents that
died without removing theirs (tracefs events outlive their process).
"""
from __future__ import annotations

import ctypes
import itertools
import os
import re
import struct
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
GROUP = "sonde_uprobes"

_PERF_TYPE_TRACEPOINT = 2
_ATTR_SIZE = 128                 # PERF_ATTR_SIZE_VER7; the kernel accepts any known size
_DISABLED = 1 << 0               # perf_event_attr flags: disabled (bit 0), inherit (bit 1)
_INHERIT = 1 << 1
_PERF_FLAG_FD_CLOEXEC = 8
_NR_PERF_EVENT_OPEN = 298        # x86-64
_IOC_ENABLE = 0x2400
_IOC_SET_BPF = 0x40042408

_libc = ctypes.CDLL(None, use_errno=True)
_names = itertools.count()


def _tracefs(line: str) -> None:
    # one write(2) of the whole line: buffered text writes are refused (EINVAL)
    fd = os.open(TRACEFS / "uprobe_events", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _errno(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def _open(tp_id: int, pid: int, inherit: bool) -> int:
    """A perf event (disabled until enabled) on tracepoint tp_id for pid, inherited by
    its forks or not."""
    attr = bytearray(_ATTR_SIZE)
    struct.pack_into("IIQQ", attr, 0, _PERF_TYPE_TRACEPOINT, _ATTR_SIZE, tp_id, 1)  # sample_period 1
    struct.pack_into("Q", attr, 40, _DISABLED | (_INHERIT if inherit else 0))
    struct.pack_into("I", attr, 48, 1)                                            # wakeup_events
    buf = ctypes.create_string_buffer(bytes(attr), _ATTR_SIZE)
    fd = _libc.syscall(_NR_PERF_EVENT_OPEN, buf, pid, -1, -1, _PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        raise _errno(f"perf_event_open for pid {pid}")
    return fd


class Uprobe:
    """fn (a loaded KPROBE-type program's fd) at path+offset in pid and its future forks."""

    def __init__(self, prog_fd: int, path: bytes, offset: int, pid: int, ret: bool):
        if b" " in path or b"\n" in path:
            raise OSError(f"{path!r}: tracefs cannot name a path with blanks")
        self.name = f"sonde_{os.getpid()}_{next(_names)}"
        _tracefs(f"{'r' if ret else 'p'}:{GROUP}/{self.name} {path.decode()}:{offset:#x}")
        self.fd = self.prog_fd = -1
        try:
            tp_id = int((TRACEFS / "events" / GROUP / self.name / "id").read_text())
            # Two perf events on it. The inherited one carries no program: it is what the
            # kernel copies to each fork, so the uprobe's filter admits the child's memory.
            # The program is on a second event, of this process alone: the kernel gives an
            # inherited event its parent's program too, and freeing that copy when a
            # child exits takes the program off the tracefs event for every process
            # (seen here: PostgreSQL's plaintext stopped for every backend, and for
            # backends forked later, once the first backend had exited). While the
            # program is on and returns 0, no hit makes a perf record.
            self.fd = _open(tp_id, pid, inherit=True)
            self.prog_fd = _open(tp_id, pid, inherit=False)
            if _libc.ioctl(self.prog_fd, _IOC_SET_BPF, prog_fd) != 0:
                raise _errno("PERF_EVENT_IOC_SET_BPF")
            for fd in (self.prog_fd, self.fd):
                if _libc.ioctl(fd, _IOC_ENABLE, 0) != 0:
                    raise _errno("PERF_EVENT_IOC_ENABLE")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Ends the uprobe in the process and in every fork that inherited it."""
        for fd in (self.prog_fd, self.fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.prog_fd = -1
        if self.name:
            try:
                _tracefs(f"-:{GROUP}/{self.name}")
            except OSError:
                pass  # gone already
            self.name = ""


def remove_stale() -> int:
    """Remove the sonde_uprobes events of agents that are no longer running; returns
    how many were removed."""
    try:
        text = (TRACEFS / "uprobe_events").read_text()
    except OSError:
        return 0
    removed = 0
    for m in re.finditer(rf"^[pr]:{GROUP}/(sonde_(\d+)_\d+) ", text, re.M):
        if int(m.group(2)) != os.getpid() and not os.path.exists(f"/proc/{m.group(2)}"):
            try:
                _tracefs(f"-:{GROUP}/{m.group(1)}")
                removed += 1
            except OSError:
                pass
    return removed
