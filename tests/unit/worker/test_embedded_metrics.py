"""``EmbeddedRunner(metrics=...)`` feeds :class:`stream.metrics.Metrics` like the worker.

The seeded scenario runs through the embedded service twice, with and without metrics:
the metrics change nothing in what is published, and every counter agrees with what the
run produced (events, summaries, alerts, commands, joins, checkpoints, published
messages), the gauges end where the run ended (no lag, the kill switch tripped and then
released, the join buffer's size).
"""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry

from stream.demo import demo_config
from stream.embedded import EmbeddedRunner, RunResult
from stream.metrics import Metrics
from stream.scenario import END, START, generate
from tests.fixtures.embedded_feed import Feed


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    """Sum of the samples ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for fam in reg.collect()
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _run(metrics: Metrics | None) -> tuple[EmbeddedRunner, RunResult, list[dict[str, Any]]]:
    cfg, profile = demo_config()
    preds, labels = generate(rate=40.0, seed=5, start=START)
    runner = EmbeddedRunner(cfg, {"fraud": profile}, batch_size=500, metrics=metrics)

    async def main() -> list[dict[str, Any]]:
        await runner.start()
        step = 5.0
        feed = Feed(preds, labels)
        t = START
        while t < START + END:
            t += step
            feed.produce_before(runner, t)
            await runner.drain(now=t)
        runner.produce_raw(runner.topics.predictions, b"bad", b"{not json")
        await runner.finish(START + END + 60.0)
        release = await runner.manual("fraud", "release", START + END + 61.0)
        runner.report()
        return [release]

    manual = asyncio.run(main())
    return runner, runner.result, manual


def test_embedded_runner_feeds_the_metrics_like_the_worker() -> None:
    cfg, _ = demo_config()
    plain_runner, plain, _ = _run(None)
    reg = CollectorRegistry()
    runner, res, manual = _run(Metrics(cfg, reg, plans=plain_runner.plans))
    # metrics observe, they change nothing
    assert [a["alert_id"] for a in res.alerts] == [a["alert_id"] for a in plain.alerts]
    assert [c["command_id"] for c in res.commands] == [c["command_id"] for c in plain.commands]
    assert res.summaries == plain.summaries and res.commits == plain.commits

    preds, labels = generate(rate=40.0, seed=5, start=START)
    assert res.accepted == len(preds) + len(labels)
    assert _value(reg, "driftline_events_accepted_total") == res.accepted
    assert _value(reg, "driftline_events_rejected_total", reason="not_json") == 1
    assert _value(reg, "driftline_predictions_total", model="fraud") == len(preds)
    assert _value(reg, "driftline_labels_total", model="fraud") == len(labels)
    assert _value(reg, "driftline_label_join_ops_total", op="park") == len(preds)
    assert _value(reg, "driftline_label_join_ops_total", op="label") == len(labels)
    joined = _value(reg, "driftline_label_join_total", outcome="joined")
    early = _value(reg, "driftline_label_join_total", outcome="early")
    dup = _value(reg, "driftline_label_join_total", outcome="duplicate")
    assert joined + early + dup == len(labels) and joined > 0.9 * len(labels)
    assert _value(reg, "driftline_summaries_emitted_total") == res.summaries
    assert _value(reg, "driftline_summaries_consumed_total", outcome="applied") == res.summaries
    published = {
        role: _value(reg, "driftline_messages_published_total", topic=role)
        for role in ("summaries", "alerts", "control", "deadletter")
    }
    assert published == {
        "summaries": res.summaries,
        "alerts": len(res.alerts),
        "control": len(res.commands),
        "deadletter": res.deadletters,
    }
    assert res.deadletters == 1
    assert _value(reg, "driftline_alerts_total") == len(res.alerts) > 0
    trips = [c for c in res.commands if c["action"] == "rollback"]
    assert trips and manual[0]["action"] == "release"
    assert _value(reg, "driftline_killswitch_commands_total", action="rollback") == len(trips)
    assert _value(reg, "driftline_killswitch_commands_total", mode="manual") == 1
    # the kill switch tripped, then the manual release cleared the gauge
    assert _value(reg, "driftline_killswitch_active", model="fraud") == 0
    # checkpoints: every commit of the run plus the manual release's
    checkpoints = _value(reg, "driftline_checkpoint_duration_seconds_count")
    assert checkpoints == res.commits + 1
    assert _value(reg, "driftline_checkpoint_errors_total") == 0
    batches = _value(reg, "driftline_batch_messages_count")
    assert 0 < batches < checkpoints  # idle flushes and the manual op are not batches
    # drift gauges from findings and from the sequential detectors' state
    assert _value(reg, "driftline_drift_statistic", detector="psi") > 0
    assert _value(reg, "driftline_drift_threshold", detector="bernoulli_cusum") > 0
    # periodic gauges after the last drain
    assert _value(reg, "driftline_consumer_lag_messages") == 0
    n_lag = sum(
        1
        for fam in reg.collect()
        for s in fam.samples
        if s.name == "driftline_consumer_lag_messages"
    )
    assert n_lag == 3 * runner.partitions  # predictions, labels, summaries per partition
    assert _value(reg, "driftline_assigned_partitions", stage="ingest") == runner.partitions
    assert _value(reg, "driftline_ready") == 1
    assert _value(reg, "driftline_label_join_pending") == runner.store.join_size() > 0


def test_killswitch_gauge_is_set_while_tripped() -> None:
    cfg, profile = demo_config()
    reg = CollectorRegistry()
    runner = EmbeddedRunner(cfg, {"fraud": profile}, metrics=Metrics(cfg, reg))
    asyncio.run(runner.start())
    asyncio.run(runner.manual("fraud", "rollback", START, target_version="v1"))
    assert _value(reg, "driftline_killswitch_active", model="fraud", action="rollback") == 1
    assert _value(reg, "driftline_killswitch_commands_total", mode="manual") == 1
    asyncio.run(runner.manual("fraud", "release", START + 1))
    assert _value(reg, "driftline_killswitch_active", model="fraud") == 0
