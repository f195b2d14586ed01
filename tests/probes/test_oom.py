"""Probe oom: a real OOM kill in a memory-limited cgroup gives one event."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import drain, need, select


# --- from test_infra.py ---------------------------------------------------------


@pytest.fixture
def agent_for(agents):
    return agents


flush = drain


@pytest.mark.infra
def test_oom_kill_gives_one_event(agent_for, influx, influx_db, tmp_path):
    mem = Path("/sys/fs/cgroup/memory")
    need(mem.is_dir() or Path("/sys/fs/cgroup/memory.max").exists() or
         Path("/sys/fs/cgroup/cgroup.controllers").exists(), "a memory cgroup controller")
    agent = agent_for("oom")
    name = f"sonde-oom-{os.getpid()}"
    if mem.is_dir():  # v1, as on this machine's hybrid layout
        cg = mem / name
        cg.mkdir()
        (cg / "memory.limit_in_bytes").write_text(str(32 << 20))
    else:  # v2
        root = Path("/sys/fs/cgroup")
        cg = root / name
        cg.mkdir()
        (cg / "memory.max").write_text(str(32 << 20))
    try:
        victim = subprocess.Popen([sys.executable, "-c",
                                   f"import os, ctypes\nopen('{cg}/cgroup.procs', 'w').write(str(os.getpid()))\n"
                                   "ctypes.CDLL(None).prctl(15, b'sonde-victim', 0, 0, 0)\n"
                                   "b = []\nwhile True: b.append(bytearray(1 << 20))"])
        assert victim.wait(timeout=60) == -9
        time.sleep(0.3)
        flush(agent)
    finally:
        cg.rmdir()
    events = select(influx, influx_db, "SELECT * FROM oom_kill")
    assert [(e["comm"], e["pid"], e["cgroup"]) for e in events] == [("sonde-victim", victim.pid, f"/{name}")]
    kills = select(influx, influx_db, "SELECT sum(kills) FROM oom_kills")
    assert kills[0]["sum"] == 1
