"""Probe sched_cpu (opt-in): run-queue latency rises when a competitor shares the CPU."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import drain, select


# --- from test_infra.py ---------------------------------------------------------


@pytest.fixture
def agent_for(agents):
    return agents


flush = drain


def spinner(seconds: float, cpu: int | None = None) -> subprocess.Popen:
    code = f"import time\nt = time.time() + {seconds}\nwhile time.time() < t: pass\nimport sys; sys.stdin.read()"
    cmd = [sys.executable, "-c", code]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu)] + cmd
    return subprocess.Popen(cmd, stdin=subprocess.PIPE)


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
