r"""Population Stability Index with stored reference bins and sample-size-aware thresholds.

Bins
----
A numeric feature has interior edges ``e0 < e1 < ... < e_last`` taken from reference
quantiles; its ``len(edges) + 1`` bins are ``(-inf, e0), [e0, e1), ..., [e_last, +inf)``
(left-closed, outer bins open-ended, so ``±inf`` land in the outer bins). NaN is never
binned: :meth:`PSI.bin_counts_and_missing` returns it separately (and
:class:`~detectors.sketches.QualityCounters` counts it). A categorical feature has
``categories`` plus one implicit last bucket, "other", for every unseen value; ``None``
and NaN are missing, not "other". Stored edges make PSI values comparable over time
(tools that re-bin reference+current per window do not).

Statistic
---------
With current counts ``x_i`` (``n = Σ x_i``), reference shares ``p_i`` and ``k`` bins, the
pseudo-count ``s = smoothing`` is added to every bin of both histograms, the reference
being expressed at the window's size (expected counts ``n p_i``)::

    c_i = (x_i + s) / (n + k s)          r_i = (n p_i + s) / (n + k s)
    PSI = Σ_i (c_i - r_i) ln(c_i / r_i)

Both distributions are thus shrunk towards uniform by the same weight ``k s / (n + k s)``,
so a bin empty on both sides contributes exactly 0 and ``c_i - r_i`` is the raw
difference scaled by ``n / (n + k s)``; by joint convexity of the divergence, smoothing
can only lower PSI.
(Smoothing the reference at its own size ``m`` instead would make every bin that is
empty on both sides contribute ``~ s (1/n - 1/m) ln(m/n)``: a bias that grows with
``m/n``.) ``smoothing=0`` gives the textbook formula; a bin empty on one side only then
contributes ``+inf``. There is no hidden floor (no 1e-4 clipping); smoothing is the only
regulariser, and it is explicit in the spec.

Significance
------------
PSI is the symmetrised Kullback-Leibler (Jeffreys) divergence. Expanding ``ln(c/r)``
around ``c = r`` gives ``PSI = Σ (c_i - r_i)^2 / r_i + O(|c - r|^3)``: Pearson's
chi-square form. If the window is a sample of ``n`` events from the reference
distribution, ``c_i - r_i`` has covariance ``(diag r - r r^T) / n`` and ``n · PSI`` tends
to ``χ²(df)``. With a reference that is itself a sample of ``m`` events, the difference of
the two independent share estimates has covariance ``(1/n + 1/m)(diag r - r r^T)``, so
``n_eff · PSI → χ²(df)`` with ``n_eff = 1 / (1/n + 1/m) = n m / (n + m)``
(``n_eff = n`` for an exact reference). ``df`` is the number of bins with a positive
reference share minus one (at least 1); bins the reference never saw carry no
chi-square mass under "no drift".

Hence ``p_value = chi2_sf(n_eff · PSI, df)`` and the *noise floor* ``q / n_eff`` with
``q = chi2_isf(alpha, df)``: under no drift PSI exceeds it with probability ``alpha``
(asymptotically; the unit tests check the calibration by simulation at n = 200 .. 10,000
for numeric and categorical features, with exact and sampled references). The
effective thresholds are ``max(warn, q / n_eff)`` and ``max(critical, q / n_eff)``: the
fixed (industry) magnitudes 0.1 / 0.25 for large windows, and the noise floor for small
ones, so a 200-event window does not cry wolf. (With 10 bins, ``alpha = 1e-3``:
``q = 27.88``; floor = 0.139 at n = 200, 0.028 at n = 1,000.) When the floor exceeds
``critical`` the warn band is empty: a small window can only say "significant and large"
or nothing. Below ``min_count`` events the severity is ``"insufficient"`` (the
statistic and p-value are still reported).

>>> rng = np.random.default_rng(0)
>>> spec = PSISpec.from_reference_sample(rng.normal(size=20_000), bins=10)
>>> psi = PSI(spec)
>>> r = psi.compute(psi.bin_counts(rng.normal(size=1_000)))
>>> r.severity, round(r.statistic, 4), round(r.p_value, 3), r.warn_threshold, r.critical_threshold
('ok', 0.0146, 0.126, 0.1, 0.25)
>>> r = psi.compute(psi.bin_counts(rng.normal(1.0, 1.0, size=1_000)))
>>> r.severity, round(r.statistic, 3), r.p_value < 1e-12
('critical', 0.871, True)
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import numpy as np
import numpy.typing as npt

from detectors.base import (
    Spec,
    SpecError,
    StateError,
    as_float_array,
    check_number,
    check_state,
    finite_or_none,
    state_header,
)
from detectors.sketches import check_edges, numeric_bin_counts
from detectors.stats import chi2_isf, chi2_sf

__all__ = ["PSI", "PSIResult", "PSISpec", "WindowedCounts"]

IntArray = npt.NDArray[np.int64]
SEVERITIES = ("ok", "warn", "critical", "insufficient")
_SUM_TOLERANCE = 1e-6


# --------------------------------------------------------------------- spec


@dataclass(frozen=True)
class PSISpec(Spec):
    """Reference bins and thresholds for one feature's PSI.

    Exactly one of ``edges`` (numeric; interior edges) or ``categories`` (categorical;
    an "other" bucket is appended) is given. ``reference`` holds one share per bin
    (``len(edges) + 1`` or ``len(categories) + 1``), summing to 1. ``reference_n`` is the
    reference sample size (``None``: the shares are exact). ``smoothing`` is the
    pseudo-count added to every bin of both distributions (see the module docstring).
    ``warn``/``critical`` are the fixed PSI magnitudes, ``alpha`` the false-alarm
    probability of the chi-square noise floor, ``min_count`` the smallest window judged.

    >>> spec = PSISpec(edges=(0.0,), reference=(0.5, 0.5), reference_n=1000)
    >>> PSISpec.from_dict(spec.to_dict()) == spec
    True
    >>> try:
    ...     PSISpec(edges=(0.0,), reference=(0.5, 0.5), critical=0.05)
    ... except SpecError as err:
    ...     print(err)
    critical: 0.05 must be >= warn (0.1)
    """

    kind: ClassVar[str] = "psi"

    edges: tuple[float, ...] | None = None
    categories: tuple[str, ...] | None = None
    reference: tuple[float, ...] = ()
    reference_n: int | None = None
    smoothing: float = 0.5
    warn: float = 0.1
    critical: float = 0.25
    alpha: float = 1e-3
    min_count: int = 30

    def __post_init__(self) -> None:
        # Accept lists (JSON) and normalise numbers, then validate.
        def coerce(name: str, conv: type) -> None:
            v = getattr(self, name)
            if v is None or (isinstance(v, tuple) and all(type(x) is conv for x in v)):
                return
            if isinstance(v, str | bytes) or not isinstance(v, Iterable):
                raise SpecError(f"{name}: {v!r} is not a sequence")
            items = tuple(v)
            if conv is float:
                bad = [x for x in items if isinstance(x, bool) or not isinstance(x, int | float)]
                if bad:
                    raise SpecError(f"{name}: {bad[0]!r} is not a number")
                object.__setattr__(self, name, tuple(float(x) for x in items))
            else:
                object.__setattr__(self, name, items)

        coerce("edges", float)
        coerce("categories", str)
        coerce("reference", float)
        super().__post_init__()

    @property
    def bins(self) -> int:
        """Number of bins (numeric: ``len(edges) + 1``; categorical: categories + "other")."""
        if self.edges is not None:
            return len(self.edges) + 1
        return len(self.categories or ()) + 1

    @property
    def is_categorical(self) -> bool:
        return self.categories is not None

    def validate(self) -> None:
        if (self.edges is None) == (self.categories is None):
            raise SpecError(
                "edges/categories: give exactly one of edges (numeric) or categories (categorical)"
            )
        if self.edges is not None:
            try:
                check_edges("edges", self.edges)
            except ValueError as err:
                raise SpecError(str(err)) from None
        if self.categories is not None:
            if not self.categories:
                raise SpecError("categories: needs at least one category")
            for i, c in enumerate(self.categories):
                if not isinstance(c, str):
                    raise SpecError(f"categories[{i}]: {c!r} is not a string")
            if len(set(self.categories)) != len(self.categories):
                dup = collections.Counter(self.categories).most_common(1)[0][0]
                raise SpecError(f"categories: {dup!r} appears more than once")
        if len(self.reference) != self.bins:
            what = "len(edges) + 1" if self.edges is not None else "len(categories) + 1 (other)"
            raise SpecError(
                f"reference: expected {self.bins} shares ({what}), got {len(self.reference)}"
            )
        for i, p in enumerate(self.reference):
            check_number(f"reference[{i}]", p, lo=0.0, hi=1.0)
        total = math.fsum(self.reference)
        if abs(total - 1.0) > _SUM_TOLERANCE:
            raise SpecError(f"reference: shares sum to {total!r}, expected 1")
        if self.reference_n is not None:
            check_number("reference_n", self.reference_n, lo=1, integer=True)
        check_number("smoothing", self.smoothing, lo=0.0)
        check_number("warn", self.warn, lo=0.0, lo_open=True)
        check_number("critical", self.critical, lo=0.0, lo_open=True)
        if self.critical < self.warn:
            raise SpecError(f"critical: {self.critical!r} must be >= warn ({self.warn!r})")
        check_number("alpha", self.alpha, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        check_number("min_count", self.min_count, lo=1, integer=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PSISpec:
        """Inverse of :meth:`to_dict` (``kind`` optional; unknown keys are errors)."""
        kind = data.get("kind", cls.kind)
        if kind != cls.kind:
            raise SpecError(f"kind: {kind!r} is not valid; valid values: {cls.kind!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        params = {k: v for k, v in data.items() if k != "kind"}
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise SpecError(
                f"psi.{unknown[0]}: unknown parameter; valid parameters: {', '.join(names)}"
            )
        return cls(**params)

    # ----------------------------------------------------------------- builders

    @classmethod
    def from_reference_sample(cls, values: npt.ArrayLike, bins: int = 10, **params: Any) -> PSISpec:
        """Quantile bins from a numeric reference sample (NaN ignored).

        Edges are the reference's ``j / bins`` quantiles (``j = 1 .. bins-1``, the
        "inverted CDF" definition, so every edge is an observed value), de-duplicated.
        A value carrying several quantiles' worth of mass (ties, discrete data) gets one
        edge, so its bin starts at it. An edge at the sample minimum would leave the bin
        below it empty: it moves just above the minimum (``nextafter``), giving the atom
        at the minimum its own bin (zero-inflated features), unless no value lies between
        the minimum and the next edge, in which case it is dropped (``{0, 1, 2}``
        uniformly gives edges ``(1, 2)``). A constant sample gets edges
        ``(c, nextafter(c))`` (below / equal / above). No reference bin is ever empty
        (except the two outer ones of a constant sample).
        Shares are the sample's own bin proportions; ``reference_n`` its size.
        ``params`` are passed to the spec (``smoothing``, ``warn``, ...).

        >>> spec = PSISpec.from_reference_sample([0, 1, 2] * 100, bins=10)
        >>> spec.edges, [round(p, 4) for p in spec.reference], spec.reference_n
        ((1.0, 2.0), [0.3333, 0.3333, 0.3333], 300)
        """
        check_number("bins", bins, lo=2, integer=True)
        arr = as_float_array(values)
        arr = arr[~np.isnan(arr)]
        finite = np.sort(arr[np.isfinite(arr)])
        if finite.shape[0] == 0:
            raise SpecError("values: the reference sample has no finite values")
        lo, hi = float(finite[0]), float(finite[-1])
        qs = np.arange(1, bins, dtype=np.float64) / bins
        edges = np.unique(np.quantile(finite, qs, method="inverted_cdf"))
        if lo == hi:
            edges = np.array([lo, np.nextafter(lo, np.inf)])
        elif edges[0] == lo:
            # An atom at the minimum: give it its own bin (-inf, lo] if values lie between
            # it and the next edge, otherwise let the next bin start at the next edge.
            upper = edges[1] if edges.shape[0] > 1 else np.inf
            if np.any((finite > lo) & (finite < upper)):
                edges[0] = np.nextafter(lo, np.inf)
            else:
                edges = edges[1:]
        counts, _ = numeric_bin_counts(edges, arr)
        n = int(counts.sum())
        params.setdefault("reference_n", n)
        return cls(
            edges=tuple(float(e) for e in edges),
            reference=tuple(float(c) / n for c in counts),
            **params,
        )

    @classmethod
    def from_reference_categories(
        cls,
        values_or_counts: Iterable[Any] | Mapping[str, int],
        max_categories: int | None = None,
        **params: Any,
    ) -> PSISpec:
        """Categories and shares from a reference sample or a ``{category: count}`` map.

        Categories are ordered by descending count (ties by name); with
        ``max_categories`` only the most frequent are kept and the rest becomes the
        reference share of "other". ``None``/NaN are ignored; non-strings are ``str()``-ed.

        >>> spec = PSISpec.from_reference_categories({"a": 60, "b": 30, "c": 10}, max_categories=2)
        >>> spec.categories, spec.reference, spec.reference_n
        (('a', 'b'), (0.6, 0.3, 0.1), 100)
        """
        if isinstance(values_or_counts, Mapping):
            counts: collections.Counter[str] = collections.Counter()
            for key, c in values_or_counts.items():
                check_number(f"values_or_counts[{key!r}]", c, lo=0, integer=True)
                counts[str(key)] += c
        else:
            if isinstance(values_or_counts, np.ndarray) and values_or_counts.dtype != object:
                values_or_counts = values_or_counts.tolist()
            raw = collections.Counter(values_or_counts)
            counts = collections.Counter()
            for key, c in raw.items():
                if not _is_missing(key):
                    counts[key if isinstance(key, str) else str(key)] += c
        if max_categories is not None:
            check_number("max_categories", max_categories, lo=1, integer=True)
        ranked = sorted((kv for kv in counts.items() if kv[1] > 0), key=lambda kv: (-kv[1], kv[0]))
        if not ranked:
            raise SpecError("values_or_counts: the reference has no (non-missing) values")
        kept = ranked[:max_categories] if max_categories is not None else ranked
        n = sum(counts.values())
        other = n - sum(c for _, c in kept)
        params.setdefault("reference_n", n)
        return cls(
            categories=tuple(k for k, _ in kept),
            reference=(*(c / n for _, c in kept), other / n),
            **params,
        )


def _is_missing(v: object) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


# --------------------------------------------------------------------- result


@dataclass(frozen=True)
class PSIResult:
    """Outcome of :meth:`PSI.compute`; thresholds are the *effective* ones used.

    ``contributions`` are the per-bin terms ``(c_i - r_i) ln(c_i / r_i)`` (they sum to
    ``statistic``); ``n_effective`` and ``df`` are those of the chi-square test.

    >>> spec = PSISpec(edges=(0.0,), reference=(0.5, 0.5), smoothing=0.0, min_count=10)
    >>> r = PSI(spec).compute([70, 30])
    >>> round(r.statistic, 6), round(r.p_value, 6), r.severity
    (0.16946, 3.8e-05, 'warn')
    >>> r.to_dict()["contributions"] == list(r.contributions)
    True
    """

    statistic: float
    p_value: float
    severity: str  # "ok" | "warn" | "critical" | "insufficient"
    warn_threshold: float
    critical_threshold: float
    n: int
    bins: int
    contributions: tuple[float, ...]
    df: int
    n_effective: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (non-finite numbers become ``None``)."""
        return {
            "statistic": finite_or_none(self.statistic),
            "p_value": finite_or_none(self.p_value),
            "severity": self.severity,
            "warn_threshold": finite_or_none(self.warn_threshold),
            "critical_threshold": finite_or_none(self.critical_threshold),
            "n": self.n,
            "bins": self.bins,
            "contributions": [finite_or_none(c) for c in self.contributions],
            "df": self.df,
            "n_effective": finite_or_none(self.n_effective),
        }


# --------------------------------------------------------------------- PSI


class PSI:
    """Bins values and computes PSI against the spec's reference (stateless).

    >>> spec = PSISpec.from_reference_categories(["a"] * 50 + ["b"] * 50, smoothing=0.0)
    >>> psi = PSI(spec)
    >>> psi.bin_counts(np.array(["a", "b", "b", "zebra"], dtype=object)).tolist()
    [1, 2, 1]
    >>> r = psi.compute([40, 60, 0])
    >>> round(r.statistic, 6), r.severity, r.df
    (0.040547, 'ok', 1)
    """

    __slots__ = (
        "_cat_index",
        "_edges",
        "_log_floor_q",
        "_ref",
        "_ref_support",
        "_sorted_cats",
        "_sorted_order",
        "spec",
    )

    def __init__(self, spec: PSISpec) -> None:
        if not isinstance(spec, PSISpec):
            raise TypeError(f"spec: expected PSISpec, got {type(spec).__name__}")
        self.spec = spec
        self._ref = np.asarray(spec.reference, dtype=np.float64)
        self._ref = self._ref / self._ref.sum()
        self._ref_support = int(np.count_nonzero(self._ref > 0))
        self._log_floor_q = chi2_isf(spec.alpha, self.df)
        self._edges = np.asarray(spec.edges if spec.edges is not None else (), dtype=np.float64)
        cats = spec.categories or ()
        self._cat_index = {c: i for i, c in enumerate(cats)}
        order = np.argsort(np.asarray(cats, dtype=str)) if cats else np.zeros(0, np.int64)
        self._sorted_cats = np.asarray(cats, dtype=str)[order] if cats else np.zeros(0, str)
        self._sorted_order = order.astype(np.int64)

    @property
    def bins(self) -> int:
        return self.spec.bins

    @property
    def df(self) -> int:
        """Chi-square degrees of freedom: bins with positive reference share, minus one."""
        return max(1, self._ref_support - 1)

    @property
    def noise_quantile(self) -> float:
        """``q = chi2_isf(alpha, df)``; the noise floor of PSI is ``q / n_eff``."""
        return self._log_floor_q

    # ----------------------------------------------------------------- binning

    def bin_counts(self, values: npt.ArrayLike | Sequence[Any]) -> IntArray:
        """Counts per bin (int64, length ``bins``); missing values (NaN/None) are dropped."""
        return self.bin_counts_and_missing(values)[0]

    def bin_counts_and_missing(self, values: npt.ArrayLike | Sequence[Any]) -> tuple[IntArray, int]:
        """``(counts, n_missing)``: numeric NaN, or categorical ``None``/NaN, are not binned."""
        if self.spec.categories is None:
            return numeric_bin_counts(self._edges, values)
        return self._categorical_counts(values)

    def _categorical_counts(self, values: npt.ArrayLike | Sequence[Any]) -> tuple[IntArray, int]:
        k = self.bins
        if isinstance(values, np.ndarray) and values.dtype.kind in "US":
            # Fully vectorised: binary search in the sorted category array.
            arr = values.astype(str, copy=False) if values.dtype.kind == "S" else values
            if arr.ndim != 1:
                raise ValueError(f"values: expected a 1-D array, got shape {arr.shape}")
            pos = np.searchsorted(self._sorted_cats, arr)
            pos_c = np.minimum(pos, len(self._sorted_cats) - 1)
            hit = self._sorted_cats[pos_c] == arr
            idx = np.where(hit, self._sorted_order[pos_c], k - 1)
            return np.bincount(idx, minlength=k).astype(np.int64, copy=False), 0
        if isinstance(values, np.ndarray) and values.ndim != 1:
            raise ValueError(f"values: expected a 1-D array, got shape {values.shape}")
        # Object arrays / sequences: C-level Counter, then one dict lookup per distinct value.
        counter = collections.Counter(cast(Iterable[Any], values))
        counts = np.zeros(k, dtype=np.int64)
        missing = 0
        index = self._cat_index
        for key, c in counter.items():
            if _is_missing(key):
                missing += c
                continue
            i = index.get(key) if isinstance(key, str) else None
            counts[k - 1 if i is None else i] += c
        return counts, missing

    # ----------------------------------------------------------------- statistic

    def compute(self, counts: npt.ArrayLike) -> PSIResult:
        """PSI of a window's bin counts against the reference, with significance."""
        x = np.asarray(counts)
        if x.shape != (self.bins,):
            raise ValueError(f"counts: expected shape ({self.bins},), got {x.shape}")
        if x.dtype.kind not in "iu" and (
            not np.all(np.isfinite(x)) or not np.array_equal(x, np.round(x))
        ):
            raise ValueError("counts: must be integers")
        if (x < 0).any():
            raise ValueError("counts: must be non-negative")
        x = x.astype(np.float64)
        n = int(x.sum())
        spec = self.spec
        df = self.df
        if n == 0:
            nan = math.nan
            return PSIResult(
                nan, nan, "insufficient", nan, nan, 0, self.bins, (nan,) * self.bins, df, 0.0
            )
        k = self.bins
        s = spec.smoothing
        c = (x + s) / (n + k * s)
        r = (self._ref * n + s) / (n + k * s)
        with np.errstate(divide="ignore", invalid="ignore"):
            contrib = (c - r) * np.log(c / r)
        contrib[c == r] = 0.0  # includes 0/0 bins when smoothing == 0
        statistic = float(contrib.sum())
        n_eff = float(n) if spec.reference_n is None else 1.0 / (1.0 / n + 1.0 / spec.reference_n)
        floor = self._log_floor_q / n_eff
        warn_t = max(spec.warn, floor)
        crit_t = max(spec.critical, floor)
        p_value = chi2_sf(n_eff * statistic, df)
        if n < spec.min_count:
            severity = "insufficient"
        elif statistic >= crit_t:
            severity = "critical"
        elif statistic >= warn_t:
            severity = "warn"
        else:
            severity = "ok"
        return PSIResult(
            statistic=statistic,
            p_value=p_value,
            severity=severity,
            warn_threshold=warn_t,
            critical_threshold=crit_t,
            n=n,
            bins=k,
            contributions=tuple(float(v) for v in contrib),
            df=df,
            n_effective=n_eff,
        )

    def compute_values(self, values: npt.ArrayLike | Sequence[Any]) -> PSIResult:
        """``compute(bin_counts(values))``."""
        return self.compute(self.bin_counts(values))


# --------------------------------------------------------------------- sliding window


class WindowedCounts:
    """Per-bin counts over the last ``window_ticks`` ticks (ring buffer + running total).

    The window is sized in *ticks* (the service's summary period), not events: stage 2
    merges per-partition tick summaries, and a tick-sized window keeps "the last N
    seconds" meaning under changing traffic; PSI's own thresholds adapt to however many
    events the window holds (``min_count`` guards the low end).

    ``add(tick, counts)`` merges a count vector into tick ``tick`` (several partitions'
    summaries of the same tick simply add up); a newer tick slides the window forward,
    evicting ticks older than ``tick - window_ticks + 1``; a tick already out of the
    window is refused (returns ``False``). Each call costs O(bins) (plus O(bins) per
    evicted tick, at most ``window_ticks``).

    >>> w = WindowedCounts(bins=3, window_ticks=2)
    >>> w.add(0, [1, 0, 0]), w.add(1, [0, 2, 0]), w.add(1, [0, 1, 0])
    (True, True, True)
    >>> w.total.tolist(), w.n
    ([1, 3, 0], 4)
    >>> w.add(2, [0, 0, 5]), w.total.tolist()
    (True, [0, 3, 5])
    >>> w.add(0, [9, 9, 9])  # too old: refused
    False
    >>> WindowedCounts.from_state(w.to_state()) == w
    True
    """

    __slots__ = ("_ring", "_total", "bins", "newest_tick", "window_ticks")
    kind = "windowed_counts"

    def __init__(self, bins: int, window_ticks: int) -> None:
        check_number("bins", bins, lo=1, integer=True)
        check_number("window_ticks", window_ticks, lo=1, integer=True)
        self.bins = bins
        self.window_ticks = window_ticks
        self._ring: IntArray = np.zeros((window_ticks, bins), dtype=np.int64)
        self._total: IntArray = np.zeros(bins, dtype=np.int64)
        self.newest_tick: int | None = None

    @property
    def total(self) -> IntArray:
        """Counts summed over the window (a copy)."""
        return self._total.copy()

    @property
    def n(self) -> int:
        return int(self._total.sum())

    @property
    def oldest_tick(self) -> int | None:
        """First tick inside the window."""
        return None if self.newest_tick is None else self.newest_tick - self.window_ticks + 1

    def _vector(self, counts: npt.ArrayLike) -> IntArray:
        arr = np.asarray(counts)
        if arr.shape != (self.bins,):
            raise ValueError(f"counts: expected shape ({self.bins},), got {arr.shape}")
        if arr.dtype.kind not in "iu" and not np.array_equal(arr, np.round(arr)):
            raise ValueError("counts: must be integers")
        out = arr.astype(np.int64)
        if (out < 0).any():
            raise ValueError("counts: must be non-negative")
        return out

    def add(self, tick: int, counts: npt.ArrayLike) -> bool:
        """Merge ``counts`` into tick ``tick``; returns ``False`` if the tick is too old."""
        if isinstance(tick, bool) or not isinstance(tick, int | np.integer):
            raise ValueError(f"tick: {tick!r} is not an integer")
        tick = int(tick)
        vec = self._vector(counts)
        w = self.window_ticks
        if self.newest_tick is None:
            self.newest_tick = tick
        elif tick > self.newest_tick:
            gap = tick - self.newest_tick
            if gap >= w:
                self._ring[:] = 0
                self._total[:] = 0
            else:
                for t in range(self.newest_tick + 1, tick + 1):
                    row = self._ring[t % w]
                    self._total -= row
                    row[:] = 0
            self.newest_tick = tick
        elif tick <= self.newest_tick - w:
            return False
        self._ring[tick % w] += vec
        self._total += vec
        return True

    def push(self, counts: npt.ArrayLike) -> None:
        """Append ``counts`` as the next tick (``newest_tick + 1``, or 0 when empty)."""
        self.add(0 if self.newest_tick is None else self.newest_tick + 1, counts)

    def advance(self, tick: int) -> None:
        """Slide the window to end at ``tick`` without adding counts (no-op if not newer)."""
        self.add(tick, np.zeros(self.bins, dtype=np.int64))

    def tick_counts(self, tick: int) -> IntArray:
        """Counts of one tick inside the window (zeros if outside it)."""
        if self.newest_tick is None or not self.newest_tick - self.window_ticks < tick <= (
            self.newest_tick
        ):
            return np.zeros(self.bins, dtype=np.int64)
        row: IntArray = self._ring[tick % self.window_ticks].copy()
        return row

    def merge(self, other: WindowedCounts) -> WindowedCounts:
        """Add every tick of ``other`` (same bins and window); returns ``self``."""
        if not isinstance(other, WindowedCounts):
            raise TypeError(f"other: cannot merge {type(other).__name__} into WindowedCounts")
        if (other.bins, other.window_ticks) != (self.bins, self.window_ticks):
            raise ValueError(
                f"bins/window_ticks: cannot merge ({other.bins}, {other.window_ticks}) "
                f"into ({self.bins}, {self.window_ticks})"
            )
        if other.newest_tick is None:
            return self
        for t in range(other.newest_tick - other.window_ticks + 1, other.newest_tick + 1):
            self.add(t, other._ring[t % other.window_ticks])
        return self

    def to_state(self) -> dict[str, Any]:
        """Ticks oldest first; exact (integers only)."""
        ticks: list[list[int]] = []
        if self.newest_tick is not None:
            w = self.window_ticks
            ticks = [
                self._ring[t % w].tolist()
                for t in range(self.newest_tick - w + 1, self.newest_tick + 1)
            ]
        return {
            **state_header(self.kind),
            "bins": self.bins,
            "window_ticks": self.window_ticks,
            "newest_tick": self.newest_tick,
            "ticks": ticks,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> WindowedCounts:
        check_state(state, cls.kind)
        try:
            out = cls(state["bins"], state["window_ticks"])
            newest = state["newest_tick"]
            ticks = state["ticks"]
        except KeyError as err:
            raise StateError(f"{err.args[0]}: missing from state") from None
        except SpecError as err:
            raise StateError(str(err)) from None
        if newest is None:
            if ticks:
                raise StateError("ticks: must be empty when newest_tick is null")
            return out
        if isinstance(newest, bool) or not isinstance(newest, int):
            raise StateError(f"newest_tick: {newest!r} is not an integer")
        if not isinstance(ticks, list) or len(ticks) != out.window_ticks:
            raise StateError(f"ticks: expected {out.window_ticks} rows")
        out.newest_tick = newest
        w = out.window_ticks
        try:
            for i, row in enumerate(ticks):
                t = newest - w + 1 + i
                out._ring[t % w] = out._vector(row)
        except ValueError as err:
            raise StateError(f"ticks: {err}") from None
        out._total = out._ring.sum(axis=0, dtype=np.int64)
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WindowedCounts):
            return NotImplemented
        return self.to_state() == other.to_state()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"WindowedCounts(bins={self.bins}, window_ticks={self.window_ticks}, "
            f"newest_tick={self.newest_tick}, n={self.n})"
        )
