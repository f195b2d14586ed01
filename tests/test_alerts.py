"""Alert rules: Grafana provisioning against the schema, and the built-in evaluator
firing on staged faults (real kernel, real InfluxDB) and staying silent on a clean load."""
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest

from sonde.ingest.docs import section
import yaml

from sonde.alerts import rules as rules_mod
from conftest import REPO, Child, drain, free_port, make_config, need, select, wait_for_file, wait_until
from sonde.ingest.runtime.agent import Agent
from sonde.ingest.analysis.queries import expand

pytestmark = [pytest.mark.dashboards]
SCHEMA = REPO.parent / "shared/schemas/grafana-v11.6/alerting.jsonschema.json"


def test_provisioned_rules_validate_against_grafana_schema():
    need(SCHEMA.exists(), f"Grafana alerting schema at {SCHEMA}")
    s = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator({"$ref": "#/definitions/Rule", "definitions": s["definitions"]})
    prov = rules_mod.grafana_provisioning()
    assert len(prov["groups"][0]["rules"]) == len(rules_mod.load()) >= 9
    for rule in prov["groups"][0]["rules"]:
        validator.validate(rule)


def test_every_threshold_says_why():
    for r in rules_mod.load().values():
        assert len(r.why) > 40, f"{r.name}: the thresholds file needs a comment saying why"


def test_readme_lists_rules_as_generated():
    text = (REPO / "README.md").read_text()
    block = section(text, "alerts")
    assert block == rules_mod.markdown_list()


# Test-scale windows: the same rules and formulas, over seconds instead of minutes.
TEST_THRESHOLDS = yaml.safe_load(rules_mod.THRESHOLDS.read_text())
for _r in TEST_THRESHOLDS.values():
    _r["window"] = 20
    if "baseline" in _r:
        _r["baseline"] = 20
TEST_THRESHOLDS["disk_utilisation"]["threshold"] = 30
TEST_THRESHOLDS["disk_latency_p99"]["threshold_us"] = 2000  # a queue of 64 on a loop device is the fault here


@pytest.fixture
def staged(agents, tmp_path):
    """Agents evaluating the test-scale thresholds."""
    path = tmp_path / "thresholds.yaml"
    path.write_text(yaml.safe_dump(TEST_THRESHOLDS))
    return lambda *probes, extra="": agents(*probes, extra=f"alerts:\n  thresholds: {path}\n" + extra)


def evaluate(agent):
    drain(agent)
    return agent.evaluate_alerts()


def fired(points, rule):
    return [json.loads(p.fields["labels"]) for p in points
            if p.measurement == "sonde_alert" and p.tags["rule"] == rule and p.tags["state"] == "firing"]


def test_backend_resets_fire_and_grafana_rule_computes_the_same_value(staged, influx, influx_db, tmp_path):
    agent = staged("tcp")
    portfile = tmp_path / "port"
    srv = Child("accept", str(portfile), "rst-backend", 5, "rst", "127.0.0.1")
    port = int(wait_for_file(portfile))
    cli = Child("connects", "127.0.0.1", port, "sonde-lb", 5, "byte")
    assert cli.wait().strip() == "ok=5 refused=0 reset=5"
    srv.wait()
    now_ms = int(time.time() * 1000) + 500
    agent.poll()
    wait_until(lambda: len(agent.spool) == 0, what="spool drained")
    points = agent.evaluate_alerts(now_ms)
    labels = fired(points, "backend_resets")
    assert {"comm": "sonde-lb", "peer": "127.0.0.1", "port": str(port), "host": agent.config.host} in labels
    value = next(p.fields["value"] for p in points if p.tags.get("rule") == "backend_resets"
                 and json.loads(p.fields["labels"])["comm"] == "sonde-lb")
    assert value == 5
    # The Grafana rule's own query, over its own relative range, gives the same number.
    grule = next(r for r in rules_mod.grafana_provisioning(agent.analysis().evaluator.rules)["groups"][0]["rules"]
                 if r["title"] == "backend_resets")
    model = grule["data"][0]
    q = expand(model["model"]["query"], start_ms=now_ms - model["relativeTimeRange"]["from"] * 1000,
               end_ms=now_ms, interval_s=1)
    series = influx.query(q, db=influx_db)["results"][0]["series"]
    grafana_value = next(s["values"][-1][1] for s in series if s["tags"]["comm"] == "sonde-lb")
    assert grafana_value == value


def test_failed_connects_fire_then_resolve(staged, influx, influx_db):
    agent = staged("tcp")
    bad = Child("connects", "127.0.0.1", free_port(), "sonde-hc", 3)
    assert bad.wait().strip() == "ok=0 refused=3 reset=0"
    t0 = int(time.time() * 1000)
    points = evaluate(agent)
    assert any(l["comm"] == "sonde-hc" for l in fired(points, "failed_connects"))
    # after the window has passed with no more failures, it resolves
    later = agent.evaluate_alerts(t0 + 25_000)
    assert any(p.tags.get("rule") == "failed_connects" and p.tags.get("state") == "resolved" for p in later)
    assert not fired(points, "backend_resets"), "a refused connect is not a backend reset"
    wait_until(lambda: len(agent.spool) == 0, what="spool drained")
    rows = select(influx, influx_db, "SELECT * FROM sonde_alert WHERE rule='failed_connects'")
    assert {r["state"] for r in rows} == {"firing", "resolved"}


def test_cpu_pinned_fires(staged):
    agent = staged("cpu")
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()+4.5\nwhile time.time()<t: pass\n"
                             "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        for _ in range(4):
            time.sleep(1)
            agent.poll()
        points = evaluate(agent)
    finally:
        spin.kill()
        spin.wait()
    assert any(l["pid"] == str(spin.pid) for l in fired(points, "cpu_pinned"))


def test_oom_kill_fires(staged):
    mem = Path("/sys/fs/cgroup/memory")
    need(mem.is_dir(), "the v1 memory controller (this machine's layout)")
    agent = staged("oom")
    cg = mem / f"sonde-alert-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(32 << 20))
        v = subprocess.Popen([sys.executable, "-c", f"import os\nopen('{cg}/cgroup.procs','w').write(str(os.getpid()))"
                              "\nb=[]\nwhile True: b.append(bytearray(1<<20))"])
        assert v.wait(timeout=60) == -9
        time.sleep(0.3)
        points = evaluate(agent)
    finally:
        cg.rmdir()
    assert fired(points, "oom_kill") == [{"host": agent.config.host}]


def test_agent_drops_fire_when_a_map_is_full(staged):
    agent = staged("tcp", extra="probes:\n  tcp:\n    map_entries: 16\n")
    bad = Child("connects", "127.0.0.1", free_port(), "sonde-fill", 1)
    bad.wait()
    for _ in range(30):  # 30 processes, one flow each: more than 16 entries
        Child("connects", "127.0.0.1", free_port(), "sonde-fill", 1).wait()
    points = evaluate(agent)
    assert fired(points, "agent_drops") == [{"host": agent.config.host}]


def test_agent_poll_failures_fire(staged):
    agent = staged("tcp")
    probe = agent.probes["tcp"]

    def broken(ts):
        raise RuntimeError("staged decoder failure")
    probe.decoder.poll = broken  # the staged fault: this probe's decoding raises
    points = evaluate(agent)
    assert fired(points, "agent_poll_failures") == [{"host": agent.config.host, "probe": "tcp"}]


def test_disk_utilisation_fires(staged, tmp_path):
    agent = staged("block_io")
    img = tmp_path / "d.img"
    subprocess.run(["truncate", "-s", "64M", str(img)], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True, check=True).stdout.strip()
    try:
        end = time.monotonic() + 3
        while time.monotonic() < end:
            subprocess.run(["dd", "if=/dev/zero", f"of={dev}", "bs=64k", "count=500", "oflag=direct"],
                           capture_output=True)
            agent.poll()
        points = evaluate(agent)
    finally:
        subprocess.run(["losetup", "-d", dev])
    assert {"host": agent.config.host, "disk": os.path.basename(dev)} in fired(points, "disk_utilisation")


def test_disk_latency_p99_fires_under_a_deep_queue(staged, tmp_path):
    need(Path("/usr/bin/fio").exists(), "fio")
    agent = staged("block_io")
    img = tmp_path / "q.img"
    subprocess.run(["truncate", "-s", "256M", str(img)], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        subprocess.run(["fio", "--name=queue", f"--filename={dev}", "--rw=randwrite", "--bs=64k", "--direct=1",
                        "--ioengine=libaio", "--iodepth=64", "--runtime=3", "--time_based", "--output=/dev/null"],
                       check=True)
        points = evaluate(agent)
    finally:
        subprocess.run(["losetup", "-d", dev])
    assert {"host": agent.config.host, "disk": os.path.basename(dev)} in fired(points, "disk_latency_p99")


def test_clean_load_stays_silent(bpf_ready, influx, influx_db, tmp_path):
    """Two minutes of a healthy proxy-free web load with every default probe: no alert."""
    need(Path("/usr/sbin/nginx").exists(), "nginx")
    cfg = make_config(tmp_path, api="v1", url=influx.url, database=influx_db)
    agent = Agent(cfg, max_backoff=0.5).start()
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"worker_processes 2; daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/e.log;\n"
                    f"events {{}} http {{ access_log off; client_body_temp_path {tmp_path}/cb;"
                    f" server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"ok\\n\"; }} }} }}\n")
    nginx = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(conf)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    stop = threading.Event()

    def load():  # about 100 requests a second, keep-alive off: connects, bytes, closes
        while not stop.is_set():
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read()
            except OSError:
                pass
            time.sleep(0.01)
    worker = threading.Thread(target=load, daemon=True)
    fired_points = []
    try:
        wait_until(lambda: subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/"],
                                          capture_output=True).returncode == 0, what="nginx up")
        worker.start()
        end = time.monotonic() + 120
        while time.monotonic() < end:
            time.sleep(2)
            agent.poll()
            if int(end - time.monotonic()) % 10 < 2:
                fired_points += [p for p in agent.evaluate_alerts() if p.tags.get("state") == "firing"]
        fired_points += [p for p in agent.evaluate_alerts() if p.tags.get("state") == "firing"]
    finally:
        stop.set()
        nginx.terminate()
        nginx.wait()
        agent.stop()
    assert fired_points == [], [(p.tags["rule"], p.fields["summary"]) for p in fired_points]


@pytest.fixture
def staged_ns(bpf_ready, influx, influx_db, tmp_path, net):
    """Like `staged`, with 8 s windows (and 8 s baselines) for the rules that compare
    a window with the one before it."""
    t = yaml.safe_load(rules_mod.THRESHOLDS.read_text())
    for r in t.values():
        r["window"] = 8
        if "baseline" in r:
            r["baseline"] = 8
    path = tmp_path / "thresholds.yaml"
    path.write_text(yaml.safe_dump(t))
    cfg = make_config(tmp_path, f"alerts:\n  thresholds: {path}\n", api="v1", url=influx.url, database=influx_db)
    agent = Agent(cfg, only=["tcp"], max_backoff=0.5).start()
    agent.poll()
    yield agent
    agent.stop()


def test_bandwidth_limit_fires_throughput_drop_and_srtt_jump(staged_ns, net, tmp_path):
    """ELB case 3: a rate limit appears on the path to a backend mid-flow."""
    agent = staged_ns
    portfile = tmp_path / "port"
    srv = Child("recv", str(portfile), "bw-backend", 1, net.V4["server"], netns=net.ns["server"])
    port = int(wait_for_file(portfile))
    # 64 kB every 50 ms (about 1.3 MB/s) for 17 s on one connection
    cli = Child("messages", net.V4["server"], port, "bw-proxy", 340, 65536, 50, netns=net.ns["client"])
    try:
        for i in range(17):
            if i == 9:  # the limit: 2 Mbit/s on the client's egress, with a deep queue
                net.exec("client", "tc", "qdisc", "add", "dev", "c0", "root", "tbf", "rate", "2mbit",
                         "burst", "32kb", "latency", "400ms")
            time.sleep(1)
            agent.poll()
        points = evaluate(agent)
    finally:
        cli.kill()
        srv.kill()
    key = {"host": agent.config.host, "comm": "bw-proxy", "peer": net.V4["server"], "port": str(port)}
    assert key in fired(points, "throughput_drop")
    assert {"host": agent.config.host, "comm": "bw-proxy", "peer": net.V4["server"]} in fired(points, "srtt_p99_jump")


def test_lossy_path_fires_retransmit_ratio(staged_ns, net, tmp_path):
    agent = staged_ns
    portfile = tmp_path / "port"
    srv = Child("recv", str(portfile), "loss-backend", 1, net.V4["server"], netns=net.ns["server"])
    port = int(wait_for_file(portfile))
    net.exec("server", "nft", "add", "table", "inet", "sonde")
    net.exec("server", "nft", "add", "chain", "inet", "sonde", "in", "{ type filter hook input priority 0 ; }")
    net.exec("server", "nft", "add", "rule", "inet", "sonde", "in", "tcp", "dport", str(port),
             "meta", "length", "gt", "100", "numgen", "inc", "mod", "7", "==", "0", "drop")
    cli = Child("messages", net.V4["server"], port, "loss-proxy", 300, 200, 2, netns=net.ns["client"])
    try:
        cli.wait(timeout=120)
        points = evaluate(agent)
    finally:
        srv.kill()
    assert {"host": agent.config.host, "comm": "loss-proxy", "peer": net.V4["server"]} in \
        fired(points, "retransmit_ratio")
