"""Spool durability and bounds, sink outages, kill -9, against real servers."""
import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter

import pytest

from conftest import REPO, free_port, make_config, need, select, start_influx, transfer, wait_until
from sonde.ingest.runtime.agent import Agent
from sonde.ingest.output.embedded import InfluxServer
from sonde.ingest.output.lineproto import encode
from sonde.ingest.output.spool import Spool

pytestmark = [pytest.mark.skeleton]


def test_spool_bound_drops_oldest_and_counts_exactly(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", max_points=10)
    assert spool.put([f"m v={i}i" for i in range(7)]) == 0
    assert spool.put([f"m v={i}i" for i in range(7, 25)]) == 15
    assert len(spool) == 10
    assert [line for _, line in spool.peek(100)] == [f"m v={i}i" for i in range(15, 25)]
    spool.close()
    reopened = Spool(tmp_path / "s.sqlite", max_points=10)
    assert len(reopened) == 10 and reopened.dropped_total() == 15


def test_outage_then_recovery_loses_nothing(bpf_ready, tmp_path):
    server = start_influx(tmp_path / "influx")
    agent = None
    try:
        server.query('CREATE DATABASE "sonde"')
        cfg = make_config(tmp_path, api="v1", url=server.url, database="sonde")
        agent = Agent(cfg, only=["tcp"], max_backoff=0.5).start()
        agent.poll()
        sizes = [300_000, 12_345, 999]
        pids = [transfer(tmp_path, sizes[0], "sonde-out0", "sonde-outrx")[0]]
        agent.poll()
        server.stop()  # the store goes away while traffic and polls continue
        for i, n in enumerate(sizes[1:], 1):
            pids.append(transfer(tmp_path, n, f"sonde-out{i}", "sonde-outrx")[0])
            agent.poll()
        time.sleep(1.5)  # the deliverer is failing and retrying now
        assert len(agent.spool) > 0
        server.start()
        agent.poll()
        wait_until(lambda: len(agent.spool) == 0, timeout=30, what="spool drained after recovery")
        for pid, n in zip(pids, sizes):
            rows = select(server, "sonde", f"SELECT sum(tx_bytes) FROM tcp_traffic WHERE pid='{pid}'")
            assert rows and rows[0]["sum"] == n
        errors = select(server, "sonde", "SELECT sum(write_errors) FROM sonde_spool")
        assert errors[0]["sum"] > 0, "the outage must show in the agent's own write_errors"
    finally:
        if agent:
            agent.stop()
        server.stop()


@pytest.mark.truth
def test_tiny_spool_drop_counter_is_exact(bpf_ready, tmp_path):
    port = free_port()  # nothing listens here until the end of the test
    cfg = make_config(tmp_path, "spool:\n  max_points: 5\n", api="v1", url=f"http://127.0.0.1:{port}", database="sonde")
    agent = Agent(cfg, only=["tcp"], max_backoff=0.3).start()
    server = None
    try:
        produced = 0
        last = []
        for i in range(4):
            transfer(tmp_path, 1000 + i, f"sonde-tiny{i}", "sonde-tinyrx")
            last = agent.poll()
            produced += len(last)
        assert agent.spool.dropped_total() == produced - 5
        assert len(agent.spool) == 5
        # the 5 kept are the newest: the last 5 of the last poll, in order
        assert len(last) >= 5
        newest = last[-5:]
        assert [line for _, line in agent.spool.peek(10)] == [encode(p) for p in newest]
        server = InfluxServer(tmp_path / "influx", port, free_port()).start()
        server.query('CREATE DATABASE "sonde"')
        wait_until(lambda: len(agent.spool) == 0, timeout=30, what="spool drained")
        # exactly those 5 arrived
        res = server.query("SELECT * FROM /.*/", db="sonde")["results"][0]
        arrived = Counter((series["name"], row[0]) for series in res.get("series", []) for row in series["values"])
        assert arrived == Counter((p.measurement, p.ts_ns) for p in newest)
    finally:
        agent.stop()
        if server:
            server.stop()


def _spooled(path) -> int:
    """Lines in the spool; 0 while the agent has created the file but not yet its table."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM points").fetchone()[0]
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return 0
        raise
    finally:
        db.close()


def test_kill_9_then_restart_delivers_spooled_points(bpf_ready, tmp_path):
    port = free_port()
    cfg_path = tmp_path / "sonde.yaml"
    cfg_path.write_text(
        f"state_dir: {tmp_path / 'state'}\ninterval_seconds: 0.5\n"
        f"influxdb:\n  api: v1\n  url: http://127.0.0.1:{port}\n  database: sonde\n")
    sonde = [str(REPO / ".venv/bin/sonde"), "run", "-c", str(cfg_path), "--probe", "tcp"]
    need(os.path.exists(sonde[0]), "the venv's sonde entry point (scripts/setup.sh install)")
    agent = subprocess.Popen(sonde, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    server = agent2 = None
    try:
        wait_until(lambda: (tmp_path / "state/spool.sqlite").exists() and _spooled(tmp_path / "state/spool.sqlite"),
                   what="first spooled points")
        n = 424_242
        tx_pid, _ = transfer(tmp_path, n, "sonde-k9tx", "sonde-k9rx")
        time.sleep(1.5)  # at least two polls after the traffic: its points are on disk
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        assert _spooled(tmp_path / "state/spool.sqlite") > 0
        server = InfluxServer(tmp_path / "influx", port, free_port()).start()
        server.query('CREATE DATABASE "sonde"')
        agent2 = subprocess.Popen(sonde, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

        def delivered():
            rows = select(server, "sonde", f"SELECT sum(tx_bytes) FROM tcp_traffic WHERE pid='{tx_pid}'")
            return rows and rows[0]["sum"]
        assert wait_until(delivered, timeout=30, what="spooled points delivered") == n
    finally:
        for p in (agent, agent2):
            if p and p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if server:
            server.stop()


def _fill(directory):
    """Fill the file system under directory to the last byte; returns the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 16, 512, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


@pytest.mark.truth
def test_a_full_disk_under_the_spool_loses_no_poll(bpf_ready, tmp_path):
    """The spool's file system fills up (a real tmpfs, filled to its last byte): a poll's
    deltas are already taken when its points are spooled, so the failed write keeps
    them in memory, and once there is room again they are written and delivered.
    The bytes moved during the outage arrive exactly, counted by the test's own sender."""
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "sonde-test-full", str(state)], check=True)
    agent = server = None
    try:
        server = start_influx(tmp_path / "influx")
        server.query('CREATE DATABASE "sonde"')
        cfg = make_config(tmp_path, api="v1", url=server.url, database="sonde")
        agent = Agent(cfg, only=["tcp"], max_backoff=0.3).start(deliver=False)  # spooled, not sent, till the end
        agent.poll()
        filler = _fill(state)
        sizes = [123_457, 7_001]
        pids = []
        for i, n in enumerate(sizes):
            pids.append(transfer(tmp_path, n, f"sonde-full{i}", "sonde-fullrx")[0])
            agent.poll()
            assert agent._held, "the spool write did not fail: the test's disk was not full"
        held = len(agent._held)
        filler.unlink()
        points = agent.poll()
        assert not agent._held
        queued = next(p for p in points if p.measurement == "sonde_spool").fields["queued_points"]
        assert queued >= held
        agent.deliverer.start()
        wait_until(lambda: len(agent.spool) == 0, timeout=30, what="spool drained")
        for pid, n in zip(pids, sizes):
            rows = select(server, "sonde", f"SELECT sum(tx_bytes) FROM tcp_traffic WHERE pid='{pid}'")
            assert rows and rows[0]["sum"] == n, (pid, n, rows)
    finally:
        if agent:
            agent.stop()
        if server:
            server.stop()
        subprocess.run(["umount", "-l", str(state)], check=False)
