"""tcp_traffic end to end: real kernel, real traffic, real InfluxDB / VictoriaMetrics."""
import pytest

from conftest import Child, make_config, select, transfer, wait_for_file, wait_until
from ingest.agent import Agent

pytestmark = [pytest.mark.skeleton]


@pytest.fixture
def v1_agent(bpf_ready, influx, influx_db, tmp_path):
    cfg = make_config(tmp_path, api="v1", url=influx.url, database=influx_db)
    agent = Agent(cfg, only=["tcp"], max_backoff=0.5).start()
    agent.poll()  # baseline: everything before the test is history
    yield agent
    agent.stop()


def drained(agent):
    agent.poll()
    wait_until(lambda: len(agent.spool) == 0, what="spool drained")


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_exact_bytes_v1(v1_agent, influx, influx_db, tmp_path, v6):
    n = 1_234_567
    tx_pid, rx_pid = transfer(tmp_path, n, "sonde-tx", "sonde-rx", v6=v6, chunk=10_000)
    drained(v1_agent)
    tx = select(influx, influx_db, f"SELECT sum(tx_bytes), sum(rx_bytes) FROM tcp_traffic "
                                   f"WHERE pid='{tx_pid}' GROUP BY comm")
    rx = select(influx, influx_db, f"SELECT sum(rx_bytes), sum(tx_bytes) FROM tcp_traffic "
                                   f"WHERE pid='{rx_pid}' GROUP BY comm")
    assert [(r["comm"], r["sum"], r["sum_1"]) for r in tx] == [("sonde-tx", n, 0)]
    assert [(r["comm"], r["sum"], r["sum_1"]) for r in rx] == [("sonde-rx", n, 0)]


def test_exact_bytes_v2_victoria(bpf_ready, victoria, tmp_path):
    cfg = make_config(tmp_path, api="v2", url=victoria.url, bucket="sonde", org="sonde")
    agent = Agent(cfg, only=["tcp"], max_backoff=0.5).start()
    try:
        agent.poll()
        n = 777_777
        tx_pid, rx_pid = transfer(tmp_path, n, "sonde-v2tx", "sonde-v2rx")
        drained(agent)
    finally:
        agent.stop()
    # VictoriaMetrics makes samples searchable after -search.latencyOffset (1 s here).
    tx = wait_until(lambda: victoria.export(f'{{__name__="tcp_traffic_tx_bytes",pid="{tx_pid}"}}'), what="tx export")
    rx = wait_until(lambda: victoria.export(f'{{__name__="tcp_traffic_rx_bytes",pid="{rx_pid}"}}'), what="rx export")
    assert [s["metric"]["comm"] for s in tx] == ["sonde-v2tx"]
    assert sum(sum(s["values"]) for s in tx) == n
    assert [s["metric"]["comm"] for s in rx] == ["sonde-v2rx"]
    assert sum(sum(s["values"]) for s in rx) == n


def test_deltas_across_three_polls(v1_agent, influx, influx_db, tmp_path):
    portfile = tmp_path / "port"
    rx = Child("recv", str(portfile), "sonde-drx")
    sender = None
    try:
        port = int(wait_for_file(portfile))
        sender = Child("burst", "127.0.0.1", port, "sonde-dtx", stdin=True)
        bursts = [100_000, 7, 2_500_001]
        for n in bursts:
            sender.proc.stdin.write(f"{n}\n")
            sender.proc.stdin.flush()
            assert sender.proc.stdout.readline().strip() == "ok"
            v1_agent.poll()
        sender.wait()
        assert int(rx.wait().strip()) == sum(bursts)
    finally:
        rx.kill()
        if sender:
            sender.kill()
    drained(v1_agent)
    rows = select(influx, influx_db, f"SELECT tx_bytes FROM tcp_traffic WHERE pid='{sender.pid}'")
    # One point per interval that saw traffic, each exactly that interval's bytes.
    assert [r["tx_bytes"] for r in rows] == bursts


def test_exited_process_entries_are_reclaimed(v1_agent, tmp_path):
    tx_pid, rx_pid = transfer(tmp_path, 4096, "sonde-gone", "sonde-gone-rx")
    table = v1_agent.probes["tcp"].bpf.get_table(b"tcp_agg")
    keys = lambda: {k.tgid for k in table.keys()}  # noqa: E731
    assert {tx_pid, rx_pid} <= keys()
    points = v1_agent.poll()
    assert {p.tags["pid"] for p in points if p.measurement == "tcp_traffic"} >= {str(tx_pid), str(rx_pid)}
    # an entry leaves the map after an interval in which nothing touched it (an
    # exited process's orphaned sockets may still close and add to it before then)
    points = v1_agent.poll()
    assert not ({tx_pid, rx_pid} & keys()), "entries of exited processes must be deleted after their last delta"


def test_probe_reports_on_itself(v1_agent, influx, influx_db):
    drained(v1_agent)
    rows = select(influx, influx_db, "SELECT * FROM sonde_probe WHERE probe='tcp'")
    assert rows and all(r["poll_success"] == 1 and r["map_full_drops"] == 0 for r in rows)
    assert all(0 < r["poll_duration_seconds"] < 5 for r in rows)
    assert select(influx, influx_db, "SELECT * FROM sonde_spool")
