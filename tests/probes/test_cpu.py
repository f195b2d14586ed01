"""Probe cpu: process_cpu from counters the kernel keeps, read at poll time, plus one
record per exiting thread. Checked against /proc/<pid>/stat and against the kernel's
own account of a reaped child (wait4's rusage); then end to end into InfluxDB."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import drain, make_config, select, spinner

from sonde.bpf.cpu.probe import ZERO, fold, parse_schedstat, parse_stat, parse_switches
from sonde.ingest.runtime.probe import LoadedProbe, discover


# --- from test_cpu.py -----------------------------------------------------------


TICK = os.sysconf("SC_CLK_TCK")


SCHEDSTAT = "952258480 953015113 296\n"


STATUS_TAIL = """\
Cpus_allowed:\t3
Cpus_allowed_list:\t0-1
Mems_allowed_list:\t0
voluntary_ctxt_switches:\t17
nonvoluntary_ctxt_switches:\t279
"""


# comm may hold spaces and parentheses: fields count from the last ')'
STAT = ("19313 (a (b) c) R 19309 19309 3247 0 -1 4194304 100 0 0 0 7 3 0 0 20 0 1 0 100608 3133440 373 "
        "18446744073709551615 94733768302592 94733768322473 140725404246016 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n")


ZOMBIE = "42 (sh) Z 1 42 42 0 -1 4227084 91 0 0 0 0 0 0 0 20 0 1 0 555 0 0 18446744073709551615 0 0 0 0 0\n"


@pytest.mark.hot_path
def test_parsers_on_literal_proc_text():
    assert parse_schedstat(SCHEDSTAT) == (952258480, 953015113, 296)
    assert parse_switches(STATUS_TAIL) == (17, 279)
    assert parse_stat(STAT) == ("R", 100608)
    assert parse_stat(ZOMBIE) == ("Z", 555)
    with pytest.raises(ValueError):
        parse_switches("Name:\tx\nState:\tS (sleeping)\n")


@pytest.mark.hot_path
def test_fold_keeps_totals_exact():
    rows = [(pid, f"p{pid}", (pid * 1000, pid, 1, pid % 3, 2)) for pid in range(1, 8)]
    refused = {6}  # the series budget refuses one of the top processes: it folds too
    kept, other = fold(rows, 3, lambda pid, name: pid not in refused)
    assert [r[0] for r in kept] == [7, 5]
    total = tuple(sum(r[2][i] for r in rows) for i in range(5))
    assert tuple(sum(x) for x in zip(other, *(r[2] for r in kept))) == total
    assert fold(rows, 10, lambda *_: True) == (sorted(rows, key=lambda r: -r[2][0]), None)
    assert fold([], 3, lambda *_: True) == ([], None)
    assert ZERO == (0, 0, 0, 0, 0)


@pytest.fixture
def cpu_probe(bpf_ready, tmp_path):
    """load(extra_yaml) -> the cpu probe loaded alone (no store: tests read its points)."""
    loaded = []

    def load(extra: str = "") -> LoadedProbe:
        p = LoadedProbe.load(discover()["cpu"], make_config(tmp_path, extra))
        loaded.append(p)
        return p
    yield load
    for p in loaded:
        p.close()


def poll(probe) -> list:
    points, me = probe.poll(time.time_ns())
    assert me.fields["poll_success"] == 1 and me.fields["map_full_drops"] == 0
    return points


def of(points, pid) -> list[dict]:
    return [p.fields | {"comm": p.tags["comm"]} for p in points if p.tags["pid"] == str(pid)]


def total(rows, field) -> int:
    return sum(r[field] for r in rows)


SPIN = "import time, sys\nt = time.time() + {s}\nwhile time.time() < t: pass\n"


def stat_cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def task_counters(pid: int) -> tuple[int, int, int, int]:
    """(run-queue wait ns, waits, voluntary, involuntary) summed over the live threads."""
    rq = waits = vol = invol = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        _, d, n = parse_schedstat(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text())
        v, i = parse_switches(Path(f"/proc/{pid}/task/{tid}/status").read_text())
        rq, waits, vol, invol = rq + d, waits + n, vol + v, invol + i
    return rq, waits, vol, invol


@pytest.mark.hot_path
def test_spinner_cpu_matches_proc_stat(cpu_probe):
    probe = cpu_probe()
    # spins 4 s, then sleeps on stdin, alive, so /proc/<pid>/stat can be read after
    p = subprocess.Popen([sys.executable, "-c", SPIN.format(s=4) + "sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        rows = []
        for _ in range(5):
            time.sleep(1)
            rows += of(poll(probe), p.pid)
        used = stat_cpu_seconds(p.pid)
        rq, waits, vol, invol = task_counters(p.pid)
        rows += of(poll(probe), p.pid)
    finally:
        p.kill()
        p.wait()
    oncpu = total(rows, "oncpu_us") / 1e6
    assert abs(oncpu - used) <= 0.02 * used, (oncpu, used)
    for r in rows:
        assert r["cpu_pct"] == pytest.approx(r["oncpu_us"] / r["interval_us"] * 100, rel=1e-3, abs=1e-3)
    # the other fields read the same per-thread counters /proc shows: exact, up to
    # the per-interval rounding of ns to µs
    assert abs(total(rows, "runq_wait_us") - rq // 1000) <= len(rows)
    assert (total(rows, "runq_waits"), total(rows, "voluntary_switches"),
            total(rows, "involuntary_switches")) == (waits, vol, invol)


def exiting_child(spin_before: float, spin_after: float, threads: int = 0, name: str = "sonde-exit"):
    """A child named `name` that spins, says so on stdout, waits for a line on stdin,
    spins again in `threads` extra threads plus its main thread, and exits."""
    code = (f"import sys, threading, time\nopen('/proc/self/comm', 'w').write({name!r})\n"
            + SPIN.format(s=spin_before) + "print('ready', flush=True)\nsys.stdin.readline()\n"
            + f"def spin():\n    t = time.time() + {spin_after}\n    while time.time() < t: pass\n"
            + f"ts = [threading.Thread(target=spin) for _ in range({threads})]\n"
            + "[t.start() for t in ts]\nspin()\n[t.join() for t in ts]\n")
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


@pytest.mark.hot_path
@pytest.mark.parametrize("threads", [0, 2])
def test_process_that_exits_between_polls_keeps_its_last_interval(cpu_probe, threads):
    probe = cpu_probe()
    child = exiting_child(1.0, 1.0, threads)
    try:
        assert child.stdout.readline().strip() == "ready"
        before = of(poll(probe), child.pid)  # alive: its first second
        child.stdin.write("go\n")
        child.stdin.flush()
        _, status, ru = os.wait4(child.pid, 0)  # reaped: gone from /proc before the next poll
        assert status == 0
        assert not Path(f"/proc/{child.pid}").exists()
        after = of(poll(probe), child.pid)
        later = of(poll(probe), child.pid)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    used = ru.ru_utime + ru.ru_stime  # the kernel's own total for the reaped child
    assert before and after, "the last interval, after the process is gone, must be reported"
    assert later == [], "and only once"
    assert after[0]["comm"] == "sonde-exit"
    oncpu = (total(before, "oncpu_us") + total(after, "oncpu_us")) / 1e6
    assert abs(oncpu - used) <= 0.02 * used, (oncpu, used)
    # rusage counts every thread's switches, also those after its exit record (the last
    # one, and preemptions while it tears down, more of them on a busy host)
    switches = total(before + after, "voluntary_switches") + total(before + after, "involuntary_switches")
    kernel = ru.ru_nvcsw + ru.ru_nivcsw
    assert kernel - max(4 * (threads + 1), 0.01 * kernel) <= switches <= kernel, (switches, kernel)


@pytest.mark.hot_path
def test_processes_born_and_gone_between_polls_are_reported_whole(cpu_probe):
    probe = cpu_probe()
    poll(probe)
    pids, used = [], 0.0
    for _ in range(5):
        c = subprocess.Popen([sys.executable, "-c", "open('/proc/self/comm', 'w').write('sonde-brief')\n"
                              + SPIN.format(s=0.3)])
        _, _, ru = os.wait4(c.pid, 0)
        pids.append(c.pid)
        used += ru.ru_utime + ru.ru_stime
    points = poll(probe)
    rows = [r for pid in pids for r in of(points, pid)]
    assert len(rows) == len(pids) and {r["comm"] for r in rows} == {"sonde-brief"}
    oncpu = total(rows, "oncpu_us") / 1e6
    assert abs(oncpu - used) <= 0.02 * used, (oncpu, used)


@pytest.mark.hot_path
def test_top_n_folds_the_rest_into_other(cpu_probe):
    probe = cpu_probe("probes:\n  cpu:\n    max_processes: 1\n")
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN.format(s=1.5)]) for _ in range(3)]
    try:
        time.sleep(1)
        points = poll(probe)
    finally:
        for s in spinners:
            s.wait()
    assert len(points) == 2 and points[1].tags == {"host": probe.config.host, "pid": "other", "comm": "other"}
    # two of the three spinners are in `other`, whole: at least a second of CPU between them
    assert points[1].fields["oncpu_us"] > 1_000_000


@pytest.mark.hot_path
def test_zombie_is_counted_once(cpu_probe):
    probe = cpu_probe()
    child = exiting_child(0.5, 0.5)
    try:
        assert child.stdout.readline().strip() == "ready"
        rows = of(poll(probe), child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        stat = Path(f"/proc/{child.pid}/stat")
        deadline = time.monotonic() + 30
        while parse_stat(stat.read_text())[0] != "Z":  # exited, not reaped: still listed
            assert time.monotonic() < deadline
            time.sleep(0.05)
        rows += of(poll(probe), child.pid) + of(poll(probe), child.pid)
        _, _, ru = os.wait4(child.pid, 0)
        rows += of(poll(probe), child.pid) + of(poll(probe), child.pid)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    used = ru.ru_utime + ru.ru_stime
    oncpu = total(rows, "oncpu_us") / 1e6
    assert abs(oncpu - used) <= 0.02 * used, (oncpu, used)


@pytest.mark.hot_path
def test_thread_churn_keeps_switches_exact(cpu_probe):
    """Threads that come and go between polls: each adds what it did once, from its
    exit record, so the process's switches add up to the kernel's own total."""
    probe = cpu_probe()
    code = ("import threading, time\n" + "def work():\n" + "    " + SPIN.format(s=0.02).replace("\n", "\n    ")
            + "time.sleep(0.001)\nend = time.time() + 3\nwhile time.time() < end:\n"
            "    ts = [threading.Thread(target=work) for _ in range(3)]\n"
            "    [t.start() for t in ts]\n    [t.join() for t in ts]\n")
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        rows = []
        for _ in range(3):
            time.sleep(0.9)
            rows += of(poll(probe), child.pid)
        _, _, ru = os.wait4(child.pid, 0)
        rows += of(poll(probe), child.pid)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    used = ru.ru_utime + ru.ru_stime
    oncpu = total(rows, "oncpu_us") / 1e6
    assert abs(oncpu - used) <= 0.02 * used, (oncpu, used)
    # each exiting thread may switch after its exit record (see above): within 1 %
    switches = total(rows, "voluntary_switches") + total(rows, "involuntary_switches")
    kernel = ru.ru_nvcsw + ru.ru_nivcsw
    assert kernel - max(8, 0.01 * kernel) <= switches <= kernel, (switches, ru.ru_nvcsw, ru.ru_nivcsw)


# --- from test_infra.py ---------------------------------------------------------


@pytest.fixture
def agent_for(agents):
    return agents


flush = drain



def cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.infra
def test_spinner_cpu_matches_proc_stat_in_influxdb(agent_for, influx, influx_db):
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


THREADS = """\
import sys, threading, time
def spin(seconds):
    t = time.time() + seconds
    while time.time() < t:
        pass
def idle(seconds):
    time.sleep(seconds)
kind, seconds = sys.argv[1], float(sys.argv[2])
# 'stuck': one thread spins while three sleep; 'shared': three threads take turns on the GIL
work = [spin] + [idle] * 3 if kind == "stuck" else [spin] * 3
threads = [threading.Thread(target=w, args=(seconds,)) for w in work]
for t in threads:
    t.start()
print("go", flush=True)
for t in threads:
    t.join()
"""


@pytest.mark.truth
def test_busiest_thread_tells_a_stuck_thread_from_shared_work(cpu_probe):
    """max_thread_oncpu_us (what the per-thread cpu_pinned rule reads): with one of four
    threads spinning it carries the whole process's CPU; with three threads taking turns
    on the GIL no thread carries more than about half of it. Checked against each
    thread's own utime+stime in /proc/<pid>/task/<tid>/stat over the same run."""
    probe = cpu_probe()
    for kind in ("stuck", "shared"):
        poll(probe)
        child = subprocess.Popen([sys.executable, "-c", THREADS, kind, "3"], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "go"
        tids = os.listdir(f"/proc/{child.pid}/task")
        time.sleep(2.5)
        per_thread = {}
        for tid in tids:   # the threads' own accounts, read while they live
            f = Path(f"/proc/{child.pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            per_thread[tid] = (int(f[11]) + int(f[12])) / TICK
        rows = of(poll(probe), child.pid)
        child.wait(timeout=30)
        assert rows, f"no process_cpu point for the {kind} process"
        oncpu, busiest = rows[0]["oncpu_us"], rows[0]["max_thread_oncpu_us"]
        share = max(per_thread.values()) / max(sum(per_thread.values()), 1e-9)
        assert oncpu > 1_000_000, rows   # it ran over a second of CPU in the interval
        if kind == "stuck":
            assert share > 0.95, per_thread
            assert busiest >= 0.95 * oncpu, rows
        else:
            assert share < 0.6, per_thread
            assert busiest <= 0.6 * oncpu, rows
        assert busiest <= oncpu
