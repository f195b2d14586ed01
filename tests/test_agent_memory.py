"""The agent's resident memory: bcc's compiler libraries leave it once the probes are loaded."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import need

from sonde.ingest.runtime.memory import compiler_mappings

pytestmark = [pytest.mark.hot_path]

MAPS = """\
55d0a6a00000-55d0a6a2c000 r--p 00000000 08:01 1311 /usr/bin/python3.11
7f3a10000000-7f3a10400000 r--p 00000000 08:01 2201 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f3a10400000-7f3a13000000 r-xp 00400000 08:01 2201 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
7f3a14000000-7f3a14100000 r--p 00000000 08:01 2300 /usr/lib/llvm-14/lib/libclang-cpp.so.14
7f3a15000000-7f3a15001000 rw-p 00000000 00:00 0
7f3a16000000-7f3a16200000 r-xp 00000000 08:01 2400 /usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0
7f3a17000000-7f3a17001000 r-xp 00000000 08:01 2500 /home/x/libLLVMish-not-a-dir/libc.so.6
"""


def test_only_the_compiler_libraries_are_chosen():
    assert compiler_mappings(MAPS) == [(0x7f3a10000000, 0x400000), (0x7f3a10400000, 0x2c00000),
                                       (0x7f3a14000000, 0x100000)]


def test_loading_a_probe_then_releasing_shrinks_the_resident_set(bpf_ready, tmp_path):
    """A real compile (the tcp probe), then the release: the compiler's code (tens of MB)
    leaves the resident set, and the probe still polls afterwards (nothing it needs was lost)."""
    script = textwrap.dedent(f"""
        from sonde.ingest.config import Config
        from sonde.ingest.runtime.memory import release_compiler_pages
        from sonde.ingest.runtime.probe import LoadedProbe, discover

        def compiler_code_kb():
            # (resident, private) kB of the compiler libraries' code (their r-x mappings);
            # pages another process also maps (another bcc user) are shared, not ours
            rss = private = 0
            ours = False
            for line in open("/proc/self/smaps"):
                fields = line.split()
                if "-" in fields[0] and len(fields) >= 5:
                    ours = len(fields) >= 6 and fields[1] == "r-xp" and ("libLLVM" in fields[5] or "libclang" in fields[5])
                elif ours and fields[0] == "Rss:":
                    rss += int(fields[1])
                elif ours and fields[0] in ("Private_Clean:", "Private_Dirty:"):
                    private += int(fields[1])
            return rss, private

        p = LoadedProbe.load(discover()["tcp"], Config(host="t", state_dir={str(tmp_path / 'state')!r}))
        before, _ = compiler_code_kb()
        asked = release_compiler_pages()
        _, private_after = compiler_code_kb()
        points, me = p.poll(1)
        print(before, private_after, asked, me.fields["poll_success"])
        p.close()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    need(out.returncode == 0 or "bcc" not in out.stderr, "bcc importable")
    assert out.returncode == 0, out.stderr[-2000:]
    before, private_after, asked, ok = (int(x) for x in out.stdout.split())
    assert asked > 30 * 2**20, f"only {asked} bytes of compiler mappings found"
    assert before > 20 * 1024, f"only {before} kB of compiler code resident after a compile"
    assert private_after < 1024, f"{private_after} kB of compiler code only this process maps is still resident"
    assert ok == 1
