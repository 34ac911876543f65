"""PSI: textbook formula, bin conventions, calibration under no drift, power, windows."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from detectors.base import SpecError, StateError
from detectors.psi import PSI, PSIResult, PSISpec, WindowedCounts

# --------------------------------------------------------------------- textbook formula


def textbook(current: list[float], reference: list[float]) -> float:
    """Σ (c - r) ln(c / r) on shares, written out by hand."""
    total = 0.0
    for c, r in zip(current, reference, strict=True):
        if c == r:
            continue
        total += (c - r) * math.log(c / r)
    return total


@pytest.mark.parametrize(
    ("counts", "reference"),
    [
        ([30, 30, 40], [0.2, 0.3, 0.5]),
        ([10, 0, 5, 85], [0.1, 0.0, 0.1, 0.8]),  # empty on both sides: contributes 0
        ([1, 1], [0.5, 0.5]),
        ([7, 93], [0.93, 0.07]),
    ],
)
def test_unsmoothed_psi_is_the_textbook_formula(counts: list[int], reference: list[float]) -> None:
    spec = PSISpec(edges=tuple(range(len(counts) - 1)), reference=tuple(reference), smoothing=0.0)
    result = PSI(spec).compute(counts)
    n = sum(counts)
    expected = textbook([c / n for c in counts], reference)
    assert result.statistic == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert sum(result.contributions) == pytest.approx(result.statistic, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("reference_n", [None, 50, 10_000])
@pytest.mark.parametrize("smoothing", [0.5, 1.0, 3.0])
def test_smoothed_psi_adds_the_pseudo_count_to_both_sides(
    smoothing: float, reference_n: int | None
) -> None:
    counts = [12, 0, 30, 58]
    reference = [0.1, 0.05, 0.35, 0.5]
    spec = PSISpec(
        edges=(1.0, 2.0, 3.0),
        reference=tuple(reference),
        reference_n=reference_n,
        smoothing=smoothing,
    )
    n, k = sum(counts), len(counts)
    cur = [(x + smoothing) / (n + k * smoothing) for x in counts]
    ref = [(p * n + smoothing) / (n + k * smoothing) for p in reference]  # at the window's n
    assert PSI(spec).compute(counts).statistic == pytest.approx(textbook(cur, ref), rel=1e-12)


def test_one_sided_empty_bin_without_smoothing_is_infinite_and_critical() -> None:
    spec = PSISpec(edges=(0.0,), reference=(1.0, 0.0), smoothing=0.0, min_count=1)
    r = PSI(spec).compute([50, 1])
    assert r.statistic == math.inf
    assert r.severity == "critical"
    assert r.p_value == 0.0
    assert r.to_dict()["statistic"] is None
    json.dumps(r.to_dict(), allow_nan=False)


def test_identical_distribution_gives_zero() -> None:
    spec = PSISpec(edges=(0.0, 1.0), reference=(0.25, 0.5, 0.25), smoothing=0.0)
    r = PSI(spec).compute([25, 50, 25])
    assert r.statistic == 0.0
    assert r.p_value == 1.0
    assert r.severity == "ok"


# --------------------------------------------------------------------- bin conventions


def test_numeric_bins_are_left_closed_with_open_outer_bins() -> None:
    psi = PSI(PSISpec(edges=(0.0, 1.0, 2.0), reference=(0.25,) * 4))
    values = [
        -np.inf,
        np.nextafter(0.0, -1.0),  # bin 0
        0.0,
        0.5,
        np.nextafter(1.0, -1.0),  # bin 1
        1.0,  # bin 2
        2.0,
        1e300,
        np.inf,  # bin 3
        np.nan,  # not binned
    ]
    counts, missing = psi.bin_counts_and_missing(np.array(values))
    assert counts.tolist() == [2, 3, 1, 3]
    assert counts.dtype == np.int64
    assert missing == 1
    assert psi.bin_counts(values).tolist() == [2, 3, 1, 3]


@settings(max_examples=200, deadline=None)
@given(
    edges=st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=8, unique=True).map(
        sorted
    ),
    values=st.lists(
        st.one_of(
            st.floats(-200, 200, allow_nan=False), st.sampled_from([np.inf, -np.inf, np.nan])
        ),
        max_size=60,
    ),
    data=st.data(),
)
def test_numeric_binning_matches_a_per_value_rule(
    edges: list[float], values: list[float], data: Any
) -> None:
    # also put values exactly on edges
    values = values + data.draw(st.lists(st.sampled_from(edges), max_size=10))
    k = len(edges) + 1
    psi = PSI(PSISpec(edges=tuple(edges), reference=(1.0 / k,) * k))
    expected = [0] * k
    for v in values:
        if math.isnan(v):
            continue
        expected[sum(1 for e in edges if v >= e)] += 1  # bin i = number of edges <= v
    counts, missing = psi.bin_counts_and_missing(np.array(values, dtype=np.float64))
    assert counts.tolist() == expected
    assert missing == sum(1 for v in values if math.isnan(v))


def test_categorical_other_bucket_and_missing() -> None:
    psi = PSI(PSISpec(categories=("a", "b", ""), reference=(0.5, 0.3, 0.1, 0.1)))
    values: list[Any] = ["a", "b", "b", "", "zz", "A", None, float("nan"), 5]
    counts, missing = psi.bin_counts_and_missing(values)
    assert counts.tolist() == [1, 2, 1, 3]  # "zz", "A", 5 are "other"
    assert missing == 2
    obj = np.array(values, dtype=object)
    assert psi.bin_counts(obj).tolist() == [1, 2, 1, 3]
    strings = np.array(["a", "b", "b", "", "zz", "A", "bb", "0"])
    assert psi.bin_counts(strings).tolist() == [1, 2, 1, 4]
    assert psi.bin_counts(strings.astype("S")).tolist() == [1, 2, 1, 4]


@settings(max_examples=100, deadline=None)
@given(
    cats=st.lists(st.text(max_size=4), min_size=1, max_size=6, unique=True),
    extra=st.lists(st.text(max_size=4), max_size=40),
)
def test_categorical_vectorised_path_equals_dict_lookup(cats: list[str], extra: list[str]) -> None:
    k = len(cats) + 1
    psi = PSI(PSISpec(categories=tuple(cats), reference=(1.0 / k,) * k))
    values = extra + cats
    expected = [0] * k
    for v in values:
        expected[cats.index(v) if v in cats else k - 1] += 1
    assert psi.bin_counts(values).tolist() == expected
    assert psi.bin_counts(np.array(values, dtype=object)).tolist() == expected
    if all("\x00" not in v for v in values):  # numpy U arrays strip trailing NULs
        assert psi.bin_counts(np.array(values, dtype=str)).tolist() == expected


# --------------------------------------------------------------------- spec


def test_spec_round_trips_through_dict_and_json() -> None:
    spec = PSISpec.from_reference_sample(np.random.default_rng(1).gamma(2.0, size=5000))
    again = PSISpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert again.to_dict() == spec.to_dict()
    cat = PSISpec.from_reference_categories(["x", "y", "y", "z"], warn=0.2, critical=0.3)
    assert PSISpec.from_dict(json.loads(json.dumps(cat.to_dict()))) == cat
    assert cat.to_dict()["kind"] == "psi"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"reference": (1.0,)}, "edges/categories: give exactly one"),
        ({"edges": (0.0,), "categories": ("a",), "reference": (0.5, 0.5)}, "edges/categories"),
        ({"edges": (1.0, 0.0), "reference": (0.3, 0.3, 0.4)}, "edges[1]: 0.0 is not greater"),
        ({"edges": (0.0, math.inf), "reference": (0.3, 0.3, 0.4)}, "edges[1]: inf is not finite"),
        ({"edges": (0.0,), "reference": (1.0,)}, "reference: expected 2 shares"),
        ({"edges": (0.0,), "reference": (0.5, 0.6)}, "reference: shares sum to"),
        ({"edges": (0.0,), "reference": (-0.5, 1.5)}, "reference[0]"),
        ({"categories": ("a", "a"), "reference": (0.3, 0.3, 0.4)}, "categories: 'a' appears"),
        ({"categories": (), "reference": (1.0,)}, "categories: needs at least one"),
        ({"categories": ("a", 3), "reference": (0.3, 0.3, 0.4)}, "categories[1]"),
        ({"edges": (0.0,), "reference": (0.5, 0.5), "smoothing": -1.0}, "smoothing"),
        ({"edges": (0.0,), "reference": (0.5, 0.5), "alpha": 1.0}, "alpha"),
        ({"edges": (0.0,), "reference": (0.5, 0.5), "warn": 0.0}, "warn"),
        ({"edges": (0.0,), "reference": (0.5, 0.5), "critical": 0.05}, "critical: 0.05 must be"),
        ({"edges": (0.0,), "reference": (0.5, 0.5), "min_count": 0}, "min_count"),
        ({"edges": (0.0,), "reference": (0.5, 0.5), "reference_n": 2.5}, "reference_n"),
    ],
)
def test_spec_validation_names_the_field(params: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as err:
        PSISpec(**params)
    assert str(err.value).startswith(message.split(":", maxsplit=1)[0]), str(err.value)
    assert message in str(err.value)


def test_from_dict_rejects_unknown_fields_and_lists_valid_ones() -> None:
    with pytest.raises(SpecError, match=r"psi\.bins: unknown parameter; valid parameters: edges"):
        PSISpec.from_dict({"kind": "psi", "bins": 10, "edges": [0.0], "reference": [0.5, 0.5]})
    with pytest.raises(SpecError, match=r"kind: 'adwin' is not valid; valid values: 'psi'"):
        PSISpec.from_dict({"kind": "adwin"})


def test_from_reference_sample_uses_observed_quantiles() -> None:
    x = np.random.default_rng(2).lognormal(size=3001)
    spec = PSISpec.from_reference_sample(x, bins=10)
    expected = np.quantile(x, np.arange(1, 10) / 10, method="inverted_cdf")
    assert spec.edges == tuple(expected.tolist())
    assert spec.reference_n == 3001
    counts = PSI(spec).bin_counts(x)
    assert spec.reference == tuple((counts / 3001).tolist())


@pytest.mark.parametrize(
    ("sample", "edges"),
    [
        ([0.0, 1.0, 2.0] * 100, (1.0, 2.0)),
        ([0.0] * 95 + [1.0] * 5, (np.nextafter(0.0, 1.0),)),
        ([4.0] * 10, (4.0, np.nextafter(4.0, 5.0))),
        ([0.0] * 50 + list(range(1, 51)), (np.nextafter(0.0, 1.0), 10.0, 20.0, 30.0, 40.0)),
    ],
)
def test_from_reference_sample_dedupes_ties(sample: list[float], edges: tuple[float, ...]) -> None:
    spec = PSISpec.from_reference_sample([*sample, math.nan], bins=10)
    assert spec.edges == edges
    assert spec.reference_n == len(sample)


@settings(max_examples=150, deadline=None)
@given(
    sample=st.lists(
        st.one_of(st.integers(-3, 3).map(float), st.floats(-1e6, 1e6, allow_nan=False)),
        min_size=1,
        max_size=200,
    ),
    bins=st.integers(2, 20),
)
def test_reference_bins_never_have_empty_interior(sample: list[float], bins: int) -> None:
    spec = PSISpec.from_reference_sample(sample, bins=bins)
    shares = np.array(spec.reference)
    assert shares.sum() == pytest.approx(1.0)
    assert spec.bins <= bins + 1
    # every bin but possibly the last (only for a constant sample) holds reference mass
    populated = shares > 0
    if len(set(sample)) > 1:
        assert populated.all(), (spec.edges, spec.reference)
    else:
        assert populated.tolist() == [False, True, False]


def test_from_reference_categories() -> None:
    spec = PSISpec.from_reference_categories(
        ["a"] * 5 + ["b"] * 3 + ["c"] * 2 + [None, math.nan], max_categories=2, smoothing=1.0
    )
    assert spec.categories == ("a", "b")
    assert spec.reference == (0.5, 0.3, 0.2)
    assert spec.reference_n == 10
    assert spec.smoothing == 1.0
    spec2 = PSISpec.from_reference_categories({"x": 1, "y": 3})
    assert spec2.categories == ("y", "x")
    assert spec2.reference == (0.75, 0.25, 0.0)
    assert PSI(spec2).df == 1  # the empty "other" bucket carries no chi-square mass
    with pytest.raises(SpecError, match="values_or_counts"):
        PSISpec.from_reference_categories([None])


# --------------------------------------------------------------------- thresholds


def test_effective_thresholds_follow_the_chi_square_noise_floor() -> None:
    spec = PSISpec.from_reference_sample(np.random.default_rng(3).normal(size=10_000), bins=10)
    spec = PSISpec.from_dict({**spec.to_dict(), "reference_n": None})
    psi = PSI(spec)
    q = float(sps.chi2.isf(1e-3, 9))
    assert psi.df == 9
    assert psi.noise_quantile == pytest.approx(q, rel=1e-9)
    r200 = psi.compute(psi.bin_counts(np.random.default_rng(4).normal(size=200)))
    assert r200.warn_threshold == pytest.approx(q / 200)  # 0.139 > 0.1
    assert r200.critical_threshold == 0.25
    r50 = psi.compute(psi.bin_counts(np.random.default_rng(4).normal(size=50)))
    assert r50.warn_threshold == r50.critical_threshold == pytest.approx(q / 50)
    r1000 = psi.compute(psi.bin_counts(np.random.default_rng(4).normal(size=1000)))
    assert (r1000.warn_threshold, r1000.critical_threshold) == (0.1, 0.25)
    assert r1000.p_value == pytest.approx(float(sps.chi2.sf(1000 * r1000.statistic, 9)), rel=1e-9)


def test_finite_reference_scales_by_effective_sample_size() -> None:
    spec = PSISpec(edges=(0.0,), reference=(0.5, 0.5), reference_n=1000, min_count=1)
    r = PSI(spec).compute([600, 400])
    assert r.n_effective == pytest.approx(500.0)
    assert r.p_value == pytest.approx(float(sps.chi2.sf(500 * r.statistic, 1)), rel=1e-9)


def test_insufficient_below_min_count_and_empty_window() -> None:
    psi = PSI(PSISpec(edges=(0.0,), reference=(0.5, 0.5), min_count=30))
    r = psi.compute([29, 0])
    assert r.severity == "insufficient"
    assert math.isfinite(r.statistic)
    assert psi.compute([30, 0]).severity == "critical"
    empty = psi.compute([0, 0])
    assert empty.severity == "insufficient"
    assert empty.n == 0
    assert math.isnan(empty.statistic)
    json.dumps(empty.to_dict(), allow_nan=False)


def test_compute_rejects_bad_counts() -> None:
    psi = PSI(PSISpec(edges=(0.0,), reference=(0.5, 0.5)))
    with pytest.raises(ValueError, match=r"counts: expected shape \(2,\)"):
        psi.compute([1, 2, 3])
    with pytest.raises(ValueError, match="counts: must be non-negative"):
        psi.compute([-1, 2])
    with pytest.raises(ValueError, match="counts: must be integers"):
        psi.compute([0.5, 2])


# --------------------------------------------------------------------- calibration and power

TRIALS = 300
CATS = tuple(f"c{i}" for i in range(8))
CAT_P = np.array([0.4, 0.2, 0.1, 0.1, 0.08, 0.06, 0.04, 0.02])


def _rates(results: list[PSIResult]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for r in results:
        out[r.severity] += 1 / len(results)
    return out


@pytest.mark.parametrize("reference_n", [20_000, None])
@pytest.mark.parametrize("n", [200, 1_000, 10_000])
def test_no_drift_numeric_rarely_critical(n: int, reference_n: int | None) -> None:
    rng = np.random.default_rng(1000 + n)
    spec = PSISpec.from_reference_sample(rng.normal(size=20_000), bins=10)
    if reference_n is None:  # exact reference: the true bin probabilities
        cdf = sps.norm.cdf(np.r_[-np.inf, spec.edges, np.inf])
        exact = np.diff(cdf)
        spec = PSISpec(edges=spec.edges, reference=tuple((exact / exact.sum()).tolist()))
    psi = PSI(spec)
    results = [psi.compute(psi.bin_counts(rng.normal(size=n))) for _ in range(TRIALS)]
    rates = _rates(results)
    assert rates["critical"] <= 0.01
    assert rates["warn"] + rates["critical"] <= 0.01
    # the chi-square calibration itself: P(p < 0.05) is about 5 %
    low_p = np.mean([r.p_value < 0.05 for r in results])
    assert 0.02 <= low_p <= 0.09, low_p


@pytest.mark.parametrize("finite_reference", [True, False])
@pytest.mark.parametrize("n", [200, 1_000, 10_000])
def test_no_drift_categorical_rarely_critical(n: int, finite_reference: bool) -> None:
    rng = np.random.default_rng(2000 + n)
    if finite_reference:
        spec = PSISpec.from_reference_categories(rng.choice(CATS, size=5_000, p=CAT_P))
    else:
        spec = PSISpec(categories=CATS, reference=(*CAT_P.tolist(), 0.0))
    psi = PSI(spec)
    assert psi.df == 7
    results = [
        psi.compute(psi.bin_counts(rng.choice(CATS, size=n, p=CAT_P))) for _ in range(TRIALS)
    ]
    rates = _rates(results)
    assert rates["critical"] <= 0.01
    low_p = np.mean([r.p_value < 0.05 for r in results])
    assert 0.02 <= low_p <= 0.09, low_p


def test_fixed_thresholds_alone_would_cry_wolf_on_small_windows() -> None:
    rng = np.random.default_rng(7)
    spec = PSISpec.from_reference_sample(rng.normal(size=20_000), bins=10, min_count=20)
    psi = PSI(spec)
    results = [psi.compute(psi.bin_counts(rng.normal(size=50))) for _ in range(TRIALS)]
    naive_critical = np.mean([r.statistic >= 0.25 for r in results])
    assert naive_critical > 0.05  # what a fixed 0.25 cut would do at n = 50
    assert _rates(results)["critical"] <= 0.01


@pytest.mark.parametrize("n", [200, 1_000, 10_000])
def test_real_shifts_are_detected(n: int) -> None:
    rng = np.random.default_rng(3000 + n)
    normal = PSI(PSISpec.from_reference_sample(rng.normal(size=20_000), bins=10))
    unit = PSI(PSISpec.from_reference_sample(rng.uniform(0, 1, size=20_000), bins=10))
    cat = PSI(PSISpec.from_reference_categories(rng.choice(CATS, size=5_000, p=CAT_P)))
    for _ in range(20):
        assert normal.compute(normal.bin_counts(rng.normal(1.0, 1.0, size=n))).severity == (
            "critical"
        )
        # 0-1 -> 0-100 (a unit change upstream)
        assert unit.compute(unit.bin_counts(rng.uniform(0, 100, size=n))).severity == "critical"
        # the category mix reversed
        shifted = rng.choice(CATS, size=n, p=CAT_P[::-1])
        assert cat.compute(cat.bin_counts(shifted)).severity == "critical"
        half = normal.compute(normal.bin_counts(rng.normal(0.5, 1.0, size=n)))
        assert half.severity in ("warn", "critical")
        assert half.p_value < 1e-3
        # a new category appearing in 30 % of traffic
        new = np.where(rng.random(n) < 0.3, "brand-new", rng.choice(CATS, size=n, p=CAT_P))
        r = cat.compute(cat.bin_counts(new))
        assert r.severity == "critical"
        assert int(np.argmax(r.contributions)) == len(CATS)  # the "other" bucket


# --------------------------------------------------------------------- windowed counts


def test_windowed_counts_slides_and_refuses_old_ticks() -> None:
    w = WindowedCounts(bins=2, window_ticks=3)
    w.push([1, 0])  # tick 0
    w.push([0, 1])  # tick 1
    assert w.add(5, [2, 2])  # gap: ticks 3..5 in the window; 0 and 1 evicted
    assert w.total.tolist() == [2, 2]
    assert w.oldest_tick == 3
    assert not w.add(2, [9, 9])
    assert w.add(3, [1, 0])
    assert w.total.tolist() == [3, 2]
    w.advance(7)
    assert w.total.tolist() == [2, 2]
    w.advance(100)
    assert w.n == 0
    assert w.tick_counts(100).tolist() == [0, 0]


@settings(max_examples=150, deadline=None)
@given(
    window=st.integers(1, 6),
    ops=st.lists(
        st.tuples(st.integers(0, 30), st.lists(st.integers(0, 50), min_size=3, max_size=3)),
        max_size=40,
    ),
)
def test_windowed_counts_matches_brute_force(window: int, ops: list[tuple[int, list[int]]]) -> None:
    w = WindowedCounts(bins=3, window_ticks=window)
    per_tick: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(3, dtype=np.int64))
    newest: int | None = None
    for tick, counts in ops:
        # state round trip is exact and the clone continues identically
        clone = WindowedCounts.from_state(json.loads(json.dumps(w.to_state())))
        assert clone.to_state() == w.to_state()
        assert clone.add(tick, counts) == w.add(tick, counts)
        assert clone == w
        accepted = w.add(tick, [0, 0, 0])  # the same acceptance rule, no counts
        expect_accept = newest is None or tick > newest - window
        assert accepted == expect_accept
        if accepted:
            per_tick[tick] += counts
            newest = tick if newest is None else max(newest, tick)
        assert newest is not None or not ops
        if newest is not None:
            expected = sum(
                (per_tick[t] for t in range(newest - window + 1, newest + 1)),
                np.zeros(3, dtype=np.int64),
            )
            assert w.total.tolist() == expected.tolist()


def test_windowed_counts_merge_equals_adding_the_ticks() -> None:
    a, b, both = (WindowedCounts(2, 4) for _ in range(3))
    for t, c in [(0, [1, 2]), (1, [3, 0]), (4, [1, 1])]:
        a.add(t, c)
        both.add(t, c)
    for t, c in [(2, [5, 5]), (3, [0, 7]), (5, [2, 0])]:
        b.add(t, c)
        both.add(t, c)
    assert a.merge(b) == both
    with pytest.raises(ValueError, match="bins/window_ticks"):
        a.merge(WindowedCounts(3, 4))


def test_windowed_counts_validation() -> None:
    with pytest.raises(SpecError, match="window_ticks"):
        WindowedCounts(3, 0)
    with pytest.raises(SpecError, match="bins"):
        WindowedCounts(0, 3)
    w = WindowedCounts(2, 2)
    with pytest.raises(ValueError, match=r"counts: expected shape \(2,\)"):
        w.add(0, [1, 2, 3])
    with pytest.raises(ValueError, match="tick"):
        w.add(1.5, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(StateError, match="kind"):
        WindowedCounts.from_state({"schema": 1, "kind": "histogram"})
    with pytest.raises(StateError, match="ticks"):
        WindowedCounts.from_state(
            {"schema": 1, "kind": "windowed_counts", "bins": 2, "window_ticks": 2,
             "newest_tick": 3, "ticks": [[1, 2]]}
        )  # fmt: skip
