"""Detectors for binary error-indicator streams (1 = wrong prediction, after the label join).

:class:`BernoulliCUSUM` is the log-likelihood-ratio CUSUM for a change of the error
rate from ``p0`` to ``p1`` (Reynolds & Stoumbos 1999): each trial adds
``log(p1/p0)`` if it is an error and ``log((1-p1)/(1-p0))`` otherwise, the statistic is
``S_t = max(0, S_{t-1} + llr_t)`` and an alarm is raised when ``S > h``. It is the
optimal (Lorden/Moustakides) sequential test for that change and needs no window.

Calibration (``h=None``): :func:`bernoulli_cusum_arl` computes the average run
length (in trials) for any true error rate by solving the ARL integral equation of
the chart *embedded at the jumps*: between two errors the statistic only drifts down
by a fixed step per success, so the number of successes before the next error is
geometric and that stretch is integrated in closed form (exact geometric sums); only
the level just before a jump is discretised (piecewise-linear on a grid). The tests
check it against an exact lattice Markov chain and against simulation;
:func:`calibrate_h_bernoulli` inverts it for a target in-control ARL.

Weighted updates ``update(count, total)``: ``count`` trials with ``total`` errors form
one step whose increment is the sum of the per-trial increments,
``total*log(p1/p0) + (count-total)*log((1-p1)/(1-p0))``; the statistic equals the
per-trial statistic at the tick boundary unless it touched 0 inside the tick (then it
is smaller), and alarms are raised at tick boundaries only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from detectors.base import (
    ON_DETECT_CHOICES,
    Detection,
    Spec,
    SpecError,
    check_choice,
    check_number,
    register,
)
from detectors.cusum import (
    FloatArray,
    _check_count,
    _check_finite,
    _Extra,
    _finite_values,
    _invert_increasing_log,
    _LindleyDetector,
    _Scalars,
    _solve_arl,
    _spec_of,
)

__all__ = [
    "BernoulliCUSUM",
    "BernoulliCUSUMSpec",
    "bernoulli_cusum_arl",
    "calibrate_h_bernoulli",
    "default_p1",
]


def default_p1(p0: float) -> float:
    """The default out-of-control error rate: ``2 * p0``, capped at ``(1 + p0) / 2``.

    >>> default_p1(0.02), default_p1(0.5)
    (0.04, 0.75)
    """
    return min(2.0 * p0, (1.0 + p0) / 2.0)


def _llr(p0: float, p1: float) -> tuple[float, float]:
    return math.log(p1 / p0), math.log((1.0 - p1) / (1.0 - p0))


def _jump_arl(rate: float, up: float, down: float, h: float, n: int | None = None) -> float:
    """ARL in trials of ``S = max(0, S + X)``, ``X = +up`` w.p. ``rate`` else ``-down``.

    Embedded at the up-jumps: with ``y`` the level just before a jump and ``D = down *
    G`` (``G`` ~ geometric number of down-steps before the next jump),
    ``W(y) = 1/rate + E[W(max(0, y + up - D)); <= h - up]`` and ``ARL = 1/rate + W(0)``.
    """
    if rate <= 0.0:
        return math.inf
    upper = h - up
    if upper < 0.0:
        return 1.0 / rate  # the first jump alarms
    q = 1.0 - rate
    mean_g = q / rate
    if n is None:
        step = min(up, down) if down > 0.0 else up
        n = int(min(800, max(120, 8.0 * upper / step + 2)))

    def ramp(u: FloatArray) -> FloatArray:  # E[(u - Z)^+], Z = up - down * G
        if down == 0.0:
            return np.maximum(u - up, 0.0)
        x = (up - u) / down
        nn = np.floor(np.maximum(x, 0.0)) + 1.0
        with np.errstate(under="ignore"):
            tail = np.power(q, nn) * (mean_g + nn - x)
        return down * np.where(x < 0.0, mean_g - x, tail)

    def cdf(u: FloatArray) -> FloatArray:  # P(Z <= u) = P(G >= (up - u) / down)
        if down == 0.0:
            return (u >= up).astype(np.float64)
        x = (up - u) / down
        with np.errstate(under="ignore"):
            return np.where(x <= 0.0, 1.0, np.power(q, np.ceil(np.maximum(x, 0.0))))

    return 1.0 / rate + _solve_arl(ramp, cdf, upper, n, cost=1.0 / rate)


def bernoulli_cusum_arl(p: float, p0: float, p1: float, h: float, n: int | None = None) -> float:
    """Average run length (trials to alarm) of the Bernoulli LLR CUSUM at true error rate ``p``.

    ``p = p0`` gives the in-control ARL0, ``p = p1`` the expected detection delay
    from a fresh start.

    >>> h = calibrate_h_bernoulli(0.02, 0.04, 1e6)
    >>> round(h, 2), round(bernoulli_cusum_arl(0.04, 0.02, 0.04, h))
    (8.51, 980)
    """
    a, b = _llr(p0, p1)
    if p1 > p0:  # errors jump up by a, successes drift down by -b
        return _jump_arl(p, a, -b, h, n)
    return _jump_arl(1.0 - p, b, -a, h, n)  # successes jump up by b, errors drift down


@lru_cache(maxsize=256)
def calibrate_h_bernoulli(p0: float, p1: float, arl0: float) -> float:
    """Decision interval ``h`` whose in-control ARL (trials) is ``arl0``.

    >>> round(calibrate_h_bernoulli(0.05, 0.1, 1e3), 3)
    2.761
    """
    check_number("p0", p0, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    check_number("p1", p1, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    check_number("arl0", arl0, lo=1.0, lo_open=True)
    if p1 == p0:
        raise SpecError(f"p1: {p1!r} must differ from p0 ({p0!r})")
    return _invert_increasing_log(lambda h: bernoulli_cusum_arl(p0, p0, p1, h), arl0)


@dataclass(frozen=True)
class BernoulliCUSUMSpec(Spec):
    """Bernoulli CUSUM spec: error rate ``p0`` in control, ``p1`` the rate to detect quickly.

    ``p1 > p0`` watches for more errors (direction ``"up"``), ``p1 < p0`` for fewer
    (``"down"``). ``h`` is the decision interval on the log-likelihood-ratio scale;
    ``h=None`` calibrates it so that the in-control ARL is ``arl0`` trials.
    ``on_detect="reset"`` restarts at 0 after an alarm; ``"continue"`` keeps the
    statistic and alarms again only after it fell back below ``h``.

    >>> from detectors.base import build
    >>> spec = BernoulliCUSUMSpec(p0=0.1, p1=0.05, arl0=1e4)   # watch for fewer errors
    >>> errs = np.random.default_rng(4).random(6000) < np.repeat([0.1, 0.02], 3000)
    >>> [(d.index, d.direction) for d in build(spec.to_dict()).update_many(errs)][:1]
    [(3105, 'down')]
    >>> BernoulliCUSUMSpec(p0=0.1, on_detect="restart")
    Traceback (most recent call last):
    ...
    detectors.base.SpecError: on_detect: 'restart' is not valid; valid values: 'reset', 'continue'
    """

    kind: ClassVar[str] = "bernoulli_cusum"
    p0: float
    p1: float | None = None
    h: float | None = None
    arl0: float = 1e6
    on_detect: str = "reset"

    def validate(self) -> None:
        check_number("p0", self.p0, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        if self.p1 is not None:
            check_number("p1", self.p1, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
            if self.p1 == self.p0:
                raise SpecError(
                    f"p1: {self.p1!r} must differ from p0 ({self.p0!r}); valid values: "
                    "a rate in (0, 1) other than p0, or None for min(2*p0, (1+p0)/2)"
                )
        if self.h is not None:
            check_number("h", self.h, lo=0.0, lo_open=True)
        check_number("arl0", self.arl0, lo=1.0, lo_open=True)
        check_choice("on_detect", self.on_detect, ON_DETECT_CHOICES)

    @property
    def rate1(self) -> float:
        """``p1``, or its default ``min(2*p0, (1+p0)/2)``."""
        return float(self.p1) if self.p1 is not None else default_p1(float(self.p0))

    @property
    def decision_interval(self) -> float:
        """``h`` (given, or calibrated from ``arl0``)."""
        if self.h is not None:
            return float(self.h)
        return calibrate_h_bernoulli(float(self.p0), self.rate1, float(self.arl0))


class BernoulliCUSUM(_LindleyDetector):
    """Bernoulli log-likelihood-ratio CUSUM over 0/1 error indicators.

    >>> rng = np.random.default_rng(3)
    >>> errs = np.concatenate([rng.random(20_000) < 0.02, rng.random(5_000) < 0.04])
    >>> det = BernoulliCUSUM(BernoulliCUSUMSpec(p0=0.02, arl0=1e6))
    >>> [d.index for d in det.update_many(errs)]   # rate doubles at 20000; resets after alarms
    [20497, 21352, 22592, 23513, 24415]
    >>> det.update(1000, 19)   # a tick: 1000 trials, 19 errors (p0 = 0.02)
    []
    >>> [(d.index, round(d.statistic, 2)) for d in det.update(1000, 41)]   # 41 errors
    [(26999, 8.65)]
    """

    _kind: ClassVar[str] = "bernoulli_cusum"

    def __init__(self, spec: BernoulliCUSUMSpec) -> None:
        if not isinstance(spec, BernoulliCUSUMSpec):
            raise TypeError(f"spec: expected BernoulliCUSUMSpec, got {type(spec).__name__}")
        super().__init__()
        self.spec = spec
        self._spec: BernoulliCUSUMSpec = spec
        self._h = spec.decision_interval
        self._p1 = spec.rate1
        self._a, self._b = _llr(float(spec.p0), self._p1)

    @property
    def threshold(self) -> float:
        """Decision interval ``h`` (log-likelihood-ratio units)."""
        return self._h

    @property
    def p1(self) -> float:
        """The out-of-control rate the chart is tuned for."""
        return self._p1

    def _active(self) -> tuple[bool, bool]:
        return True, False

    def _side_name(self, side: int) -> str:
        return "up" if self._p1 > self._spec.p0 else "down"

    def _coerce(self, values: npt.ArrayLike) -> FloatArray:
        x = _finite_values(values)
        bad = (x != 0.0) & (x != 1.0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"values: {float(x[i])!r} at index {i} is not 0 or 1")
        return x

    def _increments(self, x: FloatArray) -> tuple[FloatArray, FloatArray, int, _Extra]:
        inc = x * self._a + (1.0 - x) * self._b
        return inc, inc, 0, {}

    def _tick_increments(self, count: int, total: float) -> tuple[float, float, bool, _Scalars]:
        inc = total * self._a + (count - total) * self._b
        return inc, inc, True, {}

    def update(self, count: float, total: float, total_sq: float | None = None) -> list[Detection]:
        """Insert ``count`` trials with ``total`` errors (``total_sq`` is ignored)."""
        cnt = _check_count(count)
        tot = _check_finite("total", total)
        if not 0.0 <= tot <= cnt:
            raise ValueError(f"total: {total!r} errors must be between 0 and count={cnt}")
        return super().update(cnt, tot, None)

    def _detail(self) -> dict[str, float]:
        return {"p0": float(self._spec.p0), "p1": self._p1}

    def to_state(self) -> dict[str, Any]:
        """JSON-safe state (floats round-trip exactly through orjson/json)."""
        return self._core_state()

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> BernoulliCUSUM:
        """Rebuild from :meth:`to_state` output."""
        spec = _spec_of(state, "bernoulli_cusum")
        assert isinstance(spec, BernoulliCUSUMSpec)
        det = cls(spec)
        det._load_core(state)
        return det


register(BernoulliCUSUMSpec, BernoulliCUSUM)
