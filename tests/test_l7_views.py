"""Where users look at L7 (issue 15, "where users look"): the ELB's first incident with
probe l7 opted in on nginx, read back through `sonde backtrack` and `sonde topology`,
and the L7 alert rules firing on a real load with errors or a slower backend and silent
on a clean one.

Ground truth is never Sonde's: nginx's own access log (status and upstream address per
request) and error log (each upstream reset it read), wrk's counts, and the backend's
own log of what it answered.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "probes"))

from conftest import REPO, children, make_config, select, wait_until  # noqa: E402
from test_alerts import grafana_agrees, scaled, thresholds_file  # noqa: E402
from test_elb import Lab, Poller, backtrack, lab, noise  # noqa: E402,F401  (fixtures lab, noise)
from test_l7 import Cgroup, Redis, l7, mariadb, paced, postgres, wait_port, wrk_binary, wrk_counts  # noqa: E402,F401  (fixture l7)

from sonde.alerts import rules as rules_mod  # noqa: E402
from sonde.dashboards import house  # noqa: E402
from sonde.ingest.analysis.queries import expand  # noqa: E402
from sonde.ingest.analysis.alerting import Evaluator  # noqa: E402
from sonde.ingest.runtime.agent import Agent  # noqa: E402

pytestmark = [pytest.mark.l7]

L7_RULES = ("http_5xx_ratio", "l7_error_ratio", "l7_p99_jump")

# The lab's nginx (tests/test_elb.py's, with no upstream retry), logging each request's
# status and the upstream it went to. max_fails=0: nginx keeps sending the resetting
# backend its share (by default one failure takes it out for 10 s, so a short test
# would see one reset).
LB_NGINX = """
worker_processes 2;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format up '$status $upstream_addr';
    access_log {d}/access.log up;
    keepalive_requests 1000000;
    client_body_temp_path {d}/cb; proxy_temp_path {d}/px; fastcgi_temp_path {d}/fc;
    uwsgi_temp_path {d}/uw; scgi_temp_path {d}/sc;
    upstream backends {{ {servers} }}
    server {{
        listen 127.0.0.1:8001;
        location / {{ proxy_pass http://backends; proxy_next_upstream off; }}
    }}
}}
"""


class LogNginx:
    """nginx in the lab's namespace in front of its three backends, with an access log,
    started in the test's cgroup (which the agent opts in: on a shared host other
    nginx run too, and opting in by name would parse theirs)."""

    def __init__(self, lb: Lab, d: Path, cgroup: Cgroup):
        d.mkdir(parents=True, exist_ok=True)
        self.dir = d
        servers = " ".join(f"server 198.18.{i}.2:8080 max_fails=0;" for i in (1, 2, 3))
        (d / "nginx.conf").write_text(LB_NGINX.format(d=d, servers=servers))
        # the shell joins the cgroup, then execs `ip netns exec`, which execs nginx: this pid is the master's
        self.proc = subprocess.Popen(["sh", "-c", f'echo $$ > {cgroup.fs}/cgroup.procs && exec "$@"', "nginx",
                                      "ip", "netns", "exec", lb.lb, "nginx", "-p", str(d), "-c",
                                      str(d / "nginx.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_until(lambda: subprocess.run(["ip", "netns", "exec", lb.lb, "curl", "-sf", "http://127.0.0.1:8001/"],
                                          capture_output=True).returncode == 0, what="nginx proxying")
        self.workers = wait_until(lambda: children(self.proc.pid) if len(children(self.proc.pid)) == 2 else None,
                                  what="two nginx workers")

    def access(self) -> list[list[str]]:
        return [line.split() for line in (self.dir / "access.log").read_text().splitlines()]

    def upstream_resets(self, upstream: str) -> int:
        """Upstream connections nginx found reset, by its error log."""
        return sum(1 for line in (self.dir / "error.log").read_text().splitlines()
                   if "Connection reset by peer" in line and upstream in line)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def l7_agent(influx, influx_db, tmp_path, cgroup: Cgroup, probes=("tcp", "cpu", "l7")) -> Agent:
    extra = ("probes:\n  l7:\n    enabled: true\n    cpu_percent: 100\n    tls: false\n"
             f"    cgroups: [{json.dumps(cgroup.path)}]\n")
    cfg = make_config(tmp_path, extra, api="v1", url=influx.url, database=influx_db)
    return Agent(cfg, only=list(probes), max_backoff=0.5).start()


def labels(**kw) -> frozenset:
    return frozenset(kw.items())


def values(ev: Evaluator, rule: str, now_ms: int) -> dict[frozenset, float]:
    """The rule's formula per series, keyed by its labels."""
    return {frozenset(dict(k).items()): v for k, v in ev.values(ev.rules[rule], now_ms).items()}


def panel_queries(influx, db: str, dashboard: str, start_ms: int, end_ms: int, **variables) -> dict[str, list[dict]]:
    """Every query of a dashboard's L7 panels (those on l7_ measurements), as Grafana would
    run it over [start, end] in 1 s buckets with the service nginx: rows by panel title."""
    out = {}
    rendered = house.render(house.load_all()[dashboard])
    for p in rendered["panels"]:
        rows = []
        for t in p.get("targets", []):
            if '"l7_' not in t.get("query", ""):
                continue
            text = expand(t["query"], start_ms=start_ms, end_ms=end_ms, interval_s=1,
                          variables={"service": "nginx", "process": None} | variables)
            res = influx.query(text, db=db)["results"][0]
            assert "error" not in res, f"{res['error']}\n{text}"
            for series in res.get("series", []):
                for v in series["values"]:
                    rows.append(dict(zip(series["columns"], v)) | series.get("tags", {}))
        if any('"l7_' in t.get("query", "") for t in p.get("targets", [])):
            out[p["title"]] = rows
    return out


def per_series(rows: list[dict], column: str, key=("peer", "port"), agg=sum) -> dict[str, float]:
    """A panel's column per series (its GROUP BY tags joined by ':'), summed over its buckets."""
    out: dict[str, list] = {}
    for r in rows:
        if r.get(column) is not None:
            out.setdefault(":".join(r[k] for k in key), []).append(r[column])
    return {k: agg(v) for k, v in out.items()}


def caught_up(agent) -> None:
    dec = agent.probes["l7"].decoder
    wait_until(lambda: dec.backlog() == 0, timeout=120, what="the L7 parser taking everything the kernel sent")


@pytest.mark.truth
def test_incident_1_reads_the_502s_per_upstream(lab, noise, influx, influx_db, tmp_path):
    """nginx balancing over three backends in their namespaces, one resetting every
    50th connection, under wrk (paced, each thread stopping after its last response, so
    no request is in flight at the end): backtrack's likely cause reads "N of M requests
    through nginx to 198.18.2.2:8080 failed with 502 while that backend reset N
    connections", N and M from nginx's access log and error log and wrk's count."""
    cgroup = Cgroup()
    agent = l7_agent(influx, influx_db, tmp_path, cgroup)
    try:
        lab.start_backend(1)
        lab.start_backend(2, reset_every=50)
        lab.start_backend(3)
        lab.nginx = LogNginx(lab, tmp_path / "lb", cgroup)
        dec = agent.probes["l7"].decoder
        wait_until(lambda: (agent.poll(["l7"]) or True) and lab.nginx.workers <= set(dec.opted),
                   what="the lab's nginx workers opted in")
        caught_up(agent)
        agent.poll()  # the set-up (readiness requests) falls before the window
        already = len(lab.nginx.access())
        start = int(time.time() * 1000)
        with Poller(agent):
            noise.short_connections()
            out = subprocess.run(["ip", "netns", "exec", lab.lb, wrk_binary(tmp_path), "-t2", "-c2", "-d60s", "-s",
                                  paced(tmp_path, ms=1, stop_after=1500), "http://127.0.0.1:8001/"],
                                 capture_output=True, text=True).stdout
            caught_up(agent)
        end = int(time.time() * 1000) + 1000
        wrk_requests, wrk_bad = wrk_counts(out)
        assert wrk_requests == 3000, out

        lost = select(influx, influx_db, f"SELECT sum(lost_events) FROM l7_probe WHERE time >= {start}ms")
        assert not lost or lost[0]["sum"] == 0, f"the agent fell behind ({lost}): the counts cannot be exact"

        # nginx's own account of the window
        log = lab.nginx.access()[already:]
        sent = Counter(up for _, up in log)
        bad = Counter(up for status, up in log if status == "502")
        n, m = bad["198.18.2.2:8080"], sent["198.18.2.2:8080"]
        assert len(log) == wrk_requests and wrk_bad == n == sum(bad.values()) > 10, (len(log), wrk_bad, bad)
        assert lab.nginx.upstream_resets("198.18.2.2:8080") == n
        assert set(sent) == {"198.18.1.2:8080", "198.18.2.2:8080", "198.18.3.2:8080"}

        report = backtrack(influx, influx_db, tmp_path, start, end)
        # (on :8001, so the lab's balancer is never taken for one worker group with another
        # test's nginx on :8000 in a namespace of its own: the agent does not tag namespaces)
        ours = [lb for lb in report["load_balancers"] if {int(p) for p in lb["pids"]} & lab.nginx.workers]
        assert len(ours) == 1 and {int(p) for p in ours[0]["pids"]} <= lab.nginx.workers, report["load_balancers"]
        lb = ours[0]
        assert set(lb["backends"]) == {"198.18.1.2:8080", "198.18.2.2:8080", "198.18.3.2:8080"}
        assert lb["backends"]["198.18.2.2:8080"]["resets_received"] == n
        l7v = lb["l7"]
        assert {k: (b["sent"], b["failed"], b["no_response"]) for k, b in l7v["backends"].items()} == \
            {k: (sent[k], bad[k], bad[k]) for k in sent}
        assert {p: (f["requests"], f["codes"]) for p, f in l7v["frontends"].items()} == \
            {"8001": (wrk_requests, {"502": n})}
        assert l7v["no_response_code"] == "502"
        assert report["likely_cause"] == (f"{n} of {m} requests through nginx to 198.18.2.2:8080 failed with 502 "
                                          f"while that backend reset {n} connections: check that backend "
                                          f"(its timeouts, its logs around the window)")
        kinds = [(f["kind"], f["subject"], f["explained_by"]) for f in report["findings"][:2]]
        assert kinds == [("resets", "nginx -> 198.18.2.2:8080", None),
                         ("failed_requests", "nginx -> 198.18.2.2:8080",
                          {"kind": "resets", "subject": "nginx -> 198.18.2.2:8080"})], report["findings"]
        assert not [f for f in report["findings"] if f["kind"] == "failed_requests"
                    and "198.18.2.2" not in f["subject"]]

        # the topology's edge to that backend carries its requests, and only it is abnormal
        topo = subprocess.run([str(REPO / ".venv/bin/sonde"), "topology", "-c", str(tmp_path / "bt.yaml"), "--from",
                               str(start / 1000), "--to", str(end / 1000), "--json", "--svg", str(tmp_path / "t.svg")],
                              capture_output=True, text=True)
        assert topo.returncode == 0, topo.stderr
        edges = json.loads(topo.stdout)["edges"]
        mine = f'nginx[{",".join(lb["pids"])}]@'
        to_backend = {e["target"]: e for e in edges if e["source"].startswith(mine)}
        assert {k: (e["l7"]["requests"], e["l7"]["failed"], e["l7"]["protocols"]) for k, e in to_backend.items()} \
            == {k: (sent[k], bad[k], ["http"]) for k in sent}
        front = [e for e in edges if e["target"].startswith(mine) and e["port"] == "8001"]
        assert sum(e["l7"]["requests"] for e in front) == wrk_requests
        assert sum(e["l7"]["failed"] for e in front) == n
        # (edges are marked by the findings' subjects: another test's nginx on this host with
        # a fault on its own 198.18.x.2 would mark ours too; failed requests are only ours)
        assert to_backend["198.18.2.2:8080"]["abnormal"]
        assert {"failed_requests", "resets"} <= set(to_backend["198.18.2.2:8080"]["why"])
        assert [k for k, e in to_backend.items() if "failed_requests" in e["why"]] == ["198.18.2.2:8080"]
        assert not [e for e in front if e["abnormal"]]
        assert f"http {m} req, {n} failed" in (tmp_path / "t.svg").read_text()

        # the dashboards' L7 panels, run against the same store: each equals nginx's log
        lbq = panel_queries(influx, influx_db, "loadbalancer", start, end, host=agent.config.host)
        answered = {k: sent[k] - bad[k] for k in sent}
        table = {(r["peer"] + ":" + r["port"]): (r["requests"], r["errors"], r["no_response"])
                 for r in lbq["Per-backend requests in range (L7)"]}
        assert table == {k: (answered[k], 0, bad[k]) for k in sent}
        assert per_series(lbq["Backend: requests per second by upstream (L7)"], "answered") == answered
        assert per_series(lbq["Backend: failed requests by upstream (L7)"], "no_response") == \
            {k: bad[k] for k in sent}
        assert per_series(lbq["Backend: failed requests by upstream (L7)"], "5xx") == {k: 0 for k in sent}
        assert per_series(lbq["Frontend: error responses by status (L7)"], "responses", ("port", "status")) == \
            {"8001:502": n}
        assert sum(r["count"] or 0 for r in lbq["Backend: request duration (µs, L7)"]) == sum(answered.values())
        p99 = per_series(lbq["Backend: request p99 by upstream (L7)"], "p99_us", agg=max)
        assert set(p99) == set(sent) and all(v > 0 for v in p99.values()), p99
        httpq = panel_queries(influx, influx_db, "http", start, end, host=agent.config.host)
        rate = per_series(httpq["Requests per second by process and operation"], "requests", ("comm", "role", "op"))
        assert rate == {"nginx:server:GET": wrk_requests, "nginx:client:GET": sum(answered.values())}
        codes = per_series(httpq["Error responses by status"], "responses", ("comm", "role", "status"))
        assert codes == {"nginx:server:502": n}

        # the alerts, over a window holding the whole load: the backend's requests failing,
        # nginx answering 5xx; not the healthy backends
        rules = rules_mod.load(thresholds_file(tmp_path, scaled(math.ceil((end - start) / 1000) + 1)))
        ev = Evaluator({k: v for k, v in rules.items() if k in L7_RULES},
                       lambda q: influx.query(q, db=influx_db), agent.config.host)
        fired = [(p.tags["rule"], json.loads(p.fields["labels"])) for p in ev.evaluate(end)
                 if p.tags["state"] == "firing"]
        host = agent.config.host
        assert ("l7_error_ratio", {"host": host, "comm": "nginx", "role": "client", "peer": "198.18.2.2",
                                   "port": "8080", "protocol": "http"}) in fired
        assert ("http_5xx_ratio", {"host": host, "comm": "nginx", "port": "8001"}) in fired
        assert not [f for f in fired if f[1].get("peer", "").startswith("198.18.") and f[1]["peer"] != "198.18.2.2"]
        value = values(ev, "l7_error_ratio", end)
        assert value[labels(host=host, comm="nginx", role="client", peer="198.18.2.2", port="8080",
                            protocol="http")] == pytest.approx(n / m, rel=1e-12)
    finally:
        agent.stop()
        if lab.nginx:
            lab.nginx.stop()
        cgroup.remove()


# --- the alert rules on a loopback balancer ----------------------------------------------------

BACKEND_PY = """
import http.server, sys, threading, time
n = 0
lock = threading.Lock()
log = open(sys.argv[2], "a", buffering=1)
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        global n
        code = 200
        if self.path.startswith("/slow"):
            time.sleep(0.05)
        elif self.path.startswith("/e"):
            with lock:
                n += 1
                code = 500 if n % 7 == 0 else 200
        body = b"x\\n"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        log.write(f"{code}\\n")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

FRONT = """
    server {
        listen 127.0.0.1:PORT;
        location / { proxy_pass http://127.0.0.1:BACKEND; }
    }
"""


class Backend:
    """/ok: 200; /e: 500 to every 7th; /slow: 200 after 50 ms. Its log: one status per answer."""

    def __init__(self, root: Path):
        with __import__("socket").socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.logfile = root / f"backend-{self.port}.log"
        (root / "views_backend.py").write_text(BACKEND_PY)
        self.proc = subprocess.Popen([sys.executable, str(root / "views_backend.py"), str(self.port),
                                      str(self.logfile)])
        wait_port(self.port)

    def log(self) -> list[str]:
        return self.logfile.read_text().split() if self.logfile.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wrk(l7, port: int, path: str, each: int) -> tuple[int, int]:
    """wrk, two paced connections each stopping after `each` responses: (requests, non-2xx)."""
    out = subprocess.run([wrk_binary(l7.tmp), "-t2", "-c2", "-d60s", "-s", paced(l7.tmp, ms=1, stop_after=each),
                          f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True).stdout
    requests, bad = wrk_counts(out)
    assert requests == 2 * each, out
    return requests, bad


def two_phases(l7, influx, influx_db, second: list[tuple[str, int]]) -> dict:
    """nginx in front of the backend, opted in (by its port): a clean phase (/ok), then
    `second` (paths and responses per connection). Returns the evaluator with every L7
    rule over windows that put the first phase in the p99 baseline and the second in
    its window (the ratios' windows hold both), and the logs."""
    backend = Backend(l7.tmp)
    l7.servers.append(backend)
    front = l7.nginx(FRONT.replace("BACKEND", str(backend.port)))
    tmp = l7.tmp
    agent = l7.make_agent("l7", extra=f"probes:\n  l7:\n    enabled: true\n    cpu_percent: 100\n"
                                      f"    ports: [{front.port}]\n")
    l7.agent = agent
    l7.opted(front.pids())
    a0 = time.time()
    wrk(l7, front.port, "/ok", 600)
    l7.settle()
    a1 = time.time()
    time.sleep(1.5)
    b0 = time.time()
    for path, each in second:
        wrk(l7, front.port, path, each)
    totals = l7.settle()
    assert totals["lost_events"] == 0, totals
    b1 = time.time()
    boundary = (a1 + b0) / 2
    window = max(math.ceil(b1 - boundary), math.ceil(boundary - a0)) + 1
    now_ms = int((boundary + window) * 1000)
    t = scaled(window)
    for name in ("http_5xx_ratio", "l7_error_ratio"):
        t[name]["window"] = 2 * window
    rules = rules_mod.load(thresholds_file(tmp, t))
    ev = Evaluator({n: rules[n] for n in L7_RULES}, lambda q: influx.query(q, db=influx_db), agent.config.host)
    return {"ev": ev, "now_ms": now_ms, "front": front, "backend": backend, "host": agent.config.host}


def firing(run) -> list[tuple[str, dict]]:
    return [(p.tags["rule"], json.loads(p.fields["labels"])) for p in run["ev"].evaluate(run["now_ms"])
            if p.tags["state"] == "firing"]


def test_l7_alerts_fire_on_5xx_and_a_slower_backend(l7, influx, influx_db):
    """After a clean phase: 500 to every 7th request, then 50 ms answers. The 5xx ratio
    and the error ratio fire with the ratio the logs give, the p99 jump fires on the
    backend edge; Grafana's rendering of each rule computes the same values."""
    run = two_phases(l7, influx, influx_db, [("/e", 600), ("/slow", 20)])
    front, backend = run["front"], run["backend"]
    fired = firing(run)
    host, port = run["host"], str(front.port)
    blog, flog = backend.log(), front.log()
    n500 = blog.count("500")
    assert n500 == 1200 // 7 and len(blog) == len(flog) == 1200 + 1200 + 40
    assert sum(1 for line in flog if line[0] == "500") == n500
    assert ("http_5xx_ratio", {"host": host, "comm": "nginx", "port": port}) in fired
    upstream = {"host": host, "comm": "nginx", "role": "client", "peer": "127.0.0.1", "port": str(backend.port),
                "protocol": "http"}
    served = upstream | {"role": "server", "port": port}
    assert ("l7_error_ratio", upstream) in fired and ("l7_error_ratio", served) in fired
    assert ("l7_p99_jump", upstream | {"op": "GET"}) in fired, fired
    ev, now = run["ev"], run["now_ms"]
    ratio = values(ev, "http_5xx_ratio", now)
    assert ratio[labels(host=host, comm="nginx", port=port)] == pytest.approx(n500 / len(flog), rel=1e-12)
    errors = values(ev, "l7_error_ratio", now)
    assert errors[labels(**upstream)] == pytest.approx(n500 / len(blog), rel=1e-12)
    grafana_agrees(ev, influx, influx_db, now, names=L7_RULES)


def test_l7_alerts_stay_silent_on_a_clean_load(l7, influx, influx_db):
    """The same two phases, both clean: the rules see the series (the error ratio is 0
    for each edge) and none fires."""
    run = two_phases(l7, influx, influx_db, [("/ok", 600)])
    front, backend = run["front"], run["backend"]
    assert backend.log().count("500") == 0 and len(front.log()) == 2400
    assert firing(run) == []
    ev, now = run["ev"], run["now_ms"]
    errors = values(ev, "l7_error_ratio", now)
    nginx = {k: v for k, v in errors.items() if dict(k)["comm"] == "nginx"}
    assert {dict(k)["role"] for k in nginx} == {"client", "server"} and set(nginx.values()) == {0.0}, errors
    jumps = values(ev, "l7_p99_jump", now)
    assert jumps and all(v <= 3.0 for v in jumps.values()), jumps
    grafana_agrees(ev, influx, influx_db, now, names=L7_RULES)



# --- the parser side, on literal bytes ---------------------------------------------------------

def test_error_status_tag_is_the_code_or_its_class():
    from sonde.bpf.l7.protocols.http import status_tag
    assert [status_tag(c) for c in (200, 302, 399, 400, 404, 420, 429, 444, 499, 500, 502, 504, 509, 599)] == \
        [None, None, None, "400", "404", "4xx", "429", "444", "499", "500", "502", "504", "5xx", "5xx"]
    assert len({status_tag(c) for c in range(100, 600)} - {None}) <= 51


def test_a_request_cut_by_the_connection_end_is_no_response_not_a_request():
    """A proxy's upstream connection: one request answered 200, one answered 502 (its
    code kept), a third outstanding when the backend resets: that one is cut, counted
    unanswered, and named by its op; a loss of events (a gap) is not a cut."""
    from sonde.bpf.l7.protocols.pairing import Connection
    req = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    bad = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"
    c = Connection()
    done = []
    for ts, (d, data) in enumerate((("out", req), ("in", ok), ("out", req), ("in", bad), ("out", req))):
        done += c.feed(ts, d, data, len(data))
    done += c.close(9)
    assert [(e.status_class, e.code, e.error) for e in done] == [("2xx", 200, False), ("5xx", 502, True)]
    assert c.take_cut() == ["GET"] and c.take_cut() == []
    assert c.counters.unanswered == 1 and c.counters.desyncs == 0
    g = Connection()
    g.feed(0, "out", req, len(req))
    g.gap(1, "in")
    g.close(2)
    assert g.take_cut() == [] and g.counters.unanswered == 1


# --- the protocol dashboards, each against its server's own counters ---------------------------

# Fields that stay zero under these clean loads (their queries must still return points).
ZERO_HERE = ("errors", "no_response", "unanswered", "desyncs", "lost_events")


def check_family(influx, db: str, dashboard: str, start_ms: int, end_ms: int, host: str, comm: str,
                 truth: dict[str, int], only: tuple[str, ...] = ()) -> None:
    """Every query of the dashboard returns points of this run (a query whose values are
    all zero only for a field that is zero here), and its requests panel, per operation at
    the server, equals the server's own counts (`only`: those operations)."""
    rendered = house.render(house.load_all()[dashboard])
    for q in house.queries_of(rendered):
        text = expand(q.replace("fill(0)", "fill(none)"), start_ms=start_ms, end_ms=end_ms, interval_s=1,
                      variables={"host": host, "process": None})
        res = influx.query(text, db=db)["results"][0]
        assert "error" not in res, f"{res['error']}\n{text}"
        values = [v for s in res.get("series", []) for row in s["values"] for v in row[1:] if v is not None]
        assert values, f"{dashboard}: no points for\n{q}"
        if not any(v not in (0, "") for v in values):
            assert any(f'"{f}"' in q for f in ZERO_HERE), f"{dashboard}: only zeros for\n{q}"
    rows = panel_queries(influx, db, dashboard, start_ms, end_ms, host=host)
    rate = per_series(rows["Requests per second by process and operation"], "requests", ("comm", "role", "op"))
    served = {k.rsplit(":", 1)[1]: v for k, v in rate.items() if k.startswith(f"{comm}:server:")}
    if only:
        served = {k: served.get(k, 0) for k in only}
    assert served == truth, (served, truth)


def test_redis_dashboard_counts_equal_commandstats(l7, influx, influx_db):
    """redis-benchmark against redis-server, both opted in: the Redis dashboard's requests
    per command at the server equal INFO commandstats' deltas (the test's own INFO aside)."""
    redis = Redis(l7.tmp)
    l7.servers.append(redis)
    start = int(time.time() * 1000)
    l7.start_agent(ports=[redis.port])
    ln = l7.launch(["redis-benchmark", "-h", "127.0.0.1", "-p", str(redis.port), "-P", "16", "-c", "4",
                    "-n", "2000", "-t", "set,get,incr,lpush", "-q"])
    l7.opted(redis.pids() | {ln.pid})
    before = redis.commandstats()
    ln.run()
    after = redis.commandstats()
    assert l7.settle()["lost_events"] == 0
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: v for k, v in delta.items() if v and k != "INFO"}
    assert delta["SET"] >= 2000
    check_family(influx, influx_db, "redis", start, int(time.time() * 1000) + 1000, l7.agent.config.host,
                 "redis-server", delta, only=tuple(delta))


def test_postgresql_dashboard_counts_equal_pg_stat_statements(l7, postgres, influx, influx_db):
    """pgbench -S against PostgreSQL, opted in: the PostgreSQL dashboard's statements per
    class at the server's backends equal pg_stat_statements' calls."""
    pg = postgres
    start = int(time.time() * 1000)
    l7.start_agent(ports=[pg.port])
    ln = l7.launch(["pgbench", "-n", "-S", "-M", "simple", "-c", "2", "-t", "500", "-h", "127.0.0.1",
                    "-p", str(pg.port), "-U", "postgres", "postgres"])
    l7.opted({pg.postmaster, ln.pid})
    pg.sql("SELECT pg_stat_statements_reset()")
    ln.run()
    truth = pg.statement_calls()
    assert l7.settle()["lost_events"] == 0
    assert truth.get("SELECT", 0) >= 1000, truth
    check_family(influx, influx_db, "postgresql", start, int(time.time() * 1000) + 1000, l7.agent.config.host,
                 "postgres", truth)


def test_mysql_dashboard_counts_equal_mariadb_status(l7, mariadb, influx, influx_db):
    """sysbench oltp_read_only (no prepared statements) against MariaDB, opted in: the MySQL
    dashboard's SELECT, BEGIN and COMMIT at the server equal Com_select, Com_begin and
    Com_commit."""
    db = mariadb
    start = int(time.time() * 1000)
    l7.start_agent(ports=[db.port])
    ln = l7.launch(["sysbench", "oltp_read_only", "--mysql-host=127.0.0.1", f"--mysql-port={db.port}",
                    "--mysql-user=root", "--mysql-db=sbtest", "--tables=1", "--table-size=1000", "--events=60",
                    "--rate=60", "--threads=2", "--time=0", "--db-ps-mode=disable", "run"])
    l7.opted(db.pids() | {ln.pid})
    before = db.status()
    ln.run()
    after = db.status()
    assert l7.settle()["lost_events"] == 0
    d = {k: after[k] - before[k] for k in after}
    truth = {"SELECT": d["Com_select"], "BEGIN": d["Com_begin"], "COMMIT": d["Com_commit"]}
    assert truth == {"SELECT": 60 * 14, "BEGIN": 60, "COMMIT": 60}
    comm = Path(f"/proc/{db.proc.pid}/comm").read_text().strip()
    check_family(influx, influx_db, "mysql", start, int(time.time() * 1000) + 1000, l7.agent.config.host,
                 comm, truth, only=tuple(truth))
