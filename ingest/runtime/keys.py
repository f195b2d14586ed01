"""Declared key decoders: how the bytes of a regular map key become tag values.

The ebpf_exporter way: a probe names the decoder of each key member (an address,
a port in network order, a kernel dev_t, a value from a static map) instead of
writing the conversion again. All pure functions of their input; nothing here reads
the kernel or the file system.
"""
from __future__ import annotations

import ipaddress

AF_INET, AF_INET6 = 2, 10
MINOR_BITS = 20  # the kernel's internal dev_t: MKDEV(major, minor) = major << 20 | minor


def ipv4(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(bytes(raw[:4])))


def ipv6(raw: bytes) -> str:
    """An IPv6 address; an IPv4-mapped one (::ffff:a.b.c.d) is written as IPv4."""
    ip = ipaddress.IPv6Address(bytes(raw[:16]))
    return str(ip.ipv4_mapped or ip)


def address(family: int, raw: bytes) -> str:
    """The address of a (family, 16 address bytes) key: `unknown` for another family."""
    if family == AF_INET:
        return ipv4(raw)
    if family == AF_INET6:
        return ipv6(raw)
    return "unknown"


def port_be(raw: bytes) -> int:
    """A port as the network sends it (two bytes, big-endian)."""
    return (raw[0] << 8) | raw[1]


def majorminor(dev: int) -> tuple[int, int]:
    """The kernel's internal dev_t: major in the top 12 bits, minor in the low 20."""
    return dev >> MINOR_BITS, dev & ((1 << MINOR_BITS) - 1)


def kernel_dev(major: int, minor: int) -> int:
    """The inverse of `majorminor`: the dev_t the kernel compares (not userspace's)."""
    return (major << MINOR_BITS) | minor


class StaticMap:
    """A key member's value looked up in a fixed table (op codes, roles, states),
    with a default for values the table does not name."""

    def __init__(self, names: dict[int, str], default: str | None = None):
        self.names = dict(names)
        self.default = default

    def __call__(self, value: int) -> str:
        name = self.names.get(value)
        if name is not None:
            return name
        return str(value) if self.default is None else self.default

    def get(self, value: int, default=None):
        return self.names.get(value, default)

    def items(self):
        return self.names.items()

    def __contains__(self, value) -> bool:
        return value in self.names

    def __iter__(self):
        return iter(self.names)
