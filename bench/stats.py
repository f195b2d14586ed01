"""Statistics for the A/B benchmarks: a seeded bootstrap interval of the median.

A benchmark pairs each agent run with the baseline run of the same pair (adjacent in
time, so slow drift of the machine cancels), takes agent/baseline per pair, and
reports the median of those ratios with a 95 % percentile-bootstrap interval:
resample the ratios with replacement `resamples` times, take each resample's median,
and read the 2.5th and 97.5th percentiles of those medians (nearest rank: each bound
is a value some resample's median took, so with an odd count it is one of the ratios).

Pure functions, no numpy: bench/ and tests/test_bench_stats.py use them as is.
"""
from __future__ import annotations

import math
import random
import statistics
from typing import Sequence

RESAMPLES = 10_000
SEED = 12  # default seed: an interval is reproducible from the ratios alone
LEVEL = 0.95


def pair_ratios(baseline: Sequence[float], agent: Sequence[float]) -> list[float]:
    """agent[i] / baseline[i] for each pair i, in run order."""
    if len(baseline) != len(agent):
        raise ValueError(f"{len(baseline)} baseline runs but {len(agent)} agent runs: pairs need both")
    if not baseline:
        raise ValueError("no runs")
    if any(b == 0 for b in baseline):
        raise ValueError("a baseline run of 0: no ratio")
    return [a / b for b, a in zip(baseline, agent)]


def _rank(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value whose empirical CDF reaches q."""
    n = len(sorted_values)
    k = max(1, math.ceil(q * n - 1e-9))
    return sorted_values[min(k, n) - 1]


def bootstrap_median_ci(values: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED,
                        level: float = LEVEL) -> tuple[float, float]:
    """Percentile-bootstrap interval (lo, hi) of the median of `values`, seeded."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("no values")
    if resamples < 1:
        raise ValueError("resamples must be at least 1")
    if not 0 < level < 1:
        raise ValueError("level must be between 0 and 1")
    if len(xs) == 1 or min(xs) == max(xs):
        return xs[0], xs[0]
    rng = random.Random(seed)
    n = len(xs)
    choices, median = rng.choices, statistics.median
    meds = sorted(median(choices(xs, k=n)) for _ in range(resamples))
    tail = (1 - level) / 2
    return _rank(meds, tail), _rank(meds, 1 - tail)


def loss(baseline: Sequence[float], agent: Sequence[float], higher_is_better: bool = True,
         resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> dict:
    """The loss in % with the agent, positive = worse, and its bootstrap interval.

    higher_is_better (throughput): loss = (baseline - agent) / baseline from the arms'
    medians; its interval is 100 x (1 - ratio) over the bootstrap interval of the
    median pair ratio. Otherwise (a cost such as CPU per request): loss = (agent -
    baseline) / baseline, interval 100 x (ratio - 1).

    Returns {"loss_pct", "loss_pct_ci95": [lo, hi], "pair_ratios", "pair_ratio_median",
    "ci_method"}; the loss from medians can sit outside the ratio interval when the
    arms' medians come from different pairs, and then the two disagree visibly.
    """
    ratios = pair_ratios(baseline, agent)
    b_med, a_med = statistics.median(baseline), statistics.median(agent)
    lo_r, hi_r = bootstrap_median_ci(ratios, resamples, seed, level)
    if higher_is_better:
        pct = (b_med - a_med) / b_med * 100
        lo, hi = (1 - hi_r) * 100, (1 - lo_r) * 100
    else:
        pct = (a_med - b_med) / b_med * 100
        lo, hi = (lo_r - 1) * 100, (hi_r - 1) * 100
    return {
        "loss_pct": round(pct, 2),
        "loss_pct_ci95": [round(lo, 2), round(hi, 2)],
        "pair_ratios": [round(r, 5) for r in ratios],
        "pair_ratio_median": round(statistics.median(ratios), 5),
        "ci_method": (f"percentile bootstrap of the median of the per-pair ratios agent/baseline "
                      f"({resamples} resamples, seed {seed}, nearest rank, {level:.0%})"),
    }
