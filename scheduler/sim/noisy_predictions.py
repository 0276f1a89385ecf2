"""Synthetic predictions for a sensitivity study: the true run time times a seeded error.

The trace tells too little about a job (its virtual cluster and size) to
predict it well; the live product has richer families. To see what a
predictor of a given quality would be worth, :func:`noisy` replaces a
history-based prediction's run time by the job's *true* run time times
``exp(sigma * z)``, ``z`` standard normal (a log-normal error), with ``sigma``
from :func:`sigma_for_median_ape` so that the median absolute percentage
error is the one asked for. Its ``error`` (how far off the family's past
predictions were) stays the history's: the policy learns how far to trust
these predictions as it would trust real ones. Never used outside that study.

>>> round(sigma_for_median_ape(0.3), 4)
0.4565
"""

from __future__ import annotations

import dataclasses
import math
import random

from scheduler.core.predictor import Prediction


def _within(m: float, sigma: float) -> float:
    """P(|exp(sigma z) - 1| <= m) for z standard normal."""

    def cdf(x: float) -> float:
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))

    low = -math.inf if m >= 1.0 else math.log(1.0 - m) / sigma
    return cdf(math.log(1.0 + m) / sigma) - (0.0 if low == -math.inf else cdf(low))


def sigma_for_median_ape(median_ape: float) -> float:
    """The log-normal ``sigma`` whose median absolute percentage error is ``median_ape`` (> 0)."""
    if not median_ape > 0:
        raise ValueError(f"the median APE must be positive, got {median_ape}")
    lo, hi = 1e-6, 50.0
    for _ in range(100):  # P(within m) falls as sigma grows: bisect for 1/2
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _within(median_ape, mid) > 0.5 else (lo, mid)
    return (lo + hi) / 2


def noisy(
    prediction: Prediction | None, duration_s: float, sigma: float, rng: random.Random
) -> Prediction:
    """``duration_s`` times a log-normal error as a one-sample prediction, keeping
    ``prediction``'s ``error`` (None without a prediction: not trusted yet)."""
    predicted_s = duration_s * math.exp(sigma * rng.gauss(0.0, 1.0))
    base = prediction or Prediction(0.0, 0.0, 0.0, None, "synthetic", 0)
    return dataclasses.replace(
        base,
        duration_s=predicted_s,
        low_s=predicted_s,
        high_s=predicted_s,
        basis="synthetic",
        samples=1,
        durations_s=(predicted_s,),
    )
