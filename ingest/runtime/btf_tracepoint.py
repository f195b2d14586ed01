"""BTF-typed raw tracepoints ("tp_btf"), which bcc cannot load by itself.

A plain raw tracepoint program gets its arguments as bare u64s: every field of a
kernel struct it reads costs a `bpf_probe_read_kernel` call (~70-90 ns each here,
where every return goes through the SRSO "safe RET" thunk). A tp_btf program gets
the same arguments typed from the kernel's BTF, and reads their fields with plain
loads the verifier checks against that BTF: an offset that is not a member of the
right size in the running kernel is refused at load, never read as garbage. The
offsets still come from /sys/kernel/btf/vmlinux (the probe passes them as -D flags),
so nothing is read through the headers bcc compiles against.

bcc compiles the program (with its maps) but loads functions of type TRACING only
as fentry/fexit, so the function's bytecode is loaded here through libbpf (which
libbcc links; its calls size the attributes themselves) with `expected_attach_type`
BPF_TRACE_RAW_TP and the `btf_trace_<tracepoint>` typedef as `attach_btf_id`, then
attached with bpf_raw_tracepoint_open. It is registered in the bcc object's own
tables, so its run statistics, recursion misses, detach and cleanup work as for any
program bcc loaded. Kernel floor of the mechanism: 5.5.
"""
from __future__ import annotations

import ctypes as ct
import os

from sonde.ingest.errors import SondeError
from sonde.ingest.runtime import btf as btfmod

BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_RAW_TP = 23
LOG_SIZE = 1 << 20


class BTFTracepointError(SondeError):
    """The kernel refused a tp_btf program (no BTF for it, or the verifier said no)."""


class _LoadOpts(ct.Structure):
    """libbpf's struct bpf_prog_load_opts up to log_buf (libbpf reads `sz` and takes
    every field past it as zero)."""
    _fields_ = [
        ("sz", ct.c_size_t), ("attempts", ct.c_int), ("expected_attach_type", ct.c_uint32),
        ("prog_btf_fd", ct.c_uint32), ("prog_flags", ct.c_uint32), ("prog_ifindex", ct.c_uint32),
        ("kern_version", ct.c_uint32), ("attach_btf_id", ct.c_uint32), ("attach_prog_fd", ct.c_uint32),
        ("attach_btf_obj_fd", ct.c_uint32), ("fd_array", ct.c_void_p), ("func_info", ct.c_void_p),
        ("func_info_cnt", ct.c_uint32), ("func_info_rec_size", ct.c_uint32), ("line_info", ct.c_void_p),
        ("line_info_cnt", ct.c_uint32), ("line_info_rec_size", ct.c_uint32), ("log_level", ct.c_uint32),
        ("log_size", ct.c_uint32), ("log_buf", ct.c_void_p),
    ]


_libbpf = None


def _lib():
    global _libbpf
    if _libbpf is None:
        lib = ct.CDLL("libbpf.so.1", use_errno=True)
        lib.bpf_prog_load.restype = ct.c_int
        lib.bpf_prog_load.argtypes = [ct.c_int, ct.c_char_p, ct.c_char_p, ct.c_void_p, ct.c_size_t,
                                      ct.POINTER(_LoadOpts)]
        lib.bpf_raw_tracepoint_open.restype = ct.c_int
        lib.bpf_raw_tracepoint_open.argtypes = [ct.c_char_p, ct.c_int]
        _libbpf = lib
    return _libbpf


def attach(bpf, fn_name: bytes, tracepoint: str, kernel_btf: btfmod.BTF) -> int:
    """Load bcc function `fn_name` of `bpf` as a tp_btf program on `tracepoint` and
    attach it. Returns the program's fd; bcc's detach_raw_tracepoint(tracepoint) and
    cleanup() detach and close it. Raises BTFTracepointError in one line."""
    from bcc import BPF, lib as bcclib

    type_id = kernel_btf.raw_tracepoint_type_id(tracepoint)
    if type_id is None:
        raise BTFTracepointError(f"this kernel's BTF has no raw tracepoint {tracepoint}")
    start = bcclib.bpf_function_start(bpf.module, fn_name)
    size = bcclib.bpf_function_size(bpf.module, fn_name)
    if not start:
        raise BTFTracepointError(f"no program {fn_name.decode()} in the compiled object")
    log = ct.create_string_buffer(LOG_SIZE)
    opts = _LoadOpts(sz=ct.sizeof(_LoadOpts), expected_attach_type=BPF_TRACE_RAW_TP, attach_btf_id=type_id,
                     log_level=0, log_size=LOG_SIZE, log_buf=ct.cast(log, ct.c_void_p))
    libbpf = _lib()
    # a 15-character name: what bpftool and fdinfo show
    fd = libbpf.bpf_prog_load(BPF_PROG_TYPE_TRACING, fn_name[-15:], b"GPL", start, size // 8, ct.byref(opts))
    if fd < 0:
        opts.log_level = 1  # again, for the verifier's reason
        fd2 = libbpf.bpf_prog_load(BPF_PROG_TYPE_TRACING, fn_name[-15:], b"GPL", start, size // 8,
                                   ct.byref(opts))
        if fd2 >= 0:
            os.close(fd2)
        lines = [x for x in log.value.decode(errors="replace").splitlines()
                 if x.strip() and not x.startswith(("processed ", "verification time"))]
        raise BTFTracepointError(f"the kernel refused {fn_name.decode()} as a BTF raw tracepoint on {tracepoint}: "
                                 f"{os.strerror(-fd)}" + (f" ({lines[-1]})" if lines else ""))
    bpf.funcs[fn_name] = BPF.Function(bpf, fn_name, fd)  # bcc's cleanup() closes it, attached or not
    reattach(bpf, fn_name, tracepoint)
    return fd


def reattach(bpf, fn_name: bytes, tracepoint: str) -> None:
    """Attach a program attach() loaded (again, after detach_raw_tracepoint())."""
    link = _lib().bpf_raw_tracepoint_open(None, bpf.funcs[fn_name].fd)
    if link < 0:
        raise BTFTracepointError(f"cannot attach {fn_name.decode()} to {tracepoint}: {os.strerror(-link)}")
    bpf.raw_tracepoint_fds[tracepoint.encode()] = link
