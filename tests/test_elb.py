"""The load-balancer field incidents, staged for real and solved from stored metrics.

nginx proxies in its own network namespace to three backends, each in its own
namespace behind its own veth pair (198.18.N.0/24). Sonde runs; the test stages
the incident, then reads `sonde backtrack --json` over the window."""
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO, Child, make_config, need, select, sh, wait_for_file, wait_until
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
    client_body_temp_path {d}/cb; proxy_temp_path {d}/px; fastcgi_temp_path {d}/fc;
    uwsgi_temp_path {d}/uw; scgi_temp_path {d}/sc;
    upstream backends {{ server 198.18.1.2:8080; server 198.18.2.2:8080; server 198.18.3.2:8080; }}
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
import http.client, sys, time
# one keep-alive connection at a modest rate: a client pinned to whichever worker
# accepted it, as browsers and upstream pools are
end = time.time() + float(sys.argv[1]); ok = failed = 0
conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=30)
while time.time() < end:
    try:
        conn.request("GET", "/"); conn.getresponse().read(); ok += 1
    except (OSError, http.client.HTTPException):
        failed += 1
        conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=30)
    time.sleep(0.005)
print(ok, failed)
"""


class Lab:
    def __init__(self, tmp: Path):
        tag = uuid.uuid4().hex[:5]
        self.tmp = tmp
        self.lb = f"sonde-lb-{tag}"
        self.backends = {i: f"sonde-b{i}-{tag}" for i in (1, 2, 3)}
        self.servers: dict[int, Child] = {}
        self.nginx = None
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
        modules = extra = ""
        if spin:  # njs: a handler that holds its worker on the CPU for 8 s
            (self.tmp / "spin.js").write_text(SPIN_JS)
            modules = "load_module /usr/lib/nginx/modules/ngx_http_js_module.so;"
            extra = f"js_import spin from {self.tmp}/spin.js; location /spin {{ js_content spin.spin; }}"
        (self.tmp / "nginx.conf").write_text(NGINX.format(d=self.tmp, modules=modules, extra=extra))
        self.nginx = subprocess.Popen(["ip", "netns", "exec", self.lb, "nginx", "-p", str(self.tmp), "-c",
                                       str(self.tmp / "nginx.conf")], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: subprocess.run(["ip", "netns", "exec", self.lb, "curl", "-sf", "http://127.0.0.1:8000/"],
                                          capture_output=True).returncode == 0, what="nginx proxying")

    def load(self, seconds: float, connections: int = 8) -> dict:
        out = subprocess.run(["ip", "netns", "exec", self.lb, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
                              "http://127.0.0.1:8000/"], capture_output=True, text=True).stdout
        total = int(out.split(" requests in ")[0].split()[-1])
        non2xx = int(out.split("Non-2xx or 3xx responses:")[1].split()[0]) if "Non-2xx" in out else 0
        errors = sum(int(x) for x in __import__("re").findall(r"(?:connect|read|write|timeout) (\d+)", out))
        return {"requests": total, "failed": non2xx + errors}

    def light_load(self, seconds: float, clients: int = 2) -> list[subprocess.Popen]:
        """A few clients at a modest rate, so a healthy worker is far from a full core."""
        return [subprocess.Popen(["ip", "netns", "exec", self.lb, sys.executable, "-c", LIGHT_LOAD, str(seconds)],
                                 stdout=subprocess.PIPE, text=True) for _ in range(clients)]

    def close(self):
        for c in list(self.servers.values()):
            c.kill()
        if self.nginx and self.nginx.poll() is None:
            self.nginx.terminate()
            self.nginx.wait()
        for ns in [self.lb, *self.backends.values()]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Poller:
    """The agent polling every second in the background, as `sonde run` would."""

    def __init__(self, agent):
        self.agent, self.stop = agent, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(1):
            self.agent.poll()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.agent.poll()
        wait_until(lambda: len(self.agent.spool) == 0, what="spool drained")


@pytest.fixture
def lab(bpf_ready, tmp_path):
    need(Path("/usr/sbin/nginx").exists(), "nginx")
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def agent(influx, influx_db, tmp_path):
    cfg = make_config(tmp_path, api="v1", url=influx.url, database=influx_db)
    a = Agent(cfg, only=["tcp", "cpu"], max_backoff=0.5).start()
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
        name = os.environ.get("PYTEST_CURRENT_TEST", "x").split("::")[-1].split(" ")[0]
        Path(os.environ["SONDE_EXAMPLES"], f"{name}.txt").write_text(t.stdout)
    return report


def test_clean_run_has_no_likely_cause(lab, agent, influx, influx_db, tmp_path):
    for i in (1, 2, 3):
        lab.start_backend(i)
    lab.start_nginx()
    agent.poll()  # the set-up (readiness probes) falls before the window
    start = int(time.time() * 1000)
    with Poller(agent):
        stats = lab.load(4)
    end = int(time.time() * 1000) + 1000
    assert stats["failed"] == 0 and stats["requests"] > 1000
    report = backtrack(influx, influx_db, tmp_path, start, end)
    assert report["likely_cause"] is None, report["findings"]
    lb = next(x for x in report["load_balancers"] if x["process"] == "nginx")
    assert set(lb["backends"]) == {"198.18.1.2:8080", "198.18.2.2:8080", "198.18.3.2:8080"}
    assert all(0.25 < b["connection_share"] < 0.42 for b in lb["backends"].values())
    points = agent.evaluate_alerts(end)
    assert [p for p in points if p.measurement == "sonde_alert"] == []


def test_incident_1_backend_resets(lab, agent, influx, influx_db, tmp_path):
    lab.start_backend(1)
    bad = lab.start_backend(2, reset_every=500)
    lab.start_backend(3)
    lab.start_nginx()
    agent.poll()  # the set-up (readiness probes) falls before the window
    start = int(time.time() * 1000)
    with Poller(agent):
        stats = lab.load(8)
    end = int(time.time() * 1000) + 1000
    assert stats["failed"] > 0
    report = backtrack(influx, influx_db, tmp_path, start, end)
    lb = next(x for x in report["load_balancers"] if x["process"] == "nginx")
    received = lb["backends"]["198.18.2.2:8080"]["resets_received"]
    sent = select(influx, influx_db, f"SELECT sum(resets_sent) FROM tcp_flow WHERE pid='{bad.pid}'")[0]["sum"]
    assert received == sent == stats["failed"] > 0
    assert all(b["resets_received"] == 0 for k, b in lb["backends"].items() if k != "198.18.2.2:8080")
    assert "198.18.2.2:8080" in report["likely_cause"]
    assert report["findings"][0]["kind"] == "resets"
    topo = subprocess.run([str(REPO / ".venv/bin/sonde"), "topology", "-c", str(tmp_path / "bt.yaml"), "--from",
                           str(start / 1000), "--to", str(end / 1000), "--json", "--svg", str(tmp_path / "t.svg")],
                          capture_output=True, text=True)
    edges = json.loads(topo.stdout)["edges"]
    abnormal = [e for e in edges if e["abnormal"]]
    assert [e["target"] for e in abnormal if e["source"].startswith("nginx")] == ["198.18.2.2:8080"]
    assert "198.18.2.2:8080" in (tmp_path / "t.svg").read_text()
    pngs = subprocess.run([str(REPO / ".venv/bin/sonde"), "backtrack", "-c", str(tmp_path / "bt.yaml"), "--from",
                           str(start / 1000), "--to", str(end / 1000), "--png", str(tmp_path / "png")],
                          capture_output=True, text=True)
    assert pngs.returncode == 0, pngs.stderr
    if os.environ.get("SONDE_EXAMPLES"):
        import shutil
        shutil.copy(tmp_path / "png" / "backend_bytes.png", os.environ["SONDE_EXAMPLES"])
    for name in ("backend_bytes", "srtt_p99", "cpu"):
        assert (tmp_path / "png" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fired = [json.loads(p.fields["labels"]) for p in agent.evaluate_alerts(end)
             if p.measurement == "sonde_alert" and p.tags["rule"] == "backend_resets"]
    assert {"host": agent.config.host, "comm": "nginx", "peer": "198.18.2.2", "port": "8080"} in fired


def test_incident_3_bandwidth_limit_on_one_backend_path(lab, agent, influx, influx_db, tmp_path):
    for i in (1, 2, 3):
        lab.start_backend(i, body=200_000)
    # the limited link: the backend's side of its veth, so its answers queue
    lab.exec(lab.backends[3], "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "40mbit", "burst", "64kb",
             "latency", "200ms")
    lab.start_nginx()
    agent.poll()  # the set-up (readiness probes) falls before the window
    start = int(time.time() * 1000)
    with Poller(agent):
        lab.load(8, connections=6)
    end = int(time.time() * 1000) + 1000
    report = backtrack(influx, influx_db, tmp_path, start, end)
    lb = next(x for x in report["load_balancers"] if x["process"] == "nginx")
    shares = {k: b["connection_share"] for k, b in lb["backends"].items()}
    assert all(0.2 < s < 0.46 for s in shares.values()), shares  # balancing stays fair
    srtt = {k: b["srtt_p99_us"] for k, b in lb["backends"].items()}
    assert srtt["198.18.3.2:8080"] > 4 * max(v for k, v in srtt.items() if k != "198.18.3.2:8080"), srtt
    assert "198.18.3.2:8080" in report["likely_cause"] and "path" in report["likely_cause"]


def test_incident_4_health_check_failures_start_and_end(lab, agent, influx, influx_db, tmp_path):
    for i in (1, 2, 3):
        lab.start_backend(i)
    lab.start_nginx()
    agent.poll()  # the set-up (readiness probes) falls before the window
    start = int(time.time() * 1000)
    with Poller(agent):
        lab.load(2)
        lab.stop_backend(3)  # stops listening: connects are refused
        down = int(time.time() * 1000)
        stats = lab.load(3)
        lab.start_backend(3)
        up = int(time.time() * 1000)
        lab.load(2)
    end = int(time.time() * 1000) + 1000
    assert stats["failed"] > 0
    report = backtrack(influx, influx_db, tmp_path, start, end)
    lb = next(x for x in report["load_balancers"] if x["process"] == "nginx")
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
    resolved = agent.evaluate_alerts(up + 70_000)  # a window later, with no failures since
    assert any(p.tags.get("rule") == "failed_connects" and p.tags.get("state") == "resolved" for p in resolved)


def test_incident_2_stuck_worker(lab, agent, influx, influx_db, tmp_path):
    need(Path("/usr/lib/nginx/modules/ngx_http_js_module.so").exists(), "njs (libnginx-mod-http-js)")
    for i in (1, 2, 3):
        lab.start_backend(i)
    lab.start_nginx(spin=True)
    agent.poll()
    with Poller(agent):
        clients = lab.light_load(16, clients=6)
        time.sleep(8)
        stuck_from = int(time.time() * 1000)
        spinner = subprocess.Popen(["ip", "netns", "exec", lab.lb, "curl", "-s", "-m", "30",
                                    "http://127.0.0.1:8000/spin"], stdout=subprocess.DEVNULL)
        time.sleep(8)
        stuck_to = int(time.time() * 1000)
        spinner.wait()
        for c in clients:
            c.wait()
    workers = [int(p) for p in sh("pgrep", "-f", "nginx: worker").split()]
    report = backtrack(influx, influx_db, tmp_path, stuck_from, stuck_to)
    pinned = [c for c in report["cpu"] if c["pinned"]]
    assert [c["comm"] for c in pinned] == ["nginx"], report["cpu"][:5]
    assert int(pinned[0]["pid"]) in workers
    assert report["findings"][0]["kind"] == "cpu_pinned"
    assert f'pid {pinned[0]["pid"]}' in report["likely_cause"]
    lb = next(x for x in report["load_balancers"] if x["process"] == "nginx")
    # less data moved to the backends than in the window before
    assert lb["vs_before"]["backend_bytes_ratio"] < 0.8, lb["vs_before"]
