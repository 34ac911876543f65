"""The shared detector interface, checked for every sequential detector kind."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import detectors.adwin
import detectors.binary
import detectors.cusum  # noqa: F401  (registers the kinds)
from detectors.base import (
    Detection,
    Detector,
    SpecError,
    StateError,
    build,
    kinds,
    load,
    spec_from_dict,
)

Gen = Callable[[np.random.Generator, int], np.ndarray]


def _shifty(g: np.random.Generator, n: int) -> np.ndarray:
    """Normal data with a random mean shift (so that detections happen)."""
    return g.normal(0.0, 1.0, n) + np.where(np.arange(n) >= g.integers(0, n + 1), 2.0, 0.0)


def _binary(g: np.random.Generator, n: int) -> np.ndarray:
    p = np.where(np.arange(n) >= g.integers(0, n + 1), 0.3, 0.05)
    return (g.random(n) < p).astype(float)


# kind -> (spec dicts covering the options, data generator)
CASES: dict[str, tuple[list[dict[str, Any]], Gen]] = {
    "adwin": (
        [
            {"kind": "adwin", "clock": 4, "delta": 0.1},
            {"kind": "adwin", "on_detect": "continue", "clock": 1, "max_buckets": 2},
        ],
        _shifty,
    ),
    "cusum": (
        [
            {"kind": "cusum", "target_mean": 0.0, "sigma": 1.0, "arl0": 200.0},
            {"kind": "cusum", "target_mean": 0.2, "sigma": 0.8, "h": 4.0, "on_detect": "continue"},
            {"kind": "cusum", "target_mean": 0.0, "sigma": 1.0, "h": 3.0, "direction": "down"},
            {"kind": "cusum", "target_mean": 0.0, "sigma": 1.0, "arl0": 300.0, "clip": 2.0},
        ],
        _shifty,
    ),
    "page_hinkley": (
        [
            {"kind": "page_hinkley", "delta": 0.5, "sigma": 1.0, "arl0": 300.0},
            {"kind": "page_hinkley", "threshold": 3.0, "alpha": 0.99, "min_instances": 5},
            {
                "kind": "page_hinkley",
                "delta": 0.3,
                "threshold": 4.0,
                "direction": "up",
                "on_detect": "continue",
            },
        ],
        _shifty,
    ),
    "bernoulli_cusum": (
        [
            {"kind": "bernoulli_cusum", "p0": 0.05, "arl0": 300.0},
            {"kind": "bernoulli_cusum", "p0": 0.05, "p1": 0.2, "h": 2.0, "on_detect": "continue"},
            {"kind": "bernoulli_cusum", "p0": 0.3, "p1": 0.05, "h": 3.0},
        ],
        _binary,
    ),
}
SPECS = [(kind, d) for kind, (specs, _gen) in CASES.items() for d in specs]
SPEC_IDS = [f"{d['kind']}-{i}" for i, (_k, d) in enumerate(SPECS)]


def test_all_sequential_kinds_registered() -> None:
    assert set(CASES) <= set(kinds())


@pytest.mark.parametrize(("kind", "spec"), SPECS, ids=SPEC_IDS)
def test_protocol_and_spec_round_trip(kind: str, spec: dict[str, Any]) -> None:
    det = build(spec)
    assert isinstance(det, Detector)
    assert det.n_seen == 0
    rebuilt = spec_from_dict(json.loads(json.dumps(det.spec.to_dict())))
    assert rebuilt == det.spec
    assert det.update(0, 0.0) == [] and det.n_seen == 0


@pytest.mark.parametrize(("kind", "spec"), SPECS, ids=SPEC_IDS)
def test_unknown_parameter_lists_valid_ones(kind: str, spec: dict[str, Any]) -> None:
    with pytest.raises(SpecError, match=rf"{kind}\.bogus: unknown parameter; valid parameters: "):
        build({**spec, "bogus": 1})


@pytest.mark.parametrize(("kind", "spec"), SPECS, ids=SPEC_IDS)
def test_on_detect_validation_lists_valid_values(kind: str, spec: dict[str, Any]) -> None:
    with pytest.raises(SpecError, match=r"on_detect: 'restart' is not valid; valid values: "):
        build({**spec, "on_detect": "restart"})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=st.sampled_from(SPECS),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 3000),
    cuts=st.lists(st.integers(0, 3000), max_size=3),
)
def test_batch_equals_events_and_state_round_trip(
    case: tuple[str, dict[str, Any]], seed: int, n: int, cuts: list[int]
) -> None:
    kind, spec = case
    x = CASES[kind][1](np.random.default_rng(seed), n)
    batch = build(spec)
    got = batch.update_many(x)
    single = build(spec)
    ref = [d for v in x.tolist() for d in single.update(1, v, v * v)]
    assert got == ref
    assert batch.to_state() == single.to_state()
    assert batch.n_seen == n
    # detection contract
    for d in got:
        assert isinstance(d, Detection)
        assert d.detector == kind
        assert 0 <= d.index < n
        assert d.reset == (spec.get("on_detect", "reset") == "reset")
        assert d.direction in ("up", "down", "change")
        assert math.isfinite(d.statistic) and math.isfinite(d.threshold)
        json.dumps(d.to_dict(), allow_nan=False)
    assert [d.index for d in got] == sorted(d.index for d in got)
    # state: JSON-safe, exact round trip (orjson and json), identical continuation
    pieces = build(spec)
    out = []
    bounds = [0, *sorted(c % (n + 1) for c in cuts), n]
    for lo, hi in itertools.pairwise(bounds):
        out.extend(pieces.update_many(x[lo:hi]))
        state = pieces.to_state()
        text = json.dumps(state, allow_nan=False)
        assert orjson.loads(orjson.dumps(state)) == json.loads(text) == state
        pieces = load(orjson.loads(orjson.dumps(state)))
    assert out == ref
    assert pieces.to_state() == single.to_state()


@pytest.mark.parametrize(("kind", "spec"), SPECS, ids=SPEC_IDS)
def test_state_loader_rejects_foreign_payloads(kind: str, spec: dict[str, Any]) -> None:
    det = build(spec)
    det.update_many(CASES[kind][1](np.random.default_rng(0), 500))
    state = det.to_state()
    cls = type(det)
    with pytest.raises(StateError, match="schema"):
        cls.from_state({**state, "schema": 99})  # type: ignore[attr-defined]
    other = "adwin" if kind != "adwin" else "cusum"
    with pytest.raises(StateError, match="kind"):
        cls.from_state({**state, "kind": other})  # type: ignore[attr-defined]
    with pytest.raises(StateError, match="n_seen"):
        cls.from_state({**state, "n_seen": -1})  # type: ignore[attr-defined]
    assert load(state).to_state() == state


@pytest.mark.parametrize(("kind", "spec"), SPECS, ids=SPEC_IDS)
def test_non_finite_input_is_rejected(kind: str, spec: dict[str, Any]) -> None:
    det = build(spec)
    with pytest.raises(ValueError, match="values"):
        det.update_many([0.0, math.inf])
    with pytest.raises(ValueError, match="total"):
        det.update(3, math.nan, 1.0)
    with pytest.raises(ValueError, match="values"):
        det.update_many(np.zeros((2, 2)))
    assert det.n_seen == 0
