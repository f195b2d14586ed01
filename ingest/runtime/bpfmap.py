"""Reading whole BPF hash maps quickly: BPF_MAP_LOOKUP_BATCH.

bcc's items() costs two syscalls per entry, seconds at 100k entries. One batch
call copies thousands. bcc 0.26's own items_lookup_batch() passes one variable
as both the input and output batch token, so this calls libbcc's
bpf_lookup_batch directly, with buffers kept per map between polls.
Kernels without batch ops (before 5.6) fall back to items().
"""
from __future__ import annotations

import ctypes as ct
import errno

# Keyed by the map's fd *and* its types: fds are reused once a probe is closed.
_buffers: dict[tuple, tuple] = {}


def read_all(table) -> list[tuple]:
    """Every (key, value) of a non-per-CPU hash map, valid until the next call for this map."""
    from bcc.libbcc import lib
    return _batch(table, lib.bpf_lookup_batch, "BPF_MAP_LOOKUP_BATCH")


def _batch(table, fn, what: str):
    n = table.max_entries
    fd = table.map_fd
    slot = (fd, table.Key, table.Leaf, n)
    if slot not in _buffers:
        for stale in [k for k in _buffers if k[0] == fd]:
            del _buffers[stale]
        _buffers[slot] = ((table.Key * n)(), (table.Leaf * n)())
    keys, values = _buffers[slot]
    ksz, vsz = ct.sizeof(table.Key), ct.sizeof(table.Leaf)
    in_batch, out_batch = ct.c_uint32(0), ct.c_uint32(0)
    total, first = 0, True
    while total < n:
        count = ct.c_uint32(n - total)
        res = fn(fd, None if first else ct.byref(in_batch), ct.byref(out_batch),
                 ct.byref(keys, ksz * total), ct.byref(values, vsz * total), ct.byref(count))
        err = ct.get_errno()
        total += count.value
        if res != 0:
            if err == errno.ENOENT:
                break  # the whole map has been read
            if total == 0 and err in (errno.EINVAL, errno.ENOTSUPP if hasattr(errno, "ENOTSUPP") else 524,
                                       errno.EOPNOTSUPP, 524):
                return list(table.items())
            raise OSError(err, f"{what} on {table.name if hasattr(table, 'name') else fd} failed")
        in_batch.value = out_batch.value
        first = False
        if count.value == 0:
            break
    return [(keys[i], values[i]) for i in range(total)]


def pop(table, key):
    """Read and delete one entry in a single step (BPF_MAP_LOOKUP_AND_DELETE_ELEM on a
    hash map, 5.14+): an update the kernel makes after it lands in a new entry, never
    in the gap between a read and a delete. None if the entry is gone. Kernels
    without it fall back to read-then-delete."""
    from bcc.libbcc import lib

    leaf = table.Leaf()
    if lib.bpf_lookup_and_delete(table.map_fd, ct.byref(key), ct.byref(leaf)) == 0:
        return leaf
    if ct.get_errno() == errno.ENOENT:
        return None
    try:
        leaf = table[key]
        del table[key]
        return leaf
    except KeyError:
        return None
