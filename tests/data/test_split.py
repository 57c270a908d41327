"""seeded_split: the fixed, seed-determined split every source uses for val/test."""

import numpy as np
import pytest

from vitlab.data import seeded_split


@pytest.mark.parametrize("n,fractions", [(100, [0.1]), (1797, [0.2, 0.1]), (7, [0.3, 0.3]), (50, [0.0])])
def test_disjoint_covering_and_sized(n, fractions):
    parts = seeded_split(n, fractions, seed=3)
    assert len(parts) == len(fractions) + 1
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n            # disjoint
    assert set(joined.tolist()) == set(range(n))                       # covers everything
    for part, f in zip(parts, fractions):
        assert len(part) == int(round(f * n))
    assert len(parts[-1]) == n - sum(int(round(f * n)) for f in fractions)
    for part in parts:
        assert part.dtype.kind == "i"
        assert np.all(np.diff(part) > 0)                                # sorted, no repeats


def test_deterministic_for_a_seed():
    a = seeded_split(1000, [0.1, 0.2], seed=7)
    b = seeded_split(1000, [0.1, 0.2], seed=7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_independent_of_global_rng_state():
    np.random.seed(0)
    a = seeded_split(500, [0.1], seed=1)
    np.random.seed(123)
    np.random.rand(10)
    b = seeded_split(500, [0.1], seed=1)
    np.testing.assert_array_equal(a[0], b[0])


def test_differs_for_another_seed():
    a = seeded_split(1000, [0.1], seed=0)
    b = seeded_split(1000, [0.1], seed=1)
    assert len(a[0]) == len(b[0]) == 100
    assert not np.array_equal(a[0], b[0])


def test_is_not_the_identity_order():
    val, train = seeded_split(1000, [0.1], seed=0)
    assert not np.array_equal(val, np.arange(100))                     # shuffled, not the first 10%
