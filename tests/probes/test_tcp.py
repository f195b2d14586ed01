"""Probe tcp on the real kernel. First without a database: counts from sock_diag and the
sock_ops close callback, checked against what the test's own processes moved and
against /proc/net/snmp; these also run inside QEMU on Debian's 6.1 and 6.12 kernels
(marker kernel_matrix), so they need nothing but the kernel, bcc and iproute2. Then
end to end through the agent into a real InfluxDB / VictoriaMetrics: tcp_flow per
peer in network namespaces (marker l4) and tcp_traffic per process (skeleton)."""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import Child, make_config, need, select, transfer, wait_for_file, wait_until

from sonde.ingest.config import Config
from sonde.ingest.errors import SondeError
from sonde.ingest.runtime.agent import Agent
from sonde.ingest.runtime.probe import LoadedProbe, discover


# --- from test_tcp.py -----------------------------------------------------------


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


def duplex(net, tmp_path, ips, parts: int, between, mode: str = "close", name: str = "tcp"):
    """One connection moving N bytes each way in `parts` parts, between(part, client)
    called after each part but the last; then the last FIN/ACK exchange.
    (server, client, sent, got, port)."""
    portfile = tmp_path / "port"
    srv = Child("duplexd", str(portfile), f"{name}-srv", ips["server"], N, mode, netns=net.ns["server"])
    cli = None
    try:
        port = int(wait_for_file(portfile))
        cli = Child("duplex", ips["server"], port, f"{name}-cli", N, parts, stdin=True, netns=net.ns["client"])
        for part in range(parts - 1):
            assert cli.proc.stdout.readline().strip() == "ok"
            time.sleep(0.1)
            between(part, cli)
            cli.proc.stdin.write("\n")
            cli.proc.stdin.flush()
        sent = int(cli.wait().strip())
        got = int(srv.wait().strip())
    finally:
        srv.kill()
        if cli:
            cli.kill()
    time.sleep(0.3)  # the last FIN/ACK exchange
    return srv, cli, sent, got, port


@pytest.mark.hot_path
@pytest.mark.kernel_matrix
@pytest.mark.parametrize("life", ["three_polls", "one_poll", "reset"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_bytes_both_directions_exact(tcp, net, tmp_path, v6, life):
    ips = net.V6 if v6 else net.V4
    polls_with_tx = 0

    def poll(part, cli):
        nonlocal polls_with_tx
        polls_with_tx += bool(tcp.flows(cli.pid, points=tcp.poll()))
    srv, cli, sent, got, port = duplex(net, tmp_path, ips, 3 if life == "three_polls" else 1, poll,
                                       "abort" if life == "reset" else "close")
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


def short_connections(net, tmp_path, procs: int, per_proc: int, name: str, poll, every: float):
    """`procs` client processes each making `per_proc` connections, one byte each way,
    to one server; poll(n) called every `every` seconds meanwhile. (server, clients, port)."""
    portfile = tmp_path / "port"
    srv = Child("accept", str(portfile), "tcp-pong", procs * per_proc, "pong", net.V4["server"],
                netns=net.ns["server"])
    clients = []
    try:
        port = int(wait_for_file(portfile))
        clients = [Child("connects", net.V4["server"], port, f"{name}{i}", per_proc, "byte",
                         netns=net.ns["client"]) for i in range(procs)]
        last, n = time.monotonic(), 0
        while any(c.proc.poll() is None for c in clients):
            if time.monotonic() - last > every:
                poll(n)
                last, n = time.monotonic(), n + 1
            time.sleep(0.05)
        for c in clients:
            assert c.wait().strip() == f"ok={per_proc} refused=0 reset=0"
        assert srv.wait(timeout=120).strip() == "done"
    finally:
        srv.kill()
        for c in clients:
            c.kill()
    time.sleep(0.3)
    return srv, clients, port


@pytest.mark.hot_path
@pytest.mark.kernel_matrix
def test_short_connections_exact_per_process(tcp, net, tmp_path):
    """10,000 connections from 20 processes, one byte each way: connects, bytes and
    closes per process exact, and equal to the namespaces' own /proc/net/snmp."""
    procs, per_proc = 20, 500
    total = procs * per_proc
    before = {side: net.snmp(side) for side in ("client", "server")}
    srv, clients, port = short_connections(net, tmp_path, procs, per_proc, "tcp-short", lambda n: tcp.poll(), 0.5)
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


@pytest.mark.hot_path
@pytest.mark.kernel_matrix
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


@pytest.mark.hot_path
@pytest.mark.kernel_matrix
def test_bpf_stats_show_the_probe_runs_per_connection_not_per_byte(bpf_ready, net, tmp_path):
    """With bpf_stats on, sonde_probe carries the probe's program runs: a connection
    moving 1,234,567 bytes in many segments runs the tcp programs a handful of times
    (connect, callbacks, release), nowhere near once per segment."""
    from sonde.ingest.runtime.agent import Agent
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


# One long-lived client in the client namespace: per stdin line "FIRST COUNT" it makes
# COUNT connections from the consecutive source addresses FIRST, FIRST+1, ... (any
# address in 198.19.0.0/16: a `local` route there lets a socket bind to it), one byte
# each, closed at once, and answers "ok".
PEERS_CLIENT = """
import ipaddress, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
for line in sys.stdin:
    first, count = line.split()
    base = ipaddress.IPv4Address(first)
    for i in range(int(count)):
        s = socket.socket()
        s.bind((str(base + i), 0))
        s.connect((host, port))
        s.sendall(b"x")
        s.close()
    print("ok", flush=True)
"""


def tcp_map_sizes(probe) -> dict[str, int]:
    return {name: probe.bpf.get_table(name.encode()).max_entries
            for name in ("tcp_agg", "tcp_hist", "conns", "seen", "closed_seen", "listeners", "tcp_reset_reason",
                         "aborted")}


def many_peers(net, tmp_path, peers: int, polls: int, map_entries: int):
    """`peers` distinct client addresses against one server over `polls` polls, with
    every map sized from `map_entries`: the maps stay within their size and drop
    nothing (entries idle for an interval leave them), and the server's totals over
    every peer are exact."""
    from conftest import make_config
    net.exec("client", "ip", "route", "add", "local", "198.19.0.0/16", "dev", "lo")
    net.exec("server", "ip", "route", "add", "198.19.0.0/16", "via", net.V4["client"], "dev", "s0")
    cfg = make_config(tmp_path, "cardinality:\n  max_series: 1000000\n"
                                f"probes:\n  tcp:\n    map_entries: {map_entries}\n")
    probe = LoadedProbe.load(discover()["tcp"], cfg)
    points, sizes = [], []
    srv = cli = None
    try:
        assert tcp_map_sizes(probe) == {
            "tcp_agg": map_entries, "tcp_hist": 4 * map_entries, "conns": 6 * map_entries,
            "seen": 6 * map_entries, "closed_seen": 6 * map_entries, "listeners": map_entries // 2,
            "tcp_reset_reason": map_entries // 2, "aborted": map_entries // 2}, "every map is sized from the config"
        probe.poll(time.time_ns())
        portfile = tmp_path / "port"
        srv = Child("accept", str(portfile), "tcp-many", peers, "eof", net.V4["server"], netns=net.ns["server"])
        port = int(wait_for_file(portfile))
        cli = subprocess.Popen(["ip", "netns", "exec", net.ns["client"], sys.executable, "-c", PEERS_CLIENT,
                                net.V4["server"], str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        done = 0
        for j in range(polls):
            count = peers * (j + 1) // polls - done
            while count:  # peer i is 198.19.(1 + i // 250).(1 + i % 250): no .0 and no .251-.255
                n = min(count, 250 - done % 250)
                cli.stdin.write(f"198.19.{1 + done // 250}.{1 + done % 250} {n}\n")
                cli.stdin.flush()
                assert cli.stdout.readline().strip() == "ok"
                done += n
                count -= n
            new, me = probe.poll(time.time_ns())
            assert me.fields["poll_success"] == 1 and me.fields["map_full_drops"] == 0, me.fields
            points += new
            sizes.append((len(probe.bpf.get_table(b"tcp_agg")), len(probe.bpf.get_table(b"tcp_hist"))))
        cli.stdin.close()
        assert cli.wait(timeout=60) == 0
        assert srv.wait(timeout=60).strip() == "done"
        time.sleep(0.2)
        for _ in range(2):
            new, me = probe.poll(time.time_ns())
            assert me.fields["map_full_drops"] == 0
            points += new
    finally:
        if cli and cli.poll() is None:
            cli.kill()
            cli.wait()
        if srv:
            srv.kill()
        probe.close()
    assert done == peers
    assert max(a for a, _ in sizes) <= map_entries and max(h for _, h in sizes) <= 4 * map_entries
    rows = [p for p in points if p.measurement == "tcp_flow" and p.tags["pid"] == str(srv.pid)]
    assert sum(r.fields["passive_opens"] for r in rows) == peers
    assert sum(r.fields["rx_bytes"] for r in rows) == peers
    assert sum(r.fields["closes"] for r in rows) == peers
    return rows


@pytest.mark.hot_path
@pytest.mark.kernel_matrix
def test_many_peers_keep_the_maps_bounded_with_exact_totals(bpf_ready, net, tmp_path):
    """400 distinct client addresses, 25 new ones per interval, maps sized from a
    256-entry config (fewer entries than peers: they must leave the map), small enough
    for the kernel matrix's emulated guests. The maps see the whole host: the per-socket
    maps (6 x 256) hold every tracked socket of every test running beside this one."""
    many_peers(net, tmp_path, peers=400, polls=16, map_entries=256)


@pytest.mark.truth
@pytest.mark.hot_path
def test_50k_peers_over_an_hour_of_polls_keep_the_maps_bounded_with_exact_totals(bpf_ready, net, tmp_path):
    """Issue 14, item 2: a public server's client addresses over an hour. 50,000
    distinct peers over 360 polls (an hour at the default 10 s interval) against maps
    sized from a 1024-entry config: every map stays within its size, nothing is
    dropped, and the server's opens, bytes and closes over all peers are exact."""
    rows = many_peers(net, tmp_path, peers=50_000, polls=360, map_entries=1024)
    assert {r.tags["peer"] for r in rows} >= {"other"}  # peers past max_peers fold, totals stay exact


class FailingPolls:
    """Polls of the tcp probe of which chosen ones raise partway: after every map has
    been read (entries taken out, closed sockets read, new sockets marked), while the
    points are built (tcp_traffic's builder raises)."""

    def __init__(self, tcp, monkeypatch):
        from sonde.bpf.tcp import probe as tcp_probe
        self.tcp, self.module, self.real = tcp, tcp_probe, tcp_probe._traffic
        self.monkeypatch = monkeypatch
        self.failed = 0

    def poll(self, fail: bool):
        def boom(*a, **kw):
            raise RuntimeError("a tcp poll failing partway")
        self.monkeypatch.setattr(self.module, "_traffic", boom if fail else self.real)
        new, me = self.tcp.probe.poll(time.time_ns())
        self.monkeypatch.setattr(self.module, "_traffic", self.real)
        assert me.fields["poll_success"] == (0 if fail else 1)
        if fail:
            assert new == []
            self.failed += 1
        self.tcp.points.extend(new)


@pytest.mark.truth
@pytest.mark.hot_path
@pytest.mark.parametrize("failing", ["first_sight", "close", "both"])
def test_a_tcp_poll_that_raises_partway_loses_nothing(tcp, net, tmp_path, monkeypatch, failing):
    """Issue 14: a poll that raises after reading the maps and the sockets writes
    nothing, and the next successful poll writes what it had: over one connection
    whose first sight (marking it, its passive open) and whose close (its final
    counters, entries taken out of the maps) fall in failed polls, both ends report
    exactly the bytes the test moved, one open and one close each."""
    polls = FailingPolls(tcp, monkeypatch)
    srv, cli, sent, got, port = duplex(net, tmp_path, net.V4, 3, lambda part, _: polls.poll(
        fail=part == 0 and failing in ("first_sight", "both")), name="tcp-fail")
    close_fails = failing in ("close", "both")
    polls.poll(fail=close_fails)
    if close_fails:
        polls.poll(fail=True)  # twice: entries taken out by two failed polls in a row
        polls.poll(fail=False)
    assert polls.failed == {"first_sight": 1, "close": 2, "both": 3}[failing]
    assert sent == got == N
    key_c, key_s = ("client", net.V4["server"], str(port)), ("server", net.V4["client"], str(port))
    c, s = tcp.flows(cli.pid), tcp.flows(srv.pid)
    assert list(c) == [key_c] and list(s) == [key_s]
    c, s = c[key_c], s[key_s]
    assert (c["tx_bytes"], c["rx_bytes"], s["tx_bytes"], s["rx_bytes"]) == (N, N, N, N)
    assert (c["active_opens"], c["closes"], s["passive_opens"], s["closes"]) == (1, 1, 1, 1)
    assert c["passive_opens"] == s["active_opens"] == 0
    assert c["tx_unacked_bytes"] == s["tx_unacked_bytes"] == c["resets_received"] == s["resets_sent"] == 0


@pytest.mark.truth
@pytest.mark.hot_path
def test_short_connections_exact_with_every_other_poll_failing(tcp, net, tmp_path, monkeypatch):
    """2,000 connections from 8 processes, one byte each way, polled every 0.2 s or so with
    every other poll raising partway: connects, bytes and closes per process exact."""
    polls = FailingPolls(tcp, monkeypatch)
    procs, per_proc = 8, 250
    total = procs * per_proc
    srv, clients, port = short_connections(net, tmp_path, procs, per_proc, "tcp-fail",
                                           lambda n: polls.poll(fail=n % 2 == 0), 0.2)
    polls.poll(fail=True)
    polls.poll(fail=False)
    assert polls.failed >= 2
    key = ("client", net.V4["server"], str(port))
    for c in clients:
        f = tcp.flows(c.pid)
        assert list(f) == [key]
        assert {k: f[key][k] for k in ("active_opens", "closes", "tx_bytes", "rx_bytes")} == \
            {"active_opens": per_proc, "closes": per_proc, "tx_bytes": per_proc, "rx_bytes": per_proc}
    s = tcp.flows(srv.pid)[("server", net.V4["client"], str(port))]
    assert (s["passive_opens"], s["closes"], s["rx_bytes"], s["tx_bytes"]) == (total, total, total, total)


@pytest.mark.truth
@pytest.mark.hot_path
def test_histograms_exact_across_polls_racing_new_flows(bpf_ready, net, tmp_path, monkeypatch):
    """Issue 14, item 3: before each poll reads the histogram map (after it has read the
    flow map), a new process opens and closes 5 connections: its flows exist in the
    histogram map but not in the flow map this poll read. Over the run every such
    process has exactly 5 connect-latency and 5 lifetime observations, its own count."""
    from sonde.bpf.tcp import probe as tcp_probe

    cfg = make_config(tmp_path, "cardinality:\n  max_series: 1000000\n"
                                "probes:\n  tcp:\n    max_processes: 100000\n")
    probe = LoadedProbe.load(discover()["tcp"], cfg)
    k, rounds = 5, 6
    portfile = tmp_path / "port"
    srv = Child("accept", str(portfile), "tcp-race-srv", k * rounds, "close", net.V4["server"], netns=net.ns["server"])
    clients: list[Child] = []
    real = tcp_probe.read_all

    def read_all(table):
        if table is probe.decoder.hists:  # the flow map has been read this poll
            c = Child("connects", net.V4["server"], port, f"race{len(clients)}", k, "close", netns=net.ns["client"])
            clients.append(c)
            assert c.wait().strip() == f"ok={k} refused=0 reset=0"
        return real(table)
    points = []
    try:
        port = int(wait_for_file(portfile))
        probe.poll(time.time_ns())
        monkeypatch.setattr(tcp_probe, "read_all", read_all)
        for _ in range(rounds):
            new, me = probe.poll(time.time_ns())
            assert me.fields["poll_success"] == 1 and me.fields["map_full_drops"] == 0
            points += new
        monkeypatch.setattr(tcp_probe, "read_all", real)
        assert srv.wait(timeout=30).strip() == "done"
        time.sleep(0.3)
        for _ in range(2):
            points += probe.poll(time.time_ns())[0]
    finally:
        srv.kill()
        for c in clients:
            c.kill()
        probe.close()
    assert len(clients) == rounds
    for i, c in enumerate(clients):
        got = {}
        for p in points:
            if p.tags.get("pid") == str(c.pid) and p.measurement.endswith("_hist"):
                got[p.measurement] = got.get(p.measurement, 0) + p.fields["count"]
                assert p.tags["comm"] == f"race{i}", p.tags
        assert {m: got.get(m, 0) for m in ("tcp_connect_latency_hist", "tcp_lifetime_hist")} == \
            {"tcp_connect_latency_hist": k, "tcp_lifetime_hist": k}, (c.pid, got)
        flows = [p.fields for p in points if p.measurement == "tcp_flow" and p.tags["pid"] == str(c.pid)]
        assert sum(f["active_opens"] for f in flows) == sum(f["closes"] for f in flows) == k


# --- from test_l4.py ------------------------------------------------------------


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


@pytest.mark.l4
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


@pytest.mark.l4
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


@pytest.fixture
def reset_trace():
    """The kernel's own record of every reset sent, with its reason: an ftrace
    instance of its own with tcp:tcp_send_reset on (independent of BPF). Returns
    read() -> the trace lines; the instance is removed at the end."""
    root = Path("/sys/kernel/tracing/instances")
    need(root.is_dir(), "tracefs instances")
    inst = root / f"sonde-rst-{uuid.uuid4().hex[:8]}"
    inst.mkdir()
    try:
        need((inst / "events/tcp/tcp_send_reset/format").exists(), "tcp:tcp_send_reset")
        need("reason" in (inst / "events/tcp/tcp_send_reset/format").read_text(), "tcp_send_reset with a reason (6.10+)")
        (inst / "events/tcp/tcp_send_reset/enable").write_text("1")
        yield lambda: (inst / "trace").read_text().splitlines()
    finally:
        (inst / "events/tcp/tcp_send_reset/enable").write_text("0")
        inst.rmdir()


@pytest.mark.truth
@pytest.mark.l4
def test_linger_resets_match_nstat(l4, influx, influx_db, net, tmp_path, reset_trace):
    """The server reads the client's byte, then closes with SO_LINGER {1,0}: n resets,
    each counted once, with the reason the kernel gave it (tcp_disconnect() on an
    established socket: TCP_STATE), as the kernel's own trace shows."""
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
    traced: dict[str, int] = {}
    for line in reset_trace():
        if f"src={net.V4['server']}:{port} " in line:
            reason = line.rsplit("reason=", 1)[1].split()[0]
            traced[reason] = traced.get(reason, 0) + 1
    reasons = select(influx, influx_db, f"SELECT sum(resets) FROM tcp_resets_sent WHERE pid='{srv.pid}' GROUP BY reason")
    assert {r["reason"]: r["sum"] for r in reasons} == traced == {"TCP_STATE": n}


@pytest.mark.l4
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


@pytest.mark.truth
@pytest.mark.l4
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
    # The one connect took one round trip through the same queue: its observation is in
    # the bucket of the measured RTT (24 ms is far from that bucket's edges), and its
    # exact value is in sum_us.
    conn = flows(influx, influx_db, pp.pid, "tcp_connect_latency")[key]
    assert conn["count"] == 1
    assert 0.7 * measured_us <= conn["sum_us"] <= 1.3 * measured_us, (conn["sum_us"], measured_us)
    rows = select(influx, influx_db, f"SELECT sum(count) FROM tcp_connect_latency_hist WHERE pid='{pp.pid}' GROUP BY le")
    assert {r["le"]: r["sum"] for r in rows} == {str((1 << measured_us.bit_length()) - 1): 1}


HOSTILE = b"ng x,y=\"z\\\n\xff"


@pytest.mark.l4
def test_hostile_comm_and_ipv6_literals_round_trip(l4, influx, influx_db, net, tmp_path):
    from sonde.ingest.output.lineproto import printable_name

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


@pytest.mark.l4
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


@pytest.mark.l4
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


# --- from test_tcp_traffic.py ---------------------------------------------------


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


@pytest.mark.skeleton
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


@pytest.mark.skeleton
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


@pytest.mark.skeleton
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


@pytest.mark.skeleton
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


@pytest.mark.skeleton
def test_probe_reports_on_itself(v1_agent, influx, influx_db):
    drained(v1_agent)
    rows = select(influx, influx_db, "SELECT * FROM sonde_probe WHERE probe='tcp'")
    assert rows and all(r["poll_success"] == 1 and r["map_full_drops"] == 0 for r in rows)
    assert all(0 < r["poll_duration_seconds"] < 5 for r in rows)
    assert select(influx, influx_db, "SELECT * FROM sonde_spool")
