"""The two interval helpers every score uses: Wilson for a share, Student-t for a mean of per-item scores."""

from __future__ import annotations

import math

import pytest

from orforge.outputs.intervals import t_interval, wilson_interval

Z = 1.959963984540054  # the 97.5% normal quantile


def wilson_by_formula(k: int, n: int) -> tuple[float, float]:
    """The Wilson score interval written out, to check the module against the formula rather than itself."""
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(0, 1), (0, 2), (1, 2), (2, 2), (4, 7), (37, 100), (999, 1000)])
def test_wilson_matches_the_formula(k, n):
    low, high = wilson_interval(k, n)
    assert (low, high) == pytest.approx(wilson_by_formula(k, n), abs=1e-9)
    assert 0.0 <= low <= k / n <= high <= 1.0 + 1e-12


def test_wilson_keeps_a_width_at_zero_and_all():
    # The case a percentile bootstrap gets wrong: no refusal in two prompts is not evidence of a rate of exactly 0.
    assert wilson_interval(0, 2) == pytest.approx((0.0, 0.6576), abs=1e-4)
    assert wilson_interval(2, 2) == pytest.approx((0.3424, 1.0), abs=1e-4)
    narrow, wide = wilson_interval(0, 200), wilson_interval(0, 20)
    assert narrow[0] == wide[0] == 0.0 and 0 < narrow[1] < wide[1] / 5
    assert wilson_interval(7, 7)[1] == 1.0


def test_wilson_refuses_what_is_not_a_share():
    for k, n in ((0, 0), (3, 2), (-1, 4)):
        with pytest.raises(ValueError, match="successes"):
            wilson_interval(k, n)


def test_t_interval_edges():
    assert t_interval([]) == (None, None, None)
    assert t_interval([0.4]) == (0.4, None, None)
    assert t_interval([0.3, float("nan"), None, 0.3]) == (0.3, 0.3, 0.3)  # gaps skipped; no spread, no width
    mean, low, high = t_interval([0.0, 1.0, 0.5])
    assert mean == 0.5 and (low, high) == (0.0, 1.0)  # clipped to the range of a rate
    mean, low, high = t_interval([0.5, 0.6, 0.7])
    assert (low, high) == pytest.approx((0.6 - 4.302653 * 0.1 / 3**0.5, 0.6 + 4.302653 * 0.1 / 3**0.5))
