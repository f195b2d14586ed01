"""tcp: L4 connection metrics per process x peer endpoint, IPv4 and IPv6, from the
counters the kernel keeps. Nothing runs per send, per receive or per segment.

What fires, and when:
- per request (send, receive, segment): nothing;
- per connection: cgroup/connect4 or connect6 (the connecting process),
  sock_ops callbacks at connect, establishment and each state change (a sock_ops
  program is a plain function call, no perf record), cgroup/sock_release at close();
- per reset: tcp:tcp_receive_reset, tcp:tcp_send_reset;
- per poll: one NETLINK_SOCK_DIAG dump per network namespace in use, each live
  socket's `tcp_info` (bytes_acked, bytes_received, segs_in/out, total_retrans,
  rtt, snd_cwnd, windows), and a read of the probe's maps.

What it reports (catalog: tcp_flow, tcp_traffic, tcp_window, tcp_srtt[_hist],
tcp_connect_latency[_hist], tcp_lifetime[_hist], tcp_states, tcp_resets_sent).

Exact application bytes: `bytes_acked` less our SYN (active opens) and less our
FIN once acked; `bytes_received` less the peer's FIN. A live socket is read from
the dump each poll (per-socket deltas keyed by cookie); at its transition to CLOSE
the sock_ops program reads the final counters (before tcp_disconnect() zeroes
them), so the part after the last poll is counted too. Bytes sent but never
acknowledged when a connection is reset or aborted are `tx_unacked_bytes`.

Peers: for a connection the process opened (`role=client`) the tags are the remote
IP and remote port; for one it accepted (`role=server`) the remote IP and the
local listening port. Client ephemeral ports are never tags.

Owners: the connecting process (connect runs in its context); for accepted
sockets, the process holding the socket's inode when a poll sees it, else the
process that closes it (sock_release), else the listening socket's owner.

Limits:
- sockets opened before the agent started are counted from the agent's first
  poll, as `role=client` unless their local port is listening; their part after
  the last poll before they close is not counted (no state callback was set);
- srtt, windows and tcp_srtt samples are one per live socket per poll plus one
  per connection at close, not one per segment;
- a socket shared across processes stays with the owner first seen.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from sonde.ingest.runtime import hist, keys
from sonde.ingest.runtime.bpfinfo import detach_by_name
from sonde.ingest.runtime.bpfmap import pop, read_all
from sonde.ingest.runtime.decode import Context
from sonde.ingest.runtime.delta import defer, since
from sonde.ingest.runtime.cardinality import OTHER, top_n
from sonde.ingest.output.lineproto import Point, printable_name
from sonde.ingest.runtime.probe import Probe
from sonde.ingest.runtime import sockdiag
from sonde.ingest.runtime.procfs import socket_links

log = logging.getLogger("sonde.tcp")

ROLES = keys.StaticMap({0: "unknown", 1: "client", 2: "server"}, "unknown")
STATES = keys.StaticMap(sockdiag.STATE_NAMES)
HISTS = keys.StaticMap({0: "tcp_connect_latency", 1: "tcp_srtt", 2: "tcp_lifetime"})
VOLUME = ("tx_bytes", "rx_bytes", "rx_segments", "tx_segments", "retransmits")
EVENTS = ("tx_unacked_bytes", "active_opens", "passive_opens", "connect_refused", "connect_timeouts", "closes",
          "resets_sent", "resets_received")
COUNTERS = VOLUME + EVENTS
SUMS = ("wnd_samples", "srtt_sum_us", "snd_cwnd_sum", "snd_wnd_sum", "rcv_wnd_sum",
        "connect_sum_us", "lifetime_sum_us")
# tcp_agg value members, in the order of COUNTERS, then the kernel's sums
AGG_MEMBERS = {"tx_bytes": "tx_bytes", "rx_bytes": "rx_bytes", "rx_segments": "segs_in", "tx_segments": "segs_out",
               "retransmits": "retrans", "tx_unacked_bytes": "tx_unacked_bytes", "active_opens": "active_opens",
               "passive_opens": "passive_opens", "connect_refused": "connect_refused",
               "connect_timeouts": "connect_timeouts", "closes": "closes", "resets_sent": "resets_sent",
               "resets_received": "resets_received", "connect_sum_us": "connect_sum_us",
               "lifetime_sum_us": "lifetime_sum_us", "srtt_sum_us": "srtt_sum_us"}
UNATTRIBUTED = b"[unattributed]"
UNOWNED_RETRY = 6
CGROUP2_CANDIDATES = ("fs/cgroup/unified", "fs/cgroup")


def reset_reasons(format_text: str) -> dict[int, str]:
    """sk_rst_reason names from tcp_send_reset's tracefs format (the running kernel's own)."""
    m = re.search(r"__print_symbolic\(REC->reason,(.*)\)", format_text)
    return {int(n): name for n, name in re.findall(r'\{\s*(\d+),\s*"(\w+)"\s*\}', m.group(1))} if m else {}


def app_bytes(s: "sockdiag.TcpSock", client: bool) -> tuple[int, int]:
    """(tx, rx) application bytes of a live socket from its tcp_info: bytes_acked less
    our SYN (an active open's first acked byte) and our FIN once acked (FIN_WAIT2);
    bytes_received less the peer's FIN (CLOSE_WAIT, LAST_ACK, CLOSING). The state is
    tcp_info's own, read with the counters; a socket changing state during the dump can
    still be off by one here, which the final count at close corrects."""
    state = s.info_state or s.state
    syn = 1 if client and s.bytes_acked else 0
    fin_out = 1 if state == sockdiag.TCP_FIN_WAIT2 else 0
    fin_in = 1 if state in (sockdiag.TCP_CLOSE_WAIT, sockdiag.TCP_LAST_ACK, sockdiag.TCP_CLOSING) else 0
    return max(s.bytes_acked - syn - fin_out, 0), max(s.bytes_received - fin_in, 0)


def live_counters(s: "sockdiag.TcpSock", client: bool) -> tuple[int, ...]:
    tx, rx = app_bytes(s, client)
    return (tx, rx, s.segs_in, s.segs_out, s.total_retrans)


@dataclass
class Flow:
    """One flow's data for one interval, mergeable when folding into `other`."""
    tgid: int
    comm: bytes
    role: str
    peer: str
    port: str
    counters: dict[str, int]
    sums: dict[str, int]
    window: dict[str, int] = field(default_factory=dict)  # min/max/last, only when sampled
    hists: dict[str, dict[int, int]] = field(default_factory=dict)
    exited: bool = False
    pid: str = ""  # the pid tag when it is not the tgid: a folded flow's owner, or `other`

    @property
    def weight(self) -> tuple[int, int]:
        return (self.counters["tx_bytes"] + self.counters["rx_bytes"], sum(self.counters.values()))

    def merge(self, o: "Flow") -> None:
        for k, v in o.counters.items():
            self.counters[k] += v
        for k, v in o.sums.items():
            self.sums[k] += v
        for k, v in o.window.items():
            if k not in self.window:
                self.window[k] = v
            elif k.endswith("_min"):
                self.window[k] = min(self.window[k], v)
            elif k.endswith("_max") or k.endswith("max_us"):
                self.window[k] = max(self.window[k], v)
        for kind, b in o.hists.items():
            hist.merge(self.hists.setdefault(kind, {}), b)


@dataclass(frozen=True)
class Known:
    """A socket the agent has read or marked: its flow and what it has reported so far."""
    fk: tuple
    base: tuple[int, ...]
    flagged: bool        # opened under the agent: its final counters arrive in closed_seen
    client: bool
    comm: bytes = b""    # the owner's name when first seen, for when it has exited since
    misses: int = 0
    opening: bool = False  # an accepted socket whose open is not written yet (the kernel leaves it to us)


ZERO = (0,) * len(VOLUME)
NO_FLOW = (0, 0, 0, 0, bytes(16))  # the flow of a closed socket the agent never read


@dataclass
class Rows:
    """What one poll read from the kernel and /proc, decoded by `decode`.

    agg, hists, reasons: (key, kernel comm, cumulative values) of the flow, histogram
    and reset-reason maps; `*_popped`: entries this poll took out (lookup-and-delete)
    with their final values (None: already gone); `*_carried`: those an earlier poll
    took out and then failed, decoded first. closed: (cookie, final VOLUME counters)
    from closed_seen. socks: (cookie, state, VOLUME counters, (rtt_us, snd_cwnd,
    snd_wnd, rcv_wnd)) of live sockets the agent knows; present: the cookies of every
    live socket with tcp_info; states: (owner, state) of the other sockets. comms: the
    /proc name of each process the rows name, None once it has exited. A histogram
    row's comm is its flow's name in tcp_agg (a flow may be created after that map's
    read)."""
    closed: list = field(default_factory=list)
    agg: list = field(default_factory=list)
    agg_popped: list = field(default_factory=list)
    agg_carried: list = field(default_factory=list)
    hists: list = field(default_factory=list)
    hists_popped: list = field(default_factory=list)
    hists_carried: list = field(default_factory=list)
    reasons: list = field(default_factory=list)
    reasons_popped: list = field(default_factory=list)
    reasons_carried: list = field(default_factory=list)
    socks: list = field(default_factory=list)
    present: set = field(default_factory=set)
    states: list = field(default_factory=list)
    comms: dict = field(default_factory=dict)
    reason_names: dict = field(default_factory=dict)


@dataclass(frozen=True)
class State:
    agg: dict = field(default_factory=dict)       # flow key -> tcp_agg values at the last read
    hists: dict = field(default_factory=dict)     # (flow key, kind_slot) -> count at the last read
    reasons: dict = field(default_factory=dict)   # (tgid, reason) -> resets at the last read
    known: dict = field(default_factory=dict)     # cookie -> Known
    debt: dict = field(default_factory=dict)      # flow -> counts written ahead of its final count


def _deltas(new: dict, carried: list, live: list, popped: list) -> list:
    """(key, comm, delta) of the rows of one map, updating `new` (the last reads).
    Entries taken out give their final values against the last read, and the key is
    forgotten; those an earlier, failed poll took out come before this poll's read."""
    out = []
    for key, comm, values in carried:
        prev = new.pop(key, None)
        if values is not None:
            out.append((key, comm, since(prev, values)))
    for key, comm, values in live:
        out.append((key, comm, since(new.get(key), values)))
        new[key] = values
    for key, comm, values in popped:
        prev = new.pop(key, None)
        if values is not None:
            out.append((key, comm, since(prev, values)))
    return out


def decode(rows: Rows, state: State, ctx: Context) -> tuple[list[Point], State]:
    """Pure: one poll's rows and the previous state -> the probe's points and the next state."""
    flows: dict[tuple, Flow] = {}

    def flow(fk: tuple, comm: bytes) -> Flow:
        f = flows.get(fk)
        if f is None:
            tgid, role, family, port, addr = fk
            f = flows[fk] = Flow(tgid, comm or UNATTRIBUTED, ROLES(role), keys.address(family, addr),
                                 str(port), dict.fromkeys(COUNTERS, 0), dict.fromkeys(SUMS, 0))
        elif comm and f.comm == UNATTRIBUTED:
            f.comm = comm
        return f

    known = dict(state.known)
    # 1. Final counters of sockets the agent had read, less what it already wrote.
    for cookie, final in rows.closed:
        st = known.pop(cookie, None)
        f = flow(st.fk if st else NO_FLOW, st.comm if st else b"")
        for name, a, b in zip(VOLUME, final, st.base if st else ZERO):
            f.counters[name] += a - b  # below 0 when a poll caught the socket mid-transition
        if st is not None and st.opening:
            f.counters["passive_opens"] += 1

    # 2. What the kernel summed per flow (events, and sockets no dump saw).
    dead = {t for t, c in rows.comms.items() if c is None}
    agg = dict(state.agg)
    members = list(AGG_MEMBERS)
    for fk, comm, d in _deltas(agg, rows.agg_carried, rows.agg, rows.agg_popped):
        d = dict(zip(members, d))
        if not any(d.values()):
            continue
        f = flow(fk, comm)
        f.exited = fk[0] in dead
        for c in COUNTERS:
            f.counters[c] += d[c]
        for sname in ("connect_sum_us", "lifetime_sum_us", "srtt_sum_us"):
            f.sums[sname] += d[sname]
    hists = dict(state.hists)
    for (fk, kind_slot), comm, (d,) in _deltas(hists, rows.hists_carried, rows.hists, rows.hists_popped):
        if d:
            f = flows.get(fk) or flow(fk, comm)
            b = f.hists.setdefault(HISTS(kind_slot >> 8), {})
            b[kind_slot & 0xFF] = b.get(kind_slot & 0xFF, 0) + d

    # 3. Live sockets.
    states: list[tuple[int, int]] = list(rows.states)
    samples: dict[tuple, tuple[bytes, list]] = {}
    for cookie, sock_state, now, sample in rows.socks:
        st = known[cookie]
        if now != st.base:
            counters = flow(st.fk, st.comm).counters
            for name, a, b in zip(VOLUME, now, st.base):
                if a > b:
                    counters[name] += a - b
            base = tuple(max(a, b) for a, b in zip(now, st.base))
            known[cookie] = Known(st.fk, base, st.flagged, st.client, st.comm, 0, st.opening)
        elif st.misses:
            known[cookie] = Known(st.fk, st.base, st.flagged, st.client, st.comm, 0, st.opening)
        samples.setdefault(st.fk, (st.comm, []))[1].append(sample)
        states.append((st.fk[0], sock_state))
    for fk, (comm, socks_of_flow) in samples.items():
        _sample(flow(fk, comm), socks_of_flow)
    for cookie, st in list(known.items()):
        if st.opening:  # its first sight: the kernel leaves the open to the agent
            flow(st.fk, st.comm).counters["passive_opens"] += 1
            known[cookie] = st = replace(st, opening=False)
        if cookie not in rows.present:
            # Opened under the agent: its final counters come through closed_seen at
            # the next poll. Older sockets end here (no state callback was set).
            if not st.flagged or st.misses + 1 > 3:
                del known[cookie]
            else:
                known[cookie] = replace(st, misses=st.misses + 1)

    # A final count below what the polls wrote (a socket read mid-transition, off
    # by a SYN or FIN) is taken from the flow's later intervals, never written as
    # a negative delta: totals stay exact.
    debt = dict(state.debt)
    for fk, f in flows.items():
        owed = debt.pop(fk, None)
        for i, name in enumerate(VOLUME):
            v = f.counters[name] + (owed[i] if owed else 0)
            if v < 0:
                debt.setdefault(fk, [0] * len(VOLUME))[i] = v
                v = 0
            f.counters[name] = v
    debt = {fk: tuple(v) for fk, v in debt.items()}

    def name(tgid: int, kernel_comm: bytes, exited: bool = False) -> str:
        return printable_name((None if exited else rows.comms.get(tgid)) or kernel_comm)

    points, kept = _emit(ctx, [f for f in flows.values() if any(f.counters.values()) or f.hists or f.window], name)
    points += _traffic(ctx, points)
    points += _states(ctx, states, kept, name)
    reasons = dict(state.reasons)
    points += _resets(ctx, _deltas(reasons, rows.reasons_carried, rows.reasons, rows.reasons_popped), kept, dead, name,
                      rows.reason_names)
    return points, State(agg, hists, reasons, known, debt)


def _sample(f: Flow, socks: list) -> None:
    """One sample per live socket of the flow: rtt, cwnd and windows from tcp_info."""
    srtt, cwnd, swnd, rwnd = (list(c) for c in zip(*socks))
    f.sums["wnd_samples"] += len(socks)
    f.sums["srtt_sum_us"] += sum(srtt)
    f.sums["snd_cwnd_sum"] += sum(cwnd)
    f.sums["snd_wnd_sum"] += sum(swnd)
    f.sums["rcv_wnd_sum"] += sum(rwnd)
    f.window.update(srtt_max_us=max(srtt), snd_cwnd_min=min(cwnd), snd_wnd_min=min(swnd), rcv_wnd_min=min(rwnd),
                    srtt_last_us=srtt[-1], snd_cwnd_last=cwnd[-1], snd_wnd_last=swnd[-1],
                    rcv_wnd_last=rwnd[-1])
    b = f.hists.setdefault("tcp_srtt", {})
    for v in srtt:
        slot = hist.slot_of(v)
        b[slot] = b.get(slot, 0) + 1


def _traffic(ctx: Context, points: list[Point]) -> list[Point]:
    """tcp_traffic: the flows' bytes summed per process (after folding, so its
    pids are the flows' pids)."""
    per: dict[tuple, list[int]] = {}
    for p in points:
        if p.measurement == "tcp_flow":
            acc = per.setdefault((p.tags["pid"], p.tags["comm"]), [0, 0])
            acc[0] += p.fields["tx_bytes"]
            acc[1] += p.fields["rx_bytes"]
    return [Point("tcp_traffic", {"host": ctx.host, "pid": pid, "comm": comm},
                  {"tx_bytes": tx, "rx_bytes": rx}, ctx.ts)
            for (pid, comm), (tx, rx) in per.items() if tx or rx]


def _emit(ctx: Context, flows: list[Flow], name) -> tuple[list[Point], set[int]]:
    """Top-N processes, top-M peers each, within the host's series budget: the points
    and the processes that kept series of their own.

    What does not fit folds first into the process's own `peer=other` flow, and
    when that does not fit either, into `pid=other`: the only series admitted
    past the budget, a fixed set per role. Counter totals stay exact."""
    budget = ctx.budget
    by_proc: dict[int, list[Flow]] = {}
    for f in flows:
        by_proc.setdefault(f.tgid, []).append(f)
    keep, rest = top_n(list(by_proc.items()), ctx.max_processes,
                       lambda p: (sum(f.weight[0] for f in p[1]), sum(f.weight[1] for f in p[1])))
    out: list[Flow] = []
    global_other: dict[str, Flow] = {}
    kept_tgids = set()
    for tgid, fl in keep:
        comm = name(tgid, fl[0].comm, fl[0].exited) if tgid else "[unattributed]"
        top, tail = top_n(fl, ctx.max_peers, lambda f: f.weight)
        for f in top:
            f.comm = comm
            if budget.admit(_series(ctx, f)):
                out.append(f)
                kept_tgids.add(tgid)
            else:
                tail.append(f)
        folded: dict[str, Flow] = {}
        for f in tail:
            _fold_into(folded, f, str(tgid), comm)
        for f in folded.values():
            if budget.admit(_series(ctx, f)):
                out.append(f)
                kept_tgids.add(tgid)
            else:
                _fold_into(global_other, f, OTHER, OTHER)
    for tgid, fl in rest:
        for f in fl:
            _fold_into(global_other, f, OTHER, OTHER)
    for f in global_other.values():
        budget.admit(_series(ctx, f), force=True)
        out.append(f)
    points = []
    for f in out:
        points += _points(ctx, f)
    return points, kept_tgids


def _fold_into(acc: dict[str, Flow], f: Flow, pid: str, name: str) -> None:
    key = f.role
    if key not in acc:
        acc[key] = Flow(0, name, f.role, OTHER, OTHER, dict.fromkeys(f.counters, 0), dict.fromkeys(f.sums, 0),
                        pid=pid)
    acc[key].merge(f)


def _tags(ctx: Context, f: Flow) -> dict[str, str]:
    pid = f.pid or str(f.tgid)
    return {"host": ctx.host, "pid": pid, "comm": f.comm, "role": f.role, "peer": f.peer, "port": f.port}


def _series(ctx: Context, f: Flow) -> set[tuple]:
    t = tuple(sorted(_tags(ctx, f).items()))
    series = {("tcp_flow", t)}
    if f.window:
        series.add(("tcp_window", t))
    for name, b in f.hists.items():
        series.add((name, t))
        series |= {(name + "_hist", t, hist.le(s)) for s in b}
    return series


def _points(ctx: Context, f: Flow) -> list[Point]:
    tags = _tags(ctx, f)
    ts = ctx.ts
    pts = []
    if any(f.counters.values()):
        pts.append(Point("tcp_flow", tags, dict(f.counters), ts))
    n = f.sums["wnd_samples"]
    w = f.window
    if n and "srtt_max_us" in w:
        pts.append(Point("tcp_window", tags, {
            "samples": n,
            "srtt_max_us": w["srtt_max_us"], "srtt_mean_us": f.sums["srtt_sum_us"] / n,
            "srtt_last_us": w["srtt_last_us"],
            "snd_cwnd_min": w["snd_cwnd_min"], "snd_cwnd_mean": f.sums["snd_cwnd_sum"] / n,
            "snd_cwnd_last": w["snd_cwnd_last"],
            "snd_wnd_min_bytes": w["snd_wnd_min"], "snd_wnd_mean_bytes": f.sums["snd_wnd_sum"] / n,
            "snd_wnd_last_bytes": w["snd_wnd_last"],
            "rcv_wnd_min_bytes": w["rcv_wnd_min"], "rcv_wnd_mean_bytes": f.sums["rcv_wnd_sum"] / n,
            "rcv_wnd_last_bytes": w["rcv_wnd_last"],
        }, ts))
    sums = {"tcp_srtt": f.sums["srtt_sum_us"], "tcp_connect_latency": f.sums["connect_sum_us"],
            "tcp_lifetime": f.sums["lifetime_sum_us"]}
    maxes = {"tcp_srtt": w.get("srtt_max_us"), "tcp_connect_latency": w.get("connect_max_us"),
             "tcp_lifetime": w.get("lifetime_max_us")}
    for name, b in f.hists.items():
        # a max is None when its slot rolled over mid-poll: the top bucket bounds it
        pts += hist.points(name, tags, b, sums[name], ts, maxes[name])
    return pts


def _states(ctx: Context, states: list[tuple[int, int]], kept: set[int], name) -> list[Point]:
    counts: dict[tuple, int] = {}
    for tgid, state in states:
        key = (tgid if tgid in kept or tgid == 0 else OTHER, STATES(state))
        counts[key] = counts.get(key, 0) + 1
    merged: dict[tuple, int] = {}
    for (tgid, state), c in counts.items():
        if tgid == OTHER:
            pid, comm = OTHER, OTHER
        elif tgid == 0:
            pid, comm = "0", "[unattributed]"
        else:
            pid, comm = str(tgid), name(tgid, b"")
        if pid != OTHER and not ctx.budget.admit({("tcp_states", pid, comm, state)}):
            pid, comm = OTHER, OTHER
        merged[(pid, comm, state)] = merged.get((pid, comm, state), 0) + c
    return [Point("tcp_states", {"host": ctx.host, "pid": pid, "comm": comm, "state": state},
                  {"sockets": c}, ctx.ts) for (pid, comm, state), c in merged.items()]


def _resets(ctx: Context, deltas: list, kept: set[int], dead: set[int], name, reason_names: dict) -> list[Point]:
    merged: dict[tuple, int] = {}  # several folded processes may share pid=other and a reason
    for (tgid, reason), kcomm, (d,) in deltas:
        if not d:
            continue
        is_kept = tgid in kept or tgid == 0
        pid = str(tgid) if is_kept else OTHER
        comm = (name(tgid, kcomm, tgid in dead) if is_kept and tgid else ("[unattributed]" if is_kept else OTHER))
        reason = reason_names.get(reason, str(reason))
        if pid != OTHER and not ctx.budget.admit({("tcp_resets_sent", pid, comm, reason)}):
            pid, comm = OTHER, OTHER
        merged[(pid, comm, reason)] = merged.get((pid, comm, reason), 0) + d
    return [Point("tcp_resets_sent", {"host": ctx.host, "pid": pid, "comm": comm, "reason": reason},
                  {"resets": d}, ctx.ts) for (pid, comm, reason), d in merged.items()]


def _netns(proc: Path) -> dict[int, str]:
    """netns inode -> a /proc path to enter it, for every network namespace in use."""
    out: dict[int, str] = {}
    for d in os.scandir(proc):
        if d.name.isdigit():
            try:
                out.setdefault(int(os.readlink(f"{d.path}/ns/net")[5:-1]), f"{d.path}/ns/net")
            except OSError:
                continue
    return out


def _socket_owners(proc: Path) -> dict[int, int]:
    """socket inode -> the highest pid holding it (for a socket shared by a master and
    its workers, a worker)."""
    out: dict[int, int] = {}
    for pid, inode in socket_links(proc):
        if out.get(inode, 0) < pid:
            out[inode] = pid
    return out


class TcpDecoder:
    """The tcp probe's poll: `read` (maps, the sock_diag dump, /proc), `decode` (pure),
    and the new state committed once the whole poll has succeeded."""

    def __init__(self, probe):
        from bcc import BPF, BPFAttachType
        self.probe = probe
        self.proc = Path(probe.config.paths.proc)
        b = probe.bpf
        self.agg = probe.table("tcp_agg")
        self.hists = probe.table("tcp_hist")
        self.conns = probe.table("conns")
        self.seen = probe.table("seen")
        self.closed_seen = probe.table("closed_seen")
        self.listeners = probe.table("listeners")
        self.reasons_map = probe.table("tcp_reset_reason")
        fmt = probe.config.paths.tracefs / "events/tcp/tcp_send_reset/format"
        self.reason_names = reset_reasons(fmt.read_text()) if fmt.exists() else {}
        self.state = State()
        # Entries polls took out of the maps (lookup-and-delete), per map, since the last
        # poll that succeeded: the next poll decodes them first. Emptied by a success.
        self.carried: tuple[list, list, list] = ([], [], [])
        self.diag: dict[int, sockdiag.DiagSocket] = {}
        self.own_netns = int(os.readlink("/proc/self/ns/net")[5:-1])
        self.listener_cache: dict[tuple, tuple] = {}
        self.inode_owner: dict[int, int] = {}
        self.unowned: dict[int, int] = {}   # inode -> poll of the scan that did not find it
        self.polls = 0
        self._scanned = False
        self._attached: list[tuple[int, int, int]] = []
        cg = cgroup2_root(probe.config.paths.sys)
        self.cgroup_fd = os.open(cg, os.O_RDONLY)
        for atype in (BPFAttachType.CGROUP_SOCK_OPS, BPFAttachType.CGROUP_INET4_CONNECT,
                      BPFAttachType.CGROUP_INET6_CONNECT, BPFAttachType.CGROUP_INET_SOCK_RELEASE):
            stale = detach_by_name(self.cgroup_fd, atype, "sonde_")
            if stale:
                log.warning("tcp: detached %d program(s) a previous agent left on %s", stale, cg)
        try:
            for fn, ptype, atype in (("sonde_sockops", BPF.SOCK_OPS, BPFAttachType.CGROUP_SOCK_OPS),
                                     ("sonde_connect4", BPF.CGROUP_SOCK_ADDR, BPFAttachType.CGROUP_INET4_CONNECT),
                                     ("sonde_connect6", BPF.CGROUP_SOCK_ADDR, BPFAttachType.CGROUP_INET6_CONNECT),
                                     ("sonde_release", BPF.CGROUP_SOCK, BPFAttachType.CGROUP_INET_SOCK_RELEASE)):
                f = b.load_func(fn.encode(), ptype, attach_type=atype) if ptype != BPF.SOCK_OPS \
                    else b.load_func(fn.encode(), ptype)
                # BPF_F_ALLOW_MULTI: other tools' programs on the root stay attached
                BPF.attach_func(f, self.cgroup_fd, atype, 2)
                self._attached.append((f, self.cgroup_fd, atype))
        except Exception as e:
            self.close()
            raise RuntimeError(f"cannot attach the cgroup programs to {cg}: {str(e).splitlines()[0]}")

    def close(self) -> None:
        from bcc import BPF
        for fn, cg, atype in self._attached:
            try:
                BPF.detach_func(fn, cg, atype)
            except Exception:
                pass
        self._attached = []
        for d in self.diag.values():
            d.close()
        self.diag = {}
        if getattr(self, "cgroup_fd", None) is not None:
            os.close(self.cgroup_fd)
            self.cgroup_fd = None

    # --- the poll --------------------------------------------------------------------

    def poll(self, ts: int) -> tuple[list[Point], int]:
        rows = self.read()
        points, new = decode(rows, self.state, self.probe.context(ts))

        def commit() -> None:
            self.state = new
            self.carried = ([], [], [])
        defer(commit)  # once these points are handed over
        return points, len(rows.agg) + len(rows.hists) + len(new.known)

    def read(self) -> Rows:
        """One poll's rows. What it changes in the kernel is either undone by nothing
        (marking a socket seen: `state.known` records it at once) or kept for the next
        poll should this one fail (entries taken out: `carried`; closed_seen entries
        are deleted only once the poll has succeeded)."""
        state = self.state
        rows = Rows(reason_names=self.reason_names)
        rows.agg_carried, rows.hists_carried, rows.reasons_carried = (list(c) for c in self.carried)

        # 1. Final counters of closed sockets the agent had read.
        closed_keys = []
        for k, v in read_all(self.closed_seen):
            cookie = int(k.value if hasattr(k, "value") else k)
            rows.closed.append((cookie, (v.tx_bytes, v.rx_bytes, v.segs_in, v.segs_out, v.retrans)))
            closed_keys.append(self.closed_seen.Key(cookie))
        self.probe.delete_later(self.closed_seen, closed_keys)

        # 2. What the kernel summed per flow: cumulative entries, read as deltas. An
        # entry idle for a whole interval is taken out (lookup-and-delete), counting
        # anything added since the read, so a map holds at most two intervals' flows;
        # no program can still be adding to an entry nothing touched for an interval,
        # and the maps are not preallocated, so a deleted entry is never reused under a
        # late writer.
        members = list(AGG_MEMBERS.values())
        rows.agg, rows.agg_popped = self._read_map(
            self.agg, state.agg, rows.agg_carried, self.carried[0],
            lambda k, v: (self._fk(k), bytes(v.comm).split(b"\0", 1)[0], tuple(getattr(v, m) for m in members)))
        comms = {fk: comm for fk, comm, _ in rows.agg}

        def hist_row(k, v) -> tuple:
            fk = self._fk(k.fk)
            if fk not in comms:  # a flow created after the flow map's read: its entry names it
                comms[fk] = self._agg_comm(k.fk)
            return (fk, k.kind_slot), comms[fk], (v if isinstance(v, int) else v.value,)
        rows.hists, rows.hists_popped = self._read_map(self.hists, state.hists, rows.hists_carried, self.carried[1],
                                                       hist_row)

        # 3. Live sockets, one dump per network namespace.
        self._scanned = False
        self.polls += 1
        if self.polls % UNOWNED_RETRY == 0:
            self.unowned = {i: p for i, p in self.unowned.items() if self.polls - p < UNOWNED_RETRY}
        self._read_sockets(self._dump(), rows)

        # 4. Resets sent, per process and reason.
        rows.reasons, rows.reasons_popped = self._read_map(
            self.reasons_map, state.reasons, rows.reasons_carried, self.carried[2],
            lambda k, v: ((k.tgid, k.reason), bytes(v.comm).split(b"\0", 1)[0], (v.resets,)))

        # The processes these rows name, by their /proc name (None: exited).
        tgids = {fk[0] for fk, _, _ in rows.agg + rows.agg_popped + rows.agg_carried}
        tgids |= {fk[0] for (fk, _), _, _ in rows.hists + rows.hists_popped + rows.hists_carried}
        tgids |= {key[0] for key, _, _ in rows.reasons + rows.reasons_popped + rows.reasons_carried}
        tgids |= {owner for owner, _ in rows.states}
        tgids |= {state.known[c].fk[0] for c, _ in rows.closed if c in state.known}
        tgids |= {state.known[c].fk[0] for c, _, _, _ in rows.socks}
        rows.comms = {t: self.probe.procfs.comm(t) for t in tgids if t}
        return rows

    @staticmethod
    def _read_map(table, prev: dict, carried: list, carry: list, row) -> tuple[list, list]:
        """A map's rows, row(key, value) each, and the rows of the entries that did not
        move over an interval, taken out (lookup-and-delete) with their final values
        (None: gone already). Each one taken out is added to `carry` at once, for the
        next poll should this one fail from here on."""
        raw = read_all(table)
        read = [row(k, v) for k, v in raw]
        skip = {key for key, _, _ in carried}
        popped = []
        for (k, _), (key, comm, values) in zip(raw, read):
            if key in skip or any(since(prev.get(key), values)):
                continue
            k = type(k).from_buffer_copy(k)
            v = pop(table, k)
            popped.append(row(k, v) if v is not None else (key, comm, None))
            carry.append(popped[-1])
        return read, popped

    def _agg_comm(self, fk) -> bytes:
        """The process name in a flow's tcp_agg entry, b"" if it has none."""
        try:
            v = self.agg[self.agg.Key.from_buffer_copy(bytes(fk))]
        except (KeyError, ValueError):
            return b""
        return bytes(v.comm).split(b"\0", 1)[0]

    def _dump(self) -> list:
        netns = _netns(self.proc)
        socks = []
        for ns, path in netns.items():
            d = self.diag.get(ns)
            if d is None:
                try:
                    d = self.diag[ns] = sockdiag.DiagSocket(None if ns == self.own_netns else path)
                except OSError as e:
                    log.warning("tcp: cannot open a sock_diag socket in netns %s: %s", ns, e)
                    continue
            try:
                socks.extend(d.dump())
            except (OSError, sockdiag.DumpError) as e:
                log.warning("tcp: dump of netns %s failed: %s", ns, e)
        for ns in set(self.diag) - set(netns):  # namespaces that are gone
            self.diag.pop(ns).close()
        return socks

    def _owner_of(self, inode: int) -> int | None:
        """The process holding a socket inode: from the cache, or from one scan of
        every process's fds per poll when the cache does not know it (or knows a
        process that has exited)."""
        if not inode:
            return None
        pid = self.inode_owner.get(inode)
        if pid is not None and self.probe.procfs.alive(pid):
            return pid
        # a socket no process holds (a kernel socket, one in another pid namespace's
        # process that /proc hides) is retried only every few polls, not scanned for each time
        if self._scanned or self.polls - self.unowned.get(inode, -UNOWNED_RETRY) < UNOWNED_RETRY:
            return None
        self._scanned = True
        self.inode_owner = _socket_owners(self.proc)
        pid = self.inode_owner.get(inode)
        if pid is None:
            self.unowned[inode] = self.polls
        return pid

    def _read_sockets(self, socks, rows: Rows) -> None:
        listening: dict[tuple, int] = {}
        for s in socks:
            if s.state == sockdiag.TCP_LISTEN:
                owner = self._owner_of(s.inode)
                if owner:
                    listening[(s.family, s.sport, s.src)] = owner
        self._sync_listeners(listening)
        listen_ports = {(fam, port) for fam, port, _ in listening}
        known = self.state.known
        for s in socks:
            if s.state == sockdiag.TCP_LISTEN or not s.has_info:
                rows.states.append((self._owner_of(s.inode) or 0, s.state))
                continue
            rows.present.add(s.cookie)
            st = known.get(s.cookie) or self._first_sight(s, listen_ports)
            if st is None:
                rows.states.append((self._owner_of(s.inode) or 0, s.state))
                continue
            rows.socks.append((s.cookie, s.state, live_counters(s, st.client),
                               (s.rtt_us, s.snd_cwnd, s.snd_wnd, s.rcv_wnd)))

    def _first_sight(self, s, listen_ports) -> Known | None:
        """Mark a socket seen and record it in `state.known` at once, whether or not this
        poll succeeds: the mark sends its final counters to closed_seen, which needs
        its flow. Nothing is counted here; a socket opened under the agent is recorded
        with nothing reported yet, so the poll that succeeds counts all of it."""
        try:
            c = self.conns[self.conns.Key(s.cookie)]
        except KeyError:
            c = None
        known = self.state.known
        if c is None:
            # Older than the agent (or not tracked): counted from now on.
            client = (s.family, s.sport) not in listen_ports
            owner = self._owner_of(s.inode) or 0
            fk = (owner, 1 if client else 2, s.family, s.dport if client else s.sport, s.dst.ljust(16, b"\0"))
            st = known[s.cookie] = Known(fk, live_counters(s, client), False, client, self._comm(owner))
            return st
        owner = c.tgid or self._owner_of(s.inode)
        if not owner:
            return None  # accepted but not yet taken by a process: next poll, or the close counts it
        comm = bytes(c.comm).split(b"\0", 1)[0] if c.tgid else (self._comm(owner) or b"")
        key = self.seen.Key(s.cookie)
        leaf = self.seen.Leaf()
        leaf.tgid = owner
        leaf.comm = comm[:15]  # a char[] field reads back as a bytes copy: assign, never memmove into it
        try:
            self.seen[key] = leaf
        except Exception:  # the map is full: count it from the kernel's sums at close
            return None
        client = c.role == 1
        fk = (owner, c.role, c.family, c.port, bytes(c.addr))
        try:
            self.conns[self.conns.Key(s.cookie)]
            still_open = True
        except KeyError:
            still_open = False
        st = Known(fk, ZERO, True, client, comm, opening=c.role == 2)
        if not still_open:
            try:
                del self.seen[key]
                return None       # closed before the mark: the kernel summed all of it
            except KeyError:      # closed after the mark: its finals are in closed_seen
                known[s.cookie] = st
                return None
        known[s.cookie] = st
        return st

    def _comm(self, pid: int) -> bytes:
        if not pid:
            return b""
        return self.probe.procfs.comm(pid) or b""

    def _sync_listeners(self, listening: dict[tuple, int]) -> None:
        want = {}
        for (family, port, addr), pid in listening.items():
            want[(family, port, addr.ljust(16, b"\0"))] = (pid, self._comm(pid))
        for key, val in want.items():
            if self.listener_cache.get(key) != val:
                k = self.listeners.Key()
                k.port, k.family = key[1], key[0]
                k.addr[:] = key[2]
                leaf = self.listeners.Leaf()
                leaf.tgid = val[0]
                leaf.comm = val[1][:15]
                self.listeners[k] = leaf
        for key in set(self.listener_cache) - set(want):
            k = self.listeners.Key()
            k.port, k.family = key[1], key[0]
            k.addr[:] = key[2]
            self._delete(self.listeners, k)
        self.listener_cache = want

    @staticmethod
    def _delete(table, key) -> None:
        try:
            del table[key]
        except KeyError:
            pass

    @staticmethod
    def _fk(k) -> tuple:
        return (k.tgid, k.role, k.family, k.port, bytes(k.addr))


def cgroup2_root(sys_root) -> str:
    """Where cgroup v2 is mounted: /sys/fs/cgroup/unified on the v1/v2 hybrid, else
    /sys/fs/cgroup. The programs attach at the root, so they see every process."""
    for rel in CGROUP2_CANDIDATES:
        p = Path(sys_root) / rel
        if (p / "cgroup.procs").exists() and not (p / "tasks").exists():
            return str(p)
    raise RuntimeError(f"no cgroup2 mount under {sys_root}/fs/cgroup; mount one: "
                       f"mount -t cgroup2 none {sys_root}/fs/cgroup/unified")


def kernel_features(sys_root) -> list[str]:
    """What the probe needs beyond its tracepoints, as one-line problems."""
    from sonde.ingest.runtime.btf import load
    from sonde.ingest.errors import SondeError
    problems = []
    try:
        cgroup2_root(sys_root)
    except RuntimeError as e:
        problems.append(str(e))
    try:
        b = load(sys_root)
        for struct, member in (("sock_common", "skc_cookie"), ("sock_common", "skc_flags")):
            if not b.has_member(struct, member):
                problems.append(f"this kernel's BTF has no {struct}.{member}")
    except SondeError as e:
        problems.append(str(e))
    return problems


def kernel_offsets(sys_root) -> list[str]:
    from sonde.ingest.runtime.btf import load
    b = load(sys_root)
    return [f"-DOFF_SKC_COOKIE={b.offsetof('sock_common', 'skc_cookie')}",
            f"-DOFF_SKC_FLAGS={b.offsetof('sock_common', 'skc_flags')}"]


PROBE = Probe(
    name="tcp",
    doc=__doc__,
    hooks=("tcp:tcp_receive_reset", "tcp:tcp_send_reset"),
    fields={"tcp:tcp_receive_reset": ("skaddr", "family", "sport", "dport", "daddr", "daddr_v6"),
            "tcp:tcp_send_reset": ("skaddr",)},
    variant_fields={"tcp:tcp_send_reset": ("reason", "daddr_v6")},
    requires=kernel_features,
    cflags=kernel_offsets,
    decoder=TcpDecoder,
)
