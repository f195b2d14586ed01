"""The agent's resident memory after its probes are loaded.

bcc compiles each probe with LLVM and clang, which map ~85 MB of library code and data
into the agent; once the probes are loaded nothing runs that code until another
compile. `release_compiler_pages()` asks the kernel to reclaim those pages
(MADV_PAGEOUT, 5.4+): clean file pages leave the agent's resident set and page cache
keeps or reclaims them like any file; pages the dynamic linker wrote stay, since
there is no swap to put them. Nothing is lost: a later compile faults the code back
in. So the agent's resident set is what it really uses while polling.
"""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path

log = logging.getLogger("sonde.agent")

MADV_PAGEOUT = 21  # include/uapi/asm-generic/mman-common.h, Linux 5.4+
COMPILER_LIBS = ("libLLVM", "libclang", "libclang-cpp")


def compiler_mappings(maps_text: str) -> list[tuple[int, int]]:
    """(start, length) of every mapping of the compiler libraries, from /proc/<pid>/maps text."""
    out = []
    for line in maps_text.splitlines():
        parts = line.split()
        if len(parts) < 6 or not Path(parts[5]).name.startswith(COMPILER_LIBS):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append((lo, hi - lo))
    return out


def release_compiler_pages(maps_path: Path = Path("/proc/self/maps")) -> int:
    """Ask the kernel to page out the compiler libraries' pages; the bytes asked for
    (0 when there are none or the kernel refuses: the agent then just keeps them)."""
    try:
        spans = compiler_mappings(maps_path.read_text())
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return 0
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    asked = 0
    for start, length in spans:
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), MADV_PAGEOUT) == 0:
            asked += length
        else:
            log.debug("madvise(MADV_PAGEOUT) refused for %#x+%d: errno %d", start, length, ctypes.get_errno())
    return asked
