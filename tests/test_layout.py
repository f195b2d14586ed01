"""The tree shows the architecture: one `sonde` namespace in the wheel, one folder per
probe found by discovery, ingest/ in three rooms with no import running upward, and
each probe's README generated from what it declares."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

from sonde.ingest import docs
from sonde.ingest.runtime import catalog
from sonde.ingest.runtime.probe import discover

pytestmark = [pytest.mark.layout]

ROOMS = ("runtime", "output", "analysis")


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, REPO)
    assert built.returncode == 0, built.stderr
    return next(out.glob("sonde-*.whl"))


def test_the_wheel_installs_only_the_sonde_namespace(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"sonde"}, tops
    for probe in discover():
        assert f"sonde/bpf/{probe}/probe.py" in names and f"sonde/bpf/{probe}/metrics.py" in names
        assert f"sonde/bpf/{probe}/README.md" in names

    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    pip = run(venv / "bin/pip", "install", "-q", "--disable-pip-version-check", wheel)
    assert pip.returncode == 0, pip.stderr[-2000:]
    # Run from a directory holding no checkout, so nothing but the installed wheel is importable.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    helped = run(venv / "bin/sonde", "--help", cwd=tmp_path, env=env)
    assert helped.returncode == 0 and "backtrack" in helped.stdout, helped.stderr
    listed = run(venv / "bin/sonde", "catalog", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    assert {line.split("\t")[0] for line in listed.stdout.splitlines()} == set(catalog.MEASUREMENTS)
    where = run(venv / "bin/python", "-c", "import sonde.ingest.cli as c; print(c.__file__)", cwd=tmp_path, env=env)
    assert where.stdout.strip().startswith(str(venv)), where.stdout
    for old in ("ingest", "bpf", "alerts", "dashboards"):
        gone = run(venv / "bin/python", "-c", f"import {old}", cwd=tmp_path, env=env)
        assert gone.returncode != 0 and "ModuleNotFoundError" in gone.stderr, (old, gone.stderr)


HELLO_PROBE = '''\
"""hello: the load average, read from /proc at poll time (a throwaway probe)."""
from sonde.ingest.output.lineproto import Point
from sonde.ingest.runtime.probe import Probe


class Decoder:
    def __init__(self, probe):
        self.probe = probe

    def poll(self, ts):
        runnable = int(open("/proc/loadavg").read().split()[3].split("/")[0])
        return [Point("hello_load", {"host": self.probe.config.host}, {"runnable": runnable}, ts)], 0


PROBE = Probe(name="hello", doc=__doc__, hooks=(), kernel=False, decoder=Decoder)
'''

HELLO_METRICS = '''\
from sonde.ingest.runtime.catalog import HOST, Field, Measurement

MEASUREMENTS = (Measurement(name="hello_load", kind="gauge", help="Runnable tasks.", source="/proc/loadavg",
                            tags=(HOST,), fields=(Field("runnable", "int", "tasks", "Runnable tasks now."),)),)
'''


def test_a_new_probe_folder_is_discovered_with_nothing_central_edited(tmp_path):
    copy = tmp_path / "pkgs" / "sonde"
    for room in ("ingest", "bpf", "dashboards", "alerts"):
        shutil.copytree(REPO / room, copy / room, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    hello = copy / "bpf" / "hello"
    hello.mkdir()
    (hello / "__init__.py").write_text("")
    (hello / "probe.py").write_text(HELLO_PROBE)
    (hello / "metrics.py").write_text(HELLO_METRICS)

    script = textwrap.dedent(f"""
        import sonde.ingest.runtime.probe as probe_mod
        from sonde.ingest import config
        from sonde.ingest.runtime import catalog
        from sonde.ingest.runtime.probe import LoadedProbe, discover
        assert probe_mod.__file__.startswith({str(copy)!r}), probe_mod.__file__
        specs = discover()
        print("probes", sorted(specs))
        print("catalog", "hello_load" in catalog.MEASUREMENTS)
        loaded = LoadedProbe.load(specs["hello"], config.parse("host: t\\nstate_dir: {tmp_path / 'state'}\\n"))
        points, me = loaded.poll(1)
        print("points", [(p.measurement, sorted(p.fields)) for p in points], me.fields["poll_success"])
    """)
    env = dict(os.environ, PYTHONPATH=str(copy.parent))
    out = run(sys.executable, "-c", script, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert "'hello'" in lines["probes"] and set(discover()) <= set(eval(lines["probes"]))
    assert lines["catalog"] == "True"
    assert lines["points"] == "[('hello_load', ['runnable'])] 1"
    listed = run(sys.executable, "-m", "sonde.ingest.cli", "catalog", cwd=tmp_path, env=env)
    assert any(line.startswith("hello_load\t") for line in listed.stdout.splitlines()), listed.stderr

    # Nothing outside bpf/hello/ differs from the checkout.
    for path in copy.rglob("*"):
        rel = path.relative_to(copy)
        if path.is_file() and rel.parts[:2] != ("bpf", "hello") and "__pycache__" not in rel.parts:
            assert path.read_bytes() == (REPO / rel).read_bytes(), f"{rel} was edited"


def test_every_probe_folder_has_its_four_pieces_and_readmes_are_current():
    for name, spec in discover().items():
        folder = REPO / "bpf" / name
        assert (folder / "probe.py").exists() and (folder / "metrics.py").exists()
        assert (folder / f"{name}.bpf.c").exists() == spec.kernel
        assert (folder / "README.md").read_text() == docs.probe_readme(name), \
            f"bpf/{name}/README.md is stale: run python -m sonde.ingest.docs --probes"
    # Every measurement but the agent's own belongs to exactly one probe folder.
    owned = [m.name for ms in catalog.probe_measurements().values() for m in ms]
    assert len(owned) == len(set(owned))
    assert set(owned) | {m.name for m in catalog.AGENT_MEASUREMENTS} == set(catalog.MEASUREMENTS)


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("room, forbidden", [
    ("ingest/runtime", ("sonde.ingest.analysis", "sonde.dashboards", "sonde.alerts", "sonde.ingest.cli")),
    ("ingest/output", ("sonde.ingest.analysis", "sonde.ingest.runtime.agent", "sonde.dashboards", "sonde.alerts",
                       "sonde.ingest.cli")),
    ("ingest/analysis", ("sonde.dashboards", "sonde.alerts", "sonde.ingest.cli")),
    ("bpf", ("sonde.ingest.analysis", "sonde.ingest.runtime.agent", "sonde.dashboards", "sonde.alerts",
             "sonde.ingest.cli")),
])
def test_no_import_runs_upward(room, forbidden):
    offenders = []
    for path in (REPO / room).rglob("*.py"):
        for name in imports_of(path):
            if name.startswith(forbidden) or name.split(".")[0] in ("ingest", "bpf", "alerts", "dashboards"):
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert not offenders, offenders


def test_ingest_reaches_dashboards_and_alerts_only_through_entry_points():
    for path in (REPO / "ingest").glob("*.py"):
        bad = {n for n in imports_of(path) if n.startswith(("sonde.dashboards", "sonde.alerts"))}
        assert not bad, f"{path.name} imports {bad}: load it through ingest/plugins.py"


def test_readme_layout_section_matches_the_tree():
    """Every folder the layout section names exists, and every top-level folder, probe
    folder and ingest/ room on disk is named there."""
    layout = docs.section((REPO / "README.md").read_text(), "layout")
    named = set(re.findall(r"^\s*- `([^`]+?)/?`", layout, flags=re.M))
    missing = {n for n in named if not (REPO / n).exists()}
    assert not missing, f"the layout section names {missing}, which do not exist"
    tracked = run("git", "-C", REPO, "ls-files").stdout.split()
    on_disk = {f.split("/")[0] for f in tracked if "/" in f and not f.startswith(".")}
    on_disk |= {"/".join(f.split("/")[:2]) for f in tracked if f.startswith(("bpf/", "ingest/", "tests/"))
                and f.count("/") >= 2}
    assert on_disk <= named, f"not in the README's layout section: {sorted(on_disk - named)}"
