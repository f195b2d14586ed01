"""The load-balancer field incidents, staged for real and solved from stored metrics.

nginx proxies in its own network namespace to three backends, each in its own
namespace behind its own veth pair (198.18.N.0/24). The host is not quiet: another
nginx balances its own two backends in a namespace of its own (listening on the same
port), a client of it keeps asking, a paced bulk transfer runs on loopback, and inside
each window processes named like the load generator and like the balancer make one
short connection each to a loopback service of the same name. Sonde runs; the test
stages the incident, then reads `sonde backtrack --json` over the window, and checks
it against what the test itself knows (wrk's counts, nginx's error log, the backends'
processes, the clients' own clocks, /proc)."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import REPO, Child, children, free_port, make_config, need, select, sh, transfer, wait_for_file, wait_until
from sonde.ingest.runtime.agent import Agent

pytestmark = [pytest.mark.elb]
NGINX = """
{modules}
worker_processes 2;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    # a keep-alive client stays on the worker that accepted it (nginx closes a connection
    # after 1000 requests by default, and the client's reconnect may land on the other)
    keepalive_requests 1000000;
    client_body_temp_path {d}/cb; proxy_temp_path {d}/px; fastcgi_temp_path {d}/fc;
    uwsgi_temp_path {d}/uw; scgi_temp_path {d}/sc;
    upstream backends {{ {servers} }}
    server {{
        listen 127.0.0.1:8000;
        location / {{ proxy_pass http://backends; proxy_next_upstream off; }}
        {extra}
    }}
}}
"""
SPIN_JS = """
function spin(r) {
    var until = Date.now() + 8000;
    while (Date.now() < until) {}
    r.return(200, "spun\\n");
}
export default { spin };
"""
LIGHT_LOAD = """
import http.client, json, sys, time
# one keep-alive connection at a modest rate: a client pinned to whichever worker
# accepted it, as browsers and upstream pools are. With SPIN_AT, its request at that
# time is /spin, which holds the worker serving this connection on its core for 8 s.
end = time.time() + float(sys.argv[1]); spin_at = float(sys.argv[2]); ok = failed = 0; done = []
conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=30)
while time.time() < end:
    path = "/"
    if spin_at and time.time() >= spin_at:
        path, spin_at = "/spin", 0
    try:
        conn.request("GET", path); conn.getresponse().read(); ok += 1; done.append(time.time())
    except (OSError, http.client.HTTPException):
        failed += 1
        conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=30)
    time.sleep(0.005)
print(json.dumps({"ok": ok, "failed": failed, "done": done}))
"""


def connections_by_worker(ss: str) -> dict[int, int]:
    """Client pid -> the nginx worker pid holding the other end of its connection to :8000,
    from `ss -tnpH` (established, both ends in one namespace)."""
    clients, servers = {}, {}
    for line in ss.splitlines():
        f = line.split()
        if len(f) < 5 or "pid=" not in line:
            continue
        local, peer, pid = f[2], f[3], int(line.split("pid=")[1].split(",")[0])
        if peer.endswith(":8000"):
            clients[local] = pid
        elif local.endswith(":8000"):
            servers[peer] = pid
    return {pid: servers[addr] for addr, pid in clients.items() if addr in servers}


def cpu_demand_seconds(pid: int) -> float:
    """Time on a CPU plus time runnable and waiting for one (/proc/PID/schedstat): a
    spinning process wants the whole interval even when a busy host gives it part of a core."""
    run_ns, wait_ns, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    return (int(run_ns) + int(wait_ns)) / 1e9


class Nginx:
    """One nginx (master and two workers) in a namespace, with its own prefix directory."""

    def __init__(self, ns: str, d: Path, servers: list[str], spin: bool = False):
        d.mkdir(parents=True, exist_ok=True)
        self.dir = d
        modules = extra = ""
        if spin:  # njs: a handler that holds its worker on the CPU for 8 s
            (d / "spin.js").write_text(SPIN_JS)
            modules = "load_module /usr/lib/nginx/modules/ngx_http_js_module.so;"
            extra = f"js_import spin from {d}/spin.js; location /spin {{ js_content spin.spin; }}"
        (d / "nginx.conf").write_text(NGINX.format(d=d, modules=modules, extra=extra,
                                                   servers=" ".join(f"server {s};" for s in servers)))
        # `ip netns exec` execs nginx, so this pid is the master's
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "nginx", "-p", str(d), "-c", str(d / "nginx.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: subprocess.run(["ip", "netns", "exec", ns, "curl", "-sf", "http://127.0.0.1:8000/"],
                                          capture_output=True).returncode == 0, what="nginx proxying")
        self.workers = wait_until(lambda: children(self.proc.pid) if len(children(self.proc.pid)) == 2 else None,
                                  what="two nginx workers")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


class Lab:
    def __init__(self, tmp: Path):
        tag = uuid.uuid4().hex[:5]
        self.tmp = tmp
        self.lb = f"sonde-lb-{tag}"
        self.backends = {i: f"sonde-b{i}-{tag}" for i in (1, 2, 3)}
        self.servers: dict[int, Child] = {}
        self.nginx: Nginx | None = None
        sh("ip", "netns", "add", self.lb)
        self.exec(self.lb, "ip", "link", "set", "lo", "up")
        for i, ns in self.backends.items():
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", f"l{i}{tag}", "type", "veth", "peer", "name", f"b{i}{tag}")
            sh("ip", "link", "set", f"l{i}{tag}", "netns", self.lb)
            sh("ip", "link", "set", f"b{i}{tag}", "netns", ns)
            self.exec(self.lb, "ip", "link", "set", f"l{i}{tag}", "name", f"lb{i}")
            self.exec(ns, "ip", "link", "set", f"b{i}{tag}", "name", "eth0")
            self.exec(self.lb, "ip", "addr", "add", f"198.18.{i}.1/24", "dev", f"lb{i}")
            self.exec(ns, "ip", "addr", "add", f"198.18.{i}.2/24", "dev", "eth0")
            for n, dev in ((self.lb, f"lb{i}"), (ns, "eth0"), (ns, "lo")):
                self.exec(n, "ip", "link", "set", dev, "up")

    def exec(self, ns, *cmd):
        return sh("ip", "netns", "exec", ns, *cmd)

    def start_backend(self, i: int, reset_every: int = 0, body: int = 64) -> Child:
        portfile = self.tmp / f"b{i}-{time.monotonic_ns()}"
        child = Child("httpd", str(portfile), f"backend{i}", f"198.18.{i}.2", reset_every, body,
                      netns=self.backends[i])
        wait_for_file(portfile)
        self.servers[i] = child
        return child

    def stop_backend(self, i: int) -> None:
        self.servers.pop(i).kill()

    def start_nginx(self, spin: bool = False) -> None:
        self.nginx = Nginx(self.lb, self.tmp, [f"198.18.{i}.2:8080" for i in (1, 2, 3)], spin)

    def load(self, seconds: float, connections: int = 8) -> dict:
        out = subprocess.run(["ip", "netns", "exec", self.lb, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
                              "http://127.0.0.1:8000/"], capture_output=True, text=True).stdout
        total = int(out.split(" requests in ")[0].split()[-1])
        non2xx = int(out.split("Non-2xx or 3xx responses:")[1].split()[0]) if "Non-2xx" in out else 0
        errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
        return {"requests": total, "failed": non2xx + errors, "connections": connections}

    def light_load(self, seconds: float, clients: int = 2, spin_at: float = 0) -> list[subprocess.Popen]:
        """A few clients at a modest rate, so a healthy worker is far from a full core;
        the first one asks for /spin at spin_at (if given)."""
        return [subprocess.Popen(["ip", "netns", "exec", self.lb, sys.executable, "-c", LIGHT_LOAD, str(seconds),
                                  str(spin_at if i == 0 else 0)], stdout=subprocess.PIPE, text=True)
                for i in range(clients)]

    def close(self):
        for c in list(self.servers.values()):
            c.kill()
        if self.nginx:
            self.nginx.stop()
        for ns in [self.lb, *self.backends.values()]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Noise:
    """The rest of a real host, running through every window.

    - another load balancer: an nginx (two workers) in a namespace of its own, listening
      on 127.0.0.1:8000 like the lab's, in front of two backends, with a keep-alive client;
    - background traffic: a paced bulk transfer on loopback (800 kB/s);
    - `short_connections()`, called inside a window: processes named like the load
      generator and like the balancer, each making one short connection to a loopback
      service of the same name."""

    def __init__(self, tmp: Path, load_comm: str):
        self.load_comm = load_comm
        self.tmp = tmp / "noise"
        self.tmp.mkdir()
        self.ns = f"sonde-ol-{uuid.uuid4().hex[:5]}"
        self.children: list[Child] = []
        self.procs: list[subprocess.Popen] = []
        self.short_pids: set[int] = set()  # the unrelated same-named processes of short_connections()
        self.nginx = None
        sh("ip", "netns", "add", self.ns)
        sh("ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up")
        for i, addr in enumerate(("127.0.0.1", "127.0.0.2")):
            pf = self.tmp / f"ob{i}"
            self.children.append(Child("httpd", str(pf), "obackend", addr, 0, 64, netns=self.ns))
            wait_for_file(pf)
        self.nginx = Nginx(self.ns, self.tmp / "nginx", ["127.0.0.1:8080", "127.0.0.2:8080"])
        self.procs.append(subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-c", LIGHT_LOAD, "600",
                                            "0"], stdout=subprocess.DEVNULL))
        pf = self.tmp / "bulk"
        self.children.append(Child("recv", str(pf), "rsync-rx", 1, "127.0.0.1"))
        port = int(wait_for_file(pf))
        self.children.append(Child("messages", "127.0.0.1", port, "rsync", 30_000, 16384, 20))

    def short_connections(self) -> None:
        for name in (self.load_comm, "nginx"):
            pf = self.tmp / f"svc-{uuid.uuid4().hex[:6]}"
            service = Child("accept", str(pf), name, 1, "pong", "127.0.0.1")
            port = int(wait_for_file(pf))
            client = Child("connects", "127.0.0.1", port, name, 1, "byte")
            assert "ok=1" in client.wait()
            service.wait()
            self.short_pids |= {service.pid, client.pid}

    def close(self):
        for p in self.procs:
            p.kill()
            p.wait()
        for c in self.children:
            c.kill()
        if self.nginx:
            self.nginx.stop()
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


class Poller:
    """The agent polling every second in the background, as `sonde run` would."""

    def __init__(self, agent):
        self.agent, self.stop = agent, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.times: list[float] = []  # when each poll started: its points carry (about) this time

    def poll(self):
        self.times.append(time.time())
        self.agent.poll()

    def run(self):
        while not self.stop.wait(1):
            self.poll()

    def covered(self, start: float, end: float) -> tuple[float, float]:
        """What a window [start, end) of stored points covers: each point holds what
        happened since the poll before it, so from the last poll before start to the
        last poll before end."""
        return (max((t for t in self.times if t < start), default=0.0), max(t for t in self.times if t < end))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.poll()
        wait_until(lambda: len(self.agent.spool) == 0, what="spool drained")


@pytest.fixture
def lab(bpf_ready, tmp_path):
    need(Path("/usr/sbin/nginx").exists(), "nginx")
    need(Path("/usr/bin/wrk").exists(), "wrk")
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def noise(lab, tmp_path, request):
    n = None
    try:
        n = Noise(tmp_path, getattr(request, "param", "wrk"))
        yield n
    finally:
        if n:
            n.close()


@pytest.fixture
def agent(request, influx, influx_db, tmp_path):
    """The agent with tcp and cpu; `indirect` params add probes, enabled in its config."""
    more = list(getattr(request, "param", ()))
    text = "probes:\n" + "".join(f"  {p}:\n    enabled: true\n" for p in more) if more else ""
    cfg = make_config(tmp_path, text, api="v1", url=influx.url, database=influx_db)
    a = Agent(cfg, only=["tcp", "cpu", *more], max_backoff=0.5).start()
    a.poll()
    yield a
    a.stop()


def backtrack(influx, influx_db, tmp_path, start_ms, end_ms, *extra) -> dict:
    """`sonde backtrack --json` over the window; the text report must name the same cause.

    With SONDE_EXAMPLES=DIR the text report is kept there (the README's worked examples)."""
    cfg = tmp_path / "bt.yaml"
    cfg.write_text(f"state_dir: {tmp_path}/bt\ninfluxdb:\n  api: v1\n  url: {influx.url}\n  database: {influx_db}\n")
    cmd = [str(REPO / ".venv/bin/sonde"), "backtrack", "-c", str(cfg), "--from", str(start_ms / 1000),
           "--to", str(end_ms / 1000), *extra]
    r = subprocess.run(cmd + ["--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    t = subprocess.run(cmd, capture_output=True, text=True)
    assert t.returncode == 0 and "Traceback" not in t.stderr
    assert (report["likely_cause"] or "nothing stands out") in t.stdout
    if os.environ.get("SONDE_EXAMPLES"):
        name = os.environ.get("PYTEST_CURRENT_TEST", "x").split("::")[-1].split(" ")[0].split("[")[0]
        Path(os.environ["SONDE_EXAMPLES"], f"{name.removeprefix('test_')}.txt").write_text(t.stdout)
    return report


def balancers(report, lab, noise, clients=()) -> dict:
    """The lab's nginx and the other one, each found once, each exactly its own workers;
    neither the unrelated same-named processes nor the load generator's is taken for a
    balancer (nor merged into one)."""
    by_pids = {tuple(lb["pids"]): lb for lb in report["load_balancers"]}
    ours = [lb for lb in report["load_balancers"] if {int(p) for p in lb["pids"]} & lab.nginx.workers]
    other = [lb for lb in report["load_balancers"] if {int(p) for p in lb["pids"]} & noise.nginx.workers]
    assert len(ours) == 1 and len(other) == 1, by_pids
    assert {int(p) for p in ours[0]["pids"]} <= lab.nginx.workers
    assert {int(p) for p in other[0]["pids"]} <= noise.nginx.workers
    assert set(ours[0]["backends"]) == {"198.18.1.2:8080", "198.18.2.2:8080", "198.18.3.2:8080"}
    assert set(other[0]["backends"]) <= {"127.0.0.1:8080", "127.0.0.2:8080"}
    assert noise.short_pids and not [lb for lb in report["load_balancers"]
                                     if {int(p) for p in lb["pids"]} & (noise.short_pids | set(clients))], by_pids
    return ours[0]


def assert_round_robin(lb: dict, upstream_connections: tuple[int, int]) -> None:
    """nginx's round robin runs in each worker, so over any stretch of time each worker's
    count per backend is within one of the others': the three counts differ by at most
    the number of workers (2), whatever the load. The counts add up to the requests wrk
    made (a request is an upstream connection: no upstream keepalive), plus at most one
    per wrk connection still in flight when wrk stopped counting."""
    counts = {k: b["active_opens"] for k, b in lb["backends"].items()}
    assert max(counts.values()) - min(counts.values()) <= len(lb["pids"]), counts
    lo, hi = upstream_connections
    assert lo <= sum(counts.values()) <= hi, (counts, upstream_connections)
    assert lb["balance"]["8080"]["fair"] is True, lb["balance"]


def png_meta(path: Path) -> dict:
    from PIL import Image
    with Image.open(path) as im:
        return json.loads(im.text["Sonde"])


def pixels_near(path: Path, hex_color: str, tol: int = 24) -> int:
    from PIL import Image
    want = tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    with Image.open(path) as im:
        raw = im.convert("RGB").tobytes()
    return sum(1 for i in range(0, len(raw), 3) if all(abs(raw[i + k] - want[k]) <= tol for k in range(3)))


def svg_label_boxes(svg: str) -> list[tuple[int, tuple[float, float, float, float]]]:
    """Each edge label line of a Graphviz SVG, by edge, with a box around it (text-anchor
    middle; width at 0.5 em per character, the narrow end of sans-serif)."""
    ns = {"s": "http://www.w3.org/2000/svg"}
    out = []
    edges = [g for g in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}g") if g.get("class") == "edge"]
    for i, g in enumerate(edges):
        for t in g.findall("s:text", ns):
            fs = float(t.get("font-size", "9"))
            x, y, w = float(t.get("x")), float(t.get("y")), 0.5 * fs * len(t.text or "")
            out.append((i, (x - w / 2, y - fs * 0.8, x + w / 2, y + fs * 0.2)))
    return out


def processes_mentioning(path: Path) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and str(path) in (d / "cmdline").read_bytes().decode(errors="replace"):
                out.append(int(d.name))
        except OSError:
            pass
    return out


@pytest.mark.truth
def test_clean_run_has_no_likely_cause(lab, noise, agent, influx, influx_db, tmp_path):
    for i in (1, 2, 3):
        lab.start_backend(i)
    lab.start_nginx()
    agent.poll()  # the set-up (readiness probes) falls before the window
    start = int(time.time() * 1000)
    with Poller(agent):
        noise.short_connections()
        stats = lab.load(4)
    end = int(time.time() * 1000) + 1000
    assert stats["failed"] == 0 and stats["requests"] > 1000
    report = backtrack(influx, influx_db, tmp_path, start, end, "--png", str(tmp_path / "png"))
    assert report["likely_cause"] is None, report["findings"]
    lb = balancers(report, lab, noise)
    assert_round_robin(lb, (stats["requests"], stats["requests"] + stats["connections"]))
    points = agent.evaluate_alerts(end)
    assert [p for p in points if p.measurement == "sonde_alert"] == []

    # the plot of three backends with equal traffic: clock time, units, each backend seen
    meta = png_meta(tmp_path / "png" / "backend_bytes.png")
    assert "UTC" in meta["xlabel"] and meta["ylabel"] == "bytes/s", meta
    clock = [t for t in meta["xticks"] if t]
    assert clock and all(re.fullmatch(r"\d\d:\d\d:\d\d", t) for t in clock), meta["xticks"]
    first, last = (time.strftime("%H:%M:%S", time.gmtime(s)) for s in ((2 * start - end) / 1000, end / 1000))
    assert all(first <= t <= last for t in clock) or first > last, (clock, first, last)  # (a window over midnight)
    assert any(t.endswith("B/s") for t in meta["yticks"]), meta["yticks"]
    ours = [s for s in meta["series"] if s["label"].startswith("nginx -> 198.18.")]
    assert len(ours) == 3 and len({(s["color"], s["marker"], s["linestyle"]) for s in ours}) == 3, meta["series"]
    for s in ours:  # each one visible in the picture, not drawn over by the others
        assert pixels_near(tmp_path / "png" / "backend_bytes.png", s["color"]) > 40, s
    for name in ("srtt_p99", "cpu"):
        assert "UTC" in png_meta(tmp_path / "png" / f"{name}.png")["xlabel"]
    assert png_meta(tmp_path / "png" / "cpu.png")["ylabel"] == "CPU (% of one core)"


@pytest.mark.truth
def test_incident_1_backend_resets(lab, noise, agent, influx, influx_db, tmp_path):
    lab.start_backend(1)
    bad = lab.start_backend(2, reset_every=500)
    lab.start_backend(3)
    lab.start_nginx()
    agent.poll()  # the set-up (readiness probes) falls before the window
    start = int(time.time() * 1000)
    with Poller(agent):
        noise.short_connections()
        stats = lab.load(8)
    end = int(time.time() * 1000) + 1000
    assert stats["failed"] > 0
    report = backtrack(influx, influx_db, tmp_path, start, end)
    lb = balancers(report, lab, noise)
    received = lb["backends"]["198.18.2.2:8080"]["resets_received"]
    sent = select(influx, influx_db, f"SELECT sum(resets_sent) FROM tcp_flow WHERE pid='{bad.pid}'")[0]["sum"]
    assert received == sent == stats["failed"] > 0
    assert all(b["resets_received"] == 0 for k, b in lb["backends"].items() if k != "198.18.2.2:8080")
    assert "198.18.2.2:8080" in report["likely_cause"]
    assert (report["findings"][0]["kind"], report["findings"][0]["subject"]) == ("resets", "nginx -> 198.18.2.2:8080")
    topo = subprocess.run([str(REPO / ".venv/bin/sonde"), "topology", "-c", str(tmp_path / "bt.yaml"), "--from",
                           str(start / 1000), "--to", str(end / 1000), "--json", "--svg", str(tmp_path / "t.svg")],
                          capture_output=True, text=True)
    assert topo.returncode == 0, topo.stderr
    edges = json.loads(topo.stdout)["edges"]
    ours = f'nginx[{",".join(lb["pids"])}]@'
    abnormal = [e for e in edges if e["abnormal"]]
    assert [(e["source"].startswith(ours), e["target"]) for e in abnormal] == [(True, "198.18.2.2:8080")], abnormal
    svg = (tmp_path / "t.svg").read_text()
    assert "198.18.2.2:8080" in svg and f'{received} resets' in svg
    boxes = svg_label_boxes(svg)
    assert len({i for i, _ in boxes}) == len(edges), "every edge has its label"
    overlaps = [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a[0] != b[0] and
                a[1][0] < b[1][2] and b[1][0] < a[1][2] and a[1][1] < b[1][3] and b[1][1] < a[1][3]]
    assert overlaps == [], overlaps
    fired = [json.loads(p.fields["labels"]) for p in agent.evaluate_alerts(end)
             if p.measurement == "sonde_alert" and p.tags["rule"] == "backend_resets"]
    assert {"host": agent.config.host, "comm": "nginx", "peer": "198.18.2.2", "port": "8080"} in fired


@pytest.mark.truth
def test_incident_3_bandwidth_limit_on_one_backend_path(lab, noise, agent, influx, influx_db, tmp_path):
    for i in (1, 2, 3):
        lab.start_backend(i, body=200_000)
    # the limited link: the backend's side of its veth, so its answers queue
    lab.exec(lab.backends[3], "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "40mbit", "burst", "64kb",
             "latency", "200ms")
    lab.start_nginx()
    agent.poll()  # the set-up (readiness probes) falls before the window
    start = int(time.time() * 1000)
    with Poller(agent):
        noise.short_connections()
        stats = lab.load(8, connections=6)
    end = int(time.time() * 1000) + 1000
    report = backtrack(influx, influx_db, tmp_path, start, end)
    lb = balancers(report, lab, noise)
    assert_round_robin(lb, (stats["requests"], stats["requests"] + stats["connections"]))
    srtt = {k: b["srtt_p99_us"] for k, b in lb["backends"].items()}
    assert srtt["198.18.3.2:8080"] > 4 * max(v for k, v in srtt.items() if k != "198.18.3.2:8080"), srtt
    assert (report["findings"][0]["kind"], report["findings"][0]["subject"]) == \
        ("slow_backend_path", "nginx -> 198.18.3.2:8080"), report["findings"]
    # the fairness clause is the counts' own: shares of the connections nginx opened
    counts = sorted(b["active_opens"] for b in lb["backends"].values())
    shares = ", ".join(f"{c / sum(counts):.0%}" for _, c in sorted((k, b["active_opens"])
                                                                   for k, b in lb["backends"].items()))
    assert report["likely_cause"] == (f"the network path from nginx to 198.18.3.2:8080 is slow or bandwidth-limited "
                                      f"(balancing is fair: {shares} of {sum(counts)} connections); check that link")


@pytest.mark.truth
def test_incident_4_health_check_failures_start_and_end(lab, noise, agent, influx, influx_db, tmp_path):
    for i in (1, 2, 3):
        lab.start_backend(i)
    lab.start_nginx()
    agent.poll()  # the set-up (readiness probes) falls before the window
    start = int(time.time() * 1000)
    with Poller(agent):
        lab.load(2)
        noise.short_connections()
        lab.stop_backend(3)  # stops listening: connects are refused
        down = int(time.time() * 1000)
        stats = lab.load(3)
        lab.start_backend(3)
        up = int(time.time() * 1000)
        lab.load(2)
    end = int(time.time() * 1000) + 1000
    assert stats["failed"] > 0
    report = backtrack(influx, influx_db, tmp_path, start, end)
    lb = balancers(report, lab, noise)
    # independent count: nginx logs each refused upstream connect
    refused_log = sum(1 for line in (tmp_path / "error.log").read_text().splitlines()
                      if "Connection refused" in line and "198.18.3.2:8080" in line)
    assert lb["backends"]["198.18.3.2:8080"]["connect_refused"] == refused_log > 0
    assert report["findings"][0]["kind"] == "failed_connects" and "198.18.3.2:8080" in report["likely_cause"]
    rows = select(influx, influx_db, "SELECT connect_refused FROM tcp_flow WHERE peer='198.18.3.2' "
                                     "AND comm='nginx' AND connect_refused > 0")
    first, last = rows[0]["time"] // 1_000_000, rows[-1]["time"] // 1_000_000
    assert down - 1000 <= first <= up + 2000 and down <= last <= up + 2000
    fired = agent.evaluate_alerts(up)
    assert any(p.tags.get("rule") == "failed_connects" and p.tags.get("state") == "firing" for p in fired)
    # A whole alert window (60 s) of clean traffic, backend 3 serving again: the rule
    # resolves on data that is there (nginx's flows to it, with 0 failed connects), not
    # on a window with nothing stored in it.
    with Poller(agent):
        clean = lab.load(62)
    assert clean["failed"] == 0 and clean["requests"] > 0
    now = int(time.time() * 1000)
    resolved = [p for p in agent.evaluate_alerts(now)
                if p.tags.get("rule") == "failed_connects" and p.tags.get("state") == "resolved"]
    assert resolved and all(json.loads(p.fields["labels"])["peer"] == "198.18.3.2" for p in resolved), resolved
    window = select(influx, influx_db, "SELECT count(active_opens), sum(connect_refused) FROM tcp_flow "
                                       f"WHERE peer='198.18.3.2' AND comm='nginx' AND time > {now - 60_000}ms "
                                       f"AND time <= {now}ms")
    assert window and window[0]["count"] > 0 and window[0]["sum"] == 0, \
        f"the rule's window must hold nginx's clean flows to the backend: {window}"


def perf_unnamed_share(data: Path, pid: int, obj: str) -> float:
    """perf's own share (%) of pid's samples in code of `obj` that no symbol names."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--pid", str(pid), "--percentage",
                          "relative", "--sort", "dso,sym", "-F", "overhead,dso,sym"],
                         capture_output=True, text=True, check=True).stdout
    share = 0.0
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[\.\]\s+0x[0-9a-f]+\s*$", line)
        if m and m.group(2) == obj:
            share += float(m.group(1))
    return share


@pytest.mark.truth
@pytest.mark.parametrize("agent", [(), ("profile",)], indirect=True, ids=["no-profile", "profile"])
@pytest.mark.parametrize("noise", [Path(sys.executable).name[:15]], indirect=True)
def test_incident_2_stuck_worker(lab, noise, agent, influx, influx_db, tmp_path):
    need(Path("/usr/lib/nginx/modules/ngx_http_js_module.so").exists(), "njs (libnginx-mod-http-js)")
    for i in (1, 2, 3):
        lab.start_backend(i)
    lab.start_nginx(spin=True)
    workers = lab.nginx.workers
    poller = Poller(agent)
    poller.poll()
    with poller:
        stuck_from = time.time() + 8
        clients = lab.light_load(17, clients=6, spin_at=stuck_from)
        # the load generator's processes are python too: the unrelated ones share its name
        wait_until(lambda: Path(f"/proc/{clients[0].pid}/comm").read_text().strip() == noise.load_comm,
                   what="the clients running (ip netns exec has exec'd python)")
        time.sleep(3)
        # which worker holds each client's connection, from the kernel's socket table
        on_worker = connections_by_worker(lab.exec(lab.lb, "ss", "-tnpH", "state", "established"))
        time.sleep(stuck_from - time.time() - 0.5)
        cpu_before = {w: cpu_demand_seconds(w) for w in workers}
        time.sleep(0.5)
        noise.short_connections()
        if "profile" in agent.probes:  # perf's own samples of the workers, as the oracle
            need(shutil.which("perf") is not None, "perf (linux-perf)")
            perf = subprocess.run(["perf", "record", "-q", "-F", "99", "-o", str(tmp_path / "perf.data"), "-p",
                                   ",".join(map(str, workers)), "--", "sleep", "4"], capture_output=True, text=True)
            assert perf.returncode == 0, perf.stderr
        time.sleep(stuck_from + 8 - time.time())
        cpu_used = {w: cpu_demand_seconds(w) - cpu_before[w] for w in workers}
        runs = {c.pid: json.loads(c.communicate()[0])["done"] for c in clients}
    stuck_to = stuck_from + 8
    # ground truth from /proc, the socket table and the clients' own clocks
    spinning = [w for w, s in cpu_used.items() if s > 6]
    assert len(spinning) == 1, cpu_used
    assert on_worker.get(clients[0].pid) == spinning[0], on_worker
    stalled = {pid for pid, done in runs.items() if not [t for t in done if stuck_from + 0.5 <= t <= stuck_to - 0.5]}
    assert clients[0].pid in stalled, runs
    window, before = poller.covered(stuck_from, stuck_to), poller.covered(stuck_from - 8, stuck_from)

    def done(pids, span):
        return sum(1 for pid in pids for t in runs[pid] if span[0] < t <= span[1])

    report = backtrack(influx, influx_db, tmp_path, int(stuck_from * 1000), int(stuck_to * 1000))
    # on a busy host other processes may want a whole core too (another job's); of the
    # balancer's workers only the spinning one is pinned, and it is the cause named
    pinned = {int(c["pid"]) for c in report["cpu"] if c["pinned"]}
    assert pinned & workers == set(spinning), report["cpu"][:5]
    assert report["findings"][0]["kind"] == "cpu_pinned"
    assert report["likely_cause"].startswith(f'nginx pid {spinning[0]} is stuck on its core')
    if "profile" in agent.probes:
        # Where it spins: Debian's nginx and njs module have no frame pointers and no
        # symbols for njs's own functions, so the module's code is one named place,
        # with the share perf gives its unnamed code in that worker.
        obj = "ngx_http_js_module.so"
        truth = perf_unnamed_share(tmp_path / "perf.data", spinning[0], obj)
        assert truth >= 10, f"perf saw {truth:.1f}% of the worker's samples in {obj}'s unnamed code"
        m = re.search(re.escape(f"{obj} (no symbol)") + r" \((\d+(?:\.\d+)?)%", report["likely_cause"])
        assert m, report["likely_cause"]
        assert abs(float(m.group(1)) - truth) <= 10, (report["likely_cause"], truth)
    lb = balancers(report, lab, noise, list(runs))
    # its share of the clients' bytes before, against its clients' share of the requests
    # (one size each), by their own count over the same polls
    mine = [pid for pid in runs if on_worker.get(pid) == spinning[0]]
    truth_share = done(mine, before) / done(runs, before)
    share = lb["workers"][str(spinning[0])]["before"]["client_share"]
    assert abs(share - truth_share) <= 0.05, (share, truth_share)
    fell = done(mine, window) / done(mine, before)
    assert "its client bytes fell to" in report["likely_cause"] and fell < 0.5, (report["likely_cause"], fell)
    if len(lb["pids"]) > 1:
        assert f"it carried {share:.0%} of nginx's client bytes then" in report["likely_cause"], report["likely_cause"]
    # the clients that got no answer: each found, each explained by the pinned worker
    found = {int(f["subject"].split(" pid ")[1].split()[0]) for f in report["findings"]
             if f["kind"] == "stalled_clients"}
    assert found == stalled, (found, stalled, report["findings"])
    assert all(f["explained_by"] == {"kind": "cpu_pinned", "subject": f"nginx (pid {spinning[0]})"}
               for f in report["findings"] if f["kind"] == "stalled_clients")
    # data to the backends against the window before, as the clients' counts say (one
    # upstream connection per request; /spin makes none)
    ratio = lb["vs_before"]["backend_bytes_ratio"]
    truth_ratio = done(runs, window) / done(runs, before)
    assert abs(ratio - truth_ratio) <= 0.1, (lb["vs_before"], truth_ratio)


@pytest.mark.truth
def test_backtrack_reads_the_embedded_store_when_the_agent_is_down(bpf_ready, tmp_path):
    """A new user's case: the agent died (or the host rebooted) and they look back."""
    need(Path("/usr/bin/influxd").exists(), "influxd (Debian influxdb)")
    http_port, rpc_port = free_port(), free_port()
    text = f"state_dir: {tmp_path}/state\ninterval_seconds: 1\nembedded:\n  http_port: {http_port}\n" \
           f"  rpc_port: {rpc_port}\n"
    (tmp_path / "c.yaml").write_text(text)
    from sonde.ingest import config as config_mod
    agent = Agent(config_mod.parse(text), only=["tcp"], max_backoff=0.5).start()
    try:
        agent.poll()
        start = time.time()
        tx_pid, _ = transfer(tmp_path, 1_234_567, "bt-sender", "bt-receiver")
        agent.poll()
        wait_until(lambda: len(agent.spool) == 0, what="spool drained")
    finally:
        agent.stop()
    end = time.time() + 1
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{http_port}/ping", timeout=2)
    r = subprocess.run([str(REPO / ".venv/bin/sonde"), "backtrack", "-c", str(tmp_path / "c.yaml"), "--from",
                        str(start - 1), "--to", str(end), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "agent is not running" in r.stderr, r.stderr
    rows = [t for t in json.loads(r.stdout)["talkers"] if t["pid"] == str(tx_pid)]
    assert [(t["comm"], t["tx_bytes"]) for t in rows] == [("bt-sender", 1_234_567)]
    # the store it started is gone again: nothing of it listens, no influxd runs on that directory
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", http_port)) != 0
    assert processes_mentioning(tmp_path) == []
    # with no data directory at all: one line saying what to do
    (tmp_path / "empty.yaml").write_text(text.replace(f"{tmp_path}/state", f"{tmp_path}/none"))
    r = subprocess.run([str(REPO / ".venv/bin/sonde"), "backtrack", "-c", str(tmp_path / "empty.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "sonde run" in r.stderr, r.stderr
