"""The kernel matrix: Debian 12's stock 6.1 and bookworm-backports' 6.12, each booted under
QEMU (tests/kernels/qemu.py), run the checkout's `kernel_matrix` tests inside the guest.

Until tests carrying that marker exist, each guest runs the smoke job instead
(tests/kernels/smoke.py: which always-on probes load), and its pytest must at least
collect the suite without errors. Images are cached; the first build of each takes a
few minutes and prints its progress.
"""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import REPO, need
from kernels import qemu

pytestmark = pytest.mark.hot_path

# --- what the guests run: change it here -------------------------------------------------
GUEST_MARKER = "kernel_matrix"   # the guest runs `pytest -m GUEST_MARKER tests/`
MIN_GUEST_TESTS = 1              # fewer collected in a guest fails, once marked tests exist
# Boot + job, per kernel, once the image is cached (boot ~20 s; each probe compile 5-40 s).
# The guest tests dominate; raise this as the marked set grows.
BOOT_TIMEOUT = float(os.environ.get("SONDE_KERNEL_TIMEOUT", 600))
# Run the smoke job even when marked tests exist: SONDE_KERNEL_SMOKE=1.
FORCE_SMOKE = os.environ.get("SONDE_KERNEL_SMOKE", "") == "1"
RESULTS = qemu.CACHE / "results"  # each run's guest output, by kernel, for reading afterwards


def guest_test_files() -> list[Path]:
    """Test files that carry the guest marker (this file never does)."""
    mark = re.compile(rf"\bmark\.{re.escape(GUEST_MARKER)}\b")
    here = Path(__file__).resolve()
    return [p for p in sorted((REPO / "tests").rglob("test_*.py"))
            if p.resolve() != here and mark.search(p.read_text(errors="replace"))]


def junit_counts(xml: str) -> dict[str, int]:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if not xml:
        return counts
    root = ET.fromstring(xml)
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
    return counts


def tail(text: str, n: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


@pytest.mark.parametrize("name", list(qemu.KERNELS))
def test_kernel_matrix(name, capsys):
    need(os.geteuid() == 0, "the kernel matrix builds images in a chroot and boots them: run as root")
    missing = qemu.missing_tools()
    need(not missing, f"{', '.join(missing)} not installed (scripts/setup.sh installs them)")
    kernel = qemu.KERNELS[name]

    def progress(msg: str) -> None:
        with capsys.disabled():
            print(f"\n{msg}", end="", flush=True)

    image = qemu.ensure_image(kernel, log=progress)
    marked = guest_test_files()
    smoke = FORCE_SMOKE or not marked
    job = (qemu.smoke_step() if smoke else "") \
        + qemu.pytest_step(GUEST_MARKER, "--durations=5 --ignore=tests/test_kernel_matrix.py tests/") \
        + 'exit "$(cat /job/pytest.rc)"\n'
    progress(f"[{name}] booting {kernel.abi} under QEMU (TCG); job: "
             + ("smoke, then " if smoke else "") + f"pytest -m {GUEST_MARKER} ({len(marked)} files marked)")
    res = qemu.boot(image, job, timeout=BOOT_TIMEOUT, env=qemu.guest_env(), log=progress)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.log").write_text(res.output + f"\n# {res.summary()}\n")
    (RESULTS / f"{name}.console.log").write_text(res.console)
    if "junit.xml" in res.files:  # per-test times in the guest
        (RESULTS / f"{name}.junit.xml").write_text(res.files["junit.xml"])
    for line in res.output.splitlines():
        if line.startswith("SMOKE ") or re.match(r"=+ .*(passed|failed|error|no tests ran|deselected).* =+$", line):
            progress(f"[{name}] {line}")
    progress(f"[{name}] {res.summary()} (guest output: {RESULTS / f'{name}.log'})\n")

    rc, output, console = res.rc, res.output, res.console  # short names keep assertion reports short
    assert not res.timed_out, f"{name}: no result within {BOOT_TIMEOUT:.0f} s; console tail:\n{tail(console)}"
    assert rc is not None, f"{name}: the guest job never finished; console tail:\n{tail(console)}"
    if smoke:
        smoke_rc = res.files.get("smoke.rc", "").strip()
        assert smoke_rc == "0", f"{name}: smoke job exited {smoke_rc or '?'}:\n{tail(output)}"
    counts = junit_counts(res.files.get("junit.xml", ""))
    if marked:
        assert rc == 0, f"{name}: guest pytest exited {rc} ({counts}):\n{tail(output)}"
        collected = counts["tests"]
        assert collected >= MIN_GUEST_TESTS, \
            f"{name}: guest ran {collected} {GUEST_MARKER} tests, want >= {MIN_GUEST_TESTS}:\n{tail(output)}"
    else:
        # No marked tests yet: pytest must still collect the whole suite cleanly (5 = none selected).
        assert rc in (0, 5), f"{name}: guest pytest exited {rc} collecting the suite:\n{tail(output)}"
