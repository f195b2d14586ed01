"""Uprobes that a process's forks inherit (ingest/runtime/uprobes.py), on the real
kernel: the counts are the calls the test's own program makes, per process."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, need
from sonde.ingest.runtime import uprobes

pytestmark = [pytest.mark.l7]


def marker_offset(binary: Path) -> int:
    """marker's file offset (a PIE's text: address and offset are equal in the first segment)."""
    out = subprocess.run(["nm", str(binary)], capture_output=True, text=True, check=True).stdout
    return int(next(line.split()[0] for line in out.splitlines() if line.endswith(" T marker")), 16)


@pytest.fixture
def counting(bpf_ready, tmp_path):
    from bcc import BPF
    need(shutil.which("gcc") is not None, "gcc not installed")
    binary = tmp_path / "forks"
    subprocess.run(["gcc", "-O0", "-o", str(binary), str(REPO / "tests/uprobes/forks.c")], check=True)
    b = BPF(text=rb"""
BPF_HASH(hits, u32, u64);
int on_marker(void *ctx) { u32 tgid = bpf_get_current_pid_tgid() >> 32; hits.increment(tgid); return 0; }
""")
    try:
        yield b, b.load_func(b"on_marker", BPF.KPROBE), binary
    finally:
        b.cleanup()


def run(binary: Path, counts: tuple[int, ...], before_go=None) -> tuple[subprocess.Popen, callable]:
    p = subprocess.Popen([str(binary), *map(str, counts)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def go() -> list[int]:
        out, _ = p.communicate("go\n", timeout=30)
        assert p.returncode == 0
        return [int(x) for x in out.split()]
    return p, go


def test_forks_inherit_the_uprobe_and_other_processes_do_not_run_it(counting):
    b, prog, binary = counting
    probed, go = run(binary, (5, 7, 11))
    other, go_other = run(binary, (3, 3, 3))
    u = uprobes.Uprobe(prog.fd, str(binary).encode(), marker_offset(binary), probed.pid, ret=False)
    try:
        others = go_other()
        parent, child, grandchild = go()
        hits = {k.value: v.value for k, v in b[b"hits"].items()}
        assert hits == {parent: 5, child: 7, grandchild: 11}, (hits, others)
    finally:
        name = u.name
        u.close()
    assert name not in (uprobes.TRACEFS / "uprobe_events").read_text()


@pytest.mark.parametrize("ret", [False, True], ids=["entry", "return"])
def test_the_program_outlives_the_forks_that_exit(counting, ret):
    """Once a fork that inherited the uprobe has exited, the parent and a fork made
    after still run the program (the kernel gave an inherited perf event its parent's
    program and, freeing it at the child's exit, took the program off the event for
    every process: PostgreSQL's backends lost their plaintext once one had exited)."""
    b, prog, binary = counting
    probed, go = run(binary, (5, 7, 11, 13))
    u = uprobes.Uprobe(prog.fd, str(binary).encode(), marker_offset(binary), probed.pid, ret=ret)
    try:
        parent, child, grandchild, later = go()
        hits = {k.value: v.value for k, v in b[b"hits"].items()}
        assert hits == {parent: 5 + 13, child: 7, grandchild: 11, later: 13}, hits
    finally:
        u.close()


def test_a_closed_uprobe_runs_nowhere_and_stale_events_are_removed(counting):
    b, prog, binary = counting
    probed, go = run(binary, (2, 2, 2))
    u = uprobes.Uprobe(prog.fd, str(binary).encode(), marker_offset(binary), probed.pid, ret=True)
    u.close()
    go()
    assert len(b[b"hits"]) == 0
    # An event left by an agent that died (a pid that no longer exists) is removed.
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"sonde_{dead.pid}_0"
    uprobes._tracefs(f"p:{uprobes.GROUP}/{stale} {binary}:{marker_offset(binary):#x}")
    assert stale in (uprobes.TRACEFS / "uprobe_events").read_text()
    assert uprobes.remove_stale() >= 1
    assert stale not in (uprobes.TRACEFS / "uprobe_events").read_text()


def test_a_path_tracefs_cannot_name_is_refused_in_one_line(counting):
    _, prog, binary = counting
    with pytest.raises(OSError, match="blanks"):
        uprobes.Uprobe(prog.fd, b"/tmp/a b/libssl.so", 0x10, os.getpid(), ret=False)
