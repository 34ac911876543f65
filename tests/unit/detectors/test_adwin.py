"""ADWIN: river parity, batch == per-event, weighted ticks, state size."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detectors.adwin import ADWIN, ADWINSpec
from detectors.base import SpecError, StateError

river_drift = pytest.importorskip("river.drift")


def river_indices(stream: Sequence[float], **params: float) -> list[int]:
    det = river_drift.ADWIN(**params)
    out = []
    for i, v in enumerate(stream):
        det.update(v)
        if det.drift_detected:
            out.append(i)
    return out


def ours_batch(stream: np.ndarray | Sequence[float], **params: object) -> tuple[list[int], ADWIN]:
    det = ADWIN(ADWINSpec(**params))  # type: ignore[arg-type]
    return [d.index for d in det.update_many(stream)], det


def ours_scalar(stream: Sequence[float], **params: object) -> tuple[list[int], ADWIN]:
    det = ADWIN(ADWINSpec(**params))  # type: ignore[arg-type]
    out: list[int] = []
    for v in stream:
        out.extend(d.index for d in det.update(1, v))
    return out, det


def test_river_docstring_stream() -> None:
    rng = random.Random(12345)
    stream = rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000)
    expected = river_indices(stream)
    assert expected == [1023]  # river's documented result
    assert ours_batch(stream)[0] == expected
    assert ours_scalar(stream)[0] == expected


def _streams() -> dict[str, np.ndarray]:
    g = np.random.default_rng(2024)
    return {
        "gauss_mean_shift": np.concatenate(
            [g.normal(0, 1, 3000), g.normal(0.8, 1, 3000), g.normal(-0.5, 1, 3000)]
        ),
        "bernoulli_rate": np.concatenate(
            [g.random(5000) < 0.1, g.random(5000) < 0.3, g.random(5000) < 0.05]
        ).astype(float),
        "no_change": g.normal(5.0, 2.0, 40_000),
        "many_shifts": np.concatenate([g.normal(m, 1, 1500) for m in (0, 1, 0, 2, 0, -1, 0)]),
        "heavy_tail_offset": g.standard_t(2, 20_000) * 100 + 1e4,
    }


@pytest.mark.parametrize("name", sorted(_streams()))
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"clock": 1},
        {"delta": 0.05, "max_buckets": 2},
        {"clock": 7, "min_window_length": 3, "grace_period": 0, "max_buckets": 3},
    ],
    ids=["defaults", "clock1", "delta05_mb2", "clock7"],
)
def test_same_change_points_as_river(name: str, params: dict[str, float]) -> None:
    stream = _streams()[name]
    expected = river_indices(stream.tolist(), **params)
    got, det = ours_batch(stream, **params)
    assert got == expected
    assert det.n_detections == len(expected)
    if name != "no_change":
        assert expected, "the stream should contain detectable changes"


def test_scalar_path_equals_river_and_batch_state() -> None:
    stream = _streams()["many_shifts"]
    got_b, det_b = ours_batch(stream)
    got_s, det_s = ours_scalar(stream.tolist())
    assert got_b == got_s == river_indices(stream.tolist())
    assert det_b.to_state() == det_s.to_state()


@pytest.mark.parametrize("value", [3.25, 0.1, -7.77, 12345.678, 1e6 + 0.3])
def test_constant_stream_never_fires(value: float) -> None:
    det = ADWIN(ADWINSpec())
    assert det.update_many(np.full(100_000, value)) == []
    assert det.width == 100_000
    assert det.mean == pytest.approx(value, rel=1e-9)  # a running float sum
    assert det.variance == pytest.approx(0.0, abs=1e-6 * max(1.0, value * value))
    for _ in range(200):  # and as weighted ticks
        assert det.update(500, 500 * value, 500 * value**2) == []
    assert det.n_detections == 0


def test_state_is_logarithmic_in_width() -> None:
    det = ADWIN(ADWINSpec())
    det.update_many(np.random.default_rng(0).normal(size=200_000))
    assert det.width == 200_000
    levels = len(det.to_state()["levels"])
    assert levels <= math.ceil(math.log2(200_000 / 5)) + 2
    assert det.n_buckets <= 5 * levels
    assert len(orjson.dumps(det.to_state())) < 8000


def test_reset_and_continue_modes() -> None:
    g = np.random.default_rng(1)
    x = np.concatenate([g.normal(0, 1, 2000), g.normal(3, 1, 300)])
    reset = ADWIN(ADWINSpec(on_detect="reset"))
    d = reset.update_many(x)[0]
    assert d.reset and d.direction == "up" and d.detector == "adwin"
    assert d.detail["dropped"] > 0 and d.detail["width_after"] > 0
    assert d.detail["mean_kept"] > d.detail["mean_dropped"]
    assert d.statistic > d.threshold
    cont = ADWIN(ADWINSpec(on_detect="continue"))
    dc = cont.update_many(x)[0]
    assert not dc.reset and dc.index == d.index
    # continue keeps the recent sub-window; reset started from scratch at the detection
    assert cont.width > 0 and cont.width >= reset.width
    again = ADWIN(ADWINSpec(on_detect="continue"))
    again.update_many(x[: d.index + 1])
    assert again.width == int(dc.detail["width_after"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 4000),
    clock=st.sampled_from([1, 3, 32]),
    max_buckets=st.integers(2, 6),
    mwl=st.integers(1, 10),
    delta=st.sampled_from([0.002, 0.1, 0.5]),
    on_detect=st.sampled_from(["reset", "continue"]),
    cuts=st.lists(st.integers(0, 4000), max_size=4),
)
def test_batch_equals_event_by_event(
    seed: int,
    n: int,
    clock: int,
    max_buckets: int,
    mwl: int,
    delta: float,
    on_detect: str,
    cuts: list[int],
) -> None:
    g = np.random.default_rng(seed)
    x = g.normal(0, 1, n) + np.where(np.arange(n) > n // 2, g.normal(0, 3), 0.0)
    spec = ADWINSpec(
        delta=delta,
        clock=clock,
        max_buckets=max_buckets,
        min_window_length=mwl,
        grace_period=int(g.integers(0, 50)),
        on_detect=on_detect,
    )
    whole = ADWIN(spec)
    got = whole.update_many(x)
    single = ADWIN(spec)
    ref = [d for v in x.tolist() for d in single.update(1, v)]
    assert got == ref
    assert whole.to_state() == single.to_state()
    # arbitrary batch boundaries with an orjson round trip at each boundary
    pieces = ADWIN(spec)
    out = []
    bounds = [0, *sorted(c % (n + 1) for c in cuts), n]
    for lo, hi in itertools.pairwise(bounds):
        out.extend(pieces.update_many(x[lo:hi]))
        pieces = ADWIN.from_state(orjson.loads(orjson.dumps(pieces.to_state())))
    assert out == ref
    assert pieces.to_state() == single.to_state()


def test_weighted_ticks_keep_exact_window_statistics() -> None:
    g = np.random.default_rng(7)
    det = ADWIN(ADWINSpec(clock=32))
    raw = []
    for _ in range(300):
        k = int(g.integers(1, 60))
        chunk = g.normal(10.0, 2.0, k)
        raw.append(chunk)
        assert det.update(k, float(chunk.sum()), float((chunk**2).sum())) == []
    allx = np.concatenate(raw)
    assert det.width == len(allx) == det.n_seen
    assert det.mean == pytest.approx(allx.mean(), rel=1e-12)
    assert det.variance == pytest.approx(allx.var(), rel=1e-9)
    assert det.n_buckets <= 5 * (math.log2(300) + 2)


def test_weighted_ticks_detect_a_shift_at_tick_boundaries() -> None:
    g = np.random.default_rng(11)
    det = ADWIN(ADWINSpec())
    found = []
    for t in range(400):
        chunk = g.normal(0.0 if t < 200 else 1.0, 1.0, 50)
        found += det.update(50, float(chunk.sum()), float((chunk**2).sum()))
    assert found, "a 1-sigma shift over 10,000 events must be found"
    first = found[0]
    assert 200 * 50 <= first.index < 215 * 50
    assert (first.index + 1) % 50 == 0  # alarms fall on tick boundaries


def test_single_event_tick_equals_per_event_update() -> None:
    g = np.random.default_rng(3)
    x = g.normal(0, 1, 3000)
    a, b = ADWIN(ADWINSpec()), ADWIN(ADWINSpec())
    for v in x.tolist():
        assert a.update(1, v) == b.update(1, v, v * v)
    assert a.to_state() == b.to_state()


def test_update_validation_names_fields() -> None:
    det = ADWIN(ADWINSpec())
    with pytest.raises(ValueError, match="total_sq"):
        det.update(10, 5.0)
    with pytest.raises(ValueError, match="count"):
        det.update(2.5, 5.0, 20.0)
    with pytest.raises(ValueError, match="values"):
        det.update_many([1.0, float("nan")])
    assert det.update(0, 0.0) == [] and det.n_seen == 0


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("delta", 0.0, "delta"),
        ("clock", 0, "clock"),
        ("max_buckets", 1, "max_buckets"),
        ("min_window_length", 0, "min_window_length"),
        ("grace_period", -1, "grace_period"),
        ("on_detect", "drop", "valid values: 'reset', 'continue'"),
    ],
)
def test_spec_validation(field: str, value: object, needle: str) -> None:
    with pytest.raises(SpecError, match=needle):
        ADWINSpec(**{field: value})  # type: ignore[arg-type]


def test_from_state_rejects_inconsistent_payloads() -> None:
    det = ADWIN(ADWINSpec())
    det.update_many(np.arange(100.0))
    state = det.to_state()
    with pytest.raises(StateError, match="width"):
        ADWIN.from_state({**state, "width": state["width"] + 1})
    with pytest.raises(StateError, match="kind"):
        ADWIN.from_state({**state, "kind": "cusum"})
    with pytest.raises(StateError, match="tick"):
        ADWIN.from_state({**state, "tick": 32})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    ops=st.lists(st.tuples(st.booleans(), st.integers(1, 700)), min_size=1, max_size=12),
    clock=st.sampled_from([1, 4, 32]),
)
def test_ticks_mixed_with_batches(seed: int, ops: list[tuple[bool, int]], clock: int) -> None:
    """Weighted buckets from ticks merge with batch events exactly as with per-event updates."""
    g = np.random.default_rng(seed)
    spec = ADWINSpec(clock=clock, delta=0.2, max_buckets=3, on_detect="continue")
    fast, slow = ADWIN(spec), ADWIN(spec)
    got: list[object] = []
    ref: list[object] = []
    for is_tick, k in ops:
        x = g.normal(g.normal(0, 2), 1.0, k)
        if is_tick:
            args = (k, float(x.sum()), float((x**2).sum()))
            got += fast.update(*args)
            ref += slow.update(*args)
        else:
            got += fast.update_many(x)
            ref += [d for v in x.tolist() for d in slow.update(1, v)]
    assert got == ref
    assert fast.to_state() == slow.to_state()
