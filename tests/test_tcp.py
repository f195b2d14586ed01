"""The tcp probe on the real kernel, without a database: counts from sock_diag and
the sock_ops close callback, checked against what the test's own processes moved
and against /proc/net/snmp. These also run inside QEMU on Debian's 6.1 and 6.12
kernels (marker kernel_matrix), so they need nothing but the kernel, bcc and
iproute2."""
import subprocess
import time
import uuid

import pytest

from conftest import Child, wait_for_file
from ingest.config import Config
from ingest.probe import LoadedProbe, discover

pytestmark = [pytest.mark.hot_path, pytest.mark.kernel_matrix]

N = 1_234_567


class Polled:
    """The tcp probe loaded alone; every poll's points kept."""

    def __init__(self, tmp_path):
        cfg = Config(host="t", state_dir=tmp_path / "state")
        self.probe = LoadedProbe.load(discover()["tcp"], cfg)
        self.points = []
        self.poll()
        self.points = []

    def poll(self):
        new, me = self.probe.poll(time.time_ns())
        assert me.fields["poll_success"] == 1 and me.fields["map_full_drops"] == 0
        self.points.extend(new)
        return new

    def flows(self, pid, measurement="tcp_flow", points=None):
        """{(role, peer, port): {field: sum}} for one pid."""
        out = {}
        for p in self.points if points is None else points:
            if p.measurement == measurement and p.tags["pid"] == str(pid):
                acc = out.setdefault((p.tags["role"], p.tags["peer"], p.tags["port"]), {})
                for k, v in p.fields.items():
                    acc[k] = acc.get(k, 0) + v
        return out

    def close(self):
        self.probe.close()


@pytest.fixture
def tcp(bpf_ready, tmp_path):
    t = Polled(tmp_path)
    yield t
    t.close()


@pytest.mark.parametrize("life", ["three_polls", "one_poll", "reset"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_bytes_both_directions_exact(tcp, net, tmp_path, v6, life):
    ips = net.V6 if v6 else net.V4
    portfile = tmp_path / "port"
    srv = Child("duplexd", str(portfile), "tcp-srv", ips["server"], N, "abort" if life == "reset" else "close",
                netns=net.ns["server"])
    cli = None
    try:
        port = int(wait_for_file(portfile))
        parts = 3 if life == "three_polls" else 1
        cli = Child("duplex", ips["server"], port, "tcp-cli", N, parts, stdin=True, netns=net.ns["client"])
        polls_with_tx = 0
        for _ in range(parts - 1):
            assert cli.proc.stdout.readline().strip() == "ok"
            time.sleep(0.1)
            new = tcp.poll()
            polls_with_tx += bool(tcp.flows(cli.pid, points=new))
            cli.proc.stdin.write("\n")
            cli.proc.stdin.flush()
        sent = int(cli.wait().strip())
        got = int(srv.wait().strip())
    finally:
        srv.kill()
        if cli:
            cli.kill()
    time.sleep(0.3)  # the last FIN/ACK exchange
    tcp.poll()
    c = tcp.flows(cli.pid)
    s = tcp.flows(srv.pid)
    assert list(c) == [("client", ips["server"], str(port))]
    assert list(s) == [("server", ips["client"], str(port))]
    c, s = c[("client", ips["server"], str(port))], s[("server", ips["client"], str(port))]
    assert c["active_opens"] == 1 and s["passive_opens"] == 1
    assert c["closes"] == 1 and s["closes"] == 1
    if life == "reset":
        # the server read half, let the rest queue, then reset: its rx is exactly
        # what it received in order (its own count); the client's acked bytes are
        # that much unless the reset overtook the last ACK, and what it sent but
        # never saw acknowledged is in tx_unacked_bytes
        assert N // 2 <= got <= sent
        assert s["rx_bytes"] == got
        assert c["tx_bytes"] <= got <= c["tx_bytes"] + c["tx_unacked_bytes"] <= sent
        assert c["rx_bytes"] == s["tx_bytes"] == 0
        assert s["resets_sent"] == 1 and c["resets_received"] == 1
        return
    assert sent == got == N
    assert c["tx_bytes"] == c["rx_bytes"] == s["tx_bytes"] == s["rx_bytes"] == N
    assert c["tx_unacked_bytes"] == s["tx_unacked_bytes"] == 0
    assert c["resets_received"] == s["resets_sent"] == 0
    if life == "three_polls":
        assert polls_with_tx == 2, "the first two parts are written by polls during the connection"


def test_short_connections_exact_per_process(tcp, net, tmp_path):
    """10,000 connections from 20 processes, one byte each way: connects, bytes and
    closes per process exact, and equal to the namespaces' own /proc/net/snmp."""
    procs, per_proc = 20, 500
    total = procs * per_proc
    before = {side: net.snmp(side) for side in ("client", "server")}
    portfile = tmp_path / "port"
    srv = Child("accept", str(portfile), "tcp-pong", total, "pong", net.V4["server"], netns=net.ns["server"])
    clients = []
    try:
        port = int(wait_for_file(portfile))
        clients = [Child("connects", net.V4["server"], port, f"tcp-short{i}", per_proc, "byte",
                         netns=net.ns["client"]) for i in range(procs)]
        last = time.monotonic()
        while any(c.proc.poll() is None for c in clients):
            if time.monotonic() - last > 0.5:
                tcp.poll()
                last = time.monotonic()
            time.sleep(0.05)
        for c in clients:
            assert c.wait().strip() == f"ok={per_proc} refused=0 reset=0"
        assert srv.wait(timeout=120).strip() == "done"
    finally:
        srv.kill()
        for c in clients:
            c.kill()
    time.sleep(0.3)
    tcp.poll()
    after = {side: net.snmp(side) for side in ("client", "server")}
    assert after["client"]["ActiveOpens"] - before["client"]["ActiveOpens"] == total
    assert after["server"]["PassiveOpens"] - before["server"]["PassiveOpens"] == total
    key = ("client", net.V4["server"], str(port))
    for c in clients:
        f = tcp.flows(c.pid)
        assert list(f) == [key]
        assert {k: f[key][k] for k in ("active_opens", "closes", "tx_bytes", "rx_bytes", "connect_refused")} == \
            {"active_opens": per_proc, "closes": per_proc, "tx_bytes": per_proc, "rx_bytes": per_proc,
             "connect_refused": 0}
    s = tcp.flows(srv.pid)[("server", net.V4["client"], str(port))]
    assert (s["passive_opens"], s["closes"], s["rx_bytes"], s["tx_bytes"]) == (total, total, total, total)
    # tcp_traffic is the same bytes per process
    traffic = {}
    for p in tcp.points:
        if p.measurement == "tcp_traffic" and p.tags["pid"] in {str(c.pid) for c in clients}:
            traffic[p.tags["pid"]] = traffic.get(p.tags["pid"], 0) + p.fields["tx_bytes"]
    assert traffic == {str(c.pid): per_proc for c in clients}


def test_sockets_in_three_namespaces_have_their_owners(tcp, tmp_path):
    """A listener and a client in each of three network namespaces (loopback only):
    each one's bytes and sockets are counted under its own pid."""
    names = [f"sonde-t{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    children = []
    try:
        for ns in names:
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        pairs = []
        for i, ns in enumerate(names):
            pf = tmp_path / f"port{i}"
            srv = Child("recv", str(pf), f"tcp-ns{i}-srv", 1, "127.0.0.1", netns=ns)
            children.append(srv)
            port = int(wait_for_file(pf))
            cli = Child("burst", "127.0.0.1", port, f"tcp-ns{i}-cli", stdin=True, netns=ns)
            children.append(cli)
            n = 100_000 * (i + 1) + i
            cli.proc.stdin.write(f"{n}\n")
            cli.proc.stdin.flush()
            assert cli.proc.stdout.readline().strip() == "ok"
            pairs.append((srv, cli, port, n))
        time.sleep(0.2)
        live = tcp.poll()
        for srv, cli, port, n in pairs:
            states = {(p.tags["pid"], p.tags["state"]): p.fields["sockets"] for p in live
                      if p.measurement == "tcp_states" and p.tags["pid"] in (str(srv.pid), str(cli.pid))}
            assert states == {(str(cli.pid), "ESTABLISHED"): 1, (str(srv.pid), "ESTABLISHED"): 1,
                              (str(srv.pid), "LISTEN"): 1}
            names_seen = {p.tags["comm"] for p in live if p.measurement == "tcp_flow"
                          and p.tags["pid"] in (str(srv.pid), str(cli.pid))}
            assert names_seen == {srv_name(pairs, srv), cli_name(pairs, cli)}
        for srv, cli, port, n in pairs:
            cli.wait()
            assert int(srv.wait().strip()) == n
        time.sleep(0.3)
        tcp.poll()
        for srv, cli, port, n in pairs:
            assert tcp.flows(cli.pid)[("client", "127.0.0.1", str(port))]["tx_bytes"] == n
            assert tcp.flows(srv.pid)[("server", "127.0.0.1", str(port))]["rx_bytes"] == n
    finally:
        for c in children:
            c.kill()
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def srv_name(pairs, srv):
    return f"tcp-ns{[p[0] for p in pairs].index(srv)}-srv"


def cli_name(pairs, cli):
    return f"tcp-ns{[p[1] for p in pairs].index(cli)}-cli"


def test_bpf_stats_show_the_probe_runs_per_connection_not_per_byte(bpf_ready, net, tmp_path):
    """With bpf_stats on, sonde_probe carries the probe's program runs: a connection
    moving 1,234,567 bytes in many segments runs the tcp programs a handful of times
    (connect, callbacks, release), nowhere near once per segment."""
    from ingest.agent import Agent
    from conftest import make_config
    cfg = make_config(tmp_path, "bpf_stats: true\n")
    agent = Agent(cfg, only=["tcp"], max_backoff=0.5).start(deliver=False)
    try:
        agent.poll()
        portfile = tmp_path / "port"
        srv = Child("duplexd", str(portfile), "tcp-srv", net.V4["server"], N, "close", netns=net.ns["server"])
        port = int(wait_for_file(portfile))
        cli = Child("duplex", net.V4["server"], port, "tcp-cli", N, 1, netns=net.ns["client"])
        cli.wait()
        srv.wait()
        time.sleep(0.3)
        points = agent.poll()
    finally:
        agent.stop()
    me = [p for p in points if p.measurement == "sonde_probe" and p.tags["probe"] == "tcp"]
    flows = [p.fields for p in points if p.measurement == "tcp_flow"]
    segs = sum(f["rx_segments"] + f["tx_segments"] for f in flows)
    # every connection on the host in the interval (other processes' too): its
    # programs run a bounded number of times per connection, never per segment
    conns = sum(f["active_opens"] + f["passive_opens"] + f["connect_refused"] + f["connect_timeouts"]
                for f in flows)
    runs = me[0].fields["bpf_run_count"]
    assert conns >= 2 and segs > 100
    assert 4 <= runs <= 12 * conns, (runs, conns, segs)
    assert me[0].fields["bpf_run_time_ns"] > 0


def test_many_peers_keep_the_maps_bounded_with_exact_totals(bpf_ready, net, tmp_path):
    """400 distinct client addresses against one server, 25 new ones per interval, with
    a 64-entry flow map: entries idle for an interval leave the map (it holds two
    intervals' flows), so nothing is dropped, and the server's totals over every peer
    stay exact."""
    from conftest import make_config
    peers, per_child = 400, 25
    for i in range(peers):
        net.exec("client", "ip", "addr", "add", f"198.18.{1 + i // 200}.{10 + i % 200}/32", "dev", "c0")
    net.exec("client", "ip", "route", "replace", "198.18.0.0/24", "dev", "c0")
    net.exec("server", "ip", "route", "replace", "198.18.0.0/15", "dev", "s0")
    cfg = make_config(tmp_path, "probes:\n  tcp:\n    map_entries: 64\n")
    probe = LoadedProbe.load(discover()["tcp"], cfg)
    points, sizes = [], []
    srv = None
    try:
        probe.poll(time.time_ns())
        portfile = tmp_path / "port"
        srv = Child("accept", str(portfile), "tcp-many", peers, "eof", net.V4["server"], netns=net.ns["server"])
        port = int(wait_for_file(portfile))
        for j in range(peers // per_child):
            first = j * per_child
            src = f"198.18.{1 + first // 200}.{10 + first % 200}"
            Child("fromeach", net.V4["server"], port, "tcp-peers", src, per_child, netns=net.ns["client"]).wait()
            time.sleep(0.1)
            new, me = probe.poll(time.time_ns())
            assert me.fields["poll_success"] == 1 and me.fields["map_full_drops"] == 0
            points += new
            sizes.append(len(probe.bpf.get_table(b"tcp_agg")))
        assert srv.wait(timeout=60).strip() == "done"
        time.sleep(0.2)
        new, me = probe.poll(time.time_ns())
        assert me.fields["map_full_drops"] == 0
        points += new
    finally:
        if srv:
            srv.kill()
        probe.close()
    assert max(sizes) <= 64
    rows = [p.fields for p in points if p.measurement == "tcp_flow" and p.tags["pid"] == str(srv.pid)]
    assert sum(r["passive_opens"] for r in rows) == peers
    assert sum(r["rx_bytes"] for r in rows) == peers
    assert sum(r["closes"] for r in rows) == peers
