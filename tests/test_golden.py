"""Golden files: every probe's decode step on literal rows, without root or bcc.

tests/golden/<probe>/<case>.json holds a case's input (rows as a poll reads them from
the kernel and /proc, the previous state, the context) and what decode must return:
the points as line protocol and the next state. The real-kernel tests in
tests/probes/ check the reads; these check the arithmetic, each edge written down
(counter resets, exited processes, folds into `other`).

Regenerate the expected halves after a deliberate change with
`SONDE_GOLDEN_WRITE=1 pytest tests/test_golden.py`, then read the diff. Without it a
mismatch fails. `python tests/test_golden.py` runs every case without pytest (the
test below runs it as `nobody`, with bcc made unimportable).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"
WRITE = os.environ.get("SONDE_GOLDEN_WRITE") == "1"
# probes whose decoding is not a function of map rows: l7 decodes events with its pure
# parsers, tested on literal bytes in tests/probes/test_l7_parsers.py
NOT_HERE = {"l7"}


# --- JSON <-> the probes' rows and state ----------------------------------------------

def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _s(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _ctx(case: dict):
    from sonde.ingest.runtime.cardinality import SeriesBudget
    from sonde.ingest.runtime.decode import Context

    c = case.get("context", {})
    return Context(c.get("host", "h"), c.get("ts", 1_000_000_000), c.get("max_processes", 200),
                   c.get("max_peers", 20), SeriesBudget(c.get("max_series", 1_000_000), 3600))


def _slots(sparse: dict, n: int) -> list[int]:
    out = [0] * n
    for s, c in sparse.items():
        out[int(s)] = c
    return out


def _sparse(values) -> dict:
    return {str(i): v for i, v in enumerate(values) if v}


def process_io(case: dict) -> dict:
    from sonde.bpf.process_io.probe import PROBE

    m = PROBE.maps[0]
    prev = {int(t): tuple(v) for t, v in case["state"].items()}
    rows = [(tgid, name, tuple(values), exited) for tgid, name, values, exited in case["rows"]]
    points, new = m.decode(rows, prev, _ctx(case))
    return {"points": points, "state": {str(t): list(v) for t, v in sorted(new.items())}}


def sched_cpu(case: dict) -> dict:
    from sonde.bpf.sched_cpu.probe import decode
    from sonde.ingest.runtime.hist import SLOTS

    def values(v: dict) -> tuple:
        return (v["sum_us"], *_slots(v["slots"], SLOTS))

    prev = {int(t): values(v) for t, v in case["state"].items()}
    rows = [(r["tgid"], r["name"], r["exited"], values(r)) for r in case["rows"]]
    points, new = decode(rows, prev, _ctx(case))
    return {"points": points, "state": {str(t): {"sum_us": v[0], "slots": _sparse(v[1:])}
                                        for t, v in sorted(new.items())}}


def block_io(case: dict) -> dict:
    from sonde.bpf.block_io.probe import COUNTERS, SLOTS, State, decode

    def values(v: dict) -> tuple:
        return (*v["counters"], *v["sums_ns"], *(c for kind in v["slots"] for c in _slots(kind, SLOTS)))

    def back(v: tuple) -> dict:
        n = len(COUNTERS)
        return {"counters": list(v[:n]), "sums_ns": list(v[n:n + 3]),
                "slots": [_sparse(v[n + 3 + k * SLOTS:n + 3 + (k + 1) * SLOTS]) for k in range(3)]}

    st = case["state"]
    state = State({(dev, op): values(v) for dev, op, v in st["io"]},
                  {k: tuple(v) for k, v in st["diskstats"].items()}, st["at_ns"])
    rows = [(dev, op, values(v)) for dev, op, v in case["rows"]]
    whole = set(case["whole"]) if case.get("whole") is not None else None
    points, new = decode(rows, {int(d): n for d, n in case["disks"].items()},
                         {k: tuple(v) for k, v in case["diskstats"].items()}, whole, case["at_ns"], state, _ctx(case))
    return {"points": points, "state": {"io": [[dev, op, back(v)] for (dev, op), v in sorted(new.io.items())],
                                        "diskstats": {k: list(v) for k, v in sorted(new.diskstats.items())},
                                        "at_ns": new.at_ns}}


def oom(case: dict) -> dict:
    from sonde.bpf.oom.probe import decode, kill_point

    ctx = _ctx(case)
    last_ts = dict(case["state"]["last_ts"])
    events = []
    for k in case["kills"]:
        point, last_ts = kill_point(dict(k, comm=_b(k["comm"])), k["cgroup"], k["ts"], last_ts, ctx.host)
        events.append(point)
    points, kills = decode(events, case["lost"], case["kills_total"], case["state"]["prev_kills"], ctx)
    return {"points": points, "state": {"prev_kills": kills, "last_ts": dict(sorted(last_ts.items()))}}


def profile(case: dict) -> dict:
    from sonde.bpf.profile.probe import choose, decode

    ctx = _ctx(case)
    procs = [(tgid, name, [(n, (n, tuple(frames), why, lost)) for n, frames, why, lost in stacks])
             for tgid, name, stacks in case["procs"]]
    keep, rest = choose(procs, ctx)
    # the agent symbolises the kept processes' rows here; these rows come symbolised
    return {"points": decode([(tgid, name, [r for _, r in rows]) for tgid, name, rows in keep], rest, ctx),
            "state": None}


def cpu(case: dict) -> dict:
    from sonde.bpf.cpu.probe import Sample, State, ZOMBIE, _Proc, _Thread, decode

    def proc(d: dict) -> _Proc:
        return _Proc(d["clock"], d["start"], d["listed"], d["created"],
                     {int(t): _Thread(tuple(c), g) for t, (c, g) in d["threads"].items()}, set(d["dead_tids"]),
                     tuple(d["pending"]), d["leader_exited"], _b(d["comm"]), _b(d["last_comm"]), d["busiest"],
                     d["pending_busiest"])

    def back(p: _Proc) -> dict:
        return {"clock": p.clock, "start": p.start, "listed": p.listed, "created": p.created,
                "threads": {str(t): [list(th.counters), th.gone] for t, th in sorted(p.threads.items())},
                "dead_tids": sorted(p.dead_tids), "pending": list(p.pending), "leader_exited": p.leader_exited,
                "comm": _s(p.comm), "last_comm": _s(p.last_comm), "busiest": p.busiest,
                "pending_busiest": p.pending_busiest}

    def task(t):
        return tuple(t) if isinstance(t, list) else t

    st = case["state"]
    state = State({int(t): proc(p) for t, p in st["procs"].items()}, st["gen"], st["last_ts"])
    records = [(tid, tgid, _b(comm), tuple(final)) for tid, tgid, comm, final in case["records"]]
    samples = {int(t): Sample(s.get("start"), s.get("clock"),
                              None if s.get("tasks") is None else {int(k): task(v) for k, v in s["tasks"].items()},
                              None if s.get("comm") is None else _b(s["comm"]))
               for t, s in case["samples"].items()}
    assert ZOMBIE == "zombie"
    points, new = decode(records, samples, state, _ctx(case))
    return {"points": points, "state": {"procs": {str(t): back(p) for t, p in sorted(new.procs.items())},
                                        "gen": new.gen, "last_ts": new.last_ts}}


def tcp(case: dict) -> dict:
    from sonde.bpf.tcp.probe import Known, Rows, State, decode

    def fk(j: list) -> tuple:
        tgid, role, family, port, addr = j
        return (tgid, role, family, port, bytes.fromhex(addr).ljust(16, b"\0"))

    def jfk(k: tuple) -> list:
        return [*k[:4], k[4].hex()]

    def maprows(rs: list, key) -> list:
        return [(key(k), _b(comm), None if v is None else tuple(v)) for k, comm, v in rs]

    def agg_key(k):
        return fk(k)

    def hist_key(k):
        return (fk(k[0]), k[1])

    def reason_key(k):
        return tuple(k)

    r = case["rows"]
    rows = Rows(closed=[(c, tuple(v)) for c, v in r.get("closed", [])],
                socks=[(c, st, tuple(now), tuple(sample)) for c, st, now, sample in r.get("socks", [])],
                present=set(r.get("present", [])), states=[tuple(s) for s in r.get("states", [])],
                comms={int(t): None if c is None else _b(c) for t, c in r.get("comms", {}).items()},
                reason_names={int(k): v for k, v in r.get("reason_names", {}).items()})
    for name, key in (("agg", agg_key), ("hists", hist_key), ("reasons", reason_key)):
        for part in ("", "_popped", "_carried"):
            setattr(rows, name + part, maprows(r.get(name + part, []), key))
    st = case["state"]
    state = State({fk(k): tuple(v) for k, v in st.get("agg", [])},
                  {(fk(k), ks): tuple(v) for k, ks, v in st.get("hists", [])},
                  {tuple(k): tuple(v) for k, v in st.get("reasons", [])},
                  {int(c): Known(fk(k["fk"]), tuple(k["base"]), k["flagged"], k["client"], _b(k["comm"]),
                                 k.get("misses", 0), k.get("opening", False)) for c, k in st.get("known", {}).items()},
                  {fk(k): tuple(v) for k, v in st.get("debt", [])})
    points, new = decode(rows, state, _ctx(case))
    return {"points": points, "state": {
        "agg": [[jfk(k), list(v)] for k, v in sorted(new.agg.items())],
        "hists": [[jfk(k), ks, list(v)] for (k, ks), v in sorted(new.hists.items())],
        "reasons": [[list(k), list(v)] for k, v in sorted(new.reasons.items())],
        "known": {str(c): {"fk": jfk(k.fk), "base": list(k.base), "flagged": k.flagged, "client": k.client,
                           "comm": _s(k.comm), "misses": k.misses, "opening": k.opening}
                  for c, k in sorted(new.known.items())},
        "debt": [[jfk(k), list(v)] for k, v in sorted(new.debt.items())]}}


DECODERS = {"process_io": process_io, "sched_cpu": sched_cpu, "block_io": block_io, "oom": oom,
            "profile": profile, "cpu": cpu, "tcp": tcp}


# --- running the cases ----------------------------------------------------------------

def cases() -> list[Path]:
    return sorted(GOLDEN.glob("*/*.json"))


def run(path: Path) -> tuple[dict, dict]:
    """(what decode returns now, what the file expects), both as JSON values."""
    from sonde.ingest.output.lineproto import encode

    case = json.loads(path.read_text())
    got = DECODERS[path.parent.name](case["input"])
    got = {"points": [encode(p) for p in got["points"]], "state": got["state"]}
    return json.loads(json.dumps(got)), case.get("expected")


def write(path: Path, got: dict) -> None:
    case = json.loads(path.read_text())
    case["expected"] = got
    path.write_text(json.dumps(case, indent=1, ensure_ascii=True) + "\n")


def main() -> int:
    """Every case, without pytest: the number of mismatches (each printed)."""
    bad = 0
    for path in cases():
        got, want = run(path)
        if got != want:
            bad += 1
            print(f"MISMATCH {path.relative_to(GOLDEN)}")
    if any(m.split(".")[0] == "bcc" for m, mod in sys.modules.items() if mod is not None):
        print("bcc was imported")
        bad += 1
    print(f"{len(cases())} golden cases, {bad} mismatched")
    return bad


if __name__ == "__main__":
    sys.exit(1 if main() else 0)


# --- the tests --------------------------------------------------------------------------

import pytest  # noqa: E402  (after main: `python tests/test_golden.py` needs no pytest)

from conftest import need  # noqa: E402


@pytest.mark.layout
@pytest.mark.parametrize("path", cases(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_golden(path):
    got, want = run(path)
    if WRITE:
        write(path, got)
        return
    assert want is not None, f"{path} has no expected half: run SONDE_GOLDEN_WRITE=1 pytest {__file__}"
    assert got["points"] == want["points"]
    assert got["state"] == want["state"]


@pytest.mark.layout
def test_every_probe_has_golden_cases_with_an_edge():
    """At least two cases per probe (l7 excepted: event decoding, tested on its parsers)."""
    from sonde.ingest.runtime.probe import discover

    have = {}
    for path in cases():
        have.setdefault(path.parent.name, []).append(json.loads(path.read_text()))
    for name in sorted(set(discover()) - NOT_HERE):
        assert len(have.get(name, [])) >= 2, f"probe {name}: fewer than two golden cases in tests/golden/{name}/"
        assert any(c.get("edge") for c in have[name]), f"probe {name}: no golden case marked as an edge"


@pytest.mark.layout
def test_golden_cases_run_as_nobody_without_bcc():
    """The decode steps import no bcc and need no root: every case, run as `nobody` in
    a fresh interpreter where importing bcc fails."""
    need(os.geteuid() == 0, "root, to drop to nobody")
    need(subprocess.run(["id", "nobody"], capture_output=True).returncode == 0, "a user nobody")
    code = "import runpy, sys; sys.modules['bcc'] = None; runpy.run_path(sys.argv[1], run_name='__main__')"
    out = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
                          sys.executable, "-c", code, __file__],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
                         cwd="/")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(cases())} golden cases, 0 mismatched" in out.stdout
