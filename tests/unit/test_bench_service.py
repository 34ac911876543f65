"""load_tests.bench_service's pure parts: latency bookkeeping, percentiles, CPU accounting,
the monitor file the worker processes load, the real-time event pool, batching variants.

No speed is asserted (speed belongs in load_tests/results/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from load_tests.bench_service import (
    CpuSnap,
    EventPool,
    alert_latencies,
    batch_env,
    cpu_between,
    percentiles,
    projection,
    stage_split,
    write_monitors,
)
from stream.config import load_config
from stream.events import Decoder


def test_percentiles_nearest_rank() -> None:
    p = percentiles([3.0, 1.0, 2.0, 10.0])
    assert (p["n"], p["min"], p["p50"], p["p90"], p["p99"], p["max"]) == (
        4,
        1.0,
        2.0,
        10.0,
        10.0,
        10.0,
    )
    assert percentiles([])["p99"] is None


def test_alert_latency_uses_the_window_end_tick_and_the_models_last_production() -> None:
    rows: list[tuple[float, float, dict[str, Any]]] = [
        (12.5, 12.6, {"model_id": "m1", "window": {"end": 11.0}, "kind": "data_quality",
                      "detector": "quality.out_of_range", "feature": "f"}),
        (13.0, 13.1, {"model_id": "m2", "window": {"end": 11.0}, "kind": "k", "detector": "d"}),
        (14.0, 14.2, {"model_id": "m1", "detected_at": 13.0, "kind": "k", "detector": "d"}),
    ]  # fmt: skip
    last = {("m1", 10): 10.9, ("m2", 10): 10.5, ("m1", 12): 12.95, ("m1", 11): 11.9}
    out = alert_latencies(rows, last, 1.0)
    assert [x["tick"] for x in out] == [10, 10, 12]
    assert [x["latency_s"] for x in out] == [1.6, 2.5, 1.05]
    assert out[2]["receive_latency_s"] == pytest.approx(1.25)
    assert alert_latencies(rows[:1], {}, 1.0)[0]["latency_s"] is None


def test_stage_split_uses_the_last_partitions_summary_of_the_tick() -> None:
    lats = [
        {"model_id": "m", "tick": 7, "last_production": 7.9, "broker_ts": 9.0},
        {"model_id": "m", "tick": 8, "last_production": 8.9, "broker_ts": 10.0},  # no summary
        {"model_id": "n", "tick": 7, "last_production": None, "broker_ts": 9.0},
    ]
    summ = [
        (8.6, 0.0, {"model_id": "m", "tick": 7}),
        (8.4, 0.0, {"model_id": "m", "tick": 7}),
        (8.5, 0.0, {"model_id": "n", "tick": 7}),
    ]
    out = stage_split(lats, summ)
    assert [round(x, 3) for x in out["stage1"]] == [0.7]
    assert [round(x, 3) for x in out["stage2"]] == [0.4]
    assert [round(x, 3) for x in out["spread"]] == [0.2]


def test_cpu_between_splits_the_machine_and_normalises_per_100k_events() -> None:
    a = CpuSnap(0.0, {"workers#a": 1.0, "workers#b": 2.0, "kafka": 5.0, "gone": None}, 10.0, 0.0)
    b = CpuSnap(2.0, {"workers#a": 2.0, "workers#b": 2.5, "kafka": 5.5, "gone": 1.0}, 13.5, 0.5)
    out = cpu_between(a, b, 50_000)
    assert out["cpu_s"] == {"workers": 1.5, "kafka": 0.5, "rest_of_machine": 1.5, "idle": 0.5}
    assert out["cores_used"] == {"workers": 0.75, "kafka": 0.25}
    assert out["cpu_s_per_100k_events"] == {"workers": 3.0, "kafka": 1.0}
    assert out["machine_busy_fraction"] == 0.875


def test_projection_is_capped_by_the_single_threaded_redis() -> None:
    p = projection({"workers": 1.0, "kafka": 0.2, "redis": 0.1})
    assert p["per_worker_core_events_per_s"] == 100_000
    assert p["n_workers"]["2"]["events_per_s"] == 200_000
    assert p["n_workers"]["16"]["events_per_s"] == 1_000_000  # Redis: 100k / 0.1 s
    assert p["n_workers"]["1"]["cores_needed_total"] == 1.3
    assert projection({}) == {}


def test_monitor_file_loads_with_every_model(tmp_path: Path) -> None:
    path = tmp_path / "monitors.json"
    write_monitors(path, 7, 10, "0")
    cfg = load_config(path)
    assert sorted(cfg.models) == [f"m{i:02d}" for i in range(7)]
    assert all(m.reference_inline is not None for m in cfg.models.values())


def test_event_pool_renders_valid_events_and_broken_ones_out_of_range() -> None:
    pool = EventPool.build(n=50, seed=3)
    assert len(pool.healthy) == len(pool.broken) == 50
    ev = b'{"event_id":"e%d","model_id":"m00","model_version":"v1","request_id":"r1","ts":5.0,'
    dec = Decoder("prediction", frozenset({"m00"}), max_future_s=float("inf"))
    body = b",".join(ev % i + x for i, x in enumerate(pool.healthy))
    good, bad = dec.decode(b"[" + body + b"]", 10.0)
    assert len(good) == 50 and bad == []
    sq = [orjson.loads(ev % 0 + x)["features"]["seller_quality_score"] for x in pool.broken]
    assert sum(v > 1.0 for v in sq) > 40  # 0-1 values sent on 0-100


def test_batch_variant_names() -> None:
    assert batch_env("records-1MiB") == {"DRIFTLINE_FETCH_PARTITION_BYTES": str(1 << 20)}
    with pytest.raises(ValueError, match="valid form"):
        batch_env("huge")
