"""The 95% intervals every score in a release or an evaluation is reported with.

- `wilson_interval` for a plain share (k of n prompts refused, replies judged safe, contrast pairs that went one
  way): the Wilson score interval (`statsmodels` `proportion_confint`, method "wilson"). It stays inside [0, 1] and
  keeps a width at k = 0 or k = n, where the percentile bootstrap and the normal approximation collapse to a point
  (0 of 2 refused gives 0 to 0.658, not 0 to 0), which matters because per-category groups are often small.
- `t_interval` for a mean of per-item scores that is not itself a share (a rate averaged over targets, the
  per-prompt Self-BLEU or cosine of a sample): the Student-t interval of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats
from statsmodels.stats.proportion import proportion_confint

CI_LEVEL = 0.95


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of the share `successes / n` (n >= 1)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"a share needs 0 <= successes <= n and n >= 1, got {successes} of {n}")
    low, high = proportion_confint(successes, n, alpha=1 - CI_LEVEL, method="wilson")
    # At 0 or n the bound is exactly 0 or 1; the floating-point formula leaves ~1e-17 that would show in a CSV.
    return (0.0 if successes == 0 else float(low)), (1.0 if successes == n else float(high))


def t_interval(values: Sequence[float], bounds: tuple[float, float] = (0.0, 1.0)
               ) -> tuple[float | None, float | None, float | None]:
    """Mean and 95% Student-t interval of the mean, clipped to `bounds` (a rate's [0, 1] by default); (None, None,
    None) for no values, no interval for one."""
    data = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if data.size == 0:
        return None, None, None
    mean = float(data.mean())
    if data.size < 2:
        return mean, None, None
    sem = float(data.std(ddof=1) / math.sqrt(data.size))
    if sem == 0.0:  # every item scored the same: the interval has no width (scipy would give nan)
        return mean, mean, mean
    low, high = stats.t.interval(CI_LEVEL, data.size - 1, loc=mean, scale=sem)
    # The scores are rates or similarities: an interval reaching past the range (few items, wide spread) is cut.
    return mean, max(float(low), bounds[0]), min(float(high), bounds[1])
