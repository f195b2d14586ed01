"""Infrastructure probes on the real kernel: loop devices, spinners, an OOM kill."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import drain, need, select

pytestmark = [pytest.mark.infra]


@pytest.fixture
def agent_for(agents):
    return agents


flush = drain


def sh(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check).stdout.strip()


@pytest.fixture
def loopdev(tmp_path, request):
    need(Path("/sbin/losetup").exists() or Path("/usr/sbin/losetup").exists(), "losetup (util-linux)")
    img = tmp_path / "disk.img"
    sh("truncate", "-s", "64M", str(img))
    # direct_io: the loop device writes through to the real disk instead of the page
    # cache, so its requests take real time (for busy-time tests).
    direct = ["--direct-io=on"] if request.node.get_closest_marker("slow_disk") else []
    dev = sh("losetup", "-f", "--show", *direct, str(img))
    yield dev
    sh("losetup", "-d", dev, check=False)


def test_block_requests_bytes_and_latency_exact(agent_for, influx, influx_db, loopdev):
    agent = agent_for("block_io", "process_io")
    sh("dd", "if=/dev/zero", f"of={loopdev}", "bs=4k", "count=123", "oflag=direct")
    sh("dd", f"if={loopdev}", "of=/dev/null", "bs=8k", "count=45", "iflag=direct")
    flush(agent)
    disk = os.path.basename(loopdev)
    rows = select(influx, influx_db, f"SELECT sum(requests), sum(bytes), sum(errors) FROM block_io "
                                     f"WHERE disk='{disk}' GROUP BY op")
    got = {r["op"]: (r["sum"], r["sum_1"], r["sum_2"]) for r in rows}
    assert got == {"sync_write": (123, 123 * 4096, 0), "read": (45, 45 * 8192, 0)}
    for kind in ("queue", "device", "total"):
        counts = select(influx, influx_db, f"SELECT sum(count) FROM block_{kind}_latency_hist "
                                           f"WHERE disk='{disk}' GROUP BY op")
        assert {r["op"]: r["sum"] for r in counts} == {"sync_write": 123, "read": 45}
    # process_io has no disk tag: each dd also reads its own binary and libraries from
    # the root disk when they are not cached, so the loop's bytes are a lower bound.
    procs = sorted(r["sum"] for r in select(influx, influx_db,
                                            "SELECT sum(bytes) FROM process_io WHERE comm='dd' GROUP BY pid"))
    assert len(procs) == 2
    for got_bytes, want in zip(procs, sorted([123 * 4096, 45 * 8192])):
        assert want <= got_bytes < want + (1 << 20)


def test_block_errors_counted_exactly(agent_for, influx, influx_db, tmp_path):
    fs = tmp_path / "small"
    fs.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(fs))
    dev = None
    try:
        sh("truncate", "-s", "32M", str(fs / "disk.img"))
        dev = sh("losetup", "-f", "--show", str(fs / "disk.img"))
        # fill the tmpfs, so any write to a hole in the backing file fails with ENOSPC
        subprocess.run(["dd", "if=/dev/zero", f"of={fs / 'filler'}", "bs=64k"], capture_output=True)
        agent = agent_for("block_io")
        failed = 0
        fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
        try:
            import mmap
            buf = mmap.mmap(-1, 4096)
            for i in range(17):
                try:
                    os.pwrite(fd, buf, (1 << 20) * (i + 4))
                except OSError:
                    failed += 1
        finally:
            os.close(fd)
        flush(agent)
    finally:
        if dev:
            sh("losetup", "-d", dev, check=False)
        sh("umount", str(fs), check=False)
    assert failed == 17
    disk = os.path.basename(dev)
    rows = select(influx, influx_db, f"SELECT sum(errors), sum(requests) FROM block_io WHERE disk='{disk}' GROUP BY op")
    errors = {r["op"]: r["sum"] for r in rows}
    assert sum(errors.values()) == failed
    assert set(k for k, v in errors.items() if v) <= {"write", "sync_write"}


@pytest.mark.slow_disk
def test_utilisation_matches_diskstats(agent_for, influx, influx_db, loopdev):
    agent = agent_for("block_io")
    disk = os.path.basename(loopdev)

    def io_ticks():
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if f[2] == disk:
                return int(f[12])
        raise AssertionError(f"{disk} not in /proc/diskstats")

    agent.poll()
    t0, ticks0 = time.monotonic(), io_ticks()
    # bursts of synchronous direct I/O with pauses
    end = time.monotonic() + 3
    while time.monotonic() < end:
        sh("dd", "if=/dev/zero", f"of={loopdev}", "bs=64k", "count=200", "oflag=direct")
        time.sleep(0.05)
    points = agent.poll()
    t1, ticks1 = time.monotonic(), io_ticks()
    ours = [p.fields["util_pct"] for p in points if p.measurement == "disk_busy" and p.tags["disk"] == disk]
    theirs = (ticks1 - ticks0) / ((t1 - t0) * 1000) * 100
    # The kernel's io_ticks rounds each busy stretch up to a jiffy, so the two only
    # agree when the disk is busy a real fraction of the time (about 20 % here).
    assert len(ours) == 1 and theirs > 10
    assert abs(ours[0] - theirs) <= 3, (ours[0], theirs)


def spinner(seconds: float, cpu: int | None = None) -> subprocess.Popen:
    code = f"import time\nt = time.time() + {seconds}\nwhile time.time() < t: pass\nimport sys; sys.stdin.read()"
    cmd = [sys.executable, "-c", code]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu)] + cmd
    return subprocess.Popen(cmd, stdin=subprocess.PIPE)


def cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def test_spinner_cpu_matches_proc_stat(agent_for, influx, influx_db):
    agent = agent_for("cpu")
    p = spinner(5)
    try:
        for _ in range(6):
            time.sleep(1)
            agent.poll()
        used = cpu_seconds(p.pid)  # it has stopped spinning and waits on stdin
        flush(agent)
    finally:
        p.kill()
        p.wait()
    rows = select(influx, influx_db, f"SELECT sum(oncpu_us), max(cpu_pct) FROM process_cpu WHERE pid='{p.pid}'")
    oncpu = rows[0]["sum"] / 1e6
    assert abs(oncpu - used) <= 0.05 * used, (oncpu, used)
    assert 90 <= rows[0]["max"] <= 110


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
