"""Counting what a stage keeps and drops, by reason, in one shape for every stage.

datatrove's filters are the model: the loop counts each record in, each record out and each record dropped under
a reason, so the numbers add up and nothing goes missing silently. Every stage writes the counts at the top of
its stats file (``schema.STATS_ROWS_IN``, ``STATS_ROWS_OUT``, ``STATS_DROPPED``), next to its own keys::

    {"rows_in": N, "rows_out": M, "dropped": {"reason": count, ...}, ...stage-specific keys}

with ``rows_in == rows_out + sum(dropped.values())``, checked when the stats are written. A stage declares its
reasons up front: they all appear (a zero says the check ran and dropped nothing), and an undeclared reason is a
bug caught at once. What a "row" is depends on the stage (a seed row, an example, a conversation, a sample, a
problem); ``unit`` names it in the log line.

>>> stats = Stats("examples", reasons=("contaminated", "no_correct_generation"))
>>> stats.read(3)
>>> stats.keep()
>>> stats.drop("no_correct_generation", 2)
>>> stats.as_dict()
{'rows_in': 3, 'rows_out': 1, 'dropped': {'contaminated': 0, 'no_correct_generation': 2}}
>>> stats.summary()
'kept 1 of 3 examples; dropped 2: no_correct_generation 2'
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from distilled_plugins.core.schema import STATS_DROPPED, STATS_ROWS_IN, STATS_ROWS_OUT


class StatsMismatch(AssertionError):
    """Rows in, out and dropped do not add up: a row was lost or counted twice (a bug in the stage)."""


class Stats:
    """Rows read, rows kept and rows dropped by reason; ``as_dict()`` gives the common shape of a stats file."""

    def __init__(self, unit: str = "rows", reasons: Iterable[str] = ()):
        self.unit = unit
        self.reasons = tuple(reasons)
        self.rows_in = 0
        self.rows_out = 0
        self.dropped = Counter(dict.fromkeys(self.reasons, 0))

    def read(self, n: int = 1) -> None:
        """``n`` rows came in."""
        self.rows_in += n

    def keep(self, n: int = 1) -> None:
        """``n`` rows went out."""
        self.rows_out += n

    def drop(self, reason: str, n: int = 1) -> None:
        """``n`` rows were dropped for ``reason`` (one of the declared reasons, when some were declared)."""
        if self.reasons and reason not in self.reasons:
            raise KeyError(f"drop reason {reason!r} is not one of the declared reasons {self.reasons}")
        self.dropped[reason] += n

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def check(self) -> None:
        """Raise :class:`StatsMismatch` unless rows in == rows out + rows dropped.

        >>> stats = Stats()
        >>> stats.read(2)
        >>> stats.keep()
        >>> stats.check()
        Traceback (most recent call last):
        ...
        distilled_plugins.core.stats.StatsMismatch: 2 rows in, but 1 out + 0 dropped ({}): 1 row(s) unaccounted for
        """
        if self.rows_in != self.rows_out + self.dropped_total:
            raise StatsMismatch(
                f"{self.rows_in} {self.unit} in, but {self.rows_out} out + {self.dropped_total} dropped "
                f"({dict(self.dropped)}): {self.rows_in - self.rows_out - self.dropped_total} row(s) unaccounted for"
            )

    def as_dict(self) -> dict:
        """``{rows_in, rows_out, dropped}`` (reasons in declared order, then others sorted), after :meth:`check`."""
        self.check()
        order = list(self.reasons) + sorted(set(self.dropped) - set(self.reasons))
        return {
            STATS_ROWS_IN: self.rows_in,
            STATS_ROWS_OUT: self.rows_out,
            STATS_DROPPED: {reason: self.dropped[reason] for reason in order},
        }

    def summary(self) -> str:
        """One line for the log: kept M of N, dropped by reason (the reasons that dropped something)."""
        reasons = ", ".join(f"{reason} {n}" for reason, n in self.as_dict()[STATS_DROPPED].items() if n)
        return f"kept {self.rows_out} of {self.rows_in} {self.unit}; dropped {self.dropped_total}" + (
            f": {reasons}" if reasons else ""
        )
