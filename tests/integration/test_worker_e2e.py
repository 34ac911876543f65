"""The worker end to end on the real Kafka and Redis.

* the seeded scenario (stream/scenario.py) through the producer SDK: stationary traffic is
  quiet, the 0–1 → 0–100 scale break raises a data-quality/schema alert naming the feature
  and version, the concept flip in one slice trips the kill switch (control topic + Redis
  mirror), and ``driftline killswitch release`` releases it;
* bad inputs land in the dead-letter topic with their reasons while processing continues;
* a worker stopped mid-stream and a new one started resume from the Redis offsets: every
  produced event is counted exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aiokafka import TopicPartition
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from scripts.services import RedisService
from stream.config import MonitorConfig, Topics
from stream.partitioner import murmur2_partition
from stream.profile import Profile
from stream.redis_store import RedisStore
from stream.scenario import CONCEPT_FLIP_AT, END, SCALE_BREAK, generate
from stream.sdk import KillSwitchWatcher
from stream.worker import Worker, add_worker_commands
from tests.fixtures.services import TopicFactory
from tests.fixtures.worker_harness import (
    TopicReader,
    WorkerEnv,
    counted,
    interleaved,
    make_env,
    produce,
    until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture
def env(
    kafka_bootstrap: str, redis_url: str, topic_factory: TopicFactory, unique_id: str
) -> WorkerEnv:
    return make_env(kafka_bootstrap, redis_url, topic_factory, unique_id, "e2e")


def _sample(body: str, name: str, **labels: str) -> float:
    """Sum of the exposition's samples called ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


# --------------------------------------------------------------------------- scenario


def test_scenario_alerts_kill_switch_and_release(
    env: WorkerEnv, demo: tuple[MonitorConfig, Profile], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, profile = demo
    start = time.time() - END - 120.0
    preds, labels = generate(rate=200.0, seed=11, start=start)
    settings = env.settings()
    opts = env.opts()

    async def main() -> None:
        worker = Worker(cfg, settings, opts, profiles={"fraud": profile})
        await worker.start()
        alerts = TopicReader(env.bootstrap, env.topics.alerts)
        control = TopicReader(env.bootstrap, env.topics.control)
        summaries = TopicReader(env.bootstrap, env.topics.summaries)
        watcher = KillSwitchWatcher(env.bootstrap, topic=env.topics.control).start()
        try:
            await asyncio.wait_for(worker.wait_assigned(), 60)
            assert worker.ready
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            n = await loop.run_in_executor(None, produce, env, interleaved(preds, labels))
            await until(
                "every prediction counted in the summaries",
                lambda: counted(summaries.values)[0] == len(preds),
                150,
                summaries.poll,
            )
            elapsed = time.perf_counter() - t0
            print(f"\nworker: {n} events ({worker.stats.counters['messages_in']} Kafka "
                  f"messages) through stage 1 in {elapsed:.1f} s = {n / elapsed:,.0f} events/s; "
                  f"{worker.stats.counters['commits']} commits")  # fmt: skip
            assert counted(summaries.values)[:2] == (len(preds), len(labels))
            await until(
                "the kill switch to trip",
                lambda: any(c["action"] == "rollback" for c in control.values),
                60,
                control.poll,
            )
            await loop.run_in_executor(None, alerts.poll, 1.0)
            got = alerts.values
            quiet = [a for a in got if a["detected_at"] < start + SCALE_BREAK[0]]
            assert quiet == [], f"alerts on stationary traffic: {quiet}"
            scale = [
                a for a in got
                if a["kind"] in ("data_quality", "schema")
                and a.get("feature") == "seller_quality_score"
                and a["model_version"] == "v1"
                and start + SCALE_BREAK[0] <= a["detected_at"] <= start + SCALE_BREAK[1] + 30
            ]  # fmt: skip
            assert scale, f"no data-quality alert for the scale break; got {got}"
            concept = [
                a for a in got
                if a["kind"] == "concept_drift" and a.get("slice") == "region=apac"
                and a["detected_at"] >= start + CONCEPT_FLIP_AT
            ]  # fmt: skip
            assert concept, "no concept-drift alert for the apac slice"
            trip = next(c for c in control.values if c["action"] == "rollback")
            assert trip["model_id"] == "fraud" and trip["target_version"] == "v1"
            assert set(trip["reason_alert_ids"]) <= {a["alert_id"] for a in got}
            mirror = await worker.store.get_killswitch("fraud")
            assert mirror is not None and orjson.loads(mirror)["active"] is True
            assert watcher.wait_ready(30)
            await until("the SDK watcher to see the trip",
                        lambda: watcher.state("fraud").active, 30)  # fmt: skip
            assert watcher.state("fraud").target_version == "v1"

            # operator release through the CLI command (runs in a thread: it has its own loop)
            for k, v in {
                "DRIFTLINE_KAFKA_BOOTSTRAP": env.bootstrap,
                "DRIFTLINE_REDIS_URL": env.redis_url,
                "DRIFTLINE_TOPIC_SUMMARIES": env.topics.summaries,
                "DRIFTLINE_REDIS_PREFIX": opts.redis_prefix,
            }.items():
                monkeypatch.setenv(k, v)
            parser = argparse.ArgumentParser()
            add_worker_commands(parser.add_subparsers(dest="command"))
            args = parser.parse_args(
                ["killswitch", "release", "--model", "fraud", "--reason", "e2e", "--wait", "60"]
            )
            rc = await loop.run_in_executor(None, args.func, args)
            assert rc == 0
            await until(
                "the release on the control topic",
                lambda: control.values[-1]["action"] == "release",
                30,
                control.poll,
            )
            release = control.values[-1]
            assert (release["model_id"], release["mode"]) == ("fraud", "manual")
            mirror = await worker.store.get_killswitch("fraud")
            assert mirror is not None and orjson.loads(mirror)["active"] is False
            await until("the SDK watcher to see the release",
                        lambda: not watcher.state("fraud").active, 30)  # fmt: skip
            assert worker.stats.counters["events_rejected"] == 0  # nothing re-read as a dup
            assert worker.stats.counters["ingest_fenced"] == 0
            assert worker.stats.counters["ingest_batch_errors"] == 0
            assert worker.stats.counters["detect_batch_errors"] == 0
        finally:
            watcher.close()
            for r in (alerts, control, summaries):
                r.close()
            await worker.stop()

    asyncio.run(main())


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_go_to_deadletter_and_processing_continues(
    env: WorkerEnv, demo: tuple[MonitorConfig, Profile]
) -> None:
    cfg, profile = demo
    now = time.time()
    preds, _ = generate(rate=20.0, seed=3, start=now - 120.0)
    good = [p for p in preds if p["ts"] < now - 60][:400]
    bad = [
        b"this is not json",
        b'{"event_id": "x", "model_id": "fraud"',
        b"[1, 2, 3]",
        b'{"event_id":"e1","model_id":"fraud","model_version":"v1","request_id":"r"}',
        orjson.dumps({**good[0], "event_id": "spam-1", "model_id": "spam"}),
        orjson.dumps({**good[0], "event_id": "big-1", "pad": "x" * 30_000}),
        orjson.dumps({**good[0], "event_id": "nan-1"}).replace(
            b'"score":' + orjson.dumps(good[0]["score"]), b'"score":NaN'
        ),
    ]
    expected_reasons = {"not_json", "not_object", "unknown_model", "too_large", "non_finite"}

    async def main() -> None:
        worker = Worker(cfg, env.settings(), env.opts(max_message_bytes=20_000),
                        profiles={"fraud": profile})  # fmt: skip
        await worker.start()
        dead = TopicReader(env.bootstrap, env.topics.deadletter)
        try:
            await asyncio.wait_for(worker.wait_assigned(), 60)
            producer = Producer({"bootstrap.servers": env.bootstrap})
            half = len(good) // 2
            for ev in good[:half]:
                producer.produce(env.topics.predictions, key=ev["request_id"].encode(),
                                 value=orjson.dumps(ev))  # fmt: skip
            for i, raw in enumerate(bad):
                producer.produce(env.topics.predictions, key=f"bad-{i}".encode(), value=raw)
            for ev in good[half:]:
                producer.produce(env.topics.predictions, key=ev["request_id"].encode(),
                                 value=orjson.dumps(ev))  # fmt: skip
            assert producer.flush(30) == 0
            await until(
                "every bad input in the dead-letter topic",
                lambda: len({d["deadletter_id"] for d in dead.values}) >= len(bad),
                60,
                dead.poll,
            )
            await until(
                "all good events accepted",
                lambda: worker.stats.counters["events_accepted"] == len(good),
                60,
            )
            reasons = {d["reason"] for d in dead.values}
            assert expected_reasons <= reasons, reasons
            assert any(r.startswith("schema:") for r in reasons), reasons
            for d in dead.values:
                assert d["topic"] == env.topics.predictions and d["message"]
            big = next(d for d in dead.values if d["reason"] == "too_large")
            assert big["raw_truncated"] is True and big["size"] > 30_000
            import aiohttp

            base = f"http://127.0.0.1:{worker.web_port}"
            async with aiohttp.ClientSession() as http:
                for path, status, text in (("/healthz", 200, "ok"), ("/readyz", 200, "ready")):
                    async with http.get(base + path) as resp:
                        assert (resp.status, (await resp.text()).strip()) == (status, text)
                async with http.get(base + "/metrics") as resp:
                    body = await resp.text()
                assert _sample(body, "driftline_events_accepted_total") == len(good)
                rejected = _sample(body, "driftline_events_rejected_total")
                assert rejected == worker.stats.counters["events_rejected"] >= len(bad)
                assert _sample(body, "driftline_ready") == 1
                assert _sample(body, "driftline_up") == 1
                async with http.get(base + "/table") as resp:
                    assert resp.status == 404  # no faust web views exposed
            assert worker.stats.counters["ingest_batch_errors"] == 0
        finally:
            dead.close()
            await worker.stop()

    asyncio.run(main())


def test_the_rest_of_the_bad_inputs_are_rejected_or_counted_and_processing_continues(
    env: WorkerEnv, demo: tuple[MonitorConfig, Profile]
) -> None:
    """The issue's list beyond the first test: missing model_id, a timestamp a year in the
    future, a duplicate event id, a 5 MB message (the topic allows it, the worker's cap of
    1 MiB does not), a label before its prediction and a label for an unknown request."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

    cfg, profile = demo
    now = time.time()
    preds, labels = generate(rate=20.0, seed=5, start=now - 120.0)
    good = [p for p in preds if p["ts"] < now - 60][:300]
    labelled = {lab["request_id"]: lab for lab in labels}
    early = next(p for p in good[150:] if p["request_id"] in labelled)  # label goes first
    rest = [p for p in good if p is not early]
    no_model = {k: v for k, v in good[0].items() if k != "model_id"}
    bad = [
        orjson.dumps({**no_model, "event_id": "nomodel-1"}),
        orjson.dumps({**good[1], "event_id": "future-1", "ts": now + 365 * 86400}),
        orjson.dumps(good[2]),  # the same event id a second time
        orjson.dumps({**good[3], "event_id": "huge-1", "pad": "x" * (5 << 20)}),
    ]
    expected = {"missing_model_id", "future_timestamp", "duplicate_event_id", "too_large"}
    unknown_label = {**labelled[early["request_id"]], "event_id": "lab-unknown",
                     "request_id": "never-predicted"}  # fmt: skip
    admin = AdminClient({"bootstrap.servers": env.bootstrap})
    entry = ConfigEntry(
        "max.message.bytes", str(8 << 20), incremental_operation=AlterConfigOpType.SET
    )
    res = ConfigResource("topic", env.topics.predictions, incremental_configs=[entry])
    for fut in admin.incremental_alter_configs([res]).values():
        fut.result(30)

    async def main() -> None:
        worker = Worker(cfg, env.settings(), env.opts(), profiles={"fraud": profile})
        await worker.start()
        dead = TopicReader(env.bootstrap, env.topics.deadletter)
        try:
            await asyncio.wait_for(worker.wait_assigned(), 60)
            producer = Producer({"bootstrap.servers": env.bootstrap, "message.max.bytes": 8 << 20})

            def send(topic: str, key: str, value: bytes) -> None:
                producer.produce(topic, key=key.encode(), value=value)

            def join(outcome: str) -> float:
                labels = {"model": "fraud", "outcome": outcome}
                got = worker.registry.get_sample_value("driftline_label_join_total", labels)
                return got or 0.0

            for ev in rest[:100]:
                send(env.topics.predictions, ev["request_id"], orjson.dumps(ev))
            for i, raw in enumerate(bad):
                # a retried event keeps its key (request_id): duplicates are caught per partition
                key = good[2]["request_id"] if i == 2 else f"bad-{i}"
                send(env.topics.predictions, key, raw)
            # a label before its prediction, and a label nobody will ever predict
            send(
                env.topics.labels, early["request_id"], orjson.dumps(labelled[early["request_id"]])
            )
            send(env.topics.labels, unknown_label["request_id"], orjson.dumps(unknown_label))
            assert producer.flush(60) == 0
            await until(
                "both early labels counted",
                lambda: join("early") >= 2,
                60,
            )
            send(env.topics.predictions, early["request_id"], orjson.dumps(early))
            for ev in rest[100:]:
                send(env.topics.predictions, ev["request_id"], orjson.dumps(ev))
            assert producer.flush(60) == 0
            try:
                await until(
                    "the rejected inputs in the dead-letter topic",
                    lambda: expected <= {d["reason"] for d in dead.values},
                    90,
                    dead.poll,
                )
            except AssertionError:
                print("dead letters:", {d["reason"] for d in dead.values}, worker.stats.counters)
                raise
            await until(
                "every good prediction accepted and the early label joined",
                lambda: (
                    worker.stats.counters["events_accepted"] == len(good) + 2
                    and join("joined") >= 1
                ),
                90,
            )
            huge = next(d for d in dead.values if d["reason"] == "too_large")
            assert huge["raw_truncated"] is True and huge["size"] > 5 << 20
            dup = next(d for d in dead.values if d["reason"] == "duplicate_event_id")
            assert good[2]["event_id"] in dup["message"]
            assert worker.stats.counters["ingest_batch_errors"] == 0
        finally:
            dead.close()
            await worker.stop()

    asyncio.run(main())


# --------------------------------------------------------------------------- restart


def test_restart_mid_stream_resumes_from_redis_offsets(
    env: WorkerEnv, demo: tuple[MonitorConfig, Profile]
) -> None:
    cfg, profile = demo
    start = time.time() - 200.0
    preds, labels = generate(rate=150.0, seed=5, start=start)
    cut = start + 80.0  # stationary part only
    preds = [p for p in preds if p["ts"] < cut]
    labels = [lab for lab in labels if lab["ts"] < cut]
    events = list(interleaved(preds, labels))
    first, second = events[: len(events) // 2], events[len(events) // 2 :]
    settings = env.settings(batch_size=20)  # Kafka messages per batch: many small batches
    # no offsets in Kafka at all: without seek-on-assign from Redis, B would start over
    opts = env.opts(commit_kafka_offsets=False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        summaries = TopicReader(env.bootstrap, env.topics.summaries)
        try:
            await loop.run_in_executor(None, produce, env, iter(first), 10)
            a = Worker(cfg, settings, opts, profiles={"fraud": profile})
            await a.start()
            await asyncio.wait_for(a.wait_assigned(), 60)
            await until("worker A to make progress",
                        lambda: a.stats.counters["commits"] >= 5, 60)  # fmt: skip
            await a.stop()  # mid-stream: cancels the loop wherever it is
            accepted_a = a.stats.counters["events_accepted"]
            await loop.run_in_executor(None, produce, env, iter(second), 10)
            store = RedisStore(env.redis_url, prefix=opts.redis_prefix)
            try:  # what A left in Redis (read without claiming)
                stored: dict[int, dict[str, int]] = {}
                for p in (0, 1):
                    raw = await store.redis.get(store._key("ingest", p, "offsets"))
                    stored[p] = orjson.loads(raw) if raw else {}  # {} = A never committed p
            finally:
                await store.close()
            b = Worker(cfg, settings, opts, profiles={"fraud": profile})
            await b.start()
            try:
                await asyncio.wait_for(b.wait_assigned(), 60)
                ingest_b = b.stages[0]
                for p in (0, 1):  # B resumed exactly where A's last commit left off
                    for topic, off in stored[p].items():
                        assert ingest_b.seeks[TopicPartition(topic, p)] == off
                await until(
                    "every prediction counted once",
                    lambda: counted(summaries.values)[0] >= len(preds),
                    120,
                    summaries.poll,
                )
                await asyncio.sleep(2.0)  # anything counted twice would show up now
                await loop.run_in_executor(None, summaries.poll, 1.0)
                n_pred, n_lab, _ = counted(summaries.values)
                accepted_b = b.stats.counters["events_accepted"]
                print(f"\nrestart: A accepted {accepted_a}, B accepted {accepted_b} of "
                      f"{len(events)}; B republished {b.stats.counters['ingest_republished']} "
                      f"outbox messages, dropped {b.stats.counters['ingest_stale_records_dropped']}"
                      f" stale records; summaries counted {n_pred}/{len(preds)} predictions, "
                      f"{n_lab}/{len(labels)} labels")  # fmt: skip
                assert (n_pred, n_lab) == (len(preds), len(labels))
                assert a.stats.counters["events_rejected"] == 0
                assert b.stats.counters["events_rejected"] == 0
                assert 0 < accepted_a < len(first)  # A stopped in the middle of the backlog
                assert 0 < accepted_a < len(events)
                assert accepted_b > 0
                # events accepted by A but not committed are re-read by B: the sum may
                # exceed the input, but what is *counted* (the summaries) does not
                assert accepted_a + accepted_b >= len(events)
            finally:
                await b.stop()
            store = RedisStore(env.redis_url, prefix=opts.redis_prefix)
            try:
                for p in (0, 1):
                    c = await store.claim("ingest", p, "test-inspector")
                    assert c.outbox == []  # everything published and acked
                    assert c.next_offset is not None
            finally:
                await store.close()
        finally:
            summaries.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- commit splitting


def test_a_backlog_of_many_models_is_split_into_commits_with_the_same_summaries(
    env: WorkerEnv,
) -> None:
    """A batch that would close more than ``max_summaries_per_commit`` ticks is processed
    and committed in several pieces (memory, issue 6): more commits than batches, and every
    (model, tick) summary equal to one in-process pass over the same messages."""
    from load_tests.generator import GenConfig, messages, monitor_config
    from load_tests.generator import generate as gen_events
    from stream.engine import Ingest, compile_plans
    from stream.events import RawMessage

    span = 40.0
    g = GenConfig(n_events=8_000, seed=11, models=40, rate=8_000 / span,
                  start=time.time() - span - 60.0)  # fmt: skip
    cfg, profiles = monitor_config(g, label_horizon=0)
    msgs = messages(gen_events(g), events_per_message=20)
    topic = env.topics.predictions
    producer = Producer({"bootstrap.servers": env.bootstrap, "linger.ms": 5})
    for m in msgs:
        producer.produce(topic, m.value, m.key, partition=0)
    assert producer.flush(30) == 0

    # the oracle: the same messages through one engine in one pass, then flushed
    plans = compile_plans(cfg, profiles)
    ing = Ingest(cfg, plans, 0, topics=env.topics, tick_s=1.0, lateness_s=2.0,
                 max_future_s=float("inf"))  # fmt: skip
    raw = [RawMessage(topic, 0, i, m.value) for i, m in enumerate(msgs)]
    outs = [ing.process_raw(raw, time.time()), ing.flush(time.time() + 60.0)]
    want = {}
    for out in outs:
        for om in out.messages:
            doc = orjson.loads(om.value)
            want[(doc["model_id"], doc["tick"])] = doc
    assert len(want) > 40 * (span - 5)

    settings = env.settings(max_summaries_per_commit=25)
    opts = env.opts(stages=("ingest",), max_future_s=float("inf"))

    async def main() -> None:
        summaries = TopicReader(env.bootstrap, env.topics.summaries)
        worker = Worker(cfg, settings, opts, profiles=profiles)
        await worker.start()
        try:
            await asyncio.wait_for(worker.wait_assigned(), 60)
            await until("every tick summarised", lambda: len(summaries.values) >= len(want),
                        120, summaries.poll)  # fmt: skip
            await asyncio.sleep(1.0)
            summaries.poll(0.5)
            batches = worker.registry.get_sample_value(
                "driftline_batch_messages_count", {"stage": "ingest"}
            )
            commits = worker.stats.counters["commits"]
        finally:
            await worker.stop()
            summaries.close()
        got = {(d["model_id"], d["tick"]): d for d in summaries.values}
        print(f"\nsplit commits: {len(msgs)} messages, {len(want)} summaries, "
              f"{batches:.0f} batches, {commits} commits")  # fmt: skip
        assert batches is not None and commits > 3 * batches, (commits, batches)
        assert len(got) == len(summaries.values), "a (model, tick) summarised twice"
        assert got.keys() == want.keys()
        for key, doc in want.items():
            g_doc = got[key]
            assert len(doc["groups"]) == len(g_doc["groups"]) > 0, key
            for grp_w, grp_g in zip(doc["groups"], g_doc["groups"], strict=True):
                assert (grp_g["version"], grp_g["slice"], grp_g["n"]) == (
                    grp_w["version"], grp_w["slice"], grp_w["n"]), key  # fmt: skip
                assert ("features" in grp_g) == ("features" in grp_w), key
                for name, f in grp_w.get("features", {}).items():
                    assert grp_g["features"][name]["counts"] == f["counts"], (key, name)

    asyncio.run(main())


# --------------------------------------------------------------------------- Redis outage


def test_redis_outage_stalls_the_worker_then_it_catches_up(
    env: WorkerEnv, demo: tuple[MonitorConfig, Profile], redis_service: RedisService
) -> None:
    cfg, profile = demo
    start = time.time() - 150.0
    preds, labels = generate(rate=50.0, seed=8, start=start)
    preds = [p for p in preds if p["ts"] < start + 60]
    labels = [lab for lab in labels if lab["ts"] < start + 60]
    half = len(preds) // 2

    async def main() -> None:
        loop = asyncio.get_running_loop()
        summaries = TopicReader(env.bootstrap, env.topics.summaries)
        worker = Worker(cfg, env.settings(), env.opts(), profiles={"fraud": profile})
        await worker.start()
        try:
            await asyncio.wait_for(worker.wait_assigned(), 60)
            await loop.run_in_executor(None, produce, env, interleaved(preds[:half], []))
            await until("the first half", lambda: worker.stats.counters["events_accepted"] == half,
                        60)  # fmt: skip
            await asyncio.sleep(1.2)  # the claims are older than AOF's everysec window
            redis_service.kill()
            await loop.run_in_executor(None, produce, env, interleaved(preds[half:], labels))
            await asyncio.sleep(3.0)
            store = worker.store
            assert isinstance(store, RedisStore) and store.retries > 0  # waiting, not failing
            assert all(s.task is not None and not s.task.done() for s in worker.stages)
            redis_service.start()  # main thread: the child dies with the thread that forked it
            await until(
                "every event counted after Redis came back",
                lambda: counted(summaries.values)[:2] == (len(preds), len(labels)),
                90,
                summaries.poll,
            )
            c = worker.stats.counters
            assert c["ingest_batch_errors"] == c["detect_batch_errors"] == 0
            assert c["ingest_fenced"] == c["ingest_recoveries"] == 0
        finally:
            summaries.close()
            await worker.stop()

    asyncio.run(main())


# --------------------------------------------------------------------------- scale out, zombies


def test_scale_out_to_two_workers_counts_every_event_once(
    env: WorkerEnv, demo: tuple[MonitorConfig, Profile]
) -> None:
    """1 → 2 workers mid-stream (faust-streaming#502 duplicates in exactly this case)."""
    cfg, profile = demo
    start = time.time() - 200.0
    preds, labels = generate(rate=100.0, seed=9, start=start)
    preds = [p for p in preds if p["ts"] < start + 80]
    labels = [lab for lab in labels if lab["ts"] < start + 80]
    events = list(interleaved(preds, labels))
    third = len(events) // 3
    settings = env.settings(batch_size=20)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        summaries = TopicReader(env.bootstrap, env.topics.summaries)
        a = Worker(cfg, settings, env.opts(instance_id=f"a-{env.uid}"), profiles={"fraud": profile})
        b = Worker(cfg, settings, env.opts(instance_id=f"b-{env.uid}"), profiles={"fraud": profile})
        try:
            await a.start()
            await asyncio.wait_for(a.wait_assigned(), 60)
            await loop.run_in_executor(None, produce, env, iter(events[:third]), 10)
            await until("A to make progress", lambda: a.stats.counters["commits"] >= 3, 60)
            await b.start()
            await asyncio.wait_for(b.wait_assigned(), 60)
            await until(
                "the partitions to be split",
                lambda: len(a.stages[0].owned()) == len(b.stages[0].owned()) == 1,
                60,
            )
            await loop.run_in_executor(None, produce, env, iter(events[third:]), 10)
            await until(
                "every event counted",
                lambda: counted(summaries.values)[:2] == (len(preds), len(labels)),
                120,
                summaries.poll,
            )
            await asyncio.sleep(2.0)
            await loop.run_in_executor(None, summaries.poll, 1.0)
            assert counted(summaries.values)[:2] == (len(preds), len(labels))
            ing_a, ing_b = a.stages[0], b.stages[0]
            assert ing_a.owned() | ing_b.owned() == {0, 1}
            assert not ing_a.owned() & ing_b.owned()  # each partition has one owner
            assert b.stats.counters["events_accepted"] > 0
            for w in (a, b):
                assert w.stats.counters["events_rejected"] == 0
                assert w.stats.counters["ingest_batch_errors"] == 0
        finally:
            summaries.close()
            await b.stop()
            await a.stop()

    asyncio.run(main())


def test_a_fenced_partition_stops_while_the_others_go_on(
    env: WorkerEnv, demo: tuple[MonitorConfig, Profile], caplog: pytest.LogCaptureFixture
) -> None:
    cfg, profile = demo
    start = time.time() - 200.0
    preds, _ = generate(rate=50.0, seed=4, start=start)
    preds = [p for p in preds if p["ts"] < start + 60]
    half = len(preds) // 2
    opts = env.opts()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        worker = Worker(cfg, env.settings(), opts, profiles={"fraud": profile})
        await worker.start()
        intruder = RedisStore(env.redis_url, prefix=opts.redis_prefix)
        try:
            await asyncio.wait_for(worker.wait_assigned(), 60)
            await loop.run_in_executor(None, produce, env, interleaved(preds[:half], []))
            await until("the first half", lambda: worker.stats.counters["events_accepted"] == half,
                        60)  # fmt: skip
            key0 = intruder._key("ingest", 0, "offsets")
            key1 = intruder._key("ingest", 1, "offsets")
            before0, before1 = await intruder.redis.get(key0), await intruder.redis.get(key1)
            await intruder.claim("ingest", 0, "another-worker")  # partition 0 changes hands
            await loop.run_in_executor(None, produce, env, interleaved(preds[half:], []))
            await until("the fencing", lambda: worker.stats.counters["ingest_fenced"] == 1, 60)
            second = preds[half:]
            n_p1 = sum(1 for p in second if murmur2_partition(p["request_id"].encode(), 2) == 1)
            assert 0 < n_p1 < len(second)
            await until(
                "partition 1 to keep going",
                lambda: worker.stats.counters["events_accepted"] >= half + n_p1,
                60,
            )
            await asyncio.sleep(1.0)
            ingest = worker.stages[0]
            assert 0 in ingest.fenced and ingest.owned() == {1}
            # the zombie's commits never landed on partition 0; partition 1 moved on
            assert await intruder.redis.get(key0) == before0
            assert await intruder.redis.get(key1) != before1
        finally:
            await intruder.close()
            await worker.stop()
        assert any(
            "FENCED" in r.getMessage() and "ingest/0" in r.getMessage() for r in caplog.records
        )

    asyncio.run(main())


def test_an_unloadable_state_pauses_only_its_partition(
    env: WorkerEnv, demo: tuple[MonitorConfig, Profile], caplog: pytest.LogCaptureFixture
) -> None:
    cfg, profile = demo
    opts = env.opts()
    start = time.time() - 100.0
    preds, _ = generate(rate=30.0, seed=2, start=start)
    preds = [p for p in preds if p["ts"] < start + 30]
    n_p1 = sum(1 for p in preds if murmur2_partition(p["request_id"].encode(), 2) == 1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        seed = RedisStore(env.redis_url, prefix=opts.redis_prefix)
        try:  # what a future, incompatible version of driftline might have written
            await seed.redis.set(
                seed._key("ingest", 0, "state"), b'{"schema": 99, "kind": "ingest"}'
            )
        finally:
            await seed.close()
        worker = Worker(cfg, env.settings(), opts, profiles={"fraud": profile})
        await worker.start()
        try:
            await asyncio.wait_for(worker.wait_assigned(), 60)
            await loop.run_in_executor(None, produce, env, interleaved(preds, []))
            await until("partition 1's events", lambda: worker.stats.counters["events_accepted"]
                        == n_p1, 60)  # fmt: skip
            await asyncio.sleep(1.0)
            ingest = worker.stages[0]
            assert ingest.owned() == {1} and 0 in ingest.fenced
            assert worker.stats.counters["events_accepted"] == n_p1
            assert worker.stats.counters["ingest_claim_errors"] >= 1
        finally:
            await worker.stop()
        crit = [r.getMessage() for r in caplog.records if r.levelname == "CRITICAL"]
        assert any("ingest/0" in m and "schema 99" in m for m in crit), crit

    asyncio.run(main())


# --------------------------------------------------------------------------- real process


def test_worker_process_sigkilled_mid_stream_then_replaced(
    env: WorkerEnv, tmp_path: Any, unique_id: str
) -> None:
    """``driftline worker`` as a process with examples/monitors.yaml: SIGKILL, replace, SIGTERM.

    The process is a faust-streaming App (stream/app.py) hosting the aiokafka stage runners:
    faust serves the endpoints but consumes nothing, joins no group, creates no topic."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from scripts.services import REPO_ROOT

    start = time.time() - 200.0
    preds, labels = generate(rate=100.0, seed=12, start=start)
    preds = [p for p in preds if p["ts"] < start + 80]
    labels = [lab for lab in labels if lab["ts"] < start + 80]
    events = list(interleaved(preds, labels))
    first, second = events[: len(events) // 2], events[len(events) // 2 :]

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    port = free_port()
    t = env.topics
    child_env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "DRIFTLINE_KAFKA_BOOTSTRAP": env.bootstrap,
        "DRIFTLINE_REDIS_URL": env.redis_url,
        "DRIFTLINE_REDIS_PREFIX": f"proc{unique_id}",
        "DRIFTLINE_GROUP_PREFIX": f"proc-{unique_id}",
        "DRIFTLINE_INSTANCE_ID": f"pod-{unique_id}",
        "DRIFTLINE_WEB_BIND": f"127.0.0.1:{port}",
        "DRIFTLINE_TICK_S": "1",
        "DRIFTLINE_ALLOWED_LATENESS_S": "2",
        "DRIFTLINE_BATCH_SIZE": "20",
        "DRIFTLINE_BATCH_WITHIN_S": "0.05",
        **{f"DRIFTLINE_TOPIC_{k.upper()}": getattr(t, k) for k in Topics.__dataclass_fields__},
    }
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"

    def spawn(log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "stream.worker", "worker", "--config",
             str(REPO_ROOT / "examples" / "monitors.yaml")],
            cwd=REPO_ROOT, env=child_env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def http(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, ""
        except OSError:
            return 0, ""

    def counter(name: str, **labels: str) -> int:
        return int(_sample(http("/metrics")[1], name, **labels))

    def wait_for(what: str, check: Callable[[], bool], limit_s: float, log: Any) -> None:
        deadline = time.monotonic() + limit_s
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}; log:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.1)

    summaries = TopicReader(env.bootstrap, t.summaries)
    a = spawn(log_a)
    b: subprocess.Popen[bytes] | None = None
    try:
        wait_for("A ready", lambda: http("/readyz")[0] == 200, 60, log_a)
        produce(env, iter(first), 10)
        wait_for(
            "A's progress",
            lambda: counter("driftline_checkpoint_duration_seconds_count", stage="ingest") >= 5,
            60,
            log_a,
        )
        a.send_signal(signal.SIGKILL)  # a crash: nothing flushed, nothing committed to Kafka
        assert a.wait(10) == -signal.SIGKILL
        produce(env, iter(second), 10)
        b = spawn(log_b)
        wait_for("B ready", lambda: http("/readyz")[0] == 200, 90, log_b)

        def all_counted() -> bool:
            summaries.poll()
            return counted(summaries.values)[0] >= len(preds)

        wait_for("every prediction counted", all_counted, 120, log_b)
        time.sleep(2.0)
        summaries.poll(1.0)
        assert counted(summaries.values)[:2] == (len(preds), len(labels))
        assert counter("driftline_events_accepted_total") > 0
        assert counter("driftline_events_rejected_total") == 0
        assert http("/healthz")[0] == 200
        for path in ("/table", "/router", "/graph"):  # faust's own views are off
            assert http(path)[0] == 404, path
        admin = AdminClient({"bootstrap.servers": env.bootstrap})
        groups = {g.group_id for g in admin.list_consumer_groups().result(timeout=10).valid}
        ours = {g for g in groups if g.startswith(f"proc-{unique_id}")}
        # only the stage runners' groups: faust's App consumes nothing under its own id
        assert ours == {f"proc-{unique_id}-ingest", f"proc-{unique_id}-detect"}, ours
        topics = set(admin.list_topics(timeout=10).topics)
        assert not {x for x in topics if x.startswith(f"proc-{unique_id}")}, "faust made topics"
        b.send_signal(signal.SIGTERM)
        assert b.wait(30) == 0, log_b.read_text()[-3000:]
        assert "claimed partitions" in log_b.read_text()
    finally:
        summaries.close()
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_start_refuses_missing_or_mismatched_topics(
    env: WorkerEnv, demo: tuple[MonitorConfig, Profile], topic_factory: TopicFactory
) -> None:
    cfg, profile = demo
    labels3 = topic_factory(3)
    mismatched = Topics(**{**env.topics.__dict__, "labels": labels3})
    missing = Topics(
        **{**env.topics.__dict__, "control": f"nope-{env.uid}", "alerts": f"nope2-{env.uid}"}
    )

    async def main() -> None:
        for topics, expected in (
            (mismatched, f"'{labels3}' has 3; they must be equal"),
            (missing, f"topics do not exist: 'nope2-{env.uid}', 'nope-{env.uid}'"),
        ):
            worker = Worker(
                cfg, env.settings(topics=topics), env.opts(), profiles={"fraud": profile}
            )
            with pytest.raises(ValueError, match=expected):
                await worker.start()
            await worker.stop()

    asyncio.run(main())
    # the check did not create them (the test broker has auto.create.topics.enable=true)
    admin = AdminClient({"bootstrap.servers": env.bootstrap})
    assert (
        admin.list_topics(timeout=10)
        .topics.keys()
        .isdisjoint({f"nope-{env.uid}", f"nope2-{env.uid}"})
    )
