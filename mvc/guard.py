"""The spike rule of multi-wave compression steps, shared by the runner (which stops a step on it)
and `mvc report` (which draws it): plain arithmetic on the metric of each wave."""

from __future__ import annotations

import math


def spike(values: list[float], z_max: float) -> float | None:
    """The z-score of the newest log-metric increment against the earlier ones (None: too few)."""
    if z_max <= 0 or len(values) < 4 or min(values) <= 0:
        return None
    inc = [math.log(b) - math.log(a) for a, b in zip(values, values[1:])]
    hist, last = inc[:-1], inc[-1]
    mu = sum(hist) / len(hist)
    sd = (sum((x - mu) ** 2 for x in hist) / len(hist)) ** 0.5
    sd = max(sd, abs(mu), 0.02)  # a steady, accelerating rise is not a spike; nor is noise under 2 %
    return (last - mu) / sd
