"""Two incident scenarios through the real worker on the real Kafka + Redis.

tests/integration/test_worker_e2e.py covers the scale break (data quality), the concept
flip (kill switch) and the release. This module adds the two cases it does not cover:

* **gradual covariate shift**: ``amount``'s mean drifts upward linearly over 180 s of event
  time (+0 → +1.4 σ of the reference) while every other feature stays put → a
  ``covariate_drift`` alert naming ``amount`` and ``v1`` within :data:`SHIFT_MAX_EVENTS`
  events after the drift starts, no alert of any kind before it, and no covariate alert
  naming another feature;
* **cost triples after a version change**: v1 costs $0.20 per 1k requests (budget $0.50),
  v2 from :data:`COST_V2_AT` costs 3× → a ``cost`` alert naming ``v2`` within
  :data:`COST_MAX_EVENTS` v2 events, and none for ``v1``.

Events come from seeded generators built on ``stream.scenario``'s fraud model (features,
scores, regions); the monitors are ``stream.scenario.MONITORS_YAML`` without labels
(``label_horizon: 0``) or kill-switch rules, with an inline profile of the scenario's
seeded reference snapshot. Each test has its own topics, consumer groups and Redis prefix.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Final

import numpy as np
import pytest
import yaml

from stream.config import MonitorConfig, load_config_text
from stream.profile import Profile, build_profile
from stream.scenario import CHANNELS, MONITORS_YAML, REGIONS, reference_rows
from stream.scenario import _country as scenario_country
from stream.scenario import _features as scenario_features
from stream.scenario import _score as scenario_score
from stream.worker import Worker
from tests.fixtures.services import TopicFactory
from tests.fixtures.worker_harness import TopicReader, WorkerEnv, counted, make_env, produce, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

RATE: Final = 200.0  # predictions per second of event time
SHIFT_AT: Final = 60.0  # s: amount's mean starts drifting
SHIFT_END: Final = 240.0  # s: end of the stream (the drift keeps growing until then)
SHIFT_PER_S: Final = 120.0 / 180.0  # $ per s: +120 $ (≈1.4 reference σ) after 180 s
SHIFT_MAX_EVENTS: Final = 15_000
"""Stated bound, derived, not fitted: the reference σ of ``amount`` (gamma(2, 60)) is ≈85 $,
so the drift passes the mean CUSUM's design shift (k = 0.5 σ ≈ 42 $) after ≈64 s; from
there the CUSUM's excess grows quadratically (200 events/s × 0.0079 σ/s) and crosses its
ARL0 = 10^8 threshold (h ≈ 17) within ≈5 s. 75 s of drift = 15,000 events."""
COST_V2_AT: Final = 60.0
COST_END: Final = 150.0
COST_V1: Final = 0.0002  # $ per request → $0.20 per 1k; budget $0.50
COST_MAX_EVENTS: Final = 2000
"""Stated bound: 10 s of v2 traffic (the budget needs min_count=200 requests and sustain=3
evaluations; a 30-tick window of v2 alone is over budget from its first tick)."""


@pytest.fixture
def env(
    kafka_bootstrap: str, redis_url: str, topic_factory: TopicFactory, unique_id: str
) -> WorkerEnv:
    return make_env(kafka_bootstrap, redis_url, topic_factory, unique_id, "scn")


@pytest.fixture(scope="module")
def monitors() -> tuple[MonitorConfig, Profile]:
    """The scenario's fraud monitors without labels or kill-switch rules, inline profile."""
    raw = yaml.safe_load(MONITORS_YAML)
    model = raw["models"]["fraud"]
    model.pop("reference")
    model.pop("kill_switch")
    model["label_horizon"] = 0
    base = load_config_text(yaml.safe_dump(raw), "scenarios.yaml")
    rows = reference_rows()
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    doc = build_profile(cols, base.models["fraud"], source="scenario.reference_rows", progress=None)
    model["reference"] = doc
    cfg = load_config_text(yaml.safe_dump(raw), "scenarios.yaml")
    return cfg, Profile.from_dict(doc)


def traffic(
    seed: int,
    start: float,
    duration: float,
    *,
    amount_shift: Callable[[np.ndarray], np.ndarray] | None = None,
    version: Callable[[np.ndarray], np.ndarray] | None = None,
    cost_factor: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """Seeded fraud predictions over ``duration`` s of event time from ``start``.

    ``amount_shift(t)`` adds to ``amount``; ``version(t)`` is True where the event is v2;
    ``cost_factor(t)`` multiplies the cost per request. ``t`` = seconds after ``start``.
    """
    rng = np.random.default_rng(seed)
    n = int(RATE * duration)
    t = np.sort(rng.uniform(0.0, duration, size=n))
    f = scenario_features(rng, n)
    if amount_shift is not None:
        f["amount"] = np.round(f["amount"] + amount_shift(t), 2)
    s = scenario_score(f)
    v2 = version(t) if version is not None else np.zeros(n, dtype=bool)
    factor = cost_factor(t) if cost_factor is not None else np.ones(n)
    cost = COST_V1 * factor * rng.uniform(0.8, 1.2, size=n)
    latency = rng.gamma(4.0, 20.0, size=n)
    out: list[dict[str, Any]] = []
    for i in range(n):
        out.append(
            {
                "event_id": f"p-{seed}-{i:07d}",
                "model_id": "fraud",
                "model_version": "v2" if v2[i] else "v1",
                "request_id": f"req-{seed}-{i:07d}",
                "ts": round(start + float(t[i]), 3),
                "features": {
                    "amount": float(f["amount"][i]),
                    "merchant_risk": round(float(f["merchant_risk"][i]), 4),
                    "seller_quality_score": round(float(f["seller_quality_score"][i]), 4),
                    "account_age_days": None
                    if f["missing_age"][i]
                    else float(f["account_age_days"][i]),
                    "country": scenario_country(f, i),
                    "channel": CHANNELS[int(f["channel"][i])],
                },
                "prediction": int(s[i] > 0.5),
                "score": round(float(s[i]), 5),
                "latency_ms": round(float(latency[i]), 2),
                "cost_usd": round(float(cost[i]), 8),
                "slice": {"region": REGIONS[int(f["region"][i])]},
            }
        )
    return out


def _run(
    env: WorkerEnv, cfg: MonitorConfig, profile: Profile, preds: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every prediction through the worker; returns all alerts once stage 2 applied every
    summary (all ticks closed by the worker's idle flush)."""

    async def main() -> list[dict[str, Any]]:
        worker = Worker(
            cfg, env.settings(web_bind=""), env.opts(), profiles={"fraud": profile}
        )  # no HTTP server needed here
        await worker.start()
        alerts = TopicReader(env.bootstrap, env.topics.alerts)
        summaries = TopicReader(env.bootstrap, env.topics.summaries)
        try:
            await asyncio.wait_for(worker.wait_assigned(), 60)
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            await loop.run_in_executor(None, produce, env, [("prediction", p) for p in preds])
            await until("every prediction in the summaries",
                        lambda: counted(summaries.values)[0] == len(preds), 60,
                        summaries.poll)  # fmt: skip
            n_summaries = len({s["summary_id"] for s in summaries.values})
            await until(
                "stage 2 to apply every summary",
                lambda: worker.stats.counters["summaries_in"] >= n_summaries,
                30,
            )
            await loop.run_in_executor(None, alerts.poll, 1.0)
            print(f"\n{len(preds)} predictions → {n_summaries} summaries → "
                  f"{len(alerts.values)} alerts in {time.perf_counter() - t0:.1f} s")  # fmt: skip
            assert worker.stats.counters["events_rejected"] == 0
            assert worker.stats.counters["ingest_batch_errors"] == 0
            assert worker.stats.counters["detect_batch_errors"] == 0
            return list(alerts.values)
        finally:
            alerts.close()
            summaries.close()
            await worker.stop()

    return asyncio.run(main())


def _events_between(preds: list[dict[str, Any]], t0: float, t1: float, version: str) -> int:
    return sum(1 for p in preds if t0 <= p["ts"] < t1 and p["model_version"] == version)


# --------------------------------------------------------------------------- (b) covariate


def test_gradual_covariate_shift_of_one_feature(
    env: WorkerEnv, monitors: tuple[MonitorConfig, Profile]
) -> None:
    cfg, profile = monitors
    start = float(int(time.time() - SHIFT_END - 60.0))
    preds = traffic(
        21,
        start,
        SHIFT_END,
        amount_shift=lambda t: np.clip(t - SHIFT_AT, 0.0, None) * SHIFT_PER_S,
    )
    alerts = _run(env, cfg, profile, preds)
    drift_at = start + SHIFT_AT
    early = [a for a in alerts if a["detected_at"] < drift_at]
    assert early == [], f"alerts before the drift started: {early}"
    covariate = [a for a in alerts if a["kind"] == "covariate_drift"]
    others = sorted({a.get("feature") for a in covariate} - {"amount"}, key=str)
    assert others == [], f"covariate alerts on features that did not move: {others}"
    amount = sorted(
        (a for a in covariate if a.get("feature") == "amount" and a["model_version"] == "v1"),
        key=lambda a: a["detected_at"],
    )
    assert amount, f"no covariate_drift alert for amount; got {alerts}"
    first = amount[0]
    delay = _events_between(preds, drift_at, first["detected_at"], "v1")
    print(f"first amount alert: {first['detector']} {first['severity']} after {delay} events "
          f"({first['detected_at'] - drift_at:.0f} s of drift); detectors "
          f"{sorted({a['detector'] for a in amount})}")  # fmt: skip
    assert delay <= SHIFT_MAX_EVENTS, f"{delay} events after the drift started"
    assert first["statistic"] > first["threshold"]


# --------------------------------------------------------------------------- (d) cost


def test_cost_per_request_triples_after_a_version_change(
    env: WorkerEnv, monitors: tuple[MonitorConfig, Profile]
) -> None:
    cfg, profile = monitors
    budget = cfg.models["fraud"].budgets.cost_usd_per_1k
    assert budget is not None and 1000 * COST_V1 < budget < 3000 * COST_V1
    start = float(int(time.time() - COST_END - 60.0))
    preds = traffic(
        23,
        start,
        COST_END,
        version=lambda t: t >= COST_V2_AT,
        cost_factor=lambda t: np.where(t >= COST_V2_AT, 3.0, 1.0),
    )
    alerts = _run(env, cfg, profile, preds)
    cost = [a for a in alerts if a["kind"] == "cost"]
    v1 = [a for a in cost if a["model_version"] == "v1"]
    assert v1 == [], f"cost alerts for the old version: {v1}"
    v2 = sorted((a for a in cost if a["model_version"] == "v2"), key=lambda a: a["detected_at"])
    assert v2, f"no cost alert for v2; got {alerts}"
    first = v2[0]
    switch_at = start + COST_V2_AT
    delay = _events_between(preds, switch_at, first["detected_at"], "v2")
    print(f"first v2 cost alert: {first['severity']} ${first['statistic']:.3f}/1k vs "
          f"${first['threshold']:.2f} after {delay} v2 events")  # fmt: skip
    assert first["detected_at"] >= switch_at
    assert delay <= COST_MAX_EVENTS, f"{delay} v2 events after the version change"
    assert first["detector"] == "cost_per_1k"
    assert budget < first["statistic"] < 2 * budget and first["severity"] == "warn"
    assert [a for a in alerts if a["detected_at"] < switch_at] == []
