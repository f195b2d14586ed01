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


@pytest.mark.parametrize("text, needles", [
    ("influxdb:\n  api: v1\n url: x\n", ["line 3", "invalid YAML"]),
    ("influxdb:\n  api: v1\n  colour: blue\n", ["influxdb.colour", "unknown key"]),
    ("interval_seconds: soon\n", ["interval_seconds", "number", "'soon'"]),
    ("influxdb:\n  api: v3\n", ["influxdb.api", "'v3'"]),
    ("influxdb:\n  password: hunter2\n", ["influxdb.password", "password_file"]),
    ("[just, a, list]\n", ["top level must be a mapping"]),
    ("probes:\n  tcp_trafic: {}\n", ["probes.tcp_trafic", "names no probe"]),
])
@pytest.mark.parametrize("command", ["check", "run"])
def test_bad_config_is_one_line(tmp_path, text, needles, command):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text if text.startswith("[") else text + f"state_dir: {tmp_path}/state\n")
    line = one_line_error(sonde(command, "-c", str(cfg)), *needles)
    assert "hunter2" not in line


def test_missing_config_file(tmp_path):
    one_line_error(sonde("check", "-c", str(tmp_path / "nope.yaml")), "no such file")


def test_bad_command_line():
    one_line_error(sonde("frobnicate"), "invalid choice")
    one_line_error(sonde("run", "--interval", "3"), "unrecognized arguments")


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
