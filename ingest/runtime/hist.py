"""Exp2 histograms: the kernel's slots, their `le` bounds, and exact percentiles.

Slot s holds integer values in [2^(s-1), 2^s - 1] (slot 0 holds 0), so its upper
bound is 2^s - 1; the last slot is open-ended and reported as `+Inf`. These
mirror `sonde_log2_slot` in bpf/sonde.h.
"""
from __future__ import annotations

SLOTS = 40
INF = "+Inf"


def le(slot: int) -> str:
    return INF if slot >= SLOTS - 1 else str((1 << slot) - 1)


def slot_of(value: int) -> int:
    return min(value.bit_length(), SLOTS - 1)


def percentile(buckets: dict[int, int], q: float) -> int:
    """The upper bound of the bucket holding the q-quantile (the +Inf bucket gives its lower bound).

    Exact with respect to the buckets: summing buckets across hosts and time first
    gives the same answer as computing from the raw values would, up to bucket width.
    """
    total = sum(buckets.values())
    if total == 0:
        return 0
    rank = q * total
    seen = 0
    for slot in sorted(buckets):
        seen += buckets[slot]
        if seen >= rank:
            return (1 << slot) - 1 if slot < SLOTS - 1 else 1 << (SLOTS - 2)
    return (1 << max(buckets)) - 1


def merge(into: dict[int, int], other: dict[int, int]) -> dict[int, int]:
    for s, c in other.items():
        into[s] = into.get(s, 0) + c
    return into


def points(name: str, tags: dict, buckets: dict[int, int], sum_us: int, ts: int, max_us: int | None = None) -> list:
    """A histogram's points for one interval: `<name>_hist` per bucket, and the `<name>`
    summary. Without a measured max, the top bucket's upper bound stands in for it."""
    from sonde.ingest.output.lineproto import Point

    out = [Point(name + "_hist", tags | {"le": le(s)}, {"count": c}, ts) for s, c in sorted(buckets.items())]
    out.append(Point(name, tags, {
        "count": sum(buckets.values()), "sum_us": sum_us,
        "max_us": int(max_us) if max_us is not None else (1 << max(buckets)) - 1,
        "p50_us": percentile(buckets, 0.5), "p90_us": percentile(buckets, 0.9),
        "p99_us": percentile(buckets, 0.99)}, ts))
    return out
