"""Every error a user can cause: one line saying what is wrong, non-zero exit, no traceback."""
import os
import signal
import subprocess
import time

import pytest
from pathlib import Path

from conftest import REPO, free_port, need, start_influx

pytestmark = [pytest.mark.skeleton]
SONDE = str(REPO / ".venv/bin/sonde")


def sonde(*args, timeout=60, env=None):
    need(os.path.exists(SONDE), "the venv's sonde entry point (scripts/setup.sh install)")
    return subprocess.run([SONDE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def one_line_error(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def problem_lines(r, *needles):
    """`sonde check` names every problem it finds, one line each: one of them holds all
    the needles, and none is a traceback or an internal error."""
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    hits = [line for line in lines if all(n in line for n in needles)]
    assert hits, r.stderr
    return hits[0]


# Every key of the config, and the file itself, given a value a user could write:
# (id, YAML text or bytes with {tmp} for the test's directory, words the one line must hold).
# `sonde check` and `sonde run` both refuse each with one line naming the file or key.
CONFIG_CASES = [
    ("not-utf8", b"\xff\xfe", ["c.yaml", "not UTF-8"]),
    ("control-char", "host: a\x01b\n", ["c.yaml", "invalid YAML", "U+0001"]),
    ("bad-yaml", "influxdb:\n  api: v1\n url: x\n", ["line 3", "invalid YAML"]),
    ("top-level-list", "[just, a, list]\n", ["top level must be a mapping"]),
    ("unknown-key", "influxdb:\n  api: v1\n  colour: blue\n", ["influxdb.colour", "unknown key"]),
    ("host-empty", "host: ''\n", ["host", "at least 1 character"]),
    ("interval-word", "interval_seconds: soon\n", ["interval_seconds", "number", "'soon'"]),
    ("interval-zero", "interval_seconds: 0\n", ["interval_seconds", "greater than 0"]),
    ("interval-inf", "interval_seconds: .inf\n", ["interval_seconds", "finite"]),
    ("state-dir-proc", "state_dir: /proc/nope\n", ["state_dir", "/proc/nope", "writable directory"]),
    ("state-dir-file", "state_dir: {tmp}/a-file\n", ["state_dir", "not a directory"]),
    ("state-dir-empty", "state_dir: ''\n", ["state_dir", "not empty"]),
    ("log-level", "log_level: verbose\n", ["log_level", "'verbose'"]),
    ("bpf-stats", "bpf_stats: maybe\n", ["bpf_stats", "'maybe'"]),
    ("paths-proc", "paths:\n  proc: {tmp}/no-proc\n", ["paths.proc", "procfs"]),
    ("paths-sys", "paths:\n  sys: {tmp}\n", ["paths.sys", "sysfs"]),
    ("paths-tracefs", "paths:\n  tracefs: {tmp}/no-tracefs\n", ["tracefs", "not mounted", "no-tracefs"]),
    ("api", "influxdb:\n  api: v3\n", ["influxdb.api", "'v3'"]),
    ("url-scheme", "influxdb:\n  api: v1\n  url: localhost:8086\n", ["influxdb.url", "http://"]),
    ("url-port", "influxdb:\n  api: v1\n  url: http://127.0.0.1:99999\n", ["influxdb.url", "port"]),
    ("url-host", "influxdb:\n  api: v1\n  url: 'http://:8086'\n", ["influxdb.url", "no host"]),
    ("database-empty", "influxdb:\n  database: ''\n", ["influxdb.database"]),
    ("database-quote", "influxdb:\n  database: 'a\"b'\n", ["influxdb.database", "double quote"]),
    ("password-inline", "influxdb:\n  password: hunter2\n", ["influxdb.password", "password_file"]),
    ("password-file-missing", "influxdb:\n  api: v1\n  url: http://127.0.0.1:9\n  password_file: {tmp}/absent\n",
     ["influxdb.password_file", "cannot read"]),
    ("password-file-binary", "influxdb:\n  api: v1\n  url: http://127.0.0.1:9\n  password_file: {tmp}/binary\n",
     ["influxdb.password_file", "not UTF-8"]),
    ("password-file-empty", "influxdb:\n  api: v1\n  url: http://127.0.0.1:9\n  password_file: {tmp}/empty\n",
     ["influxdb.password_file", "empty"]),
    ("token-file-dir", "influxdb:\n  api: v2\n  url: http://127.0.0.1:9\n  token_file: {tmp}\n",
     ["influxdb.token_file", "cannot read"]),
    ("timeout", "influxdb:\n  timeout_seconds: -1\n", ["influxdb.timeout_seconds", "greater than 0"]),
    ("batch", "influxdb:\n  batch_points: 0\n", ["influxdb.batch_points"]),
    ("http-port", "embedded:\n  http_port: 70000\n", ["embedded.http_port"]),
    ("same-ports", "embedded:\n  rpc_port: 8086\n", ["http_port and rpc_port"]),
    ("embedded-binary", "embedded:\n  binary: {tmp}/no-influxd\n", ["no-influxd", "not found"]),
    ("spool", "spool:\n  max_points: 0\n", ["spool.max_points"]),
    ("max-series", "cardinality:\n  max_series: 5\n", ["cardinality.max_series"]),
    ("window-nan", "cardinality:\n  window_hours: .nan\n", ["cardinality.window_hours", "finite"]),
    ("alerts-interval", "alerts:\n  interval_seconds: 0\n", ["alerts.interval_seconds"]),
    ("webhook", "alerts:\n  webhook_url: alertmanager:9093\n", ["alerts.webhook_url", "http://"]),
    ("thresholds-missing", "alerts:\n  thresholds: {tmp}/absent.yaml\n", ["alerts.thresholds", "cannot read"]),
    ("thresholds-yaml", "alerts:\n  thresholds: {tmp}/bad.yaml\n", ["alerts.thresholds", "not valid YAML"]),
    ("thresholds-binary", "alerts:\n  thresholds: {tmp}/binary\n", ["alerts.thresholds", "not UTF-8"]),
    ("thresholds-no-rules", "alerts:\n  thresholds: {tmp}/norules.yaml\n", ["alerts.thresholds", "no rule"]),
    ("probe-name", "probes:\n  tcp_trafic: {{}}\n", ["probes.tcp_trafic", "names no probe"]),
    ("probes-list", "probes: []\n", ["probes", "dictionary"]),
    ("probe-null", "probes:\n  tcp:\n", ["probes.tcp"]),
    ("probe-enabled", "probes:\n  tcp:\n    enabled: maybe\n", ["probes.tcp.enabled"]),
    ("probe-interval", "probes:\n  tcp:\n    interval_seconds: -1\n", ["probes.tcp.interval_seconds"]),
    ("probe-map-entries", "probes:\n  tcp:\n    map_entries: 8\n", ["probes.tcp.map_entries"]),
    ("probe-max-processes", "probes:\n  tcp:\n    max_processes: 0\n", ["probes.tcp.max_processes"]),
    ("probe-max-peers", "probes:\n  tcp:\n    max_peers: 0\n", ["probes.tcp.max_peers"]),
    ("l7-process-long", "probes:\n  l7:\n    processes: [a-name-longer-than-15]\n", ["probes.l7.processes"]),
    ("l7-executable-relative", "probes:\n  l7:\n    executables: [nginx]\n", ["probes.l7.executables"]),
    ("l7-port", "probes:\n  l7:\n    ports: [70000]\n", ["probes.l7.ports"]),
    ("l7-cgroup", "probes:\n  l7:\n    cgroups: [relative/path]\n", ["probes.l7.cgroups"]),
    ("l7-tls", "probes:\n  l7:\n    tls: maybe\n", ["probes.l7.tls"]),
    ("l7-on-tcp", "probes:\n  tcp:\n    ports: [80]\n", ["probes.tcp.ports", "unknown key"]),
]


def config_file(tmp_path: Path, text) -> Path:
    """The case's config in tmp_path/c.yaml, with the files its paths name."""
    (tmp_path / "a-file").write_text("x\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "empty").write_text("")
    (tmp_path / "bad.yaml").write_text("a: [unclosed\n")
    (tmp_path / "norules.yaml").write_text("anomaly: {}\n")
    cfg = tmp_path / "c.yaml"
    if isinstance(text, bytes):
        cfg.write_bytes(text)
        return cfg
    text = text.format(tmp=tmp_path)
    if not text.startswith("[") and "state_dir" not in text:
        text += f"state_dir: {tmp_path}/state\n"
    cfg.write_text(text)
    return cfg


@pytest.mark.truth
@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("text, needles", [pytest.param(t, n, id=i) for i, t, n in CONFIG_CASES])
def test_bad_config_is_one_line(tmp_path, text, needles, command):
    r = sonde(command, "-c", str(config_file(tmp_path, text)))
    line = (one_line_error if command == "run" else problem_lines)(r, *needles)
    assert "hunter2" not in r.stderr and "internal error" not in line


@pytest.mark.truth
def test_config_that_is_a_directory(tmp_path):
    for command in ("check", "run"):
        one_line_error(sonde(command, "-c", str(tmp_path)), str(tmp_path), "is a directory")


@pytest.mark.truth
def test_embedded_port_in_use_is_one_line(tmp_path):
    import socket

    need(Path("/usr/bin/influxd").exists(), "influxd (Debian influxdb) not installed")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"state_dir: {tmp_path}/state\nembedded:\n  http_port: {port}\n  rpc_port: {free_port()}\n")
        one_line_error(sonde("run", "-c", str(cfg)), "embedded InfluxDB", str(port), "in use")


# Every argument of every command given a value a user could type: (id, argv with
# {tmp} for the test's directory, words the one line must hold).
ARG_CASES = [
    ("no-command", [], ["command"]),
    ("unknown-command", ["frobnicate"], ["invalid choice"]),
    ("unknown-flag", ["run", "--interval", "3"], ["unrecognized arguments"]),
    ("config-no-value", ["check", "-c"], ["expected one argument"]),
    ("probe-unknown", ["run", "-c", "{tmp}/ok.yaml", "--probe", "nope"], ["--probe nope", "names no probe"]),
    ("secret-file-missing", ["check", "-c", "{tmp}/v1.yaml", "--secret-file", "{tmp}/absent"],
     ["password_file", "cannot read"]),
    ("secret-file-binary", ["check", "-c", "{tmp}/v1.yaml", "--secret-file", "{tmp}/binary"],
     ["password_file", "not UTF-8"]),
    ("dashboards-nothing", ["dashboards"], ["--out"]),
    ("dashboards-out", ["dashboards", "--out", "/proc/nope"], ["/proc/nope"]),
    ("dashboards-readme", ["dashboards", "--readme", "{tmp}/absent/README.md"], ["--readme", "absent"]),
    ("dashboards-interval-zero", ["dashboards", "--out", "{tmp}/d", "--interval", "0"], ["--interval", "'0'"]),
    ("dashboards-interval-word", ["dashboards", "--out", "{tmp}/d", "--interval", "ten"], ["--interval", "'ten'"]),
    ("dashboards-interval-nan", ["dashboards", "--out", "{tmp}/d", "--interval", "nan"], ["--interval", "'nan'"]),
    ("alerts-out", ["alerts", "--out", "/proc/nope"], ["/proc/nope"]),
    ("alerts-readme", ["alerts", "--readme", "{tmp}/absent/README.md"], ["--readme", "absent"]),
    ("backtrack-at", ["backtrack", "-c", "{tmp}/v1.yaml", "--at", "soon"], ["--at", "'soon'", "not a time"]),
    ("backtrack-window", ["backtrack", "-c", "{tmp}/v1.yaml", "--window", "5 parsecs"], ["--window", "duration"]),
    ("backtrack-reversed", ["backtrack", "-c", "{tmp}/v1.yaml", "--from", "2026-01-02T00:00:00Z", "--to",
                            "2026-01-01T00:00:00Z"], ["window is empty"]),
    ("backtrack-config", ["backtrack", "-c", "{tmp}/binary"], ["binary", "not UTF-8"]),
    ("topology-config", ["topology", "-c", "{tmp}/absent.yaml"], ["absent.yaml", "no such file"]),
    ("profile-nobody", ["profile", "--seconds", "1", "--out", "{tmp}/p"], ["--pid", "--process", "required"]),
    ("profile-pid", ["profile", "--pid", "999999999", "--seconds", "1", "--out", "{tmp}/p"], ["no process", "999999999"]),
    ("profile-process", ["profile", "--process", "no-such-proc", "--seconds", "1", "--out", "{tmp}/p"],
     ["no-such-proc"]),
    ("profile-seconds", ["profile", "--pid", "1", "--seconds", "-1", "--out", "{tmp}/p"], ["--seconds"]),
    ("profile-hz", ["profile", "--pid", "1", "--seconds", "1", "--hz", "0", "--out", "{tmp}/p"], ["--hz"]),
    ("profile-out", ["profile", "--pid", "1", "--seconds", "0.5", "--out", "/proc/nope"], ["/proc/nope"]),
]


@pytest.mark.truth
@pytest.mark.parametrize("argv, needles", [pytest.param(a, n, id=i) for i, a, n in ARG_CASES])
def test_bad_command_line_is_one_line(tmp_path, argv, needles):
    config_file(tmp_path, "")
    (tmp_path / "ok.yaml").write_text(f"state_dir: {tmp_path}/state\n")
    (tmp_path / "v1.yaml").write_text(f"state_dir: {tmp_path}/state\ninfluxdb:\n  api: v1\n"
                                      f"  url: http://127.0.0.1:{free_port()}\n")
    line = one_line_error(sonde(*[a.format(tmp=tmp_path) for a in argv]), *needles)
    assert "internal error" not in line


@pytest.mark.truth
@pytest.mark.parametrize("flag, needles", [("--svg", ["--svg", "/proc/nope/x.svg"]), ("--png", ["/proc/nope"])])
@pytest.mark.parametrize("command", ["backtrack", "topology"])
def test_backtrack_output_that_cannot_be_written(influx, influx_db, tmp_path, command, flag, needles):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_dir: {tmp_path}/state\ninfluxdb:\n  api: v1\n  url: {influx.url}\n  database: {influx_db}\n")
    target = "/proc/nope/x.svg" if flag == "--svg" else "/proc/nope"
    line = one_line_error(sonde(command, "-c", str(cfg), flag, target), *needles)
    assert "internal error" not in line


def test_missing_config_file(tmp_path):
    one_line_error(sonde("check", "-c", str(tmp_path / "nope.yaml")), "no such file")


def test_unreachable_url(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_dir: {tmp_path}/state\ninfluxdb:\n  api: v1\n  url: http://127.0.0.1:{free_port()}\n")
    one_line_error(sonde("check", "-c", str(cfg)), "unreachable", "connection refused")
    cfg.write_text(f"state_dir: {tmp_path}/state\ninfluxdb:\n  api: v2\n  url: http://127.0.0.1:{free_port()}\n")
    one_line_error(sonde("check", "-c", str(cfg)), "unreachable")


def test_missing_database(influx, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_dir: {tmp_path}/state\ninfluxdb:\n  api: v1\n  url: {influx.url}\n  database: absent_db\n")
    one_line_error(sonde("check", "-c", str(cfg)), "absent_db", "CREATE DATABASE")


def test_wrong_credentials_and_secret_never_logged(bpf_ready, tmp_path):
    server = start_influx(tmp_path / "influx", auth=True)
    agent = None
    try:
        server.query("CREATE USER admin WITH PASSWORD 'right-pass' WITH ALL PRIVILEGES")
        server.query('CREATE DATABASE "sonde"', auth=("admin", "right-pass"))
        pw = tmp_path / "pw"
        pw.write_text("wrong-pass-S3CRET\n")
        pw.chmod(0o600)
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"state_dir: {tmp_path}/state\ninterval_seconds: 0.5\ninfluxdb:\n  api: v1\n  url: {server.url}\n"
                       f"  username: admin\n  password_file: {pw}\n")
        line = one_line_error(sonde("check", "-c", str(cfg)), "refused the credentials", "HTTP 401")
        assert "S3CRET" not in line
        # The agent keeps running and spooling; its log names the problem once and never the secret.
        agent = subprocess.Popen([SONDE, "run", "-c", str(cfg)], stderr=subprocess.PIPE, text=True)
        time.sleep(4)
        agent.send_signal(signal.SIGINT)
        _, err = agent.communicate(timeout=30)
        assert "refused the credentials" in err and "S3CRET" not in err and "Traceback" not in err
        # a new secret is tried with --secret-file before it replaces the one the config names
        right = tmp_path / "pw.new"
        right.write_text("right-pass\n")
        right.chmod(0o600)
        r = sonde("check", "-c", str(cfg), "--secret-file", str(right))
        assert r.returncode == 0, r.stderr
        one_line_error(sonde("check", "-c", str(cfg), "--secret-file", str(tmp_path / "absent")),
                       "influxdb.password_file: cannot read")
        # the right password from the environment works
        cfg.write_text(cfg.read_text().replace(f"  password_file: {pw}\n", ""))
        r = sonde("check", "-c", str(cfg), env={"SONDE_INFLUXDB_PASSWORD": "right-pass"})
        assert r.returncode == 0, r.stderr
    finally:
        if agent and agent.poll() is None:
            agent.kill()
            agent.wait()
        server.stop()


def test_missing_hook(bpf_ready, tmp_path):
    # A tracefs root that lacks tcp:tcp_receive_reset, as an older kernel would:
    # every other event is the real one.
    fake = tmp_path / "tracefs"
    real = Path("/sys/kernel/tracing/events")
    for cat in real.iterdir():
        if cat.is_dir():
            (fake / "events" / cat.name).mkdir(parents=True)
            for ev in cat.iterdir():
                if ev.is_dir() and ev.name != "tcp_receive_reset":
                    (fake / "events" / cat.name / ev.name).symlink_to(ev)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_dir: {tmp_path}/state\npaths:\n  tracefs: {fake}\n"
                   "probes:\n  tcp:\n    enabled: true\n")
    for command in ("check", "run"):
        one_line_error(sonde(command, "-c", str(cfg)), "tcp", "tcp:tcp_receive_reset", "enabled: false")
    # with every probe on, check names each missing hook on its own line
    cfg.write_text(f"state_dir: {tmp_path}/state\npaths:\n  tracefs: {fake}\n")
    r = sonde("check", "-c", str(cfg))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert all(line.startswith("probe ") and "is missing" in line for line in lines)
    assert {line.split(" is missing")[0] for line in lines} == \
        {"probe tcp: tracepoint tcp:tcp_receive_reset"}
