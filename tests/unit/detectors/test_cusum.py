"""CUSUM and Page-Hinkley: calibration, ARL by simulation, tick semantics, river parity."""

from __future__ import annotations

import random

import numpy as np
import pytest

from detectors.base import SpecError, build
from detectors.cusum import (
    CUSUM,
    CUSUMSpec,
    PageHinkley,
    PageHinkleySpec,
    arl0_siegmund,
    arl_markov,
    arl_siegmund,
    calibrate_h,
    calibrate_h_empirical,
)


def run_lengths(indices: list[int]) -> np.ndarray:
    """Run lengths between resetting alarms (the first one counted from the start)."""
    return np.diff(np.concatenate([[-1], indices]))


# ------------------------------------------------------------------ calibration


@pytest.mark.parametrize(("h", "arl0"), [(4.0, 168.0), (5.0, 465.0)])
def test_calibrate_h_matches_montgomery_table(h: float, arl0: float) -> None:
    # Montgomery, Introduction to Statistical Quality Control, two-sided CUSUM, k = 0.5
    assert calibrate_h(0.5, arl0) == pytest.approx(h, abs=0.03)


def test_calibrate_h_for_arl_1e6_cross_checked_by_integral_equation() -> None:
    one = calibrate_h(0.5, 1e6, two_sided=False)
    two = calibrate_h(0.5, 1e6, two_sided=True)
    assert 11.5 < one < 12.5 and 12.2 < two < 13.2  # not ~5: that is ARL0 ~ 465
    assert arl0_siegmund(0.5, one) == pytest.approx(1e6, rel=1e-6)
    # the integral-equation ARL (independent method) agrees within 2 %
    assert arl_markov(0.5, one) == pytest.approx(1e6, rel=0.02)
    assert 1.0 / (2.0 / arl_markov(0.5, two)) == pytest.approx(1e6, rel=0.02)
    assert arl_markov(0.5, 5.0) == pytest.approx(930.0, rel=0.01)  # literature, one side


def test_detection_delay_theory_for_one_sigma_shift() -> None:
    h = calibrate_h(0.5, 1e6)
    theory = arl_markov(0.5, h, shift=1.0)
    assert 23.0 < theory < 28.0
    assert arl_siegmund(0.5, h) == pytest.approx(theory, rel=0.05)
    g = np.random.default_rng(5)
    delays = []
    for _ in range(300):
        det = CUSUM(CUSUMSpec(target_mean=0.0, sigma=1.0, arl0=1e6, direction="both"))
        hits = det.update_many(g.normal(1.0, 1.0, 200))
        delays.append(hits[0].index + 1)
    assert np.mean(delays) == pytest.approx(theory, rel=0.1)


@pytest.mark.parametrize("direction", ["both", "up"])
def test_simulated_arl0_matches_target(direction: str) -> None:
    target = 500.0
    det = CUSUM(CUSUMSpec(target_mean=3.0, sigma=2.0, arl0=target, direction=direction))
    x = np.random.default_rng(17).normal(3.0, 2.0, 400_000)
    rl = run_lengths([d.index for d in det.update_many(x)])
    assert len(rl) > 300
    assert target / 2 < rl.mean() < target * 2
    assert rl.mean() == pytest.approx(target, rel=0.15)  # the calibration is good, not lucky


def test_page_hinkley_calibrated_threshold_arl0() -> None:
    target = 500.0
    det = PageHinkley(PageHinkleySpec(delta=0.5, sigma=1.0, arl0=target, min_instances=1))
    x = np.random.default_rng(23).normal(0.0, 1.0, 400_000)
    rl = run_lengths([d.index for d in det.update_many(x)])
    assert target / 2 < rl.mean() < target * 2
    assert det.threshold == pytest.approx(calibrate_h(0.5, target), rel=1e-12)


def test_empirical_calibration_with_clipping_tames_heavy_tails() -> None:
    g = np.random.default_rng(31)
    ref = g.standard_t(3, 200_000)
    mean, std = float(ref.mean()), float(ref.std())
    target = 500.0
    naive = CUSUM(CUSUMSpec.from_reference(mean, std, arl0=target))
    robust_spec = CUSUMSpec.from_reference(mean, std, arl0=target, clip=3.0, sample=ref)
    robust = CUSUM(robust_spec)
    live = g.standard_t(3, 300_000)
    rl_naive = run_lengths([d.index for d in naive.update_many(live)])
    rl_robust = run_lengths([d.index for d in robust.update_many(live)])
    assert target / 2 < rl_robust.mean() < target * 2
    assert rl_naive.mean() < rl_robust.mean()  # normal theory over-alarms on t(3)
    assert robust_spec.h is not None
    assert robust.threshold == robust_spec.h


def test_empirical_calibration_on_normal_sample_agrees_with_theory() -> None:
    z = np.random.default_rng(2).normal(size=200_000)
    assert calibrate_h_empirical(z, 0.0, 1.0, arl0=1e4) == pytest.approx(
        calibrate_h(0.5, 1e4), abs=0.1
    )


# ------------------------------------------------------------------ update semantics


def test_tick_equals_per_event_when_statistic_stays_positive() -> None:
    g = np.random.default_rng(8)
    x = g.uniform(1.0, 2.0, 40)  # every increment z - k > 0: S never touches 0
    spec = CUSUMSpec(target_mean=0.0, sigma=1.0, h=1e9, direction="up")
    per_event, tick = CUSUM(spec), CUSUM(spec)
    per_event.update_many(x)
    tick.update(len(x), float(x.sum()), float((x**2).sum()))
    assert tick.statistic[0] == pytest.approx(per_event.statistic[0], rel=1e-12)
    assert tick.n_seen == per_event.n_seen == 40


def test_tick_statistic_is_never_larger_than_per_event() -> None:
    g = np.random.default_rng(9)
    spec = CUSUMSpec(target_mean=0.0, sigma=1.0, h=1e9)
    for _ in range(50):
        x = g.normal(0.3, 1.0, 30)
        per_event, tick = CUSUM(spec), CUSUM(spec)
        per_event.update_many(x)
        tick.update(len(x), float(x.sum()))
        assert tick.statistic[0] <= per_event.statistic[0] + 1e-9
        assert tick.statistic[1] <= per_event.statistic[1] + 1e-9


def test_tick_alarm_index_is_last_event_of_tick() -> None:
    det = CUSUM(CUSUMSpec(target_mean=0.0, sigma=1.0, h=5.0))
    assert det.update(100, 0.0) == []
    hits = det.update(10, 30.0)  # 10 events with mean 3 sigma: S = 10 * (3 - 0.5)
    assert [(d.index, d.direction, d.reset) for d in hits] == [(109, "up", True)]
    assert hits[0].statistic == pytest.approx(25.0)
    assert det.statistic == (0.0, 0.0)


def test_continue_mode_alarms_once_per_excursion() -> None:
    x = np.concatenate([np.zeros(100), np.full(30, 3.0), np.full(200, -3.0), np.full(30, 3.0)])
    det = CUSUM(CUSUMSpec(target_mean=0.0, sigma=1.0, h=5.0, on_detect="continue"))
    hits = det.update_many(x)
    assert [(d.index, d.direction) for d in hits] == [(102, "up"), (132, "down"), (332, "up")]
    assert all(not d.reset for d in hits)


def test_page_hinkley_matches_river_with_river_parameters() -> None:
    river_drift = pytest.importorskip("river.drift")
    rng = random.Random(12345)
    docstring = rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000)
    g = np.random.default_rng(0)
    streams = [docstring] + [
        np.concatenate([g.normal(0, 1, 3000), g.normal(1.5, 1, 3000), g.normal(-1, 1, 3000)])
        .round(6)
        .tolist()
        for _ in range(3)
    ]
    for stream in streams:
        ref = river_drift.PageHinkley()
        expected = []
        for i, v in enumerate(stream):
            ref.update(v)
            if ref.drift_detected:
                expected.append(i)
        ours = PageHinkley(PageHinkleySpec(threshold=50.0, alpha=1 - 0.0001))
        assert [d.index for d in ours.update_many(stream)] == expected
    doc = PageHinkley(PageHinkleySpec(threshold=50.0, alpha=1 - 0.0001)).update_many(docstring)
    assert [d.index for d in doc] == [1006]  # river's documented result


def test_page_hinkley_detail_reports_running_mean() -> None:
    x = np.concatenate([np.random.default_rng(4).normal(2.0, 1.0, 3000), np.full(100, 5.0)])
    det = PageHinkley(PageHinkleySpec(delta=0.5, sigma=1.0, arl0=1e4))
    hit = det.update_many(x)[0]
    assert hit.detail["n"] == hit.index + 1
    assert 2.0 < hit.detail["mean"] < 2.2
    # reset: the running mean restarted after the alarm and learnt the new level
    assert det.mean == 5.0 and det.n_seen == len(x)


# ------------------------------------------------------------------ specs


def test_spec_validation_names_field_and_valid_values() -> None:
    with pytest.raises(SpecError, match=r"direction: 'sideways' is not valid; valid values"):
        CUSUMSpec(target_mean=0.0, sigma=1.0, direction="sideways")
    with pytest.raises(SpecError, match="sigma"):
        CUSUMSpec(target_mean=0.0, sigma=0.0)
    with pytest.raises(SpecError, match="sigma: required when threshold is None"):
        PageHinkleySpec()
    with pytest.raises(SpecError, match="threshold: required when alpha < 1"):
        PageHinkleySpec(sigma=1.0, alpha=0.999)
    with pytest.raises(SpecError, match="on_detect"):
        PageHinkleySpec(threshold=5.0, on_detect="restart")


def test_build_from_dict_and_unknown_parameter() -> None:
    det = build({"kind": "cusum", "target_mean": 1.0, "sigma": 2.0, "arl0": 1000.0})
    assert isinstance(det, CUSUM)
    assert det.threshold == pytest.approx(calibrate_h(0.5, 1000.0))
    with pytest.raises(SpecError, match=r"cusum\.hh: unknown parameter; valid parameters: .*h"):
        build({"kind": "cusum", "target_mean": 1.0, "sigma": 2.0, "hh": 3.0})
    with pytest.raises(SpecError, match=r"cusum: .*sigma"):
        build({"kind": "cusum", "target_mean": 1.0})
    with pytest.raises(SpecError, match=r"kind: 'cusm' is not valid; valid values: .*'cusum'"):
        build({"kind": "cusm"})
