"""Declared entry points: how the runtime and the CLI reach analysis, dashboards and
alert rules without importing them.

The runtime sits below analysis, and ingest/ below dashboards/ and alerts/: no module
imports upward. What must still be called across (the agent runs the alert rules on
its schedule; `sonde dashboards` renders the dashboards) is declared once, in
pyproject.toml's `[project.entry-points."sonde.plugins"]`, and loaded here by name:
from the installed package's metadata, or, in a bare checkout on PYTHONPATH (a
QEMU guest), from pyproject.toml itself.
"""
from __future__ import annotations

import importlib
import tomllib
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path

from sonde.ingest.errors import SondeError

GROUP = "sonde.plugins"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@cache
def declared() -> dict[str, str]:
    """name -> "module[:attribute]" for every plugin the package declares."""
    found = {ep.name: ep.value for ep in entry_points(group=GROUP)}
    if not found and PYPROJECT.exists():
        found = tomllib.loads(PYPROJECT.read_text())["project"]["entry-points"][GROUP]
    return found


def load(name: str):
    """The module or object the entry point `name` names."""
    target = declared().get(name)
    if target is None:
        raise SondeError(f"no {GROUP} entry point {name!r}: reinstall Sonde (pip install .)")
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj
