"""Mergeable sketches: merge = one sketch over the union, associativity, exact state."""

from __future__ import annotations

import base64
import collections
import json
import math
from typing import Any

import datasketches
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from detectors.base import StateError
from detectors.sketches import (
    Cardinality,
    FrequentItems,
    Histogram,
    Moments,
    QualityCounters,
    QuantileSketch,
    numeric_bin_counts,
)


def roundtrip(obj: Any) -> Any:
    """to_state -> JSON text -> from_state; asserts the payload itself is unchanged."""
    state = obj.to_state()
    text = json.dumps(state, allow_nan=False)
    loaded = type(obj).from_state(json.loads(text))
    assert loaded.to_state() == state
    return loaded


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
specials = st.sampled_from([math.nan, math.inf, -math.inf])
values_st = st.lists(st.one_of(finite, finite, finite, specials), max_size=80)


def three_parts(values: list[float], data: Any) -> list[list[float]]:
    i = data.draw(st.integers(0, len(values)))
    j = data.draw(st.integers(i, len(values)))
    return [values[:i], values[i:j], values[j:]]


# --------------------------------------------------------------------- Moments


def assert_moments_close(a: Moments, b: Moments, scale: float) -> None:
    assert a.count == b.count
    assert math.isclose(a.mean, b.mean, rel_tol=1e-9, abs_tol=1e-9 * scale)
    assert math.isclose(a.m2, b.m2, rel_tol=1e-7, abs_tol=1e-7 * scale * scale * (a.count + 1))
    assert (a.min, a.max) == (b.min, b.max)


@settings(max_examples=200, deadline=None)
@given(values=values_st, data=st.data())
def test_moments_merge_is_associative_and_equals_the_union(values: list[float], data: Any) -> None:
    parts = [Moments.from_array(p) for p in three_parts(values, data)]
    whole = Moments.from_array(values)
    left = parts[0].merged(parts[1]).merge(parts[2])
    right = parts[0].merged(parts[1].merged(parts[2]))
    scale = max([abs(v) for v in values if math.isfinite(v)] + [1.0])
    assert_moments_close(left, whole, scale)
    assert_moments_close(right, whole, scale)
    fin = np.array([v for v in values if math.isfinite(v)])
    assert whole.count == fin.size
    if fin.size:
        assert math.isclose(whole.mean, fin.mean(), rel_tol=1e-9, abs_tol=1e-9 * scale)
        assert math.isclose(whole.variance, fin.var(), rel_tol=1e-7, abs_tol=1e-7 * scale * scale)
        assert (whole.min, whole.max) == (fin.min(), fin.max())


@settings(max_examples=100, deadline=None)
@given(values=st.lists(finite, max_size=50), more=st.lists(finite, max_size=20))
def test_moments_state_round_trip_is_exact_and_continues(
    values: list[float], more: list[float]
) -> None:
    m = Moments.from_array(values)
    loaded = roundtrip(m)
    assert loaded == m
    m.update(more)
    loaded.update(more)
    assert loaded.to_state() == m.to_state()


def test_moments_weighted_update_matches_raw_values() -> None:
    x = np.random.default_rng(1).normal(3.0, 2.0, size=1000)
    raw = Moments.from_array(x[:600])
    raw.update(x[600:])
    weighted = Moments.from_array(x[:600])
    weighted.update_weighted(400, float(x[600:].sum()), float((x[600:] ** 2).sum()))
    assert weighted.count == raw.count
    assert weighted.mean == pytest.approx(raw.mean, rel=1e-12)
    assert weighted.variance == pytest.approx(raw.variance, rel=1e-9)
    count, total, total_sq = raw.summary()
    assert count == 1000
    assert total == pytest.approx(x.sum(), rel=1e-12)
    assert total_sq == pytest.approx((x**2).sum(), rel=1e-12)
    assert raw.sample_variance == pytest.approx(x.var(ddof=1), rel=1e-12)
    assert raw.std == pytest.approx(x.std(), rel=1e-12)
    with pytest.raises(ValueError, match="count"):
        raw.update_weighted(-1, 0.0, 0.0)
    empty = Moments()
    assert math.isnan(empty.variance)
    assert roundtrip(empty) == empty


# --------------------------------------------------------------------- Histogram

EDGES = (-10.0, -1.0, 0.0, 0.5, 100.0)


@settings(max_examples=200, deadline=None)
@given(values=values_st, data=st.data())
def test_histogram_merge_is_exact(values: list[float], data: Any) -> None:
    parts = [Histogram(EDGES) for _ in range(3)]
    for h, p in zip(parts, three_parts(values, data), strict=True):
        h.update(p)
    whole = Histogram(EDGES)
    skipped = whole.update(values)
    assert skipped == sum(1 for v in values if math.isnan(v))
    assert parts[0].merged(parts[1]).merge(parts[2]) == whole
    assert parts[0].merged(parts[1].merged(parts[2])) == whole
    expected = [0] * 6
    for v in values:
        if not math.isnan(v):
            expected[sum(v >= e for e in EDGES)] += 1
    assert whole.counts.tolist() == expected
    loaded = roundtrip(whole)
    assert loaded == whole
    loaded.update([0.0, 7.0])
    whole.update([0.0, 7.0])
    assert loaded == whole


def test_histogram_add_counts_and_errors() -> None:
    h = Histogram([0.0, 1.0])
    h.add_counts([1, 2, 3])
    h.add_counts(np.array([1, 0, 0], dtype=np.int32))
    assert h.counts.tolist() == [2, 2, 3]
    assert h.counts.dtype == np.int64
    with pytest.raises(ValueError, match="counts: expected shape"):
        h.add_counts([1, 2])
    with pytest.raises(ValueError, match="counts: must be non-negative"):
        h.add_counts([1, -2, 0])
    with pytest.raises(ValueError, match="edges: cannot merge"):
        h.merge(Histogram([0.0, 2.0]))
    with pytest.raises(ValueError, match=r"edges\[1\]"):
        Histogram([1.0, 1.0])
    with pytest.raises(ValueError, match="edges: needs at least one"):
        Histogram([])
    with pytest.raises(TypeError, match="other"):
        h.merge(Moments())  # type: ignore[arg-type]


def test_numeric_bin_counts_matches_numpy_histogram() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_t(3, size=10_000)
    edges = np.quantile(x, np.linspace(0.1, 0.9, 9))
    counts, n_nan = numeric_bin_counts(edges, x)
    ref, _ = np.histogram(x, bins=np.r_[-np.inf, edges, np.inf])
    # numpy's last bin is closed, ours are all left-closed; no value sits on +inf here
    assert counts.tolist() == ref.tolist()
    assert n_nan == 0


# --------------------------------------------------------------------- QualityCounters

quality_values = st.lists(
    st.one_of(st.none(), finite, specials, st.sampled_from([0.0, 10.0, -0.0])), max_size=60
)


@settings(max_examples=200, deadline=None)
@given(values=quality_values, data=st.data())
def test_quality_counters_merge_is_exact_and_classifies(values: list[Any], data: Any) -> None:
    lo, hi = 0.0, 10.0
    parts = [QualityCounters(lo, hi) for _ in range(3)]
    for q, p in zip(parts, three_parts(values, data), strict=True):
        q.update(p)
    whole = QualityCounters(lo, hi)
    whole.update(values)
    assert parts[0].merged(parts[1]).merge(parts[2]) == whole
    assert parts[0].merged(parts[1].merged(parts[2])) == whole
    expected: collections.Counter[str] = collections.Counter()
    for v in values:
        if v is None:
            expected["missing"] += 1
        elif math.isnan(v):
            expected["nan"] += 1
        elif math.isinf(v):
            expected["inf"] += 1
        elif v < lo:
            expected["below"] += 1
        elif v > hi:
            expected["above"] += 1
        else:
            expected["valid"] += 1
    got = whole.counts()
    assert got["total"] == len(values)
    for key in ("missing", "nan", "inf", "below", "above", "valid"):
        assert got[key] == expected[key], key
    loaded = roundtrip(whole)
    assert loaded == whole
    loaded.update([None, 11.0])
    whole.update([None, 11.0])
    assert loaded == whole


def test_quality_counters_present_mask_and_numpy_input() -> None:
    q = QualityCounters(hi=1.0)
    q.update(np.array([0.5, 2.0, np.nan, 9.0]), present_mask=[True, True, True, False])
    assert q.counts() == {
        "total": 4,
        "missing": 1,
        "nan": 1,
        "inf": 0,
        "below": 0,
        "above": 1,
        "valid": 1,
    }
    with pytest.raises(ValueError, match="present_mask"):
        q.update(np.array([1.0]), present_mask=[True, False])
    with pytest.raises(ValueError, match="lo/hi: cannot merge"):
        q.merge(QualityCounters(lo=0.0))
    with pytest.raises(ValueError, match="lo: 5 must be <= hi"):
        QualityCounters(lo=5, hi=1)
    with pytest.raises(ValueError, match="name: 'bogus' is not valid; valid values: missing"):
        q.rate("bogus")


# --------------------------------------------------------------------- FrequentItems


@settings(max_examples=100, deadline=None)
@given(
    items=st.lists(st.sampled_from([f"v{i}" for i in range(12)] + [None]), max_size=200),
    data=st.data(),
)
def test_frequent_items_exact_below_capacity(items: list[str | None], data: Any) -> None:
    parts = [FrequentItems(max_items=16) for _ in range(3)]
    for f, p in zip(parts, three_parts(items, data), strict=True):  # type: ignore[arg-type]
        f.update(np.array(p, dtype=object))
    merged = parts[0].merged(parts[1]).merge(parts[2])
    other_order = parts[2].merged(parts[0]).merge(parts[1])
    truth = collections.Counter(i for i in items if i is not None)
    for f in (merged, other_order):
        assert f.max_error == 0
        assert {r.item: r.estimate for r in f.items()} == dict(truth)
        assert f.total_weight == sum(truth.values())


def test_frequent_items_within_bounds_beyond_capacity() -> None:
    rng = np.random.default_rng(9)
    words = np.array([f"w{i}" for i in range(2000)])
    batches = [words[rng.zipf(1.3, size=20_000) % 2000] for _ in range(3)]
    parts = [FrequentItems(max_items=32) for _ in batches]
    for f, b in zip(parts, batches, strict=True):
        f.update(b)
    single = FrequentItems(max_items=32)
    single.update(np.concatenate(batches))
    left = parts[0].merged(parts[1]).merge(parts[2])
    right = parts[0].merged(parts[1].merged(parts[2]))
    truth = collections.Counter(np.concatenate(batches).tolist())
    for f in (single, left, right):
        assert f.total_weight == 60_000
        assert f.max_error > 0  # estimation mode
        assert f.max_error <= f.error_bound
        for item in [*list(truth)[:300], "never-seen"]:
            true = truth.get(item, 0)
            assert f.lower_bound(item) <= true <= f.upper_bound(item)
            assert abs(f.estimate(item) - true) <= f.error_bound
        # the heavy hitters are reported without false negatives
        heavy = {k for k, v in truth.items() if v > f.error_bound}
        assert heavy <= {r.item for r in f.items("no_false_negatives")}
    # state: canonical, exact, and the loaded copy continues (updates, merges) identically
    loaded = roundtrip(left)
    for f in (loaded, left):
        f.update(batches[0][:5000])
        f.merge(parts[2])
    assert loaded.to_state() == left.to_state()
    assert parts[1].merged(loaded).to_state() == parts[1].merged(left).to_state()


def test_frequent_items_errors() -> None:
    with pytest.raises(ValueError, match="max_items"):
        FrequentItems(0)
    with pytest.raises(
        ValueError, match="error_type: 'x' is not valid; valid values: 'no_false_positives'"
    ):
        FrequentItems().items("x")
    with pytest.raises(ValueError, match="max_items: cannot merge"):
        FrequentItems(8).merge(FrequentItems(64))
    f = FrequentItems()
    f.update_counts({"a": 3, "b": 0})
    f.update([1, 1, None, math.nan])
    assert [(r.item, r.estimate) for r in f.items()] == [("a", 3), ("1", 2)]


# --------------------------------------------------------------------- QuantileSketch


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=200),
    data=st.data(),
)
def test_quantile_sketch_is_exact_below_k(values: list[float], data: Any) -> None:
    parts = [QuantileSketch(k=200) for _ in range(3)]
    for q, p in zip(parts, three_parts(values, data), strict=True):
        q.update(p)
    merged = parts[0].merged(parts[1]).merge(parts[2])
    single = QuantileSketch(k=200)
    single.update(values)
    ranks = np.linspace(0.0, 1.0, 41)
    exact = np.quantile(np.array(values), ranks, method="inverted_cdf")
    for q in (merged, single):
        assert q.n == len(values)
        assert q.quantiles(ranks).tolist() == exact.tolist()
        pts = np.array(values)
        assert q.cdf(pts).tolist() == [np.mean(pts <= v) for v in pts]
    loaded = roundtrip(merged)
    loaded.update([1.0, 2.0])
    merged.update([1.0, 2.0])
    if merged.n <= 200:  # no compaction yet: continuation is exactly identical
        assert loaded.to_state() == merged.to_state()


def test_quantile_sketch_merge_within_rank_error() -> None:
    rng = np.random.default_rng(12)
    parts = [rng.normal(size=20_000), rng.exponential(size=20_000), rng.uniform(-1, 3, size=20_000)]
    sketches = [QuantileSketch() for _ in parts]
    for q, p in zip(sketches, parts, strict=True):
        q.update(p)
    single = QuantileSketch()
    single.update(np.concatenate(parts))
    left = sketches[0].merged(sketches[1]).merge(sketches[2])
    right = sketches[0].merged(sketches[1].merged(sketches[2]))
    union = np.sort(np.concatenate(parts))
    pts = np.quantile(union, np.linspace(0.005, 0.995, 199))
    true_cdf = np.searchsorted(union, pts, side="right") / union.size
    eps = single.rank_error
    assert 0.01 < eps < 0.02
    for q in (single, left, right):
        assert q.n == 60_000
        assert q.num_retained < 1000
        assert np.abs(q.cdf(pts) - true_cdf).max() <= eps
        # quantiles: the returned value's true rank is within eps of the asked rank
        ranks = np.linspace(0.01, 0.99, 99)
        true_rank = np.searchsorted(union, q.quantiles(ranks), side="right") / union.size
        assert np.abs(true_rank - ranks).max() <= eps + 1 / union.size
    loaded = roundtrip(left)
    assert loaded.n == left.n
    assert loaded.quantiles([0.5]).tolist() == left.quantiles([0.5]).tolist()


def test_ks_and_wasserstein_match_scipy_when_exact() -> None:
    rng = np.random.default_rng(13)
    for _ in range(20):
        x = rng.normal(size=150)
        y = rng.normal(0.3, 1.2, size=int(rng.integers(20, 400)))
        q = QuantileSketch()
        q.update(x)
        assert q.ks_distance(y) == pytest.approx(sps.ks_2samp(x, y).statistic, abs=1e-12)
        assert q.ks_distance(np.sort(y)[::-1]) == pytest.approx(q.ks_distance(y), abs=1e-15)
        # W1: the sketch's steps (multiples of 1/150) fall inside grid cells of width 1/G
        spread = float(max(x.max(), y.max()) - min(x.min(), y.min()))
        w = q.wasserstein(y, grid=4096)
        assert w == pytest.approx(sps.wasserstein_distance(x, y), abs=spread / 4096)
        # KS against a continuous CDF
        normal_cdf = sps.norm.cdf
        assert q.ks_distance(normal_cdf) == pytest.approx(
            sps.kstest(x, normal_cdf).statistic, abs=1e-12
        )
    same = rng.normal(size=150)
    q = QuantileSketch()
    q.update(same)
    assert q.wasserstein(same) == pytest.approx(0.0, abs=1e-15)


def test_ks_and_wasserstein_within_documented_bounds_on_large_streams() -> None:
    rng = np.random.default_rng(14)
    x = rng.normal(size=100_000)
    ref = rng.normal(0.2, 1.0, size=5_000)
    q = QuantileSketch()
    q.update(x)
    grid = 2048
    true_ks = sps.ks_2samp(x, ref).statistic
    assert abs(q.ks_distance(ref, grid=grid) - true_ks) <= q.rank_error + 1 / grid
    ref_sketch = QuantileSketch()
    ref_sketch.update(ref)
    assert abs(q.ks_distance(ref_sketch) - true_ks) <= 2 * q.rank_error + 2 / grid
    # the documented W1 bound: ∫_{1-ε}^1 Q - ∫_0^ε Q + ε (max - min), plus the grid term
    eps = q.rank_error
    xs = np.sort(x)
    tail = int(np.ceil(eps * xs.size))
    spread = float(xs[-1] - xs[0])
    bound = (xs[-tail:].sum() - xs[:tail].sum()) / xs.size + eps * spread + spread / grid
    for shift in (0.2, 1.0):
        far = rng.normal(shift, 1.0, size=5_000)
        true_w = sps.wasserstein_distance(x, far)
        assert abs(q.wasserstein(far, grid=grid) - true_w) <= bound
    assert bound < 0.25 * true_w  # informative for a 1-sigma shift
    assert q.ks_distance(sps.norm.cdf) <= q.rank_error + 1 / grid  # no drift vs N(0, 1)


def test_quantile_sketch_errors_and_empty() -> None:
    q = QuantileSketch()
    assert math.isnan(q.quantiles([0.5])[0])
    assert math.isnan(q.cdf([0.0])[0])
    assert math.isnan(q.ks_distance([1.0]))
    q.update([np.nan, 1.0])
    assert q.n == 1
    with pytest.raises(ValueError, match="ranks"):
        q.quantiles([1.5])
    with pytest.raises(ValueError, match="k: 4 must be an integer"):
        QuantileSketch(k=4)
    with pytest.raises(ValueError, match="k: cannot merge"):
        q.merge(QuantileSketch(k=100))
    with pytest.raises(TypeError, match="reference"):
        q.wasserstein(sps.norm.cdf)
    with pytest.raises(ValueError, match="reference: empty"):
        q.ks_distance([np.nan])


# --------------------------------------------------------------------- Cardinality


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.tuples(st.integers(0, 4000), st.integers(0, 4000), st.integers(0, 4000)),
    offsets=st.tuples(st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 5000)),
)
def test_cardinality_union_is_associative_and_within_bounds(
    sizes: tuple[int, int, int], offsets: tuple[int, int, int]
) -> None:
    sets = [np.arange(o, o + s, dtype=np.float64) for s, o in zip(sizes, offsets, strict=True)]
    parts = [Cardinality(lg_k=12) for _ in sets]
    for c, s in zip(parts, sets, strict=True):
        c.update(s)
    left = parts[0].merged(parts[1]).merge(parts[2])
    right = parts[0].merged(parts[1].merged(parts[2]))
    swapped = parts[2].merged(parts[0]).merge(parts[1])
    single = Cardinality(lg_k=12)
    single.update(np.concatenate(sets))
    true = len(set(np.concatenate(sets).tolist()))
    # In HLL mode a union is the register-wise max whatever the grouping: the registers
    # (bytes after the 40-byte header of an HLL_8 compact image) are identical. Only the
    # estimator bookkeeping (HIP accumulator / out-of-order flag) may differ.
    images = [base64.b64decode(c.to_state()["sketch"]) for c in (left, right, swapped, single)]
    if all(len(im) == 40 + 4096 for im in images):
        assert len({im[40:] for im in images}) == 1
    for c in (left, right, swapped, single):
        assert c.lower_bound(3) <= true <= c.upper_bound(3)
        assert abs(c.estimate - true) <= 3 * c.relative_error * true + 1


@pytest.mark.parametrize("distinct", [5, 50, 5000, 100_000])
def test_cardinality_batch_update_is_bit_identical_to_per_item_updates(distinct: int) -> None:
    rng = np.random.default_rng(distinct)
    words = np.array([f"w{i}" for i in rng.integers(0, distinct, size=20_000)])
    ints = rng.integers(0, distinct, size=20_000)
    for batch in (words, ints):
        ours = Cardinality(lg_k=12)
        ours.update(batch)
        raw = datasketches.hll_sketch(12, datasketches.tgt_hll_type.HLL_8)
        for v in batch.tolist():
            raw.update(v)
        assert base64.b64decode(ours.to_state()["sketch"]) == raw.serialize_compact()


def test_cardinality_types_state_and_errors() -> None:
    c = Cardinality(lg_k=10)
    c.update(np.array([1.0, 1.0, np.nan]))
    c.update(np.array([1, 2], dtype=np.int64))
    c.update(["1", None, "1", math.nan])
    assert round(c.estimate) == 4  # 1.0, 1, 2, "1": hashed by type
    loaded = roundtrip(c)
    loaded.update(np.arange(100.0))
    c.update(np.arange(100.0))
    assert loaded.to_state() == c.to_state()
    with pytest.raises(ValueError, match="tgt_type: 'HLL_5' is not valid; valid values: 'HLL_4'"):
        Cardinality(tgt_type="HLL_5")
    with pytest.raises(ValueError, match="lg_k: cannot merge"):
        c.merge(Cardinality(lg_k=12))
    with pytest.raises(ValueError, match="num_std_devs: 4 is not valid; valid values: 1, 2, 3"):
        c.upper_bound(4)


# --------------------------------------------------------------------- state errors


@pytest.mark.parametrize(
    "cls", [Moments, Histogram, QualityCounters, FrequentItems, QuantileSketch, Cardinality]
)
def test_from_state_rejects_wrong_kind_and_schema(cls: Any) -> None:
    obj = cls([0.0]) if cls is Histogram else cls()
    state = obj.to_state()
    assert state["schema"] == 1
    with pytest.raises(StateError, match="kind"):
        cls.from_state({**state, "kind": "something-else"})
    with pytest.raises(StateError, match="schema"):
        cls.from_state({**state, "schema": 99})
    field = next(k for k in state if k not in ("schema", "kind"))
    broken = {k: v for k, v in state.items() if k != field}
    with pytest.raises(StateError, match=field):
        cls.from_state(broken)


@pytest.mark.parametrize("cls", [FrequentItems, QuantileSketch, Cardinality])
def test_from_state_rejects_corrupt_sketch_bytes(cls: Any) -> None:
    state = cls().to_state()
    with pytest.raises(StateError, match="sketch"):
        cls.from_state({**state, "sketch": "not base64!"})
    with pytest.raises(StateError, match="sketch"):
        cls.from_state({**state, "sketch": "AAAA"})
