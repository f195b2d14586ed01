#!/usr/bin/env python3
"""A/B overhead benchmark: nginx under wrk, without (baseline) and with the Sonde agent
running (agent), in pairs of runs whose arm order is randomised (seeded) or alternated.

    .venv/bin/python bench/ab.py --name tcp --probe tcp                   # req/s at saturation
    .venv/bin/python bench/ab.py --name x --probe tcp --rate 75000        # CPU per request at a fixed rate
    .venv/bin/python bench/ab.py --name short_conns --probe tcp --close   # a new connection per request

The loss is reported from the arms' medians with a 95 % bootstrap interval of the
median per-pair ratio (bench/stats.py). With BPF statistics on (default) every
program on the machine is counted over each wrk window: runs and ns per request.
Everything it starts (its own nginx, each agent and that agent's embedded influxd,
wrk, temp dirs) it stops and removes in finally blocks, by the pid it started.
Writes bench/results/<name>.json (or --out). Needs root (the agent loads BPF programs).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import re
import resource
import shlex
import shutil
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(REPO))
import stats as bstats  # noqa: E402  (bench/stats.py)
from sonde.ingest.runtime import bpfinfo  # noqa: E402
RESULTS_DIR = BENCH_DIR / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
OTHER_CPU_WARN = 10  # % of one core used by processes not ours during a run: flag it

NGINX_CONF = """\
worker_processes 2;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;

    server {{
        listen 127.0.0.1:{port};
        location = /sonde-stub-status {{
            stub_status;
        }}
        location / {{
            default_type text/plain;
            return 200 "hello\\n";
        }}
    }}
}}
"""


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[ab {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no output)"


# --- /proc sampling -------------------------------------------------------------------

def cpu_ticks(pid: int) -> int | None:
    """utime+stime of the whole process (all its threads, not its children)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) on
    return int(fields[11]) + int(fields[12])    # utime (14), stime (15)


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def children_of(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            kids += [int(k) for k in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return kids


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


# --- processes we start ---------------------------------------------------------------

def stop_proc(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 20.0, what: str = "") -> None:
    """Stop one process we started, by its pid: `sig`, then SIGKILL after `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"{what or proc.pid} did not stop within {timeout:.0f} s; SIGKILL")
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


class Nginx:
    def __init__(self, root: Path, cgroup: Path | None = None):
        self.cgroup = cgroup  # a cgroup v2 directory nginx starts in, or None
        self.prefix = root / "nginx"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> "Nginx":
        self.prefix.mkdir(parents=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=self.prefix, port=self.port))
        out = open(self.prefix / "stdout.log", "wb")
        try:
            self.proc = subprocess.Popen(
                ["nginx", "-p", str(self.prefix), "-e", str(self.prefix / "error.log"), "-c", str(conf)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=self._join_cgroup if self.cgroup else None)
        finally:
            out.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"nginx exited at start: {tail(self.prefix / 'error.log')} {tail(self.prefix / 'stdout.log')}")
            try:
                with urllib.request.urlopen(self.url, timeout=1) as r:
                    body = r.read()
                if r.status == 200 and body == b"hello\n":
                    return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise BenchError(f"nginx did not answer on {self.url} within 10 s: {tail(self.prefix / 'error.log')}")

    def _join_cgroup(self) -> None:
        (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))

    def requests(self) -> int:
        """Requests nginx has handled since start (its stub_status counter, which counts
        this read too: one request per call)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/sonde-stub-status", timeout=5) as r:
            lines = r.read().decode().splitlines()
        return int(lines[2].split()[2])

    def stop(self) -> None:
        # SIGQUIT: graceful shutdown; the master stops its own workers.
        stop_proc(self.proc, signal.SIGQUIT, timeout=10, what="nginx")
        self.proc = None


class AgentRun:
    """One `sonde run` with a fresh state dir and free loopback ports for its embedded InfluxDB."""

    def __init__(self, root: Path, sonde: list[str], probes: list[str], interval: float,
                 env: dict[str, str] | None = None, extra: dict | None = None):
        self.dir = root
        self.extra = extra or {}
        self.sonde = sonde
        self.env = env
        self.probes = probes
        self.interval = interval
        self.http_port, self.rpc_port = free_ports(2)
        self.proc: subprocess.Popen | None = None
        self.influxd_pid: int | None = None
        self.stderr_path = self.dir / "agent.stderr"
        self.exit_code: int | None = None

    def command(self) -> list[str]:
        cmd = self.sonde + ["run", "-c", str(self.dir / "sonde.yaml")]
        for p in self.probes:
            cmd += ["--probe", p]
        return cmd

    def start(self, timeout: float = 180.0, settle: float = 2.0) -> "AgentRun":
        self.dir.mkdir(parents=True)
        cfg = {  # JSON is YAML
            "state_dir": str(self.dir / "state"),
            "interval_seconds": self.interval,
            "embedded": {"http_port": self.http_port, "rpc_port": self.rpc_port},
            **self.extra,
        }
        (self.dir / "sonde.yaml").write_text(json.dumps(cfg, indent=2) + "\n")
        err = open(self.stderr_path, "wb")
        try:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=err,
                                         stderr=subprocess.STDOUT, start_new_session=True, cwd=self.dir,
                                         env=self.env)
        finally:
            err.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.exit_code = self.proc.returncode
                raise BenchError(f"agent exited with {self.proc.returncode} before it was ready; its stderr:\n"
                                 f"{tail(self.stderr_path, 40)}")
            self._find_influxd()
            if "polling" in self.stderr_path.read_text(errors="replace") and self._ping():
                time.sleep(settle)
                self._find_influxd()
                return self
            time.sleep(0.2)
        raise BenchError(f"agent not ready within {timeout:.0f} s; its stderr:\n{tail(self.stderr_path, 40)}")

    def _ping(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/ping", timeout=1) as r:
                return r.status == 204
        except (urllib.error.URLError, OSError):
            return False

    def _find_influxd(self) -> None:
        if self.influxd_pid is not None or self.proc is None:
            return
        for kid in children_of(self.proc.pid):
            if comm(kid) == "influxd" and any(str(self.dir) in a for a in cmdline(kid)):
                self.influxd_pid = kid

    def count_points(self) -> dict[str, int] | None:
        """Points per measurement in the embedded InfluxDB now: shows the probes really wrote."""
        q = urllib.parse.urlencode({"db": "sonde", "q": "SELECT count(*) FROM /.*/"})
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/query?{q}", timeout=5) as r:
                res = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None
        counts = {}
        for series in res.get("results", [{}])[0].get("series", []):
            values = [v for v in series["values"][0][1:] if isinstance(v, int)]
            counts[series["name"]] = max(values) if values else 0
        return counts

    def loaded_probes(self) -> list[str]:
        text = self.stderr_path.read_text(errors="replace")
        return re.findall(r"probe (\S+) loaded in", text)

    def log_problems(self) -> list[str]:
        text = self.stderr_path.read_text(errors="replace")
        return [ln.strip() for ln in text.splitlines()
                if re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|sonde: (error|internal error)", ln)]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGINT: the agent's clean stop (last poll, then it stops its influxd).
            stop_proc(self.proc, signal.SIGINT, timeout=60, what="agent")
        if self.proc is not None:
            self.exit_code = self.proc.returncode
        self.proc = None
        # The agent stops its influxd; if the agent was killed, stop the one it started for us.
        pid = self.influxd_pid
        if pid and comm(pid) == "influxd" and any(str(self.dir) in a for a in cmdline(pid)):
            log(f"influxd {pid} outlived its agent; SIGTERM")
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    if comm(pid) != "influxd":
                        break
                    time.sleep(0.1)
                else:
                    os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- wrk --------------------------------------------------------------------------------

# Paced requests for --rate: each wrk thread hands out send times on one schedule
# (period = threads / rate) and delay() returns how long the asking connection waits
# for its slot. wrk's timers have millisecond resolution, so one request may go up to
# 0.5 ms early or late, but the schedule does not drift: the long-run rate is the
# target as long as enough connections are waiting (otherwise it is saturated, and
# the achieved rate says so). LuaJIT's FFI gives the monotonic clock wrk lacks.
RATE_LUA = """\
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} sonde_timespec;
int clock_gettime(int clk, sonde_timespec *ts);
]]
local ts = ffi.new("sonde_timespec")
local function now()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
local period = {period!r}  -- seconds between two requests of this thread
local next_at = nil
function delay()
  local t = now()
  -- more than 1 s behind: saturated; restart the schedule rather than burst
  if next_at == nil or next_at < t - 1.0 then next_at = t end
  local at = next_at
  next_at = next_at + period
  local ms = (at - t) * 1000
  if ms < 0.5 then return 0 end
  return math.floor(ms + 0.5)
end
"""


def parse_rps(out: str) -> float:
    m = re.search(r"^Requests/sec:\s*([0-9.]+)", out, re.M)
    if not m:
        raise BenchError(f"no 'Requests/sec:' in wrk output:\n{out}")
    return float(m.group(1))


def parse_requests(out: str) -> int:
    """Requests wrk completed: its '  N requests in 10.00s, ...' line."""
    m = re.search(r"^\s*(\d+) requests in ", out, re.M)
    if not m:
        raise BenchError(f"no 'N requests in' line in wrk output:\n{out}")
    return int(m.group(1))


def parse_errors(out: str) -> dict[str, int]:
    """wrk's socket errors and non-2xx/3xx responses; {} when it printed none."""
    errs: dict[str, int] = {}
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errs.update(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errs["non_2xx_3xx"] = int(m.group(1))
    return {k: v for k, v in errs.items() if v}


def system_ticks() -> dict[str, int]:
    """Machine-wide CPU ticks from /proc/stat: task time (user+nice+system), softirq+irq,
    steal, and busy = all of those (everything but idle and iowait; guest time is inside user)."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    f += [0] * (10 - len(f))
    return {"task": f[0] + f[1] + f[2], "irq": f[5] + f[6], "steal": f[7],
            "busy": f[0] + f[1] + f[2] + f[5] + f[6] + f[7]}


def bpf_snapshot() -> dict[int, tuple[str, int, int]]:
    return bpfinfo.all_run_stats()


def bpf_delta(before: dict, after: dict) -> dict[str, list[int]]:
    """Runs and run time per program name between two snapshots (a program loaded in
    between counts from 0; one unloaded in between is lost, and the agent keeps its
    programs loaded across the window)."""
    out: dict[str, list[int]] = {}
    for pid, (name, cnt, ns) in after.items():
        _, c0, n0 = before.get(pid, (name, 0, 0))
        d = out.setdefault(name or f"id{pid}", [0, 0])
        d[0] += max(cnt - c0, 0)
        d[1] += max(ns - n0, 0)
    return {k: v for k, v in out.items() if v[0] or v[1]}


def held_prog_ids(pid: int) -> set[int]:
    """Ids of the BPF programs a process holds an fd to (/proc/PID/fdinfo 'prog_id:')."""
    ids: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return ids
    for fd in fds:
        try:
            m = re.search(r"^prog_id:\s*(\d+)", Path(f"/proc/{pid}/fdinfo/{fd}").read_text(), re.M)
        except OSError:
            continue
        if m:
            ids.add(int(m.group(1)))
    return ids


def run_wrk(cmd: list[str], duration: float, sample_pids: dict[str, int | None] | None = None,
            nginx_pid: int | None = None, bpf: bool = False) -> tuple[float, dict, str]:
    """Run wrk to the end; meanwhile sample the CPU and RSS of `sample_pids`, and the CPU of
    nginx (master and workers), wrk, this script and the whole machine, so that CPU used by
    processes that are not ours ("other": other people's tests, builds) shows per run.
    With `bpf`, also the runs and run time of every BPF program on the machine over the
    window (statistics must be on: bpfinfo.enable_stats()).
    Returns (req/s, {name: {"cpu_pct", "rss_kb_max"}, "system": {...}, "window": {...}}, wrk stdout)."""
    sample_pids = {k: v for k, v in (sample_pids or {}).items() if v}
    ours = dict(sample_pids)
    ours["bench"] = os.getpid()
    if nginx_pid:
        ours["nginx"] = nginx_pid
        for i, kid in enumerate(children_of(nginx_pid)):
            ours[f"nginx-worker-{i}"] = kid
    start_ticks = {k: cpu_ticks(p) for k, p in ours.items()}
    rss_max = {k: rss_kb(p) or 0 for k, p in sample_pids.items()}
    bpf0 = bpf_snapshot() if bpf else {}
    sys0 = system_ticks()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        while proc.poll() is None:
            for k, p in sample_pids.items():
                rss_max[k] = max(rss_max[k], rss_kb(p) or 0)
            try:
                proc.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() - t0 > duration + 60:
                raise BenchError(f"wrk still running {duration + 60:.0f} s after start")
        t1 = time.monotonic()
        sys1 = system_ticks()
        bpf1 = bpf_snapshot() if bpf else {}
        end_ticks = {k: cpu_ticks(p) for k, p in ours.items()}
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child reaped in the window
        out = proc.stdout.read().decode(errors="replace")
    finally:
        stop_proc(proc, signal.SIGTERM, timeout=5, what="wrk")
        if proc.stdout:
            proc.stdout.close()
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with {proc.returncode}:\n{out}")
    wall = t1 - t0

    def pct(ticks: float | None) -> float | None:
        return None if ticks is None else round(ticks / CLK_TCK / wall * 100, 2)

    deltas = {k: (None if start_ticks[k] is None or end_ticks[k] is None else end_ticks[k] - start_ticks[k])
              for k in ours}
    stats: dict = {k: {"cpu_pct": pct(deltas[k]), "rss_kb_max": rss_max[k]} for k in sample_pids}
    wrk_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    own = sum(d for d in deltas.values() if d) + wrk_s * CLK_TCK
    stats["system"] = {
        "nginx_cpu_pct": pct(sum(d or 0 for k, d in deltas.items() if k.startswith("nginx"))),
        "wrk_cpu_pct": round(wrk_s / wall * 100, 2),
        "softirq_cpu_pct": pct(sys1["irq"] - sys0["irq"]),
        "steal_pct": pct(sys1["steal"] - sys0["steal"]),
        "busy_cpu_pct": pct(sys1["busy"] - sys0["busy"]),
        # task time of processes that are not ours; tick rounding makes a few % either way
        "other_cpu_pct": pct(max(0.0, (sys1["task"] - sys0["task"]) - own)),
    }
    requests = parse_requests(out)
    busy_s = (sys1["busy"] - sys0["busy"]) / CLK_TCK
    stats["window"] = {
        "wall_s": round(wall, 3),
        "requests": requests,
        "busy_cpu_s": round(busy_s, 2),
        "cpu_us_per_request": round(busy_s / requests * 1e6, 3) if requests else None,
        "wrk_errors": parse_errors(out),
    }
    if bpf:
        by_prog = bpf_delta(bpf0, bpf1)
        runs, ns = sum(v[0] for v in by_prog.values()), sum(v[1] for v in by_prog.values())
        stats["bpf"] = {"runs": runs, "run_time_ns": ns, "by_program": by_prog,
                        "runs_per_request": round(runs / requests, 4) if requests else None,
                        "ns_per_request": round(ns / requests, 2) if requests else None,
                        "ids": set(bpf1) | set(bpf0), "snap": (bpf0, bpf1)}
    return parse_rps(out), stats, out


# --- main ------------------------------------------------------------------------------

def the_command() -> str:
    exe = sys.executable
    rel = os.path.relpath(exe)
    if not rel.startswith(".."):
        exe = rel
    return shlex.join([exe] + sys.argv)


def git(*args: str, cwd: Path = REPO, strip: bool = True) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout
    return out.strip() if strip else out.rstrip("\n")


def source_description() -> str:
    """Which code the agent ran: HEAD, and whether ingest/ or bpf/ had uncommitted changes."""
    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--", "ingest", "bpf", strip=False)
    except (OSError, subprocess.CalledProcessError):
        return "working tree (not a git checkout?)"
    if not dirty:
        return f"working tree at {head}, ingest/ and bpf/ clean"
    return f"working tree at {head} with uncommitted changes in: {', '.join(l[3:] for l in dirty.splitlines())}"


def export_rev(rev: str, dest: Path) -> str:
    """`git archive REV` into dest, so the agent runs committed code, not a tree others are editing."""
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", "--format=tar", sha], cwd=REPO, stdout=subprocess.PIPE)
    try:
        subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    finally:
        archive.stdout.close()
        if archive.wait() != 0:
            raise BenchError(f"git archive {sha} failed")
    return sha


def fmt_system(st: dict) -> str:
    return (f"nginx {st['nginx_cpu_pct']} %, wrk {st['wrk_cpu_pct']} %, softirq {st['softirq_cpu_pct']} %, "
            f"steal {st['steal_pct']} %, machine busy {st.get('busy_cpu_pct')} %, "
            f"other processes {st['other_cpu_pct']} %")


def bpf_note(b: dict) -> str:
    return f", BPF {b['runs_per_request']} runs {b['ns_per_request']} ns/req" if b else ""


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 2) if xs else None


def median_n(xs: list, digits: int) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), digits) if xs else None


class AttachedPoller:
    """The toggle benchmarks' agent arm in user space: a loaded probe (or None) polled
    every `interval` seconds of attached time in a thread of this process, as the agent
    would; `start()` at attach, `stop()` at detach. poll_cpu_s is that thread's CPU."""

    def __init__(self, loaded, interval: float):
        self.loaded, self.interval = loaded, interval
        self.poll_cpu_s, self.polls, self.attached_s, self._due = 0.0, 0, 0.0, 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _work(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.05):
            now = time.monotonic()
            self._due, last = self._due + now - last, now
            if self._due < self.interval or self.loaded is None:
                continue
            self._due = 0.0
            c0 = time.thread_time()
            self.loaded.poll(time.time_ns())
            self.poll_cpu_s += time.thread_time() - c0
            self.polls += 1

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self.attached_s += time.monotonic() - self._t0
        self._stop.set()
        self._thread.join()
        self._thread = None

    def cpu_pct_of_machine(self) -> float | None:
        return self.poll_cpu_s / self.attached_s / (os.cpu_count() or 1) * 100 if self.attached_s else None


class ToggleWindows:
    """The windows of a toggle benchmark (fio_toggle.py, hook_toggle.py), as run_toggled
    calls them: the units `count()` went up by in `seconds` (less `own`, the units the
    reading itself adds), per second in `rate`, the machine's busy CPU µs per unit in
    `cpu`, and with stats the toggle's program runs and run time per unit."""

    def __init__(self, count, seconds: float, toggle, check, own: int = 0):
        self.count, self.seconds, self.toggle, self.check, self.own = count, seconds, toggle, check, own
        self.rate: dict[str, list[float]] = {"baseline": [], "agent": []}
        self.cpu: dict[str, list[float]] = {"baseline": [], "agent": []}
        self.runs: list[float] = []
        self.ns: list[float] = []

    def __call__(self, arm: str, record: bool = True, stats: bool = False) -> None:
        self.check()
        t0, r0, s0 = time.monotonic(), self.count(), system_ticks()
        p0 = self.toggle.prog_stats() if stats else (0, 0)
        time.sleep(self.seconds)
        t1, r1, s1 = time.monotonic(), self.count(), system_ticks()
        n = r1 - r0 - self.own
        if record:
            self.rate[arm].append(n / (t1 - t0))
            self.cpu[arm].append((s1["busy"] - s0["busy"]) / CLK_TCK / n * 1e6 if n else 0.0)
        if stats and n:
            p1 = self.toggle.prog_stats()
            self.runs.append((p1[0] - p0[0]) / n)
            self.ns.append((p1[1] - p0[1]) / n)


def run_toggled(orders: list[str], toggle, window: "ToggleWindows", stats_windows: int) -> None:
    """The toggle benchmarks' loop (fio_toggle.py, hook_toggle.py): for each pair's order,
    `toggle.attach()` or `.detach()` as the arm needs and `window(arm)` ("agent" or
    "baseline"), logging the running median pair loss of its rates every 25 pairs; then
    a pass of `stats_windows` attached windows with bpf_stats on
    (`window("agent", record=False, stats=True)`). Leaves the toggle detached."""
    attached = False
    for i, order in enumerate(orders):
        for arm in order:
            want = arm == "A"
            if want != attached:
                toggle.attach() if want else toggle.detach()
                attached = want
            window("agent" if want else "baseline")
        if (i + 1) % 25 == 0:
            r = statistics.median(bstats.pair_ratios(window.rate["baseline"], window.rate["agent"]))
            log(f"pair {i + 1}/{len(orders)}: median pair loss so far {(1 - r) * 100:.2f} %")
    if not attached:
        toggle.attach()
    stats_fd = bpfinfo.enable_stats()
    try:
        for _ in range(stats_windows if stats_fd >= 0 else 0):
            window("agent", record=False, stats=True)
    finally:
        if stats_fd >= 0:
            os.close(stats_fd)
    toggle.detach()


def toggle_record(res: dict, orders: list[str], seed: int, values: dict[str, list[float]]) -> dict:
    """The fields every toggle result has: the loss as the median of per-pair ratios with
    its interval (`res` from stats.loss), the pairs, their order and the runs."""
    return {
        "baseline_median": round(statistics.median(values["baseline"]), 1),
        "agent_median": round(statistics.median(values["agent"]), 1),
        "loss_pct": round((1 - res["pair_ratio_median"]) * 100, 2),
        "loss_pct_ci95": res["loss_pct_ci95"],
        "arms_median_loss_pct": res["loss_pct"],
        "ratio_of_totals_loss_pct": round((1 - sum(values["agent"]) / sum(values["baseline"])) * 100, 2),
        "ci_method": res["ci_method"],
        "pair_ratios": res["pair_ratios"],
        "order": "".join(orders),
        "order_seed": seed,
        "baseline_runs": [round(x, 1) for x in values["baseline"]],
        "agent_runs": [round(x, 1) for x in values["agent"]],
        "agent_source": source_description(),
        "kernel": os.uname().release,
    }


def toggle_costs(win: "ToggleWindows", poller: "AttachedPoller", unit: str, stats_windows: int) -> dict:
    """What a toggle result says of the programs (from the statistics pass) and the poll,
    per `unit` (connection, request, io)."""
    pct = poller.cpu_pct_of_machine()
    return {
        "bpf_stats": f"off in the pairs; on for {stats_windows} attached windows after them",
        f"bpf_runs_per_{unit}": median_n(win.runs, 4),
        f"bpf_ns_per_{unit}": median_n(win.ns, 1),
        f"cpu_us_per_{unit}_median": median_n(win.cpu["baseline"], 2),
        "polls": poller.polls,
        "poll_cpu_pct_of_machine": round(pct, 4) if pct is not None else None,
    }


def write_result(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def pair_orders(runs: int, mode: str, seed: int) -> list[str]:
    """Arm order of each pair: "BA" or "AB". random: a balanced shuffle from `seed` (each
    order in half the pairs, the odd one out drawn too), so neither arm is mostly first;
    alternate: BA, AB, BA, ... (B A A B B A)."""
    if mode == "alternate":
        return ["BA" if i % 2 == 0 else "AB" for i in range(runs)]
    rng = random.Random(seed)
    first, second = rng.sample(("BA", "AB"), 2)
    orders = [first] * (runs - runs // 2) + [second] * (runs // 2)
    rng.shuffle(orders)
    return orders


def describe(args, probes: list[str]) -> str:
    agent = f"`sonde run` ({', '.join(probes) if probes else 'all probes'})"
    conns = ("every request on a new TCP connection (wrk -H 'Connection: close'; nginx closes first)"
             if args.close else "keep-alive connections")
    wrk = f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s"
    pairs = (f"{args.runs} pairs of runs, arm order within each pair "
             f"{'shuffled (balanced, seeded)' if args.order == 'random' else 'alternated (BA AB BA ...)'}")
    if args.rate:
        return (f"nginx (2 workers, 6-byte body) on loopback, driven at a fixed {args.rate:g} req/s by {wrk} "
                f"(paced by a Lua delay(), meant to stay below saturation: see rate_ok), {conns}; the machine's busy CPU time per request "
                f"(/proc/stat user+nice+system+irq+softirq+steal, so softirq and BPF programs count) without vs "
                f"with {agent}, {pairs}; loss = increase in CPU per request")
    return (f"nginx (2 workers, 6-byte body) on loopback, saturated by {wrk} on the same 2 cores, {conns}; "
            f"req/s without vs with {agent}, {pairs}; loss = drop in req/s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, help="result name: writes bench/results/NAME.json")
    ap.add_argument("--probe", action="append", default=[], metavar="NAME",
                    help="run the agent with only this probe (repeatable; default: all probes)")
    ap.add_argument("--runs", type=int, default=7, help="pairs of runs, one per arm each (default 7)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    ap.add_argument("--threads", type=int, default=2, help="wrk -t (default 2)")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    ap.add_argument("--rate", type=float, default=None, metavar="R",
                    help="fixed-rate mode: pace wrk at R requests/s in both arms (below saturation) and "
                         "compare the machine's busy CPU time per request instead of req/s")
    ap.add_argument("--rate-tolerance", type=float, default=3.0, metavar="PCT",
                    help="--rate: warn when a run's achieved rate is off the target by more than PCT %% (default 3)")
    ap.add_argument("--close", action="store_true",
                    help="short connections: wrk sends 'Connection: close', so every request opens a new one")
    ap.add_argument("--order", choices=("random", "alternate"), default="random",
                    help="arm order within each pair: random (a balanced shuffle, seeded; default) or "
                         "alternate (BA AB BA ...)")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of the random arm order (default: drawn, and recorded in the result)")
    ap.add_argument("--no-bpf-stats", action="store_true",
                    help="do not turn on BPF run-time statistics (they cost two clock reads per program run); "
                         "no bpf_* figures then")
    ap.add_argument("--interval", type=float, default=10, help="agent interval_seconds (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="seconds of unrecorded wrk before the first run (default 3; 0: none)")
    ap.add_argument("--notes", default="", help="free text stored in the result")
    ap.add_argument("--out", type=Path, default=None, help="result file (default bench/results/NAME.json)")
    ap.add_argument("--rev", metavar="REV",
                    help="run the agent from `git archive REV` in a temp dir instead of the working tree "
                         "(reproducible while others edit the tree)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (nginx and agent logs, configs) for debugging")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", args.name):
        ap.error("--name: letters, digits, '.', '_' and '-' only")
    if args.runs < 1 or args.duration < 1:
        ap.error("--runs and --duration must be at least 1")
    if args.rate is not None and args.rate <= 0:
        ap.error("--rate must be positive")
    if args.connections < args.threads:
        ap.error("--connections must be at least --threads")
    if os.geteuid() != 0:
        print("ab: must run as root (the agent loads BPF programs)", file=sys.stderr)
        return 1
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool):
            print(f"ab: {tool} not found on PATH; scripts/setup.sh install installs it", file=sys.stderr)
            return 1
    sonde_bin = Path(sys.executable).parent / "sonde"
    sonde = [str(sonde_bin)] if sonde_bin.exists() else [sys.executable, "-m", "sonde.ingest.cli"]
    agent_env = None
    seed = args.seed if args.seed is not None else secrets.randbelow(2 ** 31)
    orders = pair_orders(args.runs, args.order, seed)

    command = the_command()
    started = dt.datetime.now(dt.timezone.utc)
    out_path = args.out or RESULTS_DIR / f"{args.name}.json"

    # SIGTERM/SIGHUP to us: unwind through the finally blocks like Ctrl-C does.
    def _term(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGHUP, _term)

    # Per pair, in pair order (whatever arm ran first): the paired values.
    base_val: list[float] = []
    agent_val: list[float] = []
    base_rps: list[float] = []
    agent_rps: list[float] = []
    base_cpu_req: list[float | None] = []
    agent_cpu_req: list[float | None] = []
    base_bpf_runs: list[float | None] = []
    base_bpf_ns: list[float | None] = []
    agent_bpf_runs: list[float | None] = []
    agent_bpf_ns: list[float | None] = []
    agent_bpf_other_ns: list[float | None] = []
    agent_bpf_by_prog: list[dict] = []
    agent_cpu: list[float] = []
    influxd_cpu: list[float] = []
    agent_rss_kb: list[int] = []
    influxd_rss_kb: list[int] = []
    loaded: list[str] = []
    problems: list[str] = []
    order: list[str] = []
    points_seen: list[dict | None] = []
    detail: list[dict] = []  # per run, in order: arm, req/s and where the CPU went
    warnings: list[str] = []

    stats_fd = -1
    if not args.no_bpf_stats:
        stats_fd = bpfinfo.enable_stats()
        if stats_fd < 0:
            warnings.append("the kernel refused BPF_ENABLE_STATS (needs 5.8+ and root): no bpf_* figures")
    bpf_on = stats_fd >= 0

    tmp = Path(tempfile.mkdtemp(prefix="sonde-ab-"))
    nginx = Nginx(tmp)
    try:
        if args.rev:
            try:
                sha = export_rev(args.rev, tmp / "src")
            except subprocess.CalledProcessError as e:
                raise BenchError(f"--rev {args.rev}: {(e.stderr or '').strip() or e}")
            # PYTHONPATH comes before the venv's editable install, so ingest/ and bpf/ are the export's:
            # pkgs/sonde -> src makes the export importable as the `sonde` namespace (the layout since
            # issue 13); an older revision's top-level `ingest` package runs from src itself.
            (tmp / "pkgs").mkdir()
            (tmp / "pkgs" / "sonde").symlink_to(tmp / "src")
            new_layout = (tmp / "src" / "ingest" / "runtime").is_dir()
            sonde = [sys.executable, "-m", "sonde.ingest.cli" if new_layout else "ingest.cli"]
            agent_env = dict(os.environ, PYTHONPATH=f"{tmp / 'pkgs'}:{tmp / 'src'}")
            source = f"git archive {sha[:12]} ({args.rev})"
        else:
            source = source_description()
        log(f"agent code: {source}")
        nginx.start()
        wrk_opts = [f"-t{args.threads}", f"-c{args.connections}"]
        if args.close:
            wrk_opts += ["-H", "Connection: close"]
        if args.rate:
            lua = tmp / "rate.lua"
            lua.write_text(RATE_LUA.format(period=args.threads / args.rate))
            wrk_opts += ["-s", str(lua)]
        wrk = ["wrk", *wrk_opts, f"-d{args.duration}s", nginx.url]
        log(f"nginx {nginx.proc.pid} on {nginx.url}; temp dir {tmp}; pair orders {' '.join(orders)} "
            f"({args.order}, seed {seed}); BPF statistics {'on' if bpf_on else 'off'}")
        if args.warmup:
            log(f"warm-up: {args.warmup} s of wrk, not recorded")
            run_wrk(["wrk", *wrk_opts, f"-d{args.warmup}s", nginx.url], args.warmup, nginx_pid=nginx.proc.pid)
        for i, pair in enumerate(orders):
            for arm in pair:
                if arm == "B":
                    rps, stats, _ = run_wrk(wrk, args.duration, nginx_pid=nginx.proc.pid, bpf=bpf_on)
                    w, b = stats["window"], stats.get("bpf", {})
                    base_rps.append(rps)
                    base_cpu_req.append(w["cpu_us_per_request"])
                    base_bpf_runs.append(b.get("runs_per_request"))
                    base_bpf_ns.append(b.get("ns_per_request"))
                    if b.get("runs"):
                        warnings.append(f"BPF programs ran during baseline run {i + 1} (no agent): "
                                        f"{ {k: v[0] for k, v in b['by_program'].items()} } runs; another tool "
                                        f"loads programs on this machine")
                    order.append("B")
                    detail.append({"pair": i + 1, "arm": "baseline", "req_s": rps,
                                   **{k: v for k, v in w.items()}, **stats["system"],
                                   **({"bpf_runs": b["runs"], "bpf_run_time_ns": b["run_time_ns"],
                                       "bpf_by_program": b["by_program"]} if b else {})})
                    log(f"pair {i + 1}/{args.runs} baseline: {rps:.0f} req/s, {w['cpu_us_per_request']} CPU µs/req"
                        f"{bpf_note(b)}; {fmt_system(stats['system'])}")
                    continue
                run = AgentRun(tmp / f"agent-{i + 1}", sonde, args.probe, args.interval, agent_env)
                try:
                    run.start()
                    loaded = loaded or run.loaded_probes()
                    held = held_prog_ids(run.proc.pid)
                    rps, stats, _ = run_wrk(wrk, args.duration, {"agent": run.proc.pid, "influxd": run.influxd_pid},
                                            nginx_pid=nginx.proc.pid, bpf=bpf_on)
                    if run.proc.poll() is not None:
                        raise BenchError(f"agent exited with {run.proc.returncode} during the wrk run; its stderr:\n"
                                         f"{tail(run.stderr_path, 40)}")
                    held |= held_prog_ids(run.proc.pid)
                    seen = run.count_points()
                finally:
                    run.stop()
                    for line in run.log_problems():
                        if line not in problems:
                            problems.append(line)
                if run.exit_code not in (0, None):
                    problems.append(f"agent run {i + 1} exited with {run.exit_code}")
                w, b = stats["window"], stats.get("bpf", {})
                other_ns = None
                if b:
                    before, after = b["snap"]
                    other = bpf_delta({k: v for k, v in before.items() if k not in held},
                                      {k: v for k, v in after.items() if k not in held})
                    other_ns = sum(v[1] for v in other.values())
                    if other_ns and w["requests"]:
                        warnings.append(f"agent run {i + 1}: programs the agent does not hold ran too "
                                        f"({ {k: v[0] for k, v in other.items()} } runs); they are in bpf_*")
                agent_rps.append(rps)
                agent_cpu_req.append(w["cpu_us_per_request"])
                agent_bpf_runs.append(b.get("runs_per_request"))
                agent_bpf_ns.append(b.get("ns_per_request"))
                agent_bpf_other_ns.append(round(other_ns / w["requests"], 2) if b and w["requests"] else None)
                if b and w["requests"]:
                    agent_bpf_by_prog.append({k: (v[0] / w["requests"], v[1] / w["requests"])
                                              for k, v in b["by_program"].items()})
                order.append("A")
                points_seen.append(seen)
                a, f = stats.get("agent", {}), stats.get("influxd", {})
                detail.append({"pair": i + 1, "arm": "agent", "req_s": rps, "agent_cpu_pct": a.get("cpu_pct"),
                               "influxd_cpu_pct": f.get("cpu_pct"), **{k: v for k, v in w.items()},
                               **stats["system"],
                               **({"bpf_runs": b["runs"], "bpf_run_time_ns": b["run_time_ns"],
                                   "bpf_by_program": b["by_program"]} if b else {})})
                agent_cpu.append(a.get("cpu_pct"))
                agent_rss_kb.append(a.get("rss_kb_max") or 0)
                influxd_cpu.append(f.get("cpu_pct"))
                influxd_rss_kb.append(f.get("rss_kb_max") or 0)
                log(f"pair {i + 1}/{args.runs} agent:    {rps:.0f} req/s, {w['cpu_us_per_request']} CPU µs/req"
                    f"{bpf_note(b)}; "
                    f"agent CPU {a.get('cpu_pct')} %, RSS {(a.get('rss_kb_max') or 0) / 1024:.1f} MB; "
                    f"influxd CPU {f.get('cpu_pct')} %; points {seen}; {fmt_system(stats['system'])}")
            base_val.append(base_cpu_req[-1] if args.rate else base_rps[-1])
            agent_val.append(agent_cpu_req[-1] if args.rate else agent_rps[-1])
    except BenchError as e:
        print(f"ab: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ab: interrupted; nothing written", file=sys.stderr)
        return 130
    finally:
        nginx.stop()
        if stats_fd >= 0:
            os.close(stats_fd)
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    if any(v is None for v in base_val + agent_val):
        print("ab: a run completed no requests; nothing written", file=sys.stderr)
        return 1
    lossd = bstats.loss(base_val, agent_val, higher_is_better=not args.rate)
    other_max = max((d["other_cpu_pct"] or 0) for d in detail)
    steal_max = max((d["steal_pct"] or 0) for d in detail)
    if other_max > OTHER_CPU_WARN:
        busy = [f"{d['arm']} run {d['pair']}: {d['other_cpu_pct']} %" for d in detail
                if (d["other_cpu_pct"] or 0) > OTHER_CPU_WARN]
        warnings.append(f"processes not started by this benchmark used more than {OTHER_CPU_WARN} % of a core "
                        f"during: {'; '.join(busy)}; those runs are suspect, rerun on a quiet machine")
    if steal_max > OTHER_CPU_WARN:
        warnings.append(f"hypervisor steal time reached {steal_max} % of a core in a run")
    for d in detail:
        if d.get("wrk_errors"):
            warnings.append(f"{d['arm']} run {d['pair']}: wrk reported {d['wrk_errors']}")
    rate_fields: dict = {}
    if args.rate:
        off = [(d["arm"], d["pair"], d["req_s"]) for d in detail
               if abs(d["req_s"] - args.rate) / args.rate * 100 > args.rate_tolerance]
        for arm, pair, rps in off:
            warnings.append(f"{arm} run {pair}: achieved {rps:.0f} req/s, more than {args.rate_tolerance:g} % off "
                            f"the target {args.rate:g} (saturated, or too few connections for the pacing)")
        rate_fields = {
            "target_rate": args.rate,
            "rate_tolerance_pct": args.rate_tolerance,
            "rate_ok": not off,
            "achieved_rate_median": {"baseline": median(base_rps), "agent": median(agent_rps)},
            "achieved_rate_pct_of_target": {
                "baseline": [round(r / args.rate * 100, 2) for r in base_rps],
                "agent": [round(r / args.rate * 100, 2) for r in agent_rps]},
        }
    for w in warnings:
        log(f"warning: {w}")
    probes = args.probe or loaded
    bpf_fields: dict = {"bpf_stats": bpf_on}
    if bpf_on:
        ns_ci = bstats.bootstrap_median_ci([x for x in agent_bpf_ns if x is not None]) \
            if any(x is not None for x in agent_bpf_ns) else None
        names = sorted({k for d in agent_bpf_by_prog for k in d})
        busy_ns = [c * 1000 for c in agent_cpu_req if c]
        bpf_fields.update({
            "bpf_runs_per_request": median_n(agent_bpf_runs, 4),
            "bpf_ns_per_request": median_n(agent_bpf_ns, 2),
            "bpf_ns_per_request_ci95": [round(ns_ci[0], 2), round(ns_ci[1], 2)] if ns_ci else None,
            "bpf_pct_of_busy_cpu": median_n([n / c * 100 for n, c in zip(agent_bpf_ns, busy_ns) if n is not None],
                                            3),
            "bpf_runs_per_request_runs": agent_bpf_runs,
            "bpf_ns_per_request_runs": agent_bpf_ns,
            "bpf_ns_per_request_not_agent_programs_runs": agent_bpf_other_ns,
            "baseline_bpf_runs_per_request_runs": base_bpf_runs,
            "baseline_bpf_ns_per_request_runs": base_bpf_ns,
            "bpf_per_request_by_program": {
                k: {"runs": median_n([d.get(k, (0, 0))[0] for d in agent_bpf_by_prog], 4),
                    "ns": median_n([d.get(k, (0, 0))[1] for d in agent_bpf_by_prog], 2)} for k in names},
        })
    result = {
        "name": args.name,
        "what": describe(args, probes),
        "command": command,
        "date": started.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "mode": ("fixed_rate" if args.rate else "saturation") + ("_short_conns" if args.close else ""),
        "runs": args.runs,
        "unit": "cpu_us/request" if args.rate else "req/s",
        "baseline_median": median_n(base_val, 3 if args.rate else 2),
        "agent_median": median_n(agent_val, 3 if args.rate else 2),
        "loss_pct": lossd["loss_pct"],
        "loss_pct_ci95": lossd["loss_pct_ci95"],
        "pair_ratios": lossd["pair_ratios"],
        "pair_ratio_median": lossd["pair_ratio_median"],
        "ci_method": lossd["ci_method"],
        "baseline_runs": base_val,
        "agent_runs": agent_val,
        "order": "".join(order),
        "order_mode": args.order,
        "order_seed": seed if args.order == "random" else None,
        **rate_fields,
        "baseline_req_s_runs": base_rps,
        "agent_req_s_runs": agent_rps,
        "baseline_cpu_us_per_request_runs": base_cpu_req,
        "agent_cpu_us_per_request_runs": agent_cpu_req,
        **bpf_fields,
        "duration_s": args.duration,
        "wrk": shlex.join(["wrk", *[o if not o.endswith("rate.lua") else "rate.lua" for o in wrk_opts],
                           f"-d{args.duration}s"]),
        "short_connections": args.close,
        "agent_interval_seconds": args.interval,
        "agent_cpu_pct_runs": agent_cpu,
        "agent_cpu_pct_median": median(agent_cpu),
        "agent_rss_mb_max": round(max(agent_rss_kb) / 1024, 1) if agent_rss_kb else None,
        "influxd_cpu_pct_median": median(influxd_cpu),
        "influxd_rss_mb_max": round(max(influxd_rss_kb) / 1024, 1) if influxd_rss_kb else None,
        "agent_points_in_influxdb_after_wrk": points_seen,
        "other_cpu_pct_max": other_max,
        "steal_pct_max": steal_max,
        "warnings": warnings,
        "run_detail": detail,
        "agent_source": source,
        "probes": probes,
        "probes_requested": args.probe or "all",
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "agent_log_problems": problems,
        "notes": args.notes or NOTES,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    log(f"wrote {out_path}")
    return 0


NOTES = ("Pairs: each pair has one baseline and one agent run back to back, in the order `order` shows; "
         "loss_pct_ci95 is a 95 % bootstrap interval of the median per-pair ratio agent/baseline. "
         "CPU % is of one core over the wrk window (utime+stime from /proc/PID/stat); agent = the sonde python "
         "process only, influxd = its embedded InfluxDB child. BPF program time runs in nginx's, wrk's and "
         "softirq context, so it shows in loss_pct and in CPU per request, not in agent CPU; bpf_* are the "
         "kernel's own run_cnt/run_time_ns summed over every BPF program on the machine between just before "
         "and just after each wrk window (statistics on for the whole benchmark, both arms), divided by the "
         "requests wrk completed; run_time_ns excludes a regular tracepoint's record filling and the "
         "statistics' own two clock reads per run. nginx, wrk and the agent share this machine's cores.")


if __name__ == "__main__":
    sys.exit(main())
