"""tcp_flow on the real kernel: test hosts in network namespaces, every number
checked against an independent source (what the test moved, /proc/net/snmp)."""
import time

import pytest

from conftest import Child, make_config, select, wait_for_file, wait_until
from ingest.agent import Agent

pytestmark = [pytest.mark.l4]


@pytest.fixture
def l4(bpf_ready, influx, influx_db, tmp_path):
    cfg = make_config(tmp_path, api="v1", url=influx.url, database=influx_db)
    agent = Agent(cfg, only=["tcp_flow"], max_backoff=0.5).start()
    agent.poll()
    yield agent
    agent.stop()


def flush(agent):
    agent.poll()
    wait_until(lambda: len(agent.spool) == 0, what="spool drained")


def flows(influx, db, pid, measurement="tcp_flow"):
    """{(role, peer, port): {field: sum}} for one pid."""
    res = influx.query(f"SELECT * FROM {measurement} WHERE pid='{pid}'", db=db)["results"][0]
    out = {}
    for s in res.get("series", []):
        cols = s["columns"]
        for v in s["values"]:
            row = dict(zip(cols, v))
            key = (row["role"], row["peer"], row["port"])
            acc = out.setdefault(key, {})
            for c, x in row.items():
                if isinstance(x, (int, float)) and c != "time":
                    acc[c] = acc.get(c, 0) + x
    return out


def server(tmp_path, net, comm, *args, mode="recv", v6=False):
    portfile = tmp_path / f"port-{comm}"
    bind = (net.V6 if v6 else net.V4)["server"]
    if mode == "recv":
        child = Child("recv", str(portfile), comm, *args, bind, netns=net.ns["server"])
    else:
        child = Child(mode, str(portfile), comm, *args, bind, netns=net.ns["server"])
    return child, int(wait_for_file(portfile))


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_bytes_per_peer(l4, influx, influx_db, net, tmp_path, v6):
    n = 2_000_003
    ips = net.V6 if v6 else net.V4
    srv, port = server(tmp_path, net, "l4-srv", 1, v6=v6)
    try:
        cli = Child("send", ips["server"], port, "l4-cli", n, 30_000, netns=net.ns["client"])
        cli.wait()
        assert int(srv.wait().strip()) == n
    finally:
        srv.kill()
    flush(l4)
    c = flows(influx, influx_db, cli.pid)
    s = flows(influx, influx_db, srv.pid)
    assert list(c) == [("client", ips["server"], str(port))]
    assert c[("client", ips["server"], str(port))]["tx_bytes"] == n
    assert c[("client", ips["server"], str(port))]["active_opens"] == 1
    assert list(s) == [("server", ips["client"], str(port))]
    assert s[("server", ips["client"], str(port))]["rx_bytes"] == n
    assert s[("server", ips["client"], str(port))]["passive_opens"] == 1
    assert s[("server", ips["client"], str(port))]["closes"] == 1


def test_opens_and_refused_connects(l4, influx, influx_db, net, tmp_path):
    k = 25
    before = {side: net.snmp(side) for side in ("client", "server")}
    srv, port = server(tmp_path, net, "l4-acc", k, "eof", mode="accept")
    try:
        cli = Child("connects", net.V4["server"], port, "l4-conn", k, "close", netns=net.ns["client"])
        assert cli.wait().strip() == f"ok={k} refused=0 reset=0"
        assert srv.wait().strip() == "done"
    finally:
        srv.kill()
    closed_port = port  # the server has exited: nothing listens there now
    bad = Child("connects", net.V4["server"], closed_port, "l4-refused", k, "close", netns=net.ns["client"])
    assert bad.wait().strip() == f"ok=0 refused={k} reset=0"
    flush(l4)
    after = {side: net.snmp(side) for side in ("client", "server")}
    c = flows(influx, influx_db, cli.pid)[("client", net.V4["server"], str(port))]
    s = flows(influx, influx_db, srv.pid)[("server", net.V4["client"], str(port))]
    assert c["active_opens"] == k == after["client"]["ActiveOpens"] - before["client"]["ActiveOpens"] - k
    assert s["passive_opens"] == k == after["server"]["PassiveOpens"] - before["server"]["PassiveOpens"]
    r = flows(influx, influx_db, bad.pid)[("client", net.V4["server"], str(port))]
    assert r["connect_refused"] == k and r["resets_received"] == k
    assert r.get("active_opens", 0) == 0
    assert r["connect_timeouts"] == 0


def test_linger_resets_match_nstat(l4, influx, influx_db, net, tmp_path):
    n = 12
    before = net.snmp("server")
    srv, port = server(tmp_path, net, "l4-rst", n, "rst", mode="accept")
    try:
        cli = Child("connects", net.V4["server"], port, "l4-rstcli", n, "byte", netns=net.ns["client"])
        assert cli.wait().strip() == f"ok={n} refused=0 reset={n}"
        assert srv.wait().strip() == "done"
    finally:
        srv.kill()
    flush(l4)
    out_rsts = net.snmp("server")["OutRsts"] - before["OutRsts"]
    c = flows(influx, influx_db, cli.pid)[("client", net.V4["server"], str(port))]
    s = flows(influx, influx_db, srv.pid)[("server", net.V4["client"], str(port))]
    assert c["resets_received"] == n
    assert s["resets_sent"] == n == out_rsts
    reasons = select(influx, influx_db, f"SELECT sum(resets) FROM tcp_resets_sent WHERE pid='{srv.pid}' GROUP BY reason")
    assert [(r["reason"], r["sum"]) for r in reasons] == [("NOT_SPECIFIED", n)] or \
        sum(r["sum"] for r in reasons) == n


def test_retransmits_match_nstat_under_loss(l4, influx, influx_db, net, tmp_path):
    srv, port = server(tmp_path, net, "l4-lossrx", 1)
    # Drop every 7th data-bearing segment of this flow as it arrives at the server.
    # (A drop in the sender's own output hook is not a loss: TCP sees the send fail
    # and sends again as new data, so nothing counts as retransmitted.)
    net.exec("server", "nft", "add", "table", "inet", "sonde")
    net.exec("server", "nft", "add", "chain", "inet", "sonde", "in",
             "{ type filter hook input priority 0 ; }")
    net.exec("server", "nft", "add", "rule", "inet", "sonde", "in", "tcp", "dport", str(port),
             "meta", "length", "gt", "100", "numgen", "inc", "mod", "7", "==", "0", "drop")
    before = net.snmp("client")
    try:
        cli = Child("messages", net.V4["server"], port, "l4-losstx", 300, 200, 2, netns=net.ns["client"])
        cli.wait(timeout=120)
        assert int(srv.wait().strip()) == 300 * 200
    finally:
        srv.kill()
    flush(l4)
    retrans = net.snmp("client")["RetransSegs"] - before["RetransSegs"]
    c = flows(influx, influx_db, cli.pid)[("client", net.V4["server"], str(port))]
    assert retrans > 0
    assert c["retransmits"] == retrans
    assert c["tx_bytes"] == 300 * 200


def test_srtt_and_connect_latency_under_queueing_delay(l4, influx, influx_db, net, tmp_path):
    delay_ms = 24  # inside the exp2 bucket 16384..32767 us, away from its edges
    # A token bucket on the server's egress, kept full by a UDP flood server -> client:
    # every server -> client packet waits about `latency` in the queue.
    net.exec("server", "tc", "qdisc", "add", "dev", "s0", "root", "tbf", "rate", "4mbit", "burst", "4kb",
             "latency", f"{delay_ms}ms")
    flood = echo = pp = None
    try:
        flood = Child("udpflood", net.V4["client"], 9, "l4-flood", 30, netns=net.ns["server"])
        time.sleep(0.5)  # let the queue fill
        echo, port = server(tmp_path, net, "l4-echo", mode="echo")
        pp = Child("pingpong", net.V4["server"], port, "l4-ping", 60, netns=net.ns["client"])
        measured_us = int(pp.wait(timeout=60).strip())
    finally:
        for c in (flood, echo, pp):
            if c:
                c.kill()
    flush(l4)
    assert 0.7 * delay_ms * 1000 < measured_us < 1.5 * delay_ms * 1000, measured_us
    key = ("client", net.V4["server"], str(port))
    buckets = select(influx, influx_db, f"SELECT sum(count) FROM tcp_srtt_hist WHERE pid='{pp.pid}' GROUP BY le")
    counts = {int(b["le"]): b["sum"] for b in buckets if b["le"] != "+Inf"}
    total = sum(counts.values())
    seen, median_le = 0, None
    for le in sorted(counts):
        seen += counts[le]
        if seen >= total / 2:
            median_le = le
            break
    assert (median_le + 1) // 2 <= measured_us <= median_le, (median_le, measured_us)
    conn = flows(influx, influx_db, pp.pid, "tcp_connect_latency")[key]
    assert conn["count"] == 1
    assert conn["p50_us"] >= measured_us
