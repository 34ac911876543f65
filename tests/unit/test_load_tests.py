"""The load-test harness: seeded generator, valid ~400-byte events, benchmark JSON shapes.

No speed is asserted here (speed belongs in the benchmarks' JSON results).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from load_tests import bench_consume, bench_stage1
from load_tests.common import RateMeter, ratio, summarize_runs
from load_tests.generator import (
    SDK_BATCH_EVENTS,
    GenConfig,
    feature_set,
    generate,
    messages,
    monitor_config,
)
from load_tests.scenarios import SCENARIOS, get_scenario
from stream.events import Decoder, Label, Prediction

NOW = 2_000_000_000.0


def _decode_all(values: list[bytes], kind: str, models: frozenset[str]) -> list[Any]:
    dec = Decoder(kind, models, max_future_s=float("inf"))  # type: ignore[arg-type]
    out: list[Any] = []
    for v in values:
        ok, bad = dec.decode(v, NOW)
        assert bad == [], bad[:3]
        out.extend(ok)
    return out


def test_generator_is_seeded_and_deterministic() -> None:
    cfg = GenConfig(n_events=600, seed=5, models=3, label_fraction=0.5)
    a, b = generate(cfg), generate(cfg)
    assert a.predictions == b.predictions
    assert a.labels == b.labels
    c = generate(GenConfig(n_events=600, seed=6, models=3, label_fraction=0.5))
    assert c.predictions != a.predictions
    assert a.n_events == pytest.approx(600, abs=40)
    assert 150 < len(a.labels) < 250  # about half of the ~400 predictions


def test_events_validate_and_are_about_400_bytes() -> None:
    cfg = GenConfig(n_events=1500, seed=2, models=4, versions=2, label_fraction=0.3)
    gen = generate(cfg)
    models = frozenset(f"m{i:02d}" for i in range(4))
    preds = _decode_all(gen.predictions, "prediction", models)
    labels = _decode_all(gen.labels, "label", models)
    assert len(preds) == len(gen.predictions) and len(labels) == len(gen.labels)
    assert all(type(p) is Prediction for p in preds)
    assert all(type(lab) is Label for lab in labels)
    sizes = [len(v) for v in gen.predictions]
    assert 360 <= float(np.mean(sizes)) <= 440
    num, cat = feature_set(10)
    assert (len(num), len(cat)) == (8, 2)
    p0 = preds[0]
    assert set(p0.features) == {f.name for f in num} | {c.name for c in cat}
    assert all(isinstance(p0.features[f.name], int | float) for f in num)
    assert all(isinstance(p0.features[c.name], str) for c in cat)
    assert p0.score is not None and p0.latency_ms is not None and p0.cost_usd is not None
    assert p0.slice is not None and set(p0.slice) == {"region"}
    assert {p.model_id for p in preds} == models
    assert {p.model_version for p in preds} == {"v1", "v2"}
    # labels come after their prediction and refer to a generated request
    by_rid = {p.request_id: p.ts for p in preds}
    assert all(lab.request_id in by_rid and lab.ts > by_rid[lab.request_id] for lab in labels)


@pytest.mark.parametrize("epm", [1, 7, SDK_BATCH_EVENTS])
def test_messages_pack_events_and_keep_them_all(epm: int) -> None:
    gen = generate(GenConfig(n_events=1200, seed=3, label_fraction=0.2))
    msgs = messages(gen, events_per_message=epm, partitions=3)
    assert sum(m.n_events for m in msgs) == gen.n_events
    assert all(m.n_events <= epm for m in msgs)
    assert {m.partition for m in msgs} <= {0, 1, 2}
    if epm == 1:
        assert all(m.value.startswith(b"{") for m in msgs)
    else:
        assert any(m.value.startswith(b"[") for m in msgs)
    models = frozenset({"m00"})
    pred_vals = [m.value for m in msgs if m.kind == "prediction"]
    decoded = _decode_all(pred_vals, "prediction", models)
    assert sorted(p.event_id for p in decoded) == sorted(
        orjson.loads(v)["event_id"] for v in gen.predictions
    )
    # arrival order: messages sorted by their first event's time
    firsts = [m.first_ts for m in msgs]
    assert firsts == sorted(firsts)


def test_sdk_batch_default_matches() -> None:
    sdk = pytest.importorskip("stream.sdk")
    default = inspect.signature(sdk.DriftlineProducer).parameters["batch_events"].default
    assert default == SDK_BATCH_EVENTS


def test_scenarios_change_only_after_the_change_point() -> None:
    base = generate(GenConfig(n_events=2000, seed=9, scenario="stationary", change_at=0.5))
    half = len(base.predictions) // 2
    for name in ("scale_break", "covariate_shift", "cost_jump"):
        gen = generate(GenConfig(n_events=2000, seed=9, scenario=name, change_at=0.5))
        before = slice(0, half - 5)
        assert gen.predictions[before] == base.predictions[before], name
        after_a = [orjson.loads(v) for v in gen.predictions[half + 5 :]]
        after_b = [orjson.loads(v) for v in base.predictions[half + 5 :]]
        if name == "scale_break":
            assert max(e["features"]["seller_quality_score"] for e in after_a) > 1.0
            assert max(e["features"]["seller_quality_score"] for e in after_b) <= 1.0
        elif name == "covariate_shift":
            ma = np.mean([e["features"]["merchant_risk"] for e in after_a])
            mb = np.mean([e["features"]["merchant_risk"] for e in after_b])
            assert ma - mb > 0.1
        else:
            ca = np.mean([e["cost_usd"] for e in after_a])
            cb = np.mean([e["cost_usd"] for e in after_b])
            assert ca / cb == pytest.approx(10.0, rel=0.01)
    assert set(SCENARIOS) == {"stationary", "scale_break", "covariate_shift", "cost_jump"}
    with pytest.raises(ValueError, match="valid values: cost_jump, covariate_shift"):
        get_scenario("nope")


def test_monitor_config_uses_the_example_detector_settings() -> None:
    cfg, profiles = monitor_config(GenConfig(models=3, versions=2))
    assert sorted(cfg.models) == ["m00", "m01", "m02"]
    m = cfg.models["m01"]
    assert len(m.features) == 10
    assert m.detectors.psi_window_ticks == 60  # from examples/monitors.yaml
    assert m.budgets.cost_usd_per_1k == 0.5
    assert m.label_horizon_s == 3600.0
    assert profiles["m01"].model_id == "m01"
    off, _ = monitor_config(GenConfig(models=1), label_horizon=0)
    assert off.models["m00"].label_horizon_s == 0.0


def test_rate_meter_and_summaries() -> None:
    m = RateMeter(10)
    assert not m.add(4, 1)
    assert not m.add(5, 1)
    assert m.add(1, 1)
    r = m.result()
    assert r["events"] == 10 and r["messages"] == 3 and r["steady_events"] == 6
    assert m.events_90 == 9 and r["events_per_s_at_90pct"] is not None
    s = summarize_runs([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 3.0)
    assert ratio(1.0, 3.0) == 0.333 and ratio(1.0, 0.0) is None


def test_bench_stage1_tiny_writes_the_expected_json(tmp_path: Path) -> None:
    out = tmp_path / "stage1.json"
    assert bench_stage1.main(["--tiny", "--out", str(out)]) == 0
    doc = orjson.loads(out.read_bytes())
    assert {"machine", "config", "workload", "throughput", "profile", "memory", "e2e"} <= set(doc)
    assert set(doc["throughput"]) == {"memory", "memory+join"}
    for t in doc["throughput"].values():
        run = t["median_run"]
        assert run["events"] > 0 and t["events_per_s"]["median"] > 0
        assert set(run["phase_us_per_event"]) == {"process_raw", "snapshot", "commit", "absorb"}
    join = doc["throughput"]["memory+join"]["median_run"]["counts"]
    assert join["join_ops"] > 0 and join["pairs"] > 0
    prof = doc["profile"]
    assert prof["profiler"] in ("pyinstrument", "cprofile")
    assert sum(c["share"] for c in prof["centres"].values()) == pytest.approx(1.0, abs=0.01)
    assert "validation" in prof["centres"]
    mem = doc["memory"]
    assert mem["monitored_streams"] == mem["models"] * mem["features"]
    assert mem["detect_state_bytes"] > 0 and mem["summaries"] > 0
    assert "todo" in doc["e2e"]
    assert out.with_suffix(".md").read_text().startswith("# Stage 1")


def test_bench_consume_summary_shape() -> None:
    def run(eps: float) -> dict[str, Any]:
        return {
            "events_per_s": eps,
            "events_per_s_at_90pct": eps,
            "messages_per_s": eps / 10,
            "child_cpu_s": 1.0,
            "events": 1000,
        }

    results: dict[str, Any] = {
        "config": {"events": 1000, "partitions": 1, "reps": 2, "mean_event_bytes": 415.0},
        "machine": {"cpu_count": 2, "loadavg_at_start": [1.0, 1.0, 1.0]},
        "services": {"kafka_source": "test"},
        "layouts": {
            "1": {"runs": {"aiokafka": [run(100.0), run(300.0)], "faust_take": [run(20.0)]}}
        },
    }
    bench_consume._aggregate(results)
    s = results["layouts"]["1"]["summary"]
    assert s["aiokafka"]["events_per_s"]["median"] == 200.0
    assert s["faust_take"]["ratio_to_aiokafka"] == 0.1
    assert set(s["faust_take"]) == {
        "events_per_s",
        "events_per_s_at_90pct",
        "messages_per_s",
        "cpu_us_per_event",
        "ratio_to_aiokafka",
    }
    md = bench_consume.markdown(results)
    assert "| 1 | faust_take | 20 | 20 | 2 |" in md
