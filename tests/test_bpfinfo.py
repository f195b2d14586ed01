"""ingest/runtime/bpfinfo.py against the kernel's own accounts of the same programs:
/proc/PID/fdinfo/FD and bpftool (both read bpf_prog_info without Sonde's code).

A program that is skipped is made on purpose: a raw tracepoint program on
bpf_trace:bpf_trace_printk that itself calls bpf_trace_printk fires its own
tracepoint while it runs, so the kernel skips that nested run and counts one
recursion miss for every run: misses are then known, not zero by luck."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import need

pytestmark = [pytest.mark.truth]

PROG = r"""
TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    if ((bpf_get_current_pid_tgid() >> 32) != TGID)
        return 0;
    bpf_trace_printk("sonde-bpfinfo\n");
    return 0;
}

RAW_TRACEPOINT_PROBE(bpf_trace_printk)
{
    bpf_trace_printk("sonde-bpfinfo nested\n");
    return 0;
}
"""
BPF_PROG_TYPE_TRACEPOINT, BPF_PROG_TYPE_RAW_TRACEPOINT = 5, 17


def fdinfo(fd: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


def bpftool_show(prog_id: int) -> dict:
    r = subprocess.run(["bpftool", "--json", "prog", "show", "id", str(prog_id)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def loaded(bpf_ready):
    """The two programs loaded and attached, with run-time statistics on: (a, b) fds."""
    from bcc import BPF

    from sonde.ingest.runtime import bpfinfo

    need(shutil.which("bpftool") is not None, "bpftool (scripts/setup.sh installs it)")
    need(Path("/sys/kernel/tracing/events/syscalls/sys_enter_getppid").is_dir(), "syscall tracepoints")
    need(Path("/sys/kernel/tracing/events/bpf_trace/bpf_trace_printk").is_dir(), "bpf_trace:bpf_trace_printk")
    stats = bpfinfo.enable_stats()
    assert stats >= 0, "BPF_ENABLE_STATS refused"
    b = BPF(text=PROG.encode(), cflags=[f"-DTGID={os.getpid()}"])
    try:
        a_fd = b.funcs[b"tracepoint__syscalls__sys_enter_getppid"].fd
        b_fd = b.funcs[b"raw_tracepoint__bpf_trace_printk"].fd
        yield a_fd, b_fd
    finally:
        b.cleanup()
        os.close(stats)


def test_prog_info_matches_fdinfo_and_bpftool(loaded):
    from sonde.ingest.runtime import bpfinfo

    a_fd, b_fd = loaded
    n = 200
    for _ in range(n):
        os.getppid()
    info_a = bpfinfo.prog_info(a_fd)
    before = bpfinfo.prog_info(b_fd)
    theirs_fd = fdinfo(b_fd)
    theirs = bpftool_show(before.id)
    after = bpfinfo.prog_info(b_fd)

    # the program skipped once per run of its own, and at least once per getppid
    assert info_a.type == BPF_PROG_TYPE_TRACEPOINT and info_a.run_cnt >= n
    assert before.type == BPF_PROG_TYPE_RAW_TRACEPOINT
    assert before.recursion_misses == before.run_cnt >= n
    assert bpfinfo.recursion_misses(b_fd) >= before.recursion_misses
    # the same counters as the kernel's fdinfo and bpftool, read between our two reads
    for src in (theirs_fd, theirs):
        for field in ("run_cnt", "recursion_misses"):
            assert getattr(before, field) <= int(src[field]) <= getattr(after, field), (field, src)
    assert before.run_time_ns <= int(theirs["run_time_ns"]) <= after.run_time_ns
    assert int(theirs_fd["prog_id"]) == theirs["id"] == before.id
    # bpftool names it from BTF (the whole function name); the kernel keeps 15 bytes of it
    assert bpfinfo.prog_name(b_fd) == "bpf_trace_print" and bpfinfo.prog_name(b_fd) in theirs["name"]
    assert theirs["type"] == "raw_tracepoint"
    cnt, ns = bpfinfo.run_stats(b_fd)
    assert cnt >= before.run_cnt and ns >= before.run_time_ns > 0


def test_every_program_by_id(loaded):
    """prog_ids() walks every program on the machine, prog_fd_by_id() opens one, and
    all_run_stats() reads each: ours among them, with the name bpftool gives."""
    from sonde.ingest.runtime import bpfinfo

    _, b_fd = loaded
    me = bpfinfo.prog_info(b_fd)
    assert me.id in bpfinfo.prog_ids()
    fd = bpfinfo.prog_fd_by_id(me.id)
    assert fd >= 0
    try:
        assert bpfinfo.prog_info(fd).id == me.id
    finally:
        os.close(fd)
    stats = bpfinfo.all_run_stats()
    assert stats[me.id][0] == me.name.decode() and stats[me.id][0] in bpftool_show(me.id)["name"]
    assert bpfinfo.prog_fd_by_id(0xFFFFFFF0) == -1
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        assert bpfinfo.prog_info(null) is None
    finally:
        os.close(null)
