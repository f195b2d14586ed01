"""The package list only: everything else is in pyproject.toml.

The folders ingest/, bpf/, dashboards/ and alerts/ install as sonde.ingest, sonde.bpf, ...
(`package-dir = {sonde = "."}`). Listing them by walking the tree means a new probe
folder (bpf/<probe>/ with an __init__.py) ships without an edit here.
"""
from setuptools import find_packages, setup

ROOMS = ["ingest", "ingest.*", "bpf", "bpf.*", "dashboards", "dashboards.*", "alerts", "alerts.*"]
setup(packages=[f"sonde.{p}" for p in find_packages(include=ROOMS)])
