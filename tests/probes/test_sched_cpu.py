"""Probe sched_cpu (opt-in): run-queue latency rises when a competitor shares the CPU."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import drain, make_config, select, spinner, wait_until


# --- from test_infra.py ---------------------------------------------------------


@pytest.fixture
def agent_for(agents):
    return agents


flush = drain



@pytest.mark.infra
def test_runqueue_latency_rises_with_a_competitor(agent_for, influx, influx_db):
    agent = agent_for("sched_cpu")
    procs = []
    try:
        alone = spinner(3, cpu=1)
        procs.append(alone)
        time.sleep(3.2)
        shared = [spinner(3, cpu=1), spinner(3, cpu=1)]
        procs += shared
        time.sleep(3.2)
        flush(agent)
    finally:
        for p in procs:
            p.kill()
            p.wait()

    def mean_latency_us(pid):
        r = select(influx, influx_db, f"SELECT sum(sum_us), sum(count) FROM process_runq_latency WHERE pid='{pid}'")
        return r[0]["sum"] / r[0]["sum_1"] if r and r[0]["sum_1"] else 0.0
    lone = mean_latency_us(alone.pid)
    pair = [mean_latency_us(p.pid) for p in shared]
    # Two spinners on one core each wait about a time slice (milliseconds) for the other.
    assert min(pair) > 1000, pair
    assert min(pair) > 5 * lone, (pair, lone)


# --- exactness against the kernel's schedstat -----------------------------------

# A child that sleeps 40 times (each sleep: a wakeup, then a wait in the run queue),
# says so, and stops itself: once stopped its switch-ins are final, and every one of
# them was preceded by a wakeup or a preemption the probe stamps.
CHILD = ("import os, signal, sys, time\n"
         "for _ in range(40): time.sleep(0.0005)\n"
         "sys.stdout.write('up\\n'); sys.stdout.flush()\n"
         "for _ in range(40): time.sleep(0.0005)\n"
         "os.kill(os.getpid(), signal.SIGSTOP)\n")


def switch_ins(pid: int) -> int:
    """Times the process's threads were switched in, from the kernel's schedstat
    (pcount, the third field): an independent count of run-queue waits."""
    return sum(int((t / "schedstat").read_text().split()[2]) for t in Path(f"/proc/{pid}/task").iterdir())


def stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.truth
def test_bucket_counts_are_exact_across_racing_polls_and_a_failed_one(bpf_ready, tmp_path, monkeypatch):
    """Issue 14, item 3. New processes start right before each read of the probe's map
    (a process that appeared between a poll's two map reads lost its buckets before),
    and one poll raises after taking its deltas (its interval was lost before). Over
    the run each process's bucket counts, and its summary counts, equal exactly what
    the kernel counted for it (its map entry, read directly at the end), and agree
    with its switch-ins as /proc/PID/task/*/schedstat counts them: never more, and
    short only by switch-ins the sched_switch tracepoint did not show (an ftrace
    instance missed the same ones when this was measured)."""
    from sonde.bpf.sched_cpu import probe as sched_probe
    from sonde.bpf.sched_cpu.probe import PROBE
    from sonde.ingest.runtime import bpfmap, hist
    from sonde.ingest.runtime.probe import LoadedProbe

    cfg = make_config(tmp_path, "cardinality:\n  max_series: 1000000\n"
                                "probes:\n  sched_cpu:\n    max_processes: 100000\n")
    probe = LoadedProbe.load(PROBE, cfg)
    children: list[subprocess.Popen] = []
    real_read_all, real_points = bpfmap.read_all, hist.points
    fail = {"now": False}

    def read_all_after_a_new_process(table):
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
        children.append(child)
        assert child.stdout.readline() == "up\n"  # it has waited in the run queue already
        return real_read_all(table)

    def points_or_fail(*a, **kw):
        if fail["now"]:
            raise RuntimeError("a poll failing after its deltas were taken")
        return real_points(*a, **kw)

    points = []
    misses = 0
    try:
        probe.poll(time.time_ns())
        for module in (bpfmap, sched_probe):  # every read of a map, however it is imported
            monkeypatch.setattr(module, "read_all", read_all_after_a_new_process, raising=False)
        monkeypatch.setattr(hist, "points", points_or_fail)
        for i in range(8):
            fail["now"] = i == 3
            new, me = probe.poll(time.time_ns())
            assert me.fields["poll_success"] == (0 if i == 3 else 1)
            assert me.fields["map_full_drops"] == 0
            misses += me.fields["kernel_misses"]
            points += new
            time.sleep(0.05)
        fail["now"] = False
        for module in (bpfmap, sched_probe):
            monkeypatch.setattr(module, "read_all", real_read_all, raising=False)
        wait_until(lambda: all(stopped(c.pid) for c in children), timeout=30, what="children stopped")
        time.sleep(0.2)  # `T` shows just before the last switch-out that credits the last wait
        switched = {c.pid: switch_ins(c.pid) for c in children}
        new, me = probe.poll(time.time_ns())
        assert me.fields["map_full_drops"] == 0
        misses += me.fields["kernel_misses"]
        points += new
        table = probe.table("proc_rq")
        kernel = {c.pid: int(table[table.Key(c.pid)].rq_lat_count) for c in children}
    finally:
        for c in children:
            c.kill()
            c.wait()
        probe.close()
    got = {pid: 0 for pid in kernel}
    summary = dict(got)
    for p in points:
        if p.tags.get("pid", "").isdigit() and int(p.tags["pid"]) in got:
            if p.measurement == "process_runq_latency_hist":
                got[int(p.tags["pid"])] += p.fields["count"]
            elif p.measurement == "process_runq_latency":
                summary[int(p.tags["pid"])] += p.fields["count"]
    assert len(kernel) >= 8 and min(kernel.values()) >= 80
    assert got == kernel
    assert summary == kernel
    # a skipped run (reported) loses at most the wait it would have stamped or credited
    assert all(got[pid] <= switched[pid] for pid in got), (got, switched)
    assert sum(got.values()) >= 0.9 * sum(switched.values()) - 2 * misses, (got, switched, misses)
