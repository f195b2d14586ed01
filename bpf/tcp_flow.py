"""tcp_flow: L4 connection metrics per process x peer endpoint, IPv4 and IPv6.

What it reports (catalog: tcp_flow, tcp_window, tcp_srtt[_hist],
tcp_connect_latency[_hist], tcp_lifetime[_hist], tcp_states, tcp_resets_sent):
bytes, received segments, active/passive opens, refused and timed-out connects,
closes, retransmits, resets sent (with the kernel's reason) and received,
zero-window segments, srtt/cwnd/send and receive windows (min, mean, last, max),
and exp2 histograms of srtt, connect latency and connection lifetime.

Peers: for a connection the process opened (`role=client`) the tags are the remote
IP and remote port; for one it accepted (`role=server`) the remote IP and the
local listening port. Client ephemeral ports are never tags.

Attribution. Hooks in softirq or timer context (tcp_probe, retransmits, resets,
passive handshakes) run with an unrelated current task, so the owner comes from a
socket map keyed by the socket pointer's value (never dereferenced), filled in
process context and evicted at tcp_destroy_sock. Where it can still miss:
- a passive connection belongs to the first process that sends, receives or closes
  on it. Before that (handshake to first read) its segments and retransmits count
  under the process that last claimed a connection on the same listening port (for
  nginx, possibly the other worker), or under pid 0 for a port's first connection;
- sockets opened before the agent started get an owner at their first send or
  receive and a peer at their next received segment or state change (`role=unknown`);
- resets sent for segments that match no socket (a closed port), and events on
  sockets the agent never saw open, count under pid 0, comm `[unattributed]`,
  so host totals stay exact;
- a socket shared across fork stays with the first process that used it.

Segments sent are not reported: no tracepoint on this kernel sees each outgoing
segment (tcp_probe sees incoming ones).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from ingest import hist
from ingest.bpfmap import read_all
from ingest.cardinality import OTHER, top_n
from ingest.delta import DeltaTracker
from ingest.lineproto import Point
from ingest.probe import Probe

ROLES = {0: "unknown", 1: "client", 2: "server"}
STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
          7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV"}
HISTS = {0: "tcp_connect_latency", 1: "tcp_srtt", 2: "tcp_lifetime"}
COUNTERS = ("tx_bytes", "rx_bytes", "rx_segments", "active_opens", "passive_opens", "connect_refused",
            "connect_timeouts", "closes", "retransmits", "resets_sent", "resets_received", "zero_windows")
SUMS = ("wnd_samples", "srtt_sum_us", "snd_cwnd_sum", "snd_wnd_sum", "rcv_wnd_sum",
        "connect_sum_us", "lifetime_sum_us")
FIELD_NAMES = {"zero_windows": "zero_window_segments"}
UNATTRIBUTED = b"[unattributed]"


def peer_name(family: int, addr: bytes) -> str:
    if family == 2:
        return str(ipaddress.IPv4Address(addr[:4]))
    if family == 10:
        ip = ipaddress.IPv6Address(addr[:16])
        return str(ip.ipv4_mapped or ip)
    return "unknown"


def reset_reasons(format_text: str) -> dict[int, str]:
    """sk_rst_reason names from tcp_send_reset's tracefs format (the running kernel's own)."""
    m = re.search(r"__print_symbolic\(REC->reason,(.*)\)", format_text)
    return {int(n): name for n, name in re.findall(r'\{\s*(\d+),\s*"(\w+)"\s*\}', m.group(1))} if m else {}


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


class FlowDecoder:
    def __init__(self, probe):
        self.probe = probe
        self.host = probe.config.host
        self.flows = probe.table("tcp_flow")
        self.hists = probe.table("tcp_hist")
        self.socks = probe.table("socks")
        self.reasons_map = probe.table("tcp_reset_reason")
        self.epoch_map = probe.table("window_epoch")
        self.flow_deltas = DeltaTracker()
        self.hist_deltas = DeltaTracker()
        self.reason_deltas = DeltaTracker()
        fmt = probe.config.paths.tracefs / "events/tcp/tcp_send_reset/format"
        self.reason_names = reset_reasons(fmt.read_text()) if fmt.exists() else {}
        # Epoch 0 is what a zeroed slot holds; start past it so a fresh slot never looks current.
        self.epoch = 2
        self._set_epoch(self.epoch)

    def _set_epoch(self, e: int) -> None:
        key = self.epoch_map.Key(0)
        self.epoch_map[key] = self.epoch_map.Leaf(e)

    def poll(self, ts: int) -> tuple[list[Point], int]:
        closing = self.epoch
        self.epoch += 1
        self._set_epoch(self.epoch)  # samples from now on land in the other slot
        slot = closing & 1

        raw_flows = read_all(self.flows)
        tgids = {k.tgid for k, _ in raw_flows if k.tgid}
        dead = {t for t in tgids if not self.probe.procfs.alive(t)}
        raw_hists = [(k, v if isinstance(v, int) else v.value) for k, v in read_all(self.hists)]
        if dead:  # re-read the dead processes' entries now that they cannot change
            raw_flows = [(k, self.flows[k] if k.tgid in dead else v) for k, v in raw_flows]

        flows: dict[tuple, Flow] = {}
        for k, v in raw_flows:
            fk = self._fk(k)
            d = dict(zip(COUNTERS + SUMS, self.flow_deltas.delta(fk, tuple(getattr(v, c) for c in COUNTERS + SUMS))))
            f = Flow(k.tgid, bytes(v.comm).split(b"\0", 1)[0] or UNATTRIBUTED, ROLES.get(k.role, "unknown"),
                     peer_name(k.family, bytes(k.addr)), str(k.port),
                     {c: d[c] for c in COUNTERS}, {s: d[s] for s in SUMS}, exited=k.tgid in dead)
            if d["wnd_samples"] and v.wepoch[slot] == closing:
                f.window.update(srtt_max_us=v.srtt_max_us[slot], snd_cwnd_min=v.snd_cwnd_min[slot],
                                snd_wnd_min=v.snd_wnd_min[slot], rcv_wnd_min=v.rcv_wnd_min[slot],
                                srtt_last_us=v.srtt_last_us, snd_cwnd_last=v.snd_cwnd_last,
                                snd_wnd_last=v.snd_wnd_last, rcv_wnd_last=v.rcv_wnd_last)
            if v.cepoch[slot] == closing:
                f.window["connect_max_us"] = v.connect_max_us[slot]
            if v.lepoch[slot] == closing:
                f.window["lifetime_max_us"] = v.lifetime_max_us[slot]
            flows[fk] = f
        for k, count in raw_hists:
            fk = self._fk(k.fk)
            kind, s = k.kind_slot >> 8, k.kind_slot & 0xFF
            (d,) = self.hist_deltas.delta((fk, kind, s), (count,))
            if d and fk in flows:
                flows[fk].hists.setdefault(HISTS[kind], {})[s] = d

        points = self._emit(ts, [f for f in flows.values() if any(f.counters.values()) or f.hists or f.window])
        points += self._states(ts)
        points += self._resets(ts, dead)

        # Reclaim entries of exited processes after their last delta is out.
        for k, _ in raw_flows:
            if k.tgid in dead:
                self._delete(self.flows, k)
                self.flow_deltas.forget(self._fk(k))
        for k, _ in raw_hists:
            if k.fk.tgid in dead:
                self._delete(self.hists, k)
                self.hist_deltas.forget((self._fk(k.fk), k.kind_slot >> 8, k.kind_slot & 0xFF))
        entries = len(raw_flows) + len(raw_hists) + self._socks_count
        return points, entries

    @staticmethod
    def _delete(table, key) -> None:
        try:
            del table[key]
        except KeyError:
            pass

    @staticmethod
    def _fk(k) -> tuple:
        return (k.tgid, k.role, k.family, k.port, bytes(k.addr))

    # --- folding and points ------------------------------------------------------------

    def _emit(self, ts: int, flows: list[Flow]) -> list[Point]:
        """Top-N processes, top-M peers each, within the host's series budget.

        What does not fit folds first into the process's own `peer=other` flow, and
        when that does not fit either, into `pid=other`: the only series admitted
        past the budget, a fixed set per role. Counter totals stay exact."""
        settings = self.probe.settings
        budget = self.probe.budget
        by_proc: dict[int, list[Flow]] = {}
        for f in flows:
            by_proc.setdefault(f.tgid, []).append(f)
        keep, rest = top_n(list(by_proc.items()), settings.max_processes,
                           lambda p: (sum(f.weight[0] for f in p[1]), sum(f.weight[1] for f in p[1])))
        out: list[Flow] = []
        global_other: dict[str, Flow] = {}
        self.kept_tgids = set()
        for tgid, fl in keep:
            name = self.probe.process_name(tgid, fl[0].comm, exited=fl[0].exited) if tgid else "[unattributed]"
            top, tail = top_n(fl, settings.max_peers, lambda f: f.weight)
            for f in top:
                f.comm = name
                if budget.admit(self._series(f)):
                    out.append(f)
                    self.kept_tgids.add(tgid)
                else:
                    tail.append(f)
            folded: dict[str, Flow] = {}
            for f in tail:
                self._fold_into(folded, f, str(tgid), name)
            for f in folded.values():
                if budget.admit(self._series(f)):
                    out.append(f)
                    self.kept_tgids.add(tgid)
                else:
                    self._fold_into(global_other, f, OTHER, OTHER)
        for tgid, fl in rest:
            for f in fl:
                self._fold_into(global_other, f, OTHER, OTHER)
        for f in global_other.values():
            budget.admit(self._series(f), force=True)
            out.append(f)
        points = []
        for f in out:
            points += self._points(ts, f)
        return points

    @staticmethod
    def _fold_into(acc: dict[str, Flow], f: Flow, pid: str, name: str) -> None:
        key = f.role
        if key not in acc:
            acc[key] = Flow(0, name, f.role, OTHER, OTHER, dict.fromkeys(f.counters, 0), dict.fromkeys(f.sums, 0),
                            pid=pid)
        acc[key].merge(f)

    def _tags(self, f: Flow) -> dict[str, str]:
        pid = f.pid or str(f.tgid)
        return {"host": self.host, "pid": pid, "comm": f.comm, "role": f.role, "peer": f.peer, "port": f.port}

    def _series(self, f: Flow) -> set[tuple]:
        t = tuple(sorted(self._tags(f).items()))
        keys = {("tcp_flow", t)}
        if f.window:
            keys.add(("tcp_window", t))
        for name, b in f.hists.items():
            keys.add((name, t))
            keys |= {(name + "_hist", t, hist.le(s)) for s in b}
        return keys

    def _points(self, ts: int, f: Flow) -> list[Point]:
        tags = self._tags(f)
        pts = []
        if any(f.counters.values()):
            pts.append(Point("tcp_flow", tags, {FIELD_NAMES.get(k, k): v for k, v in f.counters.items()}, ts))
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

    def _states(self, ts: int) -> list[Point]:
        counts: dict[tuple, int] = {}
        names: dict[int, bytes] = {}
        n = 0
        for _, s in read_all(self.socks):
            n += 1
            tgid = s.fk.tgid
            names.setdefault(tgid, bytes(s.comm).split(b"\0", 1)[0])
            key = (tgid if tgid in self.kept_tgids else OTHER, STATES.get(s.state, str(s.state)))
            counts[key] = counts.get(key, 0) + 1
        self._socks_count = n
        merged: dict[tuple, int] = {}
        for (tgid, state), c in counts.items():
            if tgid == OTHER:
                pid, comm = OTHER, OTHER
            elif tgid == 0:
                pid, comm = "0", "[unattributed]"
            else:
                pid, comm = str(tgid), self.probe.process_name(tgid, names[tgid])
            if pid != OTHER and not self.probe.budget.admit({("tcp_states", pid, comm, state)}):
                pid, comm = OTHER, OTHER
            merged[(pid, comm, state)] = merged.get((pid, comm, state), 0) + c
        return [Point("tcp_states", {"host": self.host, "pid": pid, "comm": comm, "state": state},
                      {"sockets": c}, ts) for (pid, comm, state), c in merged.items()]

    def _resets(self, ts: int, dead: set[int]) -> list[Point]:
        pts = []
        for k, v in list(self.reasons_map.items()):
            if k.tgid in dead:
                v = self.reasons_map[k]
            (d,) = self.reason_deltas.delta((k.tgid, k.reason), (v.resets,))
            if d:
                kept = k.tgid in self.kept_tgids or k.tgid == 0
                pid = str(k.tgid) if kept else OTHER
                comm = (self.probe.process_name(k.tgid, bytes(v.comm).split(b"\0", 1)[0], exited=k.tgid in dead)
                        if kept and k.tgid else ("[unattributed]" if kept else OTHER))
                reason = self.reason_names.get(k.reason, str(k.reason))
                if pid != OTHER and not self.probe.budget.admit({("tcp_resets_sent", pid, comm, reason)}):
                    pid, comm = OTHER, OTHER
                pts.append(Point("tcp_resets_sent", {"host": self.host, "pid": pid, "comm": comm, "reason": reason},
                                 {"resets": d}, ts))
            if k.tgid in dead:
                self._delete(self.reasons_map, k)
                self.reason_deltas.forget((k.tgid, k.reason))
        # several folded processes may share pid=other and a reason: merge them
        merged: dict[tuple, Point] = {}
        for p in pts:
            key = tuple(sorted(p.tags.items()))
            if key in merged:
                merged[key].fields["resets"] += p.fields["resets"]
            else:
                merged[key] = p
        return list(merged.values())


PROBE = Probe(
    name="tcp_flow",
    doc=__doc__,
    hooks=("sock:sock_send_length", "sock:sock_recv_length", "sock:inet_sock_set_state", "tcp:tcp_destroy_sock"),
    optional_hooks={
        "tcp:tcp_probe": "tcp_window, tcp_srtt and rx_segments/zero_window_segments",
        "tcp:tcp_retransmit_skb": "tcp_flow.retransmits",
        "tcp:tcp_send_reset": "tcp_flow.resets_sent and tcp_resets_sent",
        "tcp:tcp_receive_reset": "tcp_flow.resets_received, and refused connects count as timeouts",
    },
    decoder=FlowDecoder,
)
