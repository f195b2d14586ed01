"""Dashboards: structure against Grafana 11.6's schemas, and every query run against a
real InfluxDB that a real agent run filled while the test drove traffic, disk I/O and CPU."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from sonde.ingest.docs import section

from conftest import REPO, Child, make_config, need, wait_for_file, wait_until
from sonde.alerts import rules as rules_mod
from sonde.dashboards import house
from sonde.ingest.runtime import catalog
from sonde.ingest.runtime.agent import Agent
from sonde.ingest.analysis.queries import expand

pytestmark = [pytest.mark.dashboards]
SCHEMAS = REPO.parent / "shared/schemas/grafana-v11.6"
RENDERED = {name: house.render(d) for name, d in house.load_all().items()}


def schema(name: str) -> dict:
    path = SCHEMAS / f"{name}.jsonschema.json"
    need(path.exists(), f"Grafana schemas at {SCHEMAS}")
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_dashboard_validates_against_grafana_schema(name):
    jsonschema.Draft7Validator(schema("dashboard")).validate(RENDERED[name])


@pytest.mark.truth
@pytest.mark.parametrize("name", sorted(RENDERED))
def test_panel_options_validate_against_panel_schemas(name):
    for panel in RENDERED[name]["panels"]:
        s = schema(panel["type"])  # every panel type used has its schema in the set
        options = {"$ref": "#/definitions/Options", "definitions": s["definitions"]}
        jsonschema.Draft7Validator(options).validate(panel["options"])
        if "FieldConfig" in s["definitions"]:
            custom = {"$ref": "#/definitions/FieldConfig", "definitions": s["definitions"]}
            jsonschema.Draft7Validator(custom).validate(panel["fieldConfig"]["defaults"].get("custom", {}))


def test_queries_reference_only_catalog_names():
    for name, dash in RENDERED.items():
        for q in house.queries_of(dash):
            for meas in re.findall(r'FROM "([^"]+)"', q):
                m = catalog.MEASUREMENTS.get(meas)
                assert m, f"{name}: {meas} is not a catalog measurement"
                for ident in re.findall(r'"([a-z_0-9]+)"', q.split(" FROM ")[0]) + \
                        re.findall(r'"([a-z_0-9]+)" =~', q) + re.findall(r'WITH KEY = "([a-z_]+)"', q):
                    if ident != meas:
                        assert ident in m.field_names | m.tag_names or ident in _aliases(q), \
                            f"{name}: {ident} is not declared for {meas}"


def _aliases(q: str) -> set[str]:
    return set(re.findall(r'AS "([^"]+)"', q))


def test_readme_lists_dashboards_as_generated():
    text = (REPO / "README.md").read_text()
    block = section(text, "dashboards")
    assert block == house.markdown_list(), "README's dashboard list is stale: run `sonde dashboards --readme README.md`"


def test_sonde_dashboards_writes_json_and_provisioning(tmp_path):
    r = subprocess.run([str(REPO / ".venv/bin/sonde"), "dashboards", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    written = sorted(p.name for p in tmp_path.glob("*.json"))
    assert written == sorted(f"{n}.json" for n in RENDERED)
    assert json.loads((tmp_path / "network.json").read_text()) == RENDERED["network"]
    prov = tmp_path / "provisioning"
    assert (prov / "datasources/sonde.yaml").exists() and (prov / "dashboards/sonde.yaml").exists()


@pytest.mark.truth
def test_sonde_dashboards_interval_follows_the_agents_poll(tmp_path):
    """Agents polling every 30 s: `--interval 30` gives panels whose minimum interval
    is 30 s (Grafana's larger intervals 1m, 2m, 5m ... all hold whole 30 s polls),
    where the default (10 s polls) gives 20 s."""
    for arg, want in ((["--interval", "30"], {"30s"}), ([], {"20s"}), (["--interval", "2.5"], {"2500ms"})):
        out = tmp_path / (arg[-1] if arg else "default")
        r = subprocess.run([str(REPO / ".venv/bin/sonde"), "dashboards", "--out", str(out), *arg],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        got = {p["interval"] for f in out.glob("*.json") for p in json.loads(f.read_text())["panels"]
               if "interval" in p}
        assert got == want, (arg, got)


def test_min_interval_holds_whole_polls():
    """Every interval Grafana can pick at or above a panel's min interval is a whole
    number of polls (Grafana's 15 s would hold one 10 s poll and two by turns)."""
    for poll_s in (0.5, 1, 2, 5, 10, 15, 30, 60):
        low = house.min_interval_ms(poll_s)
        assert low % (poll_s * 1000) == 0
        for raw in range(1, 10_000_000, 997):
            chosen = max(round_interval(raw), low)
            assert chosen % (poll_s * 1000) == 0, (poll_s, raw, chosen)
    rendered = house.render(house.load_all()["network"], 10)
    assert {p.get("interval") for p in rendered["panels"] if p["type"] != "table"} == {"20s"}


# --- semantics: every query returns data ----------------------------------------------

NGINX_CONF = """
worker_processes 2;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/cb; proxy_temp_path {d}/px; fastcgi_temp_path {d}/fc;
    uwsgi_temp_path {d}/uw; scgi_temp_path {d}/sc;
    upstream backend {{ server 127.0.0.1:{back}; }}
    server {{ listen 127.0.0.1:{front}; location / {{ proxy_pass http://backend; }} location /e {{ return 502; }} }}
    server {{ listen 127.0.0.1:{back}; location / {{ return 200 "backend\\n"; }} }}
}}
"""


@pytest.fixture(scope="module")
def filled(influx, tmp_path_factory):
    """A real agent run with every default probe (and the opt-in process_io, which a
    disk panel shows) while nginx proxies, a disk works, a process spins and one is
    OOM-killed."""
    from conftest import bpf_prereqs, free_port
    bpf_prereqs()
    need(Path("/usr/sbin/nginx").exists(), "nginx")
    tmp = tmp_path_factory.mktemp("filled")
    db = "t_dashboards"
    influx.query(f'CREATE DATABASE "{db}"')
    thresholds = tmp / "thresholds.yaml"  # anomaly windows of 2 s, so the run can leave a mark
    thresholds.write_text(rules_mod.THRESHOLDS.read_text().replace("  window: 60\n  baseline_windows: 10\n",
                                                                   "  window: 2\n  baseline_windows: 5\n"))
    front, back = free_port(), free_port()
    # probe l7 on the test's nginx (by its port) for the L7 panels; /e answers 502
    cfg = make_config(tmp, f"probes:\n  process_io:\n    enabled: true\n  l7:\n    enabled: true\n"
                           f"    ports: [{front}]\nalerts:\n  thresholds: {thresholds}\n",
                      api="v1", url=influx.url, database=db)
    agent = Agent(cfg, max_backoff=0.5).start()
    procs, loop, cg = [], None, None
    start_ms = int(time.time() * 1000)
    try:
        agent.poll()
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(d=tmp, front=front, back=back))
        nginx = subprocess.Popen(["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(nginx)
        wait_until(lambda: subprocess.run(["curl", "-sf", f"http://127.0.0.1:{front}/"],
                                          capture_output=True).returncode == 0, what="nginx up")
        img = tmp / "disk.img"
        subprocess.run(["truncate", "-s", "32M", str(img)], check=True)
        loop = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True,
                              check=True).stdout.strip()
        spin = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()+4\nwhile time.time()<t: pass"])
        procs.append(spin)
        mem = Path("/sys/fs/cgroup/memory")
        if mem.is_dir():
            cg = mem / f"sonde-dash-{os.getpid()}"
            cg.mkdir(exist_ok=True)
            (cg / "memory.limit_in_bytes").write_text(str(32 << 20))
            victim = subprocess.Popen([sys.executable, "-c", f"import os\nopen('{cg}/cgroup.procs','w')"
                                       ".write(str(os.getpid()))\nb=[]\nwhile True: b.append(bytearray(1<<20))"])
            victim.wait(timeout=60)
        for i in range(5):
            subprocess.run(["wrk", "-t1", "-c4", "-d1s", f"http://127.0.0.1:{front}/"], capture_output=True)
            subprocess.run(["curl", "-s", f"http://127.0.0.1:{free_port()}/"], capture_output=True)  # refused
            subprocess.run(["curl", "-s", f"http://127.0.0.1:{front}/e"], capture_output=True)  # a 502
            subprocess.run(["dd", "if=/dev/zero", f"of={loop}", "bs=4k", "count=200", "oflag=direct"],
                           capture_output=True)
            subprocess.run(["dd", f"if={loop}", "of=/dev/null", "bs=4k", "count=200", "iflag=direct"],
                           capture_output=True)
            agent.poll()
        spin.wait()
        agent.poll()
        # The marks table: a steady flow that jumps leaves an anomaly mark; the refused
        # connects above fire failed_connects.
        portfile = tmp / "anom-port"
        procs.append(Child("recv", str(portfile), "dash-anom-rx").proc)
        sender = Child("burst", "127.0.0.1", int(wait_for_file(portfile)), "dash-anom", stdin=True)
        procs.append(sender.proc)

        def send(n):
            sender.proc.stdin.write(f"{n}\n")
            sender.proc.stdin.flush()
            assert sender.proc.stdout.readline().strip() == "ok"
        for _ in range(12):
            send(50_000)
            agent.poll()
            time.sleep(1)
        send(5_000_000)
        agent.poll()
        wait_until(lambda: len(agent.spool) == 0, what="spool drained")
        marks = agent.evaluate_alerts()
        assert {p.measurement for p in marks} == {"sonde_anomaly", "sonde_alert"}, marks
        wait_until(lambda: len(agent.spool) == 0, what="spool drained")
    finally:
        for p in procs:
            if p.poll() is None:
                # SIGTERM: nginx's master then stops its workers (SIGKILL would orphan them)
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if loop:
            subprocess.run(["losetup", "-d", loop])
        if cg:
            cg.rmdir()
        agent.stop()
    end_ms = int(time.time() * 1000)
    yield {"db": db, "host": cfg.host, "start_ms": start_ms, "end_ms": end_ms, "loop": os.path.basename(loop)}
    influx.query(f'DROP DATABASE "{db}"')


def run_query(influx, filled, q: str) -> list:
    text = expand(q, start_ms=filled["start_ms"], end_ms=filled["end_ms"], interval_s=1,
                  variables={"host": filled["host"], "process": None, "peer": None, "service": "nginx",
                             "disk": None})
    res = influx.query(text, db=filled["db"])["results"][0]
    assert "error" not in res, f"{res['error']}\n{text}"
    return res.get("series", [])


# Queries whose true value in the filled run is zero: their points must exist (checked
# with fill(none)), but nothing staged there makes them non-zero.
ZERO_HERE = {
    "map_full_drops": "no map fills up here (test_alerts stages that)",
    "kernel_misses": "the kernel skips a program only when BPF programs nest on a CPU",
    "poll_success": "no poll fails here (test_alerts stages that)",
    "dropped_points": "the spool stays under its bound here (test_spool_and_sinks stages that)",
    "queued_points": "InfluxDB keeps up here: a poll may find the spool empty every time",
    "write_errors": "InfluxDB stays up here",
    "rejected_points": "InfluxDB accepts every point here",
    "errors": "no I/O error is staged here (tests/probes/test_block_io.py stages ENOSPC)",
    "resets_received": "no backend resets here",
    "connect_timeouts": "every failed connect here is refused, none times out",
    "retransmits": "loopback loses nothing",
    "connect_refused@loadbalancer": "nginx's upstream listens throughout (the network dashboard shows curl's refusals)",
    "no_response": "every upstream request is answered here (tests/test_l7_views.py stages resets)",
    "unanswered": "every request is answered here",
    "desyncs": "the L7 parser keeps the message boundaries here",
    "lost_events": "the L7 capture keeps up with this load: the kernel drops nothing",
}


# Dashboards whose data needs servers this run does not start (Redis, PostgreSQL,
# MariaDB): tests/test_l7_views.py fills each with its server under load and checks
# every query there, against the server's own counters.
FILLED_ELSEWHERE = {"redis", "postgresql", "mysql"}


@pytest.mark.truth
@pytest.mark.parametrize("name", sorted(set(RENDERED) - FILLED_ELSEWHERE))
def test_every_panel_query_returns_data(influx, filled, name):
    """Every query, the marks table included, returns points the run wrote: fill(0)'s zeros
    do not count, and a query whose values are all zero must be one that is zero here."""
    for q in house.queries_of(RENDERED[name], marks=True):
        series = run_query(influx, filled, q.replace("fill(0)", "fill(none)"))
        values = [v for s in series for row in s["values"] for v in row[1:] if v is not None]
        assert values, f"{name}: no points for\n{q}"
        if not any(v not in (0, "") for v in values):
            assert any(f'"{field}"' in q and where in ("", name) for field, _, where in
                       (k.partition("@") for k in ZERO_HERE)), f"{name}: only zeros for\n{q}"


def test_heatmap_buckets_sum_to_histogram_count(influx, filled):
    panel = next(p for p in RENDERED["network"]["panels"] if p["type"] == "heatmap" and "srtt" in p["title"])
    series = run_query(influx, filled, panel["targets"][0]["query"])
    buckets = sum(v for s in series for row in s["values"] for v in row[1:] if v)
    total = influx.query(f"SELECT sum(count) FROM tcp_srtt WHERE time >= {filled['start_ms']}ms "
                         f"AND time <= {filled['end_ms']}ms", db=filled["db"])["results"][0]["series"][0]["values"][0][1]
    assert buckets == total > 0


# --- semantics: panel values against the load the test drove --------------------------

def round_interval(ms: float) -> int:
    """Grafana's roundInterval (packages/grafana-data/src/datetime/rangeutil.ts)."""
    for below, nice in ((15, 10), (35, 20), (75, 50), (150, 100), (350, 200), (750, 500), (1500, 1000),
                        (3500, 2000), (7500, 5000), (12500, 10000), (17500, 15000), (25000, 20000), (45000, 30000),
                        (90000, 60000), (210000, 120000), (450000, 300000), (750000, 600000), (1050000, 900000),
                        (1500000, 1200000), (2700000, 1800000), (5400000, 3600000), (9000000, 7200000),
                        (16200000, 10800000), (32400000, 21600000), (86400000, 43200000), (604800000, 86400000),
                        (1814400000, 604800000), (3628800000, 2592000000)):
        if ms < below:
            return nice
    return 31536000000


def grafana_interval_ms(panel: dict, range_ms: int, width_px: int = 1000) -> int:
    """The $__interval Grafana gives a panel (rangeutil.calculateInterval): the range over the
    panel's max data points (by default its width in pixels), rounded, raised to the panel's
    min interval when it has one."""
    low = 1
    if panel.get("interval"):
        m = re.fullmatch(r"(\d+)(ms|s|m|h)", panel["interval"])
        low = int(m.group(1)) * {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}[m.group(2)]
    return max(round_interval(range_ms / panel.get("maxDataPoints", width_px)), low)


DRIVEN_POLL_S = 1
SEND = """
import ctypes, socket, sys, time
ctypes.CDLL(None).prctl(15, b"drv-tx", 0, 0, 0)
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
t0, k = time.monotonic(), 0
while True:  # 8 kB every 40 ms on an absolute schedule: 204,800 bytes a second
    s.sendall(b"d" * 8192)
    k += 1
    time.sleep(max(0.0, t0 + k * 0.04 - time.monotonic()))
"""
HOLD = """
import ctypes, socket, sys
ctypes.CDLL(None).prctl(15, b"drv-hold", 0, 0, 0)
held = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(2)]
sys.stdin.readline()
"""
DUTY = """
import ctypes, sys, time
ctypes.CDLL(None).prctl(15, b"drv-cpu", 0, 0, 0)
share = float(sys.argv[1])
while True:  # busy `share` of every 100 ms
    t = time.monotonic()
    while time.monotonic() - t < 0.1 * share:
        pass
    time.sleep(max(0.0, t + 0.1 - time.monotonic()))
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.fixture(scope="module")
def driven(influx, tmp_path_factory):
    """A real agent run (tcp and cpu, polled every second on the half second) while the
    test drives loads whose numbers it knows from elsewhere: drv-tx sends 204,800 bytes a
    second; three drv-hold processes hold two connections each; two drv-cpu processes
    burn CPU at 60 % and 30 % duty, measured from /proc/<pid>/stat."""
    import socket
    from conftest import bpf_prereqs
    bpf_prereqs()
    tmp = tmp_path_factory.mktemp("driven")
    db = "t_driven"
    influx.query(f'CREATE DATABASE "{db}"')
    agent = Agent(make_config(tmp, api="v1", url=influx.url, database=db), only=["tcp", "cpu"],
                  max_backoff=0.5).start()
    procs, listener = [], socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel completes the holders' connects from the backlog
        portfile = tmp / "port"
        procs.append(Child("recv", str(portfile), "drv-rx").proc)
        port = int(wait_for_file(portfile))
        procs.append(subprocess.Popen([sys.executable, "-c", SEND, str(port)]))
        hold_port = str(listener.getsockname()[1])
        procs += [subprocess.Popen([sys.executable, "-c", HOLD, hold_port], stdin=subprocess.PIPE)
                  for _ in range(3)]
        cpus = [subprocess.Popen([sys.executable, "-c", DUTY, share]) for share in ("0.6", "0.3")]
        procs += cpus
        time.sleep(0.5)
        start_ms = int(time.time() * 1000)
        cpu0 = {p.pid: cpu_seconds(p.pid) for p in cpus}
        first = int(time.time()) + 1.5  # polls on the half second: each 1 s bucket holds exactly one
        for k in range(20):
            time.sleep(max(0.0, first + k * DRIVEN_POLL_S - time.time()))
            agent.poll()
        cpu_truth = {p.pid: (cpu_seconds(p.pid) - cpu0[p.pid]) / (time.time() - start_ms / 1000) * 100
                     for p in cpus}
        end_ms = int(time.time() * 1000)
        wait_until(lambda: len(agent.spool) == 0, what="spool drained")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        listener.close()
        agent.stop()
    yield {"db": db, "host": agent.config.host, "start_ms": start_ms, "end_ms": end_ms, "cpu": cpu_truth}
    influx.query(f'DROP DATABASE "{db}"')


def panel_values(influx, driven, dashboard: str, title: str, **variables) -> dict[tuple, list]:
    """A panel's first query as Grafana runs it over the driven run: its $__interval from the
    panel's own settings, the rendered dashboard for a 1 s agent. {tags: [(t_ms, value)]}
    with only the buckets that lie wholly inside the run, past its first and last second."""
    panel = next(p for p in house.render(house.load_all()[dashboard], DRIVEN_POLL_S)["panels"]
                 if p["title"] == title)
    start, end = driven["start_ms"], driven["end_ms"]
    interval = grafana_interval_ms(panel, end - start)
    text = expand(panel["targets"][0]["query"], start_ms=start, end_ms=end, interval_s=interval / 1000,
                  variables={"host": driven["host"], **variables})
    res = influx.query(text, db=driven["db"], )["results"][0]
    assert "error" not in res, res["error"]
    out = {}
    for s in res.get("series", []):
        rows = [(t // 1_000_000, v) for t, v in s["values"]
                if t // 1_000_000 >= start + 1000 and t // 1_000_000 + interval <= end - 1000]
        out[tuple(sorted(s.get("tags", {}).items()))] = rows
    return out


@pytest.mark.truth
def test_rate_panels_show_the_driven_byte_rate(influx, driven):
    """Bytes per second, bucket by bucket, as the default view shows them: no sawtooth of
    empty buckets and spikes (the panel's min interval holds whole polls)."""
    for dashboard, title, variables in (("network", "Bytes sent per second by process and peer",
                                         {"process": "drv-tx", "peer": "127.0.0.1"}),
                                        ("loadbalancer", "Backend: bytes per second by upstream",
                                         {"service": "drv-tx"})):
        series = panel_values(influx, driven, dashboard, title, **variables)
        (rows,) = series.values()
        assert len(rows) >= 10, rows
        for t, v in rows:
            assert v == pytest.approx(204_800, rel=0.1), f"{title}: {v:.0f} B/s at {t} ms; all: {rows}"


@pytest.mark.truth
def test_sockets_by_state_sums_the_processes(influx, driven):
    series = panel_values(influx, driven, "network", "Sockets by state", process="drv-hold")
    rows = series[(("state", "ESTABLISHED"),)]
    assert len(rows) >= 10 and all(v == 6 for _, v in rows), rows  # three processes, two sockets each


@pytest.mark.truth
def test_cpu_panels_sum_the_processes(influx, driven):
    """CPU by process is every pid of the name together; the per-worker panel is each pid."""
    truth = driven["cpu"]
    series = panel_values(influx, driven, "host", "CPU by process (% of one core)", process="drv-cpu")
    (rows,) = series.values()
    mean = sum(v for _, v in rows) / len(rows)
    assert mean == pytest.approx(sum(truth.values()), rel=0.15), (rows, truth)
    per_pid = panel_values(influx, driven, "loadbalancer", "Service CPU by worker (% of one core)",
                           service="drv-cpu")
    for pid, pct in truth.items():
        rows = per_pid[(("pid", str(pid)),)]
        assert sum(v for _, v in rows) / len(rows) == pytest.approx(pct, rel=0.15), (pid, rows, truth)


@pytest.mark.truth
def test_anomaly_cpu_series_sums_the_processes(influx, driven):
    """The anomaly marks' CPU series is every pid of a name together over the window,
    like the panel (a mean over pids and polls would halve it)."""
    from sonde.ingest.analysis.anomaly import SERIES
    q = next(s.query for s in SERIES if s.metric == "process_cpu").influxql()
    start, end = driven["start_ms"], driven["end_ms"]
    res = influx.query(expand(q, start_ms=start, end_ms=end, interval_s=5), db=driven["db"])["results"][0]
    (series,) = [s for s in res["series"] if s["tags"]["comm"] == "drv-cpu"]
    full = [v for t, v in series["values"] if t // 1_000_000 >= start + 1000 and t // 1_000_000 + 5000 <= end - 1000]
    assert full and sum(full) / len(full) == pytest.approx(sum(driven["cpu"].values()), rel=0.15), \
        (full, driven["cpu"])
