"""process_io: block I/O per process, counted when the process creates a request.

What runs, and when:
- per request created for a bio: one raw tracepoint program at `block_getrq`, in the
  submitting task's context, adding the bio's size and one request to the process's
  entry (a hash map keyed by tgid).
- per poll: one read of that map; exited processes' entries are read a last time and
  deleted.

Off by default (`probes.process_io.enabled: true` turns it on): it is a second
program per I/O on top of block_io's, and block_io's per-disk totals do not need it.

- `process_io`: bytes and requests per process. Bios merged into a request after it
  was created are not added. Page-cache writeback is submitted by kernel threads and
  shows under them (`kworker/...`, `jbd2/...`), not under the writer.

Kernel floor: raw tracepoints and BTF in sysfs; the tracepoint's prototype and
`bio.bi_iter.bi_size` are looked up by name in the kernel's BTF.
"""
from __future__ import annotations

from sonde.bpf.block_io.probe import kernel_btf, need_btf
from sonde.ingest.runtime import btf
from sonde.ingest.errors import ProbeError
from sonde.ingest.runtime.probe import CounterMap, Probe


def layout(b: btf.BTF) -> dict[str, int]:
    """-D values process_io.bpf.c needs; a one-line ProbeError names what the kernel lacks."""
    args = need_btf(b.raw_tracepoint_args, "block_getrq", probe="process_io")
    if "struct bio *" not in args:
        raise ProbeError(f"probe process_io: raw tracepoint block_getrq passes ({', '.join(args)}), no bio; "
                         f"disable it with probes.process_io.enabled: false")
    size = need_btf(b.member, "bio", "bi_iter.bi_size", probe="process_io")
    if size.size != 4:
        raise ProbeError(f"probe process_io: bio.bi_iter.bi_size is {size.size} bytes in this kernel, not 4; "
                         f"disable it with probes.process_io.enabled: false")
    return {"PROCESS_IO_LAYOUT": 1, "GETRQ_ARG_BIO": args.index("struct bio *"), "BIO_SIZE": size.offset}


def kernel_cflags(sys_root) -> list[str]:
    return [f"-D{k}={v}" for k, v in layout(kernel_btf(sys_root, "process_io")).items()]


PROBE = Probe(
    name="process_io",
    doc=__doc__,
    hooks=("block:block_getrq",),
    maps=(CounterMap("process_io", {"bytes": "bytes", "requests": "requests"}, tgid="", rank_by=("bytes",)),),
    default_enabled=False,
    cflags=kernel_cflags,
)
