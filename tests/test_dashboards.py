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

from conftest import REPO, make_config, need, wait_until
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


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_panel_options_validate_against_panel_schemas(name):
    checked = 0
    for panel in RENDERED[name]["panels"]:
        path = SCHEMAS / f"{panel['type']}.jsonschema.json"
        if not path.exists():
            continue  # timeseries and table have no panel schema in this set
        s = json.loads(path.read_text())
        options = {"$ref": "#/definitions/Options", "definitions": s["definitions"]}
        jsonschema.Draft7Validator(options).validate(panel["options"])
        if "FieldConfig" in s["definitions"]:
            custom = {"$ref": "#/definitions/FieldConfig", "definitions": s["definitions"]}
            jsonschema.Draft7Validator(custom).validate(panel["fieldConfig"]["defaults"].get("custom", {}))
        checked += 1
    assert checked == len(RENDERED[name]["panels"]), "every panel type used has a schema here"


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
    server {{ listen 127.0.0.1:{front}; location / {{ proxy_pass http://backend; }} }}
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
    cfg = make_config(tmp, "probes:\n  process_io:\n    enabled: true\n", api="v1", url=influx.url, database=db)
    agent = Agent(cfg, max_backoff=0.5).start()
    procs, loop, cg = [], None, None
    start_ms = int(time.time() * 1000)
    try:
        agent.poll()
        front, back = free_port(), free_port()
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
            subprocess.run(["dd", "if=/dev/zero", f"of={loop}", "bs=4k", "count=200", "oflag=direct"],
                           capture_output=True)
            subprocess.run(["dd", f"if={loop}", "of=/dev/null", "bs=4k", "count=200", "iflag=direct"],
                           capture_output=True)
            agent.poll()
        spin.wait()
        agent.poll()
        wait_until(lambda: len(agent.spool) == 0, what="spool drained")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
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


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_every_panel_query_returns_data(influx, filled, name):
    for q in house.queries_of(RENDERED[name]):
        series = run_query(influx, filled, q)
        values = [v for s in series for row in s["values"] for v in row[1:] if v is not None]
        assert values, f"{name}: no data for\n{q}"


def test_heatmap_buckets_sum_to_histogram_count(influx, filled):
    panel = next(p for p in RENDERED["network"]["panels"] if p["type"] == "heatmap" and "srtt" in p["title"])
    series = run_query(influx, filled, panel["targets"][0]["query"])
    buckets = sum(v for s in series for row in s["values"] for v in row[1:] if v)
    total = influx.query(f"SELECT sum(count) FROM tcp_srtt WHERE time >= {filled['start_ms']}ms "
                         f"AND time <= {filled['end_ms']}ms", db=filled["db"])["results"][0]["series"][0]["values"][0][1]
    assert buckets == total > 0
