"""Probe oom: real OOM kills in memory-limited cgroups. Each kill is its own point, at
its own time, with the victim's cgroup as the kernel had it when the victim was chosen
(not read from /proc afterwards, which races with the exit), then end to end into
InfluxDB (marker infra)."""
from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import drain, make_config, need, select, wait_until

V1 = Path("/sys/fs/cgroup/memory")
LIMIT = 16 << 20


@pytest.fixture
def memcgs():
    """make(n): n fresh memory cgroups limited to 16 MiB, as (directory, path in the
    memory hierarchy); removed at the end (their victims are dead by then)."""
    need(os.geteuid() == 0, "cgroups need root")
    need(V1.is_dir() or Path("/sys/fs/cgroup/cgroup.controllers").exists(), "a memory cgroup controller")
    made = []

    def make(n):
        out = []
        for _ in range(n):
            name = f"sonde-oom-{uuid.uuid4().hex[:8]}"
            if V1.is_dir():  # v1, as on this machine's hybrid layout
                cg = V1 / name
                cg.mkdir()
                (cg / "memory.limit_in_bytes").write_text(str(LIMIT))
            else:  # v2
                root = Path("/sys/fs/cgroup")
                if "memory" not in (root / "cgroup.subtree_control").read_text().split():
                    (root / "cgroup.subtree_control").write_text("+memory")
                cg = root / name
                cg.mkdir()
                (cg / "memory.max").write_text(str(LIMIT))
                (cg / "memory.swap.max").write_text("0")
            made.append(cg)
            out.append((cg, f"/{name}"))
        return out
    yield make
    for cg in made:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:  # a victim still exiting
                time.sleep(0.1)


def victim(cg: Path) -> subprocess.Popen:
    """`tail /dev/zero` in cgroup cg: it buffers a line that never ends until the
    cgroup's limit kills it, in milliseconds. Every victim is named `tail`."""
    return subprocess.Popen(["sh", "-c", f"echo $$ > {cg}/cgroup.procs && exec tail /dev/zero"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_three(cgs) -> dict[int, str]:
    """One victim in each cgroup at once; pid -> its cgroup path once all are dead."""
    procs = [(victim(cg), path) for cg, path in cgs]
    out = {}
    for p, path in procs:
        assert p.wait(timeout=60) == -9, "the victim was not OOM-killed"
        out[p.pid] = path
    return out


@pytest.fixture
def oom_probe(bpf_ready, tmp_path):
    from sonde.bpf.oom.probe import PROBE
    from sonde.ingest.runtime.probe import LoadedProbe

    p = LoadedProbe.load(PROBE, make_config(tmp_path))
    p.poll(time.time_ns())
    yield p
    p.close()


@pytest.mark.truth
@pytest.mark.infra
def test_three_kills_of_one_name_in_one_interval_are_three_points_with_their_cgroups(oom_probe, memcgs):
    """20 times: three `tail` victims in three cgroups killed within one interval give
    three oom_kill points, each with its own cgroup, and no two with the same series
    and timestamp (InfluxDB would keep only the last of those)."""
    assert oom_probe.decoder.victims is not None, "the raw program reading the victim's cgroup did not load"
    cgs = memcgs(3)
    for rep in range(20):
        want = kill_three(cgs)

        def arrived():
            with oom_probe.decoder.lock:
                return set(want) <= {e.fields["pid"] for e in oom_probe.decoder.events}
        wait_until(arrived, timeout=10, interval=0.02, what="three OOM events")
        points, me = oom_probe.poll(time.time_ns())
        assert me.fields["poll_success"] == 1
        kills = [p for p in points if p.measurement == "oom_kill" and p.fields["pid"] in want]
        assert {p.fields["pid"]: p.fields["cgroup"] for p in kills} == want, rep
        assert [p.tags["comm"] for p in kills] == ["tail"] * 3
        assert len({(tuple(sorted(p.tags.items())), p.ts_ns) for p in kills}) == 3, rep
        total = [p for p in points if p.measurement == "oom_kills"]
        assert total and total[0].fields["kills"] >= 3 and total[0].fields["lost_events"] == 0


@pytest.mark.truth
@pytest.mark.infra
def test_lost_events_are_reported(oom_probe):
    """Events the perf buffer dropped are written (oom_kills.lost_events), once."""
    oom_probe.decoder._on_lost(2)
    points, _ = oom_probe.poll(time.time_ns())
    assert [p.fields for p in points if p.measurement == "oom_kills"] == [{"kills": 0, "lost_events": 2}]
    points, _ = oom_probe.poll(time.time_ns())
    assert not [p for p in points if p.measurement == "oom_kills"]


@pytest.mark.truth
def test_memory_hierarchy_from_mounts():
    from sonde.bpf.oom.probe import memory_hierarchy

    hybrid = ("cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0\n"
              "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n"
              "cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,memory 0 0\n")
    assert memory_hierarchy(hybrid) == ("/sys/fs/cgroup/memory", "v1")
    assert memory_hierarchy("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n") == ("/sys/fs/cgroup", "v2")
    assert memory_hierarchy("proc /proc proc rw 0 0\n") is None


# --- end to end -----------------------------------------------------------------


@pytest.mark.truth
@pytest.mark.infra
def test_oom_kills_reach_influxdb_as_separate_points(agents, influx, influx_db, memcgs):
    agent = agents("oom")
    cgs = memcgs(3)
    want = kill_three(cgs)
    decoder = agent.probes["oom"].decoder

    def arrived():
        with decoder.lock:
            return set(want) <= {e.fields["pid"] for e in decoder.events}
    wait_until(arrived, timeout=10, interval=0.02, what="three OOM events")
    drain(agent)
    pids = " OR ".join(f"pid = {pid}" for pid in want)
    events = select(influx, influx_db, f"SELECT * FROM oom_kill WHERE {pids}")
    assert sorted((e["comm"], e["pid"], e["cgroup"]) for e in events) == \
        sorted(("tail", pid, path) for pid, path in want.items())
    kills = select(influx, influx_db, "SELECT sum(kills), sum(lost_events) FROM oom_kills")
    assert kills[0]["sum"] >= 3 and kills[0]["sum_1"] == 0
