"""Fault injection on the real services, under load, with an oracle.

Every test produces seeded events (``stream.scenario.generate``: each event has its own
``event_id`` and ``request_id``; the oracle is the number of predictions and labels
produced) through the producer SDK while the fault happens, and checks that the stage-1
summaries add up to exactly what was produced (:func:`counted`: predictions and labels
over unique summary ids, so a message published twice is not a double count, but an event
counted in two summaries is):

* the Kafka broker stopped cleanly and restarted, and SIGKILLed and restarted, while the
  SDK is sending: the worker recovers by itself, totals equal, the alerts published before
  the restart are still on the alerts topic afterwards and alert ids are unique;
* Redis SIGKILLed (AOF ``everysec``) and restarted while the worker commits: it waits,
  does not crash, and the totals equal what was produced;
* Redis at ``maxmemory`` with ``noeviction``: commits are refused (ERROR log, the
  ``driftline_store_retries_total`` counter rises), the worker pauses, nothing is evicted,
  and after ``maxmemory`` is raised it catches up with equal totals;
* workers joining and leaving under load, 1 → 3 → 2 on six partitions: every partition
  ends up owned by exactly one worker and the totals equal what was produced.

The local service launchers (``kafka_service``, ``redis_service``) must run in the main
thread (their processes die with the thread that started them), so kill/restart is called
from the event-loop thread: the worker's loop is blocked while a broker starts, which is
part of the fault.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import pytest
import redis
from confluent_kafka import KafkaError

from scripts.services import KafkaService, RedisService
from stream.config import MonitorConfig
from stream.profile import Profile
from stream.redis_store import RedisStore
from stream.scenario import SCALE_BREAK, generate
from stream.worker import Worker
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

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

Events = list[tuple[str, dict[str, Any]]]


@pytest.fixture
def env(
    kafka_bootstrap: str, redis_url: str, topic_factory: TopicFactory, unique_id: str
) -> WorkerEnv:
    return make_env(kafka_bootstrap, redis_url, topic_factory, unique_id, "faults")


class Reader(TopicReader):
    """A :class:`TopicReader` that rides out a broker outage: it reads every partition from
    the beginning by assignment, with no consumer group (a group's coordinator is itself
    unavailable or loading while the broker restarts, and a reader that joins then can stay
    without positions), and transport errors are transient (librdkafka reconnects)."""

    TRANSIENT = (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._PARTITION_EOF)

    def __init__(self, bootstrap: str, topic: str) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer
        from confluent_kafka import TopicPartition as CTopicPartition

        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"reader-{topic}-{time.monotonic_ns()}",  # never joined
                "enable.auto.commit": False,
            }
        )
        parts = self.consumer.list_topics(topic, timeout=30).topics[topic].partitions
        assert parts, f"topic {topic!r} has no partitions"
        self.consumer.assign([CTopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        self.values: list[dict[str, Any]] = []

    def poll(self, seconds: float = 0.2) -> list[dict[str, Any]]:
        import orjson

        for msg in self.consumer.consume(num_messages=1000, timeout=seconds):
            err = msg.error()
            if err is None:
                self.values.append(orjson.loads(msg.value() or b"null"))
            elif err.code() not in self.TRANSIENT and not err.retriable():
                raise AssertionError(f"consume error: {err}")
        return self.values


def _events(seed: int, rate: float, span_s: float) -> tuple[float, list[Any], list[Any], Events]:
    """Start, predictions and labels of the first ``span_s`` seconds of the scenario (in
    the past), and both in event-time order."""
    start = time.time() - 400.0
    preds, labels = generate(rate=rate, seed=seed, start=start)
    preds = [p for p in preds if p["ts"] < start + span_s]
    labels = [lab for lab in labels if lab["ts"] < start + span_s]
    return start, preds, labels, list(interleaved(preds, labels))


def _joined(summaries: list[dict[str, Any]]) -> int:
    """Joined label outcomes over unique summaries."""
    seen = {s["summary_id"]: s for s in summaries if "summary_id" in s}
    return sum(int(s["labels"]["outcomes"].get("joined", 0)) for s in seen.values())


def _report(name: str, preds: list[Any], labels: list[Any], summaries: list[Any]) -> str:
    n_pred, n_lab, unique = counted(summaries)
    return (
        f"{name}: produced {len(preds)} predictions + {len(labels)} labels; counted "
        f"{n_pred} + {n_lab} in {unique} unique summaries ({len(summaries) - unique} "
        f"re-published copies); lost {len(preds) - n_pred} + {len(labels) - n_lab}; "
        f"joined {_joined(summaries)}"
    )


async def _all_counted(
    what: str, summaries: Reader, preds: list[Any], labels: list[Any], limit_s: float
) -> None:
    """Wait until the summaries count every event, then make sure nothing more arrives
    (an event counted twice would show up as a total above the oracle)."""
    want = (len(preds), len(labels))
    try:
        await until(what, lambda: counted(summaries.values)[:2] >= want, limit_s, summaries.poll)
    except AssertionError as err:
        raise AssertionError(
            f"{err}; {_report('so far', preds, labels, summaries.values)}"
        ) from None
    await asyncio.sleep(2.0)
    await asyncio.get_running_loop().run_in_executor(None, summaries.poll, 1.0)
    got = counted(summaries.values)[:2]
    assert got == want, _report("double count", preds, labels, summaries.values)


def _assert_healthy(*workers: Worker) -> None:
    for w in workers:
        c = w.stats.counters
        assert all(s.task is not None and not s.task.done() for s in w.stages), "a stage died"
        assert c["events_rejected"] == 0, f"events rejected (re-read as duplicates?): {c}"
        assert c["ingest_batch_errors"] == c["detect_batch_errors"] == 0, dict(c)


def _paced(env: WorkerEnv, events: Events, chunks: int, gap_s: float) -> int:
    """``events`` through one SDK producer in ``chunks`` parts ``gap_s`` apart (each part
    flushed): a load that lasts."""
    from stream.sdk import DriftlineProducer

    sdk = DriftlineProducer(
        env.bootstrap, predictions_topic=env.topics.predictions, labels_topic=env.topics.labels,
        max_queue=1_000_000, batch_events=10,
    )  # fmt: skip
    size = -(-len(events) // chunks)
    try:
        for i in range(0, len(events), size):
            for kind, ev in events[i : i + size]:
                assert sdk.log_event(kind, ev)
            assert sdk.flush(30) == 0
            time.sleep(gap_s)
    finally:
        assert sdk.close(60) == 0
    assert sdk.dropped == 0 and sdk.delivery_errors == 0
    return len(events)


def _stored_offsets(url: str, store: RedisStore, parts: tuple[int, ...]) -> dict[Any, int]:
    """Stage 1's checkpointed next offsets in Redis, ``{(topic, partition): offset}``."""
    import orjson

    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        got: dict[Any, int] = {}
        for p in parts:
            raw = client.get(store._key("ingest", p, "offsets"))
            for topic, off in (orjson.loads(raw) if raw else {}).items():
                got[(topic, p)] = int(off)
        return got
    finally:
        client.close()


# --------------------------------------------------------------------------- Kafka


@pytest.mark.parametrize("graceful", [True, False], ids=["clean-restart", "sigkill-restart"])
def test_kafka_broker_restart_under_load(
    env: WorkerEnv,
    demo: tuple[MonitorConfig, Profile],
    kafka_service: KafkaService,
    graceful: bool,
) -> None:
    cfg, profile = demo
    # the first 125 s of the scenario: stationary traffic, then the 0–1 → 0–100 scale
    # break at 90 s, which raises data-quality alerts before the restart
    start, preds, labels, events = _events(seed=31, rate=30.0, span_s=SCALE_BREAK[0] + 35)
    t_split = start + SCALE_BREAK[0] + 10  # alerts come from the part before
    first = [e for e in events if e[1]["ts"] < t_split]
    second = [e for e in events if e[1]["ts"] >= t_split]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        worker = Worker(cfg, env.settings(batch_size=50), env.opts(), profiles={"fraud": profile})
        summaries = Reader(env.bootstrap, env.topics.summaries)
        alerts = Reader(env.bootstrap, env.topics.alerts)
        await worker.start()
        try:
            await asyncio.wait_for(worker.wait_assigned(), 60)
            await loop.run_in_executor(None, produce, env, iter(first), 20)
            await until("alerts before the restart", lambda: len(alerts.values) > 0, 60,
                        alerts.poll)  # fmt: skip
            await loop.run_in_executor(None, alerts.poll, 1.0)
            before = {a["alert_id"] for a in alerts.values}
            # under load: the SDK sends the second part while the broker goes away
            sending = loop.run_in_executor(None, produce, env, iter(second), 20)
            await asyncio.sleep(0.5)
            if graceful:
                kafka_service.restart()
            else:
                kafka_service.kill()
                await asyncio.sleep(3.0)  # the worker sees the broker gone
                assert all(s.task is not None and not s.task.done() for s in worker.stages)
                kafka_service.restart()
            await asyncio.wait_for(sending, 90)
            await _all_counted("every event counted after the broker restart", summaries,
                               preds, labels, 90)  # fmt: skip
            await loop.run_in_executor(None, alerts.poll, 1.0)
            ids = [a["alert_id"] for a in alerts.values]
            dups = {i: n for i, n in Counter(ids).items() if n > 1}
            name = "kafka restart" if graceful else "kafka SIGKILL"
            print(f"\n{_report(name, preds, labels, summaries.values)}; alerts {len(before)} "
                  f"before the restart, {len(set(ids))} after, {len(ids) - len(set(ids))} "
                  "duplicate copies")  # fmt: skip
            assert before <= set(ids), f"alerts lost: {before - set(ids)}"
            assert not dups, f"alert ids published more than once: {dups}"
            assert _joined(summaries.values) == len(labels)
            _assert_healthy(worker)
        finally:
            summaries.close()
            alerts.close()
            await worker.stop()

    asyncio.run(main())


# --------------------------------------------------------------------------- Redis


def test_redis_sigkill_under_load_then_restart(
    env: WorkerEnv, demo: tuple[MonitorConfig, Profile], redis_service: RedisService
) -> None:
    """SIGKILL while commits are in flight (AOF everysec: up to ~1 s of acknowledged
    commits may be gone after the restart). State, offsets, outbox and join buffer are one
    script, so whatever survived is a consistent checkpoint; the worker keeps its in-memory
    engine (ahead of or equal to Redis) and its next commit overwrites the older one."""
    cfg, profile = demo
    _, preds, labels, events = _events(seed=32, rate=40.0, span_s=80.0)
    third = len(events) // 3

    async def main() -> None:
        loop = asyncio.get_running_loop()
        worker = Worker(cfg, env.settings(batch_size=20), env.opts(), profiles={"fraud": profile})
        summaries = Reader(env.bootstrap, env.topics.summaries)
        await worker.start()
        store = worker.store
        assert isinstance(store, RedisStore)
        try:
            await asyncio.wait_for(worker.wait_assigned(), 60)
            await loop.run_in_executor(None, produce, env, iter(events[:third]), 10)
            await until("the first third committed", lambda: worker.stats.counters["commits"] >= 5,
                        60)  # fmt: skip
            await asyncio.sleep(1.5)  # the claims are older than AOF's everysec window
            sending = loop.run_in_executor(None, produce, env, iter(events[third:]), 10)
            commits = worker.stats.counters["commits"]
            await until("commits under load", lambda: worker.stats.counters["commits"]
                        >= commits + 3, 30)  # fmt: skip
            ingest = worker.stages[0]
            acked = dict(ingest._checkpointed)  # offsets of the commits Redis acknowledged
            redis_service.kill()
            await asyncio.sleep(3.0)
            assert store.retries > 0, "the worker did not notice Redis was gone"
            assert all(s.task is not None and not s.task.done() for s in worker.stages)
            redis_service.restart()  # main thread: the child dies with the thread that forked it
            # what the AOF kept, read before the worker's loop runs again (it is blocked here)
            durable = _stored_offsets(env.redis_url, store, (0, 1))
            rolled_back = sum(
                max(0, off - durable.get((tp.topic, tp.partition), 0)) for tp, off in acked.items()
            )
            await asyncio.wait_for(sending, 60)
            await _all_counted("every event counted after Redis came back", summaries,
                               preds, labels, 90)  # fmt: skip
            c = worker.stats.counters
            print(f"\n{_report('redis SIGKILL', preds, labels, summaries.values)}; store "
                  f"retries {store.retries}; fenced {c['ingest_fenced']}, recoveries "
                  f"{c['ingest_recoveries']}; acknowledged-but-lost by the AOF: "
                  f"{rolled_back} records of offsets")  # fmt: skip
            assert c["ingest_fenced"] == c["detect_fenced"] == 0
            _assert_healthy(worker)
        finally:
            summaries.close()
            await worker.stop()

    asyncio.run(main())


def test_redis_maxmemory_noeviction_pauses_the_worker_then_it_catches_up(
    env: WorkerEnv,
    demo: tuple[MonitorConfig, Profile],
    redis_service: RedisService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg, profile = demo
    _, preds, labels, events = _events(seed=33, rate=40.0, span_s=80.0)
    half = len(events) // 2
    admin = redis.Redis.from_url(env.redis_url, socket_timeout=10)
    saved: dict[str, str] = {
        k: str(admin.config_get(k)[k]) for k in ("maxmemory", "maxmemory-policy")
    }
    caplog.set_level(logging.ERROR, logger="driftline.redis")

    def retries_metric(w: Worker) -> float:
        return w.registry.get_sample_value("driftline_store_retries_total") or 0.0

    async def main() -> None:
        loop = asyncio.get_running_loop()
        admin.config_set("maxmemory-policy", "noeviction")
        evicted = int(admin.info("stats")["evicted_keys"])
        worker = Worker(cfg, env.settings(batch_size=20), env.opts(), profiles={"fraud": profile})
        summaries = Reader(env.bootstrap, env.topics.summaries)
        await worker.start()
        store = worker.store
        assert isinstance(store, RedisStore)
        try:
            await asyncio.wait_for(worker.wait_assigned(), 60)
            await loop.run_in_executor(None, produce, env, iter(events[:half]), 10)
            await until("the first half committed", lambda: worker.stats.counters["commits"] >= 5,
                        60)  # fmt: skip
            used = int(admin.info("memory")["used_memory"])
            admin.config_set("maxmemory", str(max(1 << 20, used // 2)))  # Redis is now full
            retries0 = retries_metric(worker)
            await loop.run_in_executor(None, produce, env, iter(events[half:]), 10)
            await until("a refused commit", lambda: store.write_refusals >= 3, 30)
            await until("driftline_store_retries_total to rise",
                        lambda: retries_metric(worker) > retries0, 10)  # fmt: skip
            await loop.run_in_executor(None, summaries.poll, 1.0)
            paused_at = counted(summaries.values)[:2]
            await asyncio.sleep(2.0)
            await loop.run_in_executor(None, summaries.poll, 1.0)
            # paused: nothing counted while Redis refuses writes, and not everything counted
            assert counted(summaries.values)[:2] == paused_at
            assert paused_at != (len(preds), len(labels))
            assert all(s.task is not None and not s.task.done() for s in worker.stages)
            assert int(admin.info("stats")["evicted_keys"]) == evicted
            refusals = store.write_refusals
            admin.config_set("maxmemory", saved["maxmemory"])
            await _all_counted("every event counted after maxmemory was raised", summaries,
                               preds, labels, 60)  # fmt: skip
            print(f"\n{_report('redis maxmemory', preds, labels, summaries.values)}; "
                  f"{refusals} refused requests; counted {paused_at} while paused")  # fmt: skip
            assert int(admin.info("stats")["evicted_keys"]) == evicted, "keys were evicted"
            assert _joined(summaries.values) == len(labels)
            _assert_healthy(worker)
            c = worker.stats.counters
            assert c["ingest_recoveries"] == c["ingest_fenced"] == 0, dict(c)
        finally:
            summaries.close()
            await worker.stop()

    try:
        asyncio.run(main())
    finally:
        for k, v in saved.items():
            admin.config_set(k, v)
        admin.close()
    refused = [r.getMessage() for r in caplog.records if "REFUSED" in r.getMessage()]
    assert refused and "OutOfMemoryError" in refused[0], "the refusal was not logged at ERROR"


# --------------------------------------------------------------------------- scaling


def test_workers_join_and_leave_under_load_1_3_2(
    kafka_bootstrap: str,
    redis_url: str,
    topic_factory: TopicFactory,
    unique_id: str,
    demo: tuple[MonitorConfig, Profile],
) -> None:
    """Six partitions; A alone, then B and C join, then C leaves (static membership: the
    group notices after the session timeout, 10 s here) while the SDK keeps sending."""
    env6 = make_env(kafka_bootstrap, redis_url, topic_factory, unique_id, "faults", partitions=6)
    cfg, profile = demo
    _, preds, labels, events = _events(seed=34, rate=40.0, span_s=90.0)
    parts = [events[i * len(events) // 3 : (i + 1) * len(events) // 3] for i in range(3)]
    settings = env6.settings(batch_size=20)
    everything = set(range(6))

    def make(name: str) -> Worker:
        opts = env6.opts(instance_id=f"{name}-{unique_id}", session_timeout_ms=10_000)
        return Worker(cfg, settings, opts, profiles={"fraud": profile})

    def owners(ws: list[Worker], stage: int) -> list[set[int]]:
        return [w.stages[stage].owned() for w in ws]

    def split(ws: list[Worker]) -> bool:
        for stage in (0, 1):
            sets = owners(ws, stage)
            if sum(map(len, sets)) != 6 or set().union(*sets) != everything:
                return False  # an unowned partition, or one owned twice
        return True

    async def main() -> None:
        loop = asyncio.get_running_loop()
        summaries = Reader(env6.bootstrap, env6.topics.summaries)
        a, b, c = make("a"), make("b"), make("c")
        started: list[Worker] = []
        try:
            await a.start()
            started.append(a)
            await asyncio.wait_for(a.wait_assigned(), 60)
            sending = loop.run_in_executor(None, produce, env6, iter(parts[0]), 10)
            await until("A to make progress", lambda: a.stats.counters["commits"] >= 3, 60)
            for w in (b, c):
                await w.start()
                started.append(w)
            await asyncio.wait_for(asyncio.gather(b.wait_assigned(), c.wait_assigned()), 60)
            await until(
                f"six partitions split over A, B, C (now {owners([a, b, c], 0)})",
                lambda: split([a, b, c]) and all(len(s) == 2 for s in owners([a, b, c], 0)),
                60,
            )
            await asyncio.wait_for(sending, 60)
            sending = loop.run_in_executor(None, produce, env6, iter(parts[1]), 10)
            await until("B and C to make progress", lambda: min(
                w.stats.counters["commits"] for w in (b, c)) >= 3, 60)  # fmt: skip
            await c.stop()
            started.remove(c)
            await asyncio.wait_for(sending, 60)
            sending = loop.run_in_executor(None, produce, env6, iter(parts[2]), 10)
            await until(
                f"C's partitions taken over by A and B (now {owners([a, b], 0)})",
                lambda: split([a, b]),
                60,
            )
            await asyncio.wait_for(sending, 60)
            await _all_counted("every event counted after 1 → 3 → 2", summaries,
                               preds, labels, 90)  # fmt: skip
            assert split([a, b]), f"ownership at the end: {owners([a, b], 0)}"
            accepted = [w.stats.counters["events_accepted"] for w in (a, b, c)]
            print(f"\n{_report('1→3→2', preds, labels, summaries.values)}; accepted by "
                  f"A/B/C {accepted}; ingest partitions at the end A {sorted(a.stages[0].owned())}"
                  f" B {sorted(b.stages[0].owned())}")  # fmt: skip
            assert all(n > 0 for n in accepted), accepted
            assert _joined(summaries.values) == len(labels)
            _assert_healthy(a, b)
        finally:
            summaries.close()
            for w in reversed(started):
                await w.stop()

    asyncio.run(main())


# --------------------------------------------------------------------------- re-claim fails


class _FailingStore(RedisStore):
    """Fails ingest/0's ``fail_at``-th commit and then the re-claim of ingest/0 with an
    error that is neither a connection error nor a write refusal (a bug, a bad script)."""

    def __init__(self, *args: Any, fail_at: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.fail_at = fail_at
        self.p0_commits = 0
        self.claims_failed = 0

    async def commit(self, stage: str, partition: int, generation: int, **kw: Any) -> Any:
        if (stage, partition) == ("ingest", 0):
            self.p0_commits += 1
            if self.p0_commits == self.fail_at:
                raise redis.exceptions.ResponseError("ERR injected commit failure")
        return await super().commit(stage, partition, generation, **kw)

    async def claim(self, stage: str, partition: int, owner: str) -> Any:
        if (stage, partition) == ("ingest", 0) and self.p0_commits >= self.fail_at:
            self.claims_failed += 1
            raise redis.exceptions.ResponseError("ERR injected claim failure")
        return await super().claim(stage, partition, owner)


def test_a_failed_re_claim_pauses_its_partition_and_the_batch_goes_on(
    env: WorkerEnv, demo: tuple[MonitorConfig, Profile], caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: ``_recover`` used to raise when the re-claim failed, so the other
    partitions' commits of the same batch were never absorbed nor published (their joined
    pairs lost from memory, their summaries stuck in the outbox) and the failed partition's
    records were fetched and skipped. Now it is paused (CRITICAL log) and the rest goes on."""
    from stream.partitioner import murmur2_partition

    cfg, profile = demo
    _, preds, labels, events = _events(seed=35, rate=40.0, span_s=60.0)
    opts = env.opts()

    def on_p1(evs: list[Any]) -> int:
        return sum(1 for e in evs if murmur2_partition(e["request_id"].encode(), 2) == 1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        store = _FailingStore(env.redis_url, prefix=opts.redis_prefix, fail_at=4)
        worker = Worker(cfg, env.settings(batch_size=20), opts, profiles={"fraud": profile},
                        store=store)  # fmt: skip
        summaries = Reader(env.bootstrap, env.topics.summaries)
        await worker.start()
        try:
            await asyncio.wait_for(worker.wait_assigned(), 60)
            await loop.run_in_executor(None, produce, env, iter(events), 10)
            await until("the injected failures", lambda: store.claims_failed >= 1, 60)
            want = (on_p1(preds), on_p1(labels))

            def p1() -> tuple[int, int]:
                return counted([s for s in summaries.values if s.get("partition") == 1])[:2]

            await until(f"partition 1's {want} events counted", lambda: p1() == want, 60,
                        summaries.poll)  # fmt: skip
            ingest = worker.stages[0]
            assert ingest.owned() == {1} and 0 in ingest.fenced
            c = worker.stats.counters
            assert (c["ingest_recoveries"], c["ingest_claim_errors"]) == (1, 1), dict(c)
            assert c["ingest_batch_errors"] == 0, dict(c)  # nothing escaped the batch
            print(f"\nfailed re-claim: partition 1 counted {p1()} of {want}; partition 0 "
                  f"paused after {store.p0_commits} commits")  # fmt: skip
        finally:
            summaries.close()
            await worker.stop()
            await store.close()
        crit = [r.getMessage() for r in caplog.records if r.levelname == "CRITICAL"]
        assert any("ingest/0" in m and "injected claim failure" in m for m in crit), crit

    asyncio.run(main())


def test_redis_loses_the_aof_tail_of_acknowledged_commits(
    env: WorkerEnv, demo: tuple[MonitorConfig, Profile], redis_service: RedisService
) -> None:
    """What AOF ``everysec`` loses in a *host* crash: the writes of the last second, already
    acknowledged. A SIGKILL of redis-server alone loses nothing (the AOF is written to the
    page cache before each reply; only fsync is deferred; the SIGKILL test above measures
    0), so the crash is simulated: SIGKILL, then cut the AOF back to its size of a few
    commits earlier, then restart.

    The stored state and offsets went back together (one script = one MULTI in the AOF; a
    cut inside it is reverted on load). The running worker does not replay: its in-memory
    engine is ahead, and its next commit overwrites the older checkpoint with state and
    offsets that belong together, so the totals stay exact. What the lost commits wrote
    besides that is gone: join-buffer entries (a prediction parked there cannot be joined
    by a later label) and kill-switch mirror updates until the next change."""
    cfg, profile = demo
    _, preds, labels, events = _events(seed=36, rate=40.0, span_s=80.0)
    third = len(events) // 3

    async def main() -> None:
        loop = asyncio.get_running_loop()
        worker = Worker(cfg, env.settings(batch_size=20), env.opts(), profiles={"fraud": profile})
        summaries = Reader(env.bootstrap, env.topics.summaries)
        await worker.start()
        store = worker.store
        assert isinstance(store, RedisStore)
        try:
            await asyncio.wait_for(worker.wait_assigned(), 60)
            await loop.run_in_executor(None, produce, env, iter(events[:third]), 10)
            await until("the first third committed", lambda: worker.stats.counters["commits"]
                        >= 5, 60)  # fmt: skip
            await asyncio.sleep(1.5)  # the claims are older than what the crash loses
            # paced, so stage 1 is still committing when the crash comes (sent at once, it
            # could finish the backlog before the cut and leave only stage-2 commits to lose)
            sending = loop.run_in_executor(None, _paced, env, events[third:], 10, 0.25)
            aof_dir = redis_service.data_dir / "appendonlydir"
            incr = sorted(aof_dir.glob("*.incr.aof"))[-1]
            ingest = worker.stages[0]

            def ingested() -> int:
                return sum(ingest._checkpointed.values())

            mark = ingested()
            await until("stage 1 commits under load", lambda: ingested() > mark, 30)
            fsynced = incr.stat().st_size  # what the crash keeps
            kept = ingested()
            for _ in range(3):  # three more stage-1 checkpoints the crash will lose
                mark = ingested()
                await until("a stage-1 commit the crash will lose",
                            lambda m=mark: ingested() > m, 30)  # fmt: skip
            acked = dict(ingest._checkpointed)
            assert sum(acked.values()) > kept
            assert sorted(aof_dir.glob("*.incr.aof"))[-1] == incr, "AOF rewritten meanwhile"
            redis_service.kill()
            with incr.open("r+b") as f:
                f.truncate(fsynced)
            redis_service.restart()
            durable = _stored_offsets(env.redis_url, store, (0, 1))
            rolled_back = sum(
                max(0, off - durable.get((tp.topic, tp.partition), 0)) for tp, off in acked.items()
            )
            assert rolled_back > 0, "the simulated crash lost no acknowledged commit"
            await asyncio.wait_for(sending, 60)
            await _all_counted("every event counted after the AOF lost its tail", summaries,
                               preds, labels, 90)  # fmt: skip
            c = worker.stats.counters
            print(f"\n{_report('AOF tail lost', preds, labels, summaries.values)}; "
                  f"acknowledged offsets rolled back in Redis: {rolled_back} records")  # fmt: skip
            assert c["ingest_fenced"] == c["detect_fenced"] == 0
            _assert_healthy(worker)
        finally:
            summaries.close()
            await worker.stop()

    asyncio.run(main())
