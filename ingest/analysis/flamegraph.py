"""Flame graph outputs from stacks: folded text, speedscope JSON and an SVG.

Pure functions of `{(frame, ..., frame): weight}` with frames root first. The SVG is
drawn here (the classic flamegraph.pl is Perl): frames as nested rectangles, widest
at the bottom, each with a tooltip; a small script gives click-to-zoom and a regex
search that highlights matches and prints the share they cover, like the classic one.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

Stacks = dict[tuple[str, ...], int]

WIDTH = 1200
FRAME_H = 16
PAD_TOP = 54
PAD_BOTTOM = 28
SIDE = 10
FONT = 12
CHAR_W = 7.0  # average glyph width of the 12 px monospace font, for clipping labels
MIN_W = 0.1   # frames narrower than this many pixels are not drawn (their weight still counts)


def folded(stacks: Stacks) -> str:
    """One `frame;frame;frame weight` line per stack (Brendan Gregg's folded format)."""
    return "".join(f"{';'.join(f.replace(';', ':') for f in frames)} {w}\n"
                   for frames, w in sorted(stacks.items()) if w > 0 and frames)


def parse_folded(text: str) -> Stacks:
    out: Stacks = {}
    for line in text.splitlines():
        head, _, w = line.rpartition(" ")
        if head:
            key = tuple(head.split(";"))
            out[key] = out.get(key, 0) + int(w)
    return out


def speedscope(stacks: Stacks, name: str, unit: str = "none") -> dict:
    """A speedscope file (https://www.speedscope.app/file-format-schema.json), one
    sampled profile; unit "none" for sample counts, "microseconds" for time."""
    index: dict[str, int] = {}
    samples, weights = [], []
    for frames, w in sorted(stacks.items()):
        if w <= 0 or not frames:
            continue
        samples.append([index.setdefault(f, len(index)) for f in frames])
        weights.append(w)
    total = sum(weights)
    return {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "shared": {"frames": [{"name": f} for f in index]},
        "profiles": [{"type": "sampled", "name": name, "unit": unit, "startValue": 0, "endValue": total,
                      "samples": samples, "weights": weights}],
        "name": name,
        "activeProfileIndex": 0,
        "exporter": "sonde profile",
    }


@dataclass
class Node:
    name: str
    value: int = 0
    children: dict[str, "Node"] = field(default_factory=dict)


def tree(stacks: Stacks) -> Node:
    root = Node("all")
    for frames, w in stacks.items():
        if w <= 0:
            continue
        root.value += w
        node = root
        for f in frames:
            node = node.children.setdefault(f, Node(f))
            node.value += w
    return root


def _color(name: str) -> str:
    h = int(hashlib.md5(name.encode()).hexdigest()[:6], 16)
    a, b, c = h & 0xFF, (h >> 8) & 0xFF, (h >> 16) & 0xFF
    if name.startswith("["):                      # markers: truncated, lost, unknown
        return "rgb(190,190,190)"
    if name.endswith("_[k]"):                     # kernel
        return f"rgb({200 + a % 55},{90 + b % 60},{30 + c % 30})"
    if name.endswith("_[j]"):                     # JIT (Java)
        return f"rgb({50 + a % 50},{170 + b % 60},{50 + c % 50})"
    return f"rgb({205 + a % 50},{80 + b % 130},{40 + c % 40})"  # user code: the classic warm palette


def _label(name: str, width: float) -> str:
    chars = int((width - 6) / CHAR_W)
    if chars < 3:
        return ""
    return name if len(name) <= chars else name[: chars - 2] + ".."


def svg(stacks: Stacks, title: str, unit: str = "samples", notes: list[str] | None = None) -> str:
    """The flame graph as one self-contained SVG document."""
    root = tree(stacks)
    total = root.value
    depth = _depth(root)
    notes = notes or []
    height = PAD_TOP + (depth + 1) * FRAME_H + PAD_BOTTOM + FRAME_H * len(notes)
    scale = (WIDTH - 2 * SIDE) / total if total else 0.0
    out = [
        f'<?xml version="1.0" standalone="no"?>',
        f'<svg version="1.1" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
        f'xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'data-total="{total}" data-unit="{escape(unit)}" onload="init(evt)">',
        '<style type="text/css">text { font-family: monospace; font-size: 12px; fill: rgb(0,0,0); } '
        '.f:hover { stroke: black; stroke-width: 0.5; cursor: pointer; } '
        '#title { font-size: 17px; text-anchor: middle; } .ui { cursor: pointer; fill: rgb(60,60,160); }</style>',
        f'<script type="text/ecmascript"><![CDATA[{_SCRIPT}]]></script>',
        f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="rgb(248,248,240)"/>',
        f'<text id="title" x="{WIDTH / 2}" y="24">{escape(title)}</text>',
        f'<text id="reset" class="ui" x="{SIDE}" y="24" style="opacity:0">Reset Zoom</text>',
        f'<text id="search" class="ui" x="{WIDTH - SIDE - 60}" y="24">Search</text>',
        f'<text id="matched" x="{WIDTH - SIDE - 160}" y="{PAD_TOP + (depth + 1) * FRAME_H + 18}"></text>',
        f'<text id="details" x="{SIDE}" y="{PAD_TOP + (depth + 1) * FRAME_H + 18}"> </text>',
        '<g id="frames">',
    ]
    bottom = PAD_TOP + depth * FRAME_H

    def draw(node: Node, x_units: int, level: int) -> None:
        w = node.value * scale
        if w < MIN_W:
            return
        x = SIDE + x_units * scale
        y = bottom - level * FRAME_H
        pct = 100.0 * node.value / total
        tip = f"{node.name} ({node.value:,} {unit}, {pct:.2f}%)"
        out.append(
            f'<g class="f" data-x="{x_units}" data-w="{node.value}" data-d="{level}">'
            f'<title>{escape(tip)}</title>'
            f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{FRAME_H - 1}" rx="2" ry="2" '
            f'fill="{_color(node.name)}"/>'
            f'<text x="{x + 3:.2f}" y="{y + FRAME_H - 4}">{escape(_label(node.name, w))}</text></g>')
        offset = x_units
        for child in sorted(node.children.values(), key=lambda n: n.name):
            draw(child, offset, level + 1)
            offset += child.value

    if total:
        draw(root, 0, 0)
    out.append("</g>")
    y = PAD_TOP + (depth + 1) * FRAME_H + 18 + FRAME_H
    for line in notes:
        out.append(f'<text class="note" x="{SIDE}" y="{y}">{escape(line)}</text>')
        y += FRAME_H
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _depth(node: Node) -> int:
    return 1 + max((_depth(c) for c in node.children.values()), default=-1) if node.children else 0


# Click a frame to zoom into it (its ancestors span the width, unrelated frames hide);
# "Search" takes a regex, highlights matching frames and prints the share of all
# weight under them (overlaps counted once). Frame geometry comes from data-x/w/d in
# the document's own units, so zooming rescales without rounding drift.
_SCRIPT = r"""
var svg, frames, total, side = 10, width = 0, matchedtxt, details, resetbtn, unit;
function init(evt) {
  svg = document.documentElement; width = +svg.getAttribute("width");
  total = +svg.getAttribute("data-total"); unit = svg.getAttribute("data-unit");
  frames = Array.prototype.slice.call(document.querySelectorAll("g.f"));
  matchedtxt = document.getElementById("matched"); details = document.getElementById("details");
  resetbtn = document.getElementById("reset");
  document.getElementById("search").addEventListener("click", search_prompt);
  resetbtn.addEventListener("click", function () { zoom(null); });
  frames.forEach(function (g) {
    g.addEventListener("click", function () { zoom(g); });
    g.addEventListener("mouseover", function () { details.textContent = g.querySelector("title").textContent; });
    g.addEventListener("mouseout", function () { details.textContent = " "; });
  });
  window.addEventListener("keydown", function (e) {
    if (e.ctrlKey && e.key === "f") { e.preventDefault(); search_prompt(); }
  });
}
function place(g, x0, span) {
  var r = g.querySelector("rect"), t = g.querySelector("text");
  var name = g.querySelector("title").textContent.replace(/ \([^(]*\)$/, "");
  var s = (width - 2 * side) / span, x = side + (+g.getAttribute("data-x") - x0) * s;
  var w = +g.getAttribute("data-w") * s;
  r.setAttribute("x", x.toFixed(2)); r.setAttribute("width", w.toFixed(2));
  t.setAttribute("x", (x + 3).toFixed(2));
  var chars = Math.floor((w - 6) / 7);
  t.textContent = chars < 3 ? "" : (name.length <= chars ? name : name.substring(0, chars - 2) + "..");
}
function zoom(target) {
  var x0 = 0, span = total, d0 = 0;
  if (target) { x0 = +target.getAttribute("data-x"); span = +target.getAttribute("data-w"); d0 = +target.getAttribute("data-d"); }
  resetbtn.style.opacity = target ? 1 : 0;
  frames.forEach(function (g) {
    var x = +g.getAttribute("data-x"), w = +g.getAttribute("data-w"), d = +g.getAttribute("data-d");
    var inside = x >= x0 && x + w <= x0 + span && d >= d0, above = d < d0 && x <= x0 && x + w >= x0 + span;
    if (!target || inside) { g.style.display = ""; place(g, x0, span); }
    else if (above) { g.style.display = ""; place(g, x0, span); g.querySelector("rect").setAttribute("width", (width - 2 * side).toFixed(2)); g.querySelector("rect").setAttribute("x", side); }
    else { g.style.display = "none"; }
  });
}
function search_prompt() {
  var term = prompt("Search for (regular expression):", "");
  if (term !== null) search(term);
}
function search(term) {
  var re = term ? new RegExp(term) : null, spans = [];
  frames.forEach(function (g) {
    var r = g.querySelector("rect"), name = g.querySelector("title").textContent.replace(/ \([^(]*\)$/, "");
    if (!r.hasAttribute("data-fill")) r.setAttribute("data-fill", r.getAttribute("fill"));
    if (re && re.test(name)) { r.setAttribute("fill", "rgb(230,0,230)"); spans.push([+g.getAttribute("data-x"), +g.getAttribute("data-w")]); }
    else r.setAttribute("fill", r.getAttribute("data-fill"));
  });
  spans.sort(function (a, b) { return a[0] - b[0]; });
  var covered = 0, end = -1;
  spans.forEach(function (s) {
    var a = Math.max(s[0], end), b = s[0] + s[1];
    if (b > a) { covered += b - a; end = b; }
  });
  matchedtxt.textContent = re ? "Matched: " + (100 * covered / total).toFixed(1) + "%" : "";
  return covered;
}
"""
