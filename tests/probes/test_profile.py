"""Probe profile and `sonde profile`: stacks a person can read, with shares that match
the program's design and an independent profiler (perf record -g), off-CPU time that
matches the sleeps a program made, honest stacks where a walk cannot be trusted, and
flame graph files that hold together.

The C and Java programs are in tests/profiling/ and are built in a temporary
directory at test time."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import REPO, drain, need, select, wait_until

from sonde.bpf.profile import symbols
from sonde.bpf.profile.probe import StackRow, Symbolizer, folded_text, leaf_function
from sonde.ingest.analysis import flamegraph

pytestmark = [pytest.mark.profiling]

SOURCES = REPO / "tests" / "profiling"
SVG_NS = "{http://www.w3.org/2000/svg}"


# --- pure: parsers and the trust rule, on literal data ----------------------------------

MAPS = """\
55d1c0a00000-55d1c0a01000 r--p 00000000 fe:01 1311                       /tmp/x/shares
55d1c0a01000-55d1c0a02000 r-xp 00001000 fe:01 1311                       /tmp/x/shares
7f3a1c028000-7f3a1c1bd000 r-xp 00028000 fe:01 2490                       /usr/lib/x86_64-linux-gnu/libc.so.6
7f3a1c400000-7f3a1c410000 rwxp 00000000 00:00 0
7f3a1c500000-7f3a1c501000 r-xp 00001000 fe:01 99                         /tmp/gone/victim (deleted)
7ffd5e3f1000-7ffd5e3f3000 r-xp 00000000 00:00 0                          [vdso]
"""


def test_maps_parse_paths_permissions_and_deleted_files():
    maps = symbols.parse_maps(MAPS)
    assert [m.path for m in maps] == ["/tmp/x/shares", "/tmp/x/shares", "/usr/lib/x86_64-linux-gnu/libc.so.6", "",
                                      "/tmp/gone/victim", "[vdso]"]
    assert [m.executable for m in maps] == [False, True, True, True, True, True]
    assert maps[1].offset == 0x1000 and maps[1].start == 0x55d1c0a01000 and maps[1].inode == 1311
    assert maps[4].deleted and maps[4].name == "victim" and not maps[1].deleted
    assert maps[3].name == "[anon]" and maps[5].name == "[vdso]"


def test_symbols_cover_only_their_own_size():
    table = symbols.SymbolTable([(0x1000, 0x20, "a"), (0x1100, 0x10, "b"), (0x1000, 0x400, "outer")])
    assert table.lookup(0x1000) in (("a", 0), ("outer", 0))
    assert table.lookup(0x101f)[1] == 0x1f
    assert table.lookup(0x1105) == ("b", 5)
    assert table.lookup(0x1200) == ("outer", 0x200)   # inside only the long one
    assert table.lookup(0x1400) is None                 # past every symbol's end: no name, never the nearest
    assert table.lookup(0xfff) is None


def test_kallsyms_and_perf_map_parse():
    k = symbols.parse_kallsyms("ffffffff81000000 T _stext\nffffffff81000100 t do_nanosleep\n"
                               "ffffffff81000200 D some_data\nffffffff81000300 T hrtimer_nanosleep\n"
                               "0000000000000000 T hidden\n")
    assert k.lookup(0xffffffff81000150) == ("do_nanosleep", 0x50)
    assert k.lookup(0xffffffff81000250)[0] == "do_nanosleep"  # data symbols are not code boundaries
    assert k.lookup(0xffffffff81000300) == ("hrtimer_nanosleep", 0)
    jit = symbols.parse_perf_map("0x00007f8f7c4a1200 0x0000000000000120 void Shares.hotSeventy()\n"
                                 "7f8f7c4a1400 80 Interpreter\nnot a line\n")
    assert jit.lookup(0x7f8f7c4a1210) == ("void Shares.hotSeventy()", 0x10)
    assert jit.lookup(0x7f8f7c4a1320) is None
    assert jit.lookup(0x7f8f7c4a147f) == ("Interpreter", 0x7f)


def test_vdso_frames_are_named_from_the_image_in_memory():
    ps = symbols.ProcessSymbols(Path("/proc"), os.getpid(), symbols.ElfCache())
    assert ps.refresh()
    vdso = next(m for m in ps.maps if m.path == "[vdso]")
    names = {ps.frame(a).name for a in range(vdso.start, vdso.end, 16)}
    assert {"clock_gettime", "gettimeofday"} <= names, names   # what glibc calls for the time


def fake_process(maps: str, elves: dict[str, symbols.ElfInfo]) -> symbols.ProcessSymbols:
    class Elves:
        def get(self, path):
            return elves[str(path).split("/")[-1]]
    ps = symbols.ProcessSymbols(Path("/nonexistent"), 7, Elves())
    ps.maps = [m for m in symbols.parse_maps(maps) if m.executable]
    ps._starts = [m.start for m in ps.maps]
    return ps


def elf(rows, fp, frameless=()):
    return symbols.ElfInfo(symbols.SymbolTable(rows), [(0, 0, 1 << 40)], False, fp, frameless=frozenset(frameless))


def test_a_stack_walked_to_its_start_is_trusted_and_one_that_is_not_is_cut_with_a_marker():
    maps = ("1000-2000 r-xp 00001000 fe:01 1 /bin/prog\n"
            "10000-20000 r-xp 00000000 fe:01 2 /lib/libc.so.6\n"
            "30000-40000 r-xp 00000000 fe:01 3 /usr/bin/python3.11\n")
    prog = elf([(0x1100, 0x40, "c"), (0x1200, 0x40, "b"), (0x1300, 0x40, "a"), (0x1400, 0x80, "main")], True)
    libc = elf([(0x100, 0x80, "write")], False)
    py = elf([(0x500, 0x100, "PyEval_EvalFrameDefault")], False)
    ps = fake_process(maps, {"prog": prog, "libc.so.6": libc, "python3.11": py})
    # A frame-pointer chain from c up to main and into libc's start code (unnamed, static).
    full = ps.resolve([0x1110, 0x1210, 0x1310, 0x1410, 0x12345, 0xdeadbeef])
    assert full.frames == ["c", "b", "a", "main", "libc.so.6+0x2345"] and not full.truncated
    # The interpreter has no frame pointers: what its rbp "chain" gives is not shown.
    cut = ps.resolve([0x30510, 0x1210, 0x30777])
    assert cut.frames == ["PyEval_EvalFrameDefault"] and cut.truncated == "python3.11 has no frame pointers"
    # An address in no mapping ends the trusted part.
    lost = ps.resolve([0x1110, 0x99999999, 0x1410])
    assert lost.frames == ["c"] and "no mapping" in lost.truncated
    # A leaf that sets up no frame (glibc's syscall wrappers, GCC 12's frameless leaves)
    # leaves rbp at its caller's frame: the caller is missing, and a marker says so.
    ps = fake_process(maps, {"prog": prog, "libc.so.6": elf([(0x100, 0x80, "write")], False, {0x100}),
                             "python3.11": py})
    skipped = ps.resolve([0x10110, 0x1310, 0x1410, 0x12345])
    assert skipped.frames == ["write", "[caller unknown: write sets up no frame pointer]", "a", "main",
                              "libc.so.6+0x2345"] and not skipped.truncated


def test_symbolizer_puts_kernel_frames_above_user_frames_and_marks_truncation():
    sym = Symbolizer.__new__(Symbolizer)
    sym.kernel = symbols.KernelSymbols(symbols.parse_kallsyms("ffffffff81000000 T do_nanosleep\n"
                                                              "ffffffff81000100 T hrtimer_nanosleep\n"))
    maps = "1000-2000 r-xp 00001000 fe:01 1 /bin/prog\n10000-20000 r-xp 00000000 fe:01 2 /lib/libc.so.6\n"
    sym.processes = {7: fake_process(maps, {"prog": elf([(0x1100, 0x40, "c"), (0x1400, 0x80, "main")], False),
                                            "libc.so.6": elf([], False)})}
    frames, why, lost = sym.frames(StackRow(7, b"p", (0x1110, 0x1410, 0x10010), (0xffffffff81000010,
                                                                                 0xffffffff81000110), 3))
    assert frames == ("libc.so.6+0x10", "main", "c", "hrtimer_nanosleep_[k]", "do_nanosleep_[k]") and not why
    frames, why, _ = sym.frames(StackRow(7, b"p", (0x1110, 0x1333), -14, 1))
    assert frames == ("[truncated: prog has no frame pointers]", "c") and why
    frames, _, lost = sym.frames(StackRow(7, b"p", -17, -14, 1))
    assert frames == ("[stack lost: hash bucket taken]",) and lost
    assert leaf_function(("[truncated: x]", "main", "c", "do_nanosleep_[k]")) == "c"
    assert folded_text(tuple(f"f{i}" for i in range(1000)), 60).startswith("...;")


def test_python_line_table_decodes_like_cpython_itself():
    from sonde.bpf.profile.python import line_at

    need(sys.version_info[:2] == (3, 11), "the tests' interpreter is not 3.11, whose location table this decodes")

    todo = [compile(path.read_text(), path.name, "exec")
            for path in (SOURCES / "shares.py", Path(__file__), Path(symbols.__file__), Path(flamegraph.__file__))]
    checked = 0
    while todo:
        co = todo.pop()
        todo += [c for c in co.co_consts if hasattr(c, "co_lines")]
        for start, end, line in co.co_lines():
            for unit in range(start // 2, end // 2):
                assert line_at(co.co_linetable, co.co_firstlineno, unit) == line, (co.co_name, unit)
                checked += 1
    assert checked > 1000


STACKS = {("prog", "main", "a", "b", "c"): 60, ("prog", "main", "d"): 40, ("prog", "main", "a<&>"): 3}


def frames_of(doc: ET.Element) -> list[dict]:
    out = []
    for g in doc.iter(f"{SVG_NS}g"):
        if g.get("class") != "f":
            continue
        rect, text, title = g.find(f"{SVG_NS}rect"), g.find(f"{SVG_NS}text"), g.find(f"{SVG_NS}title")
        out.append({"x": float(rect.get("x")), "w": float(rect.get("width")), "y": float(rect.get("y")),
                    "title": title.text, "label": text.text or "", "units": int(g.get("data-w")),
                    "ux": int(g.get("data-x")), "d": int(g.get("data-d"))})
    return out


def check_svg(text: str, stacks: dict) -> list[dict]:
    """Structure of a flame graph: it parses, every frame has a tooltip with its weight,
    widths are proportional to weight, children sit inside their parent one row up, a
    label never overflows its box, and the search and zoom script is there."""
    doc = ET.fromstring(text)
    script = doc.find(f"{SVG_NS}script").text
    assert "function search(" in script and "function zoom(" in script
    frames = frames_of(doc)
    total = sum(stacks.values())
    root = [f for f in frames if f["d"] == 0]
    assert len(root) == 1 and root[0]["units"] == total
    scale = root[0]["w"] / total
    for f in frames:
        assert abs(f["w"] - f["units"] * scale) < 0.02, f
        assert re.search(rf"\({f['units']:,} \w+, [\d.]+%\)$", f["title"]), f["title"]
        assert len(f["label"]) * flamegraph.CHAR_W <= f["w"], f
        if f["d"]:
            parents = [p for p in frames if p["d"] == f["d"] - 1 and p["ux"] <= f["ux"]
                       and f["ux"] + f["units"] <= p["ux"] + p["units"]]
            assert len(parents) == 1, f
            assert parents[0]["y"] - f["y"] == flamegraph.FRAME_H
            # x and width are rounded to 0.01 px each
            assert parents[0]["x"] - 0.02 <= f["x"] and f["x"] + f["w"] <= parents[0]["x"] + parents[0]["w"] + 0.02
    # Every stack's leaf is a frame with its own weight.
    by_title = {f["title"].rsplit(" (", 1)[0] for f in frames}
    assert {s[-1] for s in stacks} <= by_title
    return frames


def test_flame_graph_files_from_literal_stacks():
    text = flamegraph.folded(STACKS)
    assert "prog;main;a;b;c 60\n" in text and flamegraph.parse_folded(text) == STACKS
    ss = flamegraph.speedscope(STACKS, "t")
    names = [f["name"] for f in ss["shared"]["frames"]]
    prof = ss["profiles"][0]
    assert prof["endValue"] == 103 and sum(prof["weights"]) == 103
    assert {tuple(names[i] for i in s) for s in prof["samples"]} == set(STACKS)
    frames = check_svg(flamegraph.svg(STACKS, "title <x>", notes=["a note & more"]), STACKS)
    c = next(f for f in frames if f["title"].startswith("c ("))
    assert c["units"] == 60 and "58.25%" in c["title"]
    assert any(f["title"].startswith("a<&> (") for f in frames)   # escaped, and parsed back


NODE_DOM = r"""
// The smallest DOM the flame graph's script uses, built from the frames the test parsed.
const [input, weight, script] = JSON.parse(require("fs").readFileSync(0, "utf8"));
function el(attrs, parts = {}) {
  return {attrs, parts, style: {}, textContent: attrs._text || "",
          getAttribute(k) { return k in this.attrs ? String(this.attrs[k]) : null; },
          setAttribute(k, v) { this.attrs[k] = String(v); }, hasAttribute(k) { return k in this.attrs; },
          querySelector(sel) { return this.parts[sel]; }, addEventListener() {}};
}
const gs = input.map(f => el({"data-x": f.ux, "data-w": f.units, "data-d": f.d},
  {rect: el({x: f.x, width: f.w, fill: "rgb(1,2,3)"}), text: el({x: f.x + 3}), title: el({_text: f.title})}));
const ids = {matched: el({}), details: el({}), reset: el({}), search: el({})};
global.document = {documentElement: el({width: 1200, "data-total": weight, "data-unit": "samples"}),
                   querySelectorAll: () => gs, getElementById: id => ids[id]};
global.window = {addEventListener() {}};
eval(script + "; global.init = init; global.search = search; global.zoom = zoom;");
init({});
const nested = search("^(a|c)$");   // c lies under a: counted once
const nestedText = ids.matched.textContent;
const covered = search("^(c|d)$");
const lit = gs.filter(g => g.parts.rect.attrs.fill === "rgb(230,0,230)").map(g => g.parts.title.textContent);
const matched = ids.matched.textContent;
zoom(gs.find(g => g.parts.title.textContent.startsWith("a (")));
const widths = Object.fromEntries(gs.map(g => [g.parts.title.textContent.split(" samples")[0],
  g.style.display === "none" ? null : +g.parts.rect.attrs.width]));
console.log(JSON.stringify({nested, nestedText, covered, lit, matched, widths}));
"""


def test_flame_graph_search_and_zoom_work(tmp_path):
    """The SVG's own script, run in node against the frames: a regex search lights the
    matching frames and prints the share they cover; clicking a frame gives it the width."""
    need(shutil.which("node") is not None, "node (Debian nodejs) not installed")
    stacks = {("prog", "main", "a", "b", "c"): 60, ("prog", "main", "d"): 40, ("prog", "main", "a", "d"): 3}
    text = flamegraph.svg(stacks, "t")
    frames = frames_of(ET.fromstring(text))
    script = ET.fromstring(text).find(f"{SVG_NS}script").text
    r = subprocess.run(["node", "-e", NODE_DOM], input=json.dumps([frames, 103, script]), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["covered"] == 103 and out["matched"] == "Matched: 100.0%", out
    assert out["nested"] == 63 and out["nestedText"] == "Matched: 61.2%", out
    assert sorted(t.split(" (")[0] for t in out["lit"]) == ["c", "d", "d"], out["lit"]
    w = out["widths"]   # "name (weight" -> width after the click on a, None when hidden
    assert w["a (63"] == w["main (103"] == w["all (103"] == 1180.0, w      # a and its callers span the width
    assert abs(w["b (60"] - 1180 * 60 / 63) < 0.01 and abs(w["d (3"] - 1180 * 3 / 63) < 0.01, w
    assert w["d (40"] is None, w                                               # not under a: hidden


# --- real runs ---------------------------------------------------------------------------


# GCC 12 sets up no frame in a leaf that needs no stack, even with -fno-omit-frame-pointer
# -mno-omit-leaf-frame-pointer; at -O0 every function has one.
FRAME_POINTERS = ("-O0", "-fno-omit-frame-pointer")
NO_FRAME_POINTERS = ("-O1", "-fno-inline", "-fomit-frame-pointer")


def build_c(tmp_path: Path, source: str, out: str, flags: tuple[str, ...] = FRAME_POINTERS) -> Path:
    need(shutil.which("gcc") is not None, "gcc not installed")
    binary = tmp_path / out
    r = subprocess.run(["gcc", *flags, "-o", str(binary), str(SOURCES / source)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return binary


class Started:
    """Processes a test started, killed by pid at the end."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def __call__(self, argv, **kw) -> subprocess.Popen:
        p = subprocess.Popen([str(a) for a in argv], text=True, **kw)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
            for f in (p.stdin, p.stdout, p.stderr):
                if f:
                    f.close()


@pytest.fixture
def started():
    s = Started()
    yield s
    s.stop()


def sonde_profile(started: Started, *args) -> subprocess.Popen:
    """`sonde profile ...`, returned once it says it is sampling."""
    p = started([sys.executable, "-m", "sonde.ingest.cli", "profile", *args], stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
    lines = []
    while True:
        line = p.stderr.readline()
        if not line:
            p.wait(timeout=30)
            pytest.fail(f"sonde profile stopped before sampling (exit {p.returncode}): {''.join(lines)}")
        lines.append(line)
        if line.startswith("profiling "):
            return p


def finish(p: subprocess.Popen, timeout=120) -> tuple[str, str]:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    assert "Traceback" not in err, err
    return out, err


def share(stacks: dict, frame: str) -> float:
    total = sum(stacks.values())
    return 100.0 * sum(w for s, w in stacks.items() if frame in s) / total


def perf_shares(data: Path, frames: tuple[str, ...]) -> dict[str, float]:
    """Shares of samples whose call chain holds each frame, from `perf script`."""
    r = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,pid,ip,sym"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    samples, counts = 0, dict.fromkeys(frames, 0)
    for block in r.stdout.strip().split("\n\n"):
        lines = block.strip().splitlines()
        if not lines:
            continue
        samples += 1
        syms = {line.split()[1] for line in lines[1:] if len(line.split()) >= 2}
        for f in frames:
            counts[f] += f in syms
    assert samples > 100, r.stdout[:2000]
    return {f: 100.0 * n / samples for f, n in counts.items()}


# Shares are estimated from samples: at 499 Hz a busy thread gives ~2500 in 5 s (fewer
# when other work shares the CPUs), so a share's sampling error stays near 1 point,
# well inside the 5 the tests allow; at 99 Hz it would be ~2-3.
HZ = "499"
MIN_SAMPLES = 600
ROUNDS = "300"      # shares.c: about 2.5 s of CPU at -O0, ~1200 samples at 499 Hz
PY_ROUNDS = "400"   # shares.py: about 2.5 s of CPU
JAVA_ROUNDS = "20000"  # Shares.java: about 2.5 s of CPU once compiled


def assert_cut_only_in_libc(stacks, own) -> None:
    """No stack through a frame-pointer build's own code (frames for which `own` is
    true) is cut. A sample that lands in libc, built without frame pointers (fgets,
    puts, the fstat of stdout's first write), is cut honestly at libc; those are rare."""
    cut = {s: w for s, w in stacks.items() if any(f.startswith("[truncated") for f in s)}
    assert not any(any(own(f) for f in s) for s in cut), cut
    assert all(any("libc" in f for f in s if f.startswith("[truncated")) for s in cut), cut
    assert sum(cut.values()) <= 0.01 * sum(stacks.values()), cut


@pytest.fixture
def bpf(bpf_ready):
    need(shutil.which("perf") is not None, "perf (Debian linux-perf) not installed")


def test_c_shares_and_frame_names_match_the_design_and_perf(bpf, started, tmp_path):
    binary = build_c(tmp_path, "shares.c", "shares")
    prog = started([binary, ROUNDS], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = tmp_path / "out"
    # Both profilers take the whole run: each stops when the process exits.
    prof = sonde_profile(started, "--pid", prog.pid, "--seconds", "300", "--hz", HZ, "--out", out)
    perf_data = tmp_path / "perf.data"
    perf = started(["perf", "record", "-q", "-F", HZ, "-g", "-p", prog.pid, "-o", perf_data],
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    prog.stdin.write("go\n")
    prog.stdin.flush()
    assert prog.stdout.readline().strip() == "go"
    # perf stops when the process exits, and wants it not yet reaped (else it may end with
    # an error status); sonde profile also sees the zombie as exited.
    perf.wait(timeout=300)
    assert perf.returncode == 0, perf.stderr.read()
    stdout, err = finish(prof)
    assert prog.wait(timeout=30) == 0

    stacks = flamegraph.parse_folded((out / "oncpu.folded").read_text())
    assert sum(stacks.values()) > MIN_SAMPLES, stacks
    # The exact frames, root end first: main -> a -> b -> c and main -> d.
    top = sorted(stacks.items(), key=lambda kv: -kv[1])
    paths = {tuple(s[s.index("main"):]) for s, _ in top[:2] if "main" in s}
    assert paths == {("main", "a", "b", "c"), ("main", "d")}, top[:4]
    assert all(s[0] == "shares" for s in stacks)
    ours = {f: share(stacks, f) for f in ("c", "d")}
    assert abs(ours["c"] - 60) <= 5 and abs(ours["d"] - 40) <= 5, ours
    theirs = perf_shares(perf_data, ("c", "d"))
    assert abs(theirs["c"] - ours["c"]) <= 5 and abs(theirs["d"] - ours["d"]) <= 5, (ours, theirs)
    # No stack through the frame-pointer build's own code is cut (libc's may be).
    assert_cut_only_in_libc(stacks, lambda f: f in {"main", "a", "b", "c", "d"})
    check_svg((out / "oncpu.svg").read_text(), stacks)
    ss = json.loads((out / "oncpu.speedscope.json").read_text())
    assert sum(ss["profiles"][0]["weights"]) == sum(stacks.values())
    assert str(out / "oncpu.svg") in stdout.split()


def test_swapping_sets_loses_and_repeats_no_sample(bpf_ready, started, tmp_path):
    """Read and clear hundreds of times while a busy process is sampled at 1000 Hz per
    CPU, every fifth read inside an agent poll that then fails: the counts of the polls
    that succeeded add up exactly to what the program counted."""
    import contextlib
    import dataclasses

    from sonde.bpf.profile.probe import PROBE, StackSampler
    from sonde.ingest.config import Config
    from sonde.ingest.runtime.delta import interval
    from sonde.ingest.runtime.probe import LoadedProbe

    binary = build_c(tmp_path, "shares.c", "shares")
    prog = started([binary, "100000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    spec = dataclasses.replace(PROBE, cpu_clock={"on_cpu_sample": 1000}, decoder=None,
                               cflags=lambda _sys: ["-DSONDE_FILTER"])
    loaded = LoadedProbe.load(spec, Config(state_dir=tmp_path))
    try:
        sampler = StackSampler(loaded.bpf)
        sampler.set_filter([prog.pid])
        prog.stdin.write("go\n")
        prog.stdin.flush()
        read, takes, failed = 0, 0, 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (takes < 300 or read < 2000):
            takes += 1
            if takes % 5 == 0:   # a poll that fails once it has read: its counts must come back later
                with contextlib.suppress(RuntimeError), interval():
                    failed += sum(r.count for r in sampler.take().on_cpu)
                    raise RuntimeError("the poll failed")
            else:
                with interval():
                    read += sum(r.count for r in sampler.take().on_cpu)
        prog.kill()
        prog.wait()
        read += sum(r.count for r in sampler.take().on_cpu)   # both sets, outside a poll
        read += sum(r.count for r in sampler.take().on_cpu)
        counted = sampler.counted()
    finally:
        loaded.close()
    assert failed > 0 and takes >= 100 and read > 1000, (failed, takes, read)
    assert read == counted, (read, counted, takes)


def test_java_hot_methods_70_30(bpf_ready, started, tmp_path):
    for tool in ("java", "javac", "jcmd"):
        need(shutil.which(tool) is not None, f"{tool} (OpenJDK 17) not installed")
    r = subprocess.run(["javac", "-d", str(tmp_path), str(SOURCES / "Shares.java")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    jvm = started(["java", "-XX:+PreserveFramePointer", "-XX:CompileCommand=quiet",
                   "-XX:CompileCommand=dontinline,Shares::hot*", "-cp", tmp_path, "Shares", JAVA_ROUNDS],
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert jvm.stdout.readline().strip() == "warm"
    out = tmp_path / "out"
    prof = sonde_profile(started, "--pid", jvm.pid, "--seconds", "300", "--hz", HZ, "--out", out)
    jvm.stdin.write("go\n")
    jvm.stdin.flush()
    assert jvm.wait(timeout=300) == 0
    _, err = finish(prof)
    stacks = flamegraph.parse_folded((out / "oncpu.folded").read_text())
    named = lambda m: sum(w for s, w in stacks.items() if any(f"Shares.{m}(" in f and f.endswith("_[j]") for f in s))
    seventy, thirty = named("hotSeventy"), named("hotThirty")
    assert seventy + thirty > MIN_SAMPLES, (seventy, thirty, sorted(stacks.items(), key=lambda kv: -kv[1])[:5])
    assert abs(100.0 * seventy / (seventy + thirty) - 70) <= 5, (seventy, thirty)
    assert "PreserveFramePointer" not in err, err


def test_off_cpu_ten_sleeps_of_100ms_add_up_to_one_second(bpf, started, tmp_path):
    binary = build_c(tmp_path, "sleeper.c", "sleeper")
    prog = started([binary], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = tmp_path / "out"
    prof = sonde_profile(started, "--pid", prog.pid, "--seconds", "3", "--off-cpu", "--out", out)
    prog.stdin.write("go\n")
    prog.stdin.flush()
    done, slept_ns = prog.stdout.readline().split()
    finish(prof)
    slept_us = int(slept_ns) / 1000
    assert done == "done" and 1_000_000 <= slept_us < 1_250_000, slept_us
    stacks = flamegraph.parse_folded((out / "offcpu.folded").read_text())
    sleeping = {s: us for s, us in stacks.items() if any("nanosleep" in f and f.endswith("_[k]") for f in s)}
    assert sleeping, stacks
    assert all("main" in s for s in sleeping), sleeping
    total_us = sum(sleeping.values())
    # 1.0 s asked for; on a busy machine each wakeup may wait for a CPU, which is
    # off-CPU time too: the program's own clock is the reference.
    assert abs(total_us - slept_us) <= 0.05 * slept_us, (total_us, slept_us, sleeping)
    assert abs(total_us - 1_000_000) <= 0.05 * 1_000_000 or slept_us > 1_040_000, (total_us, slept_us)
    check_svg((out / "offcpu.svg").read_text(), stacks)
    assert (out / "oncpu.folded").exists()


def test_python_hot_functions_70_30_agree_with_py_spy(bpf_ready, started, tmp_path):
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    need(Path(py_spy).exists(), "py-spy (PyPI, the test extra) not installed")
    need(Path("/usr/include/python3.11/internal/pycore_frame.h").exists(), "python3.11-dev not installed")
    need(Path("/usr/bin/python3.11").exists(), "Debian's python3.11 not installed")
    prog = started(["/usr/bin/python3.11", SOURCES / "shares.py", PY_ROUNDS], stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE)
    out = tmp_path / "out"
    prof = sonde_profile(started, "--pid", prog.pid, "--seconds", "300", "--hz", HZ, "--out", out)
    raw = tmp_path / "py-spy.txt"
    spy = started([py_spy, "record", "--pid", prog.pid, "--rate", HZ, "--format", "raw",
                   "--output", raw, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    prog.stdin.write("go\n")
    prog.stdin.flush()
    assert prog.stdout.readline().strip() == "go"
    assert spy.wait(timeout=300) == 0, spy.stderr.read()   # py-spy stops when the process exits
    _, err = finish(prof)
    assert prog.wait(timeout=30) == 0

    stacks = flamegraph.parse_folded((out / "oncpu.folded").read_text())
    def ours(fn):
        return sum(w for s, w in stacks.items() if any(re.fullmatch(rf"shares\.{fn}:\d+", f) for f in s))
    seventy, thirty = ours("seventy"), ours("thirty")
    assert seventy + thirty > MIN_SAMPLES, sorted(stacks.items(), key=lambda kv: -kv[1])[:5]
    share_ours = 100.0 * seventy / (seventy + thirty)
    assert abs(share_ours - 70) <= 5, (seventy, thirty)
    # The Python frames name the module, function and line, the callers included.
    assert any(f.startswith("shares.main:") for s in stacks for f in s)
    assert any(re.fullmatch(r"shares\.work:1[0-3]", f) for s in stacks for f in s)

    theirs = flamegraph.parse_folded(raw.read_text())
    def spy_count(fn):
        return sum(w for s, w in theirs.items() if any(f.startswith(f"{fn} (") for f in s))
    s70, s30 = spy_count("seventy"), spy_count("thirty")
    assert s70 + s30 > MIN_SAMPLES, list(theirs)[:5]
    assert abs(100.0 * s70 / (s70 + s30) - share_ours) <= 5, (share_ours, s70, s30)
    assert "runs Python 3.11" in err, err


def run_profile(started, tmp_path, binary, seconds="300", rounds="150", before_profile=None):
    prog = started([binary, rounds], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    if before_profile:
        before_profile(prog)
    out = tmp_path / ("out-" + binary.name)
    prof = sonde_profile(started, "--pid", prog.pid, "--seconds", seconds, "--hz", HZ, "--out", out)
    prog.stdin.write("go\n")
    prog.stdin.flush()
    _, err = finish(prof)
    notes = [l for l in err.splitlines() if l.startswith("note: ")]
    return flamegraph.parse_folded((out / "oncpu.folded").read_text()), notes, prog


def test_hostile_exit_mid_profile(bpf_ready, started, tmp_path):
    binary = build_c(tmp_path, "shares.c", "shares")
    t0 = time.monotonic()
    stacks, notes, prog = run_profile(started, tmp_path, binary, seconds="60", rounds="40")
    assert prog.wait(timeout=10) == 0
    assert time.monotonic() - t0 < 50  # the session ends when its only process is gone, not after 60 s
    assert any(f"pid {prog.pid} exited" in n for n in notes), notes
    assert share(stacks, "c") > 40, stacks   # the second it ran is kept, and named


def test_hostile_stripped_binary(bpf_ready, started, tmp_path):
    binary = build_c(tmp_path, "shares.c", "shares")
    stripped = tmp_path / "stripped"
    subprocess.run(["strip", "-o", str(stripped), str(binary)], check=True)
    stacks, notes, _ = run_profile(started, tmp_path, stripped)
    assert any("stripped is stripped" in n for n in notes), notes
    frames = {f for s in stacks for f in s}
    assert not {"a", "b", "c", "d"} & frames                 # no name is made up
    assert any(re.fullmatch(r"stripped\+0x[0-9a-f]+", f) for f in frames), frames
    # The frame-pointer chain is still whole: no stack through its code is cut.
    assert_cut_only_in_libc(stacks, lambda f: f.startswith("stripped+0x"))


def test_hostile_deleted_executable(bpf_ready, started, tmp_path):
    binary = build_c(tmp_path, "shares.c", "victim")
    stacks, notes, prog = run_profile(started, tmp_path, binary, before_profile=lambda p: binary.unlink())
    assert not binary.exists()
    assert any("was deleted" in n and "map_files" in n for n in notes), notes
    assert abs(share(stacks, "c") - 60) <= 10, stacks    # still named, through /proc/PID/map_files


def test_binary_without_frame_pointers_is_marked_never_guessed(bpf_ready, started, tmp_path):
    binary = build_c(tmp_path, "shares.c", "nofp", NO_FRAME_POINTERS)
    stacks, notes, _ = run_profile(started, tmp_path, binary)
    for s, w in stacks.items():
        if "c" in s or "d" in s:
            user = [f for f in s if not f.endswith("_[k]")]
            assert user[1] == "[truncated: nofp has no frame pointers]", s
            assert user[-1] in ("c", "d") and "main" not in s, s
    assert share(stacks, "c") > 40, stacks
    assert any("truncated stacks" in n and "nofp has no frame pointers" in n for n in notes), notes


def test_process_name_takes_every_process_of_that_name(bpf_ready, started, tmp_path):
    binary = build_c(tmp_path, "shares.c", "twin")
    twins = [started([binary, "100000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(2)]
    out = tmp_path / "out"
    prof = sonde_profile(started, "--process", "twin", "--seconds", "4", "--hz", HZ, "--out", out)
    for t in twins:
        t.stdin.write("go\n")
        t.stdin.flush()
    finish(prof)
    stacks = flamegraph.parse_folded((out / "oncpu.folded").read_text())
    roots = {s[0] for s in stacks}
    assert roots == {f"twin [{t.pid}]" for t in twins}, roots   # one root per process
    for t in twins:
        mine = {s: w for s, w in stacks.items() if s[0] == f"twin [{t.pid}]"}
        assert abs(share(mine, "c") - 60) <= 10, mine


def test_bad_input_is_one_line(tmp_path):
    for args, expect in ((["--pid", "999999999"], "no process with pid"),
                         (["--process", "no-such-process-xyz"], "no running process is called"),
                         (["--pid", "1", "--hz", "0"], "--hz must be between")):
        r = subprocess.run([sys.executable, "-m", "sonde.ingest.cli", "profile", *args, "--seconds", "1",
                            "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    if shutil.which("setpriv") and os.geteuid() == 0:   # as nobody: says root is needed, not a compile error
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                            "sonde.ingest.cli", "profile", "--pid", "1", "--seconds", "1", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
        assert r.returncode == 1 and "needs root" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_continuous_profiling_stores_top_stacks_that_name_the_function(agents, started, influx, influx_db, tmp_path):
    binary = build_c(tmp_path, "shares.c", "shares")
    agent = agents("profile", extra="probes:\n  profile:\n    enabled: true\n")
    prog = started([binary, "400"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    prog.stdin.write("go\n")
    prog.stdin.flush()
    while True:   # polls while it runs: the agent names frames from a live process's maps
        pid, status, usage = os.wait4(prog.pid, os.WNOHANG)   # the kernel's own account of its CPU time
        if pid:
            break
        agent.poll()
        time.sleep(0.5)
    prog.returncode = os.waitstatus_to_exitcode(status)
    assert prog.returncode == 0
    cpu_seconds = usage.ru_utime + usage.ru_stime
    drain(agent)
    pid = str(prog.pid)
    total = select(influx, influx_db, f"SELECT sum(samples) FROM profile_samples WHERE pid='{pid}'")[0]["sum"]
    assert abs(total - 49 * cpu_seconds) <= 0.2 * 49 * cpu_seconds + 5, (total, cpu_seconds)  # 49 Hz of CPU time
    rows = select(influx, influx_db, f"SELECT * FROM profile_stack WHERE pid='{pid}'")
    by_function: dict[str, int] = {}
    for r in rows:
        by_function[r["function"]] = by_function.get(r["function"], 0) + r["samples"]
        assert r["rank"] in {"1", "2", "3", "4", "5"}
    assert abs(100.0 * by_function.get("c", 0) / total - 60) <= 10, by_function
    assert any(r["frames"].endswith("main;a;b;c") for r in rows), rows[:3]
    # Its last seconds were sampled after the poll above, and it was gone by the next one:
    # the maps that poll read still name them.
    assert not any(f.startswith("[process exited") for f in by_function), by_function

    # What backtrack needs to name the function of a pinned process.
    from sonde.ingest.analysis.hotspots import describe, hotspots

    now_ms = int(time.time() * 1000)
    spots = hotspots(lambda q: influx.query(q, db=influx_db), now_ms - 600_000, now_ms + 1000, pid)
    assert [s.function for s in spots[:2]] == ["c", "d"], spots
    assert abs(spots[0].share_pct - 60) <= 10 and spots[0].frames.endswith("main;a;b;c"), spots
    assert describe(spots).startswith("in c ("), describe(spots)
    assert hotspots(lambda q: influx.query(q, db=influx_db), now_ms - 600_000, now_ms + 1000, "1") == []


def test_continuous_profiling_names_python_functions(agents, started, influx, influx_db, tmp_path):
    need(Path("/usr/include/python3.11/internal/pycore_frame.h").exists(), "python3.11-dev not installed")
    need(Path("/usr/bin/python3.11").exists(), "Debian's python3.11 not installed")
    agent = agents("profile", extra="probes:\n  profile:\n    enabled: true\n")
    prog = started(["/usr/bin/python3.11", SOURCES / "shares.py", "100000"], stdin=subprocess.PIPE,
                   stdout=subprocess.PIPE)
    prog.stdin.write("go\n")
    prog.stdin.flush()
    assert prog.stdout.readline().strip() == "go"
    time.sleep(2)
    agent.poll()   # the busy process is found to run Python 3.11: walked from the next interval on
    time.sleep(3)
    drain(agent)
    rows = select(influx, influx_db, f"SELECT * FROM profile_stack WHERE pid='{prog.pid}'")
    python_rows = [r for r in rows if "shares.main:" in r["frames"]]
    assert python_rows, [r["frames"] for r in rows]
    assert {r["function"] for r in python_rows} <= {"shares.work:11", "shares.work:12"}, python_rows
    assert any(r["frames"].endswith("shares.seventy:17;shares.work:12") for r in python_rows), python_rows


def test_backtrack_names_the_function_a_pinned_process_spins_in(agents, started, influx, influx_db, tmp_path):
    """Issue 16 item 5: a process stuck on its core for several polls, with continuous
    profiling on: backtrack's likely cause names the process and the frame it spun in
    (c, 60 % of its samples by the program's design), through the real CLI over a real
    InfluxDB filled by a real agent run."""
    from sonde.ingest.analysis.backtrack import PINNED_INTERVALS

    binary = build_c(tmp_path, "shares.c", "spinner")
    agent = agents("cpu", "profile", extra="probes:\n  profile:\n    enabled: true\n")
    start_ms = int(time.time() * 1000)
    prog = started([binary, "100000000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    prog.stdin.write("go\n")
    prog.stdin.flush()
    assert prog.stdout.readline().strip() == "go"
    for _ in range(PINNED_INTERVALS + 3):   # the config polls every second: a run of pinned intervals
        time.sleep(1)
        agent.poll()
    prog.kill()
    prog.wait()
    drain(agent)
    end_ms = int(time.time() * 1000)
    cfg = tmp_path / "bt.yaml"
    cfg.write_text(f"state_dir: {tmp_path}/bt\ninfluxdb:\n  api: v1\n  url: {influx.url}\n  database: {influx_db}\n")
    r = subprocess.run([sys.executable, "-m", "sonde.ingest.cli", "backtrack", "-c", str(cfg), "--from",
                        str(start_ms / 1000), "--to", str(end_ms / 1000), "--json"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    pinned = [f for f in report["findings"] if f["kind"] == "cpu_pinned" and f"pid {prog.pid}" in f["subject"]]
    assert pinned, report["findings"]
    cause = pinned[0]["cause"]
    m = re.search(r"stuck on its core in c \((\d+(?:\.\d+)?)% of its samples\)", cause)
    assert m and abs(float(m.group(1)) - 60) <= 10, cause


def test_continuous_profiling_names_java_methods(agents, started, influx, influx_db, tmp_path):
    """Continuous mode: the agent asks a busy JVM for its perf map in the background
    (`jcmd PID Compiler.perfmap`); from the next interval on its JIT frames are named,
    and the two hot methods' shares are 70/30 by the design of Shares.java: within 10
    points here (49 Hz over 6 s is ~300 samples of them, a binomial spread of ~2.6
    points; `sonde profile`'s test holds 5 points at 499 Hz)."""
    for tool in ("java", "javac", "jcmd"):
        need(shutil.which(tool) is not None, f"{tool} (OpenJDK 17) not installed")
    r = subprocess.run(["javac", "-d", str(tmp_path), str(SOURCES / "Shares.java")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    agent = agents("profile", extra="probes:\n  profile:\n    enabled: true\n")
    jvm = started(["java", "-XX:+PreserveFramePointer", "-XX:CompileCommand=quiet",
                   "-XX:CompileCommand=dontinline,Shares::hot*", "-cp", tmp_path, "Shares", "100000"],
                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert jvm.stdout.readline().strip() == "warm"
    jvm.stdin.write("go\n")
    jvm.stdin.flush()
    time.sleep(2)
    agent.poll()   # the busy JVM is found: its perf map is fetched in the background
    since = time.time_ns()
    wait_until(lambda: jvm.poll() is not None or (agent.poll() and time.time_ns() - since > 6e9),
               timeout=60, interval=1, what="six seconds of polls with the JVM's map")
    drain(agent)
    rows = select(influx, influx_db, f"SELECT * FROM profile_stack WHERE pid='{jvm.pid}' AND time > {since}")
    named = lambda m: sum(r["samples"] for r in rows if f"Shares.{m}(" in r["function"])
    seventy, thirty = named("hotSeventy"), named("hotThirty")
    assert seventy + thirty > 150, [(r["function"], r["samples"]) for r in rows]
    assert abs(100.0 * seventy / (seventy + thirty) - 70) <= 10, (seventy, thirty)
