"""tcp_flow on the real kernel: test hosts in network namespaces, every number
checked against an independent source (what the test moved, /proc/net/snmp)."""
import logging
import time
from pathlib import Path

import pytest

from conftest import Child, make_config, select, wait_for_file, wait_until
from ingest.agent import Agent
from ingest.errors import SondeError

pytestmark = [pytest.mark.l4]


@pytest.fixture
def l4(bpf_ready, influx, influx_db, tmp_path):
    cfg = make_config(tmp_path, api="v1", url=influx.url, database=influx_db)
    agent = Agent(cfg, only=["tcp"], max_backoff=0.5).start()
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
    assert r["connect_refused"] == k and r["resets_received"] == 0  # a refused SYN is not a reset of a connection
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
    # the connection's close-time sample is taken when its last FIN, queued behind
    # the flood, has arrived
    time.sleep(1)
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


HOSTILE = b"ng x,y=\"z\\\n\xff"


def test_hostile_comm_and_ipv6_literals_round_trip(l4, influx, influx_db, net, tmp_path):
    from ingest.lineproto import printable_name

    srv, port = server(tmp_path, net, "l4-h6srv", 1, v6=True)
    try:
        cli = Child("send", net.V6["server"], port, HOSTILE, 4321, netns=net.ns["client"])
        cli.wait()
        assert int(srv.wait().strip()) == 4321
    finally:
        srv.kill()
    flush(l4)
    rows = select(influx, influx_db, f"SELECT sum(tx_bytes) FROM tcp_flow WHERE pid='{cli.pid}' GROUP BY comm, peer, port")
    assert [(r["comm"], r["peer"], r["port"], r["sum"]) for r in rows] == \
        [(printable_name(HOSTILE[:15]), "2001:db8::2", str(port), 4321)]
    # the tag value is usable in a query as it is
    rows = select(influx, influx_db, f"SELECT sum(rx_bytes) FROM tcp_flow WHERE peer='2001:db8::1' AND pid='{srv.pid}'")
    assert rows[0]["sum"] == 4321


def test_kernel_lacking_a_field_is_one_line(bpf_ready, tmp_path):
    """A tracefs view whose tcp_send_reset has no skaddr (a kernel too old for the
    probe): the agent refuses with one line naming the field, before compiling."""
    real = Path("/sys/kernel/tracing/events")
    fake = tmp_path / "tracefs/events"
    for cat in ("sock", "tcp"):
        (fake / cat).mkdir(parents=True)
        for ev in (real / cat).iterdir():
            if ev.is_dir() and ev.name != "tcp_send_reset":
                (fake / cat / ev.name).symlink_to(ev)
    ev = fake / "tcp/tcp_send_reset"
    ev.mkdir()
    text = (real / "tcp/tcp_send_reset/format").read_text()
    (ev / "format").write_text("\n".join(l for l in text.splitlines() if "skaddr;" not in l))
    cfg = make_config(tmp_path, f"paths:\n  tracefs: {tmp_path / 'tracefs'}\n")
    with pytest.raises(SondeError) as e:
        Agent(cfg, only=["tcp"], max_backoff=0.5).start(deliver=False)
    msg = str(e.value)
    assert "\n" not in msg and "tcp:tcp_send_reset has no field skaddr" in msg, msg


def test_churn_stays_within_series_bound_with_exact_totals(bpf_ready, influx, influx_db, net, tmp_path):
    max_series = 400
    cfg = make_config(tmp_path, f"cardinality:\n  max_series: {max_series}\n"
                                "probes:\n  tcp:\n    max_processes: 10\n    max_peers: 3\n",
                      api="v1", url=influx.url, database=influx_db)
    # Delivery waits until the churn is over, so the agent's own connections to
    # InfluxDB are not in the counts compared with the namespaces' counters.
    agent = Agent(cfg, only=["tcp"], max_backoff=0.5).start(deliver=False)
    procs, per_proc, parallel = 100, 1000, 4
    total = procs * per_proc
    srv = None
    try:
        agent.poll()
        before = {side: net.snmp(side) for side in ("host", "client", "server")}  # host first: fast, nearest the poll
        # The server closes first, so TIME_WAIT sits on its side and the client's
        # ephemeral ports are free again at once.
        net.exec("client", "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000")
        srv, port = server(tmp_path, net, "l4-churnsrv", total, "close", mode="accept")
        running, started, done = [], 0, 0
        last_poll = time.monotonic()
        while done < procs:
            while started < procs and len(running) < parallel:
                running.append(Child("connects", net.V4["server"], port, f"churn{started}", per_proc, "eof",
                                     netns=net.ns["client"]))
                started += 1
            for c in list(running):
                if c.proc.poll() is not None:
                    assert c.wait().strip() == f"ok={per_proc} refused=0 reset=0"
                    running.remove(c)
                    done += 1
            if time.monotonic() - last_poll > 1:
                agent.poll()
                last_poll = time.monotonic()
            time.sleep(0.02)
        assert srv.wait(timeout=120).strip() == "done"
        last = agent.poll()
        after = {side: net.snmp(side) for side in ("host", "client", "server")}  # host first: fast, nearest the poll
        agent.deliverer.start()
        flush(agent)
    finally:
        if srv:
            srv.kill()
        agent.stop()
    assert after["client"]["ActiveOpens"] - before["client"]["ActiveOpens"] == total
    # Every namespace's opens are in Sonde's totals (the probe sees the whole host),
    # whether kept per process or folded into pid=other.
    host_opens = sum(after[s]["ActiveOpens"] - before[s]["ActiveOpens"] for s in after)
    # up to the last poll before `after`: the delivery's own connections come later
    until = f"time <= {max(p.ts_ns for p in last)}"
    opens = select(influx, influx_db, f"SELECT sum(active_opens) FROM tcp_flow WHERE {until}")[0]["sum"]
    host_passive = sum(after[s]["PassiveOpens"] - before[s]["PassiveOpens"] for s in after)
    passive = select(influx, influx_db, f"SELECT sum(passive_opens) FROM tcp_flow WHERE {until}")[0]["sum"]
    # The kernel skips a tracepoint program that fires while another BPF program runs
    # on the same CPU (softirq nested in a process-context hook); Sonde reports those
    # skips, and the counts may be short by exactly that much, never more.
    misses = select(influx, influx_db, "SELECT sum(kernel_misses) FROM sonde_probe WHERE probe='tcp'")[0]["sum"]
    assert host_opens - misses <= opens <= host_opens
    # A passive open counts when a process first uses the socket (or at its destroy),
    # the kernel's counter at the handshake: connections other processes on the host
    # accepted but had not touched by the last poll may differ too.
    assert total - misses <= passive <= host_passive
    assert after["server"]["PassiveOpens"] - before["server"]["PassiveOpens"] == total
    series = [s[0] for s in influx.query("SHOW SERIES", db=influx_db)["results"][0]["series"][0]["values"]]
    flow_series = [s for s in series if not s.startswith(("sonde_", "tcp_states"))]
    other = [s for s in series if "pid=other" in s]
    # measurements without a peer tag (per process) fold only by pid
    assert all("peer=other" in s or s.startswith(("tcp_states", "tcp_resets_sent", "tcp_traffic")) for s in other)
    assert len([s for s in series if "pid=other" not in s and not s.startswith("sonde_")]) <= max_series
    assert other, "the churn must have folded processes into pid=other"
    assert len(flow_series) < max_series + len(other) + 1
