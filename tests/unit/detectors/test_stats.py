"""detectors.stats against scipy (reference only; the module itself is stdlib)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from detectors.stats import chi2_isf, chi2_logsf, chi2_sf, normal_isf, normal_sf

DFS = [0.1, 0.5, 1, 2, 3, 4, 5, 7, 9, 10, 15, 19, 20, 29, 50, 99, 100, 250, 1000, 5000]
PS = [
    1e-300,
    1e-100,
    1e-30,
    1e-12,
    1e-9,
    1e-6,
    1e-4,
    1e-3,
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    0.9,
    0.95,
    0.99,
    0.999,
    1 - 1e-6,
    1 - 1e-9,
    1 - 1e-12,
]
RTOL = 1e-9


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a)


@pytest.mark.parametrize("df", DFS)
def test_chi2_sf_and_isf_match_scipy_over_grid(df: float) -> None:
    checked = 0
    for p in PS:
        x = float(sps.chi2.isf(p, df))
        if not 0.0 < x < math.inf:
            continue
        expected_sf = float(sps.chi2.sf(x, df))
        assert rel(chi2_sf(x, df), expected_sf) < RTOL, (df, p)
        assert rel(chi2_isf(p, df), x) < RTOL, (df, p)
        checked += 1
    assert checked >= 15


@pytest.mark.parametrize("df", [1, 2, 9, 30, 200])
@pytest.mark.parametrize("x", [1e-8, 0.01, 0.5, 1.0, 3.0, 8.0, 20.0, 60.0, 150.0, 400.0, 1200.0])
def test_chi2_sf_matches_scipy_on_fixed_points(df: int, x: float) -> None:
    expected = float(sps.chi2.sf(x, df))
    if expected < 1e-300:
        assert chi2_sf(x, df) < 1e-290
        assert rel(chi2_logsf(x, df), float(sps.chi2.logsf(x, df))) < RTOL
    else:
        assert rel(chi2_sf(x, df), expected) < RTOL


@settings(max_examples=300, deadline=None)
@given(
    df=st.floats(min_value=0.2, max_value=2000.0),
    log10_p=st.floats(min_value=-200.0, max_value=-1e-9),
)
def test_chi2_isf_matches_scipy_random(df: float, log10_p: float) -> None:
    p = 10.0**log10_p
    x = float(sps.chi2.isf(p, df))
    if 0.0 < x < math.inf and p < 1.0:
        assert rel(chi2_isf(p, df), x) < RTOL
        assert rel(chi2_sf(x, df), float(sps.chi2.sf(x, df))) < RTOL


@pytest.mark.parametrize("p", PS)
def test_normal_matches_scipy(p: float) -> None:
    z = float(sps.norm.isf(p))
    if z == 0.0:
        assert normal_isf(p) == 0.0
    else:
        assert rel(normal_isf(p), z) < RTOL
    assert rel(normal_sf(z), float(sps.norm.sf(z))) < RTOL


@pytest.mark.parametrize("z", [-8.0, -3.0, -1.0, -0.1, 0.0, 0.3, 1.0, 2.5, 5.0, 10.0, 30.0])
def test_normal_sf_fixed_points(z: float) -> None:
    assert rel(normal_sf(z), float(sps.norm.sf(z))) < RTOL


def test_edges_of_the_domain() -> None:
    assert chi2_sf(0.0, 3) == 1.0
    assert chi2_sf(-1.0, 3) == 1.0
    assert chi2_sf(math.inf, 3) == 0.0
    assert math.isnan(chi2_sf(math.nan, 3))
    assert chi2_isf(0.0, 3) == math.inf
    assert chi2_isf(1.0, 3) == 0.0
    assert normal_isf(0.0) == math.inf
    assert normal_isf(1.0) == -math.inf
    assert normal_sf(math.inf) == 0.0


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: chi2_sf(1.0, 0), "df"),
        (lambda: chi2_sf(1.0, -2), "df"),
        (lambda: chi2_sf(1.0, math.inf), "df"),
        (lambda: chi2_isf(1.5, 3), "p"),
        (lambda: chi2_isf(-0.1, 3), "p"),
        (lambda: normal_isf(2.0), "p"),
    ],
)
def test_invalid_arguments_name_the_field(call: object, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        call()  # type: ignore[operator]


def test_isf_inverts_sf() -> None:
    for df in (1, 3, 9, 40):
        for x in (0.5, 2.0, 9.0, 33.0, 90.0):
            p = chi2_sf(x, df)
            if 1e-300 < p < 1 - 1e-6:
                assert rel(chi2_isf(p, df), x) < 1e-8
