"""ADWIN (ADaptive WINdowing, Bifet & Gavalda 2007), river-compatible, with a fast batch path.

The window is an exponential histogram: level ``i`` holds up to ``max_buckets`` buckets,
each a (count, total, M2) summary of ``2**i`` consecutive events (M2 = sum of squared
deviations from the bucket mean); when a level overflows its two oldest buckets merge
into one bucket of the next level. Every ``clock`` events (once the window is wider
than ``grace_period``) every boundary between buckets is tested as a cut into an old
sub-window W0 and a recent one W1: with ``m = 1/(n0-mwl+1) + 1/(n1-mwl+1)``,
``d' = log(2 log(W) / delta)`` and ``v`` the window variance, the cut fires when
``|mean(W0) - mean(W1)| > sqrt(2 m v d') + 2/3 d' m``. While a cut fires the oldest
bucket is dropped. This is river's algorithm (``river.drift.ADWIN``, 0.26.1) operation
for operation, so the same floating-point results and the same change points.

``on_detect``: ADWIN itself always drops the old sub-window. ``"reset"`` (default, what
river does: its detector re-initialises on the next update) then also empties the
window and restarts the clock; ``"continue"`` keeps the recent sub-window W1 and goes
on (classic ADWIN2). :class:`~detectors.base.Detection` says which (``reset``) and how
much was dropped (``detail``).

Weighted ticks: ``update(count, total, total_sq)`` inserts the tick as ONE level-0
bucket holding ``count`` events, the tick's total and its within-tick M2
(``total_sq - total**2 / count``). Window width, mean and variance stay exact (Chan's
parallel variance formula), cut points fall on tick boundaries only, merging is by
number of buckets (so buckets of a level may hold different numbers of events and the
memory is O(max_buckets * log(number of ticks))), and the cut test runs when the event
count passes a multiple of ``clock`` (at most once per tick). A single event
(``count == 1``) is exactly river's per-event update.

Numerics: like river, the window total is a running float sum, so values whose
mean is ~1e8 times their spread (e.g. a constant 1e9 + 0.3) accumulate enough rounding
for spurious cuts, in river and here alike; centre such data (subtract a reference
mean) before feeding it. Ticks pass ``total_sq``, whose M2 = total_sq - total**2/count
loses precision the same way for large offsets.

Batch path: ``update_many`` does not loop over events. Between two checks the
structure only changes by insertions, whose merges are FIFO pairings fixed by the
number of arrivals, so a whole block of events is merged level by level with numpy
(the same pairs, the same float operations), the window totals and variances are
running sums (``cumsum``), and the cut test of every check in the block is evaluated
at once on a (checks x buckets) matrix. The first check that may fire is then re-run
by the scalar code, which is authoritative; results equal per-event insertion bit for
bit (tested against river and against the scalar path).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from detectors.base import (
    ON_DETECT_CHOICES,
    Detection,
    Spec,
    StateError,
    check_choice,
    check_number,
    check_state,
    register,
    spec_from_dict,
    state_header,
)
from detectors.cusum import FloatArray, _check_count, _check_finite, _finite_values

__all__ = ["ADWIN", "ADWINSpec"]

_ROWS = 256  # checks per vectorised block (bucket merging is done once per block)
_CHUNK = 128  # checks screened together (keeps the screening matrices in cache)
IntArray = npt.NDArray[np.int64]
_Queue = tuple[FloatArray, int]  # (3, n) counts/totals/M2s of a level's queue, #old buckets
_NO_BUCKETS = np.empty((3, 0))
_Prefix = tuple[FloatArray, FloatArray, IntArray, float]  # prefix sums of queues, offsets, scale
_SMALL = 96  # batches shorter than this use the scalar path


@dataclass(frozen=True)
class ADWINSpec(Spec):
    """ADWIN parameters (river's names and defaults).

    ``delta``: confidence of the cut test; ``clock``: test every ``clock`` events;
    ``max_buckets``: buckets per level before merging; ``min_window_length``: minimum
    events on each side of a cut; ``grace_period``: no test until the window holds more
    than this many events; ``on_detect``: ``"reset"`` (empty the window after a change,
    as river) or ``"continue"`` (keep the recent sub-window).

    >>> from detectors.base import build
    >>> spec = ADWINSpec(delta=0.01, on_detect="continue")
    >>> det = build(spec.to_dict())
    >>> x = np.random.default_rng(0).normal(0, 1, 4000) + np.repeat([0.0, 1.0], 2000)
    >>> [(d.index, d.direction, d.reset) for d in det.update_many(x)]
    [(2047, 'up', False), (2175, 'up', False)]
    >>> ADWINSpec(clock=0)
    Traceback (most recent call last):
    ...
    detectors.base.SpecError: clock: 0 must be >= 1
    """

    kind: ClassVar[str] = "adwin"
    delta: float = 0.002
    clock: int = 32
    max_buckets: int = 5
    min_window_length: int = 5
    grace_period: int = 10
    on_detect: str = "reset"

    def validate(self) -> None:
        check_number("delta", self.delta, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        check_number("clock", self.clock, lo=1, integer=True)
        check_number("max_buckets", self.max_buckets, lo=2, integer=True)
        check_number("min_window_length", self.min_window_length, lo=1, integer=True)
        check_number("grace_period", self.grace_period, lo=0, integer=True)
        check_choice("on_detect", self.on_detect, ON_DETECT_CHOICES)


class _Level:
    """Buckets of one level: parallel lists of counts, totals and M2s, oldest first."""

    __slots__ = ("n", "t", "v")

    def __init__(self, n: list[float], t: list[float], v: list[float]) -> None:
        self.n = n
        self.t = t
        self.v = v


class ADWIN:
    """Adaptive windowing drift detector; river-compatible change points.

    River's documented example (``random.Random(12345)``, 1,000 draws of 0/1 then
    1,000 of 4..7), where ``river.drift.ADWIN`` reports index 1023:

    >>> import random
    >>> rng = random.Random(12345)
    >>> stream = rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000)
    >>> det = ADWIN(ADWINSpec())
    >>> [(d.index, d.direction, d.reset) for d in det.update_many(stream)]
    [(1023, 'up', True)]
    >>> det.width, det.n_seen, det.n_detections
    (976, 2000, 1)

    ``width``/``mean``/``variance`` describe the current window (``variance`` is the
    population variance; river's ``ADWIN.variance`` reports the sum of squares M2).
    """

    def __init__(self, spec: ADWINSpec | None = None) -> None:
        if spec is None:
            spec = ADWINSpec()
        if not isinstance(spec, ADWINSpec):
            raise TypeError(f"spec: expected ADWINSpec, got {type(spec).__name__}")
        self.spec: Spec = spec  # the Detector protocol's view
        self._spec: ADWINSpec = spec
        self._n_seen = 0
        self._n_detections = 0
        self._clear()

    def _clear(self) -> None:
        self._levels: list[_Level] = [_Level([], [], [])]
        self._width = 0.0
        self._total = 0.0
        self._m2 = 0.0
        self._tick = 0  # events since the last reset, modulo clock

    # ---------------------------------------------------------------- properties
    @property
    def n_seen(self) -> int:
        """Events consumed so far (weighted ticks count ``count`` events)."""
        return self._n_seen

    @property
    def n_detections(self) -> int:
        """Changes detected so far."""
        return self._n_detections

    @property
    def width(self) -> int:
        """Number of events in the current window."""
        return int(self._width)

    @property
    def mean(self) -> float:
        """Mean of the current window (0.0 when empty)."""
        return self._total / self._width if self._width else 0.0

    @property
    def variance(self) -> float:
        """Population variance of the current window (0.0 when empty)."""
        return max(self._m2, 0.0) / self._width if self._width else 0.0

    @property
    def n_buckets(self) -> int:
        """Buckets currently stored (O(max_buckets * log width))."""
        return sum(len(level.n) for level in self._levels)

    # ---------------------------------------------------------------- scalar core
    def _insert(self, c: float, s: float, v: float) -> None:
        """Insert one bucket of ``c`` events with total ``s`` and M2 ``v`` (river order)."""
        lv = self._levels[0]
        lv.n.append(c)
        lv.t.append(s)
        lv.v.append(v)
        w_old = self._width
        self._width = w_old + c
        if w_old > 0.0:
            d = s / c - self._total / w_old
            inc = v + w_old * c * d * d / self._width
        else:
            inc = v
        self._m2 += inc
        self._total += s
        cap = self._spec.max_buckets + 1
        levels = self._levels
        i = 0
        while len(levels[i].n) == cap:
            lv = levels[i]
            na, nb = lv.n[0], lv.n[1]
            ta, tb = lv.t[0], lv.t[1]
            dd = ta / na - tb / nb
            v12 = lv.v[0] + lv.v[1] + na * nb / (na + nb) * dd * dd
            if i + 1 == len(levels):
                levels.append(_Level([], [], []))
            up = levels[i + 1]
            up.n.append(na + nb)
            up.t.append(ta + tb)
            up.v.append(v12)
            del lv.n[:2], lv.t[:2], lv.v[:2]
            if len(up.n) < cap:
                break
            i += 1

    def _scan(self) -> tuple[float, float, float, float, float] | None:
        """River's cut scan; the first firing cut as (|dm|, eps, mean0, mean1, n0)."""
        w = self._width
        mwl = float(self._spec.min_window_length)
        if w < 2.0 * mwl:
            return None
        dp = math.log(2.0 * math.log(w) / self._spec.delta)
        vw = self._m2 / w
        c23 = 2.0 / 3.0 * dp
        n0 = 0.0
        n1 = w
        u0 = 0.0
        u1 = self._total
        levels = self._levels
        for i in range(len(levels) - 1, -1, -1):
            lv = levels[i]
            last = len(lv.n) - 1
            for k in range(last + 1):
                size = lv.n[k]
                tk = lv.t[k]
                n0 += size
                n1 -= size
                u0 += tk
                u1 -= tk
                if i == 0 and k == last:
                    return None
                if n1 >= mwl and n0 >= mwl:
                    m = 1.0 / (n0 - mwl + 1.0) + 1.0 / (n1 - mwl + 1.0)
                    arg = 2.0 * m * vw * dp
                    if arg >= 0.0:
                        dm = u0 / n0 - u1 / n1
                        eps = math.sqrt(arg) + c23 * m
                        if abs(dm) > eps:
                            return abs(dm), eps, u0 / n0, u1 / n1, n0
        return None

    def _delete_oldest(self) -> tuple[float, float]:
        levels = self._levels
        top = levels[-1]
        n, u, v = top.n[0], top.t[0], top.v[0]
        mu = u / n
        self._width -= n
        self._total -= u
        mu_w = self._total / self._width
        self._m2 -= v + n * self._width * (mu - mu_w) * (mu - mu_w) / (n + self._width)
        del top.n[0], top.t[0], top.v[0]
        if not top.n and len(levels) > 1:
            levels.pop()
        return n, u

    def _detect(self) -> Detection | None:
        """Run the cut test (dropping old buckets while a cut fires); scalar, authoritative."""
        first = self._scan()
        if first is None:
            return None
        width_before = self._width
        dropped_n = 0.0
        dropped_t = 0.0
        cut: tuple[float, float, float, float, float] | None = first
        while cut is not None and self._width > 0.0:
            n, u = self._delete_oldest()
            dropped_n += n
            dropped_t += u
            cut = self._scan()
        self._n_detections += 1
        reset = self._spec.on_detect == "reset"
        stat, eps, mean0, mean1, n0 = first
        detail = {
            "width_before": width_before,
            "cut_n0": n0,
            "dropped": dropped_n,
            "width_after": self._width,
            "mean_dropped": dropped_t / dropped_n if dropped_n else mean0,
            "mean_kept": self._total / self._width if self._width else mean1,
        }
        if reset:
            self._clear()
        return Detection(
            detector="adwin",
            index=self._n_seen - 1,
            statistic=stat,
            threshold=eps,
            direction="up" if mean1 > mean0 else "down",
            reset=reset,
            detail=detail,
        )

    def _after_insert(self, count: int) -> Detection | None:
        t = self._tick + count
        self._tick = t % self._spec.clock
        if t >= self._spec.clock and self._width > self._spec.grace_period:
            return self._detect()
        return None

    def _step(self, x: float) -> Detection | None:
        self._insert(1.0, x, 0.0)
        self._n_seen += 1
        return self._after_insert(1)

    # ---------------------------------------------------------------- public updates
    def update(self, count: float, total: float, total_sq: float | None = None) -> list[Detection]:
        """Insert a tick of ``count`` events as one bucket (see module doc).

        ``total_sq`` (sum of squares) is required when ``count > 1``.
        """
        cnt = _check_count(count)
        tot = _check_finite("total", total)
        if cnt == 0:
            return []
        if cnt == 1:
            m2 = 0.0
        else:
            if total_sq is None:
                raise ValueError(
                    "total_sq: required by ADWIN when count > 1 (the within-tick "
                    "variance enters the cut test)"
                )
            m2 = max(0.0, _check_finite("total_sq", total_sq) - tot * tot / cnt)
        self._insert(float(cnt), tot, m2)
        self._n_seen += cnt
        det = self._after_insert(cnt)
        return [det] if det is not None else []

    def update_many(self, values: npt.ArrayLike) -> list[Detection]:
        """Insert events one by one (vectorised); identical to per-event updates."""
        x = _finite_values(values)
        out: list[Detection] = []
        block = self._spec.clock * max(1, min(_ROWS, 8192 // self._spec.clock))
        pos = 0
        size = len(x)
        while pos < size:
            if size - pos < _SMALL:
                for v in x[pos:].tolist():
                    det = self._step(v)
                    if det is not None:
                        out.append(det)
                break
            used, det = self._block(x[pos : pos + block])
            pos += used
            if det is not None:
                out.append(det)
        return out

    # ---------------------------------------------------------------- batch core
    def _pyramid(self, x: FloatArray) -> list[_Queue]:
        """Per level: the queue of old buckets followed by this block's arrivals.

        Level ``i`` merges its two oldest buckets whenever it reaches ``max_buckets + 1``
        entries, so the merged pairs are the consecutive pairs of the queue and the
        number of merges after ``A`` arrivals is ``max(0, (c_old + A - M + 1) // 2)``.
        Rows of a queue: counts, totals, M2s.
        """
        big_m = self._spec.max_buckets
        new = np.empty((3, len(x)))
        new[0] = 1.0
        new[1] = x
        new[2] = 0.0
        out: list[_Queue] = []
        i = 0
        n_old = len(self._levels)
        while i < n_old or new.shape[1]:
            if i < n_old:
                lv = self._levels[i]
                c_old = len(lv.n)
                old = np.array((lv.n, lv.t, lv.v), dtype=np.float64).reshape(3, c_old)
                q = np.concatenate((old, new), axis=1) if new.shape[1] else old
            else:
                c_old, q = 0, new
            out.append((q, c_old))
            merges = max(0, (c_old + new.shape[1] - big_m + 1) // 2)
            i += 1
            if not merges:
                new = _NO_BUCKETS
                continue
            a = q[:, 0 : 2 * merges : 2]
            b = q[:, 1 : 2 * merges : 2]
            new = np.empty((3, merges))
            np.add(a[:2], b[:2], out=new[:2])
            dd = a[1] / a[0]
            dd -= b[1] / b[0]
            w = a[0] * b[0]
            w /= new[0]
            w *= dd
            w *= dd
            np.add(a[2], b[2], out=new[2])
            new[2] += w
        return out

    def _spans(self, pyr: list[_Queue], arrived0: IntArray) -> tuple[IntArray, IntArray]:
        """Start and length, shape (levels, checks), of each level's content (queue slice)."""
        big_m = self._spec.max_buckets
        arrived = np.zeros((len(pyr) + 1, len(arrived0)), dtype=np.int64)
        arrived[0] = arrived0
        for i, q in enumerate(pyr):
            row = arrived[i + 1]
            np.add(arrived[i], q[1] - big_m + 1, out=row)
            np.right_shift(row, 1, out=row)  # floor division by 2
            np.maximum(row, 0, out=row)  # merges at level i = arrivals at level i + 1
            if not row.any():
                break  # no arrivals above: the remaining levels only hold old buckets
        c_old = np.array([q[1] for q in pyr], dtype=np.int64)
        starts = 2 * arrived[1:]
        lengths = c_old[:, None] + arrived[:-1] - starts
        return starts, lengths

    def _span_at(self, pyr: list[_Queue], arrived: int) -> list[tuple[int, int]]:
        """Scalar :meth:`_spans` for one moment: (start, end) of each level's content."""
        big_m = self._spec.max_buckets
        out = []
        for q in pyr:
            merges = max(0, (q[1] + arrived - big_m + 1) // 2)
            out.append((2 * merges, q[1] + arrived))
            arrived = merges
        return out

    @staticmethod
    def _bases(
        pre: _Prefix, starts: IntArray, lengths: IntArray
    ) -> tuple[IntArray, FloatArray, FloatArray]:
        """Queue index of each level's first bucket, and the offsets turning queue prefix
        sums into window prefix sums (events / totals of the older levels)."""
        pn, pt, offsets, _scale = pre
        first = starts + offsets[:, None]
        n_lev = pn[first + lengths] - pn[first]
        t_lev = pt[first + lengths] - pt[first]
        base_n = np.cumsum(n_lev[::-1], axis=0)[::-1] - n_lev - pn[first]
        base_t = np.cumsum(t_lev[::-1], axis=0)[::-1] - t_lev - pt[first]
        return first, base_n, base_t

    def _coarse(
        self,
        pre: _Prefix,
        *,
        starts: IntArray,
        lengths: IntArray,
        width: FloatArray,
        total: FloatArray,
        m2: FloatArray,
    ) -> npt.NDArray[np.bool_]:
        """Checks that MAY fire, testing each level's cuts once per run of unchanged content.

        A level's buckets (and every older level) stay the same between two arrivals at
        that level, so their cut points are fixed while only the window mean, width and
        variance move. Over such a run of checks the test of :meth:`_screen` is bounded
        by the extreme means, the smallest width and the smallest variance factor (range
        minima/maxima from sparse tables). Upper levels change rarely, so most cuts are
        evaluated once for many checks. Conservative: flagged rows are re-screened.
        """
        sp = self._spec
        mwl = float(sp.min_window_length)
        pn, pt, _offsets, scale = pre
        rows = len(width)
        first, base_n, base_t = self._bases(pre, starts, lengths)
        changed = np.ones(starts.shape, dtype=bool)
        changed[:, 1:] = (starts[:, 1:] != starts[:, :-1]) | (lengths[:, 1:] != lengths[:, :-1])
        lev, ra = np.nonzero(changed)  # runs, level by level, in row order
        rb = np.full(len(ra), rows - 1)
        same = lev[1:] == lev[:-1]
        rb[:-1][same] = ra[1:][same] - 1
        with np.errstate(invalid="ignore", divide="ignore"):
            dp = np.log(2.0 * np.log(width) / sp.delta)
        slack = 1.0 - 1e-9
        tol = 1e-10 * (scale + float(np.abs(total).max()))
        coef = 2.0 * (m2 / width) * dp / width * slack * slack
        k = np.floor(np.log2(rb - ra + 1)).astype(np.int64)
        lo_mu, hi_mu, lo_coef = _range_tables(total / width, coef, int(k.max()))
        at_a = k * rows + ra
        at_b = k * rows + rb - (1 << k) + 1
        mu_lo = np.minimum(lo_mu.take(at_a), lo_mu.take(at_b))
        mu_hi = np.maximum(hi_mu.take(at_a), hi_mu.take(at_b))
        c_lo = np.minimum(lo_coef.take(at_a), lo_coef.take(at_b))
        mid = 0.5 * (mu_lo + mu_hi)
        half = mu_hi - mid + 1e-12 * np.abs(mid)  # max |u0 - mu n0| = |u0 - mid n0| + half n0
        f_lo = 2.0 / 3.0 * dp[ra] * slack - tol  # dp grows with the width
        cell = lev * rows + ra
        ar = np.arange(1, sp.max_buckets + 1)[:, None]
        idx = first.take(cell) + np.minimum(ar, lengths.take(cell))  # (buckets, runs)
        n0 = pn.take(idx)
        n0 += base_n.take(cell)
        dev = pt.take(idx)
        dev += base_t.take(cell)
        dev -= mid * n0
        np.abs(dev, out=dev)
        dev += half * n0
        w_lo = width.take(ra)
        thr = w_lo - n0
        thr *= n0
        thr *= c_lo
        with np.errstate(invalid="ignore"):
            np.sqrt(thr, out=thr)
        thr += f_lo
        fire = dev > thr
        n0 -= width.take(rb) - mwl  # n0 - (W_max - mwl) <= 0  <=>  some n1 >= mwl
        fire &= n0 <= 0.0
        hot = np.flatnonzero(fire.any(axis=0))
        mark = np.zeros(rows + 1, dtype=np.int64)
        np.add.at(mark, ra[hot], 1)
        np.add.at(mark, rb[hot] + 1, -1)
        return np.cumsum(mark[:-1]) > 0

    def _screen(
        self,
        pre: _Prefix,
        *,
        starts: IntArray,
        lengths: IntArray,
        width: FloatArray,
        total: FloatArray,
        m2: FloatArray,
    ) -> IntArray:
        """Rows (checks) where some cut MAY fire; a conservative filter for :meth:`_scan`.

        River fires a cut when ``|u0/n0 - u1/n1| > sqrt(2 m v d') + 2/3 d' m``. Since
        ``m >= 1/n0 + 1/n1 = W / (n0 n1)`` and the bound grows with ``m``, a firing cut
        needs ``|u0 - mean * n0| > sqrt(2 v d' n0 n1 / W) + 2/3 d'``, which is cheap to
        test for every (check, cut) pair: ``n0`` and ``u0`` come from per-level prefix
        sums of the bucket queues. A tolerance far above any rounding difference keeps
        the filter conservative; the scalar scan decides.
        """
        sp = self._spec
        big_m = sp.max_buckets
        mwl = float(sp.min_window_length)
        pn, pt, _offsets, scale = pre
        levels, rows = starts.shape
        first, base_n, base_t = self._bases(pre, starts, lengths)
        # cut after bucket j of a level (j clipped to the content: duplicates are harmless)
        ar = np.arange(1, big_m + 1)[None, :, None]
        idx = first[:, None, :] + np.minimum(ar, lengths[:, None, :])
        n0 = (pn[idx] + base_n[:, None, :]).reshape(levels * big_m, rows)
        u0 = (pt[idx] + base_t[:, None, :]).reshape(levels * big_m, rows)
        with np.errstate(invalid="ignore", divide="ignore"):
            dp = np.log(2.0 * np.log(width) / sp.delta)
        slack = 1.0 - 1e-9
        tol = 1e-10 * (scale + float(np.abs(total).max()))
        coef = 2.0 * (m2 / width) * dp / width * slack * slack
        floor = 2.0 / 3.0 * dp * slack - tol
        n1 = width - n0
        thr = n0 * n1
        thr *= coef
        with np.errstate(invalid="ignore"):
            np.sqrt(thr, out=thr)
        thr += floor
        dev = (total / width) * n0
        np.subtract(u0, dev, out=dev)
        np.abs(dev, out=dev)
        fire = dev > thr
        np.minimum(n0, n1, out=n1)
        fire &= n1 >= mwl
        return np.flatnonzero(fire.any(axis=0))

    def _block(self, x: FloatArray) -> tuple[int, Detection | None]:
        """Insert ``x`` up to the first check that fires; return (#consumed, detection)."""
        sp = self._spec
        size = len(x)
        w0, t0, v0, tick0 = self._width, self._total, self._m2, self._tick
        buf = np.empty(size + 1)
        buf[0] = t0
        buf[1:] = x
        tot_acc = np.cumsum(buf)  # tot_acc[j + 1]: window total after event j
        w_old = w0 + np.arange(size, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = x - tot_acc[:-1] / w_old
            inc = w_old * d * d / (w_old + 1.0)
        if w0 == 0.0:
            inc[0] = 0.0
        buf[0] = v0
        buf[1:] = inc
        m2_acc = np.cumsum(buf)
        first = (sp.clock - 1 - tick0) % sp.clock
        checks = np.arange(first, size, sp.clock, dtype=np.int64)
        width = np.asarray(w0 + checks + 1.0, dtype=np.float64)
        keep = (width > sp.grace_period) & (width >= 2.0 * sp.min_window_length)
        checks, width = checks[keep], width[keep]
        pyr = self._pyramid(x)
        n_seen0 = self._n_seen

        def settle(tau: int) -> None:
            self._restore(pyr, tau)
            self._width = w0 + tau + 1.0
            self._total = float(tot_acc[tau + 1])
            self._m2 = float(m2_acc[tau + 1])
            self._n_seen = n_seen0 + tau + 1
            self._tick = (tick0 + tau + 1) % sp.clock

        if len(checks):
            starts, lengths = self._spans(pyr, checks + 1)
            cat = np.concatenate([np.zeros((3, 1)), *[q for q, _c in pyr]], axis=1)
            sums = np.cumsum(cat[:2], axis=1)
            pre: _Prefix = (
                sums[0],
                sums[1],
                np.cumsum([0] + [q.shape[1] for q, _c in pyr])[:-1],
                float(np.abs(cat[1]).sum()),
            )
            total_c = tot_acc[checks + 1]
            m2_c = m2_acc[checks + 1]
            cand = np.flatnonzero(
                self._coarse(
                    pre, starts=starts, lengths=lengths, width=width, total=total_c, m2=m2_c
                )
            )
            for lo in range(0, len(cand), _CHUNK):
                sub = cand[lo : lo + _CHUNK]
                rows = self._screen(
                    pre,
                    starts=starts[:, sub],
                    lengths=lengths[:, sub],
                    width=width[sub],
                    total=total_c[sub],
                    m2=m2_c[sub],
                )
                for tau in checks[sub[rows]].tolist():
                    settle(tau)
                    det = self._detect()  # authoritative scalar test at this check
                    if det is not None:
                        return tau + 1, det
        settle(size - 1)
        return size, None

    def _restore(self, pyr: list[_Queue], tau: int) -> None:
        """Set the bucket lists to their content after the event at block position ``tau``."""
        levels: list[_Level] = []
        for (q, _c_old), (lo, hi) in zip(pyr, self._span_at(pyr, tau + 1), strict=True):
            n, t, v = q[:, lo:hi].tolist()
            levels.append(_Level(n, t, v))
        while len(levels) > 1 and not levels[-1].n:
            levels.pop()
        self._levels = levels

    # ---------------------------------------------------------------- state
    def to_state(self) -> dict[str, Any]:
        """JSON-safe state: O(max_buckets * log width) buckets; floats round-trip exactly."""
        out = state_header("adwin")
        out["spec"] = self._spec.to_dict()
        out["n_seen"] = self._n_seen
        out["n_detections"] = self._n_detections
        out["tick"] = self._tick
        out["width"] = int(self._width)
        out["total"] = _finite("total", self._total)
        out["m2"] = _finite("m2", self._m2)
        out["levels"] = [
            [
                [int(c) for c in lv.n],
                [_finite("levels", t) for t in lv.t],
                [_finite("levels", v) for v in lv.v],
            ]
            for lv in self._levels
        ]
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ADWIN:
        """Rebuild from :meth:`to_state` output."""
        check_state(state, "adwin")
        raw = state.get("spec")
        if not isinstance(raw, Mapping) or raw.get("kind") != "adwin":
            raise StateError(f"spec: expected an 'adwin' spec mapping, got {raw!r}")
        try:
            spec = spec_from_dict(raw)
        except ValueError as err:
            raise StateError(f"spec: {err}") from None
        assert isinstance(spec, ADWINSpec)
        det = cls(spec)
        det._n_seen = _int_field(state, "n_seen")
        det._n_detections = _int_field(state, "n_detections")
        det._tick = _int_field(state, "tick")
        if det._tick >= spec.clock:
            raise StateError(f"tick: {det._tick} must be < clock ({spec.clock})")
        det._width = float(_int_field(state, "width"))
        det._total = _float_field(state, "total")
        det._m2 = _float_field(state, "m2")
        levels = state.get("levels")
        if not isinstance(levels, list) or not levels:
            raise StateError(f"levels: expected a non-empty list, got {levels!r}")
        out: list[_Level] = []
        for i, lv in enumerate(levels):
            if (
                not isinstance(lv, list)
                or len(lv) != 3
                or not all(isinstance(part, list) for part in lv)
                or not len(lv[0]) == len(lv[1]) == len(lv[2])
                or len(lv[0]) > spec.max_buckets
            ):
                raise StateError(f"levels[{i}]: expected [counts, totals, m2s] of equal length")
            try:
                out.append(
                    _Level(
                        [float(c) for c in lv[0]],
                        [float(t) for t in lv[1]],
                        [float(v) for v in lv[2]],
                    )
                )
            except (TypeError, ValueError):
                raise StateError(f"levels[{i}]: non-numeric entry") from None
        if sum(sum(lv.n) for lv in out) != det._width:
            raise StateError("levels: bucket counts do not add up to width")
        det._levels = out
        return det


def _range_tables(
    mean: FloatArray, coef: FloatArray, depth: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Sparse tables: ``t[k, i]`` = min/max over rows ``i .. i + 2**k - 1``."""
    size = len(mean)
    lo_mu = np.empty((depth + 1, size))
    hi_mu = np.empty((depth + 1, size))
    lo_c = np.empty((depth + 1, size))
    lo_mu[0], hi_mu[0], lo_c[0] = mean, mean, coef
    for k in range(1, depth + 1):
        h = 1 << (k - 1)
        lo_mu[k], hi_mu[k], lo_c[k] = lo_mu[k - 1], hi_mu[k - 1], lo_c[k - 1]
        np.minimum(lo_mu[k - 1, :-h], lo_mu[k - 1, h:], out=lo_mu[k, :-h])
        np.maximum(hi_mu[k - 1, :-h], hi_mu[k - 1, h:], out=hi_mu[k, :-h])
        np.minimum(lo_c[k - 1, :-h], lo_c[k - 1, h:], out=lo_c[k, :-h])
    return lo_mu, hi_mu, lo_c


def _finite(field: str, v: float) -> float:
    if not math.isfinite(v):
        raise StateError(f"{field}: state holds a non-finite value {v!r}")
    return float(v)


def _int_field(state: Mapping[str, Any], field: str) -> int:
    v = state.get(field)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise StateError(f"{field}: expected a non-negative integer, got {v!r}")
    return v


def _float_field(state: Mapping[str, Any], field: str) -> float:
    v = state.get(field)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise StateError(f"{field}: expected a finite number, got {v!r}")
    return float(v)


register(ADWINSpec, ADWIN)
