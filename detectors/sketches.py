"""Mergeable summaries of a feature stream: the things stage 1 accumulates per tick.

Every sketch here has the same life cycle:

* ``update(values)`` consumes a numpy batch (one vectorised call per batch);
* ``merge(other)`` folds another sketch of the same configuration in place and returns
  ``self`` (``merged(other)`` returns a new one), so per-partition tick summaries can be
  combined in any grouping;
* ``to_state()`` / ``from_state()`` give a JSON-safe, schema-versioned payload (see
  :func:`detectors.base.state_header`) that round-trips exactly: ``from_state(s).to_state()
  == s``, and the loaded sketch continues exactly like the original (KLL: see below).
  Apache DataSketches' binary ``serialize()`` output is carried as base64 (for
  :class:`FrequentItems` in a canonical item order).

Exact sketches (:class:`Moments`, :class:`Histogram`, :class:`QualityCounters`) merge
exactly (``Moments`` to floating-point rounding: Chan et al.'s pairwise update).
The DataSketches-backed ones are approximate with documented bounds:

* :class:`QuantileSketch` (KLL, ``k=200``): normalised rank error ``rank_error`` (about
  1.33 % at k=200, 99 % confidence), independent of stream length. KLL compaction flips
  coins from a generator inside the C++ library that Python cannot seed, so two copies
  fed the same data agree bit for bit only until the first compaction (``n <= k``);
  afterwards they agree within ``rank_error``. The state itself round-trips exactly.
* :class:`Cardinality` (HLL): relative standard error about ``1.04 / sqrt(2**lg_k)``
  (1.6 % at lg_k=12), with ``lower_bound``/``upper_bound`` at 1-3 standard deviations.
  A union is the register-wise maximum, so the merged *registers* do not depend on
  grouping or order; the estimator bookkeeping does (a union result usually switches
  from the HIP to the composite estimator), so estimates of differently grouped merges
  and of one sketch over the union differ by a fraction of the error bound. Updates,
  state and continuation are deterministic (fixed hash seed).
* :class:`FrequentItems` (misra-gries / "frequent items"): every estimate is within
  ``error_bound`` (``epsilon * total_weight``, epsilon ~ 3.5 / max map size) of the true
  count, and ``lower_bound(item) <= true count <= upper_bound(item)``; exact while the
  number of distinct items stays below ``max_items``.

Nothing here does I/O.
"""

from __future__ import annotations

import base64
import collections
import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Self, TypeAlias, cast

import datasketches as ds
import numpy as np
import numpy.typing as npt

from detectors.base import StateError, as_float_array, check_state, state_header

__all__ = [
    "Cardinality",
    "FrequentItem",
    "FrequentItems",
    "Histogram",
    "Moments",
    "QualityCounters",
    "QuantileSketch",
    "check_edges",
    "numeric_bin_counts",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


# --------------------------------------------------------------------- shared helpers


def check_edges(field: str, edges: Sequence[float]) -> tuple[float, ...]:
    """Validate interior bin edges (finite, strictly increasing, at least one).

    Raises ``ValueError`` naming ``field``; returns the edges as a tuple of floats.
    """
    try:
        out = tuple(float(e) for e in edges)
    except (TypeError, ValueError):
        raise ValueError(f"{field}: {edges!r} is not a sequence of numbers") from None
    if not out:
        raise ValueError(f"{field}: needs at least one interior edge (got none)")
    for i, e in enumerate(out):
        if not math.isfinite(e):
            raise ValueError(f"{field}[{i}]: {e!r} is not finite (outer bins are open-ended)")
        if i and e <= out[i - 1]:
            raise ValueError(
                f"{field}[{i}]: {e!r} is not greater than {field}[{i - 1}] = {out[i - 1]!r};"
                " edges must be strictly increasing"
            )
    return out


def numeric_bin_counts(edges: npt.ArrayLike, values: npt.ArrayLike) -> tuple[IntArray, int]:
    """Counts per bin and the number of NaNs (which are not binned).

    With interior edges ``e0 < e1 < ... < e_last`` the ``len(edges) + 1`` bins are
    ``(-inf, e0), [e0, e1), ..., [e_last, +inf)``: left-closed, open-ended outer bins,
    ``-inf`` in the first bin and ``+inf`` in the last. ``edges`` must be sorted (not
    checked here, for speed; :func:`check_edges` validates); no edges means one bin.

    >>> counts, n_nan = numeric_bin_counts(np.array([0.0, 1.0]), [-np.inf, -1, 0, 0.5, 1, np.nan])
    >>> counts.tolist(), n_nan
    ([2, 2, 1], 1)
    """
    edges = np.asarray(edges, dtype=np.float64)
    arr = as_float_array(values)
    # Sorting the batch (SIMD sort) and searching the few edges in it is ~4x faster than
    # searching every value among the edges (unpredictable branches). NaN sorts last.
    # side="left": pos[j] = #values < e_j, so a value equal to an edge is counted in the
    # bin that starts at that edge.
    n_nan = int(np.count_nonzero(np.isnan(arr)))
    pos = np.searchsorted(np.sort(arr), edges, side="left")
    bounds = np.empty(edges.shape[0] + 2, dtype=np.int64)
    bounds[0] = 0
    bounds[1:-1] = pos
    bounds[-1] = arr.shape[0] - n_nan
    return np.diff(bounds), n_nan


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(state: Mapping[str, Any], key: str) -> bytes:
    raw = _field(state, key)
    if not isinstance(raw, str):
        raise StateError(f"{key}: expected a base64 string, got {type(raw).__name__}")
    try:
        return base64.b64decode(raw.encode("ascii"), validate=True)
    except ValueError as err:
        raise StateError(f"{key}: not valid base64 ({err})") from None


def _field(state: Mapping[str, Any], key: str) -> Any:
    try:
        return state[key]
    except KeyError:
        raise StateError(f"{key}: missing from state (has: {', '.join(sorted(state))})") from None


def _int_field(state: Mapping[str, Any], key: str) -> int:
    v = _field(state, key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise StateError(f"{key}: expected a non-negative integer, got {v!r}")
    return v


def _same_type(self: object, other: object) -> None:
    if type(other) is not type(self):
        raise TypeError(f"other: cannot merge {type(other).__name__} into {type(self).__name__}")


def _opt_float(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _check_positive_int(field: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{field}: {value!r} must be an integer in [{lo}, {hi}]")
    return value


def _missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


# --------------------------------------------------------------------- Moments


class Moments:
    """Count, mean, sum of squared deviations (``m2``), min and max; exactly mergeable.

    Non-finite values (NaN, ±inf) are ignored; :class:`QualityCounters` counts them.
    ``variance`` is the population variance ``m2 / count``; ``sample_variance`` divides by
    ``count - 1``. ``summary()`` gives the ``(count, total, total_sq)`` triple that the
    sequential detectors' ``update`` takes.

    >>> rng = np.random.default_rng(7)
    >>> x = rng.normal(10.0, 2.0, size=1000)
    >>> a, b = Moments.from_array(x[:400]), Moments.from_array(x[400:])
    >>> m = a.merged(b)
    >>> m.count, round(m.mean, 6), round(m.std, 6), round(m.min, 4), round(m.max, 4)
    (1000, 9.855441, 1.882639, 3.4971, 15.1433)
    >>> bool(np.isclose(m.mean, x.mean(), rtol=1e-14)), bool(np.isclose(m.variance, x.var()))
    (True, True)
    >>> Moments.from_state(m.to_state()) == m
    True
    """

    __slots__ = ("count", "m2", "max", "mean", "min")
    kind = "moments"

    def __init__(self) -> None:
        self.count: int = 0
        self.mean: float = 0.0
        self.m2: float = 0.0
        self.min: float = math.inf
        self.max: float = -math.inf

    @classmethod
    def from_array(cls, values: npt.ArrayLike) -> Moments:
        """A new :class:`Moments` of ``values``."""
        out = cls()
        out.update(values)
        return out

    def _combine(self, n: int, mean: float, m2: float, lo: float, hi: float) -> None:
        if n == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2, self.min, self.max = n, mean, m2, lo, hi
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2 + delta * delta * (self.count * n / total)
        self.count = total
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)

    def update(self, values: npt.ArrayLike) -> None:
        """Add a batch of values (non-finite ones are ignored)."""
        arr = as_float_array(values)
        finite = np.isfinite(arr)
        if not finite.all():
            arr = arr[finite]
        n = int(arr.shape[0])
        if n == 0:
            return
        mean = float(arr.mean())
        dev = arr - mean
        self._combine(n, mean, float(np.dot(dev, dev)), float(arr.min()), float(arr.max()))

    def update_weighted(
        self,
        count: int,
        total: float,
        total_sq: float,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> None:
        """Add a summary of ``count`` values with sum ``total`` and sum of squares ``total_sq``.

        ``m2`` of the summary is ``total_sq - total**2 / count`` (clamped at 0 against
        rounding). Min/max are only updated when given.
        """
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 0:
            raise ValueError(f"count: {count!r} must be a non-negative integer")
        if not (math.isfinite(total) and math.isfinite(total_sq)):
            raise ValueError(f"total/total_sq: ({total!r}, {total_sq!r}) must be finite")
        count = int(count)
        if count == 0:
            return
        mean = total / count
        m2 = max(0.0, total_sq - total * mean)
        lo = math.inf if minimum is None else float(minimum)
        hi = -math.inf if maximum is None else float(maximum)
        self._combine(count, mean, m2, lo, hi)

    def merge(self, other: Moments) -> Self:
        """Fold ``other`` into this one (Chan et al.); returns ``self``."""
        _same_type(self, other)
        self._combine(other.count, other.mean, other.m2, other.min, other.max)
        return self

    def merged(self, other: Moments) -> Moments:
        """A new :class:`Moments` of both."""
        return self.copy().merge(other)

    def copy(self) -> Moments:
        out = Moments()
        out.count, out.mean, out.m2, out.min, out.max = (
            self.count,
            self.mean,
            self.m2,
            self.min,
            self.max,
        )
        return out

    @property
    def variance(self) -> float:
        """Population variance ``m2 / count`` (NaN when empty)."""
        return self.m2 / self.count if self.count else math.nan

    @property
    def sample_variance(self) -> float:
        """Unbiased variance ``m2 / (count - 1)`` (NaN below two values)."""
        return self.m2 / (self.count - 1) if self.count > 1 else math.nan

    @property
    def std(self) -> float:
        """Population standard deviation."""
        return math.sqrt(self.variance)

    def summary(self) -> tuple[int, float, float]:
        """``(count, total, total_sq)`` as the weighted detector inputs expect."""
        total = self.mean * self.count
        return self.count, total, self.m2 + self.mean * total

    def to_state(self) -> dict[str, Any]:
        return {
            **state_header(self.kind),
            "count": self.count,
            "mean": self.mean,
            "m2": self.m2,
            "min": _opt_float(self.min),
            "max": _opt_float(self.max),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Moments:
        check_state(state, cls.kind)
        out = cls()
        out.count = _int_field(state, "count")
        try:
            out.mean = float(_field(state, "mean"))
            out.m2 = float(_field(state, "m2"))
            lo, hi = _field(state, "min"), _field(state, "max")
            out.min = math.inf if lo is None else float(lo)
            out.max = -math.inf if hi is None else float(hi)
        except (TypeError, ValueError) as err:
            raise StateError(f"moments: malformed number ({err})") from None
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Moments):
            return NotImplemented
        return self.to_state() == other.to_state()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Moments(count={self.count}, mean={self.mean!r}, m2={self.m2!r})"


# --------------------------------------------------------------------- Histogram


class Histogram:
    """Counts over fixed bins ``(-inf, e0), [e0, e1), ..., [e_last, +inf)`` (same as PSI).

    NaN is not binned (``update`` returns how many it skipped).

    >>> h = Histogram([0.0, 1.0, 2.0])
    >>> h.update([-5.0, 0.0, 0.5, 1.0, 2.0, np.inf, np.nan])
    1
    >>> h.counts.tolist(), h.n
    ([1, 2, 1, 2], 6)
    >>> h.merge(Histogram.from_state(h.to_state())).counts.tolist()
    [2, 4, 2, 4]
    """

    __slots__ = ("_edges_arr", "counts", "edges")
    kind = "histogram"

    def __init__(self, edges: Sequence[float]) -> None:
        self.edges: tuple[float, ...] = check_edges("edges", edges)
        self._edges_arr = np.asarray(self.edges, dtype=np.float64)
        self.counts: IntArray = np.zeros(len(self.edges) + 1, dtype=np.int64)

    @property
    def bins(self) -> int:
        return len(self.edges) + 1

    @property
    def n(self) -> int:
        """Number of binned values."""
        return int(self.counts.sum())

    def update(self, values: npt.ArrayLike) -> int:
        """Bin a batch; returns the number of NaNs skipped."""
        counts, n_nan = numeric_bin_counts(self._edges_arr, values)
        self.counts += counts
        return n_nan

    def add_counts(self, counts: npt.ArrayLike) -> None:
        """Add a vector of per-bin counts (e.g. another partition's tick)."""
        arr = np.asarray(counts)
        if arr.shape != self.counts.shape:
            raise ValueError(f"counts: expected shape {self.counts.shape}, got {arr.shape}")
        if arr.dtype.kind not in "iu" and not np.array_equal(arr, np.round(arr)):
            raise ValueError("counts: must be integers")
        if (arr < 0).any():
            raise ValueError("counts: must be non-negative")
        self.counts += arr.astype(np.int64)

    def merge(self, other: Histogram) -> Self:
        _same_type(self, other)
        if other.edges != self.edges:
            raise ValueError("edges: cannot merge histograms with different edges")
        self.counts += other.counts
        return self

    def merged(self, other: Histogram) -> Histogram:
        return self.copy().merge(other)

    def copy(self) -> Histogram:
        out = Histogram(self.edges)
        out.counts = self.counts.copy()
        return out

    def to_state(self) -> dict[str, Any]:
        return {
            **state_header(self.kind),
            "edges": list(self.edges),
            "counts": self.counts.tolist(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Histogram:
        check_state(state, cls.kind)
        try:
            out = cls(_field(state, "edges"))
        except ValueError as err:
            raise StateError(str(err)) from None
        counts = _field(state, "counts")
        if not isinstance(counts, list) or len(counts) != out.bins:
            raise StateError(f"counts: expected a list of {out.bins} integers")
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise StateError("counts: expected non-negative integers")
        out.counts = np.asarray(counts, dtype=np.int64)
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return self.edges == other.edges and bool(np.array_equal(self.counts, other.counts))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Histogram(edges={list(self.edges)!r}, counts={self.counts.tolist()!r})"


# --------------------------------------------------------------------- QualityCounters


class QualityCounters:
    """Data-quality counts of a numeric feature: total, missing, NaN, ±inf, out of range.

    Categories are disjoint: ``missing`` (absent / ``None``), ``nan``, ``inf`` (±inf),
    ``below`` (finite ``< lo``), ``above`` (finite ``> hi``) and ``valid`` (the rest), so
    ``total == missing + nan + inf + below + above + valid``. The range is inclusive.

    >>> q = QualityCounters(lo=0.0, hi=10.0)
    >>> q.update([1.0, None, float("nan"), -1.0, 11.0, float("inf"), 10.0])
    >>> q.update(np.array([5.0, 99.0]), present_mask=np.array([True, False]))
    >>> q.counts()
    {'total': 9, 'missing': 2, 'nan': 1, 'inf': 1, 'below': 1, 'above': 1, 'valid': 3}
    >>> round(q.rate("missing"), 4)
    0.2222
    """

    __slots__ = ("above", "below", "hi", "inf", "lo", "missing", "nan", "total")
    kind = "quality_counters"
    FIELDS = ("total", "missing", "nan", "inf", "below", "above")

    def __init__(self, lo: float | None = None, hi: float | None = None) -> None:
        for name, v in (("lo", lo), ("hi", hi)):
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            ):
                raise ValueError(f"{name}: {v!r} must be a finite number or None")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"lo: {lo!r} must be <= hi ({hi!r})")
        self.lo = None if lo is None else float(lo)
        self.hi = None if hi is None else float(hi)
        self.total = self.missing = self.nan = self.inf = self.below = self.above = 0

    @property
    def valid(self) -> int:
        return self.total - self.missing - self.nan - self.inf - self.below - self.above

    def update(
        self, values: npt.ArrayLike | Sequence[Any], present_mask: npt.ArrayLike | None = None
    ) -> None:
        """Count a batch. ``None`` entries (object input) or ``present_mask == False`` are missing.

        With ``present_mask``, values at masked-out positions are ignored entirely.
        """
        if isinstance(values, np.ndarray) and values.dtype != object:
            arr = as_float_array(values)
            mask = None
        else:
            obj = np.asarray(values, dtype=object)
            if obj.ndim != 1:
                raise ValueError(f"values: expected a 1-D array, got shape {obj.shape}")
            mask = np.fromiter((v is not None for v in obj), dtype=bool, count=obj.shape[0])
            arr = np.zeros(obj.shape[0], dtype=np.float64)
            try:
                arr[mask] = obj[mask].astype(np.float64)
            except (TypeError, ValueError) as err:
                raise ValueError(f"values: non-numeric entry ({err})") from None
        n = int(arr.shape[0])
        if present_mask is not None:
            pm = np.asarray(present_mask, dtype=bool)
            if pm.shape != arr.shape:
                raise ValueError(f"present_mask: expected shape {arr.shape}, got {pm.shape}")
            mask = pm if mask is None else (mask & pm)
        if mask is not None:
            arr = arr[mask]
        self.total += n
        self.missing += n - int(arr.shape[0])
        self.nan += int(np.count_nonzero(np.isnan(arr)))
        neg_inf = int(np.count_nonzero(arr == -np.inf))
        pos_inf = int(np.count_nonzero(arr == np.inf))
        self.inf += neg_inf + pos_inf
        if self.lo is not None:
            self.below += int(np.count_nonzero(arr < self.lo)) - neg_inf
        if self.hi is not None:
            self.above += int(np.count_nonzero(arr > self.hi)) - pos_inf

    def counts(self) -> dict[str, int]:
        out = {f: int(getattr(self, f)) for f in self.FIELDS}
        out["valid"] = self.valid
        return out

    def rate(self, name: str) -> float:
        """Share of ``total`` in counter ``name`` (NaN when nothing was seen)."""
        valid = (*self.FIELDS[1:], "valid")
        if name not in valid:
            raise ValueError(f"name: {name!r} is not valid; valid values: {', '.join(valid)}")
        return self.counts()[name] / self.total if self.total else math.nan

    def merge(self, other: QualityCounters) -> Self:
        _same_type(self, other)
        if (other.lo, other.hi) != (self.lo, self.hi):
            raise ValueError(
                f"lo/hi: cannot merge range ({other.lo}, {other.hi}) into ({self.lo}, {self.hi})"
            )
        for f in self.FIELDS:
            setattr(self, f, getattr(self, f) + getattr(other, f))
        return self

    def merged(self, other: QualityCounters) -> QualityCounters:
        return self.copy().merge(other)

    def copy(self) -> QualityCounters:
        return QualityCounters.from_state(self.to_state())

    def to_state(self) -> dict[str, Any]:
        return {
            **state_header(self.kind),
            "lo": self.lo,
            "hi": self.hi,
            **{f: int(getattr(self, f)) for f in self.FIELDS},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> QualityCounters:
        check_state(state, cls.kind)
        try:
            out = cls(_field(state, "lo"), _field(state, "hi"))
        except ValueError as err:
            raise StateError(str(err)) from None
        for f in cls.FIELDS:
            setattr(out, f, _int_field(state, f))
        if out.valid < 0:
            raise StateError("total: smaller than the sum of the other counters")
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QualityCounters):
            return NotImplemented
        return self.to_state() == other.to_state()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"QualityCounters(lo={self.lo!r}, hi={self.hi!r}, {self.counts()!r})"


# --------------------------------------------------------------------- FrequentItems


class FrequentItem(NamedTuple):
    item: str
    estimate: int
    lower_bound: int
    upper_bound: int


_ERROR_TYPES = {
    "no_false_positives": ds.frequent_items_error_type.NO_FALSE_POSITIVES,
    "no_false_negatives": ds.frequent_items_error_type.NO_FALSE_NEGATIVES,
}
_ABSENT = "\x00driftline:absent\x00"
_FI_HEADER = struct.Struct("<BBBBBBHIIQQ")  # preamble .. offset (4 preamble longs)
_FI_MAX_ITEMS = 768  # 0.75 * 1024: purges then sample every counter (layout-independent)


def _canonical_frequent_bytes(data: bytes) -> bytes:
    """Re-emit a serialized ``frequent_strings_sketch`` with its items sorted.

    The library writes items in hash-table slot order, which depends on insertion
    history; deserialising and serialising again can permute them. Sorting the
    ``(item, weight)`` pairs gives one byte string per sketch *content*, so states
    round-trip exactly. Layout: 32-byte header (preamble longs, serial version, family,
    lg max/cur map size, flags, unused, num items, unused, total weight, offset), then
    ``num_items`` uint64 weights, then the items as (uint32 length, UTF-8 bytes).
    """
    if len(data) < _FI_HEADER.size or data[0] != 4:
        return data  # empty sketch: 8-byte preamble only
    header = _FI_HEADER.unpack_from(data)
    num = header[7]
    pos = _FI_HEADER.size
    weights = struct.unpack_from(f"<{num}Q", data, pos)
    pos += 8 * num
    items: list[bytes] = []
    for _ in range(num):
        (length,) = struct.unpack_from("<I", data, pos)
        pos += 4
        items.append(data[pos : pos + length])
        pos += length
    if pos != len(data):
        raise ValueError(f"sketch: {len(data) - pos} trailing bytes")
    pairs = sorted(zip(items, weights, strict=True))
    out = bytearray(data[: _FI_HEADER.size])
    out += struct.pack(f"<{num}Q", *(w for _, w in pairs))
    for item, _ in pairs:
        out += struct.pack("<I", len(item)) + item
    return bytes(out)


class FrequentItems:
    """Bounded categorical frequencies (DataSketches ``frequent_strings_sketch``).

    Tracks up to ``max_items`` (at most 768) distinct items exactly; beyond that, counts become
    estimates with ``lower_bound(item) <= true <= upper_bound(item)`` and every estimate
    within ``error_bound`` (the a-priori bound ``epsilon * total_weight``) of the truth.
    ``None`` and NaN are skipped (missing); other non-string items are counted as
    ``str(item)``. A batch is pre-aggregated (one weighted sketch update per distinct
    item). State is canonical (items sorted, see :func:`_canonical_frequent_bytes`) and,
    because with at most 768 counters a purge takes the median of *all* counters, every
    result depends only on the sketch's content, never on its hash-table layout: a
    loaded state continues, and merges, exactly like the original.

    >>> rng = np.random.default_rng(3)
    >>> colours = rng.choice(["red", "green", "blue"], size=1000, p=[0.6, 0.3, 0.1])
    >>> f, g = FrequentItems(max_items=16), FrequentItems(max_items=16)
    >>> f.update(colours[:500])
    >>> g.update(colours[500:])
    >>> [(i.item, i.estimate) for i in f.merge(g).items()]
    [('red', 603), ('green', 310), ('blue', 87)]
    >>> sorted(collections.Counter(colours.tolist()).items())
    [('blue', 87), ('green', 310), ('red', 603)]
    >>> f.total_weight, f.max_error
    (1000, 0)
    """

    __slots__ = ("_sk", "lg_max_k", "max_items")
    kind = "frequent_items"

    def __init__(self, max_items: int = 64) -> None:
        self.max_items = _check_positive_int("max_items", max_items, 1, _FI_MAX_ITEMS)
        # map capacity is 0.75 * 2**lg_max_k
        self.lg_max_k = max(3, math.ceil(math.log2(max_items / 0.75)))
        self._sk = ds.frequent_strings_sketch(self.lg_max_k)

    def update(self, values: Iterable[Any]) -> None:
        """Count a batch of items (numpy str/object array or any iterable)."""
        if isinstance(values, np.ndarray):
            if values.ndim != 1:
                raise ValueError(f"values: expected a 1-D array, got shape {values.shape}")
            it: Iterable[Any] = values.tolist() if values.dtype != object else values
        else:
            it = values
        counts = collections.Counter(it)
        update = self._sk.update
        for item, weight in counts.items():
            if isinstance(item, str):
                update(item, weight)
            elif not _missing(item):
                update(str(item), weight)

    def update_counts(self, counts: Mapping[str, int]) -> None:
        """Add pre-aggregated ``{item: count}``."""
        for item, weight in counts.items():
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
                raise ValueError(f"counts[{item!r}]: {weight!r} must be a non-negative integer")
            if weight:
                self._sk.update(str(item), weight)

    @property
    def total_weight(self) -> int:
        return int(self._sk.total_weight)

    @property
    def error_bound(self) -> float:
        """A-priori bound on ``|estimate - true count|`` for any item."""
        return float(self._sk.epsilon) * self.total_weight

    @property
    def max_error(self) -> int:
        """Current maximum error (0 while the sketch is exact)."""
        return int(self._sk.get_upper_bound(_ABSENT)) - int(self._sk.get_estimate(_ABSENT))

    def estimate(self, item: str) -> int:
        return int(self._sk.get_estimate(item))

    def lower_bound(self, item: str) -> int:
        return int(self._sk.get_lower_bound(item))

    def upper_bound(self, item: str) -> int:
        return int(self._sk.get_upper_bound(item))

    def items(
        self, error_type: str = "no_false_positives", threshold: int = 0
    ) -> list[FrequentItem]:
        """Frequent items, most frequent first (ties by name).

        ``error_type="no_false_positives"`` lists items whose lower bound exceeds
        ``max(threshold, max_error)``; ``"no_false_negatives"`` those whose upper bound does.
        """
        if error_type not in _ERROR_TYPES:
            raise ValueError(
                f"error_type: {error_type!r} is not valid; valid values: "
                + ", ".join(repr(k) for k in _ERROR_TYPES)
            )
        rows = self._sk.get_frequent_items(_ERROR_TYPES[error_type], threshold)
        out = [FrequentItem(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows]
        out.sort(key=lambda r: (-r.estimate, r.item))
        return out

    def merge(self, other: FrequentItems) -> Self:
        _same_type(self, other)
        if other.max_items != self.max_items:
            raise ValueError(f"max_items: cannot merge {other.max_items} into {self.max_items}")
        # the library merges item by item in other's slot order: use the canonical layout
        self._sk.merge(ds.frequent_strings_sketch.deserialize(other._canonical_bytes()))
        return self

    def merged(self, other: FrequentItems) -> FrequentItems:
        return self.copy().merge(other)

    def copy(self) -> FrequentItems:
        out = FrequentItems(self.max_items)
        out._sk = ds.frequent_strings_sketch.deserialize(self._canonical_bytes())
        return out

    def _canonical_bytes(self) -> bytes:
        return _canonical_frequent_bytes(self._sk.serialize())

    def to_state(self) -> dict[str, Any]:
        return {
            **state_header(self.kind),
            "max_items": self.max_items,
            "sketch": _b64(self._canonical_bytes()),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> FrequentItems:
        check_state(state, cls.kind)
        try:
            out = cls(_field(state, "max_items"))
        except ValueError as err:
            raise StateError(str(err)) from None
        try:
            out._sk = ds.frequent_strings_sketch.deserialize(_unb64(state, "sketch"))
        except Exception as err:  # the C++ binding raises several types
            raise StateError(f"sketch: cannot deserialize ({err})") from None
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FrequentItems):
            return NotImplemented
        return self.to_state() == other.to_state()

    __hash__ = None  # type: ignore[assignment]


# --------------------------------------------------------------------- QuantileSketch

ReferenceLike: TypeAlias = "npt.ArrayLike | Callable[[FloatArray], npt.ArrayLike] | QuantileSketch"


class QuantileSketch:
    """Streaming quantiles (DataSketches KLL, doubles), with KS and Wasserstein distances.

    NaN is ignored. ``rank_error`` is the sketch's normalised rank error (99 % confidence):
    ``|cdf(x) - true F(x)| <= rank_error`` for every x, at any stream length.

    >>> rng = np.random.default_rng(11)
    >>> q = QuantileSketch(k=200)
    >>> x = rng.normal(size=150)
    >>> q.update(x)  # fewer than k values: the sketch is still exact
    >>> q.n, round(float(q.quantiles([0.5])[0]), 6), round(float(q.cdf([0.0])[0]), 6)
    (150, -0.056064, 0.513333)
    >>> median = float(np.quantile(x, 0.5, method="inverted_cdf"))
    >>> round(median, 6), round(float(np.mean(x <= 0)), 6)
    (-0.056064, 0.513333)
    >>> round(q.rank_error, 4)
    0.0133
    >>> y = rng.normal(size=150)
    >>> round(q.ks_distance(y), 4), round(q.wasserstein(y), 4)
    (0.08, 0.0797)
    """

    __slots__ = ("_sk", "k")
    kind = "quantile_sketch"

    def __init__(self, k: int = 200) -> None:
        self.k = _check_positive_int("k", k, 8, 65535)
        self._sk = ds.kll_doubles_sketch(k)

    @property
    def n(self) -> int:
        return int(self._sk.n)

    @property
    def num_retained(self) -> int:
        return int(self._sk.num_retained)

    @property
    def rank_error(self) -> float:
        return float(ds.kll_doubles_sketch.get_normalized_rank_error(self.k, False))

    @property
    def min(self) -> float:
        return math.nan if self._sk.is_empty() else float(self._sk.get_min_value())

    @property
    def max(self) -> float:
        return math.nan if self._sk.is_empty() else float(self._sk.get_max_value())

    def update(self, values: npt.ArrayLike) -> None:
        """Add a batch (one call into the C++ sketch)."""
        arr = np.ascontiguousarray(as_float_array(values))
        if arr.shape[0]:
            self._sk.update(arr)

    def quantiles(self, ranks: npt.ArrayLike) -> FloatArray:
        """Quantiles ``inf{x : F(x) >= r}`` for normalised ranks ``r`` in [0, 1] (NaN if empty)."""
        r = as_float_array(ranks, "ranks")
        if ((r < 0) | (r > 1) | np.isnan(r)).any():
            raise ValueError("ranks: must lie in [0, 1]")
        if self._sk.is_empty():
            return np.full(r.shape, np.nan)
        return np.asarray(self._sk.get_quantiles(r.tolist(), True), dtype=np.float64)

    def cdf(self, points: npt.ArrayLike, *, inclusive: bool = True) -> FloatArray:
        """``F(x) = P(X <= x)`` at each point (``P(X < x)`` with ``inclusive=False``)."""
        pts = as_float_array(points, "points")
        if self._sk.is_empty():
            return np.full(pts.shape, np.nan)
        if np.isnan(pts).any():
            raise ValueError("points: must not contain NaN")
        uniq, inv = np.unique(pts, return_inverse=True)
        vals = np.asarray(self._sk.get_cdf(uniq.tolist(), inclusive), dtype=np.float64)[:-1]
        return vals[inv]

    def _grid_points(self, grid: int) -> FloatArray:
        ranks = np.arange(grid + 1, dtype=np.float64) / grid
        return np.unique(self.quantiles(ranks))

    def ks_distance(self, reference: ReferenceLike, *, grid: int = 2048) -> float:
        """Kolmogorov-Smirnov distance ``sup_x |F_sketch(x) - F_ref(x)|``.

        ``reference`` is a sample (any order; or quantiles at equally spaced mid-ranks,
        which is the same thing), another :class:`QuantileSketch` (``grid`` of its
        mid-rank quantiles are used as that sample), or a vectorised CDF callable.
        Both CDFs are evaluated, with left limits, at the reference points and at the
        sketch's quantiles for ``grid + 1`` equally spaced ranks. Between neighbouring
        evaluation points the sketch CDF rises by at most ``1 / grid``, so the result is
        within ``rank_error + 1 / grid`` of the KS distance between the *true* stream
        and the reference.
        """
        if self._sk.is_empty():
            return math.nan
        sketch_pts = self._grid_points(grid)
        if callable(reference) and not isinstance(reference, QuantileSketch):
            cdf_ref = np.asarray(reference(sketch_pts), dtype=np.float64)
            right = np.abs(self.cdf(sketch_pts) - cdf_ref)
            left = np.abs(self.cdf(sketch_pts, inclusive=False) - cdf_ref)
            return float(max(right.max(), left.max()))
        ref = self._reference_sample(reference, grid)
        pts = np.union1d(sketch_pts, ref)
        m = ref.shape[0]
        f_right = np.searchsorted(ref, pts, side="right") / m
        f_left = np.searchsorted(ref, pts, side="left") / m
        d_right = np.abs(self.cdf(pts) - f_right)
        d_left = np.abs(self.cdf(pts, inclusive=False) - f_left)
        return float(max(d_right.max(), d_left.max()))

    @staticmethod
    def _reference_sample(reference: ReferenceLike, grid: int) -> FloatArray:
        if isinstance(reference, QuantileSketch):
            mid = (np.arange(grid, dtype=np.float64) + 0.5) / grid
            ref = reference.quantiles(mid)
        else:
            ref = np.sort(as_float_array(cast(npt.ArrayLike, reference), "reference"))
        ref = ref[~np.isnan(ref)]
        if ref.shape[0] == 0:
            raise ValueError("reference: empty (no non-NaN values)")
        return ref

    def wasserstein(self, reference: ReferenceLike, *, grid: int = 2048) -> float:
        """1-Wasserstein distance ``∫_0^1 |Q_sketch(u) - Q_ref(u)| du``.

        ``reference`` is a sample or equally weighted quantiles (``m`` values; sorted
        here), or another :class:`QuantileSketch`. The integral uses the midpoint rule on
        ``G`` equal rank cells (``G`` = the smallest multiple of ``m`` >= ``grid``), with
        ``Q_ref(u) = ref[floor(u m)]``, so the reference's steps are integrated exactly
        (and two equal-size exact samples give the exact W1). The sketch's
        quantiles carry its rank error: each is the true quantile at a rank within
        ``ε = rank_error`` of the asked one, so ``|W1_sketch - W1_true|`` is at most
        ``∫ Q(u+ε) - Q(u-ε) du`` (ranks clamped to [0, 1]), which equals
        ``∫_{1-ε}^1 Q - ∫_0^ε Q + ε (max - min)`` for the stream's true quantile function
        ``Q``: the spread of the tails. (The grid adds at most ``(max - min) / G``.) In
        practice the error is far smaller than this bound.
        """
        if callable(reference) and not isinstance(reference, QuantileSketch):
            raise TypeError("reference: wasserstein needs reference quantiles, not a CDF")
        if self._sk.is_empty():
            return math.nan
        ref = self._reference_sample(reference, grid)
        m = ref.shape[0]
        g = m * -(-grid // m)  # a multiple of m: the reference's steps fall on cell edges
        u = (np.arange(g, dtype=np.float64) + 0.5) / g
        q_ref = ref[np.minimum((u * m).astype(np.int64), m - 1)]
        return float(np.mean(np.abs(self.quantiles(u) - q_ref)))

    def merge(self, other: QuantileSketch) -> Self:
        _same_type(self, other)
        if other.k != self.k:
            raise ValueError(f"k: cannot merge a k={other.k} sketch into k={self.k}")
        self._sk.merge(other._sk)
        return self

    def merged(self, other: QuantileSketch) -> QuantileSketch:
        return self.copy().merge(other)

    def copy(self) -> QuantileSketch:
        out = QuantileSketch(self.k)
        out._sk = ds.kll_doubles_sketch.deserialize(self._sk.serialize())
        return out

    def to_state(self) -> dict[str, Any]:
        return {**state_header(self.kind), "k": self.k, "sketch": _b64(self._sk.serialize())}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> QuantileSketch:
        check_state(state, cls.kind)
        try:
            out = cls(_field(state, "k"))
        except ValueError as err:
            raise StateError(str(err)) from None
        try:
            out._sk = ds.kll_doubles_sketch.deserialize(_unb64(state, "sketch"))
        except Exception as err:  # the C++ binding raises several types
            raise StateError(f"sketch: cannot deserialize ({err})") from None
        if out._sk.k != out.k:
            raise StateError(f"k: state says {out.k} but the sketch has k={out._sk.k}")
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantileSketch):
            return NotImplemented
        return self.to_state() == other.to_state()

    __hash__ = None  # type: ignore[assignment]


# --------------------------------------------------------------------- Cardinality

_HLL_TYPES = {
    "HLL_4": ds.tgt_hll_type.HLL_4,
    "HLL_6": ds.tgt_hll_type.HLL_6,
    "HLL_8": ds.tgt_hll_type.HLL_8,
}


class Cardinality:
    """Distinct-count estimate (DataSketches HLL); merge is a register-wise union.

    Items are hashed by type: floats (numpy float arrays), ints (numpy int arrays) and
    strings hash differently, so ``1``, ``1.0`` and ``"1"`` are three items. ``None`` and
    NaN are skipped. Relative standard error ~``1.04 / sqrt(2**lg_k)``.

    >>> c = Cardinality(lg_k=12)
    >>> c.update(np.arange(5000, dtype=np.float64) % 1000)
    >>> round(c.estimate), c.lower_bound(2) <= 1000 <= c.upper_bound(2)
    (1011, True)
    >>> d = Cardinality(12)
    >>> d.update(np.arange(500.0, 1500.0))
    >>> u = c.merge(d)
    >>> round(u.estimate), u.lower_bound(2) <= 1500 <= u.upper_bound(2)
    (1526, True)
    """

    __slots__ = ("_sk", "lg_k", "tgt_type")
    kind = "cardinality"

    def __init__(self, lg_k: int = 12, tgt_type: str = "HLL_8") -> None:
        self.lg_k = _check_positive_int("lg_k", lg_k, 4, 21)
        if tgt_type not in _HLL_TYPES:
            raise ValueError(
                f"tgt_type: {tgt_type!r} is not valid; valid values: "
                + ", ".join(repr(t) for t in _HLL_TYPES)
            )
        self.tgt_type = tgt_type
        self._sk = ds.hll_sketch(lg_k, _HLL_TYPES[tgt_type])

    def update(self, values: Iterable[Any]) -> None:
        """Add a batch of items (numpy array or iterable)."""
        items: list[Any]
        if isinstance(values, np.ndarray) and values.dtype.kind == "f":
            arr = as_float_array(values)
            nan = np.isnan(arr)
            items = (arr[~nan] if nan.any() else arr).tolist()
        elif isinstance(values, np.ndarray) and values.dtype.kind in "iuU":
            if values.ndim != 1:
                raise ValueError(f"values: expected a 1-D array, got shape {values.shape}")
            items = values.tolist()
            # Homogeneous ints/strings: drop repeats (first occurrences, in order) when a
            # probe says the batch is repetitive. A repeat never changes an HLL register,
            # so the sketch (HIP accumulator included) is bit-identical, and ~2x cheaper.
            if len(items) > 2048 and len(set(items[:512])) < 256:
                items = list(dict.fromkeys(items))
        else:
            items = [v for v in values if not _missing(v)]
        collections.deque(map(self._sk.update, items), maxlen=0)

    @property
    def estimate(self) -> float:
        return float(self._sk.get_estimate())

    def lower_bound(self, num_std_devs: int = 2) -> float:
        self._check_std(num_std_devs)
        return float(self._sk.get_lower_bound(num_std_devs))

    def upper_bound(self, num_std_devs: int = 2) -> float:
        self._check_std(num_std_devs)
        return float(self._sk.get_upper_bound(num_std_devs))

    @property
    def relative_error(self) -> float:
        """A-priori relative standard error (one standard deviation, the wider union case)."""
        return float(
            max(
                abs(ds.hll_sketch.get_rel_err(upper, True, self.lg_k, 1)) for upper in (True, False)
            )
        )

    @staticmethod
    def _check_std(num_std_devs: int) -> None:
        if num_std_devs not in (1, 2, 3):
            raise ValueError(f"num_std_devs: {num_std_devs!r} is not valid; valid values: 1, 2, 3")

    def merge(self, other: Cardinality) -> Self:
        _same_type(self, other)
        if other.lg_k != self.lg_k:
            raise ValueError(f"lg_k: cannot merge lg_k={other.lg_k} into lg_k={self.lg_k}")
        union = ds.hll_union(self.lg_k)
        union.update(self._sk)
        union.update(other._sk)
        self._sk = union.get_result(_HLL_TYPES[self.tgt_type])
        return self

    def merged(self, other: Cardinality) -> Cardinality:
        return self.copy().merge(other)

    def copy(self) -> Cardinality:
        out = Cardinality(self.lg_k, self.tgt_type)
        out._sk = ds.hll_sketch.deserialize(self._sk.serialize_updatable())
        return out

    def to_state(self) -> dict[str, Any]:
        return {
            **state_header(self.kind),
            "lg_k": self.lg_k,
            "tgt_type": self.tgt_type,
            "sketch": _b64(self._sk.serialize_compact()),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Cardinality:
        check_state(state, cls.kind)
        try:
            out = cls(_field(state, "lg_k"), _field(state, "tgt_type"))
        except ValueError as err:
            raise StateError(str(err)) from None
        try:
            out._sk = ds.hll_sketch.deserialize(_unb64(state, "sketch"))
        except Exception as err:  # the C++ binding raises several types
            raise StateError(f"sketch: cannot deserialize ({err})") from None
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Cardinality):
            return NotImplemented
        return self.to_state() == other.to_state()

    __hash__ = None  # type: ignore[assignment]
