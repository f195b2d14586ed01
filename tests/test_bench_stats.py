"""bench/stats.py: the bootstrap interval of the median pair ratio the benchmarks report."""
import importlib.util
import math
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.hot_path]

_spec = importlib.util.spec_from_file_location(
    "bench_stats", Path(__file__).resolve().parent.parent / "bench" / "stats.py")
stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stats)


def exact_median_cdf(n: int, k: int) -> float:
    """P(median of n draws with replacement from n distinct values <= the k-th smallest), n odd:
    at least (n+1)/2 of the draws are among the k smallest."""
    p, m = k / n, (n + 1) // 2
    return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(m, n + 1))


def exact_bounds(sorted_xs: list[float], level: float = 0.95) -> tuple[float, float]:
    n = len(sorted_xs)
    cdf = [exact_median_cdf(n, k) for k in range(1, n + 1)]
    tail = (1 - level) / 2
    lo = next(x for x, c in zip(sorted_xs, cdf) if c >= tail)
    hi = next(x for x, c in zip(sorted_xs, cdf) if c >= 1 - tail)
    return lo, hi


def test_pairs_are_taken_in_run_order():
    assert stats.pair_ratios([100, 200, 400], [90, 220, 400]) == [0.9, 1.1, 1.0]
    with pytest.raises(ValueError):
        stats.pair_ratios([1, 2], [1])
    with pytest.raises(ValueError):
        stats.pair_ratios([], [])
    with pytest.raises(ValueError):
        stats.pair_ratios([0.0], [1.0])


def test_bounds_match_the_exact_bootstrap_distribution_of_the_median():
    # n=7: P(resample median <= x(1)) = 0.013 < 0.025 <= P(<= x(2)) = 0.126, so lo = x(2);
    # P(<= x(5)) = 0.874 < 0.975 <= P(<= x(6)) = 0.987, so hi = x(6). Far from the cut-offs
    # compared with 10k resamples' sampling error (~0.0016), so any seed gives these.
    xs = [0.97, 1.02, 0.99, 1.05, 0.94, 1.01, 1.00]
    want = exact_bounds(sorted(xs))
    assert want == (0.97, 1.02)
    for seed in (0, 1, 12, 2024):
        assert stats.bootstrap_median_ci(xs, seed=seed) == want
    # n=5: P(<= x(1)) = 0.058 >= 0.025, so lo = x(1); hi = x(5)
    ys = [3.0, 1.0, 2.0, 5.0, 4.0]
    assert exact_bounds(sorted(ys)) == (1.0, 5.0)
    assert stats.bootstrap_median_ci(ys) == (1.0, 5.0)


def test_seeded_and_reproducible():
    xs = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95, 1.3, 0.8]  # even n: medians average two values
    a = stats.bootstrap_median_ci(xs, seed=5)
    assert a == stats.bootstrap_median_ci(xs, seed=5)
    assert a[0] <= 1.025 <= a[1]  # contains the sample median
    assert min(xs) <= a[0] <= a[1] <= max(xs)


def test_degenerate_inputs():
    assert stats.bootstrap_median_ci([1.5]) == (1.5, 1.5)
    assert stats.bootstrap_median_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    with pytest.raises(ValueError):
        stats.bootstrap_median_ci([])
    with pytest.raises(ValueError):
        stats.bootstrap_median_ci([1.0, 2.0], level=1.0)


def test_throughput_loss_is_positive_when_the_agent_is_slower():
    base = [100.0, 102.0, 98.0, 101.0, 99.0, 100.0, 103.0]
    agent = [b * r for b, r in zip(base, [0.97, 0.98, 0.96, 0.99, 0.97, 0.98, 0.97])]
    r = stats.loss(base, agent)
    assert r["loss_pct"] == pytest.approx((100.0 - statistics_median(agent)) / 100.0 * 100, abs=0.01)
    lo, hi = r["loss_pct_ci95"]
    assert 0 < lo <= 2.5 <= hi  # ratio median 0.975
    assert lo == pytest.approx(2.0) and hi == pytest.approx(3.0)  # 1 - x(6), 1 - x(2) of the ratios
    assert r["pair_ratios"] == [pytest.approx(x) for x in (0.97, 0.98, 0.96, 0.99, 0.97, 0.98, 0.97)]
    assert "10000 resamples" in r["ci_method"]


def test_cost_loss_is_the_increase():
    base = [10.0, 10.0, 10.0]
    agent = [11.0, 10.5, 12.0]
    r = stats.loss(base, agent, higher_is_better=False)
    assert r["loss_pct"] == 10.0
    lo, hi = r["loss_pct_ci95"]
    assert lo <= 10.0 <= hi and lo >= 5.0 and hi <= 20.0
    # no difference: the interval is a point at 0
    assert stats.loss([5, 6, 7], [5, 6, 7], higher_is_better=False)["loss_pct_ci95"] == [0.0, 0.0]


def test_fast_enough_for_every_result():
    t = time.perf_counter()
    stats.loss([1.0 + i / 100 for i in range(15)], [1.0 + i / 90 for i in range(15)])
    assert time.perf_counter() - t < 2.0


def statistics_median(xs):
    s = sorted(xs)
    return s[len(s) // 2]
