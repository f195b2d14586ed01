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
COLUMNS = ("name", "what", "runs", "baseline median", "agent median", "unit", "loss %",
           "agent CPU %", "agent RSS MB", "command")


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
        for key in sorted(data):
            if key == "median" or key.startswith("median_"):
                suffix = key[len("median_"):] if key.startswith("median_") else ""
                unit = unit or suffix
                what = f"{what} (median {_num(data[key], 3)}{' ' + suffix if suffix else ''})".strip()
                break
    loss = data.get("loss_pct")
    cpu = data.get("agent_cpu_pct_median", data.get("agent_cpu_pct"))
    rss = data.get("agent_rss_mb_max", data.get("agent_rss_mb"))
    return [
        _cell(data.get("name", path.stem)),
        _cell(what),
        _cell(data.get("runs")),
        _cell(data.get("baseline_median")),
        _cell(data.get("agent_median")),
        _cell(unit),
        _cell(f"{loss:.2f}" if isinstance(loss, (int, float)) and not isinstance(loss, bool) else loss),
        _cell(cpu),
        _cell(rss),
        _code(_cell(data.get("command", ""))),
    ]


def table(results_dir: Path = RESULTS_DIR) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "| " + " | ".join("---:" if c in ("runs", "baseline median", "agent median", "loss %", "agent CPU %",
                                               "agent RSS MB") else "---" for c in COLUMNS) + " |"]
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
