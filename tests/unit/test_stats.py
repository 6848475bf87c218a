"""stats.Histogram: the buckets Prometheus reads stay exact (issue 16's cheaper observe)."""

from __future__ import annotations

import random
from bisect import bisect_left

import pytest

from pgtenant.stats import CONNECT_BUCKETS, DURATION_BUCKETS, WAIT_BUCKETS, Histogram


@pytest.mark.parametrize("bounds", [DURATION_BUCKETS, WAIT_BUCKETS, CONNECT_BUCKETS])
def test_observe_counts_each_value_in_its_le_bucket_and_sums_it(bounds: tuple[float, ...]
                                                                ) -> None:
    # Prometheus's le: a value counts in the first bucket whose bound is >= it (bisect_left),
    # bounds themselves included, and past the last one in +Inf.
    rng = random.Random(16)
    values = [0.0, *bounds, *(b * 1.0000001 for b in bounds), 1e9,
              *(rng.uniform(0, 2 * bounds[-1]) for _ in range(500)),
              *(rng.expovariate(1000.0) for _ in range(500))]
    hist = Histogram(bounds)
    expected, total = [0] * (len(bounds) + 1), 0.0
    for value in values:
        hist.observe(value)
        expected[bisect_left(bounds, value)] += 1
        total += value  # in the same order: the same float sum (not sum(): 3.12 compensates)
    assert hist.counts == expected
    assert hist.total == total


def test_observe_zero_is_observe_of_zero() -> None:
    zero, counted = Histogram(WAIT_BUCKETS), Histogram(WAIT_BUCKETS)
    for hist in (zero, counted):
        hist.observe(0.25)
    zero.observe_zero()
    counted.observe(0.0)
    assert zero.counts == counted.counts and zero.total == counted.total == 0.25
    assert zero.buckets() == counted.buckets()


@pytest.mark.parametrize("bounds", [(), (0.0, 1.0), (-1.0, 1.0)])
def test_bounds_must_start_above_zero(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        Histogram(bounds)
