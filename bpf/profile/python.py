"""Python 3.11 frames: what the BPF program needs to walk the interpreter's own frames,
and what user space needs to name them.

The BPF side (profile.bpf.c's python_sample) starts from `_PyRuntime.gilstate
.tstate_current` (the thread state holding the GIL), checks that its
`native_thread_id` is the sampled thread (else that thread is in C code without the
GIL, and it gets its native stack), then follows `cframe->current_frame` and each
`_PyInterpreterFrame.previous` (in 3.11 one chain per thread, across C calls), keeping
(code object, instruction index) per frame.

Offsets are derived per build, never written down: a small C program compiled at load
time against the headers of that Python version (`python3.X-dev`, with
`Py_BUILD_CORE`) prints them with offsetof(), and each Python process's entry in the
program's `py_procs` map carries its own. `_PyRuntime` and `PyCode_Type` come from
the interpreter's own ELF symbols. Frames are named in user space from the code
objects, read through /proc/PID/mem: `module.qualname:line`, the line decoded from
`co_linetable` (3.11's location table) at the frame's instruction.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sonde.bpf.profile import symbols

OFFSETS_C = r"""
#define Py_BUILD_CORE 1
#include <Python.h>
#include <internal/pycore_runtime.h>
#include <internal/pycore_frame.h>
#include <stddef.h>
#include <stdio.h>
#define P(name, value) printf("%s %ld\n", name, (long)(value))
int main(void) {
    P("version_hex", PY_VERSION_HEX);
    P("runtime_tstate_current", offsetof(_PyRuntimeState, gilstate.tstate_current));
    P("tstate_cframe", offsetof(PyThreadState, cframe));
    P("tstate_native_thread_id", offsetof(PyThreadState, native_thread_id));
    P("cframe_current_frame", offsetof(_PyCFrame, current_frame));
    P("frame_code", offsetof(_PyInterpreterFrame, f_code));
    P("frame_previous", offsetof(_PyInterpreterFrame, previous));
    P("frame_prev_instr", offsetof(_PyInterpreterFrame, prev_instr));
    P("code_filename", offsetof(PyCodeObject, co_filename));
    P("code_qualname", offsetof(PyCodeObject, co_qualname));
    P("code_linetable", offsetof(PyCodeObject, co_linetable));
    P("code_firstlineno", offsetof(PyCodeObject, co_firstlineno));
    P("code_adaptive", offsetof(PyCodeObject, co_code_adaptive));
    P("object_type", offsetof(PyObject, ob_type));
    P("unicode_state", offsetof(PyASCIIObject, state));
    P("unicode_length", offsetof(PyASCIIObject, length));
    P("ascii_data", sizeof(PyASCIIObject));
    P("compact_data", sizeof(PyCompactUnicodeObject));
    P("bytes_size", offsetof(PyVarObject, ob_size));
    P("bytes_data", offsetof(PyBytesObject, ob_sval));
    return 0;
}
"""

_derived: dict[str, dict[str, int] | str] = {}


def derive_offsets(version: str, include_root: Path = Path("/usr/include")) -> dict[str, int]:
    """Offsets for Python `version` ("3.11"), from its -dev headers. Raises ValueError
    with a one-line reason when they cannot be had."""
    if version in _derived:
        got = _derived[version]
        if isinstance(got, str):
            raise ValueError(got)
        return got
    try:
        headers = Path(include_root) / f"python{version}"
        if not (headers / "internal" / "pycore_frame.h").exists():
            raise ValueError(f"no {headers}/internal headers: install python{version}-dev for Python frames")
        cc = shutil.which("gcc") or shutil.which("cc")
        if not cc:
            raise ValueError("no C compiler to read Python's struct offsets: install gcc for Python frames")
        with tempfile.TemporaryDirectory(prefix="sonde-pyoffsets-") as tmp:
            src, exe = Path(tmp) / "offsets.c", Path(tmp) / "offsets"
            src.write_text(OFFSETS_C)
            r = subprocess.run([cc, f"-I{headers}", "-o", str(exe), str(src)], capture_output=True, text=True,
                               timeout=120)
            if r.returncode:
                raise ValueError(f"python{version}-dev headers did not compile: "
                                 f"{(r.stderr.strip().splitlines() or ['?'])[0]}")
            out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30).stdout
        offsets = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
        hexv = offsets["version_hex"]
        if f"{hexv >> 24}.{(hexv >> 16) & 0xff}" != version:
            raise ValueError(f"the python{version} headers are for another version ({hexv:#x})")
        if version != "3.11":
            raise ValueError(f"Python {version}: frames are walked for 3.11 only (its frame layout)")
        _derived[version] = offsets
        return offsets
    except ValueError as e:
        _derived[version] = str(e)
        raise


def proc_entry(leaf_type, interp: "Interpreter", offsets: dict[str, int]):
    """The py_procs value for one process (profile.bpf.c's struct py_proc_t). The BPF
    walk reads 64 bytes from f_code and takes `previous` and `prev_instr` from 8-byte
    words of that span: a layout where they do not fit is refused (ValueError)."""
    rel = {k: offsets[k] - offsets["frame_code"] for k in ("frame_previous", "frame_prev_instr")}
    if any(v <= 0 or v > 56 or v % 8 for v in rel.values()):
        raise ValueError(f"Python {interp.version}'s frame layout is not the one the BPF walk reads")
    return leaf_type(interp.runtime + offsets["runtime_tstate_current"], offsets["tstate_native_thread_id"],
                     offsets["tstate_cframe"], offsets["cframe_current_frame"], offsets["frame_code"],
                     rel["frame_previous"], rel["frame_prev_instr"], offsets["code_adaptive"], 0)


# --- 3.11's location table (Objects/locations.md) -------------------------------------


def _varint(data: bytes, i: int) -> tuple[int, int]:
    b = data[i]
    i += 1
    value, shift = b & 63, 0
    while b & 64:
        b = data[i]
        i += 1
        shift += 6
        value |= (b & 63) << shift
    return value, i


def _svarint(data: bytes, i: int) -> tuple[int, int]:
    v, i = _varint(data, i)
    return (-(v >> 1) if v & 1 else v >> 1), i


def line_at(linetable: bytes, firstlineno: int, index: int) -> int | None:
    """The source line of code unit `index` (not bytes: units of 2), or None when the
    table gives that instruction no location."""
    line, addr, i = firstlineno, 0, 0
    try:
        while i < len(linetable):
            b = linetable[i]
            i += 1
            code, length = (b >> 3) & 15, (b & 7) + 1
            this: int | None = line
            if code == 15:
                this = None
            elif code == 14:
                delta, i = _svarint(linetable, i)
                line += delta
                this = line
                for _ in range(3):  # end line, column, end column
                    _, i = _varint(linetable, i)
            elif code == 13:
                delta, i = _svarint(linetable, i)
                line += delta
                this = line
            elif code >= 10:
                line += code - 10
                this = line
                i += 2
            else:
                i += 1
            if addr <= index < addr + length:
                return this
            addr += length
    except IndexError:
        return None
    return None


# --- one Python process -------------------------------------------------------------


_VERSION = re.compile(r"(?:^|/)(?:lib)?python(\d)\.(\d+)")


@dataclass
class Interpreter:
    version: str
    runtime: int        # address of _PyRuntime in the process
    code_type: int      # address of PyCode_Type, to check that a pointer is a code object
    path: str


def find_interpreter(proc_root: Path, pid: int) -> Interpreter | None:
    """The CPython a process runs (the python3.X executable or libpython3.X.so that
    defines _PyRuntime), with its runtime addresses; None if it runs none."""
    try:
        maps = symbols.parse_maps((Path(proc_root) / str(pid) / "maps").read_text())
    except OSError:
        return None
    for m in maps:
        ver = _VERSION.search(m.path) if m.offset == 0 else None
        if not ver:
            continue
        path = Path(proc_root) / str(pid) / "map_files" / f"{m.start:x}-{m.end:x}" if m.deleted else Path(m.path)
        found, base_vaddr = _elf_symbols(path, ("_PyRuntime", "PyCode_Type"))
        if "_PyRuntime" not in found or "PyCode_Type" not in found or base_vaddr is None:
            continue
        # m maps file offset 0, which the first PT_LOAD maps at base_vaddr (page-aligned):
        # the load bias is 0 for a non-PIE executable, the base address for PIE or a .so.
        bias = m.start - (base_vaddr & ~0xFFF)
        return Interpreter(f"{ver.group(1)}.{ver.group(2)}", bias + found["_PyRuntime"],
                           bias + found["PyCode_Type"], m.path)
    return None


_elf_cache: dict[tuple, tuple[dict[str, int], int | None]] = {}


def _elf_symbols(path: Path, names: tuple[str, ...]) -> tuple[dict[str, int], int | None]:
    """name -> vaddr of the symbols found, and the vaddr of the PT_LOAD at file offset 0
    (read once per file: the agent asks for every busy process)."""
    try:
        st = os.stat(path)
    except OSError:
        return {}, None
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, names)
    if key not in _elf_cache:
        _elf_cache[key] = _read_elf_symbols(path, names)
    return _elf_cache[key]


def _read_elf_symbols(path: Path, names: tuple[str, ...]) -> tuple[dict[str, int], int | None]:
    try:
        from elftools.elf.elffile import ELFFile
        with open(path, "rb") as f:
            elf = ELFFile(f)
            base = next((s["p_vaddr"] for s in elf.iter_segments()
                         if s["p_type"] == "PT_LOAD" and s["p_offset"] == 0), None)
            out = {}
            for sec_name in (".dynsym", ".symtab"):
                sec = elf.get_section_by_name(sec_name)
                if sec is None:
                    continue
                for name in names:
                    for sym in (sec.get_symbol_by_name(name) or []) if name not in out else []:
                        if sym["st_value"]:
                            out[name] = sym["st_value"]
            return out, base
    except Exception:  # an unreadable or odd ELF: no Python frames, the native stack stays
        return {}, None


class CodeReader:
    """Reads code objects of one process through /proc/PID/mem, once per address."""

    def __init__(self, proc_root: Path, pid: int, interp: Interpreter, offsets: dict[str, int]):
        self.pid = pid
        self.interp = interp
        self.o = offsets
        self._cache: dict[int, tuple[str, bytes, int] | None] = {}
        self._frames: dict[tuple[int, int], str] = {}  # (code, instruction) -> "module.function:line"
        try:
            self._fd = os.open(Path(proc_root) / str(pid) / "mem", os.O_RDONLY)
        except OSError:
            self._fd = None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _read(self, addr: int, size: int) -> bytes:
        if self._fd is None or not addr:
            return b""
        try:
            return os.pread(self._fd, size, addr)
        except OSError:
            return b""

    def _ptr(self, addr: int) -> int:
        b = self._read(addr, 8)
        return int.from_bytes(b, "little") if len(b) == 8 else 0

    def _str(self, obj: int) -> str | None:
        state = self._read(obj + self.o["unicode_state"], 4)
        length = self._ptr(obj + self.o["unicode_length"])
        if len(state) != 4 or not 0 <= length < 4096:
            return None
        bits = int.from_bytes(state, "little")
        kind, compact, ascii_ = (bits >> 2) & 7, (bits >> 5) & 1, (bits >> 6) & 1
        if not compact:
            return None
        data = obj + (self.o["ascii_data"] if ascii_ else self.o["compact_data"])
        raw = self._read(data, length * kind)
        codec = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}.get(kind)
        return raw.decode(codec, errors="replace") if codec and len(raw) == length * kind else None

    def code(self, addr: int) -> tuple[str, bytes, int] | None:
        """(module.qualname, linetable, first line) of a code object, None if addr is not one
        (or could not be read: only a successful read is kept)."""
        if addr in self._cache:
            return self._cache[addr]
        got = self._code(addr)
        if got is not None or self._read(addr, 8):
            self._cache[addr] = got
        return got

    def _code(self, addr: int):
        if self._ptr(addr + self.o["object_type"]) != self.interp.code_type:
            return None
        qualname = self._str(self._ptr(addr + self.o["code_qualname"]))
        filename = self._str(self._ptr(addr + self.o["code_filename"])) or "?"
        if qualname is None:
            return None
        table = self._ptr(addr + self.o["code_linetable"])
        size = self._ptr(table + self.o["bytes_size"])
        linetable = self._read(table + self.o["bytes_data"], size) if 0 <= size < (1 << 20) else b""
        first = int.from_bytes(self._read(addr + self.o["code_firstlineno"], 4) or b"\0\0\0\0", "little", signed=True)
        module = Path(filename.strip("<>")).stem.replace("frozen ", "") or "?"
        return f"{module}.{qualname}", linetable, first

    def frame(self, code: int, index: int) -> str:
        got = self.code(code)
        if got is None:
            if self._fd is None or not self._read(code, 8):
                return "[python: process exited before its code was read]"
            return "[python: not a code object]"
        key = (code, index)
        text = self._frames.get(key)
        if text is None:  # a code object's line table never changes: decoded once per instruction
            name, table, first = got
            line = line_at(table, first, index)
            text = self._frames[key] = f"{name}:{line if line is not None else '?'}"
        return text
