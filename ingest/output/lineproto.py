"""InfluxDB line protocol: one encoder for every sink and for the spool.

Escaping follows the line protocol reference: measurement names escape comma and
space; tag keys, tag values and field keys escape comma, equals sign and space;
string field values escape double quote and backslash. Line protocol cannot carry
a newline or a control character in a tag, and every InfluxDB version parses a
backslash before a separator its own way, so names from the kernel (which may hold
any byte) first go through `printable_name`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

_MEAS_ESC = str.maketrans({",": r"\,", " ": r"\ "})
_KEY_ESC = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})
_STR_ESC = str.maketrans({'"': r"\"", "\\": r"\\"})


@dataclass(slots=True)
class Point:
    measurement: str
    tags: dict[str, str]
    fields: dict[str, int | float | str]
    ts_ns: int = 0
    # not serialised: lets the runtime fold and rank without reparsing
    meta: dict = field(default_factory=dict, repr=False, compare=False)


def printable_name(raw: bytes | str) -> str:
    """A process name or path as a tag value that survives every store intact.

    Invalid UTF-8 bytes, control characters and the backslash itself become
    `\\xNN`, so the mapping is one-to-one and never produces a sequence a line
    protocol parser could read as an escape.
    """
    if isinstance(raw, bytes):
        raw = raw.split(b"\0", 1)[0]
        text = raw.decode("utf-8", errors="surrogateescape")
    else:
        text = raw
    out = []
    for ch in text:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # undecodable byte, from surrogateescape
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x20 or o == 0x7F or ch == "\\":
            out.append(f"\\x{o:02x}")
        else:
            out.append(ch)
    return "".join(out)


def _field_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v}i"
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"line protocol cannot carry the float {v}")
        return repr(v)
    if isinstance(v, str):
        return '"' + v.translate(_STR_ESC) + '"'
    raise TypeError(f"unsupported field type {type(v).__name__}")


def encode(p: Point) -> str:
    """One point as one line, tags sorted (InfluxDB's preferred order)."""
    parts = [p.measurement.translate(_MEAS_ESC)]
    for k in sorted(p.tags):
        v = p.tags[k]
        if v == "":
            continue  # line protocol has no empty tag values; absent means empty
        parts.append(f"{k.translate(_KEY_ESC)}={v.translate(_KEY_ESC)}")
    head = ",".join(parts)
    body = ",".join(f"{k.translate(_KEY_ESC)}={_field_value(v)}" for k, v in p.fields.items())
    return f"{head} {body} {p.ts_ns}"
