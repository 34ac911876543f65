"""Metrics end to end: Kafka → real worker → its own ``/metrics`` → real Prometheus.

The seeded scenario (plus a few malformed messages) runs through a real worker on the
session's Kafka and Redis; a real Prometheus scrapes the worker's ``/metrics`` endpoint
(nothing attached from outside) with the shipped alert rules loaded. Then every expression
of the Grafana dashboard returns data, every alert rule evaluates without error (health
``ok``) and every metric the rules read exists, the kill-switch alert fires for the
scenario's concept flip, and no other driftline alert is firing on this healthy run.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer

from stream.demo import demo_config
from stream.scenario import END, generate
from stream.worker import Worker
from tests.fixtures.services import PrometheusFactory, PrometheusHandle, TopicFactory
from tests.fixtures.worker_harness import interleaved, make_env, produce

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "k8s" / "monitoring" / "driftline-rules.yaml"
DASHBOARD = ROOT / "k8s" / "monitoring" / "grafana-dashboard.json"
BAD_MESSAGES = 40


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    subst = {"$__rate_interval": "1m", "$model": "fraud", "$version": ".*"}
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in doc["annotations"]["list"] if "expr" in a]
    for v in doc["templating"]["list"]:
        if v["type"] == "query":
            mt = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["definition"])
            assert mt
            exprs.append(mt.group(1))
    for raw in exprs:
        e = raw
        for k in sorted(subst, key=len, reverse=True):
            e = e.replace(k, subst[k])
        yield raw, e


def rule_metric_names() -> set[str]:
    names: set[str] = set()
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for r in g["rules"]:
            body = re.sub(r'"(?:[^"\\]|\\.)*"', '""', r["expr"])
            names |= set(re.findall(r"\b(driftline_[a-z_]+|up)\b(?!\s*\()", body))
    return names


def rule_exprs() -> dict[str, str]:
    return {
        r["alert"]: r["expr"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }


def rule_health(prom: PrometheusHandle) -> dict[str, tuple[str, str]]:
    """``alert name -> (health, lastError)`` of every loaded rule, once each was evaluated."""
    deadline = time.monotonic() + 30
    while True:
        status, body = prom.client._http("/api/v1/rules")
        assert status == 200, body
        got = {
            r["name"]: (r["health"], r.get("lastError", ""))
            for g in json.loads(body)["data"]["groups"]
            for r in g["rules"]
        }
        if set(got) >= set(rule_exprs()) and all(h != "unknown" for h, _ in got.values()):
            return got
        if time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def produce_bad(bootstrap: str, topic: str) -> None:
    p = Producer({"bootstrap.servers": bootstrap})
    for i in range(BAD_MESSAGES):
        p.produce(topic, key=f"bad-{i}".encode(), value=b"{not json" if i % 2 else b"[1, 2]")
    assert p.flush(30) == 0


def wait(prom: PrometheusHandle, what: str, expr: str, ok: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = prom.query(expr)
        if last and ok(last):
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}: {expr} -> {last}")


def test_metrics_end_to_end(
    kafka_bootstrap: str,
    redis_url: str,
    topic_factory: TopicFactory,
    unique_id: str,
    prometheus: PrometheusFactory,
) -> None:
    env = make_env(kafka_bootstrap, redis_url, topic_factory, unique_id, "met")
    cfg, profile = demo_config()
    preds, labels = generate(rate=100.0, seed=11, start=time.time() - END - 120.0)
    settings = env.settings()
    opts = env.opts(metrics_interval_s=0.5)
    worker = Worker(cfg, settings, opts, profiles={"fraud": profile})

    async def main() -> None:
        await worker.start()
        try:
            loop = asyncio.get_running_loop()
            prom = await loop.run_in_executor(
                None,
                lambda: prometheus(
                    [f"127.0.0.1:{worker.web_port}"], scrape_interval="1s", rule_files=[RULES]
                ),
            )
            await asyncio.wait_for(worker.wait_assigned(), 60)
            # the zero-valued series must be scraped before the first increments, or
            # increase() misses them (the scenario trips the kill switch within seconds)
            await loop.run_in_executor(None, prom.wait_for, "driftline_ready == 1", 60)
            await loop.run_in_executor(None, produce_bad, kafka_bootstrap, env.topics.predictions)
            await loop.run_in_executor(None, produce, env, interleaved(preds, labels))
            await loop.run_in_executor(None, check, prom, len(preds), len(labels))
        finally:
            await worker.stop()

    asyncio.run(main())


def check(prom: PrometheusHandle, n_preds: int, n_labels: int) -> None:
    wait(
        prom,
        "every prediction counted",
        "sum(driftline_predictions_total)",
        lambda r: float(r[0]["value"][1]) == n_preds,
        180,
    )
    wait(
        prom,
        "every label counted",
        'sum(driftline_labels_total{model="fraud"})',
        lambda r: float(r[0]["value"][1]) == n_labels,
        60,
    )
    # half the bad messages are not JSON (1 rejection each), half are a JSON array of two
    # non-objects (2 rejections each: an array carries several events)
    by_reason = {
        r["metric"]["reason"]: float(r["value"][1])
        for r in prom.query("driftline_events_rejected_total > 0")
    }
    assert by_reason == {"not_json": BAD_MESSAGES / 2, "not_object": BAD_MESSAGES}
    firing = wait(
        prom,
        "the kill-switch alert",
        'ALERTS{alertname="DriftlineKillSwitchActive", alertstate="firing"}',
        lambda r: True,
        60,
    )
    assert {(a["metric"]["model"], a["metric"]["action"]) for a in firing} == {
        ("fraud", "rollback")
    }
    time.sleep(3)  # a few more scrapes: every rate() has two samples
    empty = []
    for _, expr in dashboard_exprs():
        got = prom.query(f"max_over_time(({expr})[10m:1s])")
        if not got:
            empty.append(expr)
    assert not empty, "dashboard expressions without data:\n" + "\n".join(empty)
    for name in sorted(rule_metric_names()):
        assert prom.query(f"count({name})"), f"rule metric {name} has no series"
    # every rule evaluated without error; the rules that must return nothing on this
    # healthy run are evaluated directly too (an instant query fails on a bad expression)
    rules = rule_health(prom)
    assert rules and all(h == "ok" for h, _ in rules.values()), rules
    for name, expr in rule_exprs().items():
        result = prom.query(expr)
        if name == "DriftlineKillSwitchActive":
            assert result, f"{name}: {expr} returned nothing"
    # nothing else fires on this healthy run (DriftlineCheckpointSlow may be *pending*:
    # catch-up batches of ~20k join ops take 0.25-0.5 s per checkpoint)
    others = [
        a["metric"]["alertname"]
        for a in prom.query('ALERTS{alertname=~"Driftline.*", alertstate="firing"}')
        if a["metric"]["alertname"] != "DriftlineKillSwitchActive"
    ]
    assert others == [], others
