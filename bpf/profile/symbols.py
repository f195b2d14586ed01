"""Stack symbolisation: instruction addresses to frame names a person can read.

Pure parsers first (tested on literal text): /proc/PID/maps, /proc/kallsyms and a JVM
perf map (/tmp/perf-PID.map). Then the readers: ELF symbols through pyelftools
(.symtab, else .dynsym, plus /usr/lib/debug/.build-id debuginfo where present), and a
per-process resolver that reads /proc through an injectable root.

Honesty rules, because a flame graph of garbage looks just as convincing as a real one:
- an address resolves to a symbol only inside that symbol's [start, start + size);
  otherwise it is shown as `object+0xOFFSET` (a stripped binary, a static function
  seen only through .dynsym);
- a user stack walked by frame pointers is trusted only when it reaches the C
  runtime's start code (`main`, `start_thread`, or a return into libc/ld.so, which is
  where every thread's chain ends). Otherwise it is cut after the first frame whose
  code has no frame pointers (or the first address in no executable mapping), and a
  `[truncated: ...]` marker frame takes the place of what could not be walked.
"""
from __future__ import annotations

import bisect
import io
import os
import re
import shutil
import subprocess
from array import array
from dataclasses import dataclass
from pathlib import Path

# Frame names that start a thread's chain: nothing above them is the program's code.
ROOTS = frozenset({"main", "_start", "__libc_start_main", "__libc_start_call_main", "start_thread",
                   "clone", "clone3", "thread_start"})
# Objects holding the C runtime's start code (glibc, the dynamic loader): a chain whose
# outermost frame returns into them has been walked to its start.
RUNTIME_OBJECTS = re.compile(r"^(libc\.so|libc-2\.|ld-linux|ld-.*\.so|libpthread)")
KERNEL_SUFFIX = "_[k]"
JIT_SUFFIX = "_[j]"


# --- pure parsers ------------------------------------------------------------------


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str           # "" for anonymous memory; "[vdso]", "[stack]", ...
    deleted: bool = False

    @property
    def executable(self) -> bool:
        return "x" in self.perms

    @property
    def name(self) -> str:
        return os.path.basename(self.path) if self.path.startswith("/") else (self.path or "[anon]")


_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+)\s+(\S{4})\s+([0-9a-f]+)\s+\S+\s+(\d+)\s*(.*)$")


def parse_maps(text: str) -> list[Mapping]:
    """/proc/PID/maps lines, in address order."""
    out = []
    for line in text.splitlines():
        m = _MAPS_LINE.match(line)
        if not m:
            continue
        path = m.group(6).strip()
        deleted = path.endswith(" (deleted)")
        if deleted:
            path = path[: -len(" (deleted)")]
        out.append(Mapping(int(m.group(1), 16), int(m.group(2), 16), m.group(3), int(m.group(4), 16),
                           int(m.group(5)), path, deleted))
    return out


class SymbolTable:
    """Sorted (start, size, name) with lookup by address inside [start, start + size).
    Kept in arrays: the kernel's table alone has over 100,000 symbols, and the agent
    keeps it for its lifetime."""

    def __init__(self, symbols):
        rows = sorted({(s, n, name) for s, n, name in symbols if s})
        self._starts = array("Q", (r[0] for r in rows))
        self._sizes = array("Q", (r[1] for r in rows))
        # Names in one buffer, not 100,000 small strings: nothing small outlives the
        # parse, so the allocator can hand the parse's memory back.
        encoded = [r[2].encode() for r in rows]
        self._name_at = array("Q", [0])
        for name in encoded:
            self._name_at.append(self._name_at[-1] + len(name))
        self._names = b"".join(encoded)
        # The furthest end of any symbol so far, for addresses inside a long symbol that
        # starts before shorter ones.
        self._reach = array("Q")
        reach = 0
        for start, size in zip(self._starts, self._sizes):
            reach = max(reach, start + size)
            self._reach.append(reach)

    def __len__(self) -> int:
        return len(self._starts)

    def name(self, i: int) -> str:
        return self._names[self._name_at[i]:self._name_at[i + 1]].decode(errors="replace")

    def lookup(self, addr: int) -> tuple[str, int] | None:
        """(name, offset into it) or None when no symbol covers addr."""
        i = bisect.bisect_right(self._starts, addr) - 1
        while i >= 0 and self._reach[i] > addr:
            start, size = self._starts[i], self._sizes[i]
            if start <= addr < start + max(size, 1):
                return self.name(i), addr - start
            i -= 1
        return None


def parse_kallsyms(text: str) -> SymbolTable:
    """/proc/kallsyms text symbols. kallsyms gives no sizes: a symbol runs to the next
    one (that is how the kernel itself prints addresses)."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[1] not in "tTwW":
            continue
        addr = int(parts[0], 16)
        if addr:
            rows.append((addr, parts[2]))
    rows.sort()
    return SymbolTable((a, (rows[i + 1][0] - a) if i + 1 < len(rows) else 4096, n) for i, (a, n) in enumerate(rows))


def parse_perf_map(text: str) -> SymbolTable:
    """A JVM perf map (`jcmd PID Compiler.perfmap` writes /tmp/perf-PID.map): one
    `START SIZE name` line per code blob, hex with or without 0x."""
    rows = []
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) != 3:
            continue
        try:
            rows.append((int(parts[0], 16), int(parts[1], 16), parts[2].strip()))
        except ValueError:
            continue
    return SymbolTable(rows)


# --- ELF -----------------------------------------------------------------------------


@dataclass
class ElfInfo:
    symbols: SymbolTable
    segments: list[tuple[int, int, int]]  # PT_LOAD (file offset, vaddr, file size)
    stripped: bool                        # no .symtab (and no debuginfo file)
    frame_pointers: bool | None           # None: not enough functions to tell
    build_id: str = ""
    error: str = ""
    frameless: "Starts" = None  # starts of functions that set up no frame pointer

    def __post_init__(self):
        if not isinstance(self.frameless, Starts):
            self.frameless = Starts(self.frameless or ())

    def vaddr(self, file_offset: int) -> int | None:
        for off, vaddr, size in self.segments:
            if off <= file_offset < off + size:
                return file_offset - off + vaddr
        return None


_FP_PROLOGUES = (b"\x55\x48\x89\xe5", b"\xf3\x0f\x1e\xfa\x55\x48\x89\xe5")  # push %rbp; mov %rsp,%rbp (after endbr64)


def _elf_symbols(elf) -> tuple[list[tuple[int, int, str]], bool]:
    rows, has_symtab = [], False
    for name in (".symtab", ".dynsym"):
        sec = elf.get_section_by_name(name)
        if sec is None or not hasattr(sec, "iter_symbols"):
            continue
        has_symtab |= name == ".symtab"
        for sym in sec.iter_symbols():
            if sym["st_info"]["type"] in ("STT_FUNC", "STT_GNU_IFUNC") and sym["st_value"] and sym.name:
                rows.append((sym["st_value"], sym["st_size"], sym.name))
        if rows and name == ".symtab":
            break  # .symtab is a superset of .dynsym
    return rows, has_symtab


def _build_id(elf) -> str:
    for sec in elf.iter_sections():
        if sec["sh_type"] == "SHT_NOTE":
            for note in sec.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return note["n_desc"]
    return ""


# The C runtime's start files, linked into every program and built without frame
# pointers whatever the program's flags: they say nothing about the program's own code.
_CRT = frozenset({"_start", "_init", "_fini", "deregister_tm_clones", "register_tm_clones",
                  "__do_global_dtors_aux", "frame_dummy", "__libc_csu_init", "__libc_csu_fini",
                  "_dl_relocate_static_pie"})


class Starts:
    """A sorted set of addresses in an array (a frozenset of ints costs ~10x the memory)."""

    def __init__(self, addrs):
        self._a = array("Q", sorted(set(addrs)))

    def __contains__(self, addr: int) -> bool:
        i = bisect.bisect_left(self._a, addr)
        return i < len(self._a) and self._a[i] == addr

    def __len__(self) -> int:
        return len(self._a)


def frame_pointer_share(code_at, functions) -> tuple[float | None, "Starts"]:
    """(share of functions whose code starts with the frame-pointer prologue, or None
    with too few functions to judge; the starts of those that do not). code_at(vaddr)
    returns the first bytes there (or b"")."""
    frameless = Starts(s for s, n, _ in functions if n and not code_at(s).startswith(_FP_PROLOGUES))
    judged = {(s, n) for s, n, name in functions if n >= 8 and name not in _CRT}
    if len(judged) < 4:
        return None, frameless
    return sum(1 for s, _ in judged if s not in frameless) / len(judged), frameless


def read_elf(path: str | Path, debug_root: Path = Path("/usr/lib/debug"), image: bytes | None = None) -> ElfInfo:
    """Symbols and load segments of an ELF file (or of an in-memory `image`, such as the
    vDSO), with the frame-pointer verdict. Never raises: a file that cannot be read
    gives an empty table and `error`."""
    try:
        from elftools.common.exceptions import ELFError
        from elftools.elf.elffile import ELFFile
    except ImportError:
        return ElfInfo(SymbolTable([]), [], True, None, error="pyelftools is not installed")
    try:
        with (io.BytesIO(image) if image is not None else open(path, "rb")) as f:
            elf = ELFFile(f)
            segments = [(s["p_offset"], s["p_vaddr"], s["p_filesz"]) for s in elf.iter_segments()
                        if s["p_type"] == "PT_LOAD"]
            rows, has_symtab = _elf_symbols(elf)
            build_id = _build_id(elf)

            def code_at(vaddr: int) -> bytes:
                for off, va, size in segments:
                    if va <= vaddr < va + size:
                        f.seek(vaddr - va + off)
                        return f.read(8)
                return b""

            share, frameless = frame_pointer_share(code_at, rows)
    except (OSError, ELFError, ValueError) as e:
        return ElfInfo(SymbolTable([]), [], True, None, error=str(e).splitlines()[0] if str(e) else type(e).__name__)
    if not has_symtab and build_id:
        debug = Path(debug_root) / ".build-id" / build_id[:2] / f"{build_id[2:]}.debug"
        if debug.exists():
            dbg = read_elf(debug, debug_root=Path("/nonexistent"))
            if len(dbg.symbols):
                return ElfInfo(dbg.symbols, segments, False, None if share is None else share >= 0.5, build_id)
    return ElfInfo(SymbolTable(rows), segments, not has_symtab, None if share is None else share >= 0.5, build_id,
                   frameless=frameless)


def demangle(names: set[str]) -> dict[str, str]:
    """C++ names through binutils' c++filt, when it is installed; others unchanged."""
    mangled = sorted(n for n in names if n.startswith("_Z"))
    tool = shutil.which("c++filt")
    if not mangled or not tool:
        return {}
    try:
        out = subprocess.run([tool], input="\n".join(mangled), capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    lines = out.splitlines()
    return dict(zip(mangled, lines)) if len(lines) == len(mangled) else {}


# --- per-process resolution ---------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    name: str
    obj: str = ""          # the object's file name, "[kernel]", "[jit]"
    fp: bool | None = True  # whether that code keeps frame pointers (None: unknown)
    mapped: bool = True     # False: the address is in no executable mapping (garbage)
    frameless: bool = False  # the function sets up no frame of its own (a leaf's caller is then skipped)


@dataclass
class Resolved:
    frames: list[str]      # leaf first
    truncated: str = ""    # why the walk could not be trusted past its last frame


class ElfCache:
    """ELF files read once per (device, inode, size, mtime) for the whole session."""

    def __init__(self):
        self._by_key: dict[tuple, ElfInfo] = {}
        self.vdso: ElfInfo | None = None

    def get(self, path: Path) -> ElfInfo:
        try:
            st = os.stat(path)
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError as e:
            return ElfInfo(SymbolTable([]), [], True, None, error=e.strerror or str(e))
        if key not in self._by_key:
            self._by_key[key] = read_elf(path)
        return self._by_key[key]


class ProcessSymbols:
    """Resolves one process's user addresses. Reads /proc/PID/maps while the process
    lives (`refresh`), and keeps the last maps it saw, so samples taken before an exit
    still resolve. A deleted executable is read through /proc/PID/map_files."""

    def __init__(self, proc_root: Path, pid: int, elves: ElfCache):
        self.proc = Path(proc_root)
        self.pid = pid
        self.elves = elves
        self.maps: list[Mapping] = []
        self._starts: list[int] = []
        self.jit: SymbolTable | None = None
        self.jit_frame_pointers = False
        self.notes: list[str] = []
        self._noted: set[str] = set()
        self._elf: dict[tuple[int, int], ElfInfo] = {}
        self.exited = False

    def note(self, text: str) -> None:
        if text not in self._noted:
            self._noted.add(text)
            self.notes.append(text)

    def refresh(self) -> bool:
        """Re-read the maps; False once the process is gone (the old maps are kept)."""
        try:
            text = (self.proc / str(self.pid) / "maps").read_text()
            if not text:  # a zombie has no memory left (a kernel thread never had any)
                state = (self.proc / str(self.pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state in ("Z", "X"):
                    raise ProcessLookupError
        except (OSError, IndexError):
            self.exited = True
            return False
        maps = [m for m in parse_maps(text) if m.executable]
        if maps:
            self.maps = maps
            self._starts = [m.start for m in maps]
            for m in maps:  # read ELF files now, while map_files still reach deleted ones
                if m.path.startswith("/"):
                    self._elf_of(m)
        return True

    def set_jit_map(self, table: SymbolTable | None, frame_pointers: bool) -> None:
        if table is not None:
            self.jit = table
        self.jit_frame_pointers = frame_pointers

    def mapping(self, addr: int) -> Mapping | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self.maps[i].end:
            return self.maps[i]
        return None

    def _elf_of(self, m: Mapping) -> ElfInfo:
        key = (m.start, m.inode)
        if key in self._elf:
            return self._elf[key]
        path = Path(m.path)
        if m.deleted:
            path = self.proc / str(self.pid) / "map_files" / f"{m.start:x}-{m.end:x}"
        info = self.elves.get(path)
        if m.deleted:
            if info.error:
                self.note(f"pid {self.pid}: {m.path} was deleted and cannot be read back "
                          f"({info.error}); its frames are shown as {m.name}+0xOFFSET")
            else:
                self.note(f"pid {self.pid}: {m.path} was deleted; symbols read through /proc/{self.pid}/map_files")
        self._elf[key] = info
        return info

    def _vdso(self, m: Mapping) -> ElfInfo:
        """The kernel's vDSO (clock_gettime, gettimeofday), read once from the process's
        memory: it is the same image in every process of this kernel."""
        if self.elves.vdso is None:
            try:
                with open(self.proc / str(self.pid) / "mem", "rb") as f:
                    f.seek(m.start)
                    image = f.read(m.end - m.start)
            except OSError:
                return ElfInfo(SymbolTable([]), [], True, None, error="unreadable")
            self.elves.vdso = read_elf("[vdso]", image=image)
        return self.elves.vdso

    def _note_use(self, m: Mapping, info: ElfInfo) -> None:
        """Notes about an object once one of its frames is shown, not for every library mapped."""
        if info.error and not m.deleted:
            self.note(f"pid {self.pid}: cannot read {m.path} ({info.error}); its frames are shown as {m.name}+0xOFFSET")
        elif info.stripped:
            self.note(f"{m.name} is stripped (no .symtab, no debuginfo): functions it does not export are "
                      f"shown as {m.name}+0xOFFSET")

    def frame(self, addr: int) -> Frame:
        m = self.mapping(addr)
        if m is None:
            return Frame(f"[unmapped 0x{addr:x}]", "", False, False)
        if m.path == "[vdso]":
            info = self._vdso(m)
            hit = info.symbols.lookup(addr - m.start + info.segments[0][1]) if info.segments else None
            if hit:
                return Frame(hit[0], m.name, info.frame_pointers, frameless=addr - hit[1] in info.frameless)
        if not m.path.startswith("/"):
            if self.jit is not None and m.path == "":
                hit = self.jit.lookup(addr)
                if hit:
                    return Frame(hit[0] + JIT_SUFFIX, "[jit]", self.jit_frame_pointers)
            label = "[unknown JIT code]" if m.path == "" else m.path
            return Frame(label, m.name, self.jit_frame_pointers if m.path == "" else False)
        info = self._elf_of(m)
        self._note_use(m, info)
        offset = addr - m.start + m.offset
        vaddr = info.vaddr(offset)
        hit = info.symbols.lookup(vaddr) if vaddr is not None else None
        if hit:
            return Frame(hit[0], m.name, info.frame_pointers, frameless=vaddr - hit[1] in info.frameless)
        return Frame(f"{m.name}+0x{offset:x}", m.name, info.frame_pointers)

    def resolve(self, addrs: list[int]) -> Resolved:
        """A user stack (leaf first) as trusted frame names, cut where the walk was not."""
        if not self.maps:
            return Resolved([], "process exited before its stacks were read")
        frames = [self.frame(a) for a in addrs]
        # Where the chain reached a thread's start: a root by name, or a return into the
        # C runtime (glibc's start code is how every chain of a C, Java or Python
        # program ends). Only the part before any unmapped address counts; frames
        # beyond the start are the runtime's own leftovers: dropped.
        mapped = next((i for i, fr in enumerate(frames) if not fr.mapped), len(frames))
        end = None
        for i, fr in enumerate(frames[:mapped]):
            if fr.name in ROOTS:
                end = i
                while end + 1 < mapped and RUNTIME_OBJECTS.match(frames[end + 1].obj):
                    end += 1
                break
        if end is None and mapped > 1 and RUNTIME_OBJECTS.match(frames[mapped - 1].obj):
            end = mapped - 1
        if end is not None:
            names = [fr.name for fr in frames[:end + 1]]
            if end > 0 and frames[0].frameless:
                # A function that sets up no frame leaves the frame pointer at its caller's
                # frame: the walk's next return address is the caller's caller's.
                names.insert(1, f"[caller unknown: {frames[0].name} sets up no frame pointer]")
            return Resolved(names)
        # Not walked to a start: keep what is certain, up to the first frame whose code
        # does not keep a frame pointer (the next return address came from a guess).
        kept, why = [], "stack not walked to its start"
        for i, fr in enumerate(frames):
            if not fr.mapped:
                why = "an address in no mapping (frame pointers lost)"
                break
            kept.append(fr.name)
            if fr.fp is False:
                why = "JIT code without -XX:+PreserveFramePointer" if fr.obj in ("[jit]", "[anon]") \
                    else f"{fr.obj} has no frame pointers"
                break
        return Resolved(kept, why)


class KernelSymbols:
    def __init__(self, table: SymbolTable):
        self.table = table

    @classmethod
    def load(cls, proc_root: Path) -> "KernelSymbols":
        try:
            return cls(parse_kallsyms((Path(proc_root) / "kallsyms").read_text()))
        except OSError:
            return cls(SymbolTable([]))

    def name(self, addr: int) -> str:
        hit = self.table.lookup(addr)
        return (hit[0] if hit else f"0x{addr:x}") + KERNEL_SUFFIX
