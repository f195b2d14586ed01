"""l7: requests, errors and durations (RED) for HTTP/1.x, Redis, PostgreSQL and MySQL,
per process x peer x protocol x operation. Off by default, and opt-in per process
(`probes.l7`: process names, executables, listening ports, cgroups).

What fires, and when:
- while no process is opted in: nothing per syscall. The syscall hooks are
  detached; only rare events run a program (`sched_process_exec`, `_fork`, `_exit`:
  a fork or exit of a process that is not opted in stops at one bitmap test, an
  exec sends a small record so the agent can match the new program);
- while a process is opted in, on a kernel with the socket tracepoints (6.3+,
  `probes.l7.hooks: auto` or `sockets`): one raw tracepoint program at the end of
  every sendmsg and recvmsg on a socket (`sock:sock_send_length`,
  `sock_recv_length`) and one at every TCP state change (`inet_sock_set_state`).
  Nothing else on the host runs a program: a process that is not opted in pays
  only on its socket I/O, and stops at one bit test in an array map keyed by tgid
  (inlined by the verifier, no helper call). For an opted-in process the program
  reads the syscall's own arguments from the user registers the task saved at its
  entry (read, readv, recvfrom, recvmsg, write, writev, sendto, sendmsg, sendfile;
  anything else, such as io_uring, is not captured) and copies a prefix of the
  bytes really moved (iovecs followed in order) and the true length into a 16 MiB
  ring buffer: 4 KiB per call for a connection whose first bytes are an HTTP/1.x
  request or status line (its bodies are skipped by length), else up to 32 KiB
  (Redis, PostgreSQL and MySQL parsers need every message head of a long result);
  the agent corrects that guess once its parser knows the protocol. A recv with
  MSG_PEEK is not captured (the read that takes the bytes is). A full ring buffer
  drops the event and counts it, per connection and direction, and the agent
  hands the parser a gap there. A connection ends when its socket reaches
  TCP_CLOSE, or when its fd turns up naming another socket;
- on older kernels (`hooks: syscalls`, or auto without the socket tracepoints):
  one raw tracepoint program at every syscall entry and exit on the host
  (`raw_syscalls:sys_enter`, `sys_exit`): at entry a compare of the syscall number
  with the ten it wants, then the bit test; at exit the bit test. The nine calls'
  arguments wait per thread for the exit, which copies as above; close() ends a
  connection. Every syscall of every process then takes the kernel's slow path
  (measured below);
- per new (process, fd): one look at the fd through the running kernel's own
  offsets (BTF): only TCP sockets are captured, anything else is remembered as
  skipped in the kernel; the peer address and ports are read then, so a
  connection that is gone before the agent looks still has its peer;
- TLS: uprobes on libssl's SSL_read, SSL_write, SSL_read_ex and SSL_write_ex in
  each opted-in process (found in /proc/PID/maps, or in the executable when it
  exports them), attached with the process's pid and inherited by its forks (the
  kernel copies them to a child before it runs, so a worker forked later is
  captured from its first call); the fd is the socket the same thread reads or
  writes inside the call, so no SSL struct is read;
- per poll: the opt-in set is matched again against the config (new processes,
  listening ports, exec), aggregates are written, connections of exited processes
  end.

Why socket tracepoints: once any syscall tracepoint is in use, every task on the
host takes the kernel's syscall slow path, whatever the program does. With nginx
and wrk on one host, empty raw sys_enter/sys_exit programs cost nginx 10.35 % of its
requests (bench/results/syscalls_floor_toggle.json), and the l7 probe on them, with
only an idle redis opted in, 10.31 % (l7_redis_opted_nginx_syscalls_toggle.json).
Empty programs on the socket tracepoints cost 1.93 % (sockets_floor_toggle.json),
and the l7 probe on them 2.99 % (l7_redis_opted_nginx_toggle.json): they run only
where a socket moves bytes, with no slow path. The `syscalls:sys_enter_<name>`
events are no cheaper than raw ones: they are run from the same sys_enter
tracepoint and add a perf record on top.

Counting in the kernel (`probes.l7.in_kernel`, on by default): a connection whose
first bytes are one whole HTTP/1.x request head (a known method, the head's end at
the read's end and nowhere before it, at most 512 bytes) or one whole RESP command
(an array of at most 8 bulk strings whose lengths add up to the read) is counted in
the kernel, and nothing of it goes to the agent. The request waits in the
connection's entry (its time and method or command); the other side's next read or
write completes it from its first bytes (a status line 200-599, or a reply type)
into a per-CPU map of (process, role, peer, port, protocol, op, status, exp2 slot)
that the agent reads and clears each poll, one generation at a time. More bytes
of a response already counted (a body, a large reply) are passed over. The first
thing the kernel cannot be sure of (two requests in one read, a request while
one waits, a body in the request's read, a 1xx, anything that is not a message
start) hands the connection to the parser for good, from that call on, with the
request that waits. Pipelines, request bodies, PostgreSQL, MySQL and TLS are the
parser's. A request that still waits when its connection ends is `no_response`,
as in the parser. On this path a response's duration ends at the first read or
write of it (the parser's at its last): for a response in one write, the same.

Parsing is in the agent (bpf/l7/protocols/: pure functions of bytes): each
connection's events go to a `Connection`, which pairs requests with responses in a
FIFO (each pipelined request counted) and counts what it cannot pair. Only the
protocol, the operation class (method, command, SQL verb), the status class, an HTTP
error's status code (from a closed set: `l7_http_errors`) and the timings leave the
parser; no payload byte is kept or written. A request still waiting for its response
when its connection ends (the peer reset or closed it) is counted per peer as
`no_response`: for a balancer, the requests a backend failed without an answer.

Role and port: a connection whose requests the process receives is `role=server`,
tagged with its local port; one whose requests it sends is `role=client`, tagged
with the remote port. The peer is the remote address.

Opt-in: a process matches when its name (/proc/PID/comm), its executable
(/proc/PID/exe), a TCP port it listens on, or one of its cgroups (any hierarchy,
/proc/PID/cgroup; a path covers the cgroups under it) is in the config, and so is
every process below a matching one (nginx's workers, PostgreSQL's backends, which
do not hold the listening socket): a fork of an opted-in process is opted in at
once by the kernel, also across a later exec. Exec is matched again at once, so a
process that becomes a configured program is opted in without waiting for a poll.
Connections open before the opt-in are picked up at their next read or write, the
protocol detected from the bytes.

Cost: counted in the kernel, a keep-alive request under wrk costs nginx 11.1 % of
its requests on 2 cores (bench/results/l7_nginx_opted_toggle.json; 33.9 % when every
read and write went to the parser): the capture programs take ~1.3 us of run time per
request with statistics on, most of it in nginx's recv and send (the syscall's
arguments, the connection's entry, the bytes read, the map update). The
parser runs in the agent, in Python, at some 10-20 us per read or write
(a keep-alive HTTP request and its response are two events per process). It is held
to `probes.l7.cpu_percent` of one core (25 by default, in 100 ms windows); past it
the ring buffer fills and the kernel drops events, counted. So an opted-in server at
tens of thousands of requests per second costs its host at most that much of a core
for parsing, plus the kernel programs, and its counts are then partial
(`l7_probe.lost_events` and `throttled_seconds` say so), never guessed.

Limits:
- what the agent cannot parse in time is lost, never guessed: under a load past
  the CPU budget the ring buffer fills, the events dropped are counted
  (`l7_probe.lost_events`, per connection in `l7_capture.lost_events`), and the
  requests they carried are `unanswered` or not seen;
- a request's duration runs from the syscall holding its first byte to the one
  holding its response's last, as the process sees it (not the wire);
- a program that execs into a match (by name or executable) is opted in, and its
  libssl probed, when the agent sees the exec, tens of milliseconds later: what it
  says before is not seen (a TLS connection's ciphertext shows as `undetected`).
  Processes forked by an opted-in one are covered at once by the kernel, and so is
  a program an opted-in process execs (the distribution's libssl is probed from the
  opt-in on, and uprobes stay on across an exec);
- on raw syscall hooks (`hooks: syscalls`, kernels before 6.3) a recv with MSG_PEEK
  reads as a read: the peeked bytes are parsed twice (an orphan response each);
- not captured: io_uring, sendmmsg/recvmmsg, splice, kTLS, UNIX sockets, UDP;
  HTTP/2 and HTTP/3; an fd replaced by dup2() or closed by close_range() keeps its
  old connection until the process exits;
- x86-64 only (syscall numbers and pt_regs layout).
"""
from __future__ import annotations

import ctypes as ct
import logging
import os
import socket
import struct
import threading
import time
from collections import defaultdict
from pathlib import Path

from sonde.bpf.l7.protocols.http import METHODS, status_tag
from sonde.bpf.l7.protocols.resp import command as resp_command
from sonde.bpf.l7.protocols.pairing import Connection
from sonde.ingest.errors import SondeError
from sonde.ingest.output.lineproto import Point, printable_name
from sonde.ingest.runtime import btf, hist, procfs, sockdiag, uprobes
from sonde.ingest.runtime.cardinality import OTHER, top_n
from sonde.ingest.runtime.probe import Probe

log = logging.getLogger("sonde.l7")

EVENT = struct.Struct("=QIiQIIBBBBHH16s16s")
EV_DATA, EV_CLOSE, EV_EXEC, EV_FORK, EV_EXIT, EV_FAST, EV_SEED = 1, 2, 3, 4, 5, 6, 7
# In-kernel counting (l7.bpf.c: count_here): the protocols, and agg_key_t.slot of a
# request outstanding when its connection ended.
FAST_PROTOCOLS = {1: "http", 2: "resp"}
CUT_SLOT = 255
F_TLS = 1
F_WIDE = 2  # the event was captured with the wide limit (DENSE_CAPTURE)
PID_BITS = 6  # the optin bitmap: word tgid >> 6, bit tgid & 63
RAW_HOOKS = (("sys_enter", "l7_sys_enter"), ("sys_exit", "l7_sys_exit"))
# Where the kernel has sock_send_length/sock_recv_length (6.3+): hooks that only
# socket I/O runs, and the end of a captured connection at TCP_CLOSE.
SOCK_HOOKS = (("sock_send_length", "l7_sock_send"), ("sock_recv_length", "l7_sock_recv"),
              ("inet_sock_set_state", "l7_sock_state"))
SOCK_EVENTS = ("sock:sock_send_length", "sock:sock_recv_length")
RARE_HOOKS = (("sched_process_exec", "l7_exec"), ("sched_process_fork", "l7_fork"),
              ("sched_process_exit", "l7_exit"))
SSL_PROBES = (("SSL_read", "ssl_read_enter"), ("SSL_write", "ssl_write_enter"),
              ("SSL_read_ex", "ssl_read_ex_enter"), ("SSL_write_ex", "ssl_write_ex_enter"))
LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/usr/lib")
LIBSSL_NAMES = ("libssl.so.3", "libssl.so.1.1")
CAPTURE_FIELDS = ("unanswered", "orphan_responses", "lost_events", "desyncs", "truncated", "aborted", "undetected")
STATUS_FIELDS = {c: f"status_{c}" for c in ("1xx", "2xx", "3xx", "4xx", "5xx")}
UNKNOWN = "unknown"
BUDGET_WINDOW = 0.1  # seconds: the parser's CPU budget (probes.l7.cpu_percent) is kept per window
# Protocols whose parser needs every message head of a response, however long: the
# kernel copies up to 32 KiB of each of their reads and writes (HTTP: 4 KiB, bodies
# are skipped by length).
DENSE = frozenset({"resp", "pgwire", "mysql"})
DENSE_CAPTURE = 32768
HTTP_CAPTURE = 4096


# --- what the kernel must have --------------------------------------------------------------

_MEMBERS = {  # -D name: (struct, member path, size)
    "OFF_TASK_FILES": ("task_struct", "files", 8), "OFF_TASK_PID": ("task_struct", "pid", 4),
    "OFF_TASK_TGID": ("task_struct", "tgid", 4), "OFF_FILES_FDT": ("files_struct", "fdt", 8),
    "OFF_FDT_MAX_FDS": ("fdtable", "max_fds", 4), "OFF_FDT_FD": ("fdtable", "fd", 8),
    "OFF_FILE_INODE": ("file", "f_inode", 8), "OFF_FILE_PRIVATE": ("file", "private_data", 8),
    "OFF_INODE_MODE": ("inode", "i_mode", 2), "OFF_SOCKET_TYPE": ("socket", "type", 2),
    "OFF_SOCKET_SK": ("socket", "sk", 8), "OFF_SK_PROTOCOL": ("sock", "sk_protocol", 2),
    "OFF_SKC_FAMILY": ("sock", "__sk_common.skc_family", 2), "OFF_SKC_DADDR": ("sock", "__sk_common.skc_daddr", 4),
    "OFF_SKC_V6_DADDR": ("sock", "__sk_common.skc_v6_daddr", 16), "OFF_SKC_DPORT": ("sock", "__sk_common.skc_dport", 2),
    "OFF_SKC_NUM": ("sock", "__sk_common.skc_num", 2),
}


def layout(b: btf.BTF) -> dict[str, int]:
    """The -D values of l7.bpf.c from this kernel's BTF; BTFError names what is missing."""
    out = {}
    for name, (struct_name, path, size) in _MEMBERS.items():
        m = b.member(struct_name, path)
        if m.size != size:
            raise btf.BTFError(f"{b.source}: {struct_name}.{path} is {m.size} bytes, not {size}")
        out[name] = m.offset
    for tp, _ in RAW_HOOKS + RARE_HOOKS:
        b.raw_tracepoint_args(tp)  # raises when the kernel has no such raw tracepoint
    # The socket hooks read the user registers a task saved at syscall entry, at the
    # x86-64 ABI's offsets (as sys_enter's context does): the kernel must agree.
    for reg, off in (("r10", 56), ("dx", 96), ("si", 104), ("di", 112), ("orig_ax", 120)):
        if b.offsetof("pt_regs", reg) != off:
            raise btf.BTFError(f"{b.source}: pt_regs.{reg} is at {b.offsetof('pt_regs', reg)}, not {off}")
    if len(b.raw_tracepoint_args("sched_process_exit")) >= 2:  # (task, group_dead): 6.16+
        out["EXIT_GROUP_DEAD"] = 1
    return out


def kernel_features(sys_root) -> list[str]:
    if os.uname().machine != "x86_64":
        return [f"the L7 capture reads x86-64 syscall registers; this machine is {os.uname().machine}"]
    try:
        layout(btf.load(sys_root))
    except SondeError as e:
        return [str(e)]
    return []


def possible_cpus(sys_root) -> int:
    """How many CPU ids the kernel may use (/sys/devices/system/cpu/possible, e.g. 0-7)."""
    try:
        text = (Path(sys_root) / "devices/system/cpu/possible").read_text().strip()
        return max(int(part.split("-")[-1]) for part in text.split(",")) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


def kernel_cflags(sys_root) -> list[str]:
    return [f"-D{k}={v}" for k, v in layout(btf.load(sys_root)).items()] + [f"-DNR_CPUS={possible_cpus(sys_root)}"]


# --- which processes are opted in -----------------------------------------------------------

def _read(path: str) -> bytes | None:
    """A whole /proc file (seq_file files hand out a page or so per read)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks)


def cgroup_paths(text: str) -> list[str]:
    """The cgroup paths of /proc/PID/cgroup ("hierarchy:controllers:path" lines)."""
    return [line.split(":", 2)[2] for line in text.splitlines() if line.count(":") >= 2]


class Matcher:
    """The config's opt-in rules over /proc (an injectable root)."""

    def __init__(self, settings, proc: Path):
        self.proc = str(proc)
        self.names = {n.encode()[:15] for n in getattr(settings, "processes", ())}
        self.exes = set()
        for p in getattr(settings, "executables", ()):
            self.exes |= {p, os.path.realpath(p)}
        self.ports = set(getattr(settings, "ports", ()))
        self.cgroups = tuple(c.rstrip("/") or "/" for c in getattr(settings, "cgroups", ()))
        self._diag: dict[int, sockdiag.DiagSocket] = {}

    def __bool__(self) -> bool:
        return bool(self.names or self.exes or self.ports or self.cgroups)

    def comm(self, pid: int) -> bytes | None:
        raw = _read(f"{self.proc}/{pid}/comm")
        return raw.rstrip(b"\n") if raw is not None else None

    def matches(self, pid: int, listeners: set[int] = frozenset()) -> bool:
        if pid in listeners:
            return True
        if self.names and self.comm(pid) in self.names:
            return True
        if self.exes:
            try:
                exe = os.readlink(f"{self.proc}/{pid}/exe")
            except OSError:
                exe = None
            if exe is not None and exe.removesuffix(" (deleted)") in self.exes:
                return True
        if self.cgroups:
            raw = _read(f"{self.proc}/{pid}/cgroup")
            if raw is not None:
                for path in cgroup_paths(raw.decode(errors="replace")):
                    if any(path == c or path.startswith(c + "/") or c == "/" for c in self.cgroups):
                        return True
        return False

    def parent(self, pid: int) -> int:
        raw = _read(f"{self.proc}/{pid}/stat")
        try:
            return int(raw[raw.rindex(b")") + 2:].split(None, 2)[1])
        except (AttributeError, ValueError, IndexError):  # gone (None), or not a stat line
            return 0

    def scan(self) -> set[int]:
        """Every live process that matches now, and every process one of them forked
        (PostgreSQL's backends, which do not hold the listening socket)."""
        if not self:
            return set()
        listeners = self.listeners() if self.ports else set()
        parents, found = {}, set()
        for d in os.scandir(self.proc):
            if d.name.isdigit():
                pid = int(d.name)
                parents[pid] = self.parent(pid)
                if self.matches(pid, listeners):
                    found.add(pid)
        return descendants(found, parents)

    def listeners(self) -> set[int]:
        """Processes holding a TCP socket listening on one of the configured ports, in
        any network namespace."""
        inodes = set()
        namespaces = {}
        for d in os.scandir(self.proc):
            if d.name.isdigit():
                try:
                    namespaces.setdefault(os.readlink(f"{d.path}/ns/net"), f"{d.path}/ns/net")
                except OSError:
                    continue
        own = os.readlink("/proc/self/ns/net")
        for ns, path in namespaces.items():
            key = int(ns[5:-1])
            diag = self._diag.get(key)
            try:
                if diag is None:
                    diag = self._diag[key] = sockdiag.DiagSocket(None if ns == own else path)
                for family in (socket.AF_INET, socket.AF_INET6):
                    diag.sock.send(sockdiag.request(family, states=1 << sockdiag.TCP_LISTEN))
                    while True:
                        socks, done = sockdiag.parse_dump(diag.sock.recv(1 << 18))
                        inodes |= {s.inode for s in socks if s.sport in self.ports}
                        if done:
                            break
            except (OSError, sockdiag.DumpError) as e:
                log.warning("l7: listening sockets of netns %s not read: %s", ns, e)
                self._diag.pop(key, None)
        for key in set(self._diag) - {int(ns[5:-1]) for ns in namespaces}:
            self._diag.pop(key).close()
        if not inodes:
            return set()
        return {pid for pid, inode in procfs.socket_links(self.proc) if inode in inodes}

    def close(self) -> None:
        for d in self._diag.values():
            d.close()
        self._diag.clear()


def descendants(roots: set[int], parents: dict[int, int]) -> set[int]:
    """roots and every process below one of them in the parent map."""
    memo = {pid: True for pid in roots}

    def under(pid: int) -> bool:
        chain = []
        while pid not in memo and pid > 1 and len(chain) < 4096:
            chain.append(pid)
            pid = parents.get(pid, 0)
        verdict = memo.get(pid, False)
        for p in chain:
            memo[p] = verdict
        return verdict

    return {pid for pid in parents if under(pid)} | set(roots)


def ssl_objects(maps_text: str, exe: str | None) -> list[str]:
    """The files of a process that may hold SSL_read: its libssl mappings, and its
    executable (a statically linked OpenSSL exports the symbols there)."""
    out = []
    for line in maps_text.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and "/libssl.so" in parts[5] and parts[5] not in out:
            out.append(parts[5].removesuffix(" (deleted)"))
    if exe and exe not in out:
        out.append(exe)
    return out


def exports_ssl(path: str) -> bool:
    """Whether an ELF file's dynamic symbols define SSL_read."""
    try:
        from elftools.elf.elffile import ELFFile
        with open(path, "rb") as f:
            dynsym = ELFFile(f).get_section_by_name(".dynsym")
            if dynsym is None:
                return False
            return any(s.name == "SSL_read" and s["st_shndx"] != "SHN_UNDEF" for s in dynsym.iter_symbols())
    except Exception:  # not an ELF, unreadable, gone: no symbols there
        return False


# --- what the agent keeps per connection and per series -------------------------------------

def peer_name(family: int, raw: bytes) -> str:
    import ipaddress
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == socket.AF_INET6:
        ip = ipaddress.IPv6Address(raw[:16])
        return str(ip.ipv4_mapped or ip)
    return UNKNOWN


def fast_op(protocol: str, name: bytes) -> str:
    """The op of a method or command name the kernel read (as the parsers name it)."""
    if protocol == "http":
        op = name.decode("latin-1")
        return op if op in METHODS else "OTHER"
    return resp_command(name)


class Tracked:
    """One connection the agent parses: its parser and what it has reported."""
    __slots__ = ("conn", "ident", "peer", "lport", "rport", "tls", "reported", "protocol_counted", "widened")

    def __init__(self, ident: tuple, family: int, raddr: bytes, lport: int, rport: int, tls: bool):
        self.conn = Connection()
        self.ident = ident
        self.peer = peer_name(family, raddr)
        self.lport = lport
        self.rport = rport
        self.tls = tls
        self.reported = (0,) * len(CAPTURE_FIELDS)
        self.protocol_counted = False
        self.widened = False

    def role(self) -> str:
        # The direction the parser found requests in (bpf/l7/protocols/pairing.py); "in"
        # means this process answers them.
        return "server" if getattr(self.conn, "_requests", None) == "in" else "client"


class Agg:
    __slots__ = ("requests", "errors", "status", "codes", "no_response", "buckets", "sum_us", "max_us")

    def __init__(self):
        self.requests = 0
        self.errors = 0
        self.status: dict[str, int] = {}
        self.codes: dict[str, int] = {}  # http: 4xx/5xx responses by status tag (http.status_tag)
        self.no_response = 0  # requests outstanding when the connection ended
        self.buckets: dict[int, int] = {}
        self.sum_us = 0
        self.max_us = 0

    def add(self, ex) -> None:
        """One exchange the parser completed."""
        us = ex.duration_ns // 1000
        self._add(ex.protocol, ex.error, ex.status_class, ex.code, hist.slot_of(us), 1, us, us)

    def add_counted(self, protocol: str, code: int, slot: int, count: int, sum_us: int, max_us: int) -> None:
        """count exchanges the kernel counted: http code the status, resp 1 an error reply."""
        if protocol == "http":
            self._add(protocol, code >= 500, f"{code // 100}xx", code, slot, count, sum_us, max_us)
        else:
            self._add(protocol, code == 1, "", 0, slot, count, sum_us, max_us)

    def _add(self, protocol: str, error: bool, status_class: str, code: int, slot: int, count: int,
             sum_us: int, max_us: int) -> None:
        self.requests += count
        self.errors += count if error else 0
        if protocol == "http":
            self.status[status_class] = self.status.get(status_class, 0) + count
            tag = status_tag(code)
            if tag is not None:
                self.codes[tag] = self.codes.get(tag, 0) + count
        self.buckets[slot] = self.buckets.get(slot, 0) + count
        self.sum_us += sum_us
        self.max_us = max(self.max_us, max_us)

    def merge(self, o: "Agg") -> None:
        self.requests += o.requests
        self.errors += o.errors
        self.no_response += o.no_response
        for k, v in o.status.items():
            self.status[k] = self.status.get(k, 0) + v
        for k, v in o.codes.items():
            self.codes[k] = self.codes.get(k, 0) + v
        hist.merge(self.buckets, o.buckets)
        self.sum_us += o.sum_us
        self.max_us = max(self.max_us, o.max_us)


class _BccUprobe:
    """A uprobe bcc attached for one process (where tracefs refused an inherited one)."""

    def __init__(self, bpf, ev_name: bytes):
        self.bpf, self.ev_name = bpf, ev_name

    def close(self) -> None:
        self.bpf.detach_uprobe_event(self.ev_name)

    def __repr__(self) -> str:
        return self.ev_name.decode(errors="replace")


class _Inherited:
    """The uprobes a fork runs on: its parent's (the owner's), copied by the kernel at
    the fork; closed with the owner's."""

    def __init__(self, owner: int):
        self.owner = owner

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"inherited from pid {self.owner}"


class L7Decoder:
    """The consumer of the ring buffer (a thread of its own), the opt-in state and the
    hooks' attachment; poll() writes what the parsers counted since the last poll."""

    def __init__(self, probe):
        from bcc import BPF

        self.probe = probe
        self.bpf = probe.bpf
        self.host = probe.config.host
        self.settings = probe.settings
        self.proc = Path(probe.config.paths.proc)
        self.matcher = Matcher(self.settings, self.proc)
        self.tls_wanted = getattr(self.settings, "tls", True)
        self.lock = threading.RLock()
        self.optin = self.bpf.get_table(b"optin")
        self.kconns = self.bpf.get_table(b"conns")
        self.kcaps = self.bpf.get_table(b"caps")
        self.inflight = self.bpf.get_table(b"inflight")
        self.stats = self.bpf.get_table(b"l7_stats")
        self._prev_stats = (0,) * 5
        # In-kernel counting: on unless probes.l7.in_kernel is false; agg is read and
        # cleared one generation at a time.
        self.kagg = self.bpf.get_table(b"agg")
        self.kconf = self.bpf.get_table(b"l7_conf")
        self.gen = 0
        self.kconf[self.kconf.Key(0)] = self.kconf.Leaf(0)
        self.kconf[self.kconf.Key(1)] = self.kconf.Leaf(int(getattr(self.settings, "in_kernel", True)))
        self.opted: dict[int, bytes] = {}       # tgid -> comm when opted in
        self.names: dict[int, bytes] = {}       # tgid -> comm, kept after exit for the last points
        self.tls: dict[int, dict[tuple, list]] = {}  # tgid -> {libssl inode: its uprobes (each with close())}
        self.tls_from: dict[int, int] = {}  # fork -> the process whose uprobes it inherited (and runs on)
        self.tls_at: dict[tuple, int] = {}  # (tgid, libssl inode) -> when its uprobes were on (monotonic ns)
        self._warned_inherit = False
        uprobes.remove_stale()
        # libssl files opted-in processes map (host paths), and the distribution's own
        self.libssl_seen: set[str] = {f"{d}/{n}" for d in LIB_DIRS for n in LIBSSL_NAMES
                                      if os.path.exists(f"{d}/{n}")}
        self._exports: dict[tuple, bool] = {}
        self._symbols: dict[tuple, int | None] = {}  # (file inode, symbol) -> offset
        self.tracked: dict[tuple[int, int], Tracked] = {}
        self.by_tgid: dict[int, set[int]] = defaultdict(set)
        self.acc: dict[tuple, Agg] = {}
        self.capture: dict[tuple[int, str], list[int]] = {}  # (tgid, protocol) -> [connections, *CAPTURE_FIELDS]
        self.exited: set[int] = set()
        self.retiring: dict[int, int] = {}  # tgid -> events the kernel had sent when it was opted out
        self.attached = False
        self.events = 0
        self.consumed = 0  # data events taken from the ring buffer since load
        # The hooks that capture while something is opted in: the socket tracepoints
        # where the kernel has them (only socket I/O pays), else raw sys_enter/sys_exit.
        sockets_ok = not set(SOCK_EVENTS) & set(getattr(probe, "missing_optional", ()))
        mode = getattr(self.settings, "hooks", "auto")
        if mode == "sockets" and not sockets_ok:
            raise SondeError("probes.l7.hooks is 'sockets' but this kernel has no sock:sock_send_length/"
                             "sock_recv_length tracepoints (6.3+); use 'auto' or 'syscalls'")
        self.hooks = SOCK_HOOKS if sockets_ok and mode != "syscalls" else RAW_HOOKS
        # Every program is loaded now, so bcc's table of functions never changes while
        # the runtime iterates it for statistics.
        for _, fn in self.hooks + RARE_HOOKS:
            self.bpf.load_func(fn.encode(), BPF.RAW_TRACEPOINT)
        for _, fn in SSL_PROBES:
            self.bpf.load_func(fn.encode(), BPF.KPROBE)
        self.bpf.load_func(b"ssl_return_probe", BPF.KPROBE)
        for tp, fn in RARE_HOOKS:
            self.bpf.attach_raw_tracepoint(tp=tp.encode(), fn_name=fn.encode())
        self.bpf[b"events"].open_ring_buffer(self._on_event)
        self._budget_s = BUDGET_WINDOW * getattr(self.settings, "cpu_percent", 25.0) / 100
        self._window_start = self._window_cpu = 0.0  # set by the consumer thread: its own CPU clock
        self._over_budget = False
        self.throttled_ns = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._consume, name="sonde-l7", daemon=True)
        self._thread.start()
        with self.lock:
            self._reconcile()

    # --- the consumer thread -------------------------------------------------------------

    def _consume(self) -> None:
        """Take events until stopped, within the CPU budget: in each 100 ms window the
        parser may use `cpu_percent` of it; past that it waits for the next window
        while the kernel holds events in the ring buffer, and drops (and counts) what
        does not fit. Without the cap a load the parser cannot follow would have the
        agent take a whole core from the workload. The window's CPU is read here, in
        this thread: time.thread_time() is the calling thread's clock, and a start taken
        in another thread (one that had used more CPU) kept the budget from ever being
        reached, so a saturated ring buffer held the parser in one poll that never
        returned."""
        self._window_start, self._window_cpu = time.monotonic(), time.thread_time()
        while not self._stop.is_set():
            now = time.monotonic()
            if now - self._window_start >= BUDGET_WINDOW:
                self._window_start, self._window_cpu = now, time.thread_time()
            try:
                self.bpf.ring_buffer_poll(100)
            except Exception:  # bcc raises bare Exception; a callback's -1 (budget spent) is not one
                log.exception("l7: ring buffer poll failed")
                self._stop.wait(1)
            if self._over_budget:
                self._over_budget = False
                rest = self._window_start + BUDGET_WINDOW - time.monotonic()
                if rest > 0:
                    self.throttled_ns += int(rest * 1e9)
                    self._stop.wait(rest)

    def _on_event(self, _ctx, data, size) -> int:
        try:
            raw = ct.string_at(data, size)
            ts, tgid, fd, true_len, cap_len, lost, kind, direction, flags, family, lport, rport, raddr, comm = \
                EVENT.unpack_from(raw)
            with self.lock:
                if kind == EV_DATA:
                    self.events += 1
                    self.consumed += 1
                    self._data(ts, tgid, fd, "out" if direction else "in", flags, family, lport, rport, raddr,
                               raw[EVENT.size:EVENT.size + cap_len], true_len, lost)
                elif kind == EV_CLOSE:
                    t = self.tracked.get((tgid, fd))
                    # (a close names its connection: one that reaches the ring after
                    # the fd's next connection began, from a TCP_CLOSE on another CPU,
                    # is not that one's)
                    if t is not None and (not family or t.ident == (family, raddr, lport, rport)):
                        self._end((tgid, fd), t, ts)
                elif kind == EV_EXEC:
                    self._exec(tgid, comm.split(b"\0", 1)[0])
                elif kind == EV_FORK:
                    self._forked(tgid, comm.split(b"\0", 1)[0], fd, ts)  # a fork's fd field: its parent
                elif kind == EV_EXIT:
                    self._gone(tgid, ts)
                elif kind == EV_FAST:
                    self._fast(tgid, FAST_PROTOCOLS.get(flags, UNKNOWN))
                elif kind == EV_SEED:
                    self._seed(ts, tgid, fd, "out" if direction else "in", FAST_PROTOCOLS.get(flags), family, lport,
                               rport, raddr, comm.split(b"\0", 1)[0] if true_len else None)
        except Exception:
            log.exception("l7: event not handled")
        if time.thread_time() - self._window_cpu > self._budget_s:
            self._over_budget = True
            return -1  # libbpf stops taking records (this one is taken) until the next poll
        return 0

    def _data(self, ts, tgid, fd, direction, flags, family, lport, rport, raddr, prefix, true_len, lost) -> None:
        key = (tgid, fd)
        tls = bool(flags & F_TLS)
        ident = (family, raddr, lport, rport)
        t = self.tracked.get(key)
        if t is None or t.ident != ident or (tls and not t.tls):
            if t is not None:
                # the fd is another connection now (a close the agent did not see), or its
                # TLS plaintext begins: the ciphertext seen so far was never a protocol
                self._end(key, t, ts, count=not (tls and not t.tls))
            t = self.tracked[key] = Tracked(ident, family, raddr, lport, rport, tls)
            self.by_tgid[tgid].add(fd)
        elif t.tls and not tls:
            return
        done = t.conn.gap(ts, direction, lost) if lost else []
        done += t.conn.feed(ts, direction, prefix, max(true_len, len(prefix)))
        for ex in done:
            self._count(tgid, t, ex)
        if not t.widened and t.conn.protocol is not None:
            # The kernel guessed the capture size from the connection's first bytes
            # (HTTP: 4 KiB, else wide); where the parser knows better, say so.
            t.widened = True
            wide = bool(flags & F_WIDE)
            want = DENSE_CAPTURE if t.conn.protocol in DENSE and not wide else \
                HTTP_CAPTURE if t.conn.protocol == "http" and wide else None
            if want is not None:
                try:
                    self.kcaps[self.kcaps.Key((tgid << 32) | (fd & 0xFFFFFFFF))] = self.kcaps.Leaf(want)
                except Exception as e:  # bcc raises bare Exception; the LRU map does not fill
                    log.debug("l7: capture size of pid %d fd %d not set: %s", tgid, fd, e)

    def _capture_row(self, tgid: int, protocol: str) -> list[int]:
        """The process's l7_capture counters of a protocol: [connections, *CAPTURE_FIELDS]."""
        return self.capture.setdefault((tgid, protocol), [0] * (1 + len(CAPTURE_FIELDS)))

    def _fast(self, tgid: int, protocol: str) -> None:
        """A connection is counted in the kernel from its first request on."""
        self._capture_row(tgid, protocol)[0] += 1

    def _seed(self, ts, tgid, fd, requests, protocol, family, lport, rport, raddr, op) -> None:
        """The kernel hands a connection it counted over to the parser, from its next
        read or write on: its protocol, the direction of its requests and the request
        that waits for its response (op None: none waits)."""
        if protocol is None:
            return
        key = (tgid, fd)
        old = self.tracked.get(key)
        if old is not None:
            self._end(key, old, ts)
        t = self.tracked[key] = Tracked((family, raddr, lport, rport), family, raddr, lport, rport, False)
        t.conn = Connection(protocol, requests=requests)
        t.protocol_counted = True  # counted at its EV_FAST
        self.by_tgid[tgid].add(fd)
        if op is not None:
            t.conn.waiting(ts, fast_op(protocol, op))

    def _agg(self, tgid: int, t: Tracked, protocol: str, op: str) -> Agg:
        role = t.role()
        key = (tgid, role, t.peer, t.lport if role == "server" else t.rport, protocol, op)
        a = self.acc.get(key)
        if a is None:
            a = self.acc[key] = Agg()
        return a

    def _count(self, tgid: int, t: Tracked, ex) -> None:
        self._agg(tgid, t, ex.protocol, ex.op).add(ex)

    def _report(self, tgid: int, t: Tracked) -> None:
        """Move what the connection's counters gained since last reported into the
        process's capture counters."""
        c = t.conn.counters
        now = tuple(getattr(c, f) for f in CAPTURE_FIELDS)
        proto = t.conn.protocol
        if proto is None and now == (0,) * len(now):
            return
        cap = self._capture_row(tgid, proto or UNKNOWN)
        if not t.protocol_counted and proto is not None:
            cap[0] += 1
            t.protocol_counted = True
        for i, (a, b) in enumerate(zip(now, t.reported)):
            cap[1 + i] += a - b
        t.reported = now

    def _end(self, key: tuple[int, int], t: Tracked, ts: int, count: bool = True) -> None:
        tgid = key[0]
        if count:
            for ex in t.conn.close(ts):
                self._count(tgid, t, ex)
            for op in t.conn.take_cut():
                self._agg(tgid, t, t.conn.protocol, op).no_response += 1
            self._report(tgid, t)
        del self.tracked[key]
        fds = self.by_tgid.get(tgid)
        if fds is not None:
            fds.discard(key[1])
            if not fds:
                del self.by_tgid[tgid]

    # --- opt-in --------------------------------------------------------------------------

    def _set_bit(self, tgid: int, on: bool) -> None:
        word = tgid >> PID_BITS
        if word >= 65536:
            log.warning("l7: pid %d is past the bitmap (pid_max above 4194304?); not captured", tgid)
            return
        k = self.optin.Key(word)
        old = self.optin[k].value
        new = old | (1 << (tgid & 63)) if on else old & ~(1 << (tgid & 63))
        if new != old:
            self.optin[k] = self.optin.Leaf(new)

    def _opt_in(self, tgid: int, comm: bytes | None = None) -> None:
        if tgid in self.opted:
            return
        comm = comm if comm is not None else self.matcher.comm(tgid)
        if comm is None:
            return  # gone already
        self.opted[tgid] = comm
        self.names[tgid] = comm
        self._set_bit(tgid, True)
        log.info("l7: opted in pid %d (%s)", tgid, comm.decode(errors="replace"))
        self._hooks()
        if self.tls_wanted:
            # With the distribution's libssl too, where the process maps none yet: a
            # launcher or shell opted in (by cgroup) that then execs a TLS client has it
            # probed from its first call, the uprobes staying on across the exec.
            self._attach_tls(tgid, guess=True)

    def _opt_out(self, tgid: int, gone: bool = False) -> None:
        """Stop capturing a process. Its events already in the ring buffer are still
        parsed: its connections end once the parser has taken everything the kernel
        had sent by now (an exit seen at a poll, not through its event, can come well
        before the events of its last requests are parsed)."""
        if tgid not in self.opted:
            return
        del self.opted[tgid]
        if not gone:
            log.info("l7: opted out pid %d (it no longer matches the config)", tgid)
        self._set_bit(tgid, False)
        self._detach_tls(tgid, gone=gone)
        self._forget_kernel_conns({tgid})
        self.retiring[tgid] = self._stats_total()[1]
        if gone:
            self.exited.add(tgid)
        self._hooks()

    def _exec(self, tgid: int, comm: bytes) -> None:
        if self.matcher.matches(tgid) or self.matcher.parent(tgid) in self.opted:
            if tgid in self.opted:
                self.opted[tgid] = self.names[tgid] = comm
                # A new program: its libraries are probed too. The uprobes already on
                # stay: they are the task's, not its old memory's, so the kernel puts
                # them into the new program's libssl when it maps it. A launcher's or
                # wrapper's exec (env, a perl wrapper such as Debian's pgbench) then
                # has the real program probed from its first TLS call, where detaching
                # and attaching again, tens of ms after the exec, missed a client's
                # start-up and, for PostgreSQL, its whole connection.
                if self.tls_wanted:
                    self._attach_tls(tgid, guess=True)
            else:
                self._opt_in(tgid, comm)
                if self.tls_wanted:
                    self._attach_tls(tgid, guess=True)  # its libraries are not mapped yet
        elif tgid in self.opted:
            self._opt_out(tgid)

    def _forked(self, tgid: int, comm: bytes, parent: int, ts: int) -> None:
        # the kernel has set the child's bit already
        if tgid not in self.opted:
            self.opted[tgid] = self.names[tgid] = comm
            if self.tls_wanted:
                # The kernel copied the parent's uprobes to the child at the fork (they run
                # there from its first call), those that were on before the fork: the
                # child's own are attached for the rest.
                owner = self.tls_from.get(parent, parent)
                inherited = {inode: [_Inherited(owner)] for inode, probes in self.tls.get(parent, {}).items()
                             if self.tls_at.get((parent, inode), ts) < ts
                             and any(isinstance(p, (uprobes.Uprobe, _Inherited)) for p in probes)}
                if inherited:
                    self.tls[tgid] = inherited
                    self.tls_from[tgid] = owner
                    for inode in inherited:
                        self.tls_at[(tgid, inode)] = ts
                self._attach_tls(tgid)  # a fork maps what its parent maps

    def _gone(self, tgid: int, ts: int) -> None:
        # the kernel has cleared the bit; this event comes after all of the process's own
        if self.opted.pop(tgid, None) is not None:
            log.debug("l7: pid %d exited", tgid)
        self.retiring.pop(tgid, None)
        self._detach_tls(tgid, gone=True)
        for fd in list(self.by_tgid.get(tgid, ())):
            self._end((tgid, fd), self.tracked[(tgid, fd)], ts)
        self.exited.add(tgid)
        self._hooks()

    def _reconcile(self) -> None:
        """Make the opted-in set exactly the matching processes; exited ones end."""
        want = self.matcher.scan()
        ts = _now_ns()
        for tgid in list(self.opted):
            if tgid not in want:
                self._opt_out(tgid, gone=not os.path.exists(f"{self.proc}/{tgid}"))
        for tgid in sorted(want):
            self._opt_in(tgid)
        for tgid, mark in list(self.retiring.items()):
            if self.consumed >= mark:  # everything it sent before it left is parsed
                del self.retiring[tgid]
                for fd in list(self.by_tgid.get(tgid, ())):
                    self._end((tgid, fd), self.tracked[(tgid, fd)], ts)
        for tgid in list(self.by_tgid):  # connections of processes that left unseen
            if tgid not in self.opted and tgid not in self.retiring:
                for fd in list(self.by_tgid.get(tgid, ())):
                    self._end((tgid, fd), self.tracked[(tgid, fd)], ts)
        if self.tls_wanted:
            for tgid in list(self.opted):  # libraries loaded since (dlopen)
                self._attach_tls(tgid)
        self._hooks()

    def _hooks(self) -> None:
        """The capture hooks (socket or syscall tracepoints) are attached exactly while
        some process is opted in."""
        want = bool(self.opted)
        if want == self.attached:
            return
        if want:
            self.inflight.clear()  # enter records left from an earlier attachment
            # and connections: their kernel state (a request waiting, counted in the
            # kernel) is stale after the calls missed while detached
            self.kconns.clear()
            for tp, fn in self.hooks:
                self.bpf.attach_raw_tracepoint(tp=tp.encode(), fn_name=fn.encode())
            log.info("l7: capture hooks attached (%s)", ", ".join(tp for tp, _ in self.hooks))
        else:
            for tp, _ in self.hooks:
                self.bpf.detach_raw_tracepoint(tp=tp.encode())
            log.info("l7: capture hooks detached (no process is opted in)")
        self.attached = want

    def _forget_kernel_conns(self, tgids: set[int]) -> None:
        for k in [k for k in self.kconns.keys() if (k.value >> 32) in tgids]:
            try:
                del self.kconns[k]
            except KeyError:
                pass

    # --- TLS -----------------------------------------------------------------------------

    def _attach_tls(self, tgid: int, guess: bool = False) -> None:
        """Uprobes on every libssl (or executable exporting SSL_read) of the process not
        yet probed for it. With guess (a new program, at its exec), also on the libssl
        files other processes map and the distribution's own: a uprobe attached by file and pid before the
        process maps the library is installed when it does, so a client that talks TLS
        right after its exec is caught from its first call."""
        maps = _read(f"{self.proc}/{tgid}/maps")
        if maps is None:
            return
        try:
            exe = os.readlink(f"{self.proc}/{tgid}/exe").removesuffix(" (deleted)")
        except OSError:
            exe = None
        root = f"{self.proc}/{tgid}/root"
        paths = [root + p if os.path.exists(root + p) else p for p in ssl_objects(maps.decode(errors="replace"), exe)]
        if guess and os.path.realpath(root) == "/":
            paths += sorted(self.libssl_seen)
        done = self.tls.setdefault(tgid, {})
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                continue
            inode = (st.st_dev, st.st_ino)
            if inode in done or not self._exports_ssl(path, st):
                continue
            probes = []
            for sym, fn in SSL_PROBES:
                where = self._symbol(path, inode, sym)
                if where is None:  # a symbol this OpenSSL lacks (the _ex forms before 1.1.1)
                    continue
                try:
                    probes.append(self._uprobe(where, fn.encode(), tgid, ret=False))
                    probes.append(self._uprobe(where, b"ssl_return_probe", tgid, ret=True))
                except OSError as e:
                    log.warning("l7: no uprobe on %s:%s for pid %d: %s", path, sym, tgid, e)
            done[inode] = probes
            self.tls_at[(tgid, inode)] = _now_ns()  # on from here: forks after this inherit them
            if probes:
                log.info("l7: libssl uprobes on pid %d (%s)", tgid, path)
                if "/libssl.so" in path and not path.startswith(root):
                    self.libssl_seen.add(path)

    def _symbol(self, path: str, inode: tuple, sym: str) -> tuple[bytes, int] | None:
        """(file, offset) of a function, resolved once per library file: bcc's own
        resolution reads the symbol table on every attach, which took ~1.5 s for the
        eight probes of a process (the process's first TLS requests went by meanwhile)."""
        from bcc import BPF
        key = (inode, sym)
        if key not in self._symbols:
            try:
                self._symbols[key] = BPF._check_path_symbol(path.encode(), sym.encode(), None, -1)[1]
            except Exception:  # bcc raises bare Exception for a symbol it cannot find
                self._symbols[key] = None
        # Only the offset is kept: the path is this process's (a file seen through
        # /proc/PID/root of a process that has exited is gone, and the kernel refused
        # uprobes at it for every later process of that namespace).
        offset = self._symbols[key]
        return None if offset is None else (path.encode(), offset)

    def _uprobe(self, where: tuple[bytes, int], fn: bytes, pid: int, ret: bool):
        """Attach fn at (file, offset) for pid and the processes it forks from now on
        (ingest/runtime/uprobes.py); where tracefs refuses that, for pid alone, as bcc's
        attach_uprobe does after its symbol lookup (bcc's own helpers, so its cleanup()
        closes these too)."""
        from bcc import BPF
        from bcc.libbcc import lib
        path, offset = where
        prog = self.bpf.load_func(fn, BPF.KPROBE)
        try:
            return uprobes.Uprobe(prog.fd, path, offset, pid, ret)
        except OSError as e:
            if not self._warned_inherit:
                log.warning("l7: uprobes that forks inherit are refused (%s); a fork's TLS is captured "
                            "once the agent has seen it", e)
                self._warned_inherit = True
        ev_name = self.bpf._get_uprobe_evname(b"r" if ret else b"p", path, offset, pid)
        fd = lib.bpf_attach_uprobe(prog.fd, 1 if ret else 0, ev_name, path, offset, pid)
        if fd < 0:
            raise OSError(f"the kernel refused a uprobe at {path.decode()}+{offset:#x}")
        self.bpf._add_uprobe_fd(ev_name, fd)
        return _BccUprobe(self.bpf, ev_name)

    def _exports_ssl(self, path: str, st: os.stat_result) -> bool:
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        if key not in self._exports:
            self._exports[key] = exports_ssl(path)
        return self._exports[key]

    def _detach_tls(self, tgid: int, gone: bool = False) -> None:
        self.tls_from.pop(tgid, None)
        # Closing these ends them in the forks that inherited them: those attach their own first.
        for child in [c for c, owner in self.tls_from.items() if owner == tgid]:
            del self.tls_from[child]
            mine = self.tls.get(child, {})
            for inode in [i for i, probes in mine.items() if any(isinstance(p, _Inherited) for p in probes)]:
                del mine[inode]
                self.tls_at.pop((child, inode), None)
            if child in self.opted:
                self._attach_tls(child)
        for inode, probes in self.tls.pop(tgid, {}).items():
            self.tls_at.pop((tgid, inode), None)
            for probe in probes:
                try:
                    probe.close()
                except Exception as e:  # bcc raises bare Exception
                    if not gone:
                        log.debug("l7: uprobe %s of pid %d not detached: %s", probe, tgid, e)

    # --- polling -------------------------------------------------------------------------

    def _kernel_counts(self) -> None:
        """Move what the kernel counted (agg, the generation before this flip) into the
        aggregates, and clear it there. A program that read the old generation just
        before the flip ends within microseconds, well inside the 10 ms waited here (the
        socket tracepoints run with preemption off; the wait also covers an interrupt
        storm or a stalled virtual CPU); one that wrote only after its entry was deleted
        re-creates it, read at the next-but-one poll. Only one held up past the wait,
        between this read and the delete, would lose its count."""
        old = self.gen
        self.gen ^= 1
        self.kconf[self.kconf.Key(0)] = self.kconf.Leaf(self.gen)
        time.sleep(0.01)
        done = []
        for k, per_cpu in self.kagg.items():
            if k.gen != old:
                continue
            done.append(k)
            count = sum(v.count for v in per_cpu)
            if not count:
                continue
            protocol = FAST_PROTOCOLS.get(k.proto)
            if protocol is None:
                continue
            role = "client" if k.role else "server"
            op = fast_op(protocol, bytes(k.op).split(b"\0", 1)[0])
            a = self.acc.setdefault((k.tgid, role, peer_name(k.family, bytes(k.raddr)), k.port, protocol, op), Agg())
            if k.slot == CUT_SLOT:
                a.no_response += count
                self._capture_row(k.tgid, protocol)[1 + CAPTURE_FIELDS.index("unanswered")] += count
                continue
            a.add_counted(protocol, k.code, k.slot, count, sum(v.sum_us for v in per_cpu),
                          max(v.max_us for v in per_cpu))
        for k in done:
            try:
                del self.kagg[k]
            except KeyError:
                pass

    def poll(self, ts: int) -> tuple[list[Point], int]:
        with self.lock:
            self._reconcile()
            for key, t in self.tracked.items():
                self._report(key[0], t)
            self._kernel_counts()
            acc, self.acc = self.acc, {}
            capture, self.capture = self.capture, {}
            names = {tgid: self.names.get(tgid, b"") for tgid in {k[0] for k in acc} | {k[0] for k in capture}}
            exited, self.exited = self.exited, set()
            for tgid in exited:  # a name is kept until its process's last points are written
                if tgid in self.opted:
                    continue
                if tgid in self.retiring or tgid in self.by_tgid:
                    self.exited.add(tgid)
                else:
                    self.names.pop(tgid, None)
            opted, tracked, attached = len(self.opted), len(self.tracked), self.attached
            tls = sum(1 for v in self.tls.values() if any(v.values()))
            events, self.events = self.events, 0
            throttled, self.throttled_ns = self.throttled_ns, 0
        try:
            points = self._red(ts, acc, names) + self._capture(ts, capture, names)
        except Exception:
            with self.lock:  # nothing is lost: the next poll writes these too
                for k, a in acc.items():
                    self.acc.setdefault(k, Agg()).merge(a)
                for k, c in capture.items():
                    mine = self.capture.setdefault(k, [0] * len(c))
                    for i, v in enumerate(c):
                        mine[i] += v
                self.events += events
            raise
        lost, sent, nbytes, in_kernel, agg_full = self._stats_delta()
        points.append(Point("l7_probe", {"host": self.host}, {
            "opted_in_processes": opted, "hooks_attached": int(attached), "tracked_connections": tracked,
            "events": sent, "lost_events": lost, "captured_bytes": nbytes, "tls_processes": tls,
            "kernel_exchanges": in_kernel, "kernel_dropped": agg_full,
            "throttled_seconds": throttled / 1e9}, ts))
        return points, opted + tracked

    def _stats_total(self) -> tuple[int, ...]:
        """(events lost, events sent, bytes captured, exchanges counted in the kernel,
        of those lost to a full map) since load, summed over CPUs."""
        return tuple(sum(int(v) for v in self.stats[self.stats.Key(i)]) for i in range(5))

    def backlog(self) -> int:
        """Data events the kernel has sent that the parser has not taken yet."""
        with self.lock:
            return self._stats_total()[1] - self.consumed

    def _stats_delta(self) -> tuple[int, ...]:
        now = self._stats_total()
        d = tuple(max(a - b, 0) for a, b in zip(now, self._prev_stats))
        self._prev_stats = now
        return d

    def _name(self, tgid: int, names: dict) -> str:
        return printable_name(names.get(tgid) or b"[unknown]")

    def _red(self, ts: int, acc: dict, names: dict) -> list[Point]:
        """Top-N processes by requests, top-M (role, peer, port) each, within the series
        budget; the rest fold into peer=other, then pid=other. Totals stay exact."""
        settings, budget = self.probe.settings, self.probe.budget
        by_proc: dict[int, dict[tuple, dict[tuple, Agg]]] = defaultdict(lambda: defaultdict(dict))
        for (tgid, role, peer, port, proto, op), a in acc.items():
            by_proc[tgid][(role, peer, str(port))][(proto, op)] = a
        keep, rest = top_n(list(by_proc.items()), settings.max_processes,
                           lambda p: sum(a.requests for peers in p[1].values() for a in peers.values()))
        out: dict[tuple, Agg] = {}

        def add(tags: tuple, ops: dict[tuple, Agg], force: bool = False) -> bool:
            rows = {tags + k: a for k, a in ops.items()}
            if not budget.admit(set().union(*(self._series(k, a) for k, a in rows.items())), force=force):
                return False
            for k, a in rows.items():
                out.setdefault(k, Agg()).merge(a)
            return True

        spill: list[tuple[str, dict]] = []  # (role, ops) for pid=other
        for tgid, peers in keep:
            name = self._name(tgid, names)
            top, tail = top_n(list(peers.items()), settings.max_peers,
                              lambda p: sum(a.requests for a in p[1].values()))
            for (role, peer, port), ops in top:
                if not add((str(tgid), name, role, peer, port), ops):
                    tail.append(((role, peer, port), ops))
            folded: dict[str, dict[tuple, Agg]] = defaultdict(dict)
            for (role, _, _), ops in tail:
                for k, a in ops.items():
                    folded[role].setdefault(k, Agg()).merge(a)
            for role, ops in folded.items():
                if not add((str(tgid), name, role, OTHER, OTHER), ops):
                    spill.append((role, ops))
        for _, peers in rest:
            for (role, _, _), ops in peers.items():
                spill.append((role, ops))
        other: dict[str, dict[tuple, Agg]] = defaultdict(dict)
        for role, ops in spill:
            for k, a in ops.items():
                other[role].setdefault(k, Agg()).merge(a)
        for role, ops in other.items():
            add((OTHER, OTHER, role, OTHER, OTHER), ops, force=True)
        points = []
        for k, a in out.items():
            tags = self._tags(k)
            fields = {"requests": a.requests, "errors": a.errors, "no_response": a.no_response}
            if k[5] == "http":
                fields |= {STATUS_FIELDS[c]: n for c, n in a.status.items() if c in STATUS_FIELDS}
            points.append(Point("l7_requests", tags, fields, ts))
            points += [Point("l7_http_errors", tags | {"status": code}, {"responses": n}, ts)
                       for code, n in sorted(a.codes.items())]
            if a.buckets:  # none when every request of the row went unanswered
                points += hist.points("l7_duration", tags, a.buckets, a.sum_us, ts, a.max_us)
        return points

    def _tags(self, k: tuple) -> dict[str, str]:
        pid, comm, role, peer, port, proto, op = k
        return {"host": self.host, "pid": pid, "comm": comm, "role": role, "peer": peer, "port": port,
                "protocol": proto, "op": op}

    def _series(self, k: tuple, a: Agg) -> set[tuple]:
        t = tuple(sorted(self._tags(k).items()))
        return {("l7_requests", t), ("l7_duration", t)} | {("l7_duration_hist", t, hist.le(s)) for s in a.buckets} \
            | {("l7_http_errors", t, code) for code in a.codes}

    def _capture(self, ts: int, capture: dict, names: dict) -> list[Point]:
        rows = [(tgid, proto, c) for (tgid, proto), c in capture.items() if any(c)]
        keep, rest = top_n(rows, self.probe.settings.max_processes, lambda r: sum(r[2]))
        merged: dict[tuple, list[int]] = {}
        for tgid, proto, c in keep:
            name = self._name(tgid, names)
            key = (str(tgid), name, proto)
            if not self.probe.budget.admit({("l7_capture", key)}):
                key = (OTHER, OTHER, proto)
            acc = merged.setdefault(key, [0] * len(c))
            for i, v in enumerate(c):
                acc[i] += v
        for _, proto, c in rest:
            acc = merged.setdefault((OTHER, OTHER, proto), [0] * len(c))
            for i, v in enumerate(c):
                acc[i] += v
        points = []
        for (pid, comm, proto), c in merged.items():
            if pid == OTHER:
                self.probe.budget.admit({("l7_capture", (pid, comm, proto))}, force=True)
            points.append(Point("l7_capture", {"host": self.host, "pid": pid, "comm": comm, "protocol": proto},
                                dict(zip(("connections",) + CAPTURE_FIELDS, c)), ts))
        return points

    def close(self) -> None:
        self._stop.set()
        # The consumer must be out of ring_buffer_poll before bcc frees the ring buffer
        # (the probe's cleanup after this): a join that gave up after 5 s on a loaded host
        # let the thread poll freed memory (a segfault at the agent's stop). It returns
        # within one poll timeout plus one callback budget, so this wait is bounded.
        self._thread.join(timeout=120)
        if self._thread.is_alive():
            log.error("l7: the ring buffer consumer did not stop in 120 s")
        with self.lock:
            self.tls_from.clear()  # every uprobe goes: no fork attaches its own
            for tgid in list(self.tls):
                self._detach_tls(tgid)
            if self.attached:
                for tp, _ in self.hooks:
                    self.bpf.detach_raw_tracepoint(tp=tp.encode())
                self.attached = False
        self.matcher.close()


def _now_ns() -> int:
    return time.monotonic_ns()  # bpf_ktime_get_ns() is CLOCK_MONOTONIC


PROBE = Probe(
    name="l7",
    doc=__doc__,
    hooks=("raw_syscalls:sys_enter", "raw_syscalls:sys_exit", "sched:sched_process_exec",
           "sched:sched_process_fork", "sched:sched_process_exit", "sock:inet_sock_set_state"),
    optional_hooks={e: "nothing: the capture runs on raw sys_enter/sys_exit instead, which every syscall on "
                       "the host pays while a process is opted in" for e in SOCK_EVENTS},
    default_enabled=False,
    requires=kernel_features,
    cflags=kernel_cflags,
    decoder=L7Decoder,
)
