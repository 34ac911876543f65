"""Two-sided CUSUM and Page-Hinkley change detectors, with ARL calibration.

Both detectors keep, for each watched direction, a cumulative sum of increments
``C`` and its running minimum ``M`` and test the Lindley statistic ``S = C - M``
(which equals the textbook recursion ``S_t = max(0, S_{t-1} + increment)``) against a
decision threshold. Writing the statistic this way lets :meth:`CUSUM.update_many`
run on whole numpy batches (``cumsum`` and ``minimum.accumulate``) with *bit-identical*
results to the per-event path: both paths perform the same floating-point operations
in the same order. To keep ``C`` small over unbounded streams both paths re-anchor
(``C := C - M``, ``M := 0``) each time the event count reaches a multiple of 2**16.

Weighted updates (``update(count, total, total_sq)``) treat the tick as one step of the
recursion whose increment is the sum of the ``count`` per-event increments. The
statistic after the tick therefore equals the per-event statistic at the tick boundary
whenever the per-event statistic did not touch zero inside the tick (if it did, the
tick statistic is smaller, i.e. the weighted form is never more alarm-prone), and the
alarm can only be raised at tick boundaries.

Calibration: for a CUSUM on N(mu0, sigma^2) data with reference value ``k`` and decision
interval ``h`` (both in sigma units) Siegmund's approximation gives the in-control
average run length of one side, ``ARL0 = (exp(2kb) - 2kb - 1) / (2k^2)`` with
``b = h + 1.166``; a two-sided chart alarms when either side does, so
``1/ARL0 = 1/ARL0+ + 1/ARL0-``. :func:`calibrate_h` inverts it. :func:`arl_markov`
computes the same quantity independently by solving the ARL integral equation on a
grid (piecewise-linear Nystrom/Markov-chain method) for the normal or an empirical
increment distribution; :func:`calibrate_h_empirical` uses it to calibrate a chart on
a non-normal reference sample (heavy tails: combine with ``clip``).

>>> round(calibrate_h(0.5, 465.0), 2)   # Montgomery, two-sided: k=0.5, h=5 -> ARL0 = 465
4.99
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
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
    StateError,
    as_float_array,
    check_choice,
    check_number,
    check_state,
    register,
    spec_from_dict,
    state_header,
)

__all__ = [
    "CUSUM",
    "DIRECTIONS",
    "SIEGMUND_CORRECTION",
    "CUSUMSpec",
    "PageHinkley",
    "PageHinkleySpec",
    "arl0_siegmund",
    "arl_markov",
    "arl_siegmund",
    "calibrate_h",
    "calibrate_h_empirical",
]

DIRECTIONS = ("up", "down", "both")
SIEGMUND_CORRECTION = 1.166
"""Siegmund's overshoot correction for normal data: ``b = h + 1.166``."""

ANCHOR_EVERY = 1 << 16
"""Both update paths re-anchor the cumulative sums when ``n_seen`` reaches a multiple."""

_BLOCK = 1 << 13  # vectorised batches are processed in blocks of this many events

FloatArray = npt.NDArray[np.float64]
_Extra = dict[str, FloatArray]  # per-event detail values of a batch
_Scalars = dict[str, float]


# ======================================================================= calibration


def arl_siegmund(drift: float, h: float) -> float:
    """Siegmund's ARL of a one-sided CUSUM whose increments have mean ``drift`` (sigma units).

    ``ARL = (exp(-2 drift b) + 2 drift b - 1) / (2 drift^2)``, ``b = h + 1.166``;
    ``drift = shift - k``: ``-k`` in control, ``delta - k`` after a shift of ``delta``.

    >>> round(arl_siegmund(0.5, 12.0), 1)   # +1 sigma shift, k = 0.5, h = 12
    24.3
    """
    b = h + SIEGMUND_CORRECTION
    x = -2.0 * drift * b
    if drift == 0.0:
        return b * b
    if x > 700.0:
        return math.inf
    # e^x - x - 1, by its series near 0 (avoids cancellation)
    num = x * x / 2.0 + x * x * x / 6.0 + x**4 / 24.0 if abs(x) < 1e-4 else math.expm1(x) - x
    return num / (2.0 * drift * drift)


def arl0_siegmund(k: float, h: float) -> float:
    """In-control ARL of ONE side of a CUSUM on N(0, 1) data (Siegmund's approximation).

    >>> round(arl0_siegmund(0.5, 5.0))   # one side; the two-sided chart has half: ~469
    938
    """
    return arl_siegmund(-k, h)


def _invert_increasing(fn: Callable[[float], float], target: float) -> float:
    """Smallest ``h >= 0`` with ``fn(h) >= target`` for an increasing ``fn`` (bisection)."""
    if fn(0.0) >= target:
        return 0.0
    hi = 1.0
    while fn(hi) < target:
        hi *= 2.0
        if hi > 1e9:
            raise SpecError(f"arl0: {target!r} cannot be reached")
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if fn(mid) < target:
            lo = mid
        else:
            hi = mid
    return hi


@lru_cache(maxsize=256)
def calibrate_h(k: float, arl0: float, two_sided: bool = True) -> float:
    """Decision interval ``h`` (sigma units) giving in-control ARL ``arl0`` on normal data.

    Inverts Siegmund's approximation; with ``two_sided`` each side gets ``2 * arl0``
    (``1/ARL = 1/ARL+ + 1/ARL-``). Cross-checked in the tests against the
    integral-equation ARL (:func:`arl_markov`) and Montgomery's tables
    (k = 0.5: h = 4 -> 168, h = 5 -> 465, two-sided).

    >>> round(calibrate_h(0.5, 1e6, two_sided=False), 3)
    11.956
    >>> round(calibrate_h(0.5, 1e6), 3)
    12.65
    """
    check_number("k", k, lo=0.0)
    check_number("arl0", arl0, lo=1.0, lo_open=True)
    target = 2.0 * arl0 if two_sided else arl0
    return _invert_increasing(lambda h: arl0_siegmund(k, h), target)


# ------------------------------------------------------------- integral-equation ARL


def _norm_cdf(x: FloatArray) -> FloatArray:
    erfc = np.frompyfunc(math.erfc, 1, 1)
    return np.asarray(0.5 * erfc(-x / math.sqrt(2.0)), dtype=np.float64)


def _norm_pdf(x: FloatArray) -> FloatArray:
    return np.asarray(np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi), dtype=np.float64)


def _solve_arl(
    ramp: Callable[[FloatArray], FloatArray],
    cdf: Callable[[FloatArray], FloatArray],
    upper: float,
    n: int,
    cost: float = 1.0,
) -> float:
    """Solve ``W(y) = cost + E[W(max(0, y + Z)); y + Z <= upper]`` on ``[0, upper]``; return W(0).

    ``ramp(u) = E[(u - Z)^+]`` and ``cdf(u) = P(Z <= u)`` describe the increment ``Z``.
    ``W`` is approximated piecewise-linearly on ``n`` nodes; the expectation of each
    hat function is an exact second difference of ``ramp`` (product integration), so
    discrete, continuous and empirical increment laws are all handled exactly up to
    the interpolation of ``W``.
    """
    if upper <= 0.0:
        stay = float(cdf(np.array([-upper]))[0]) if upper == 0.0 else 0.0
        return math.inf if stay >= 1.0 else cost / (1.0 - stay)
    dlt = upper / (n - 1)
    g = ramp(np.arange(-n, n + 2, dtype=np.float64) * dlt)  # G(m * dlt), m = -n .. n + 1
    base = n  # g[m + base] = G(m * dlt)
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    m = j - i + base
    mm = np.clip(m - 1, 0, len(g) - 1)
    mp = np.clip(m + 1, 0, len(g) - 1)
    kmat = (g[mm] - 2.0 * g[m] + g[mp]) / dlt
    col = np.arange(n)
    kmat[:, 0] = (g[1 - col + base] - g[-col + base]) / dlt
    top = np.asarray((n - 1 - col) * dlt, dtype=np.float64)
    kmat[:, n - 1] = (g[n - 2 - col + base] - g[n - 1 - col + base]) / dlt + cdf(top)
    w = np.linalg.solve(np.eye(n) - kmat, np.full(n, cost))
    return float(w[0])


def arl_markov(k: float, h: float, shift: float = 0.0, n: int = 400) -> float:
    """ARL of one side of a CUSUM on N(shift, 1) data, by the integral-equation method.

    Independent of Siegmund's formula; used to cross-check :func:`calibrate_h`.

    >>> round(arl_markov(0.5, 5.0))   # Siegmund: 938; literature (one side): ~930
    931
    """
    check_number("k", k, lo=0.0)
    check_number("h", h, lo=0.0)

    def ramp(u: FloatArray) -> FloatArray:  # E[(u - Z)^+], Z ~ N(shift - k, 1)
        d = np.asarray(u - (shift - k), dtype=np.float64)
        return np.asarray(d * _norm_cdf(d) + _norm_pdf(d), dtype=np.float64)

    def cdf(u: FloatArray) -> FloatArray:
        return _norm_cdf(np.asarray(u - (shift - k), dtype=np.float64))

    return _solve_arl(ramp, cdf, h, n)


def _empirical_laws(
    z: FloatArray,
) -> tuple[Callable[[FloatArray], FloatArray], Callable[[FloatArray], FloatArray]]:
    zs = np.sort(z)
    csum = np.concatenate(([0.0], np.cumsum(zs)))
    size = float(len(zs))

    def ramp(u: FloatArray) -> FloatArray:
        cnt = np.searchsorted(zs, u, side="right")
        return np.asarray((cnt * u - csum[cnt]) / size, dtype=np.float64)

    def cdf(u: FloatArray) -> FloatArray:
        return np.asarray(np.searchsorted(zs, u, side="right") / size, dtype=np.float64)

    return ramp, cdf


def _empirical_arl(z: FloatArray, k: float, h: float, two_sided: bool, n: int) -> float:
    ramp_u, cdf_u = _empirical_laws(z - k)
    up = _solve_arl(ramp_u, cdf_u, h, n)
    if not two_sided:
        return up
    ramp_d, cdf_d = _empirical_laws(-z - k)
    down = _solve_arl(ramp_d, cdf_d, h, n)
    return 1.0 / (1.0 / up + 1.0 / down)


def calibrate_h_empirical(
    sample: npt.ArrayLike,
    mean: float,
    std: float,
    *,
    k: float = 0.5,
    arl0: float = 1e6,
    two_sided: bool = True,
    clip: float | None = None,
    n: int = 300,
) -> float:
    """Decision interval ``h`` (sigma units) for ARL0 ``arl0`` on a reference ``sample``.

    The sample is standardised with ``mean``/``std`` (and winsorised to ``[-clip,
    clip]`` if given, as :class:`CUSUM` does); the ARL integral equation is solved with
    the sample's empirical increment law. The estimate is only as good as the sample's
    tails: for heavy tails pass ``clip`` (e.g. 3-4), otherwise a single extreme value
    can cross ``h`` and no sample of practical size pins that probability down.

    >>> rng = np.random.default_rng(7)
    >>> round(calibrate_h_empirical(rng.normal(size=100_000), 0.0, 1.0, arl0=465.0), 1)
    5.0
    """
    z = (as_float_array(sample, "sample") - mean) / std
    if clip is not None:
        z = np.clip(z, -clip, clip)
    if len(z) < 2:
        raise ValueError("sample: at least 2 values are needed")

    def fn(h: float) -> float:
        return _empirical_arl(z, k, h, two_sided, n)

    return _invert_increasing_log(fn, arl0)


def _invert_increasing_log(fn: Callable[[float], float], target: float) -> float:
    """Root of ``log fn(h) = log target`` for an increasing, roughly log-linear ``fn``."""
    lt = math.log(target)
    lo, flo = 0.0, math.log(fn(0.0)) - lt
    if flo >= 0.0:
        return 0.0
    hi = 1.0
    fhi = math.log(fn(hi)) - lt
    while fhi < 0.0:
        lo, flo = hi, fhi
        hi *= 2.0
        fhi = math.log(fn(hi)) - lt
        if hi > 1e6:
            raise SpecError(f"arl0: {target!r} cannot be reached")
    side = 0
    for _ in range(60):  # Illinois regula falsi
        mid = (lo * fhi - hi * flo) / (fhi - flo)
        fmid = math.log(fn(mid)) - lt
        if abs(fmid) < 1e-6 or hi - lo < 1e-9:
            return mid
        if fmid < 0.0:
            lo, flo = mid, fmid
            if side == -1:
                fhi /= 2.0
            side = -1
        else:
            hi, fhi = mid, fmid
            if side == 1:
                flo /= 2.0
            side = 1
    return 0.5 * (lo + hi)


# ======================================================================= shared engine


def _check_count(count: float) -> int:
    if isinstance(count, bool) or not isinstance(count, int | float | np.integer | np.floating):
        raise ValueError(f"count: {count!r} is not a number")
    if not math.isfinite(count) or count < 0 or count != int(count):
        raise ValueError(f"count: {count!r} must be a non-negative whole number of events")
    return int(count)


def _check_finite(field: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{field}: {value!r} is not a number")
    if not math.isfinite(value):
        raise ValueError(f"{field}: {value!r} is not finite")
    return float(value)


def _finite_values(values: npt.ArrayLike) -> FloatArray:
    x = as_float_array(values)
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x))[0])
        raise ValueError(f"values: non-finite value {float(x[bad])!r} at index {bad}")
    return x


def _state_float(state: Mapping[str, Any], field: str) -> float:
    v = state.get(field)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise StateError(f"{field}: expected a finite number, got {v!r}")
    return float(v)


def _state_int(state: Mapping[str, Any], field: str) -> int:
    v = state.get(field)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise StateError(f"{field}: expected a non-negative integer, got {v!r}")
    return v


def _finite_out(field: str, v: float) -> float:
    if not math.isfinite(v):
        raise StateError(f"{field}: state holds a non-finite value {v!r}")
    return float(v)


class _LindleyDetector:
    """Up/down Lindley statistics ``S = C - min C`` with exact batch == per-event semantics.

    Subclasses provide the increments (:meth:`_increments` for a batch without
    mutating, :meth:`_tick_increments` for one weighted tick, mutating), any auxiliary
    state (:meth:`_advance_aux`, :meth:`_reset_aux`) and the detection payload.
    """

    _kind: ClassVar[str] = ""
    spec: Spec  # what the Detector protocol exposes
    _spec: Any  # the same object, typed concretely by each subclass

    def __init__(self) -> None:
        self._c = [0.0, 0.0]  # cumulative increments (up, down) since the last anchor
        self._m = [0.0, 0.0]  # running minimum of _c
        self._above = [False, False]  # "continue" mode: statistic above threshold?
        self._n_seen = 0
        self._n_detections = 0

    # -- hooks ---------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        raise NotImplementedError

    def _active(self) -> tuple[bool, bool]:
        direction = self._spec.direction
        return direction in ("up", "both"), direction in ("down", "both")

    def _increments(self, x: FloatArray) -> tuple[FloatArray, FloatArray, int, _Extra]:
        """Per-event (up, down) increments, first eligible index, per-event detail arrays."""
        raise NotImplementedError

    def _tick_increments(self, count: int, total: float) -> tuple[float, float, bool, _Scalars]:
        """Tick increments, eligibility and detail values (may mutate auxiliary state)."""
        raise NotImplementedError

    def _advance_aux(self, x: FloatArray) -> None:
        """Advance auxiliary state (e.g. a running mean) over consumed events."""

    def _reset_aux(self) -> None:
        """Reset auxiliary state after a detection in ``reset`` mode."""

    def _detail(self) -> dict[str, float]:
        return {}

    def _side_name(self, side: int) -> str:
        return "up" if side == 0 else "down"

    # -- public API ------------------------------------------------------------------
    @property
    def n_seen(self) -> int:
        """Events consumed so far (weighted ticks count ``count`` events)."""
        return self._n_seen

    @property
    def n_detections(self) -> int:
        """Detections raised so far."""
        return self._n_detections

    @property
    def statistic(self) -> tuple[float, float]:
        """Current (up, down) statistics; an inactive side stays at 0."""
        return self._c[0] - self._m[0], self._c[1] - self._m[1]

    def _reset_stats(self) -> None:
        self._c = [0.0, 0.0]
        self._m = [0.0, 0.0]
        self._above = [False, False]
        self._reset_aux()

    def _anchor(self) -> None:
        for s in (0, 1):
            self._c[s] = self._c[s] - self._m[s]
            self._m[s] = 0.0

    def _emit(self, side: int, index: int, stat: float, extra: _Scalars) -> Detection:
        self._n_detections += 1
        return Detection(
            detector=self._kind,
            index=index,
            statistic=float(stat),
            threshold=self.threshold,
            direction=self._side_name(side),
            reset=self._spec.on_detect == "reset",
            detail={**self._detail(), **extra},
        )

    def update(self, count: float, total: float, total_sq: float | None = None) -> list[Detection]:
        """Insert a weighted tick: ``count`` events summing to ``total`` (see module doc)."""
        cnt = _check_count(count)
        tot = _check_finite("total", total)
        if total_sq is not None:
            _check_finite("total_sq", total_sq)
        if cnt == 0:
            return []
        inc_up, inc_dn, eligible, extra = self._tick_increments(cnt, tot)
        before = self._n_seen
        self._n_seen += cnt
        h = self.threshold
        out: list[Detection] = []
        hits: list[tuple[int, float]] = []
        for side, active in enumerate(self._active()):
            if not active:
                continue
            c = self._c[side] + (inc_up if side == 0 else inc_dn)
            m = min(self._m[side], c)
            self._c[side], self._m[side] = c, m
            s = c - m
            hit = eligible and s > h
            if self._spec.on_detect == "reset":
                if hit:
                    hits.append((side, s))
            else:
                if hit and not self._above[side]:
                    hits.append((side, s))
                self._above[side] = hit
        for side, s in hits:
            out.append(self._emit(side, self._n_seen - 1, s, extra))
        if hits and self._spec.on_detect == "reset":
            self._reset_stats()
        if self._n_seen // ANCHOR_EVERY != before // ANCHOR_EVERY:
            self._anchor()
        return out

    def update_many(self, values: npt.ArrayLike) -> list[Detection]:
        """Insert events one by one (vectorised); identical to per-event ``update(1, v)``."""
        x = self._coerce(values)
        out: list[Detection] = []
        pos = 0
        span = _BLOCK
        while pos < len(x):
            room = ANCHOR_EVERY - self._n_seen % ANCHOR_EVERY
            end = min(len(x), pos + span, pos + room)
            used = self._segment(x[pos:end], out)
            # after a resetting detection, look ahead in small, doubling spans so that
            # frequent alarms do not make the work quadratic in the block size
            span = 256 if used < end - pos else min(2 * span, _BLOCK)
            pos += used
        return out

    def _coerce(self, values: npt.ArrayLike) -> FloatArray:
        return _finite_values(values)

    def _segment(self, x: FloatArray, out: list[Detection]) -> int:
        """Process ``x`` up to the end or the first resetting detection; return #consumed."""
        size = len(x)
        inc_up, inc_dn, eligible, extra = self._increments(x)
        h = self.threshold
        reset = self._spec.on_detect == "reset"
        first = size
        per_side: list[tuple[int, FloatArray, FloatArray, FloatArray, npt.NDArray[np.bool_]]] = []
        for side, active in enumerate(self._active()):
            if not active:
                continue
            inc = inc_up if side == 0 else inc_dn
            buf = np.empty(size + 1)
            buf[0] = self._c[side]
            buf[1:] = inc
            c = np.cumsum(buf)
            buf[0] = self._m[side]
            buf[1:] = c[1:]
            m = np.minimum.accumulate(buf)
            s = c[1:] - m[1:]
            hit = s > h
            if eligible > 0:
                hit[: min(eligible, size)] = False
            per_side.append((side, c, m, s, hit))
            if reset:
                nz = np.flatnonzero(hit)
                if len(nz):
                    first = min(first, int(nz[0]))
        base = self._n_seen
        if reset:
            if first < size:
                for side, _c, _m, s, hit in per_side:
                    if hit[first]:
                        at = {k: float(v[first]) for k, v in extra.items()}
                        out.append(self._emit(side, base + first, float(s[first]), at))
                self._n_seen = base + first + 1
                self._reset_stats()
                if self._n_seen % ANCHOR_EVERY == 0:
                    self._anchor()
                return first + 1
            for side, c, m, _s, _hit in per_side:
                self._c[side], self._m[side] = float(c[-1]), float(m[-1])
        else:
            events: list[tuple[int, int, float]] = []
            for side, c, m, s, hit in per_side:
                prev = np.empty(size, dtype=bool)
                prev[0] = self._above[side]
                prev[1:] = hit[:-1]
                events.extend(
                    (int(idx), side, float(s[idx])) for idx in np.flatnonzero(hit & ~prev)
                )
                self._c[side], self._m[side] = float(c[-1]), float(m[-1])
                self._above[side] = bool(hit[-1])
            for idx, side, stat in sorted(events):
                at = {k: float(v[idx]) for k, v in extra.items()}
                out.append(self._emit(side, base + idx, stat, at))
        self._advance_aux(x)
        self._n_seen = base + size
        if self._n_seen % ANCHOR_EVERY == 0:
            self._anchor()
        return size

    # -- state ---------------------------------------------------------------------------
    def _core_state(self) -> dict[str, Any]:
        out = state_header(self._kind)
        out["spec"] = self._spec.to_dict()
        out["n_seen"] = self._n_seen
        out["n_detections"] = self._n_detections
        out["c"] = [_finite_out("c", v) for v in self._c]
        out["m"] = [_finite_out("m", v) for v in self._m]
        out["above"] = list(self._above)
        return out

    def _load_core(self, state: Mapping[str, Any]) -> None:
        self._n_seen = _state_int(state, "n_seen")
        self._n_detections = _state_int(state, "n_detections")
        for field in ("c", "m", "above"):
            v = state.get(field)
            if not isinstance(v, list) or len(v) != 2:
                raise StateError(f"{field}: expected a list of 2 values, got {v!r}")
        self._c = [_state_float({"c": v}, "c") for v in state["c"]]
        self._m = [_state_float({"m": v}, "m") for v in state["m"]]
        if not all(isinstance(v, bool) for v in state["above"]):
            raise StateError(f"above: expected 2 booleans, got {state['above']!r}")
        self._above = [bool(v) for v in state["above"]]


def _spec_of(state: Mapping[str, Any], kind: str) -> Spec:
    check_state(state, kind)
    raw = state.get("spec")
    if not isinstance(raw, Mapping) or raw.get("kind") != kind:
        raise StateError(f"spec: expected a {kind!r} spec mapping, got {raw!r}")
    try:
        return spec_from_dict(raw)
    except SpecError as err:
        raise StateError(f"spec: {err}") from None


# ======================================================================= CUSUM


@dataclass(frozen=True)
class CUSUMSpec(Spec):
    """Two-sided (or one-sided) CUSUM for a shift of the mean away from ``target_mean``.

    ``k`` (reference value, half the shift to detect) and ``h`` (decision interval) are in
    units of ``sigma``. With ``h=None`` it is calibrated from ``arl0`` (in-control average
    run length in events) by Siegmund's approximation for normal data, see
    :func:`calibrate_h`. ``clip`` winsorises standardised values to ``[-clip, clip]``
    (robust chart for heavy tails; calibrate with :func:`calibrate_h_empirical`).
    ``on_detect="reset"`` restarts both statistics at 0 after an alarm; ``"continue"``
    keeps them and alarms again only after the statistic fell back below ``h``.

    >>> from detectors.base import build
    >>> spec = CUSUMSpec(target_mean=100.0, sigma=15.0, arl0=1e4, direction="down")
    >>> round(spec.decision_interval, 3)
    7.353
    >>> x = np.random.default_rng(2).normal(100, 15, 3000) - np.repeat([0.0, 15.0], 1500)
    >>> [(d.index, d.direction) for d in build(spec.to_dict()).update_many(x)][:2]
    [(1513, 'down'), (1536, 'down')]
    """

    kind: ClassVar[str] = "cusum"
    target_mean: float
    sigma: float
    k: float = 0.5
    h: float | None = None
    arl0: float = 1e6
    direction: str = "both"
    on_detect: str = "reset"
    clip: float | None = None

    def validate(self) -> None:
        check_number("target_mean", self.target_mean)
        check_number("sigma", self.sigma, lo=0.0, lo_open=True)
        check_number("k", self.k, lo=0.0)
        if self.h is not None:
            check_number("h", self.h, lo=0.0, lo_open=True)
        check_number("arl0", self.arl0, lo=1.0, lo_open=True)
        check_choice("direction", self.direction, DIRECTIONS)
        check_choice("on_detect", self.on_detect, ON_DETECT_CHOICES)
        if self.clip is not None:
            check_number("clip", self.clip, lo=0.0, lo_open=True)

    @property
    def decision_interval(self) -> float:
        """``h`` in sigma units (given, or calibrated from ``arl0``)."""
        if self.h is not None:
            return float(self.h)
        return calibrate_h(float(self.k), float(self.arl0), self.direction == "both")

    @classmethod
    def from_reference(
        cls,
        mean: float,
        std: float,
        *,
        arl0: float = 1e6,
        k: float = 0.5,
        direction: str = "both",
        on_detect: str = "reset",
        clip: float | None = None,
        sample: npt.ArrayLike | None = None,
    ) -> CUSUMSpec:
        """Spec for a reference profile's mean/std; ``h`` from ``arl0``.

        Without ``sample`` the normal-theory calibration is used (``h=None``). With a
        reference ``sample`` (same population the mean/std describe) ``h`` is fixed by
        :func:`calibrate_h_empirical` on its empirical distribution, which is what
        skewed or discrete data need; heavy tails also need ``clip``.

        >>> CUSUMSpec.from_reference(10.0, 2.0, arl0=500.0).to_dict()["target_mean"]
        10.0
        """
        h = None
        if sample is not None:
            h = calibrate_h_empirical(
                sample, mean, std, k=k, arl0=arl0, two_sided=direction == "both", clip=clip
            )
            h = max(h, 1e-9)
        return cls(
            target_mean=float(mean),
            sigma=float(std),
            k=k,
            h=h,
            arl0=arl0,
            direction=direction,
            on_detect=on_detect,
            clip=clip,
        )


class CUSUM(_LindleyDetector):
    """Tabular CUSUM: ``S+ = max(0, S+ + z - k)``, ``S- = max(0, S- - z - k)``, alarm at ``S > h``.

    ``z = (x - target_mean) / sigma``; statistics and threshold are in sigma units.

    >>> rng = np.random.default_rng(1)
    >>> x = np.concatenate([rng.normal(0, 1, 5000), rng.normal(1, 1, 500)])  # +1 sigma at 5000
    >>> det = CUSUM(CUSUMSpec(target_mean=0.0, sigma=1.0, arl0=1e6, on_detect="continue"))
    >>> [(d.index, d.direction, d.reset) for d in det.update_many(x)]
    [(5028, 'up', False)]
    >>> round(det.threshold, 2), det.n_seen
    (12.65, 5500)

    With ``on_detect="reset"`` the chart restarts and alarms again while the shift lasts:

    >>> det = CUSUM(CUSUMSpec(target_mean=0.0, sigma=1.0, arl0=1e6))
    >>> [d.index for d in det.update_many(x)][:3]
    [5028, 5063, 5091]
    """

    _kind: ClassVar[str] = "cusum"

    def __init__(self, spec: CUSUMSpec) -> None:
        if not isinstance(spec, CUSUMSpec):
            raise TypeError(f"spec: expected CUSUMSpec, got {type(spec).__name__}")
        super().__init__()
        self.spec = spec
        self._spec: CUSUMSpec = spec
        self._h = spec.decision_interval

    @property
    def threshold(self) -> float:
        """Decision interval ``h`` in sigma units."""
        return self._h

    def _increments(self, x: FloatArray) -> tuple[FloatArray, FloatArray, int, _Extra]:
        sp = self._spec
        z = (x - sp.target_mean) / sp.sigma
        if sp.clip is not None:
            z = np.clip(z, -sp.clip, sp.clip)
        return z - sp.k, -z - sp.k, 0, {}

    def _tick_increments(self, count: int, total: float) -> tuple[float, float, bool, _Scalars]:
        sp = self._spec
        zs = (total - count * sp.target_mean) / sp.sigma
        if sp.clip is not None:  # a tick clips its mean standardised value
            zs = count * min(max(zs / count, -sp.clip), sp.clip)
        return zs - count * sp.k, -zs - count * sp.k, True, {}

    def _detail(self) -> dict[str, float]:
        return {"target_mean": float(self._spec.target_mean), "sigma": float(self._spec.sigma)}

    def to_state(self) -> dict[str, Any]:
        """JSON-safe state (floats round-trip exactly through orjson/json)."""
        return self._core_state()

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> CUSUM:
        """Rebuild from :meth:`to_state` output."""
        spec = _spec_of(state, "cusum")
        assert isinstance(spec, CUSUMSpec)
        det = cls(spec)
        det._load_core(state)
        return det


# ======================================================================= Page-Hinkley


@dataclass(frozen=True)
class PageHinkleySpec(Spec):
    """Page-Hinkley test against the running mean (as in river), optionally two-sided.

    ``m_t = alpha * m_{t-1} + (x_t - mean_t) - delta`` (up; ``-(x_t - mean_t) - delta``
    down), alarm when ``m_t - min m > threshold`` after ``min_instances`` events.
    ``delta`` and ``threshold`` are in data units. With ``threshold=None`` it is
    calibrated from ``sigma`` (the in-control standard deviation, required then) and
    ``arl0``: once the running mean has settled the statistic is a CUSUM with
    reference ``k = delta / sigma``, so ``threshold = sigma * calibrate_h(delta / sigma,
    arl0, two_sided)`` (the running mean only makes the chart slightly more
    conservative). Pick ``delta`` near half the shift to detect: the default
    ``delta = 0.005`` with a calibrated threshold detects 1-sigma shifts only after
    hundreds of events. Calibration assumes ``alpha = 1``.

    >>> from detectors.base import build
    >>> spec = PageHinkleySpec(delta=2.0, sigma=4.0, arl0=1e5)
    >>> round(spec.lambda_, 2)
    41.39
    >>> x = np.random.default_rng(3).normal(50, 4, 4000) + np.repeat([0.0, 4.0], 2000)
    >>> [(d.index, d.direction) for d in build(spec.to_dict()).update_many(x)]
    [(2025, 'up')]
    >>> PageHinkleySpec(delta=0.1)
    Traceback (most recent call last):
    ...
    detectors.base.SpecError: sigma: required when threshold is None ...
    """

    kind: ClassVar[str] = "page_hinkley"
    delta: float = 0.005
    threshold: float | None = None
    arl0: float = 1e6
    sigma: float | None = None
    alpha: float = 1.0
    min_instances: int = 30
    direction: str = "both"
    on_detect: str = "reset"

    def validate(self) -> None:
        check_number("delta", self.delta, lo=0.0)
        if self.threshold is not None:
            check_number("threshold", self.threshold, lo=0.0, lo_open=True)
        check_number("arl0", self.arl0, lo=1.0, lo_open=True)
        if self.sigma is not None:
            check_number("sigma", self.sigma, lo=0.0, lo_open=True)
        check_number("alpha", self.alpha, lo=0.0, hi=1.0, lo_open=True)
        check_number("min_instances", self.min_instances, lo=1, integer=True)
        check_choice("direction", self.direction, DIRECTIONS)
        check_choice("on_detect", self.on_detect, ON_DETECT_CHOICES)
        if self.threshold is None:
            if self.sigma is None:
                raise SpecError(
                    "sigma: required when threshold is None (threshold is calibrated "
                    "from sigma and arl0); valid values: a finite number > 0"
                )
            if self.alpha != 1.0:
                raise SpecError(
                    "threshold: required when alpha < 1 (the arl0 calibration assumes "
                    "alpha = 1); valid values: a finite number > 0"
                )

    @property
    def lambda_(self) -> float:
        """Threshold in data units (given, or calibrated from ``sigma`` and ``arl0``)."""
        if self.threshold is not None:
            return float(self.threshold)
        assert self.sigma is not None
        k = float(self.delta) / float(self.sigma)
        return float(self.sigma) * calibrate_h(k, float(self.arl0), self.direction == "both")


class PageHinkley(_LindleyDetector):
    """Page-Hinkley test; ``update_many`` is vectorised (exact) when ``alpha == 1``.

    >>> rng = np.random.default_rng(1)
    >>> x = np.concatenate([rng.normal(0, 1, 5000), rng.normal(1, 1, 500)])
    >>> det = PageHinkley(PageHinkleySpec(delta=0.5, sigma=1.0, arl0=1e6))
    >>> [(d.index, d.direction, d.reset) for d in det.update_many(x)]
    [(5028, 'up', True)]

    After the reset the running mean restarts, so the persisting new level is learnt
    and no further alarm follows.

    Weighted ticks measure the tick's deviations from the running mean at the end of
    the tick: the increment is ``total - count * mean_after - count * delta``.
    """

    _kind: ClassVar[str] = "page_hinkley"

    def __init__(self, spec: PageHinkleySpec) -> None:
        if not isinstance(spec, PageHinkleySpec):
            raise TypeError(f"spec: expected PageHinkleySpec, got {type(spec).__name__}")
        super().__init__()
        self.spec = spec
        self._spec: PageHinkleySpec = spec
        self._lambda = spec.lambda_
        self._reset_aux()

    @property
    def threshold(self) -> float:
        """Threshold (lambda) in data units."""
        return self._lambda

    @property
    def mean(self) -> float:
        """Running mean since the last reset (0 before any event)."""
        return self._off + self._sum / self._n if self._n else 0.0

    def _reset_aux(self) -> None:
        self._n = 0  # events since last reset
        self._off = 0.0  # first value after reset: sums are kept relative to it
        self._sum = 0.0  # sum of (x - off)

    def _increments(self, x: FloatArray) -> tuple[FloatArray, FloatArray, int, _Extra]:
        off = float(x[0]) if self._n == 0 else self._off
        sx = x - off
        buf = np.empty(len(x) + 1)
        buf[0] = self._sum
        buf[1:] = sx
        s = np.cumsum(buf)[1:]
        n = self._n + np.arange(1, len(x) + 1, dtype=np.float64)
        mean = s / n
        dev = sx - mean
        eligible = max(0, self._spec.min_instances - self._n - 1)
        extra = {"mean": off + mean, "n": n}
        return dev - self._spec.delta, -dev - self._spec.delta, eligible, extra

    def _advance_aux(self, x: FloatArray) -> None:
        if self._n == 0:
            self._off = float(x[0])
        buf = np.empty(len(x) + 1)
        buf[0] = self._sum
        buf[1:] = x - self._off
        self._sum = float(np.cumsum(buf)[-1])
        self._n += len(x)

    def _tick_increments(self, count: int, total: float) -> tuple[float, float, bool, _Scalars]:
        if self._n == 0:
            self._off = total / count
        sx = total - count * self._off
        self._sum = self._sum + sx
        self._n += count
        mean = self._sum / self._n
        d = sx - count * mean
        delta = self._spec.delta
        extra = {"mean": self._off + mean, "n": float(self._n)}
        return d - count * delta, -d - count * delta, self._n >= self._spec.min_instances, extra

    def update_many(self, values: npt.ArrayLike) -> list[Detection]:
        """Insert events one by one; vectorised and exact for ``alpha == 1``."""
        if self._spec.alpha == 1.0:
            return super().update_many(values)
        x = _finite_values(values)
        out: list[Detection] = []
        for v in x.tolist():
            out.extend(self.update(1, v))
        return out

    def update(self, count: float, total: float, total_sq: float | None = None) -> list[Detection]:
        """Insert a weighted tick (see class doc)."""
        if self._spec.alpha == 1.0:
            return super().update(count, total, total_sq)
        cnt = _check_count(count)
        tot = _check_finite("total", total)
        if cnt == 0:
            return []
        iu, idn, eligible, extra = self._tick_increments(cnt, tot)
        self._n_seen += cnt
        alpha = self._spec.alpha
        hits: list[tuple[int, float]] = []
        for side, active in enumerate(self._active()):
            if not active:
                continue
            c = alpha * self._c[side] + (iu if side == 0 else idn)
            m = min(self._m[side], c)
            self._c[side], self._m[side] = c, m
            hit = eligible and c - m > self._lambda
            if self._spec.on_detect == "reset":
                if hit:
                    hits.append((side, c - m))
            else:
                if hit and not self._above[side]:
                    hits.append((side, c - m))
                self._above[side] = hit
        out = [self._emit(side, self._n_seen - 1, s, extra) for side, s in hits]
        if hits and self._spec.on_detect == "reset":
            self._reset_stats()
        return out

    def to_state(self) -> dict[str, Any]:
        """JSON-safe state (floats round-trip exactly through orjson/json)."""
        out = self._core_state()
        out["n"] = self._n
        out["offset"] = _finite_out("offset", self._off)
        out["sum"] = _finite_out("sum", self._sum)
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PageHinkley:
        """Rebuild from :meth:`to_state` output."""
        spec = _spec_of(state, "page_hinkley")
        assert isinstance(spec, PageHinkleySpec)
        det = cls(spec)
        det._load_core(state)
        det._n = _state_int(state, "n")
        det._off = _state_float(state, "offset")
        det._sum = _state_float(state, "sum")
        return det


register(CUSUMSpec, CUSUM)
register(PageHinkleySpec, PageHinkley)
