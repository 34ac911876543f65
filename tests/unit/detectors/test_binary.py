"""Bernoulli CUSUM: exact ARL computation, calibration by simulation, tick semantics."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.base import SpecError
from detectors.binary import (
    BernoulliCUSUM,
    BernoulliCUSUMSpec,
    _jump_arl,
    bernoulli_cusum_arl,
    calibrate_h_bernoulli,
    default_p1,
)


def exact_lattice_arl(rate: float, up: int, down: int, h: int) -> float:
    """ARL of S = max(0, S + up) w.p. rate else max(0, S - down) on integers, alarm at S > h."""
    n = h + 1
    a = np.eye(n)
    for i in range(n):
        if i + up <= h:
            a[i, i + up] -= rate
        a[i, max(0, i - down)] -= 1.0 - rate
    return float(np.linalg.solve(a, np.ones(n))[0])


@pytest.mark.parametrize(
    ("rate", "up", "down", "h"),
    [(0.2, 3, 1, 20), (0.1, 5, 1, 40), (0.05, 10, 1, 60), (0.3, 2, 1, 15)],
)
def test_integral_equation_matches_exact_lattice_chain(
    rate: float, up: int, down: int, h: int
) -> None:
    exact = exact_lattice_arl(rate, up, down, h)
    # on integers, "S > h" is "S > h + 0.5" for the continuous-state method
    assert _jump_arl(rate, float(up), float(down), h + 0.5) == pytest.approx(exact, rel=0.005)


@pytest.mark.parametrize(
    ("p0", "p1", "arl0", "seed"),
    [(0.05, None, 1e3, 1), (0.01, None, 2e3, 2), (0.3, None, 500.0, 3), (0.1, 0.05, 1e3, 4)],
)
def test_calibrated_arl0_by_simulation(p0: float, p1: float | None, arl0: float, seed: int) -> None:
    spec = BernoulliCUSUMSpec(p0=p0, p1=p1, arl0=arl0)
    det = BernoulliCUSUM(spec)
    x = np.random.default_rng(seed).random(int(300 * arl0)) < p0
    hits = det.update_many(x)
    rl = np.diff(np.concatenate([[-1], [d.index for d in hits]]))
    assert len(rl) > 150
    assert arl0 / 2 < rl.mean() < 2 * arl0
    assert rl.mean() == pytest.approx(arl0, rel=0.2)
    assert {d.direction for d in hits} == {"up" if spec.rate1 > p0 else "down"}


def test_detection_delay_matches_computed_arl1() -> None:
    spec = BernoulliCUSUMSpec(p0=0.05, arl0=1e4)
    h = spec.decision_interval
    theory = bernoulli_cusum_arl(0.1, 0.05, 0.1, h)
    g = np.random.default_rng(6)
    delays = []
    for _ in range(300):
        det = BernoulliCUSUM(spec)
        delays.append(det.update_many(g.random(3000) < 0.1)[0].index + 1)
    assert np.mean(delays) == pytest.approx(theory, rel=0.1)
    assert calibrate_h_bernoulli(0.05, 0.1, 1e4) == h


def test_default_p1() -> None:
    assert default_p1(0.02) == 0.04
    assert default_p1(0.6) == pytest.approx(0.8)
    assert BernoulliCUSUM(BernoulliCUSUMSpec(p0=0.02, h=5.0)).p1 == 0.04


def test_tick_is_the_sum_of_per_trial_increments() -> None:
    spec = BernoulliCUSUMSpec(p0=0.1, h=100.0)
    a, b = BernoulliCUSUM(spec), BernoulliCUSUM(spec)
    a.update_many(np.ones(5))  # S only grows: no zero touching inside the tick
    b.update(5, 5)
    assert b.statistic[0] == pytest.approx(a.statistic[0], rel=1e-12)
    c = BernoulliCUSUM(spec)
    c.update(1000, 100)  # in control on average: S stays near 0, never above per-trial path
    assert c.statistic[0] >= 0.0 and c.n_seen == 1000


def test_single_trial_tick_equals_event() -> None:
    spec = BernoulliCUSUMSpec(p0=0.2, arl0=200.0)
    x = (np.random.default_rng(0).random(5000) < 0.25).astype(float)
    a, b = BernoulliCUSUM(spec), BernoulliCUSUM(spec)
    got = a.update_many(x)
    ref = [d for v in x.tolist() for d in b.update(1, v)]
    assert got == ref and got
    assert a.to_state() == b.to_state()


def test_input_validation() -> None:
    det = BernoulliCUSUM(BernoulliCUSUMSpec(p0=0.1, h=3.0))
    with pytest.raises(ValueError, match=r"values: 0\.5 at index 1 is not 0 or 1"):
        det.update_many([0, 0.5, 1])
    with pytest.raises(ValueError, match="total"):
        det.update(10, 11)
    with pytest.raises(ValueError, match="count"):
        det.update(-1, 0)
    with pytest.raises(SpecError, match=r"p1: 0\.1 must differ from p0"):
        BernoulliCUSUMSpec(p0=0.1, p1=0.1)
    with pytest.raises(SpecError, match="p0"):
        BernoulliCUSUMSpec(p0=1.0)
