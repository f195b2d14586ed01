#!/usr/bin/env python3
"""Print every bench/results/*.json as one Markdown table.

    python3 bench/table.py                          # print the table
    python3 bench/table.py --update-readme FILE     # replace the text between
                                                    # <!-- bench:start --> and <!-- bench:end --> in FILE

Result files of other shapes are tolerated: a cell whose key is missing is blank.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
COLUMNS = ("name", "what", "runs", "baseline median", "agent median", "unit", "loss % (95 % CI)",
           "BPF in kernel", "agent CPU %", "agent RSS MB", "command")
NUMERIC = ("runs", "baseline median", "agent median", "loss % (95 % CI)", "agent CPU %", "agent RSS MB")


def _num(v, digits: int = 2) -> str:
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    s = f"{v:.{digits}f}"
    return s.rstrip("0").rstrip(".") if "." in s else s


def _cell(v) -> str:
    s = v if isinstance(v, str) else _num(v) if isinstance(v, (int, float)) or v is None else json.dumps(v)
    return " ".join(s.split()).replace("|", "\\|")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _interval(ci) -> str:
    """' (lo–hi)' from a [lo, hi] pair, else ''."""
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_num(x) for x in ci):
        sep = "–" if ci[0] >= 0 else " to "  # an en dash after a minus sign reads badly
        return f" ({ci[0]:.2f}{sep}{ci[1]:.2f})"
    return ""


def _loss(data: dict) -> str:
    """The loss in %, with its 95 % interval when the result has one: `1.20 (0.40–2.00)`."""
    loss = data.get("loss_pct")
    if not _is_num(loss):
        return _cell(loss)
    pairs = data.get("pair_median_loss_pct")
    pairs = f"; median of pairs {pairs:.2f}" if _is_num(pairs) else ""
    if _is_num(data.get("total_loss_pct")) and _is_num(data.get("bpf_cost_pct")):  # bench/resident_ab.py
        return (f"{data['total_loss_pct']:.2f}: A/B {loss:.2f}{_interval(data.get('loss_pct_ci95'))}{pairs} "
                f"+ BPF {data['bpf_cost_pct']:.3f}")
    return f"{loss:.2f}{_interval(data.get('loss_pct_ci95'))}{pairs}"


def _bpf(data: dict) -> str:
    """What the kernel counted for BPF programs, with its unit: per request (bench/ab.py),
    per socket event and per connection for the agent arm (bench/event_cost.py)."""
    if _is_num(data.get("bpf_ns_per_request")):
        return (f"{_num(data.get('bpf_runs_per_request'), 4)} runs, {_num(data['bpf_ns_per_request'], 1)} ns "
                f"per request")
    for unit, name in (("connection", "connection"), ("io", "I/O")):  # bench/hook_toggle.py, bench/fio_toggle.py
        if _is_num(data.get(f"bpf_ns_per_{unit}")):
            return (f"{_num(data.get(f'bpf_runs_per_{unit}'), 4)} runs, {_num(data[f'bpf_ns_per_{unit}'], 1)} ns "
                    f"per {name}")
    if _is_num(data.get("bpf_ns_per_run")) and _is_num(data.get("samples_per_second")):  # bench/profile_ab.py
        return (f"{_num(data['samples_per_second'], 1)} samples/s, {_num(data['bpf_ns_per_run'], 0)} ns per "
                f"sample; poll {_num(data.get('poll_cpu_pct_of_machine'), 3)} % of the machine")
    arm = data.get("agent_arm")
    ns, runs = data.get("bpf_ns_per_event"), data.get("bpf_runs_per_event")
    if arm and isinstance(ns, dict) and _is_num(ns.get(arm)):
        out = f"{arm}: {_num((runs or {}).get(arm), 4)} runs, {_num(ns[arm], 1)} ns per socket event"
        conn = data.get("per_connection") or {}
        cns, cruns = conn.get("bpf_ns_per_connection"), conn.get("bpf_runs_per_connection")
        if isinstance(cns, dict) and _is_num(cns.get(arm)):
            out += f"; {_num((cruns or {}).get(arm), 4)} runs, {_num(cns[arm], 1)} ns per connection"
        return out
    return ""


def _code(s: str) -> str:
    return f"`{s}`" if s and "`" not in s else s


def row(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [path.stem, f"unreadable: {type(e).__name__}"] + [""] * (len(COLUMNS) - 2)
    if not isinstance(data, dict):
        return [path.stem, f"not a JSON object ({type(data).__name__})"] + [""] * (len(COLUMNS) - 2)

    what = data.get("what") or data.get("description") or ""
    if not what and data.get("probes"):
        probes = data["probes"]
        what = "probes: " + (", ".join(map(str, probes)) if isinstance(probes, list) else str(probes))
    unit = data.get("unit", "")
    # Single-arm results (e.g. median_s): no baseline/agent, so say the median in `what`.
    if "baseline_median" not in data and "agent_median" not in data:
        keys = [k for k in data if (k == "median" or k.startswith("median_")) and not k.endswith("_ci95")]
        # the median in the result's unit first (median_s when unit is "s"), then "median", then any
        keys.sort(key=lambda k: (k != f"median_{unit}", k != "median", k))
        if keys:
            key = keys[0]
            suffix = key[len("median_"):] if key.startswith("median_") else ""
            unit = unit or suffix
            ci = _interval(data.get(f"{key}_ci95"))
            what = f"{what} (median {_num(data[key], 3)}{' ' + suffix if suffix else ''}{ci})".strip()
    cpu = data.get("agent_cpu_pct_median", data.get("agent_cpu_pct"))
    rss = data.get("agent_rss_mb_max", data.get("agent_rss_mb"))
    return [
        _cell(data.get("name", path.stem)),
        _cell(what),
        _cell(data.get("runs")),
        _cell(data.get("baseline_median")),
        _cell(data.get("agent_median")),
        _cell(unit),
        _cell(_loss(data)),
        _cell(_bpf(data)),
        _cell(cpu),
        _cell(rss),
        _code(_cell(data.get("command", ""))),
    ]


def table(results_dir: Path = RESULTS_DIR) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "| " + " | ".join("---:" if c in NUMERIC else "---" for c in COLUMNS) + " |"]
    files = sorted(results_dir.glob("*.json"))
    for path in files:
        lines.append("| " + " | ".join(row(path)) + " |")
    if not files:
        lines.append("| " + " | ".join(["(no results yet)"] + [""] * (len(COLUMNS) - 1)) + " |")
    return "\n".join(lines) + "\n"


def update(path: Path, text: str) -> str | None:
    """Replace what is between the markers; returns a one-line problem, or None."""
    try:
        doc = path.read_text()
    except OSError as e:
        return f"{path}: cannot read: {e.strerror}"
    i, j = doc.find(START), doc.find(END)
    if i < 0 or j < 0 or j < i:
        return f"{path}: markers {START} ... {END} not found (in that order); file left unchanged"
    new = doc[:i + len(START)] + "\n" + text + doc[j:]
    if new != doc:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(new)
            os.chmod(tmp, path.stat().st_mode & 0o7777)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Markdown table of bench/results/*.json")
    ap.add_argument("--update-readme", metavar="FILE", type=Path,
                    help=f"replace the text between {START} and {END} in FILE with the table")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR, help="results dir (default bench/results)")
    args = ap.parse_args(argv)
    text = table(args.results)
    if args.update_readme:
        problem = update(args.update_readme, text)
        if problem:
            print(f"table: {problem}", file=sys.stderr)
            return 1
        print(f"table: updated {args.update_readme}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
