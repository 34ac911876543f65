"""Seeded drift scenarios for the load generator.

A scenario changes the generated columns from ``change_at`` (a fraction of the generated
event-time span) on. Every scenario is deterministic given the generator's seed: the
change is a pure function of the columns and the event times.

>>> sorted(SCENARIOS)
['cost_jump', 'covariate_shift', 'scale_break', 'stationary']
>>> import numpy as np
>>> cols = {"seller_quality_score": np.array([0.5, 0.5]), "cost_usd": np.array([1.0, 1.0])}
>>> get_scenario("scale_break").apply(cols, np.array([0.0, 1.0]), 0.5)
>>> cols["seller_quality_score"].tolist()
[0.5, 50.0]
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Columns = MutableMapping[str, Any]
FloatArray = np.ndarray[Any, np.dtype[np.float64]]
BoolArray = np.ndarray[Any, np.dtype[np.bool_]]


@dataclass(frozen=True)
class Scenario:
    """A named change applied to the generated columns at ``t >= t_change``."""

    name: str
    description: str
    feature: str | None
    expected_kinds: tuple[str, ...]
    _apply: Callable[[Columns, BoolArray], None]

    def apply(self, cols: Columns, t: FloatArray, t_change: float) -> None:
        """Mutate ``cols`` in place for events with ``t >= t_change``."""
        after = t >= t_change
        if after.any():
            self._apply(cols, after)


def _stationary(cols: Columns, after: BoolArray) -> None:
    return None


def _scale_break(cols: Columns, after: BoolArray) -> None:
    # an upstream "quick fix" sends a 0-1 score on a 0-100 scale
    x = cols["seller_quality_score"]
    cols["seller_quality_score"] = np.where(after, np.round(x * 100.0, 1), x)


def _covariate_shift(cols: Columns, after: BoolArray) -> None:
    # merchant_risk's mean moves up by about one reference standard deviation (~0.16)
    x = cols["merchant_risk"]
    cols["merchant_risk"] = np.where(after, np.clip(x + 0.16, 0.0, 1.0), x)


def _cost_jump(cols: Columns, after: BoolArray) -> None:
    # a new, bigger model behind the same endpoint: 10x cost per request
    c = cols["cost_usd"]
    cols["cost_usd"] = np.where(after, c * 10.0, c)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("stationary", "no change (must stay quiet)", None, (), _stationary),
        Scenario(
            "scale_break",
            "seller_quality_score sent on a 0-100 scale instead of 0-1",
            "seller_quality_score",
            ("data_quality", "schema"),
            _scale_break,
        ),
        Scenario(
            "covariate_shift",
            "merchant_risk mean +1 sigma",
            "merchant_risk",
            ("covariate_drift",),
            _covariate_shift,
        ),
        Scenario("cost_jump", "cost per request x10", None, ("cost",), _cost_jump),
    )
}


def get_scenario(name: str) -> Scenario:
    """The scenario called ``name``; the error lists the valid names."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(
            f"scenario: {name!r} is not valid; valid values: {', '.join(sorted(SCENARIOS))}"
        ) from None
