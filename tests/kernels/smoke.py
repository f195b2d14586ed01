"""Which probes load on this kernel: one line per probe.

    python tests/kernels/smoke.py [--all]   (as root, from the checkout; the kernel matrix runs it
                                       inside each QEMU guest)

Probes with default_enabled=True are loaded with LoadedProbe.load and closed again;
the line says `loaded` or the one-line error. The others are listed, not loaded
(`--all` loads them too).
Exit code 0 when every probe got its line, whatever loaded (other work decides what
must load where); 1 when the probes could not even be listed.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

PREFIX = "SMOKE"


def one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def probes() -> dict:
    """discover(), or, when it refuses the whole set (a probe half-written in the
    checkout), each bpf/<name>/probe.py's PROBE on its own, so one broken probe costs one line."""
    import importlib

    import sonde.bpf as bpf
    from sonde.ingest.runtime.probe import Probe, discover
    try:
        return discover()
    except Exception as e:  # noqa: BLE001
        print(f"{PREFIX} discover() failed: {type(e).__name__}: {one_line(e)}; listing probes one by one")
    found = {}
    for py in sorted(Path(bpf.__file__).parent.glob("*/probe.py")):
        name = py.parent.name
        try:
            spec = getattr(importlib.import_module(f"sonde.bpf.{name}.probe"), "PROBE", None)
        except Exception as e:  # noqa: BLE001
            print(f"{PREFIX} {name}: FAILED import {type(e).__name__}: {one_line(e)}")
            continue
        if isinstance(spec, Probe):
            found[name] = spec
    return found


def main(everything: bool = False) -> int:
    t0 = time.monotonic()
    try:
        from sonde.ingest import config as config_mod
        from sonde.ingest.runtime.probe import LoadedProbe
        config = config_mod.parse("")
        specs = probes()
    except Exception as e:  # noqa: BLE001 - the one line is the point
        print(f"{PREFIX} cannot list probes: {type(e).__name__}: {one_line(e)}")
        return 1
    print(f"{PREFIX} kernel {os.uname().release}: {len(specs)} probes "
          f"({sum(s.default_enabled for s in specs.values())} always-on)", flush=True)
    for name, spec in specs.items():
        if not spec.default_enabled and not everything:
            print(f"{PREFIX} {name}: off by default, not loaded", flush=True)
            continue
        t = time.monotonic()
        try:
            loaded = LoadedProbe.load(spec, config)
        except Exception as e:  # noqa: BLE001
            print(f"{PREFIX} {name}: FAILED ({time.monotonic() - t:.1f} s) {type(e).__name__}: {one_line(e)}",
                  flush=True)
            continue
        try:
            missing = ", ".join(loaded.missing_optional)
            loaded.close()
        except Exception as e:  # noqa: BLE001
            print(f"{PREFIX} {name}: loaded, but close failed: {one_line(e)}", flush=True)
            continue
        print(f"{PREFIX} {name}: loaded ({time.monotonic() - t:.1f} s)"
              + (f"; optional hooks missing: {missing}" if missing else ""), flush=True)
    print(f"{PREFIX} done in {time.monotonic() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(everything="--all" in sys.argv[1:]))
