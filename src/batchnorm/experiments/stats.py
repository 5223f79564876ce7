"""Numbers over seeds: means with t-based 95% confidence intervals, and sentences that compare them.

Every experiment of the report runs once per seed (model initialization and batch order change,
the data split does not). A number is shown as the mean over seeds with the 95% confidence
interval of that mean from Student's t distribution, mean +- t(0.975, n-1) * s / sqrt(n); with
one seed the interval is the single value. :func:`compare` writes the sentence that goes with two
such numbers: it names a difference only when the two intervals do not overlap, and says "no
measurable difference" otherwise, so that no caption claims more than the seeds support.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t

__all__ = ["CI_TEXT", "Interval", "band", "compare", "interval", "separated"]

CI_TEXT = "mean over seeds with its t-based 95% confidence interval"


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and the 95% confidence interval [low, high] of that mean."""

    mean: float
    low: float
    high: float
    n: int

    def percent(self, digits: int = 1) -> str:
        """``"97.8% [97.1, 98.5]"`` for fractions.

        Example:
            >>> interval([0.97, 0.98, 0.99], bounds=(0, 1)).percent()
            '98.0% [95.5, 100.0]'
        """
        if self.n == 1:
            return f"{100 * self.mean:.{digits}f}%"
        return f"{100 * self.mean:.{digits}f}% [{100 * self.low:.{digits}f}, {100 * self.high:.{digits}f}]"

    def plain(self, fmt: str = ".3g") -> str:
        """``"0.123 [0.1, 0.146]"`` for any other number."""
        if self.n == 1:
            return format(self.mean, fmt)
        return f"{self.mean:{fmt}} [{self.low:{fmt}}, {self.high:{fmt}}]"

    def as_list(self) -> list[float]:
        return [self.low, self.high]


def interval(values: Sequence[float], bounds: tuple[float, float] | None = None) -> Interval:
    """Mean and t-based 95% confidence interval of ``values`` (one per seed).

    ``bounds``: clip the interval to the range the quantity can take (``(0, 1)`` for accuracies).

    Example:
        >>> iv = interval([1.0, 2.0, 3.0])
        >>> iv.mean, round(iv.low, 3), round(iv.high, 3)
        (2.0, -0.484, 4.484)
        >>> interval([0.5]) == Interval(0.5, 0.5, 0.5, 1)
        True
    """
    if not values:
        raise ValueError("interval: expected at least one value, got none")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Interval(mean, mean, mean, 1)
    half = float(student_t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(mean, low, high, len(values))


def separated(a: Interval, b: Interval) -> bool:
    """The two intervals do not overlap (with one seed each: the values differ)."""
    return a.low > b.high or b.low > a.high


def compare(name_a: str, a: Interval, name_b: str, b: Interval, *, what: str, percent: bool = True) -> str:
    """A sentence comparing ``a`` and ``b`` that claims a difference only when their intervals separate.

    Example:
        >>> compare("with batch norm", interval([0.98, 0.97, 0.985]), "without", interval([0.90, 0.91, 0.92]),
        ...         what="final test accuracy")
        'Final test accuracy is higher with batch norm (97.8% [95.9, 99.7]) than without (91.0% [88.5, 93.5]).'
        >>> compare("A", interval([0.5, 0.6]), "B", interval([0.55, 0.56]), what="accuracy")
        'No measurable difference in accuracy: 55.0% [-8.5, 118.5] A, 55.5% [49.1, 61.9] B.'
    """
    text_a, text_b = (x.percent() if percent else x.plain() for x in (a, b))
    if not separated(a, b):
        return f"No measurable difference in {what}: {text_a} {name_a}, {text_b} {name_b}."
    relation = "higher" if a.mean > b.mean else "lower"
    return f"{what[0].upper()}{what[1:]} is {relation} {name_a} ({text_a}) than {name_b} ({text_b})."


def band(
    curves: Sequence[Sequence[float]], bounds: tuple[float, float] | None = None
) -> tuple[list[float], list[float], list[float]]:
    """Pointwise mean, low and high (t-based 95% interval) of equally long curves, one per seed."""
    columns = [interval(list(column), bounds) for column in zip(*curves, strict=True)]
    return [c.mean for c in columns], [c.low for c in columns], [c.high for c in columns]
